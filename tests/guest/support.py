"""Disk and partition builders for the guest tests, and the oracles that read them back (sfdisk, sgdisk, blkid).

Only partition/disk building helpers live here; other guest test helpers go in modules beside this one.
Every builder runs a Debian tool (a missing tool fails the test through ``require_tool``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diskport.formats import open_image
from diskport.guest.view import GuestView
from tests.support.clients import qemu_img, require_tool, run
from tests.support.images import ReadCount

MiB = 1024 * 1024


def blank(path: Path, size: int) -> Path:
    """A sparse file of ``size`` zero bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sfdisk(path: Path, script: str) -> None:
    """Write a partition table with ``sfdisk`` from its script format."""
    subprocess.run([require_tool("sfdisk"), "--no-reread", "--no-tell-kernel", "-q", os.fspath(path)],
                   input=script, text=True, check=True, capture_output=True)


def sfdisk_json(path: Path, nested_dos: bool = False) -> dict[str, Any]:
    """``sfdisk --json`` (with ``-Y dos``: the MBR of a GPT disk) as a dict: the ``partitiontable`` object."""
    args = [require_tool("sfdisk"), "--json"] + (["-Y", "dos"] if nested_dos else []) + [os.fspath(path)]
    out = run(*args)
    table: dict[str, Any] = json.loads(out.stdout)["partitiontable"]
    return table


def sgdisk(target: Path | str, *args: str) -> str:
    """Run sgdisk (never with -q: it then writes nothing) and insist that it says it completed."""
    out = run(require_tool("sgdisk"), *args, os.fspath(target), check=False)
    if out.returncode != 0 or "completed successfully" not in out.stdout:
        raise AssertionError(f"sgdisk {' '.join(args)} failed: {out.stdout}{out.stderr}")
    return out.stdout


def sgdisk_print(target: Path | str) -> tuple[int, str, list[dict[str, Any]]]:
    """``sgdisk -p``: (logical sector size, disk GUID, rows of number/first/last/code/name)."""
    out = run(require_tool("sgdisk"), "-p", os.fspath(target)).stdout
    size = re.search(r"Sector size \(logical(?:/physical)?\): (\d+)", out)
    guid = re.search(r"Disk identifier \(GUID\): ([0-9A-Fa-f-]+)", out)
    assert size and guid, out
    rows = []
    for line in out.split("Number  Start (sector)", 1)[1].splitlines()[1:]:
        m = re.match(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+\S+ \S+\s+([0-9A-F]{4})  ?(.*)$", line)
        if m:
            rows.append({"number": int(m[1]), "first": int(m[2]), "last": int(m[3]), "code": m[4],
                         "name": m[5].strip()})
    return int(size[1]), guid[1].lower(), rows


def sgdisk_info(target: Path | str, number: int) -> dict[str, Any]:
    """``sgdisk -i N``: type GUID, unique GUID, first and last sector, attributes, name."""
    out = run(require_tool("sgdisk"), "-i", str(number), os.fspath(target)).stdout

    def field(pattern: str) -> str:
        m = re.search(pattern, out)
        assert m, f"{pattern!r} not in {out}"
        return m[1]

    return {"type": field(r"Partition GUID code: ([0-9A-F-]+)").lower(),
            "uuid": field(r"Partition unique GUID: ([0-9A-F-]+)").lower(),
            "first": int(field(r"First sector: (\d+)")), "last": int(field(r"Last sector: (\d+)")),
            "attributes": int(field(r"Attribute flags: ([0-9A-Fa-f]+)"), 16),
            "name": field(r"Partition name: '(.*)'")}


def blkid(path: Path) -> dict[str, str]:
    """``blkid -p -o export`` (low-level superblock probe) as a dict; empty when nothing is found."""
    out = run(require_tool("blkid"), "-p", "-o", "export", os.fspath(path), check=False)
    values = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key] = re.sub(r"\\(.)", r"\1", value)
    return values


@contextlib.contextmanager
def loop_device(path: Path, sector_size: int = 512) -> Iterator[str]:
    """``path`` attached as a loop device (with a logical sector size), detached afterwards."""
    dev = run(require_tool("losetup"), "--find", "--show", "--sector-size", str(sector_size), path).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev, check=False)


@contextlib.contextmanager
def view_of(location: Path | str, fmt: str | None = None) -> Iterator[GuestView]:
    """A GuestView over the image at a path or URL."""
    with open_image(location if isinstance(location, str) else os.fspath(location), fmt) as image:
        yield GuestView(image)


def count_preads(view: GuestView, budget: int | None = None) -> ReadCount:
    """Count the ``pread`` calls made on ``view`` itself (cached or not): how many steps a walk of the partition
    table took, which its block cache hides from ``view.stats``. Past a ``budget`` of calls one raises
    :class:`~tests.support.images.ReadBudgetExceeded`."""
    count = ReadCount(budget)
    real = view.pread

    def counted(offset: int, length: int) -> bytes:
        data = real(offset, length)
        count.add(1)
        return data

    setattr(view, "pread", counted)  # noqa: B010 - mypy refuses an assignment to a method
    return count


def convert(raw: Path, fmt: str, options: str = "") -> Path:
    """The raw disk converted by ``qemu-img convert`` to ``fmt`` beside it."""
    out = raw.with_suffix(f".{fmt}")
    qemu_img("convert", "-f", "raw", "-O", fmt, *(["-o", options] if options else []), raw, out)
    return out


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def gpt_header_fields(path: Path, lba: int, sector_size: int = 512) -> dict[str, int]:
    """The fields of a GPT header a hostile test rewrites, read back from the file."""
    raw = read(path, lba * sector_size, 92)
    (entries_lba, count, entry_size, entries_crc) = struct.unpack_from("<QIII", raw, 72)
    return {"entries_lba": entries_lba, "count": count, "entry_size": entry_size, "entries_crc": entries_crc}


def rewrite_gpt_header(path: Path, lba: int, sector_size: int = 512, **fields: int) -> None:
    """Change fields of the GPT header at ``lba`` (count, entry_size, entries_crc, my_lba) and re-seal its CRC,
    so the header itself stays valid and only the changed values are hostile."""
    raw = bytearray(read(path, lba * sector_size, 92))
    header_size = struct.unpack_from("<I", raw, 12)[0]
    raw = bytearray(read(path, lba * sector_size, header_size))
    offsets = {"my_lba": (24, "<Q"), "entries_lba": (72, "<Q"), "count": (80, "<I"), "entry_size": (84, "<I"),
               "entries_crc": (88, "<I")}
    for name, value in fields.items():
        at, fmt = offsets[name]
        struct.pack_into(fmt, raw, at, value)
    struct.pack_into("<I", raw, 16, 0)
    struct.pack_into("<I", raw, 16, zlib.crc32(raw))
    patch(path, lba * sector_size, bytes(raw))


def rewrite_gpt_entry(path: Path, lba: int, index: int, sector_size: int = 512, *, first: int | None = None,
                      last: int | None = None) -> None:
    """Change one entry's first/last LBA in the array the header at ``lba`` points to, re-sealing both CRCs."""
    h = gpt_header_fields(path, lba, sector_size)
    at = h["entries_lba"] * sector_size + index * h["entry_size"]
    entry = bytearray(read(path, at, h["entry_size"]))
    if first is not None:
        struct.pack_into("<Q", entry, 32, first)
    if last is not None:
        struct.pack_into("<Q", entry, 40, last)
    patch(path, at, bytes(entry))
    array = read(path, h["entries_lba"] * sector_size, h["count"] * h["entry_size"])
    rewrite_gpt_header(path, lba, sector_size, entries_crc=zlib.crc32(array))


def mbr_entry(status: int, ptype: int, lba: int, sectors: int) -> bytes:
    """One 16-byte MBR/EBR entry (CHS fields left 0xFF-ish as tools do for LBA-only entries)."""
    return struct.pack("<B3sB3sII", status, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", lba, sectors)


def mbr_sector(entries: list[bytes], code: bytes = b"") -> bytes:
    """A 512-byte MBR/EBR: boot code, up to four entries, 55AA."""
    body = code.ljust(446, b"\0")[:446] + b"".join(entries).ljust(64, b"\0")
    return body + b"\x55\xaa"
