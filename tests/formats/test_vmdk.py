"""VMDK reading against qemu-img as the oracle (refusals and the fuzz are in test_vmdk_bad.py, the shared
builders in tests/support/vmdk.py)."""

from __future__ import annotations

import os
import random
import struct
from itertools import pairwise
from pathlib import Path

import pytest

from diskport import convert
from diskport.errors import SourceError
from diskport.formats import open_image, probe_scores
from diskport.formats.vmdk import GD_AT_END
from diskport.sources import open_source
from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io
from tests.support.images import (
    CountingSource,
    ReadCount,
    counting_opens,
    diskport_raw_sha256,
    qemu_raw_sha256,
    sha256_file,
    write_pattern_raw,
)
from tests.support.vmdk import (
    EXT2_SHA256,
    HEADER,
    SIZE,
    assert_same_sparse_files,
    descriptor_text,
    header_of,
    open_fds,
    qemu_vmdk,
    read_all,
    with_footer,
    write_descriptor,
)

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


def test_stream_optimized_with_footer(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "streamOptimized")
    expected = qemu_raw_sha256(image, tmp_path)
    with_footer(image)
    assert header_of(image)[9] == GD_AT_END
    assert qemu_raw_sha256(image, tmp_path) == expected, "qemu must read the footer too"
    assert diskport_raw_sha256(image, tmp_path) == expected


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
