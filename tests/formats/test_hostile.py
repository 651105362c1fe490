"""Issue 10's hostile and unusual images, each built here: polyglots, formats diskport does not read, shared
clusters and grains, absurd declared sizes, named pipes as extents, and names that would drive the terminal.

The cases about one reader live with it: qcow2 clusters shared between guest clusters in
formats/test_qcow2_bad.py; seSparse descriptors and named-pipe extents in formats/test_vmdk_bad.py."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import pytest

from diskport import CorruptImage, UnsupportedImage, convert
from diskport.errors import DestinationError
from diskport.formats import open_image
from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io, require_tool, run, run_cli
from tests.support.images import write_pattern_raw


def one_line_failure(*args: str | os.PathLike[str], exit_code: int = 1) -> str:
    proc = run_cli(*args)
    assert proc.returncode == exit_code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().split("\n")
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -- 6: polyglots --------------------------------------------------------------------------------------------
def make_iso(tmp_path: Path, name: str = "real.iso") -> Path:
    xorriso = require_tool("xorriso")
    content = tmp_path / "iso-content"
    content.mkdir(exist_ok=True)
    (content / "readme.txt").write_text("an ISO made by xorriso\n" * 100)
    iso = tmp_path / name
    run(xorriso, "-as", "mkisofs", "-quiet", "-V", "POLY", "-o", iso, content)
    return iso


def test_iso_with_a_qcow2_in_its_system_area_is_refused(tmp_path: Path) -> None:
    """The system area (first 32 KiB) of an ISO is free for any use: a whole qcow2 with 512-byte clusters fits
    there. Both readings are real (qemu-img reads the qcow2, xorriso the ISO), so diskport asks for -f."""
    iso = make_iso(tmp_path)
    small = tmp_path / "small.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", small, "1M")
    qemu_io(small, "qcow2", "write -P 0x5a 0 4k")
    header = small.read_bytes()
    assert len(header) < 32 * 1024
    poly = tmp_path / "poly.bin"
    data = bytearray(iso.read_bytes())
    assert not any(data[: len(header)])  # the system area of a plain xorriso ISO is unused
    data[: len(header)] = header
    poly.write_bytes(bytes(data))
    assert qemu_img("check", "-f", "qcow2", poly).returncode == 0  # the oracle reads it as qcow2
    listing = run(require_tool("xorriso"), "-indev", poly, "-find", "/", "-name", "readme.txt")
    assert "readme.txt" in listing.stdout  # and as an ISO

    with pytest.raises(UnsupportedImage, match=r"valid as more than one format \(qcow2, iso\)"):
        open_image(poly)
    line = one_line_failure("convert", "-q", poly, tmp_path / "x.raw")
    assert "--format" in line and str(poly) in line
    assert not (tmp_path / "x.raw").exists()
    with open_image(poly, "qcow2") as image:
        assert image.read(0, 4096) == b"\x5a" * 4096
    with open_image(poly, "iso") as image:
        assert image.virtual_size == len(data)

    packed = tmp_path / "poly.bin.gz"
    packed.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(UnsupportedImage, match="matches more than one format"):
        open_image(packed)


def test_real_isos_qcow2s_and_mbr_disks_still_open(tmp_path: Path) -> None:
    with open_image(make_iso(tmp_path)) as image:
        assert image.format == "iso"
    qcow = tmp_path / "plain.qcow2"
    qemu_img("create", "-f", "qcow2", qcow, "64M")
    with open_image(qcow) as image:
        assert image.format == "qcow2"
    mbr = write_pattern_raw(tmp_path / "mbr.raw", 8 * MiB)
    run(require_tool("sfdisk"), "-q", mbr, input="label: dos\nstart=2048, type=83\n")
    assert mbr.read_bytes()[510:512] == b"\x55\xaa"
    with open_image(mbr) as image:
        assert image.format == "raw"


# -- 7: formats diskport does not read --------------------------------------------------------------------------
def _blank(path: Path, head: bytes, size: int = MiB, tail: bytes = b"") -> Path:
    data = bytearray(size)
    data[: len(head)] = head
    if tail:
        data[-512: -512 + len(tail)] = tail
    path.write_bytes(bytes(data))
    return path


FOREIGN = {
    "parallels": "Parallels", "qed": "QED", "sesparse": "seSparse", "cowd": "COWD", "asif": "ASIF",
    "dmg": "DMG/UDIF", "cloop": "cloop", "bochs": "Bochs",
}  # an OVA is read now (tests/ova); only an OVA inside an OVA is refused this way


def make_foreign(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"disk.{kind}"
    if kind in ("parallels", "qed"):  # qemu-img writes these two
        qemu_img("create", "-f", kind, path, "16M")
        return path
    if kind == "sesparse":
        return _blank(path, struct.pack("<QQ", 0xCAFEBABE, 0x200000001))
    if kind == "cowd":
        return _blank(path, b"COWD" + struct.pack("<II", 1, 3))
    if kind == "asif":
        return _blank(path, b"shdw" + struct.pack(">I", 1))
    if kind == "dmg":
        return _blank(path, b"", tail=b"koly" + struct.pack(">II", 4, 512))
    if kind == "cloop":
        return _blank(path, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
    if kind == "bochs":
        return _blank(path, b"Bochs Virtual HD Image\0".ljust(32, b"\0") + b"Redolog\0".ljust(16, b"\0"))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_formats_not_read_are_refused_by_magic(tmp_path: Path, kind: str) -> None:
    image = make_foreign(tmp_path, kind)
    with pytest.raises(UnsupportedImage, match="a format diskport does not read"):
        open_image(image)
    line = one_line_failure("convert", "-q", image, tmp_path / "out.raw")
    assert FOREIGN[kind] in line and str(image) in line and "; " in line, line  # names it, says what to do
    assert not (tmp_path / "out.raw").exists()
    packed = tmp_path / f"{image.name}.gz"
    packed.write_bytes(gzip.compress(image.read_bytes()))
    if kind != "dmg":  # a DMG's trailer is at its end, which a stream only shows too late
        with pytest.raises(UnsupportedImage, match="a format diskport does not read"):
            open_image(packed)


def test_a_raw_disk_can_still_be_named_raw(tmp_path: Path) -> None:
    image = make_foreign(tmp_path, "bochs")
    convert(image, tmp_path / "out.raw", source_format="raw")
    assert (tmp_path / "out.raw").read_bytes() == image.read_bytes()


# -- 9: absurd declared sizes ---------------------------------------------------------------------------------
def test_a_4_eib_zero_extent_is_a_clear_error_for_qcow2_output(tmp_path: Path) -> None:
    desc = tmp_path / "huge.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    f'createType="monolithicFlat"\nRW {(1 << 62) // 512} ZERO\n')
    assert len(desc.read_bytes()) < 200
    with pytest.raises(DestinationError, match="L1 table larger than qemu's 32 MiB limit"):
        convert(desc, tmp_path / "out.qcow2", output_format="qcow2")
    line = one_line_failure("convert", "-q", "-O", "qcow2", desc, tmp_path / "out.qcow2")
    assert "32 MiB limit" in line
    assert os.listdir(tmp_path) == ["huge.vmdk"]


def test_a_2_eib_qcow2_is_refused_before_writing(tmp_path: Path) -> None:
    image = tmp_path / "huge.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=2M", image, "2E")
    with open_image(image) as opened:
        assert opened.virtual_size == 2 << 60
    line = one_line_failure("convert", "-q", "-O", "qcow2", image, tmp_path / "out.qcow2")
    assert "L1 table larger than" in line
    assert sorted(os.listdir(tmp_path)) == ["huge.qcow2"]
    # with 2 MiB clusters in the output too, the size is one qemu can hold, and the table is written sparse
    convert(image, tmp_path / "big.qcow2", output_format="qcow2", cluster_size=2 * MiB)
    assert qemu_img("check", tmp_path / "big.qcow2").returncode == 0


# -- 12: names that would drive the terminal ---------------------------------------------------------------------
HOSTILE = "\nFAKE: ok\x1b]0;t\x07\r"


def test_backing_file_name_cannot_forge_lines(tmp_path: Path) -> None:
    image = tmp_path / "x.qcow2"
    placeholder = "b" * len(HOSTILE.encode())
    qemu_img("create", "-f", "qcow2", "-u", "-b", placeholder, "-F", "raw", image, "16M")
    data = bytearray(image.read_bytes())
    offset, length = struct.unpack_from(">QI", data, 8)
    assert data[offset: offset + length] == placeholder.encode()
    data[offset: offset + length] = HOSTILE.encode()
    image.write_bytes(bytes(data))
    proc = run_cli("convert", image, tmp_path / "x.raw")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), repr(proc.stderr)
    assert not any(c in proc.stderr for c in "\x1b\x07\r"), repr(proc.stderr)
    assert "\\nFAKE: ok\\x1b]0;t\\x07\\r" in proc.stderr


def test_inspect_text_escapes_names_from_the_image(tmp_path: Path) -> None:
    """A flat VMDK whose extent file is named with an OSC title sequence: inspect shows it escaped."""
    name = "x\x1b]0;t\x07FAKE.raw"
    (tmp_path / name).write_bytes(bytes(1 * MiB))
    (tmp_path / "d.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                                     f'createType="monolithicFlat"\n\nRW 2048 FLAT "{name}" 0\n')
    out = run_cli("inspect", tmp_path / "d.vmdk")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    assert "x\\x1b]0;t\\x07FAKE.raw" in out.stdout


def test_messages_are_escaped_and_cut_in_one_place() -> None:
    from diskport.errors import safe_text

    assert safe_text("a\x85b\x9bc\u202ed\udcff") == "a\\x85b\\x9bc\\u202ed\\xff"
    err = CorruptImage("x" * 5000, path="p\n")
    text = str(err)
    assert text.startswith("p\\n: ") and "more characters" in text and len(text) < 1100


# -- 11: one file, two disks --------------------------------------------------------------------------------------
def test_stream_optimized_tables_must_agree_with_markers(tmp_path: Path) -> None:
    """Swap two grain table entries of a streamOptimized VMDK made by qemu-img: read from the file (tables) and
    from a stream (markers) it would be two different disks; both readings refuse it with the same words."""
    from diskport.formats.vmdk import DISAGREE

    raw = write_pattern_raw(tmp_path / "p.raw", 4 * MiB, layout=[(0, 65536, "0x11"), (65536, 65536, "0x22")])
    image = tmp_path / "so.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, image)
    data = bytearray(image.read_bytes())
    gd_sector = struct.unpack_from("<Q", data, 56)[0]
    gt = struct.unpack_from("<I", data, gd_sector * 512)[0] * 512
    first, second = struct.unpack_from("<2I", data, gt)
    assert first and second
    intact = tmp_path / "intact.vmdk.gz"
    intact.write_bytes(gzip.compress(bytes(data)))
    with open_image(intact) as streamed:
        assert streamed.access.kind == "stream"
    convert(intact, tmp_path / "intact.raw")  # the check passes on what qemu wrote
    assert (tmp_path / "intact.raw").read_bytes() == raw.read_bytes()

    struct.pack_into("<2I", data, gt, second, first)
    image.write_bytes(bytes(data))
    packed = tmp_path / "so.vmdk.gz"
    packed.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(CorruptImage, match=r"grain tables and the grain markers disagree") as from_file:
        convert(image, tmp_path / "a.raw")
    with pytest.raises(CorruptImage, match=r"grain tables and the grain markers disagree") as from_stream:
        convert(packed, tmp_path / "b.raw")
    assert DISAGREE in str(from_file.value) and DISAGREE in str(from_stream.value)
    assert not (tmp_path / "a.raw").exists() and not (tmp_path / "b.raw").exists()
