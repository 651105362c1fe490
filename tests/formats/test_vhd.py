"""VHD (vpc) reader: qemu-img is the oracle for every variant it makes; hand-edited images cover the size rule,
sector bitmaps, the footer copy and every refusal; a seeded fuzz loop checks that malformed input only ever
raises DiskportError."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from diskport import CorruptImage, DiskportError, UnsafeImage, UnsupportedImage, open_image
from diskport.formats import open_detected
from diskport.formats.base import DiskImage, Extent
from diskport.formats.vhd import (
    DYNAMIC_CHECKSUM_AT,
    FOOTER_CHECKSUM_AT,
    SIZE_RULE_CHS,
    SIZE_RULE_CHS_MAX,
    SIZE_RULE_CURRENT,
    open_vhd,
    vhd_checksum,
)
from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io
from tests.support.images import (
    BytesSource,
    check_extent_contract,
    diskport_raw_sha256,
    exercise,
    full_read,
    make_image,
    mutate,
    qemu_raw_sha256,
    sha256_file,
    write_pattern_raw,
)

EXT2_SHA256 = "870be7ae16c1fa8faab05c6eb9205dc9a7ae35c5f552c5cf8a267c0bc6a5cb99"
EXT2_SIZE = 4212736
BLOCK = 2 * MiB  # qemu's dynamic VHD block size
BITMAP = 512  # sector bitmap of a 2 MiB block, padded to a sector


# -- helpers ------------------------------------------------------------------------------------------------
def qemu_info(image: Path) -> dict[str, object]:
    info: dict[str, object] = json.loads(qemu_img("info", "-f", "vpc", "--output=json", image).stdout)
    return info


def qemu_virtual_size(image: Path, fmt: str = "vpc") -> int:
    info = json.loads(qemu_img("info", "-f", fmt, "--output=json", image).stdout)
    return int(info["virtual-size"])


def fix_footer_checksum(buf: bytearray, at: int) -> None:
    struct.pack_into(">I", buf, at + FOOTER_CHECKSUM_AT, vhd_checksum(bytes(buf[at: at + 512]), FOOTER_CHECKSUM_AT))


def fix_header_checksum(buf: bytearray, at: int) -> None:
    struct.pack_into(">I", buf, at + DYNAMIC_CHECKSUM_AT,
                     vhd_checksum(bytes(buf[at: at + 1024]), DYNAMIC_CHECKSUM_AT))


def footer_offsets(buf: bytes | bytearray) -> list[int]:
    """Where the footers are: the end, and offset 0 too for a dynamic disk."""
    offsets = [len(buf) - 512]
    if buf[:8] == b"conectix":
        offsets.append(0)
    return offsets


def edit_footers(path: Path, edit: Callable[[bytearray], None]) -> None:
    """Apply ``edit`` to every footer of the image (a 512-byte view) and recompute their checksums."""
    buf = bytearray(path.read_bytes())
    for at in footer_offsets(buf):
        footer = buf[at: at + 512]
        edit(footer)
        buf[at: at + 512] = footer
        fix_footer_checksum(buf, at)
    path.write_bytes(bytes(buf))


def dynamic_header_offset(buf: bytes | bytearray) -> int:
    return int(struct.unpack_from(">Q", buf, 16)[0])


def edit_dynamic_header(path: Path, edit: Callable[[bytearray], None]) -> None:
    buf = bytearray(path.read_bytes())
    at = dynamic_header_offset(buf)
    header = buf[at: at + 1024]
    edit(header)
    buf[at: at + 1024] = header
    fix_header_checksum(buf, at)
    path.write_bytes(bytes(buf))


def bat(buf: bytes | bytearray) -> tuple[int, list[int]]:
    """(BAT offset, entries) of a dynamic VHD."""
    at = dynamic_header_offset(buf)
    table, entries = struct.unpack_from(">QxxxxI", buf, at + 16)
    return table, list(struct.unpack_from(f">{entries}I", buf, table))






def qemu_raw(image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / f"{image.name}.oracle.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


# Layout for big images: a few patterned runs, one crossing a block boundary at an odd sector, one at the very
# end of the disk, the rest zeros (so 100 MiB images stay quick to make and hash).
def sparse_layout(size: int) -> list[tuple[int, int, str]]:
    return [(0, 3 * 4096, "random"), (BLOCK - 3 * 512, 5 * 512, "text"), (5 * BLOCK + 4096, 700_000, "0xab"),
            (size // 2 + 512, 64 * 1024, "random"), (size - 8192, 8192, "text")]


# -- qemu-img oracle -----------------------------------------------------------------------------------------
SIZES = [10 * MiB, 100 * MiB, 3 * MiB + 7 * 512]


@pytest.mark.parametrize("size", SIZES, ids=["10MiB", "100MiB", "odd"])
@pytest.mark.parametrize("force_size", [False, True], ids=["chs", "force_size"])
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_matches_qemu(tmp_path: Path, subformat: str, force_size: bool, size: int) -> None:
    options = f"subformat={subformat}" + (",force_size=on" if force_size else "")
    layout = sparse_layout(size) if size > 16 * MiB else ()
    image = make_image(tmp_path, "vpc", size, options, name=f"disk-{subformat}.vhd", layout=layout)
    expected_size = qemu_virtual_size(image)
    with open_image(image) as disk:
        assert disk.format == "vpc"
        assert disk.virtual_size == expected_size
        facts = disk.format_specific()
        assert facts["vhd-type"] == subformat
        assert facts["creator-application"] == ("qem2" if force_size else "qemu")
        assert facts["size-rule"] == (SIZE_RULE_CHS_MAX if force_size else SIZE_RULE_CHS)
        assert facts["footer"] == "end"
        if subformat == "dynamic":
            assert disk.cluster_size == BLOCK and facts["block-size"] == BLOCK
        check_extent_contract(disk)
    if force_size:
        assert expected_size == size
    else:
        assert expected_size >= size  # qemu rounds up to a CHS geometry
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path, "vpc")


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_io_writes_match(tmp_path: Path, subformat: str) -> None:
    """Writes in scattered order and at sector granularity, including the last sector of the disk."""
    image = tmp_path / "written.vhd"
    qemu_img("create", "-f", "vpc", "-o", f"subformat={subformat}", image, "9M")
    size = qemu_virtual_size(image)
    qemu_io(image, "vpc", f"write -P 0x11 {3 * BLOCK + 512} 1024", "write -P 0x22 0 512",
            f"write -P 0x33 {BLOCK - 512} 1024", f"write -P 0x44 {size - 512} 512", "write -z 4096 4096")
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path, "vpc")
    raw = qemu_raw(image, tmp_path)
    with open_image(image) as disk:
        assert disk.virtual_size == size
        assert full_read(disk) == raw
        rng = random.Random(7)
        for _ in range(200):  # sub-range reads go through extents(start, end)
            a = rng.randrange(size)
            b = min(size, a + rng.randrange(1, 3 * BLOCK))
            check_extent_contract(disk, a, b)
            assert disk.read(a, b - a) == raw[a:b]


def test_dynamic_blocks_are_single_host_runs(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 6 * MiB, "subformat=dynamic,force_size=on",
                       layout=[(0, 6 * MiB, "random")])
    buf = image.read_bytes()
    _, entries = bat(buf)
    with open_image(image) as disk:
        exts = check_extent_contract(disk)
    # Three fully written blocks: one data run each, right after each block's bitmap.
    assert [(e.start, e.length, e.zero, e.host) for e in exts] == [
        (i * BLOCK, BLOCK, False, entries[i] * 512 + BITMAP) for i in range(3)]


def test_fixed_disk_is_one_host_run(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 4 * MiB, "subformat=fixed,force_size=on",
                       layout=[(0, 4 * MiB, "random")])
    with open_image(image) as disk:
        assert disk.cluster_size is None
        assert list(disk.extents()) == [Extent(0, 4 * MiB, False, 0)]
        assert list(disk.extents(4096, 8192)) == [Extent(4096, 4096, False, 4096)]


# -- external image ------------------------------------------------------------------------------------------
def test_ext2_vhd(testdata: Path, tmp_path: Path) -> None:
    image = testdata / "ext2.vhd"
    with open_image(image) as disk:
        assert disk.format == "vpc"
        assert disk.virtual_size == EXT2_SIZE
        facts = disk.format_specific()
        assert facts["creator-application"] == "qemu"
        assert facts["size-rule"] == SIZE_RULE_CHS
        assert facts["geometry"] == {"cylinders": 121, "heads": 4, "sectors": 17}
        assert facts["vhd-type"] == "dynamic"
    assert diskport_raw_sha256(image, tmp_path) == EXT2_SHA256


# -- virtual size rule ---------------------------------------------------------------------------------------
def set_creator_and_geometry(creator: bytes, geometry: tuple[int, int, int] | None) -> Callable[[bytearray], None]:
    def edit(footer: bytearray) -> None:
        footer[28:32] = creator
        if geometry is not None:
            struct.pack_into(">HBB", footer, 56, *geometry)
    return edit


# A 6 MiB fixed disk made with force_size (current_size 6 MiB), re-labelled with a geometry of 5 MiB - 8 KiB:
# the two sizes differ, so the rule shows.
SMALL_GEOMETRY = (150, 4, 17)  # 150*4*17*512 = 5222400
CURRENT = 6 * MiB


@pytest.mark.parametrize(("creator", "geometry", "expected", "rule", "qemu_agrees"), [
    (b"qemu", SMALL_GEOMETRY, 5222400, SIZE_RULE_CHS, True),
    (b"vpc ", SMALL_GEOMETRY, 5222400, SIZE_RULE_CHS, True),
    (b"win ", SMALL_GEOMETRY, CURRENT, SIZE_RULE_CURRENT, True),
    (b"qem2", SMALL_GEOMETRY, CURRENT, SIZE_RULE_CURRENT, True),
    (b"d2v ", SMALL_GEOMETRY, CURRENT, SIZE_RULE_CURRENT, True),
    (b"tap\0", SMALL_GEOMETRY, CURRENT, SIZE_RULE_CURRENT, True),
    (b"CTXS", SMALL_GEOMETRY, CURRENT, SIZE_RULE_CURRENT, True),
    (b"qemu", (65535, 16, 255), CURRENT, SIZE_RULE_CHS_MAX, True),
    (b"vpc ", (65535, 16, 255), CURRENT, SIZE_RULE_CHS_MAX, True),
    # qemu >= 10.0 agrees; qemu < 10.0 uses the geometry for these creators (see the vhd module docstring).
    (b"wa\0\0", SMALL_GEOMETRY, CURRENT, SIZE_RULE_CURRENT, False),
    (b"vbox", SMALL_GEOMETRY, CURRENT, SIZE_RULE_CURRENT, False),
], ids=["qemu", "vpc", "win", "qem2", "d2v", "tap", "ctxs", "qemu-chs-max", "vpc-chs-max", "azure", "vbox"])
@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_size_rule(tmp_path: Path, subformat: str, creator: bytes, geometry: tuple[int, int, int], expected: int,
                   rule: str, qemu_agrees: bool) -> None:
    image = make_image(tmp_path, "vpc", CURRENT, f"subformat={subformat},force_size=on",
                       layout=[(0, CURRENT, "text")])
    edit_footers(image, set_creator_and_geometry(creator, geometry))
    with open_image(image) as disk:
        assert disk.virtual_size == expected
        facts = disk.format_specific()
        assert facts["size-rule"] == rule
        assert facts["current-size"] == CURRENT
        assert facts["creator-application"] == creator.decode("latin-1").replace("\0", "\\x00")
        data = full_read(disk)
    # The bytes diskport reads are the bytes written, up to the size it chose.
    original = write_pattern_raw(tmp_path / "original.raw", CURRENT, layout=[(0, CURRENT, "text")])
    assert data == original.read_bytes()[:expected]
    if qemu_agrees:
        assert qemu_virtual_size(image) == expected
        assert qemu_raw(image, tmp_path) == data


def test_current_size_is_rounded_down_to_sectors(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 2 * MiB, "subformat=fixed,force_size=on")
    edit_footers(image, lambda f: struct.pack_into(">Q", f, 48, 2 * MiB - 100))
    with open_image(image) as disk:
        assert disk.virtual_size == 2 * MiB - 512
    assert qemu_virtual_size(image) == 2 * MiB - 512


# -- sector bitmaps ------------------------------------------------------------------------------------------
def test_clear_bitmap_bits_read_as_zeros(tmp_path: Path) -> None:
    """qemu ignores the bitmap; the spec says a clear bit means 'no data here', i.e. zeros in a dynamic disk."""
    image = make_image(tmp_path, "vpc", 4 * MiB, "subformat=dynamic,force_size=on",
                       layout=[(0, 4 * MiB, "random")])
    raw = bytearray(qemu_raw(image, tmp_path))
    buf = bytearray(image.read_bytes())
    _, entries = bat(buf)
    bitmap_at = entries[0] * 512
    clear = [0, 1, 2, 9, 10, 100, 4095]  # sectors of block 0 whose bits are cleared
    for s in clear:
        buf[bitmap_at + s // 8] &= ~(0x80 >> (s % 8)) & 0xFF
        raw[s * 512: (s + 1) * 512] = bytes(512)
    buf[entries[1] * 512: entries[1] * 512 + BITMAP] = bytes(BITMAP)  # block 1: no sector present
    raw[BLOCK: 2 * BLOCK] = bytes(BLOCK)
    image.write_bytes(bytes(buf))
    with open_image(image) as disk:
        exts = check_extent_contract(disk)
        assert full_read(disk) == bytes(raw)
        assert disk.read(9 * 512 - 3, 512 + 6) == bytes(raw[9 * 512 - 3: 10 * 512 + 3])
    data_at = entries[0] * 512 + BITMAP
    assert exts[:6] == [Extent(0, 3 * 512, True), Extent(3 * 512, 6 * 512, False, data_at + 3 * 512),
                        Extent(9 * 512, 2 * 512, True), Extent(11 * 512, 89 * 512, False, data_at + 11 * 512),
                        Extent(100 * 512, 512, True), Extent(101 * 512, 3994 * 512, False, data_at + 101 * 512)]
    assert exts[6] == Extent(4095 * 512, 512 + BLOCK, True)  # last sector of block 0 and all of block 1
    assert diskport_raw_sha256(image, tmp_path) != qemu_raw_sha256(image, tmp_path, "vpc")  # the documented difference


# -- footer copy ---------------------------------------------------------------------------------------------
def test_damaged_end_footer_falls_back_to_copy(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 5 * MiB, "subformat=dynamic")
    expected = qemu_raw_sha256(image, tmp_path, "vpc")
    buf = bytearray(image.read_bytes())
    buf[-512 + 40] ^= 0xFF  # current_size byte; checksum now wrong
    image.write_bytes(bytes(buf))
    with open_image(image) as disk:
        assert disk.format_specific()["footer"] == "copy at offset 0 (the footer at the end has a bad checksum)"
    assert diskport_raw_sha256(image, tmp_path) == expected
    image.write_bytes(bytes(buf[:-512]))  # footer gone altogether
    with open_image(image) as disk:
        assert disk.format_specific()["footer"] == "copy at offset 0 (the footer at the end is missing)"
    assert diskport_raw_sha256(image, tmp_path) == expected


def test_damaged_copy_is_reported(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 5 * MiB, "subformat=dynamic")
    expected = qemu_raw_sha256(image, tmp_path, "vpc")
    buf = bytearray(image.read_bytes())
    buf[100] ^= 0xFF  # reserved byte of the copy at offset 0
    image.write_bytes(bytes(buf))
    with open_image(image) as disk:
        assert disk.format_specific()["footer"] == "end (the copy at offset 0 has a bad checksum)"
    assert diskport_raw_sha256(image, tmp_path) == expected


def test_footers_that_disagree_are_refused(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 5 * MiB, "subformat=dynamic")
    buf = bytearray(image.read_bytes())
    struct.pack_into(">Q", buf, 48, 50 * MiB)
    fix_footer_checksum(buf, 0)
    image.write_bytes(bytes(buf))
    with pytest.raises(CorruptImage, match="disagree"):
        open_image(image)


def test_bad_footer_checksum_fixed(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 2 * MiB, "subformat=fixed")
    buf = bytearray(image.read_bytes())
    buf[-512 + 48] ^= 1
    image.write_bytes(bytes(buf))
    with pytest.raises(CorruptImage, match="footer checksum mismatch") as err:
        open_vhd_path(image)
    assert err.value.offset == len(buf) - 512 + FOOTER_CHECKSUM_AT
    assert err.value.path == str(image) and err.value.fmt == "vpc"


def test_bad_footer_checksum_both_copies(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 2 * MiB, "subformat=dynamic")
    buf = bytearray(image.read_bytes())
    buf[40] ^= 1
    buf[-512 + 40] ^= 1
    image.write_bytes(bytes(buf))
    with pytest.raises(CorruptImage, match="checksum mismatch"):
        open_vhd_path(image)


def open_vhd_path(path: Path) -> DiskImage:
    from diskport.sources.file import FileSource

    return open_vhd(FileSource(path))


# -- refusals ------------------------------------------------------------------------------------------------
def test_differencing_disk_names_parent(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 4 * MiB, "subformat=dynamic")
    edit_footers(image, lambda f: struct.pack_into(">I", f, 60, 4))
    parent_id = bytes(range(16))

    def name_parent(h: bytearray) -> None:
        h[40:56] = parent_id
        name = "Windows Base Disk ü.vhd".encode("utf-16-be")
        h[64: 64 + len(name)] = name
    edit_dynamic_header(image, name_parent)
    for opener in (open_image, open_vhd_path):
        with pytest.raises(UnsafeImage, match="differencing") as err:
            opener(image)
        assert "'Windows Base Disk ü.vhd'" in str(err.value)
        assert "00010203-0405-0607-0809-0a0b0c0d0e0f" in str(err.value)
    with pytest.raises(UnsafeImage):
        diskport_raw_sha256(image, tmp_path)
    assert not list(tmp_path.glob("diskport-*"))  # nothing converted


def test_truncated_dynamic(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 6 * MiB, "subformat=dynamic", layout=[(0, 6 * MiB, "random")])
    data = image.read_bytes()
    image.write_bytes(data[: len(data) - 512 - BLOCK // 2])
    with pytest.raises(CorruptImage, match="past the end of the file"):
        open_image(image)


def test_truncated_fixed(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 4 * MiB, "subformat=fixed")
    data = image.read_bytes()
    image.write_bytes(data[: 2 * MiB])
    with pytest.raises(CorruptImage, match="no VHD footer"):
        open_vhd_path(image)
    image.write_bytes(data[: 2 * MiB] + data[-512:])  # footer kept, data cut short
    with pytest.raises(CorruptImage, match="truncated"):
        open_image(image)


def test_bat_entry_past_end_of_file(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 4 * MiB, "subformat=dynamic")
    buf = bytearray(image.read_bytes())
    table, _ = bat(buf)
    struct.pack_into(">I", buf, table + 4, len(buf) // 512 - 2)  # block 1 starts 1 KiB before EOF
    image.write_bytes(bytes(buf))
    with pytest.raises(CorruptImage, match=r"BAT entry 1 .* past the end of the file") as err:
        open_image(image)
    assert err.value.offset == table + 4


@pytest.mark.parametrize("entries", [1, 1_000_000, 0xFFFFFFFF - 128])
def test_bat_larger_than_disk_needs(tmp_path: Path, entries: int) -> None:
    image = make_image(tmp_path, "vpc", 4 * MiB, "subformat=dynamic,force_size=on")
    edit_dynamic_header(image, lambda h: struct.pack_into(">I", h, 28, 128 + entries))
    with pytest.raises(CorruptImage, match="more than the 128"):
        open_image(image)


def test_bat_padded_to_a_sector_is_accepted(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 4 * MiB, "subformat=dynamic,force_size=on")
    expected = qemu_raw_sha256(image, tmp_path, "vpc")
    edit_dynamic_header(image, lambda h: struct.pack_into(">I", h, 28, 128))
    assert diskport_raw_sha256(image, tmp_path) == expected


def test_bat_smaller_than_disk_needs(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 8 * MiB, "subformat=dynamic,force_size=on")
    edit_dynamic_header(image, lambda h: struct.pack_into(">I", h, 28, 3))
    with pytest.raises(CorruptImage, match="has 3 entries; the virtual size 8388608 needs 4"):
        open_image(image)


def test_bat_offset_past_end_of_file(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 4 * MiB, "subformat=dynamic")
    edit_dynamic_header(image, lambda h: struct.pack_into(">Q", h, 16, 1 << 40))
    with pytest.raises(CorruptImage, match="runs past the end"):
        open_image(image)


@pytest.mark.parametrize("block_size", [0, 256, 3 * MiB, 512 * MiB, 0xFFFFFFFF])
def test_absurd_block_size(tmp_path: Path, block_size: int) -> None:
    image = make_image(tmp_path, "vpc", 4 * MiB, "subformat=dynamic")
    edit_dynamic_header(image, lambda h: struct.pack_into(">I", h, 32, block_size))
    with pytest.raises(CorruptImage, match="block size"):
        open_image(image)


def test_bad_dynamic_header_checksum_and_cookie(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 4 * MiB, "subformat=dynamic")
    buf = bytearray(image.read_bytes())
    at = dynamic_header_offset(buf)
    buf[at + 30] ^= 1
    image.write_bytes(bytes(buf))
    with pytest.raises(CorruptImage, match="dynamic disk header checksum mismatch"):
        open_image(image)
    buf[at + 30] ^= 1
    buf[at: at + 8] = b"xxsparse"
    image.write_bytes(bytes(buf))
    with pytest.raises(CorruptImage, match="cxsparse"):
        open_image(image)


@pytest.mark.parametrize(("disk_type", "error"), [(0, UnsupportedImage), (1, UnsupportedImage),
                                                  (5, UnsupportedImage)])
def test_unknown_disk_type(tmp_path: Path, disk_type: int, error: type[DiskportError]) -> None:
    image = make_image(tmp_path, "vpc", 2 * MiB, "subformat=fixed")
    edit_footers(image, lambda f: struct.pack_into(">I", f, 60, disk_type))
    with pytest.raises(error, match=f"disk type {disk_type}"):
        open_vhd_path(image)


def test_tiny_file(tmp_path: Path) -> None:
    image = tmp_path / "tiny.vhd"
    image.write_bytes(b"conectix")
    with pytest.raises(CorruptImage, match="too short"):
        open_vhd_path(image)


def test_info_matches_qemu(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vpc", 10 * MiB, "subformat=dynamic")
    theirs = qemu_info(image)
    with open_image(image) as disk:
        ours = disk.info()
    assert ours["virtual-size"] == theirs["virtual-size"]
    assert ours["cluster-size"] == theirs["cluster-size"]
    assert ours["format"] == theirs["format"] == "vpc"


def test_sha_helpers_see_whole_disk(tmp_path: Path) -> None:
    """The converted raw file has exactly the virtual size (so the sha comparisons compare whole disks)."""
    from diskport import convert

    image = make_image(tmp_path, "vpc", 10 * MiB, "subformat=fixed")
    out = tmp_path / "out.raw"
    result = convert(image, out, output_format="raw")
    assert out.stat().st_size == result.virtual_size == qemu_virtual_size(image) == 10514432
    assert sha256_file(out) == qemu_raw_sha256(image, tmp_path, "vpc")


# -- fuzz ----------------------------------------------------------------------------------------------------






def fuzz_bases(tmp_path: Path) -> list[bytes]:
    dynamic = make_image(tmp_path, "vpc", 4 * MiB, "subformat=dynamic", name="fuzz-d.vhd",
                         layout=[(0, 512 * 1024, "random"), (3 * MiB, 4096, "text")])
    forced = make_image(tmp_path, "vpc", 3 * MiB, "subformat=dynamic,force_size=on", name="fuzz-q.vhd",
                        layout=[(MiB, 8192, "random"), (2 * MiB + 512, 4096, "0x5a")])
    fixed = make_image(tmp_path, "vpc", 64 * 1024, "subformat=fixed", name="fuzz-f.vhd",
                       layout=[(0, 4096, "random")])
    return [p.read_bytes() for p in (dynamic, forced, fixed)]


def test_fuzz(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    bases = fuzz_bases(tmp_path)
    outcomes = {"opened": 0, "refused": 0}
    for iteration in range(3000):
        base = rng.choice(bases)
        buf = bytearray(base)
        dynamic = buf[:8] == b"conectix"
        regions = [(len(buf) - 512, len(buf))]
        if dynamic:
            table, entries = bat(base)
            bitmaps = [(e * 512, e * 512 + 512) for e in entries if e != 0xFFFFFFFF]
            regions += [(0, 512), (512, 1536), (table, table + 4 * len(entries)), *bitmaps]
        mutate(buf, regions, rng, byteorder=">")
        if rng.random() < 0.7:  # get past the checksums most of the time, to reach the deeper checks
            for at in footer_offsets(buf):
                fix_footer_checksum(buf, at)
            if dynamic:
                header_at = dynamic_header_offset(buf)
                if header_at + 1024 <= len(buf):
                    fix_header_checksum(buf, header_at)
        if rng.random() < 0.05:
            buf = buf[: rng.randrange(len(buf))]
        source = BytesSource(bytes(buf), f"fuzz-{iteration}.vhd")
        try:
            image = open_detected(source) if iteration % 5 == 0 else open_vhd(source)
            exercise(image)
            outcomes["opened"] += 1
        except DiskportError:
            outcomes["refused"] += 1
    # Both paths are exercised: many mutations are harmless (data, unused fields), many are caught.
    assert outcomes["opened"] > 300 and outcomes["refused"] > 300, outcomes
