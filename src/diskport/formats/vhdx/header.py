"""The VHDX header section (2.2): the current one of the two headers, and the region table that places the
BAT and metadata regions."""

from __future__ import annotations

from collections.abc import Callable

from diskport.formats.base import DiskImage
from diskport.formats.vhdx.spec import (
    BAT_REGION,
    FMT,
    HEADER_OFFSETS,
    HEADER_SECTION_SIZE,
    HEADER_SIZE,
    MAX_FILE_OFFSET,
    MAX_TABLE_ENTRIES,
    METADATA_REGION,
    REGION_REQUIRED,
    REGION_TABLE_HEADER,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIGNATURE,
    REGION_TABLE_SIZE,
    STRUCTURE_ALIGNMENT,
    Header,
    Region,
    TableEntry,
    crc32c,
    guid_text,
)

#: ``read_file(offset, length, what)``: the file's bytes as the replayed log left them.
ReadFile = Callable[[int, int, str], bytes]


def current_header(image: DiskImage) -> Header:
    """The valid header with the highest sequence number (2.2.2.1)."""
    valid: list[Header] = []
    for offset in HEADER_OFFSETS:
        header = Header.unpack(image.source.read_exact(offset, HEADER_SIZE, "header", FMT))
        if header.valid:
            valid.append(header)
    if not valid:
        raise image.corrupt("neither of the two headers is valid (bad signature, version or CRC-32C)",
                            HEADER_OFFSETS[0])
    if len(valid) == 2 and valid[0].sequence == valid[1].sequence and valid[0].raw != valid[1].raw:
        raise image.corrupt(f"both headers carry sequence number {valid[0].sequence} but differ; the "
                            "current one cannot be chosen", HEADER_OFFSETS[0])
    header = max(valid, key=lambda h: h.sequence)  # the first one wins a tie of identical headers
    if header.log_version != 0:
        raise image.unsupported(f"log version {header.log_version} is not supported (only 0)")
    return header


def read_region_table(image: DiskImage, read_file: ReadFile, log: Region | None) -> tuple[Region, Region]:
    """The (BAT, metadata) regions of the first valid region table (2.2.3), each aligned, past the header
    section and clear of the log and of each other."""
    table: bytes | None = None
    for offset in REGION_TABLE_OFFSETS:
        raw = read_file(offset, REGION_TABLE_SIZE, "region table")
        signature, checksum, count, _ = REGION_TABLE_HEADER.unpack_from(raw)
        if signature == REGION_TABLE_SIGNATURE and crc32c(raw, 4) == checksum:
            table = raw
            break
    if table is None:
        raise image.corrupt("neither copy of the region table is valid (bad signature or CRC-32C)",
                            REGION_TABLE_OFFSETS[0])
    if count > MAX_TABLE_ENTRIES:
        raise image.corrupt(f"region table has {count} entries, more than {MAX_TABLE_ENTRIES}")
    regions: dict[bytes, Region] = {}
    placed: list[tuple[str, Region]] = []
    if log is not None:
        placed.append(("log", log))
    for i in range(count):
        entry = TableEntry.region(table, i)
        known = {BAT_REGION: "BAT", METADATA_REGION: "metadata"}.get(entry.guid)
        if known is None:
            if entry.flags & REGION_REQUIRED:
                raise image.unsupported(f"region {guid_text(entry.guid)} is marked required but is unknown")
            continue
        if entry.guid in regions:
            raise image.corrupt(f"region table lists the {known} region twice")
        region = Region(entry.offset, entry.length)
        if region.offset % STRUCTURE_ALIGNMENT or region.offset < HEADER_SECTION_SIZE or region.length == 0:
            raise image.corrupt(f"{known} region {region.offset:#x}+{region.length:#x} is empty, unaligned or "
                                "inside the header section")
        if region.end > MAX_FILE_OFFSET:
            raise image.corrupt(f"{known} region {region.offset:#x}+{region.length:#x} is implausibly far")
        for name, other in placed:
            if region.offset < other.end and other.offset < region.end:
                raise image.corrupt(f"{known} region overlaps the {name} region")
        placed.append((known, region))
        regions[entry.guid] = region
    for guid, name in ((BAT_REGION, "BAT"), (METADATA_REGION, "metadata")):
        if guid not in regions:
            raise image.corrupt(f"region table has no {name} region")
    return regions[BAT_REGION], regions[METADATA_REGION]
