"""VHDX test helpers: a VHDX writer built field by field from [MS-VHDX] (for what qemu cannot make: 4096-byte
logical sectors, differencing images, pending log entries), a reader and patcher of any VHDX's layout, log
entries, the oracle helpers, and the qemu-made images the tests damage (for tests/formats/test_vhdx*.py)."""

from __future__ import annotations

import json
import random
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c

from diskport.formats.base import Extent
from tests.support import MiB
from tests.support.clients import qemu_img
from tests.support.images import make_image

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


def small_qemu_image(tmp_path: Path, subformat: str = "dynamic") -> Path:
    return make_image(tmp_path, "vhdx", size=4 * MiB, options=f"subformat={subformat},block_size=1M",
                      layout=[(0, MiB + 4096, "random"), (3 * MiB, 4096, "text")])
