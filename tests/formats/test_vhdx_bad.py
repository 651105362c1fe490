"""VHDX input diskport refuses: differencing images, corrupt headers and region tables, unknown required
items, BATs pointing past the end, into the BAT or at shared bytes, absurd sizes, logs it cannot replay, and a
seeded mutation fuzzer: every failure must be a :class:`~diskport.errors.DiskportError`."""

from __future__ import annotations

import os
import random
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from diskport.errors import CorruptImage, DiskportError, UnsafeImage, UnsupportedImage
from diskport.formats import open_image
from diskport.formats import vhdx as vhdx_module
from diskport.formats.base import Extent
from diskport.formats.vhdx import log as vhdx_log
from tests.support import MiB
from tests.support.images import BytesSource, diskport_raw_sha256, mutate, qemu_raw_sha256
from tests.support.vhdx import (
    FILE_PARAMETERS_GUID,
    FULLY_PRESENT,
    HEADER_OFFSETS,
    LOGICAL_SECTOR_GUID,
    PARTIALLY_PRESENT,
    PHYSICAL_SECTOR_GUID,
    REGION_TABLE_OFFSETS,
    SECTOR,
    VIRTUAL_SIZE_GUID,
    KiB,
    build_vhdx,
    crc32c,
    dirty_qemu_image,
    fix_header_crcs,
    fix_region_table_crcs,
    guid,
    make_log_entry,
    patch,
    patterned,
    read_layout,
    read_u64,
    set_log_guid,
    small_qemu_image,
    write_log,
)

# -- refusals -------------------------------------------------------------------------------------------------


def test_differencing_image_names_its_parent(tmp_path: Path) -> None:
    image = build_vhdx(tmp_path / "child.vhdx", 4 * MiB, {0: b"\x01" * 4096},
                       parent={"parent_linkage": "{" + str(uuid.uuid4()) + "}",
                               "relative_path": ".\\base-disk.vhdx",
                               "absolute_win32_path": "C:\\VMs\\base-disk.vhdx"})
    with pytest.raises(UnsafeImage, match=r"differencing image whose parent is '\.\\base-disk\.vhdx'"):
        open_image(image.path)


def test_log_that_needs_too_much_memory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image, _, layout, host0 = dirty_qemu_image(tmp_path)
    log_guid = uuid.uuid4().bytes_le
    entry = make_log_entry(1, log_guid, 0, [("data", host0 + i * SECTOR, b"\x01" * SECTOR) for i in range(3)],
                           flushed_file_offset=MiB, last_file_offset=MiB)
    write_log(image, layout, 0, entry)
    set_log_guid(image, log_guid)
    monkeypatch.setattr(vhdx_log, "MAX_OVERLAY_BYTES", 2 * SECTOR)
    with pytest.raises(UnsupportedImage, match="MiB of memory"):
        open_image(image)


def test_log_of_a_truncated_file_is_refused(tmp_path: Path) -> None:
    image, _, layout, host0 = dirty_qemu_image(tmp_path)
    log_guid = uuid.uuid4().bytes_le
    entry = make_log_entry(1, log_guid, 0, [("data", host0, b"\x01" * SECTOR)],
                           flushed_file_offset=os.path.getsize(image) + MiB, last_file_offset=MiB)
    write_log(image, layout, 0, entry)
    set_log_guid(image, log_guid)
    with pytest.raises(CorruptImage, match="truncated"):
        open_image(image)


def test_both_headers_corrupt(tmp_path: Path) -> None:
    image = small_qemu_image(tmp_path)
    for offset in HEADER_OFFSETS:
        patch(image, offset + 40, b"\x00\x01")
    with pytest.raises(CorruptImage, match="neither of the two headers"):
        open_image(image)


def test_region_table_crc_bad(tmp_path: Path) -> None:
    image = small_qemu_image(tmp_path)
    for offset in REGION_TABLE_OFFSETS:
        patch(image, offset + 4, b"\x00\x00\x00\x00")
    with pytest.raises(CorruptImage, match="region table"):
        open_image(image)


@pytest.mark.parametrize("required", [True, False])
def test_unknown_region(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, required: bool) -> None:
    image = small_qemu_image(tmp_path)
    expected = qemu_raw_sha256(image, tmp_path_factory.mktemp("oracle"))
    unknown = guid("01234567-89AB-CDEF-0123-456789ABCDEF")
    for offset in REGION_TABLE_OFFSETS:
        patch(image, offset + 8, struct.pack("<I", 3))
        patch(image, offset + 16 + 64, struct.pack("<16sQII", unknown, 64 * MiB, MiB, int(required)))
    fix_region_table_crcs(image)
    if required:
        with pytest.raises(UnsupportedImage, match=r"01234567-89ab-cdef-0123-456789abcdef.*required"):
            open_image(image)
    else:  # an optional region diskport does not know is skipped, as the spec allows
        assert diskport_raw_sha256(image, tmp_path) == expected


def test_headers_with_equal_sequence_numbers_that_differ(tmp_path: Path) -> None:
    image = small_qemu_image(tmp_path)
    data = image.read_bytes()
    sequence = struct.unpack_from("<Q", data, HEADER_OFFSETS[0] + 8)[0]
    patch(image, HEADER_OFFSETS[1] + 8, struct.pack("<Q", sequence))
    fix_header_crcs(image)
    with pytest.raises(CorruptImage, match="both headers carry sequence number"):
        open_image(image)


def test_unknown_required_metadata_item(tmp_path: Path) -> None:
    image = small_qemu_image(tmp_path)
    layout = read_layout(image)
    count = struct.unpack_from("<H", image.read_bytes(), layout.metadata_offset + 10)[0]
    patch(image, layout.metadata_offset + 10, struct.pack("<H", count + 1))
    patch(image, layout.metadata_offset + 32 + 32 * count,
          struct.pack("<16sIII", uuid.uuid4().bytes_le, 0, 0, 4))
    with pytest.raises(UnsupportedImage, match=r"metadata item .* required"):
        open_image(image)


def test_bat_entry_past_eof(tmp_path: Path) -> None:
    image = small_qemu_image(tmp_path)
    layout = read_layout(image)
    patch(image, layout.bat_entry_offset(3), struct.pack("<Q", FULLY_PRESENT | (4096 << 20)))
    with pytest.raises(CorruptImage, match="past the end of the file"):
        open_image(image)


def test_partially_present_block(tmp_path: Path) -> None:
    image = small_qemu_image(tmp_path)
    layout = read_layout(image)
    entry = read_u64(image, layout.bat_entry_offset(0))
    patch(image, layout.bat_entry_offset(0), struct.pack("<Q", (entry & ~7) | PARTIALLY_PRESENT))
    with pytest.raises(CorruptImage, match="PARTIALLY_PRESENT"):
        open_image(image)


def test_blocks_sharing_file_bytes(tmp_path: Path) -> None:
    image = small_qemu_image(tmp_path)
    layout = read_layout(image)
    patch(image, layout.bat_entry_offset(2), struct.pack("<Q", read_u64(image, layout.bat_entry_offset(0))))
    with pytest.raises(CorruptImage, match="overlap"):
        open_image(image)


def test_block_inside_the_bat_region(tmp_path: Path) -> None:
    image = small_qemu_image(tmp_path)
    layout = read_layout(image)
    patch(image, layout.bat_entry_offset(2), struct.pack("<Q", FULLY_PRESENT | (layout.bat_offset // MiB) << 20))
    with pytest.raises(CorruptImage, match="overlapping the BAT region"):
        open_image(image)


@pytest.mark.parametrize("cut", [MiB // 2, 3 * MiB, None])
def test_truncated_file(tmp_path: Path, cut: int | None) -> None:
    image = small_qemu_image(tmp_path, "fixed")
    size = os.path.getsize(image)
    with open(image, "r+b") as f:
        f.truncate(cut if cut is not None else size - MiB)
    with pytest.raises(CorruptImage), open_image(image) as img:
        for ext in img.extents():
            img.read(ext.start, ext.length)


@pytest.mark.parametrize("block_size", [0, 512 * KiB, 3 * MiB, 512 * MiB, 0xFFFFFFFF])
def test_absurd_block_size(tmp_path: Path, block_size: int) -> None:
    image = small_qemu_image(tmp_path)
    layout = read_layout(image)
    patch(image, layout.items[FILE_PARAMETERS_GUID][0], struct.pack("<I", block_size))
    with pytest.raises(CorruptImage, match="block size"):
        open_image(image)


@pytest.mark.parametrize(("item", "value", "message"), [
    (LOGICAL_SECTOR_GUID, struct.pack("<I", 1024), "logical sector size"),
    (PHYSICAL_SECTOR_GUID, struct.pack("<I", 0), "physical sector size"),
    (VIRTUAL_SIZE_GUID, struct.pack("<Q", 1 << 60), "64 TiB"),
    (VIRTUAL_SIZE_GUID, struct.pack("<Q", 4 * MiB + 1), "multiple of the logical sector size"),
    (VIRTUAL_SIZE_GUID, struct.pack("<Q", 1 << 40), "BAT region"),
])
def test_bad_metadata_values(tmp_path: Path, item: bytes, value: bytes, message: str) -> None:
    image = small_qemu_image(tmp_path)
    patch(image, read_layout(image).items[item][0], value)
    with pytest.raises(CorruptImage, match=message):
        open_image(image)


def test_not_a_vhdx(tmp_path: Path) -> None:
    image = small_qemu_image(tmp_path)
    patch(image, 0, b"vhdxfilX")
    with pytest.raises(CorruptImage, match="vhdxfile"):
        open_image(image, "vhdx")


# -- fuzzing --------------------------------------------------------------------------------------------------


READ_BUDGET = 16 * MiB


def exercise(data: bytes | bytearray) -> bool:
    """Open and read all of an image the way the engine does; True if it opened."""
    try:
        img = vhdx_module.open_vhdx(BytesSource(data, "fuzzed.vhdx"))
    except DiskportError:
        return False
    budget = READ_BUDGET
    try:
        img.info()
        for ext in img.extents():
            if ext.zero:
                continue
            pos = ext.start
            while pos < ext.end and budget > 0:
                take = min(ext.end - pos, MiB, budget)
                host = None if ext.host is None else ext.host + pos - ext.start
                img.read_extent(Extent(pos, take, False, host), memoryview(bytearray(take)))
                pos += take
                budget -= take
            if budget <= 0:
                break
    except DiskportError:
        pass
    return True


@dataclass
class FuzzBase:
    data: bytes
    areas: list[tuple[int, int]]  # (offset, length) of structures worth mutating
    fix: Callable[[bytearray], None]


def fuzz_bases(tmp_path: Path) -> list[FuzzBase]:
    bases = []
    dynamic = build_vhdx(tmp_path / "fuzz-dyn.vhdx", 3 * MiB + 4096, {0: patterned(30, 8192),
                                                                       2 * MiB: patterned(31, MiB)})
    fixed = small_qemu_image(tmp_path, "fixed")
    logged = build_vhdx(tmp_path / "fuzz-log.vhdx", 2 * MiB, {0: patterned(32, MiB)}, logical_sector_size=4096)
    log_guid = uuid.uuid4().bytes_le
    host0 = logged.block_hosts[0]
    size = os.path.getsize(logged.path)
    entries = [make_log_entry(7, log_guid, 0, [("data", host0, patterned(33, SECTOR)),
                                               ("zero", host0 + 2 * SECTOR, 2 * SECTOR)],
                              flushed_file_offset=size, last_file_offset=size)]
    entries.append(make_log_entry(8, log_guid, 0, [("data", logged.bat_offset, struct.pack(
        "<QQ", FULLY_PRESENT | (host0 // MiB) << 20, FULLY_PRESENT | (size // MiB) << 20) + bytes(SECTOR - 16))],
        flushed_file_offset=size, last_file_offset=size + MiB))
    write_log(logged.path, logged, 0, entries[0])
    write_log(logged.path, logged, len(entries[0]), entries[1])
    set_log_guid(logged.path, log_guid)
    entry_spans = [(MiB, len(entries[0])), (MiB + len(entries[0]), len(entries[1]))]

    for path in (dynamic.path, fixed, logged.path):
        layout = read_layout(path)
        areas = [(0, 16), (HEADER_OFFSETS[0], 80), (HEADER_OFFSETS[1], 80),
                 (REGION_TABLE_OFFSETS[0], 16 + 32 * 3), (REGION_TABLE_OFFSETS[1], 16 + 32 * 3),
                 (layout.metadata_offset, 32 + 32 * 6), (layout.bat_offset, 64)]
        areas += list(layout.items.values())
        spans = entry_spans if path == logged.path else []
        areas += [(o, min(n, 256)) for o, n in spans] + [(o + SECTOR, 16) for o, n in spans if n > SECTOR]

        def fix(buf: bytearray, spans: list[tuple[int, int]] = spans) -> None:
            for offset in HEADER_OFFSETS:
                struct.pack_into("<I", buf, offset + 4, crc32c(buf[offset: offset + 4 * KiB], 4))
            for offset in REGION_TABLE_OFFSETS:
                struct.pack_into("<I", buf, offset + 4, crc32c(buf[offset: offset + 64 * KiB], 4))
            for offset, length in spans:
                struct.pack_into("<I", buf, offset + 4, crc32c(buf[offset: offset + length], 4))

        bases.append(FuzzBase(path.read_bytes(), areas, fix))
    return bases


INTERESTING = [0, 1, 2, 3, 6, 7, 0x7F, 0x80, 0xFF, 0x1000, 0xFFFF, 0x10000, MiB, MiB + 1, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 44, 1 << 52, 1 << 63, (1 << 64) - 1]


def test_fuzz_mutations_only_raise_diskport_errors(tmp_path: Path) -> None:
    bases = fuzz_bases(tmp_path)
    for base in bases:  # every base opens and reads before it is mutated
        assert exercise(base.data)
    rng = random.Random(20240607)
    opened = refused = 0
    for _ in range(5000):
        base = rng.choice(bases)
        buf = bytearray(base.data)
        mutate(buf, [(o, o + n) for o, n in base.areas], rng, interesting=INTERESTING)
        if rng.random() < 0.6:
            base.fix(buf)
        if rng.random() < 0.05:
            del buf[rng.randrange(len(buf)):]
        if exercise(buf):
            opened += 1
        else:
            refused += 1
    # The mutations must reach both outcomes, or the fuzzer is not testing anything.
    assert opened > 300 and refused > 300, (opened, refused)
