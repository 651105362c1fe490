"""VHDX reader tests.

qemu-img is the oracle for every image it can make or read (512-byte logical sectors). For what qemu cannot
produce - 4096-byte logical sectors, differencing images, pending log entries - the test builds the VHDX
itself, field by field from [MS-VHDX], and knows the guest bytes it put in; where qemu can read the result it
checks the builder too (the builder lives in tests/support/vhdx.py). Refusals and a seeded mutation fuzzer of
malformed input are in test_vhdx_bad.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import uuid
from pathlib import Path

import pytest

from diskport.formats import open_image
from diskport.formats.base import Extent
from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io
from tests.support.images import diskport_raw_sha256, make_image, qemu_raw_sha256, sha256_file
from tests.support.vhdx import (
    FULLY_PRESENT,
    HEADER_OFFSETS,
    NOT_PRESENT,
    REGION_TABLE_OFFSETS,
    SECTOR,
    UNDEFINED,
    UNMAPPED,
    ZERO,
    Descriptor,
    GiB,
    KiB,
    assert_tiles,
    build_vhdx,
    dirty_qemu_image,
    diskport_raw,
    expected_raw,
    make_log_entry,
    patch,
    patterned,
    qemu_info,
    read_layout,
    read_u64,
    set_log_guid,
    write_log,
)

# -- images qemu makes ----------------------------------------------------------------------------------------

QEMU_VARIANTS = [
    ("dynamic", 1 * MiB, 1 * MiB),
    ("dynamic", 8 * MiB, 2 * MiB),
    ("dynamic", 32 * MiB, 1 * MiB),
    ("dynamic", 256 * MiB, 1 * MiB),
    ("fixed", 1 * MiB, 1 * MiB),
    ("fixed", 8 * MiB, 1 * MiB),
    ("fixed", 32 * MiB, 3 * MiB),
]


@pytest.mark.parametrize(("subformat", "block_size", "log_size"), QEMU_VARIANTS,
                         ids=[f"{s}-{b // MiB}M-log{lg // MiB}M" for s, b, lg in QEMU_VARIANTS])
@pytest.mark.parametrize("zero_state", ["on", "off"])
def test_qemu_images_match_oracle(tmp_path: Path, subformat: str, block_size: int, log_size: int,
                                  zero_state: str) -> None:
    size = 72 * MiB + 3 * 512  # not a multiple of any block size: the last block is cut short
    layout = [(0, 3 * MiB + 512, "random"), (9 * MiB, 5 * MiB, "text"), (33 * MiB + 4096, 2 * MiB, "0xa5"),
              (64 * MiB, 8 * MiB + 1536, "random")]
    options = f"subformat={subformat},block_size={block_size},log_size={log_size},block_state_zero={zero_state}"
    image = make_image(tmp_path, "vhdx", size=size, options=options, layout=layout)
    qemu_io(image, "vhdx", "write -P 0x3c 20971520 65536", "write -z 1048576 1048576",
            "discard 10485760 2097152", "write -P 0x77 71303168 4096")
    info = qemu_info(image)
    with open_image(image) as img:
        assert img.format == "vhdx"
        assert img.virtual_size == info["virtual-size"] == size
        assert img.cluster_size == block_size
        facts = img.format_specific()
        assert facts["vhdx-type"] == subformat
        assert facts["block-size"] == block_size
        assert facts["logical-sector-size"] == 512
        assert facts["creator"].startswith("QEMU")
        assert facts["log"] == {"replayed": False, "entries": 0}
        extents = assert_tiles(img.extents(), 0, size)
        # Partial ranges tile too, and agree with the whole-image mapping.
        assert_tiles(img.extents(5 * MiB + 17, 40 * MiB + 3), 5 * MiB + 17, 40 * MiB + 3)
        if subformat == "fixed" and zero_state == "off":
            assert len(extents) == 1 and extents[0].host is not None  # one contiguous run of blocks
        if subformat == "dynamic" and block_size <= 8 * MiB:
            assert any(e.zero for e in extents)
        assert img.read(20 * MiB, 65536) == b"\x3c" * 65536
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path)


def test_qemu_dynamic_sparse_writes_and_sector_bitmap_boundary(tmp_path: Path) -> None:
    """A 4 GiB chunk (2^23 sectors of 512 bytes) ends at 4 GiB: the BAT entry after payload block 4095
    (1 MiB blocks) is a sector bitmap entry the reader must skip."""
    image = tmp_path / "big.vhdx"
    size = 4 * GiB + 5 * MiB
    qemu_img("create", "-f", "vhdx", "-o", "block_size=1M", image, str(size))
    qemu_io(image, "vhdx", "write -P 0x11 4293918720 1048576",  # block 4095
            "write -P 0x22 4294967296 1048576",  # block 4096, first of the second chunk
            "write -P 0x33 4297064448 4096",  # inside block 4098
            "write -P 0x44 0 512")
    layout = read_layout(image)
    assert layout.chunk_ratio == 4096
    with open_image(image) as img:
        assert img.virtual_size == size
        extents = assert_tiles(img.extents(), 0, size)
        data = [e for e in extents if not e.zero]
        assert [e.start for e in data] == [0, 4095 * MiB, 4098 * MiB]
        assert data[1].length == 2 * MiB  # blocks 4095 and 4096 lie side by side in the file
        window = img.read(4094 * MiB, 6 * MiB)
    out = tmp_path / "window.raw"
    qemu_img("convert", "--image-opts", "-O", "raw",
             f"driver=raw,offset={4094 * MiB},size={6 * MiB},file.driver=vhdx,file.file.driver=file,"
             f"file.file.filename={image}", out)
    assert window == out.read_bytes()
    assert window[MiB: 2 * MiB] == b"\x11" * MiB and window[2 * MiB: 3 * MiB] == b"\x22" * MiB


def test_qemu_fixed_256m_block_with_short_last_block(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vhdx", size=40 * MiB,
                       options="subformat=fixed,block_size=256M,block_state_zero=off",
                       layout=[(MiB, 2 * MiB, "random"), (39 * MiB, MiB, "text")])
    assert os.path.getsize(image) < 256 * MiB  # qemu stores only the used part of the block
    with open_image(image) as img:
        assert img.cluster_size == 256 * MiB
        assert [e.zero for e in img.extents()] == [False]
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path)


# -- images the test builds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("logical_sector_size", [512, 4096])
@pytest.mark.parametrize("block_size", [1 * MiB, 8 * MiB, 32 * MiB])
@pytest.mark.parametrize("fixed", [False, True])
def test_built_images(tmp_path: Path, logical_sector_size: int, block_size: int, fixed: bool) -> None:
    size = 3 * block_size + 5 * logical_sector_size
    content = {0: patterned(1, 3 * logical_sector_size),
               block_size - 4096: patterned(2, 8192),  # straddles blocks 0 and 1
               3 * block_size: patterned(3, 5 * logical_sector_size)}  # the short last block
    image = build_vhdx(tmp_path / "built.vhdx", size, content, block_size=block_size,
                       logical_sector_size=logical_sector_size, fixed=fixed, reverse_allocation=True)
    expected = expected_raw(size, content)
    with open_image(image.path) as img:
        assert img.virtual_size == size
        facts = img.format_specific()
        assert facts["logical-sector-size"] == logical_sector_size
        assert facts["physical-sector-size"] == 4096
        assert facts["vhdx-type"] == ("fixed" if fixed else "dynamic")
        assert facts["creator"] == "diskport test builder"
        extents = assert_tiles(img.extents(), 0, size)
        # Blocks were allocated in reverse file order, so no two data blocks merge into one extent.
        assert all(e.length <= block_size for e in extents if not e.zero)
        assert img.read(0, size) == expected
    assert diskport_raw(image.path, tmp_path) == expected
    if logical_sector_size == 512:  # qemu 7.2 reads only 512-byte logical sectors; it checks the builder
        assert qemu_raw_sha256(image.path, tmp_path) == hashlib.sha256(expected).hexdigest()


def test_built_4k_sector_image_crosses_its_32_gib_chunk(tmp_path: Path) -> None:
    """With 4096-byte logical sectors a chunk is 2^23 * 4096 = 32 GiB: 32768 payload blocks of 1 MiB."""
    size = 32 * GiB + 3 * MiB
    content = {32 * GiB - 4096: patterned(7, 8192), 32 * GiB + 2 * MiB: patterned(8, 4096), 4096: b"\x99" * 4096}
    image = build_vhdx(tmp_path / "chunk4k.vhdx", size, content, logical_sector_size=4096)
    assert image.chunk_ratio == 32768
    with open_image(image.path) as img:
        extents = assert_tiles(img.extents(), 0, size)
        assert [e.start for e in extents if not e.zero] == [0, 32 * GiB - MiB, 32 * GiB + 2 * MiB]
        for offset, data in content.items():
            assert img.read(offset, len(data)) == data
        assert img.read(32 * GiB + MiB, MiB) == bytes(MiB)


def test_block_states_read_as_zero(tmp_path: Path) -> None:
    size = 8 * MiB
    content = {i * MiB: bytes([i + 1]) * MiB for i in range(8)}
    states = {1: NOT_PRESENT, 2: UNDEFINED, 3: ZERO, 4: UNMAPPED, 5: 5}
    image = build_vhdx(tmp_path / "states.vhdx", size, content, states=states)
    expected = bytearray(expected_raw(size, content))
    for block in states:
        expected[block * MiB: (block + 1) * MiB] = bytes(MiB)
    with open_image(image.path) as img:
        assert [(e.start // MiB, e.zero) for e in img.extents()] == [(0, False), (1, True), (6, False)]
    assert diskport_raw(image.path, tmp_path) == bytes(expected)
    assert qemu_raw_sha256(image.path, tmp_path) == hashlib.sha256(expected).hexdigest()


def test_backup_header_and_region_table_are_used(tmp_path: Path) -> None:
    content = {0: patterned(4, MiB)}
    image = build_vhdx(tmp_path / "backup.vhdx", 2 * MiB, content)
    patch(image.path, HEADER_OFFSETS[1] + 100, b"\xff")  # the current header (sequence 2) is now bad
    patch(image.path, REGION_TABLE_OFFSETS[0] + 20, b"\xff")  # so is the first region table
    with open_image(image.path) as img:
        assert img.read(0, 2 * MiB) == expected_raw(2 * MiB, content)


# -- log replay (2.3.3) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_new_block", [True, False], ids=["zeroed-new-block", "file-extended-by-log"])
def test_log_replay_applies_active_sequence(tmp_path: Path, zero_new_block: bool) -> None:
    """Two entries (sequence 10 and 11) form the active sequence; an older complete sequence and an entry of
    another log must be ignored. The replay changes payload sectors and BAT entries and adds a block past
    the end of the file, which either a zero descriptor or only the head's LastFileOffset brings into being."""
    image, before, layout, host0 = dirty_qemu_image(tmp_path)
    file_size = os.path.getsize(image)
    new_block = -(-file_size // MiB) * MiB  # block 5 moves past the end of the file
    log_guid = uuid.uuid4().bytes_le
    sector1, sector2, junk = patterned(11, SECTOR), patterned(12, SECTOR), b"\xee" * SECTOR

    bat_page_at = layout.bat_offset  # entries of blocks 0..511 live in the BAT's first 4 KiB
    with open(image, "rb") as f:
        f.seek(bat_page_at)
        bat_page = bytearray(f.read(SECTOR))
    struct.pack_into("<Q", bat_page, 8 * 2, ZERO)  # block 2 becomes a ZERO block
    struct.pack_into("<Q", bat_page, 8 * 5, FULLY_PRESENT | (new_block // MiB) << 20)

    entry_a = make_log_entry(10, log_guid, 0, [("data", host0 + 8 * KiB, sector1),
                                               ("zero", host0 + 64 * KiB, 64 * KiB)],
                             flushed_file_offset=file_size, last_file_offset=file_size)
    new_block_zeros: list[Descriptor] = [("zero", new_block, MiB)] if zero_new_block else []
    entry_b = make_log_entry(11, log_guid, 0, [("data", bat_page_at, bytes(bat_page)), *new_block_zeros,
                                               ("data", new_block + 12 * KiB, sector2)],
                             flushed_file_offset=file_size, last_file_offset=new_block + MiB)
    stale = make_log_entry(5, log_guid, 512 * KiB, [("data", host0, junk)],  # an older, complete sequence
                           flushed_file_offset=file_size, last_file_offset=file_size)
    foreign = make_log_entry(99, uuid.uuid4().bytes_le, 256 * KiB, [("data", host0, junk)],
                             flushed_file_offset=file_size, last_file_offset=file_size)
    write_log(image, layout, 0, entry_a)
    write_log(image, layout, len(entry_a), entry_b)
    write_log(image, layout, 256 * KiB, foreign)
    write_log(image, layout, 512 * KiB, stale)
    set_log_guid(image, log_guid)

    expected = bytearray(before)
    expected[8 * KiB: 12 * KiB] = sector1
    expected[64 * KiB: 128 * KiB] = bytes(64 * KiB)
    expected[2 * MiB: 3 * MiB] = bytes(MiB)
    expected[5 * MiB + 12 * KiB: 5 * MiB + 16 * KiB] = sector2

    digest_before = sha256_file(image)
    stat_before = os.stat(image)
    with open_image(image) as img:
        assert img.format_specific()["log"] == {"replayed": True, "entries": 2}
        host1 = (read_u64(image, layout.bat_entry_offset(1)) >> 20) * MiB
        assert host1 == host0 + MiB  # qemu placed blocks 0 and 1 side by side
        # Replayed sectors are read through the overlay (no host); block 5 lies beyond the file's end and is
        # zeros except its one replayed sector.
        assert list(img.extents()) == [
            Extent(0, 8 * KiB, False, host0),
            Extent(8 * KiB, 4 * KiB, False, None),
            Extent(12 * KiB, 52 * KiB, False, host0 + 12 * KiB),
            Extent(64 * KiB, 64 * KiB, True, None),
            Extent(128 * KiB, 2 * MiB - 128 * KiB, False, host0 + 128 * KiB),
            Extent(2 * MiB, 3 * MiB + 12 * KiB, True, None),
            Extent(5 * MiB + 12 * KiB, 4 * KiB, False, None),
            Extent(5 * MiB + 16 * KiB, 3 * MiB - 16 * KiB, True, None),
        ]
        assert img.read(0, 8 * MiB) == bytes(expected)
    assert diskport_raw(image, tmp_path) == bytes(expected)
    assert sha256_file(image) == digest_before  # the source is never written
    assert os.stat(image).st_mtime_ns == stat_before.st_mtime_ns

    # qemu refuses a dirty log read-only; replayed read-write on a copy, it agrees with diskport. (qemu 7.2
    # extends the file to LastFileOffset only when that is not a multiple of 1 MiB, against 2.3.1.1, so it
    # is the oracle only when a zero descriptor writes the new block.)
    assert qemu_img("info", image, check=False).returncode != 0
    if not zero_new_block:
        return
    replayed = tmp_path / "replayed-by-qemu.vhdx"
    shutil.copyfile(image, replayed)
    qemu_img("check", "-r", "all", replayed, check=False)
    assert qemu_raw_sha256(replayed, tmp_path) == hashlib.sha256(expected).hexdigest()


def test_log_entry_wrapping_around_the_log_end(tmp_path: Path) -> None:
    """The active entry starts in the log's last sector and continues at its start."""
    image, before, layout, host0 = dirty_qemu_image(tmp_path)
    file_size = os.path.getsize(image)
    log_guid = uuid.uuid4().bytes_le
    sectors = [patterned(20 + i, SECTOR) for i in range(3)]
    entry = make_log_entry(3, log_guid, layout.log_length - SECTOR,
                           [("data", host0 + MiB // 2 + i * SECTOR, s) for i, s in enumerate(sectors)],
                           flushed_file_offset=file_size, last_file_offset=file_size)
    assert len(entry) == 4 * SECTOR  # header sector at the log's last sector, data sectors at its start
    write_log(image, layout, layout.log_length - SECTOR, entry)
    # A later entry whose Tail names no entry heads an incomplete sequence, which is never replayed.
    incomplete = make_log_entry(9, log_guid, 128 * KiB, [("data", host0, b"\xee" * SECTOR)],
                                flushed_file_offset=file_size, last_file_offset=file_size)
    write_log(image, layout, 256 * KiB, incomplete)
    set_log_guid(image, log_guid)
    expected = bytearray(before)
    expected[MiB // 2: MiB // 2 + 3 * SECTOR] = b"".join(sectors)
    with open_image(image) as img:
        assert img.format_specific()["log"] == {"replayed": True, "entries": 1}
        assert img.read(0, 8 * MiB) == bytes(expected)


def test_log_with_no_valid_entry_is_ignored(tmp_path: Path) -> None:
    image, before, layout, host0 = dirty_qemu_image(tmp_path)
    log_guid = uuid.uuid4().bytes_le
    entry = bytearray(make_log_entry(1, log_guid, 0, [("data", host0, b"\x01" * SECTOR)],
                                     flushed_file_offset=MiB, last_file_offset=MiB))
    entry[SECTOR + 100] ^= 1  # the data sector no longer matches the checksum
    write_log(image, layout, 0, bytes(entry))
    set_log_guid(image, log_guid)
    with open_image(image) as img:
        assert img.format_specific()["log"] == {"replayed": False, "entries": 0}
        assert img.read(0, 8 * MiB) == before
