"""LVM test volumes made by LVM's own tools on loop devices, and LVM's reports as the oracle.

This kernel has no device-mapper: ``pvcreate``, ``vgcreate`` and ``lvcreate --driverloaded n -an -Zn`` write
the metadata without activating anything, ``lvextend --driverloaded n`` adds a segment. An LV's contents are
then written by hand into the PV files at the offsets LVM reports (``pvs`` pe_start, ``lvs --segments``
seg_pe_ranges). Thin pools and snapshots cannot be created without device-mapper; they are added to LVM's own
``vgcfgbackup`` text and written back with ``vgcfgrestore --force``, which checks the text as LVM does.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.guest.support import blank, loop_device, patch, read
from tests.support.clients import require_tool, run

MiB = 1024 * 1024
ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
_names = itertools.count()


def vg_name() -> str:
    """A VG name no other test (or helper running beside this one) uses."""
    return f"dp{os.getpid()}x{next(_names)}"


def lvm(*args: str | os.PathLike[str]) -> str:
    out = run(require_tool("lvm"), *args, check=False, env=ENV)
    if out.returncode != 0:
        raise AssertionError(f"lvm {' '.join(map(str, args))} failed: {out.stderr}")
    return out.stdout


def report(command: str, vg: str, fields: str, *extra: str) -> list[dict[str, str]]:
    where = ["-S", f"vg_name={vg}"] if command == "pvs" else [vg]
    out = json.loads(lvm(command, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, *extra,
                         *where))
    rows: list[dict[str, str]] = next(iter(out["report"][0].values()))
    return rows


@dataclass
class Segment:
    lv: str
    start: int            # bytes in the LV
    size: int
    pv: str               # device path
    first_pe: int
    stripes: int
    stripe_size: int


@contextlib.contextmanager
def pv_files(tmp: Path, *sizes: int) -> Iterator[list[tuple[Path, str]]]:
    """Sparse files of ``sizes`` attached as loop devices and made PVs: [(file, device)], detached afterwards."""
    with contextlib.ExitStack() as stack:
        out = []
        for i, size in enumerate(sizes):
            path = blank(tmp / f"pv{i}.img", size)
            dev = stack.enter_context(loop_device(path))
            lvm("pvcreate", "-ff", "-y", dev)
            out.append((path, dev))
        yield out


def segments(vg: str) -> list[Segment]:
    rows = report("lvs", vg, "lv_name,seg_start,seg_size,seg_pe_ranges,stripes,stripe_size", "--segments", "-a")
    out = []
    for row in rows:
        ranges = row["seg_pe_ranges"].split()
        for item in ranges:
            m = re.fullmatch(r"(\S+):(\d+)-(\d+)", item)
            if m is None:
                continue
            out.append(Segment(row["lv_name"], int(row["seg_start"]), int(row["seg_size"]), m[1], int(m[2]),
                               int(row["stripes"]), int(row["stripe_size"] or 0)))
    return out


def pe_starts(vg: str) -> dict[str, int]:
    return {r["pv_name"]: int(r["pe_start"]) for r in report("pvs", vg, "pv_name,pe_start")}


def extent_size(vg: str) -> int:
    return int(report("vgs", vg, "vg_extent_size")[0]["vg_extent_size"])


def write_linear_lv(vg: str, lv: str, source: Path, files: dict[str, Path]) -> None:
    """Copy ``source`` (a filesystem image) into the linear LV ``lv``, segment by segment, at the PV offsets
    LVM reports. ``files`` maps each device to its PV file."""
    starts, extent = pe_starts(vg), extent_size(vg)
    with open(source, "rb") as f:
        for seg in [s for s in segments(vg) if s.lv == lv]:
            assert seg.stripes == 1
            f.seek(seg.start)
            at = starts[seg.pv] + seg.first_pe * extent
            remaining = seg.size
            while remaining:
                data = f.read(min(remaining, 4 * MiB))
                if not data:
                    break
                if any(data):
                    patch(files[seg.pv], at, data)
                at += len(data)
                remaining -= len(data)


def lvm_crc(data: bytes) -> int:
    """LVM's CRC: CRC-32 from 0xf597a6cf without the final inversion (lib/misc/crc.c)."""
    return zlib.crc32(data, 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def metadata_area(pv_file: Path) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    """(area offset, area size, raw_locn entries) of the PV's first metadata area (LVM puts it at 4 KiB)."""
    header = read(pv_file, 4096, 512)
    assert header[4:20] == b" LVM2 x[5A%r0N*>"
    start, size = struct.unpack_from("<QQ", header, 24)
    locns = []
    for i in range(8):
        entry = struct.unpack_from("<QQII", header, 40 + 24 * i)
        if entry[0] == 0:
            break
        locns.append(entry)
    return start, size, locns


def current_text(pv_file: Path) -> str:
    start, _size, locns = metadata_area(pv_file)
    off, length, _crc, _flags = locns[0]
    return read(pv_file, start + off, length).rstrip(b"\0").decode()


def write_copy(pv_file: Path, text: str, *, good_checksum: bool = True) -> None:
    """Append ``text`` to the PV's metadata area as a new copy (after the current one) and point the area's
    header at it, re-sealing the header's checksum: what LVM does on commit, done by hand for hostile texts."""
    start, size, locns = metadata_area(pv_file)
    off, length, _crc, _flags = locns[0]
    data = text.encode() + b"\0"
    new = (off + length + 511) // 512 * 512
    assert new + len(data) <= size, "the metadata area is full"
    patch(pv_file, start + new, data)
    crc = lvm_crc(data) ^ (0 if good_checksum else 1)
    header = bytearray(read(pv_file, 4096, 512))
    struct.pack_into("<QQII", header, 40, new, len(data), crc, 0)
    struct.pack_into("<I", header, 0, lvm_crc(bytes(header[4:])))
    patch(pv_file, 4096, bytes(header))


def bump_seqno(text: str, by: int = 1) -> str:
    m = re.search(r"seqno = (\d+)", text)
    assert m
    return text[:m.start(1)] + str(int(m[1]) + by) + text[m.end(1):]


def add_lvs(vg: str, dev: str, sections: str, tmp: Path) -> None:
    """Add LV sections to the VG's metadata through vgcfgbackup, an edit, and vgcfgrestore --force."""
    backup = tmp / f"{vg}.vg"
    lvm("vgcfgbackup", "-f", backup, vg)
    text = backup.read_text()
    end = text.rindex("\n\t}\n")           # the end of logical_volumes, before the VG's closing brace
    backup.write_text(text[:end] + "\n" + sections + text[end:])
    lvm("vgcfgrestore", "--force", "-f", backup, vg)


def lvs_json(vg: str) -> list[dict[str, Any]]:
    return report("lvs", vg, "lv_name,lv_uuid,lv_size,segtype,seg_count,origin,pool_lv,lv_attr", "-a")


def linear_lv(name: str, uuid_tail: str, pe: int, count: int, *, visible: bool = True, status: str = "") -> str:
    """The text of a one-segment linear LV on pv0, as vgcfgbackup writes one."""
    flags = '"READ", "WRITE"' + (', "VISIBLE"' if visible else "") + status
    return (f"\t\t{name} {{\n\t\t\tid = \"aaaaaa-bbbb-cccc-dddd-eeee-ffff-{uuid_tail}\"\n"
            f"\t\t\tstatus = [{flags}]\n\t\t\tflags = []\n\t\t\tsegment_count = 1\n\n"
            f"\t\t\tsegment1 {{\n\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = {count}\n\n"
            f"\t\t\t\ttype = \"striped\"\n\t\t\t\tstripe_count = 1\n\n"
            f"\t\t\t\tstripes = [\n\t\t\t\t\t\"pv0\", {pe}\n\t\t\t\t]\n\t\t\t}}\n\t\t}}\n")


def special_lv(name: str, uuid_tail: str, count: int, body: str, *, visible: bool = True) -> str:
    flags = '"READ", "WRITE"' + (', "VISIBLE"' if visible else "")
    lines = "".join(f"\t\t\t\t{line}\n" for line in body.strip().splitlines())
    return (f"\t\t{name} {{\n\t\t\tid = \"aaaaaa-bbbb-cccc-dddd-eeee-ffff-{uuid_tail}\"\n"
            f"\t\t\tstatus = [{flags}]\n\t\t\tflags = []\n\t\t\tsegment_count = 1\n\n"
            f"\t\t\tsegment1 {{\n\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = {count}\n\n"
            f"{lines}\t\t\t}}\n\t\t}}\n")
