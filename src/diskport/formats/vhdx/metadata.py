"""The VHDX metadata region (2.6): the table, the known items, and the facts they give the reader."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from diskport.errors import UnsafeImage
from diskport.formats.base import DiskImage
from diskport.formats.vhdx.header import ReadFile
from diskport.formats.vhdx.spec import (
    FILE_PARAMETERS,
    FMT,
    LOGICAL_SECTOR_SIZE,
    MAX_BLOCK_SIZE,
    MAX_METADATA_ITEM,
    MAX_TABLE_ENTRIES,
    MAX_VIRTUAL_SIZE,
    METADATA_IS_REQUIRED,
    METADATA_ITEM_MIN_LENGTH,
    METADATA_ITEM_NAMES,
    METADATA_SIGNATURE,
    METADATA_TABLE_HEADER,
    METADATA_TABLE_SIZE,
    MIN_BLOCK_SIZE,
    PARAMS_HAS_PARENT,
    PARAMS_LEAVE_BLOCKS_ALLOCATED,
    PARENT_LOCATOR,
    PARENT_LOCATOR_ENTRY,
    PARENT_LOCATOR_HEADER,
    PARENT_NAME_KEYS,
    PHYSICAL_SECTOR_SIZE,
    SECTOR_SIZES,
    SECTORS_PER_CHUNK,
    VIRTUAL_DISK_ID,
    VIRTUAL_DISK_SIZE,
    Region,
    TableEntry,
    guid_text,
)


@dataclass(frozen=True)
class Metadata:
    """The file parameters, sizes and id the metadata items give, validated."""

    block_size: int
    leave_blocks_allocated: bool
    logical_sector_size: int
    physical_sector_size: int
    virtual_size: int
    virtual_disk_id: str

    @property
    def chunk_ratio(self) -> int:
        """Payload BAT entries between two sector bitmap entries (2.5.1)."""
        return SECTORS_PER_CHUNK * self.logical_sector_size // self.block_size


def read_metadata(image: DiskImage, read_file: ReadFile, region: Region) -> Metadata:
    if region.length < METADATA_TABLE_SIZE:
        raise image.corrupt(f"metadata region of {region.length} bytes cannot hold its 64 KiB table")
    table = read_file(region.offset, METADATA_TABLE_SIZE, "metadata table")
    signature, _, count = METADATA_TABLE_HEADER.unpack_from(table)
    if signature != METADATA_SIGNATURE:
        raise image.corrupt("metadata table signature is missing", region.offset)
    if count > MAX_TABLE_ENTRIES:
        raise image.corrupt(f"metadata table has {count} entries, more than {MAX_TABLE_ENTRIES}", region.offset)
    items: dict[bytes, bytes] = {}
    for i in range(count):
        entry = TableEntry.metadata(table, i)
        item_id, offset, length = entry.guid, entry.offset, entry.length
        name = METADATA_ITEM_NAMES.get(item_id)
        if name is None:
            if entry.flags & METADATA_IS_REQUIRED:
                raise image.unsupported(f"metadata item {guid_text(item_id)} is marked required but is unknown")
            continue
        if item_id in items:
            raise image.corrupt(f"metadata table lists the {name} item twice")
        if length > MAX_METADATA_ITEM or (length and (offset < METADATA_TABLE_SIZE
                                                      or offset + length > region.length)):
            raise image.corrupt(f"{name} metadata item {offset:#x}+{length:#x} lies outside the metadata "
                                f"region or exceeds {MAX_METADATA_ITEM} bytes")
        if length < METADATA_ITEM_MIN_LENGTH.get(item_id, 0):
            raise image.corrupt(f"{name} metadata item is {length} bytes, too short")
        items[item_id] = read_file(region.offset + offset, length, f"{name} metadata item")
    for item_id in METADATA_ITEM_MIN_LENGTH:
        if item_id not in items:
            raise image.corrupt(f"the required {METADATA_ITEM_NAMES[item_id]} metadata item is missing")

    block_size, param_bits = struct.unpack_from("<II", items[FILE_PARAMETERS])
    if param_bits & PARAMS_HAS_PARENT:
        raise UnsafeImage(f"is a differencing image whose parent is "
                          f"'{parent_name(items.get(PARENT_LOCATOR))}'; diskport does not follow "
                          "external references", path=image.source.name, fmt=FMT,
                          hint="merge it into its parent with Hyper-V or qemu-img first")
    logical_sector_size: int = struct.unpack_from("<I", items[LOGICAL_SECTOR_SIZE])[0]
    physical_sector_size: int = struct.unpack_from("<I", items[PHYSICAL_SECTOR_SIZE])[0]
    virtual_size: int = struct.unpack_from("<Q", items[VIRTUAL_DISK_SIZE])[0]
    if (block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE
            or block_size & (block_size - 1)):
        raise image.corrupt(f"block size {block_size} is not a power of two from 1 MiB to 256 MiB")
    if logical_sector_size not in SECTOR_SIZES:
        raise image.corrupt(f"logical sector size {logical_sector_size} is neither 512 nor 4096")
    if physical_sector_size not in SECTOR_SIZES:
        raise image.corrupt(f"physical sector size {physical_sector_size} is neither 512 nor 4096")
    if virtual_size > MAX_VIRTUAL_SIZE:
        raise image.corrupt(f"virtual disk size {virtual_size} exceeds the 64 TiB maximum")
    if virtual_size % logical_sector_size:
        raise image.corrupt(f"virtual disk size {virtual_size} is not a multiple of the logical sector size "
                            f"{logical_sector_size}")
    return Metadata(block_size, bool(param_bits & PARAMS_LEAVE_BLOCKS_ALLOCATED), logical_sector_size,
                    physical_sector_size, virtual_size, guid_text(items[VIRTUAL_DISK_ID][:16]))


def parent_name(locator: bytes | None) -> str:
    """The parent a differencing image names in its parent locator (2.6.2.6), as well as it can be read."""
    if locator is None or len(locator) < PARENT_LOCATOR_HEADER.size:
        return "(no readable parent locator)"
    _, count = PARENT_LOCATOR_HEADER.unpack_from(locator)
    count = min(count, (len(locator) - PARENT_LOCATOR_HEADER.size) // PARENT_LOCATOR_ENTRY.size)
    values: dict[str, str] = {}
    for i in range(count):
        key_at, value_at, key_len, value_len = PARENT_LOCATOR_ENTRY.unpack_from(
            locator, PARENT_LOCATOR_HEADER.size + i * PARENT_LOCATOR_ENTRY.size)
        if key_at + key_len > len(locator) or value_at + value_len > len(locator):
            continue
        key = locator[key_at: key_at + key_len].decode("utf-16-le", "replace")
        values[key] = locator[value_at: value_at + value_len].decode("utf-16-le", "replace")
    for key in PARENT_NAME_KEYS:
        if values.get(key):
            return values[key]
    return "(no parent path in the parent locator)"
