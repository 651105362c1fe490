"""VMDK reading against qemu-img as the oracle, plus refusals and a seeded fuzz of the structures."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from diskport import CorruptImage, UnsafeImage, UnsupportedImage, convert
from diskport.errors import DiskportError, SourceError
from diskport.formats import open_image, probe_scores
from diskport.formats.base import DiskImage
from diskport.formats.vmdk import GD_AT_END
from diskport.sources import open_source
from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io
from tests.support.images import (
    CountingSource,
    ReadCount,
    counting_opens,
    diskport_raw_sha256,
    make_image,
    mutate,
    qemu_raw_sha256,
    sha256_file,
    write_pattern_raw,
)

EXT2_SHA256 = "a6c2f0e39afe6c6ab432ca5465349fcefe8dc944398e97b2d957d3f89dbb5d80"
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")

# A layout with unaligned runs, a run crossing grain and grain-table (32 MiB) boundaries, and zero gaps.
LAYOUT = [
    (0, 3 * MiB + 1536, "random"),
    (5 * MiB + 512, 700 * 1024, "text"),
    (8 * MiB - 4096, 12 * 1024, "0xa5"),
    (31 * MiB, 2 * MiB + 4608, "random"),
    (40 * MiB - 512, 512, "0x01"),
]
SIZE = 40 * MiB


# -- helpers ----------------------------------------------------------------------------------------------
def header_of(path: Path) -> tuple[Any, ...]:
    with open(path, "rb") as f:
        return HEADER.unpack(f.read(HEADER.size))


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def qemu_vmdk(tmp_path: Path, subformat: str, extra: str = "", size: int = SIZE, seed: int = 1,
              name: str | None = None) -> Path:
    options = f"subformat={subformat}" + (f",{extra}" if extra else "")
    return make_image(tmp_path, "vmdk", size, options, name=name or f"{subformat}.vmdk", seed=seed,
                      layout=LAYOUT if size == SIZE else ())


def descriptor_text(extent_lines: list[str], create_type: str = "monolithicFlat", extra: str = "") -> str:
    return ("# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\n"
            f'createType="{create_type}"\n{extra}\n# Extent description\n' + "\n".join(extent_lines)
            + '\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "ide"\n')


def write_descriptor(path: Path, extent_lines: list[str], create_type: str = "monolithicFlat",
                     extra: str = "") -> Path:
    path.write_text(descriptor_text(extent_lines, create_type, extra))
    return path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def data_segments(path: Path) -> Iterator[tuple[int, int]]:
    """The (start, end) runs of a sparse file that are not holes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, end
            pos = end
    finally:
        os.close(fd)


def assert_same_sparse_files(a: Path, b: Path) -> None:
    """Byte equality of two large sparse files, reading only where either has data."""
    assert a.stat().st_size == b.stat().st_size
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in sorted([*data_segments(a), *data_segments(b)]):
            fa.seek(start)
            fb.seek(start)
            pos = start
            while pos < end:
                n = min(4 * MiB, end - pos)
                assert fa.read(n) == fb.read(n), f"outputs differ in {pos:#x}+{n:#x}"
                pos += n


def read_all(image: DiskImage, data_budget: int = 32 * MiB) -> int:
    """Read every extent of ``image`` as the engine would (zero extents skipped); returns data bytes read."""
    done = 0
    pos = 0
    for ext in image.extents():
        assert ext.start == pos and ext.length > 0
        pos = ext.end
        if ext.zero:
            continue
        take = min(ext.length, data_budget - done)
        if take <= 0:
            break
        buf = bytearray(take)
        image.read_extent(ext._replace(length=take), memoryview(buf))
        done += take
    else:
        assert pos == image.virtual_size
    return done


# -- conversions against the oracle -----------------------------------------------------------------------
SUBFORMATS = [
    ("monolithicSparse", ""),
    ("streamOptimized", ""),
    ("monolithicFlat", ""),
    ("twoGbMaxExtentSparse", ""),
    ("twoGbMaxExtentFlat", ""),
    ("monolithicSparse", "compat6=on"),
    ("streamOptimized", "compat6=on"),
]


@pytest.mark.parametrize(("subformat", "extra"), SUBFORMATS, ids=[f"{s}{'-' + e if e else ''}" for s, e in SUBFORMATS])
def test_subformats_convert_like_qemu(tmp_path: Path, subformat: str, extra: str) -> None:
    image = qemu_vmdk(tmp_path, subformat, extra)
    assert probe_scores(open_source(image))["vmdk"] >= 90
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path)
    with open_image(image) as opened:
        assert opened.format == "vmdk"
        assert opened.virtual_size == SIZE
        facts = opened.format_specific()
        assert facts["create-type"] == subformat
        assert facts["compressed"] is (subformat == "streamOptimized")
        assert facts["parent-cid"] == 0xFFFFFFFF
        assert sum(e["virtual-size"] for e in facts["extents"]) == SIZE
        if "Flat" in subformat:
            assert opened.cluster_size is None
            assert {e["type"] for e in facts["extents"]} == {"FLAT"}
        else:
            assert opened.cluster_size == facts["cluster-size"] == 65536
            assert {e["type"] for e in facts["extents"]} == {"SPARSE"}


def test_header_versions_are_what_the_tests_claim(tmp_path: Path) -> None:
    """compat6 makes version 1, zeroed grains version 2, streamOptimized version 3: all three are covered."""
    plain = tmp_path / "v1.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "compat6=on", plain, "8M")
    zeroed = tmp_path / "v2.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "zeroed_grain=on", zeroed, "8M")
    stream = qemu_vmdk(tmp_path, "streamOptimized", size=8 * MiB)
    for path, version in ((plain, 1), (zeroed, 2), (stream, 3)):
        assert header_of(path)[1] == version
        with open_image(path) as image:
            assert image.format_specific()["version"] == version


def test_ext2_vmdk_matches_readme(testdata: Path, tmp_path: Path) -> None:
    image = testdata / "ext2.vmdk"
    assert diskport_raw_sha256(image, tmp_path) == EXT2_SHA256
    with open_image(image) as opened:
        assert opened.virtual_size == 4194304
        facts = opened.info()["format-specific"]["data"]
        assert facts["create-type"] == "monolithicSparse"
        assert facts["cid"] == 0xDC80B6C7


def test_zeroed_grains(tmp_path: Path) -> None:
    image = tmp_path / "zeroed.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "zeroed_grain=on", image, "24M")
    qemu_io(image, "vmdk",
            "write -P 0x11 0 4M",
            "write -z 1M 1M",          # zeroed grains over data
            "write -z 6M 2M",          # zeroed grains over unallocated grains
            "write -P 0x22 10M 100k",
            "write -z 10M 64k",
            "write -P 0x33 23M 1M")
    flags = header_of(image)[2]
    assert isinstance(flags, int) and flags & 4, "the zeroed-grain flag must be set"
    data = image.read_bytes()
    gd_sector = struct.unpack_from("<I", data, int(header_of(image)[9]) * 512)[0]
    gtes = struct.unpack_from("<512I", data, gd_sector * 512)
    assert gtes[16] == 1 and gtes[96] == 1, "qemu must have written zeroed-grain GTEs"
    with open_image(image) as opened:
        zero = [e for e in opened.extents() if e.zero]
        assert any(e.start <= 1 * MiB and e.end >= 2 * MiB for e in zero)
        assert any(e.start <= 6 * MiB and e.end >= 8 * MiB for e in zero)
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path)


def test_qemu_io_writes_into_sparse_and_flat(tmp_path: Path) -> None:
    for subformat in ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse"):
        image = tmp_path / f"io-{subformat}.vmdk"
        qemu_img("create", "-f", "vmdk", "-o", f"subformat={subformat}", image, "20M")
        qemu_io(image, "vmdk", "write -P 0x5a 0 1536", "write -P 0x6b 3M 70k", "write -P 0x7c 19M 1M",
                "write -z 3M 4k")
        assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path), subformat


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_real_two_gigabyte_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subformat: str) -> None:
    """A disk just over 2 GiB: two extent files, with a write across the split (outputs compared sparsely)."""
    image = tmp_path / f"split-{subformat}.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", f"subformat={subformat}", image, "2052M")
    qemu_io(image, "vmdk", "write -P 0xab 2047M 2M", "write -P 0xcd 0 64k", "write -P 0xef 2050M 1M")
    with open_image(image) as opened:
        extents = opened.format_specific()["extents"]
        assert [e["virtual-size"] for e in extents] == [2 * 1024 * MiB, 4 * MiB]
        assert opened.read(2048 * MiB - 4, 8) == b"\xab" * 8
    ours = tmp_path / "ours.raw"
    oracle = tmp_path / "oracle.raw"
    # Holes and unallocated grains are never read: what the extent files hold, plus 1 MiB for the probes'
    # and headers' reads, and not the 2 GiB of holes (the budget fails the convert as soon as it is passed).
    allocated = sum(p.stat().st_blocks * 512 for p in tmp_path.glob("split-*.vmdk"))
    with counting_opens(monkeypatch, budget=allocated + MiB) as count:
        convert(image, ours)
    assert 0 < count.bytes <= allocated + MiB
    qemu_img("convert", "-O", "raw", image, oracle)
    assert_same_sparse_files(ours, oracle)


def test_terabyte_sparse_maps_quickly(tmp_path: Path) -> None:
    """qemu preallocates every grain table: 32768 tables for 1 TiB, each read once (counted through the source),
    none decoded when empty."""
    image = tmp_path / "huge.vmdk"
    qemu_img("create", "-f", "vmdk", image, "1T")
    qemu_io(image, "vmdk", "write -P 0x3c 700G 64k", "write -P 0x4d 1048575M 1M")
    count = ReadCount()
    with CountingSource(open_source(image), count) as source, open_image(source) as opened:
        extents = list(opened.extents())
        assert [(e.start, e.length) for e in extents if not e.zero] == [(700 * 1024 * MiB, 65536),
                                                                      (1048575 * MiB, MiB)]
        assert opened.read(700 * 1024 * MiB - 2, 4) == b"\0\0\x3c\x3c"
        assert opened.read(1024 * 1024 * MiB - 4, 4) == b"\x4d" * 4
    tables = (1 << 40) // (512 * 64 * 1024)  # 512 grains of 64 KiB per table
    assert tables <= count.reads <= tables + 16, count.reads  # each table once, in one read
    assert count.bytes <= tables * 512 * 4 + MiB, count.bytes


def test_sparse_header_carrying_only_a_descriptor(tmp_path: Path) -> None:
    """A KDMV header with capacity 0 whose embedded descriptor lists the extents (qemu reads these too)."""
    qemu_vmdk(tmp_path, "monolithicFlat", size=4 * MiB, seed=9, name="inner.vmdk")
    text = descriptor_text(['RW 8192 FLAT "inner-flat.vmdk" 0'], create_type="monolithicFlat").encode()
    header = HEADER.pack(b"KDMV", 1, 3, 0, 128, 1, 20, 512, 0, 0, 0, 0, b"\n \r\n", 0)
    image = tmp_path / "wrapper.vmdk"
    image.write_bytes(header.ljust(512, b"\0") + text.ljust(20 * 512, b"\0"))
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path)
    with open_image(image) as opened:
        assert opened.virtual_size == 4 * MiB
        assert opened.format_specific()["extents"][0]["filename"] == "inner-flat.vmdk"


def with_footer(image: Path) -> None:
    """Rewrite a qemu streamOptimized image the way VMware writes them: header gdOffset = GD_AT_END, and the
    real header as a footer between a footer marker and the end-of-stream marker."""
    data = bytearray(image.read_bytes())
    assert len(data) % 512 == 0
    footer = bytes(data[:512])
    struct.pack_into("<Q", data, 56, GD_AT_END)
    footer_marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    image.write_bytes(bytes(data) + footer_marker + footer + bytes(512))


def test_stream_optimized_with_footer(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "streamOptimized")
    expected = qemu_raw_sha256(image, tmp_path)
    with_footer(image)
    assert header_of(image)[9] == GD_AT_END
    assert qemu_raw_sha256(image, tmp_path) == expected, "qemu must read the footer too"
    assert diskport_raw_sha256(image, tmp_path) == expected


def test_stream_optimized_incomplete_footer_refused(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "streamOptimized", size=8 * MiB)
    with_footer(image)
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size - 512)  # the end-of-stream marker is lost
    with pytest.raises(CorruptImage, match="footer"):
        open_image(image)


def test_unaligned_reads_of_compressed_grains(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "streamOptimized")
    raw = tmp_path / "oracle.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    truth = raw.read_bytes()
    rng = random.Random(7)
    with open_image(image) as opened:
        assert all(e.host is None for e in opened.extents() if not e.zero), "compressed grains have no host"
        for _ in range(200):
            offset = rng.randrange(SIZE)
            length = rng.randrange(1, min(300_000, SIZE - offset + 1))
            assert opened.read(offset, length) == truth[offset:offset + length], (offset, length)


def test_extents_coalesce_into_large_host_runs(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "monolithicSparse")
    with open_image(image) as opened:
        data = [e for e in opened.extents() if not e.zero]
        assert all(e.host is not None for e in data)
        # 3 MiB + 1536 of random data from offset 0: one run of 49 grains, read with one pread.
        assert data[0].start == 0 and data[0].length >= 3 * MiB
        extents = list(opened.extents())
        assert all(a.end == b.start for a, b in pairwise(extents))
        assert sum(e.length for e in extents) == SIZE
        assert len(extents) < 20
    flat = qemu_vmdk(tmp_path, "monolithicFlat", name="flat.vmdk")
    with open_image(flat) as opened:
        extents = list(opened.extents())
        assert any(e.zero and e.length >= MiB for e in extents), "holes in the flat file read as zero extents"
        assert opened.read(5 * MiB + 512, 8) == b"diskport"[:8]


def test_descriptor_with_offsets_and_mixed_extents_matches_qemu(tmp_path: Path) -> None:
    qemu_vmdk(tmp_path, "monolithicFlat", size=8 * MiB, seed=3, name="a.vmdk")
    qemu_vmdk(tmp_path, "twoGbMaxExtentSparse", size=4 * MiB, seed=4, name="b.vmdk")
    desc = write_descriptor(tmp_path / "mixed.vmdk", [
        'RW 8192 FLAT "a-flat.vmdk" 8192',      # the second half of a-flat
        'RW 8192 SPARSE "b-s001.vmdk"',
        'RW 4096 FLAT "a-flat.vmdk" 0',
    ], create_type="twoGbMaxExtentFlat")
    assert diskport_raw_sha256(desc, tmp_path) == qemu_raw_sha256(desc, tmp_path)


def test_zero_extent_and_rdonly(tmp_path: Path) -> None:
    """ZERO extents read as zeros (qemu skips ZERO lines, so the expectation is computed)."""
    raw_a = write_pattern_raw(tmp_path / "a.raw", 4 * MiB, seed=5)
    raw_b = write_pattern_raw(tmp_path / "b.raw", 2 * MiB, seed=6)
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", raw_a, tmp_path / "a.vmdk")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", raw_b,
             tmp_path / "b.vmdk")
    desc = write_descriptor(tmp_path / "z.vmdk", [
        'RW 8192 FLAT "a-flat.vmdk" 0',
        "RW 2048 ZERO",
        'RDONLY 4096 SPARSE "b-s001.vmdk"',
    ], create_type="custom")
    expected = tmp_path / "expected.raw"
    expected.write_bytes(raw_a.read_bytes() + bytes(MiB) + raw_b.read_bytes())
    assert diskport_raw_sha256(desc, tmp_path) == sha256_file(expected)
    with open_image(desc) as opened:
        assert [e["type"] for e in opened.format_specific()["extents"]] == ["FLAT", "ZERO", "SPARSE"]
        assert any(e.zero and e.start <= 4 * MiB and e.end >= 5 * MiB for e in opened.extents())


def test_extent_files_are_closed(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "twoGbMaxExtentSparse", size=8 * MiB)
    before = open_fds()
    with open_image(image) as opened:
        read_all(opened)
        assert open_fds() == before + 2  # descriptor + one extent
    assert open_fds() == before
    # A failed open closes the extents it had opened.
    desc = write_descriptor(tmp_path / "half.vmdk", [
        'RW 16384 SPARSE "twoGbMaxExtentSparse-s001.vmdk"', 'RW 100 FLAT "gone.vmdk" 0'])
    with pytest.raises(SourceError, match=r"gone\.vmdk"):
        open_image(desc)
    assert open_fds() == before


# -- refusals ---------------------------------------------------------------------------------------------
def test_delta_disk_made_by_qemu_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, "8M")
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    with pytest.raises(UnsafeImage, match=r"parent disk 'base\.vmdk'"):
        convert(child, tmp_path / "x.raw")
    assert not (tmp_path / "x.raw").exists()


@pytest.mark.parametrize(("extra", "needle"), [
    ('parentCID=0badcafe\nparentFileNameHint="parent-disk.vmdk"', r"'parent-disk\.vmdk'"),
    ('parentFileNameHint="/vmfs/volumes/ds/base.vmdk"', r"'/vmfs/volumes/ds/base\.vmdk'"),
    ("parentCID=0badcafe", r"CID 0badcafe \(no parentFileNameHint\)"),
])
def test_descriptor_parent_refused(tmp_path: Path, extra: str, needle: str) -> None:
    qemu_vmdk(tmp_path, "monolithicFlat", size=4 * MiB, name="d.vmdk")
    text = (tmp_path / "d.vmdk").read_text().replace("parentCID=ffffffff\n", "")
    (tmp_path / "d.vmdk").write_text(text.replace("createType", extra + "\ncreateType"))
    with pytest.raises(UnsafeImage, match=needle):
        open_image(tmp_path / "d.vmdk")


@pytest.mark.parametrize(("name", "error", "needle"), [
    ("../outside-flat.vmdk", UnsafeImage, "outside its own folder"),
    ("/etc/passwd", UnsafeImage, "outside its own folder"),
    ("http://example.com/x-flat.vmdk", UnsafeImage, "outside its own folder"),
    ("sub/../../outside-flat.vmdk", UnsafeImage, "outside its own folder"),
    ("link-flat.vmdk", UnsafeImage, "leaves the image's folder"),
    ("missing-flat.vmdk", SourceError, "missing"),
])
def test_extent_references_outside_folder_refused(tmp_path: Path, name: str, error: type[DiskportError],
                                                   needle: str) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    outside = tmp_path / "outside-flat.vmdk"
    outside.write_bytes(b"secret" * 1000)
    (folder / "link-flat.vmdk").symlink_to(outside)
    desc = write_descriptor(folder / "disk.vmdk", [f'RW 8 FLAT "{name}" 0'])
    with pytest.raises(error, match=needle):
        convert(desc, tmp_path / "x.raw")


def test_cowd_and_esx_extents_refused(tmp_path: Path) -> None:
    cowd = tmp_path / "cowd.vmdk"
    cowd.write_bytes(b"COWD" + struct.pack("<I", 1) + bytes(2040))
    with pytest.raises(UnsupportedImage, match="COWD"):
        open_image(cowd)
    (tmp_path / "x-flat.vmdk").write_bytes(bytes(4096))
    for line, needle in (('RW 8 VMFSSPARSE "x-flat.vmdk"', "VMFSSPARSE"), ('RW 8 VMFSRDM "x-flat.vmdk"', "VMFSRDM"),
                         ('NOACCESS 8 FLAT "x-flat.vmdk" 0', "NOACCESS"), ('RW 8 WEIRD "x-flat.vmdk"', "WEIRD")):
        desc = write_descriptor(tmp_path / "esx.vmdk", [line])
        with pytest.raises(UnsupportedImage, match=needle):
            open_image(desc)
    desc = write_descriptor(tmp_path / "dev.vmdk", ['RW 8 FLAT "x-flat.vmdk" 0'], create_type="fullDevice")
    with pytest.raises(UnsupportedImage, match="fullDevice"):
        open_image(desc)
    cowd_extent = write_descriptor(tmp_path / "c.vmdk", ['RW 8 SPARSE "cowd.vmdk"'])
    with pytest.raises(UnsupportedImage, match="COWD"):
        open_image(cowd_extent)


def test_vmfs_extent_reads_as_flat_like_qemu(tmp_path: Path) -> None:
    """A descriptor copied off an ESX datastore names its -flat.vmdk with type VMFS: a plain flat file."""
    flat = tmp_path / "esx-flat.vmdk"
    flat.write_bytes(os.urandom(64 * 1024) + bytes(64 * 1024))
    desc = write_descriptor(tmp_path / "esx.vmdk", ['RW 256 VMFS "esx-flat.vmdk"'], create_type="vmfs")
    assert diskport_raw_sha256(desc, tmp_path) == qemu_raw_sha256(desc, tmp_path)


def test_descriptor_with_spaces_around_equals_is_probed(tmp_path: Path) -> None:
    (tmp_path / "x-flat.vmdk").write_bytes(bytes(4096))
    desc = tmp_path / "spaced.vmdk"
    desc.write_text('version = 1\nCID = fffffffe\nparentCID = ffffffff\ncreateType = "monolithicFlat"\n'
                    'RW 8 FLAT "x-flat.vmdk" 0\n')
    with open_image(desc) as image:
        assert image.format == "vmdk" and image.virtual_size == 4096


def test_malformed_descriptors_refused(tmp_path: Path) -> None:
    (tmp_path / "x-flat.vmdk").write_bytes(bytes(4096))
    cases = [
        (['RW 8 FLAT "x-flat.vmdk" 0'], "createType", "no createType"),
        (["RW eight FLAT x"], "monolithicFlat", "not a valid extent line"),
        (['RW 8 FLAT "x-flat.vmdk" 1'], "monolithicFlat", "truncated"),          # 8 sectors at sector 1
        (['RW 800 FLAT "x-flat.vmdk" 0'], "monolithicFlat", "truncated"),
        (['RW 8 ZERO "x-flat.vmdk"'], "monolithicFlat", "names a file"),
        (["RW 8 FLAT"], "monolithicFlat", "names no file"),
        ([], "monolithicFlat", "no extents"),
        (['RW 8 SPARSE "x-flat.vmdk"'], "monolithicFlat", "not a VMDK sparse extent"),
    ]
    for lines, create_type, needle in cases:
        text = descriptor_text(lines, create_type)
        if create_type == "createType":
            text = text.replace('createType="createType"\n', "")
        (tmp_path / "bad.vmdk").write_text(text)
        with pytest.raises(CorruptImage, match=needle):
            open_image(tmp_path / "bad.vmdk", "vmdk")
    big = tmp_path / "big.vmdk"
    big.write_bytes(descriptor_text(['RW 8 FLAT "x-flat.vmdk" 0']).encode() + b"#" * (1024 * 1024))
    with pytest.raises(CorruptImage, match="at most 1024 KiB"):
        open_image(big, "vmdk")


def test_sparse_extent_capacity_must_match_descriptor(tmp_path: Path) -> None:
    qemu_vmdk(tmp_path, "twoGbMaxExtentSparse", size=4 * MiB, name="b.vmdk")
    desc = write_descriptor(tmp_path / "m.vmdk", ['RW 4096 SPARSE "b-s001.vmdk"'])
    with pytest.raises(CorruptImage, match="capacity of 8192 sectors"):
        open_image(desc)


def test_truncated_sparse_refused(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "monolithicSparse")
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size // 2)
    with pytest.raises(CorruptImage, match="beyond the end of the file"):
        convert(image, tmp_path / "x.raw")
    assert not (tmp_path / "x.raw").exists()
    with open(image, "r+b") as f:
        f.truncate(600)
    with pytest.raises(CorruptImage):
        open_image(image)
    with open(image, "r+b") as f:
        f.truncate(40)
    with pytest.raises(CorruptImage, match="too short"):
        open_image(image, "vmdk")


def test_grain_directory_past_eof_refused(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "monolithicSparse", size=8 * MiB)
    patch(image, 56, struct.pack("<Q", image.stat().st_size // 512 + 10))
    with pytest.raises(CorruptImage, match=r"grain directory at .* beyond the end"):
        open_image(image)
    image = qemu_vmdk(tmp_path, "monolithicSparse", size=8 * MiB, name="gt.vmdk")
    gd_offset = int(header_of(image)[9]) * 512
    patch(image, gd_offset, struct.pack("<I", 0xFFFFFF00))
    with pytest.raises(CorruptImage, match="grain directory entry 0 points to a grain table"):
        open_image(image)


def test_huge_capacity_with_tiny_file_refused_quickly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = qemu_vmdk(tmp_path, "monolithicSparse", size=8 * MiB)
    for capacity, error in ((1 << 40, CorruptImage), ((1 << 64) - 1, CorruptImage)):
        patch(image, 12, struct.pack("<Q", capacity))
        with counting_opens(monkeypatch) as count, pytest.raises(error):
            open_image(image)
        # The header alone condemns it: the probes' reads and the header, not the 4 MiB file nor a table.
        assert count.reads <= 16 and count.bytes <= 128 * 1024, (count.reads, count.bytes)
    patch(image, 12, struct.pack("<Q", 1 << 50))  # needs a grain directory of 2^28 entries
    with pytest.raises(UnsupportedImage, match=r"grain directory of .* entries exceeds"):
        open_image(image)


def test_shared_and_looping_tables_are_refused(tmp_path: Path) -> None:
    """Every GTE pointing at one grain, or every GDE at one GT (a 70 MiB disk from one grain, the amplification
    of issue 10): a sparse extent never shares a grain, so both are corrupt, whatever qemu makes of them."""
    image = qemu_vmdk(tmp_path, "monolithicSparse", size=70 * MiB)
    header = header_of(image)
    gd_offset = int(header[9]) * 512
    pristine = image.read_bytes()
    gd = list(struct.unpack_from("<3I", pristine, gd_offset))
    gt0 = gd[0] * 512
    first_grain = struct.unpack_from("<I", pristine, gt0)[0]
    data = bytearray(pristine)
    struct.pack_into("<512I", data, gt0, *([first_grain] * 512))   # duplicate grain pointers
    image.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="for more than one guest grain"):
        convert(image, tmp_path / "a.raw")
    data = bytearray(pristine)
    struct.pack_into("<3I", data, gd_offset, gd[0], gd[0], gd[0])  # one grain table for the whole disk
    image.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="which another grain table already names"):
        convert(image, tmp_path / "b.raw")
    assert not (tmp_path / "a.raw").exists() and not (tmp_path / "b.raw").exists()


def test_newline_check_and_unknown_versions(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "monolithicSparse", size=8 * MiB)
    patch(image, 73, b"\n \n\n")
    with pytest.raises(CorruptImage, match="text mode"):
        open_image(image)
    patch(image, 73, b"\n \r\n")
    patch(image, 4, struct.pack("<I", 4))
    with pytest.raises(UnsupportedImage, match="version 4"):
        open_image(image, "vmdk")
    patch(image, 4, struct.pack("<I", 1))
    patch(image, 77, struct.pack("<H", 7))
    with pytest.raises(UnsupportedImage, match="compression algorithm 7"):
        open_image(image)


def test_bad_compressed_grains_refused(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "streamOptimized", size=8 * MiB)
    gd_offset = int(header_of(image)[9]) * 512
    data = image.read_bytes()
    gt = struct.unpack_from("<I", data, gd_offset)[0] * 512
    marker = struct.unpack_from("<I", data, gt)[0] * 512
    lba, size = struct.unpack_from("<QI", data, marker)
    original = data[marker: marker + 12 + max(size, 512)]
    assert lba == 0 and 0 < size < 2 * 65536
    cases: list[tuple[bytes, str]] = [
        (struct.pack("<QI", 0, 1 << 20), "exceeds twice the grain size"),
        (struct.pack("<QI", 0, 0), "metadata marker"),
        (struct.pack("<QI", 0, size) + b"garbage!", "does not inflate"),
        # A valid deflate stream of two grains' worth of bytes: more than one grain.
        (struct.pack("<QI", 0, len(z := zlib.compress(bytes(2 * 65536)))) + z, "more than 65536 bytes"),
        (struct.pack("<QI", 0, len(z := zlib.compress(bytes(4096)))) + z, "inflates to 4096 bytes"),
        (struct.pack("<QI", 0, 20) + zlib.compress(bytes(65536))[:20], "truncated"),
    ]
    for replacement, needle in cases:
        patch(image, marker, replacement)
        with open_image(image) as opened, pytest.raises(CorruptImage, match=needle):
            read_all(opened)
        patch(image, marker, original)
    with open_image(image) as opened:
        assert read_all(opened) > 0


def test_probe_and_inspect_facts(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "twoGbMaxExtentFlat", size=8 * MiB)
    with open_image(image) as opened:
        info = opened.info()
        assert info["format"] == "vmdk"
        data = info["format-specific"]["data"]
        assert data["extents"] == [{"filename": "twoGbMaxExtentFlat-f001.vmdk", "type": "FLAT",
                                    "virtual-size": 8 * MiB, "offset": 0}]
        assert data["version"] == 1 and "cluster-size" not in data
        assert info["actual-size"] >= 1024 * 1024  # the extent file's blocks count, not just the descriptor's


# -- fuzz -------------------------------------------------------------------------------------------------
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0x1000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 1 << 32, (1 << 63) - 1, (1 << 64) - 1]


def sparse_regions(data: bytes) -> list[tuple[int, int]]:
    """Header, embedded descriptor, grain directory, grain tables and the first grain marker."""
    (_, _, _, capacity, grain, desc_off, desc_size, gtes, _, gd, _, _, _, _) = HEADER.unpack_from(data, 0)
    regions = [(0, 80), (desc_off * 512, (desc_off + desc_size) * 512)]
    if gd != GD_AT_END:
        entries = -(-capacity // (gtes * grain))
        regions.append((gd * 512, gd * 512 + 4 * entries))
        for (gt,) in struct.iter_unpack("<I", data[gd * 512: gd * 512 + 4 * entries]):
            if gt:
                regions.append((gt * 512, gt * 512 + 4 * gtes))
                first = struct.unpack_from("<I", data, gt * 512)[0]
                if first > 1:
                    regions.append((first * 512, first * 512 + 16))
    else:
        regions.append((len(data) - 1536, len(data)))
    return regions


def fuzz_one(path: Path, inputs: int) -> bool:
    """Open and read all of ``path``; True if that worked, False if it raised a DiskportError. The bytes read
    from the files (``inputs`` bytes in all, with the extents a descriptor names) stay within two passes over
    them, in at most a read per sector: whatever the mutation, no grain table or grain is read again and
    again, and no read runs far past what it needs."""
    count = ReadCount()
    requested = 0
    ok = True
    try:
        with CountingSource(open_source(path), count) as source, open_image(source, "vmdk") as image:
            requested += read_all(image)
            rng = random.Random(image.virtual_size)
            for _ in range(2):
                if image.virtual_size:
                    offset = rng.randrange(image.virtual_size)
                    requested += len(image.read(offset, min(100_000, image.virtual_size - offset)))
    except DiskportError:
        ok = False
    # One pass over the files and a second for the two reads of 100,000 bytes; a read per sector at most.
    assert count.bytes <= 2 * inputs + 200_000, (count.bytes, requested, inputs)
    assert count.reads <= inputs // 512 + 16, (count.reads, requested, inputs)
    return ok


def test_fuzz_mutated_images(tmp_path: Path) -> None:
    """Seeded random mutations of headers, grain directories/tables, markers, footers and descriptors: each
    open and full read succeeds or raises a DiskportError, nothing else, and in bounded reads."""
    small = [(0, 300 * 1024, "random"), (1 * MiB + 4096, 200 * 1024, "text"), (2 * MiB - 512, 512, "0x77")]
    bases: list[tuple[Path, int]] = []
    for subformat, extra, iterations in (("monolithicSparse", "", 1100), ("streamOptimized", "", 1100),
                                         ("monolithicSparse", "zeroed_grain=on", 300)):
        image = make_image(tmp_path, "vmdk", 2 * MiB, f"subformat={subformat}" + (f",{extra}" if extra else ""),
                           name=f"base-{subformat}-{len(bases)}.vmdk", layout=small)
        bases.append((image, iterations))
    footer = tmp_path / "base-footer.vmdk"
    shutil.copy(bases[1][0], footer)
    with_footer(footer)
    bases.append((footer, 400))
    rng = random.Random(20240611)
    outcomes: list[bool] = []
    for base, iterations in bases:
        original = base.read_bytes()
        regions = sparse_regions(original)
        target = tmp_path / "fuzz.vmdk"
        for _ in range(iterations):
            target.write_bytes(mutate(bytearray(original), regions, rng, interesting=INTERESTING, truncate=True))
            outcomes.append(fuzz_one(target, target.stat().st_size))
    # Descriptor text mutations over a two-extent descriptor (sparse extent + flat extent).
    extents = [make_image(tmp_path, "vmdk", 2 * MiB, "subformat=twoGbMaxExtentSparse", name="ds.vmdk", layout=small),
               make_image(tmp_path, "vmdk", 1 * MiB, "subformat=monolithicFlat", name="df.vmdk", seed=2)]
    named = sum(p.stat().st_size for p in tmp_path.glob("d[sf]-*.vmdk"))
    text = descriptor_text(['RW 4096 SPARSE "ds-s001.vmdk"', 'RW 1024 FLAT "df-flat.vmdk" 1024', "RW 64 ZERO"],
                           create_type="twoGbMaxExtentSparse").encode()
    assert extents and named > 1 * MiB
    for _ in range(600):
        target = tmp_path / "fuzz-desc.vmdk"
        target.write_bytes(mutate(bytearray(text), [(0, len(text))], rng, interesting=INTERESTING, truncate=True))
        outcomes.append(fuzz_one(target, target.stat().st_size + named))
    assert len(outcomes) == 3500
    # The mutations must both break images and leave some readable, or the fuzz tests nothing.
    assert 0.1 < sum(outcomes) / len(outcomes) < 0.9


# -- descriptors diskport refuses (issue 10) ----------------------------------------------------------------
def test_sesparse_descriptors_are_refused(tmp_path: Path) -> None:
    extent = tmp_path / "disk-sesparse.vmdk"
    extent.write_bytes(bytes(4096))
    for create_type, kind in (("seSparse", "SESPARSE"), ("vmfsSparse", "VMFSSPARSE")):
        desc = tmp_path / f"{create_type}.vmdk"
        desc.write_text(f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                        f'createType="{create_type}"\nRW 8 {kind} "disk-sesparse.vmdk"\n')
        with pytest.raises(UnsupportedImage, match=create_type):
            open_image(desc)
        text = desc.read_text().replace(f'createType="{create_type}"', 'createType="monolithicFlat"')
        desc.write_text(text)
        with pytest.raises(UnsupportedImage, match=f"type {kind}, which only ESX hosts read"):
            open_image(desc)


def test_an_extent_that_is_a_named_pipe_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "disk-flat.vmdk")
    desc = tmp_path / "disk.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\nRW 2048 FLAT "disk-flat.vmdk" 0\n')
    # In a child with a timeout: before the fix open() waited for a writer forever.
    proc = subprocess.run([sys.executable, "-m", "diskport", "convert", "-q", str(desc), str(tmp_path / "o.raw")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "named pipe" in proc.stderr, proc.stderr
    with pytest.raises(UnsafeImage, match="is a named pipe; only regular files"):
        open_image(desc)
