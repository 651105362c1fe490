"""VHDX reader tests.

qemu-img is the oracle for every image it can make or read (512-byte logical sectors). For what qemu cannot
produce - 4096-byte logical sectors, differencing images, pending log entries - the test builds the VHDX
itself, field by field from [MS-VHDX], and knows the guest bytes it put in; where qemu can read the result it
checks the builder too. Refusals and a seeded mutation fuzzer cover malformed input: every failure must be a
:class:`~diskport.errors.DiskportError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import pytest

from diskport.errors import CorruptImage, DiskportError, UnsafeImage, UnsupportedImage
from diskport.formats import open_image
from diskport.formats import vhdx as vhdx_module
from diskport.formats.base import Extent
from diskport.formats.vhdx import log as vhdx_log
from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io
from tests.support.images import BytesSource, diskport_raw_sha256, make_image, mutate, qemu_raw_sha256, sha256_file

KiB = 1024
GiB = 1024 * MiB
SECTOR = 4096  # log sector

# -- on-disk constants, written out from [MS-VHDX] (kept apart from the reader's own) -------------------------


def guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_SIZE_GUID = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
DISK_ID_GUID = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_GUID = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_GUID = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_TYPE_GUID = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")

HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7


def crc32c(buf: bytes | bytearray, checksum_at: int) -> int:
    data = bytes(buf[:checksum_at]) + bytes(4) + bytes(buf[checksum_at + 4:])
    return int(google_crc32c.value(data))


# -- a VHDX writer for the tests ------------------------------------------------------------------------------


@dataclass
class Built:
    path: Path
    virtual_size: int
    block_size: int
    logical_sector_size: int
    log_offset: int
    log_length: int
    metadata_offset: int
    bat_offset: int
    chunk_ratio: int
    block_hosts: dict[int, int] = field(default_factory=dict)

    def bat_entry_offset(self, block: int) -> int:
        return self.bat_offset + 8 * (block + block // self.chunk_ratio)


def expected_raw(virtual_size: int, content: dict[int, bytes]) -> bytes:
    raw = bytearray(virtual_size)
    for offset, data in content.items():
        raw[offset: offset + len(data)] = data
    return bytes(raw)


def build_vhdx(path: Path, virtual_size: int, content: dict[int, bytes], *, block_size: int = MiB,
               logical_sector_size: int = 512, physical_sector_size: int = 4096, fixed: bool = False,
               states: dict[int, int] | None = None, reverse_allocation: bool = False,
               parent: dict[str, str] | None = None, log_length: int = MiB,
               creator: str = "diskport test builder") -> Built:
    """Write a VHDX holding ``content`` (guest offset -> bytes). Blocks that hold data are FULLY_PRESENT (all
    blocks when ``fixed``); ``states`` overrides the state of chosen blocks."""
    blocks = -(-virtual_size // block_size)
    chunk_ratio = (1 << 23) * logical_sector_size // block_size
    if parent is None:
        bat_entries = blocks + (blocks - 1) // chunk_ratio if blocks else 0
    else:
        bat_entries = -(-blocks // chunk_ratio) * (chunk_ratio + 1)
    log_offset = MiB
    metadata_offset = log_offset + log_length
    bat_offset = metadata_offset + MiB
    bat_length = max(MiB, -(-bat_entries * 8 // MiB) * MiB)
    payload_offset = bat_offset + bat_length

    with_data = sorted({(o + k) // block_size for o, d in content.items() for k in range(0, len(d), block_size)}
                       | {(o + len(d) - 1) // block_size for o, d in content.items() if d})
    allocated = list(range(blocks)) if fixed else with_data
    if reverse_allocation:
        allocated = allocated[::-1]
    hosts = {b: payload_offset + i * block_size for i, b in enumerate(allocated)}
    file_size = payload_offset + len(allocated) * block_size
    built = Built(path, virtual_size, block_size, logical_sector_size, log_offset, log_length,
                  metadata_offset, bat_offset, chunk_ratio, hosts)

    with open(path, "wb") as f:
        f.truncate(file_size)

        def put(offset: int, data: bytes) -> None:
            f.seek(offset)
            f.write(data)

        put(0, b"vhdxfile" + creator.encode("utf-16-le"))
        for i, offset in enumerate(HEADER_OFFSETS):
            put(offset, make_header(sequence=i + 1, log_guid=bytes(16), log_length=log_length,
                                    log_offset=log_offset))
        table = make_region_table([(BAT_GUID, bat_offset, bat_length, 1),
                                   (METADATA_GUID, metadata_offset, MiB, 1)])
        for offset in REGION_TABLE_OFFSETS:
            put(offset, table)
        items: list[tuple[bytes, bytes, int]] = [
            (FILE_PARAMETERS_GUID, struct.pack("<II", block_size, (1 if fixed else 0) | (2 if parent else 0)), 4),
            (VIRTUAL_SIZE_GUID, struct.pack("<Q", virtual_size), 6),
            (DISK_ID_GUID, uuid.uuid4().bytes_le, 6),
            (LOGICAL_SECTOR_GUID, struct.pack("<I", logical_sector_size), 6),
            (PHYSICAL_SECTOR_GUID, struct.pack("<I", physical_sector_size), 6),
        ]
        if parent is not None:
            items.append((PARENT_LOCATOR_GUID, make_parent_locator(parent), 4))
        put(metadata_offset, make_metadata(items))
        bat = bytearray(bat_entries * 8)
        for block in range(blocks):
            state = FULLY_PRESENT if block in hosts else NOT_PRESENT
            state = (states or {}).get(block, state)
            entry = state | ((hosts[block] // MiB) << 20 if block in hosts and state == FULLY_PRESENT else 0)
            struct.pack_into("<Q", bat, 8 * (block + block // chunk_ratio), entry)
        put(bat_offset, bytes(bat))
        for offset, data in content.items():
            pos = 0
            while pos < len(data):
                block = (offset + pos) // block_size
                within = (offset + pos) % block_size
                take = min(len(data) - pos, block_size - within)
                put(hosts[block] + within, data[pos: pos + take])
                pos += take
    return built


def make_header(*, sequence: int, log_guid: bytes, log_length: int, log_offset: int, version: int = 1,
                log_version: int = 0) -> bytes:
    buf = bytearray(4 * KiB)
    struct.pack_into("<4sIQ16s16s16sHHIQ", buf, 0, b"head", 0, sequence, uuid.uuid4().bytes_le,
                     uuid.uuid4().bytes_le, log_guid, log_version, version, log_length, log_offset)
    struct.pack_into("<I", buf, 4, crc32c(buf, 4))
    return bytes(buf)


def make_region_table(entries: list[tuple[bytes, int, int, int]]) -> bytes:
    buf = bytearray(64 * KiB)
    struct.pack_into("<4sIII", buf, 0, b"regi", 0, len(entries), 0)
    for i, (region, offset, length, required) in enumerate(entries):
        struct.pack_into("<16sQII", buf, 16 + 32 * i, region, offset, length, required)
    struct.pack_into("<I", buf, 4, crc32c(buf, 4))
    return bytes(buf)


def make_metadata(items: list[tuple[bytes, bytes, int]]) -> bytes:
    buf = bytearray(64 * KiB + 4 * KiB * len(items))
    struct.pack_into("<8sHH", buf, 0, b"metadata", 0, len(items))
    for i, (item, data, flags) in enumerate(items):
        offset = 64 * KiB + 4 * KiB * i
        struct.pack_into("<16sIII", buf, 32 + 32 * i, item, offset, len(data), flags)
        buf[offset: offset + len(data)] = data
    return bytes(buf)


def make_parent_locator(pairs: dict[str, str]) -> bytes:
    header = struct.pack("<16sHH", VHDX_PARENT_TYPE_GUID, 0, len(pairs))
    strings = bytearray()
    entries = bytearray()
    base = len(header) + 12 * len(pairs)
    for key, value in pairs.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        entries += struct.pack("<IIHH", base + len(strings), base + len(strings) + len(k), len(k), len(v))
        strings += k + v
    return header + bytes(entries) + bytes(strings)


# -- reading and patching any VHDX (qemu's or ours) -----------------------------------------------------------


@dataclass
class Layout:
    current_header: int
    log_offset: int
    log_length: int
    bat_offset: int
    metadata_offset: int
    block_size: int
    chunk_ratio: int
    items: dict[bytes, tuple[int, int]]  # item guid -> (file offset, length)

    def bat_entry_offset(self, block: int) -> int:
        return self.bat_offset + 8 * (block + block // self.chunk_ratio)


def read_layout(path: Path) -> Layout:
    data = path.read_bytes()
    seqs = [struct.unpack_from("<Q", data, o + 8)[0] for o in HEADER_OFFSETS]
    current = HEADER_OFFSETS[0] if seqs[0] > seqs[1] else HEADER_OFFSETS[1]
    log_length, log_offset = struct.unpack_from("<IQ", data, current + 68)
    count = struct.unpack_from("<I", data, REGION_TABLE_OFFSETS[0] + 8)[0]
    regions = {}
    for i in range(count):
        region, offset, _length, _ = struct.unpack_from("<16sQII", data, REGION_TABLE_OFFSETS[0] + 16 + 32 * i)
        regions[region] = offset
    meta = regions[METADATA_GUID]
    items = {}
    for i in range(struct.unpack_from("<H", data, meta + 10)[0]):
        item, offset, length, _ = struct.unpack_from("<16sIII", data, meta + 32 + 32 * i)
        items[item] = (meta + offset, length)
    block_size = struct.unpack_from("<I", data, items[FILE_PARAMETERS_GUID][0])[0]
    lss = struct.unpack_from("<I", data, items[LOGICAL_SECTOR_GUID][0])[0]
    return Layout(current, log_offset, log_length, regions[BAT_GUID], meta, block_size,
                  (1 << 23) * lss // block_size, items)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def fix_header_crcs(path: Path) -> None:
    data = bytearray(path.read_bytes()[:256 * KiB])
    for offset in HEADER_OFFSETS:
        header = data[offset: offset + 4 * KiB]
        patch(path, offset + 4, struct.pack("<I", crc32c(header, 4)))


def fix_region_table_crcs(path: Path) -> None:
    data = path.read_bytes()[:320 * KiB]
    for offset in REGION_TABLE_OFFSETS:
        patch(path, offset + 4, struct.pack("<I", crc32c(data[offset: offset + 64 * KiB], 4)))


def set_log_guid(path: Path, log_guid: bytes) -> None:
    """Point the current header at a log (LogGuid, 2.2.2) and fix its checksum."""
    layout = read_layout(path)
    patch(path, layout.current_header + 48, log_guid)
    fix_header_crcs(path)


def read_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack("<Q", f.read(8))[0])


# -- log entries (2.3.1) --------------------------------------------------------------------------------------

Descriptor = tuple[str, int, bytes | int]  # ("data", file offset, 4 KiB sector) or ("zero", file offset, length)


def make_log_entry(sequence: int, log_guid: bytes, tail: int, descriptors: list[Descriptor], *,
                   flushed_file_offset: int, last_file_offset: int) -> bytes:
    data_descriptors = [d for d in descriptors if d[0] == "data"]
    desc_sectors = -(-(64 + 32 * len(descriptors)) // SECTOR)
    total = (desc_sectors + len(data_descriptors)) * SECTOR
    buf = bytearray(total)
    struct.pack_into("<4sIIIQII16sQQ", buf, 0, b"loge", 0, total, tail, sequence, len(descriptors), 0,
                     log_guid, flushed_file_offset, last_file_offset)
    k = 0
    for i, (kind, offset, payload) in enumerate(descriptors):
        at = 64 + 32 * i
        if kind == "zero":
            assert isinstance(payload, int)
            struct.pack_into("<4sIQQQ", buf, at, b"zero", 0, payload, offset, sequence)
        else:
            assert isinstance(payload, bytes) and len(payload) == SECTOR
            struct.pack_into("<4s4s8sQQ", buf, at, b"desc", payload[4092:], payload[:8], offset, sequence)
            sector_at = (desc_sectors + k) * SECTOR
            buf[sector_at: sector_at + SECTOR] = (b"data" + struct.pack("<I", sequence >> 32) + payload[8:4092]
                                                  + struct.pack("<I", sequence & 0xFFFFFFFF))
            k += 1
    struct.pack_into("<I", buf, 4, crc32c(buf, 4))
    return bytes(buf)


def write_log(path: Path, layout: Layout | Built, position: int, entry: bytes) -> None:
    """Write ``entry`` at ``position`` in the circular log, wrapping at its end."""
    first = min(len(entry), layout.log_length - position)
    patch(path, layout.log_offset + position, entry[:first])
    if first < len(entry):
        patch(path, layout.log_offset, entry[first:])


# -- oracle helpers -------------------------------------------------------------------------------------------


def qemu_info(path: Path) -> dict[str, object]:
    return dict(json.loads(qemu_img("info", "--output=json", path).stdout))


def diskport_raw(path: Path, tmp_path: Path) -> bytes:
    from diskport import convert

    out = tmp_path / f"diskport-{path.name}.raw"
    convert(path, out, output_format="raw", force=True)
    data = out.read_bytes()
    out.unlink()
    return data


def assert_tiles(extents: Iterable[Extent], start: int, end: int) -> list[Extent]:
    """Extents must cover [start, end) in order, with no gap or overlap."""
    got = list(extents)
    pos = start
    for ext in got:
        assert ext.start == pos and ext.length > 0, (ext, pos)
        pos = ext.end
    assert pos == end
    return got


def patterned(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


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


def dirty_qemu_image(tmp_path: Path) -> tuple[Path, bytes, Layout, int]:
    """A qemu-made dynamic image (1 MiB blocks; blocks 0, 1 and 2 hold data) and its guest bytes."""
    image = make_image(tmp_path, "vhdx", size=8 * MiB, options="block_size=1M",
                       layout=[(0, 3 * MiB, "random")])
    raw = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    layout = read_layout(image)
    block0 = read_u64(image, layout.bat_entry_offset(0))
    assert block0 & 7 == FULLY_PRESENT
    return image, raw.read_bytes(), layout, (block0 >> 20) * MiB


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


# -- refusals -------------------------------------------------------------------------------------------------


def test_differencing_image_names_its_parent(tmp_path: Path) -> None:
    image = build_vhdx(tmp_path / "child.vhdx", 4 * MiB, {0: b"\x01" * 4096},
                       parent={"parent_linkage": "{" + str(uuid.uuid4()) + "}",
                               "relative_path": ".\\base-disk.vhdx",
                               "absolute_win32_path": "C:\\VMs\\base-disk.vhdx"})
    with pytest.raises(UnsafeImage, match=r"differencing image whose parent is '\.\\base-disk\.vhdx'"):
        open_image(image.path)


def small_qemu_image(tmp_path: Path, subformat: str = "dynamic") -> Path:
    return make_image(tmp_path, "vhdx", size=4 * MiB, options=f"subformat={subformat},block_size=1M",
                      layout=[(0, MiB + 4096, "random"), (3 * MiB, 4096, "text")])


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
