"""VHDX reader ([MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format", v20160714).

Layout (spec 2.1): the first MiB of the file is the *header section*: the file type identifier at 0 (the
``vhdxfile`` signature and a UTF-16 creator string, 2.2.1), two headers at 64 KiB and 128 KiB (2.2.2) and two
copies of the region table at 192 KiB and 256 KiB (2.2.3). Every other structure is placed by offsets found
there, in 1 MiB units: the log (2.3), the block allocation table (BAT, 2.5) and the metadata region (2.6).

Reading an image takes these steps, in this order:

1. The current header is the valid one (signature ``head``, version 1, CRC-32C over its 4 KiB) with the
   highest sequence number (2.2.2.1).
2. If that header's LogGuid is not zero, the log may hold metadata updates that never reached their place in
   the file. The *active sequence* is found and replayed as the spec's log replay algorithm says (2.3.3): log
   entries (2.3.1) are valid when their header, CRC-32C, descriptors (2.3.1.2, 2.3.1.3) and data sectors
   (2.3.1.4) are; a sequence is a run of valid entries, each directly after the previous one in the circular
   log with the next sequence number, and it is complete when the Tail of its last entry (the head) names one
   of its entries; the active sequence is the complete one whose head has the highest sequence number. Its
   entries, from the Tail to the head, are applied to an **in-memory overlay** of 4 KiB file sectors and zero
   ranges; the source is never written. Everything after this step (region table, metadata, BAT, payload)
   is read through the overlay, and the file is taken to be at least the head's LastFileOffset long.
3. The region table (2.2.3) must name the BAT and metadata regions; an unknown region marked required is
   refused.
4. The metadata table and items (2.6.1, 2.6.2): file parameters (block size, LeaveBlocksAllocated,
   HasParent), virtual disk size, virtual disk id (page 83 data), logical and physical sector size. A
   differencing image (HasParent) is refused, naming its parent from the parent locator (2.6.2.6).
5. The BAT (2.5) holds one entry per payload block, with a sector bitmap entry after every *chunk ratio*
   payload entries (2.5.1, chunk ratio = 2^23 * logical sector size / block size). A payload entry's low
   3 bits are its state (2.5.1.1) and bits 20..63 the block's file offset in MiB. NOT_PRESENT, UNDEFINED,
   ZERO and UNMAPPED blocks read as zeros (as does state 5, which VHDX v0.95 used for UNMAPPED);
   FULLY_PRESENT blocks are read from the file; PARTIALLY_PRESENT only makes sense in differencing images
   and is refused.

Safety: every offset and length is checked against the file size before it is used; the BAT is read in
bounded windows (it is never held whole) and only as far as the virtual size needs; metadata items are
limited to 1 MiB, the log region to 1 GiB and the replay overlay to 64 MiB. Payload blocks must lie past the
header section, clear of the log, BAT and metadata regions and of each other, so a small file cannot expand
into a large amount of data.

Extents: consecutive FULLY_PRESENT blocks that are also consecutive in the file become one extent with a
host offset. Within a block the log replay touched, replayed sectors are DATA extents without a host (served
by :meth:`VhdxImage.read_mapped` through the overlay), zeroed ranges are zero extents and the rest keeps its
host offset. qemu refuses to open an image with a pending log read-only; this reader needs no write access.
"""

from __future__ import annotations

import bisect
import struct
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

from diskport.errors import CorruptImage, UnsafeImage, UnsupportedImage
from diskport.formats.base import DiskImage, Extent
from diskport.formats.runs import RunKind, split_runs
from diskport.sources.base import Source

FMT = "vhdx"
SIGNATURE = b"vhdxfile"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

# -- header section (2.1, 2.2) ----------------------------------------------------------------------------
HEADER_SECTION_SIZE = 1 * MiB
CREATOR_OFFSET, CREATOR_SIZE = 8, 512
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB  # the CRC covers the first 4 KiB of each 64 KiB header block
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
HEADER_SIGNATURE = b"head"
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
REGION_TABLE_HEADER = struct.Struct("<4sIII")
REGION_TABLE_ENTRY = struct.Struct("<16sQII")
REGION_TABLE_SIGNATURE = b"regi"
MAX_TABLE_ENTRIES = 2047  # both the region table (2.2.3.1) and the metadata table (2.6.1.1)
REGION_REQUIRED = 1
STRUCTURE_ALIGNMENT = 1 * MiB  # regions, the log, payload blocks

# -- metadata (2.6) -----------------------------------------------------------------------------------------
METADATA_TABLE_SIZE = 64 * KiB
METADATA_TABLE_HEADER = struct.Struct("<8sHH20x")
METADATA_TABLE_ENTRY = struct.Struct("<16sIII4x")
METADATA_SIGNATURE = b"metadata"
METADATA_IS_REQUIRED = 4
MAX_METADATA_ITEM = 1 * MiB
PARAMS_LEAVE_BLOCKS_ALLOCATED = 1
PARAMS_HAS_PARENT = 2
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 1 * MiB, 256 * MiB
SECTOR_SIZES = (512, 4096)
MAX_VIRTUAL_SIZE = 64 * TiB
SECTORS_PER_CHUNK = 1 << 23  # 2.5: a sector bitmap block describes 2^23 sectors
PARENT_LOCATOR_HEADER = struct.Struct("<16s2xH")
PARENT_LOCATOR_ENTRY = struct.Struct("<IIHH")


def _guid(text: str) -> bytes:
    """A GUID as stored on disk (first three fields little-endian, 2.2.2)."""
    return uuid.UUID(text).bytes_le


BAT_REGION = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")  # "page 83 data"
LOGICAL_SECTOR_SIZE = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
METADATA_ITEM_NAMES = {
    FILE_PARAMETERS: "file parameters",
    VIRTUAL_DISK_SIZE: "virtual disk size",
    VIRTUAL_DISK_ID: "virtual disk id (page 83 data)",
    LOGICAL_SECTOR_SIZE: "logical sector size",
    PHYSICAL_SECTOR_SIZE: "physical sector size",
    PARENT_LOCATOR: "parent locator",
}
METADATA_ITEM_MIN_LENGTH = {
    FILE_PARAMETERS: 8, VIRTUAL_DISK_SIZE: 8, VIRTUAL_DISK_ID: 16, LOGICAL_SECTOR_SIZE: 4,
    PHYSICAL_SECTOR_SIZE: 4,
}
# Parent locator keys that name the parent, most useful first (2.6.2.6.2).
PARENT_NAME_KEYS = ("relative_path", "absolute_win32_path", "volume_path", "parent_linkage")

# -- BAT (2.5) --------------------------------------------------------------------------------------------
BAT_STATE_MASK = 7
BAT_OFFSET_SHIFT = 20  # FileOffsetMB lives in bits 20..63
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_UNMAPPED_V095 = 5
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
ZERO_STATES = (PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_ZERO, PAYLOAD_UNMAPPED, PAYLOAD_UNMAPPED_V095)
#: Payload blocks decoded (and validated) together; 65536 entries is 512 KiB of BAT.
BAT_WINDOW_BLOCKS = 65536
_BAT_CACHE_WINDOWS = 4

# -- log (2.3) --------------------------------------------------------------------------------------------
LOG_SECTOR = 4 * KiB
LOG_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
LOG_ENTRY_SIGNATURE = b"loge"
DATA_DESCRIPTOR_SIGNATURE = b"desc"
ZERO_DESCRIPTOR_SIGNATURE = b"zero"
DATA_SECTOR_SIGNATURE = b"data"
DESCRIPTOR_SIZE = 32
DESCRIPTOR_DTYPE = np.dtype([("signature", "S4"), ("trailing", "<u4"), ("leading_or_length", "<u8"),
                             ("file_offset", "<u8"), ("sequence", "<u8")])
MAX_LOG_LENGTH = 1 * GiB
MAX_DESCRIPTORS_PER_ENTRY = 1 << 20
MAX_OVERLAY_BYTES = 64 * MiB
MAX_ZERO_RANGES = 65536
#: No structure, replayed or not, may claim to lie beyond this file offset.
MAX_FILE_OFFSET = 1 << 52
_LOG_READ_CHUNK = 4 * MiB

# Extent kinds while decoding the BAT.
_ZERO, _DATA, _OVERLAID = RunKind.ZERO, RunKind.DATA, RunKind.MAPPED

ZERO_GUID = bytes(16)


def probe(head: bytes, source: Source) -> int:
    return 100 if head[:8] == SIGNATURE else 0


def _crc32c(data: bytes, checksum_at: int) -> int:
    """CRC-32C of ``data`` with its 4-byte checksum field at ``checksum_at`` taken as zero (2.2.2.1)."""
    return int(google_crc32c.value(data[:checksum_at] + bytes(4) + data[checksum_at + 4:]))


def _guid_text(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


@dataclass(frozen=True)
class _Header:
    sequence: int
    log_guid: bytes
    log_version: int
    log_length: int
    log_offset: int
    raw: bytes


@dataclass(frozen=True)
class _Region:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class _LogEntry:
    """A log entry whose header, checksum, descriptors and data sectors are valid (2.3.1)."""

    position: int  # byte offset inside the log
    length: int
    sequence: int
    tail: int
    descriptor_count: int
    flushed_file_offset: int
    last_file_offset: int


class _Overlay:
    """What the replayed log wrote: whole 4 KiB file sectors and zeroed ranges, kept disjoint."""

    def __init__(self) -> None:
        self.sectors: dict[int, bytes] = {}
        self.zero_starts: list[int] = []
        self.zero_ends: list[int] = []

    def write_sector(self, offset: int, data: bytes) -> None:
        self._unzero(offset, offset + LOG_SECTOR)
        self.sectors[offset] = data

    def write_zeros(self, start: int, end: int) -> None:
        if end <= start:
            return
        if (end - start) // LOG_SECTOR <= len(self.sectors):
            for offset in range(start, end, LOG_SECTOR):
                self.sectors.pop(offset, None)
        else:
            for offset in [o for o in self.sectors if start <= o < end]:
                del self.sectors[offset]
        first = bisect.bisect_left(self.zero_ends, start)
        last = bisect.bisect_right(self.zero_starts, end)
        if first < last:
            start = min(start, self.zero_starts[first])
            end = max(end, self.zero_ends[last - 1])
        self.zero_starts[first:last] = [start]
        self.zero_ends[first:last] = [end]

    def _unzero(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self.zero_ends, start)
        while i < len(self.zero_starts) and self.zero_starts[i] < end:
            zs, ze = self.zero_starts[i], self.zero_ends[i]
            pieces = [(s, e) for s, e in ((zs, start), (end, ze)) if s < e]
            self.zero_starts[i: i + 1] = [s for s, _ in pieces]
            self.zero_ends[i: i + 1] = [e for _, e in pieces]
            i += len(pieces)

    def apply(self, offset: int, buf: bytearray) -> None:
        """Lay the overlay over ``buf``, which holds the file's bytes from ``offset``."""
        end = offset + len(buf)
        i = bisect.bisect_right(self.zero_ends, offset)
        while i < len(self.zero_starts) and self.zero_starts[i] < end:
            s, e = max(self.zero_starts[i], offset), min(self.zero_ends[i], end)
            buf[s - offset: e - offset] = bytes(e - s)
            i += 1
        if not self.sectors:
            return
        first = offset - offset % LOG_SECTOR
        if (end - first) // LOG_SECTOR <= len(self.sectors):
            candidates: list[int] = list(range(first, end, LOG_SECTOR))
        else:
            candidates = [o for o in self.sectors if first <= o < end]
        for sector in candidates:
            data = self.sectors.get(sector)
            if data is None:
                continue
            s, e = max(sector, offset), min(sector + LOG_SECTOR, end)
            buf[s - offset: e - offset] = data[s - sector: e - sector]

    def segments(self, source_size: int, file_end: int) -> list[tuple[int, int, bool]]:
        """(start, end, is_zero) file ranges that are not plain source bytes, sorted and disjoint.

        Sector ranges (is_zero False) hold replayed data; zero ranges are what the log zeroed plus
        everything from the source's end to ``file_end`` that no replayed sector covers.
        """
        sector_runs = _merge([(o, o + LOG_SECTOR) for o in sorted(self.sectors)])
        zero_runs = _merge(sorted([*zip(self.zero_starts, self.zero_ends, strict=True),
                                   (source_size, max(source_size, file_end))]))
        zero_runs = _subtract(zero_runs, sector_runs)
        return sorted([(a, b, True) for a, b in zero_runs if a < b] + [(a, b, False) for a, b in sector_runs])


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans joined where they touch or overlap."""
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        elif a < b:
            merged.append((a, b))
    return merged


def _subtract(spans: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted disjoint ``spans`` minus sorted disjoint ``holes``."""
    out: list[tuple[int, int]] = []
    h = 0
    for a, b in spans:
        while h < len(holes) and holes[h][1] <= a:
            h += 1
        k = h
        while k < len(holes) and holes[k][0] < b:
            if holes[k][0] > a:
                out.append((a, holes[k][0]))
            a = max(a, holes[k][1])
            k += 1
        if a < b:
            out.append((a, b))
    return out


class VhdxImage(DiskImage):
    format = FMT

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.file_size = source.size
        self._overlay: _Overlay | None = None
        self.log_entries_replayed = 0
        self._bat_cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        if source.size < HEADER_SECTION_SIZE:
            raise self.corrupt(f"file is {source.size} bytes, too short for the 1 MiB VHDX header section")
        ident = source.read_exact(0, CREATOR_OFFSET + CREATOR_SIZE, "file type identifier", FMT)
        if ident[:8] != SIGNATURE:
            raise self.corrupt("file type identifier signature 'vhdxfile' is missing", 0)
        self.creator = ident[CREATOR_OFFSET:].decode("utf-16-le", "replace").split("\0")[0]
        header = self._current_header()
        self.log_region = self._replay_log(header)
        bat, metadata = self._read_region_table()
        self.bat_region = bat
        self.metadata_region = metadata
        self._read_metadata()
        self._prepare_bat()



    # -- reading the file (through the replayed log) ----------------------------------------------------
    def _read_file(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes of the file at ``offset`` as the replayed log left them."""
        if offset < 0 or length < 0 or offset + length > self.file_size:
            raise self.corrupt(f"{what} at {offset:#x}+{length:#x} lies beyond the end of the file "
                             f"({self.file_size} bytes)")
        if self._overlay is None:
            return self.source.read_exact(offset, length, what, FMT)
        buf = bytearray(length)
        present = min(length, max(0, self.source.size - offset))
        if present:
            got = self.source.readinto(offset, memoryview(buf)[:present])
            if got != present:
                raise self.corrupt(f"{what} is truncated ({got} of {present} bytes)", offset)
        self._overlay.apply(offset, buf)
        return bytes(buf)

    # -- headers (2.2.2) ------------------------------------------------------------------------------
    def _current_header(self) -> _Header:
        valid: list[_Header] = []
        for offset in HEADER_OFFSETS:
            raw = self.source.read_exact(offset, HEADER_SIZE, "header", FMT)
            (signature, checksum, sequence, _file_write, _data_write, log_guid, log_version, version,
             log_length, log_offset) = HEADER.unpack_from(raw)
            if signature != HEADER_SIGNATURE or version != 1 or _crc32c(raw, 4) != checksum:
                continue
            valid.append(_Header(sequence, log_guid, log_version, log_length, log_offset, raw[:HEADER.size]))
        if not valid:
            raise self.corrupt("neither of the two headers is valid (bad signature, version or CRC-32C)",
                             HEADER_OFFSETS[0])
        if len(valid) == 2 and valid[0].sequence == valid[1].sequence and valid[0].raw != valid[1].raw:
            raise self.corrupt(f"both headers carry sequence number {valid[0].sequence} but differ; the "
                             "current one cannot be chosen", HEADER_OFFSETS[0])
        header = max(valid, key=lambda h: h.sequence)  # the first one wins a tie of identical headers
        if header.log_version != 0:
            raise self.unsupported(f"log version {header.log_version} is not supported (only 0)")
        return header

    # -- log replay (2.3) ------------------------------------------------------------------------------
    def _replay_log(self, header: _Header) -> _Region | None:
        """Replay the active log sequence into the overlay; returns the log region, if the file has one."""
        if header.log_length == 0:
            if header.log_guid != ZERO_GUID:
                raise self.corrupt("header names a log (non-zero LogGuid) but the log length is 0")
            return None
        log = _Region(header.log_offset, header.log_length)
        if log.offset % STRUCTURE_ALIGNMENT or log.offset < HEADER_SECTION_SIZE:
            raise self.corrupt(f"log offset {log.offset:#x} is not a multiple of 1 MiB past the header section")
        if log.length % STRUCTURE_ALIGNMENT:
            raise self.corrupt(f"log length {log.length} is not a multiple of 1 MiB")
        if log.end > self.source.size:
            raise self.corrupt(f"log at {log.offset:#x}+{log.length:#x} lies beyond the end of the file "
                             f"({self.source.size} bytes)")
        if header.log_guid == ZERO_GUID:
            return log
        if log.length > MAX_LOG_LENGTH:
            raise self.unsupported(f"log of {log.length} bytes exceeds the {MAX_LOG_LENGTH} byte limit",
                                    hint="replay the log with Hyper-V or 'qemu-img check -r all' first")
        reader = _LogReader(self, log, header.log_guid)
        sequence = reader.active_sequence()
        if not sequence:
            return log
        flushed = sequence[-1].flushed_file_offset
        if flushed > self.source.size:
            raise self.corrupt(f"the log says the file was at least {flushed} bytes long but it is "
                             f"{self.source.size}: the file was truncated")
        overlay = _Overlay()
        file_end = max(self.source.size, sequence[-1].last_file_offset)
        for entry in sequence:
            file_end = max(file_end, reader.replay(entry, overlay))
        if file_end > MAX_FILE_OFFSET:
            raise self.corrupt(f"the log extends the file to {file_end} bytes, which is implausible")
        self._overlay = overlay
        self.file_size = file_end
        self.log_entries_replayed = len(sequence)
        return log

    # -- region table (2.2.3) ---------------------------------------------------------------------------
    def _read_region_table(self) -> tuple[_Region, _Region]:
        table: bytes | None = None
        for offset in REGION_TABLE_OFFSETS:
            raw = self._read_file(offset, REGION_TABLE_SIZE, "region table")
            signature, checksum, count, _ = REGION_TABLE_HEADER.unpack_from(raw)
            if signature == REGION_TABLE_SIGNATURE and _crc32c(raw, 4) == checksum:
                table = raw
                break
        if table is None:
            raise self.corrupt("neither copy of the region table is valid (bad signature or CRC-32C)",
                             REGION_TABLE_OFFSETS[0])
        if count > MAX_TABLE_ENTRIES:
            raise self.corrupt(f"region table has {count} entries, more than {MAX_TABLE_ENTRIES}")
        regions: dict[bytes, _Region] = {}
        placed: list[tuple[str, _Region]] = []
        if self.log_region is not None:
            placed.append(("log", self.log_region))
        for i in range(count):
            guid, offset, length, flags = REGION_TABLE_ENTRY.unpack_from(
                table, REGION_TABLE_HEADER.size + i * REGION_TABLE_ENTRY.size)
            known = {BAT_REGION: "BAT", METADATA_REGION: "metadata"}.get(guid)
            if known is None:
                if flags & REGION_REQUIRED:
                    raise self.unsupported(f"region {_guid_text(guid)} is marked required but is unknown")
                continue
            if guid in regions:
                raise self.corrupt(f"region table lists the {known} region twice")
            region = _Region(offset, length)
            if offset % STRUCTURE_ALIGNMENT or offset < HEADER_SECTION_SIZE or length == 0:
                raise self.corrupt(f"{known} region {offset:#x}+{length:#x} is empty, unaligned or inside the "
                                 "header section")
            if region.end > MAX_FILE_OFFSET:
                raise self.corrupt(f"{known} region {offset:#x}+{length:#x} is implausibly far")
            for name, other in placed:
                if region.offset < other.end and other.offset < region.end:
                    raise self.corrupt(f"{known} region overlaps the {name} region")
            placed.append((known, region))
            regions[guid] = region
        for guid, name in ((BAT_REGION, "BAT"), (METADATA_REGION, "metadata")):
            if guid not in regions:
                raise self.corrupt(f"region table has no {name} region")
        return regions[BAT_REGION], regions[METADATA_REGION]

    # -- metadata (2.6) --------------------------------------------------------------------------------
    def _read_metadata(self) -> None:
        region = self.metadata_region
        if region.length < METADATA_TABLE_SIZE:
            raise self.corrupt(f"metadata region of {region.length} bytes cannot hold its 64 KiB table")
        table = self._read_file(region.offset, METADATA_TABLE_SIZE, "metadata table")
        signature, _, count = METADATA_TABLE_HEADER.unpack_from(table)
        if signature != METADATA_SIGNATURE:
            raise self.corrupt("metadata table signature is missing", region.offset)
        if count > MAX_TABLE_ENTRIES:
            raise self.corrupt(f"metadata table has {count} entries, more than {MAX_TABLE_ENTRIES}",
                             region.offset)
        items: dict[bytes, bytes] = {}
        for i in range(count):
            item_id, offset, length, flags = METADATA_TABLE_ENTRY.unpack_from(
                table, METADATA_TABLE_HEADER.size + i * METADATA_TABLE_ENTRY.size)
            name = METADATA_ITEM_NAMES.get(item_id)
            if name is None:
                if flags & METADATA_IS_REQUIRED:
                    raise self.unsupported(f"metadata item {_guid_text(item_id)} is marked required but is "
                                            "unknown")
                continue
            if item_id in items:
                raise self.corrupt(f"metadata table lists the {name} item twice")
            if length > MAX_METADATA_ITEM or (length and (offset < METADATA_TABLE_SIZE
                                                          or offset + length > region.length)):
                raise self.corrupt(f"{name} metadata item {offset:#x}+{length:#x} lies outside the metadata "
                                 f"region or exceeds {MAX_METADATA_ITEM} bytes")
            if length < METADATA_ITEM_MIN_LENGTH.get(item_id, 0):
                raise self.corrupt(f"{name} metadata item is {length} bytes, too short")
            items[item_id] = self._read_file(region.offset + offset, length, f"{name} metadata item")
        for item_id in METADATA_ITEM_MIN_LENGTH:
            if item_id not in items:
                raise self.corrupt(f"the required {METADATA_ITEM_NAMES[item_id]} metadata item is missing")

        block_size, param_bits = struct.unpack_from("<II", items[FILE_PARAMETERS])
        self.leave_blocks_allocated = bool(param_bits & PARAMS_LEAVE_BLOCKS_ALLOCATED)
        if param_bits & PARAMS_HAS_PARENT:
            raise UnsafeImage(f"is a differencing image whose parent is "
                              f"'{self._parent_name(items.get(PARENT_LOCATOR))}'; diskport does not follow "
                              "external references", path=self.source.name, fmt=FMT,
                              hint="merge it into its parent with Hyper-V or qemu-img first")
        self.logical_sector_size: int = struct.unpack_from("<I", items[LOGICAL_SECTOR_SIZE])[0]
        self.physical_sector_size: int = struct.unpack_from("<I", items[PHYSICAL_SECTOR_SIZE])[0]
        virtual_size: int = struct.unpack_from("<Q", items[VIRTUAL_DISK_SIZE])[0]
        self.virtual_disk_id = _guid_text(items[VIRTUAL_DISK_ID][:16])
        if (block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE
                or block_size & (block_size - 1)):
            raise self.corrupt(f"block size {block_size} is not a power of two from 1 MiB to 256 MiB")
        if self.logical_sector_size not in SECTOR_SIZES:
            raise self.corrupt(f"logical sector size {self.logical_sector_size} is neither 512 nor 4096")
        if self.physical_sector_size not in SECTOR_SIZES:
            raise self.corrupt(f"physical sector size {self.physical_sector_size} is neither 512 nor 4096")
        if virtual_size > MAX_VIRTUAL_SIZE:
            raise self.corrupt(f"virtual disk size {virtual_size} exceeds the 64 TiB maximum")
        if virtual_size % self.logical_sector_size:
            raise self.corrupt(f"virtual disk size {virtual_size} is not a multiple of the logical sector size "
                             f"{self.logical_sector_size}")
        self.block_size = block_size
        self.cluster_size = block_size
        self.virtual_size = virtual_size
        self.chunk_ratio = SECTORS_PER_CHUNK * self.logical_sector_size // block_size

    def _parent_name(self, locator: bytes | None) -> str:
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

    # -- BAT (2.5) -------------------------------------------------------------------------------------
    def _prepare_bat(self) -> None:
        self.payload_blocks = -(-self.virtual_size // self.block_size)
        self.bat_entries = (self.payload_blocks + (self.payload_blocks - 1) // self.chunk_ratio
                            if self.payload_blocks else 0)
        if self.bat_entries * 8 > self.bat_region.length:
            raise self.corrupt(f"BAT region of {self.bat_region.length} bytes cannot hold the "
                             f"{self.bat_entries} entries the virtual size needs")
        if self.bat_region.offset + self.bat_entries * 8 > self.file_size:
            raise self.corrupt(f"BAT at {self.bat_region.offset:#x} ({self.bat_entries} entries) lies beyond the "
                             f"end of the file ({self.file_size} bytes)")
        # File ranges a payload block must not overlap; the header section is excluded by the 1 MiB minimum.
        self._reserved = [(name, r) for name, r in (("log", self.log_region), ("BAT", self.bat_region),
                                                    ("metadata", self.metadata_region)) if r is not None]
        # File ranges that are not plain source bytes: what the log replay wrote or zeroed, and anything
        # past the source's end.
        overlay = self._overlay if self._overlay is not None else _Overlay()
        self._segments = overlay.segments(self.source.size, self.file_size)
        self._segment_starts = np.array([a for a, _, _ in self._segments], dtype=np.int64)
        self._segment_ends = np.array([b for _, b, _ in self._segments], dtype=np.int64)
        self._segment_zero = np.array([z for _, _, z in self._segments], dtype=bool)
        # Decode (and so validate) the whole BAT once, a window at a time, so corruption shows at open, and
        # make sure no two payload blocks share file bytes (a small file must not expand into a huge disk).
        placed: list[np.ndarray] = []
        placed_count = 0
        max_blocks = self.file_size // MiB + 1
        for window in range(-(-self.payload_blocks // BAT_WINDOW_BLOCKS)):
            kinds, hosts = self._bat_window(window)
            first = window * BAT_WINDOW_BLOCKS
            in_file = np.flatnonzero(kinds != _ZERO)
            in_file = in_file[hosts[in_file] != 0]
            placed_count += len(in_file)
            if placed_count > max_blocks:
                raise self.corrupt(f"BAT maps more payload blocks than the {self.file_size} byte file can hold "
                                 "without overlapping")
            placed.append(np.stack([hosts[in_file], self._used_lengths(first, len(kinds))[in_file],
                                    in_file + first]))
        if placed_count > 1:
            table = np.concatenate(placed, axis=1)
            table = table[:, np.argsort(table[0], kind="stable")]
            overlap = np.flatnonzero(table[0, 1:] < table[0, :-1] + table[1, :-1])
            if overlap.size:
                k = int(overlap[0])
                raise self.corrupt(f"payload blocks {int(table[2, k])} and {int(table[2, k + 1])} overlap in the "
                                 f"file at {int(table[0, k + 1]):#x}")

    def _bat_window(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(kind, host offset) for the payload blocks of one window, validated."""
        cached = self._bat_cache.get(window)
        if cached is not None:
            self._bat_cache.move_to_end(window)
            return cached
        first = window * BAT_WINDOW_BLOCKS
        count = min(BAT_WINDOW_BLOCKS, self.payload_blocks - first)
        last = first + count - 1
        bat_first = first + first // self.chunk_ratio
        bat_last = last + last // self.chunk_ratio
        raw = self._read_file(self.bat_region.offset + bat_first * 8, (bat_last - bat_first + 1) * 8, "BAT")
        entries = np.frombuffer(raw, dtype="<u8")
        blocks = np.arange(first, first + count, dtype=np.int64)
        payload = entries[blocks + blocks // self.chunk_ratio - bat_first]
        states = (payload & np.uint64(BAT_STATE_MASK)).astype(np.int8)
        host_mb = (payload >> np.uint64(BAT_OFFSET_SHIFT)).astype(np.int64)  # < 2^44, fits
        kinds = np.full(count, _ZERO, dtype=np.int8)
        present = states == PAYLOAD_FULLY_PRESENT
        kinds[present] = _DATA
        unknown = ~present & ~np.isin(states, ZERO_STATES)
        if np.any(unknown):
            i = int(np.flatnonzero(unknown)[0])
            state = int(states[i])
            at = self.bat_region.offset + 8 * (first + i + (first + i) // self.chunk_ratio)
            if state == PAYLOAD_PARTIALLY_PRESENT:
                raise self.corrupt(f"payload block {first + i} is PARTIALLY_PRESENT, a state only differencing "
                                 "images may use", at)
            raise self.corrupt(f"payload block {first + i} has the reserved state {state}", at)
        if np.any(present):
            self._check_block_hosts(first, count, host_mb, present)
        hosts = np.where(present, host_mb, 0) << BAT_OFFSET_SHIFT  # checked above: no overflow
        if np.any(present):
            # Blocks the log replay touched (or that lie past the source's end) are read through the overlay,
            # or are zeros when a zero range covers all of them.
            used = self._used_lengths(first, count)
            idx = np.searchsorted(self._segment_ends, hosts, side="right")
            near = present & (idx < len(self._segments))
            rows = np.flatnonzero(near)
            seg = idx[rows]
            touched = self._segment_starts[seg] < hosts[rows] + used[rows]
            covered = (touched & self._segment_zero[seg] & (self._segment_starts[seg] <= hosts[rows])
                       & (self._segment_ends[seg] >= hosts[rows] + used[rows]))
            kinds[rows[touched]] = _OVERLAID
            kinds[rows[covered]] = _ZERO
        result = (kinds, hosts)
        self._bat_cache[window] = result
        if len(self._bat_cache) > _BAT_CACHE_WINDOWS:
            self._bat_cache.popitem(last=False)
        return result

    def _used_lengths(self, first: int, count: int) -> np.ndarray:
        """Bytes of each block the virtual disk uses (the last block may be cut short)."""
        used = np.full(count, self.block_size, dtype=np.int64)
        if first + count == self.payload_blocks:
            used[-1] = self.virtual_size - (self.payload_blocks - 1) * self.block_size
        return used

    def _check_block_hosts(self, first: int, count: int, host_mb: np.ndarray, present: np.ndarray) -> None:
        """FULLY_PRESENT blocks must lie past the header section, inside the file, clear of the log, BAT and
        metadata regions. Compared in MiB units so nothing overflows."""
        bad_reason: list[tuple[np.ndarray, str]] = []
        last_used = self.virtual_size - (self.payload_blocks - 1) * self.block_size
        used = self._used_lengths(first, count)
        limit_mb = np.where(used == self.block_size,
                            (self.file_size - self.block_size) // MiB if self.file_size >= self.block_size else -1,
                            (self.file_size - last_used) // MiB if self.file_size >= last_used else -1)
        bad_reason.append((present & (host_mb < HEADER_SECTION_SIZE // MiB), "inside the header section"))
        bad_reason.append((present & (host_mb > limit_mb), f"past the end of the file ({self.file_size} bytes)"))
        for name, region in self._reserved:
            # block [h, h+used) meets [start, end) when h < end and h + used > start
            end_mb = -(-region.end // MiB)
            after_start_mb = np.floor_divide(region.offset - used, MiB)
            hit = present & (host_mb < end_mb) & (host_mb > after_start_mb)
            bad_reason.append((hit, f"overlapping the {name} region"))
        for bad, reason in bad_reason:
            if np.any(bad):
                i = int(np.flatnonzero(bad)[0])
                at = self.bat_region.offset + 8 * (first + i + (first + i) // self.chunk_ratio)
                raise self.corrupt(f"BAT maps payload block {first + i} to {int(host_mb[i]) * MiB:#x}, "
                                 f"{reason}", at)

    # -- mapping ----------------------------------------------------------------------------------------
    def _guest_runs(self, start: int, stop: int) -> Iterator[Extent]:
        """Uncoalesced extents over ``[start, stop)``: runs of blocks, and pieces of overlaid blocks."""
        bs = self.block_size
        block = start // bs
        last_block = (stop - 1) // bs
        while block <= last_block:
            window = block // BAT_WINDOW_BLOCKS
            base = window * BAT_WINDOW_BLOCKS
            kinds, hosts = self._bat_window(window)
            lo = block - base
            hi = min(last_block + 1 - base, len(kinds))
            for kind, b0, b1, host in self._runs(kinds[lo:hi], hosts[lo:hi]):
                run_start = (base + lo + b0) * bs
                g0 = max(run_start, start)
                g1 = min((base + lo + b1) * bs, stop)
                if kind == _DATA:
                    yield Extent(g0, g1 - g0, False, host + (g0 - run_start))
                elif kind == _ZERO:
                    yield Extent(g0, g1 - g0, True, None)
                else:
                    for b in range(base + lo + b0, base + lo + b1):
                        block_host = int(hosts[b - base])
                        used = min(bs, self.virtual_size - b * bs)
                        for piece in self._overlaid_block(b * bs, block_host, used):
                            g0, g1 = max(piece.start, start), min(piece.end, stop)
                            if g0 < g1:
                                host_at = None if piece.host is None else piece.host + (g0 - piece.start)
                                yield Extent(g0, g1 - g0, piece.zero, host_at)
            block = base + hi

    def _overlaid_block(self, guest: int, host: int, used: int) -> Iterator[Extent]:
        """A block the log replay touched, split into source bytes (host set), zeros and replayed sectors."""
        pos = host
        end = host + used
        i = int(np.searchsorted(self._segment_ends, host, side="right"))
        while pos < end:
            if i < len(self._segments) and self._segments[i][0] <= pos:
                _, seg_end, is_zero = self._segments[i]
                piece_end = min(seg_end, end)
                yield Extent(guest + pos - host, piece_end - pos, is_zero, None)
                i += 1
            else:
                piece_end = min(self._segments[i][0], end) if i < len(self._segments) else end
                yield Extent(guest + pos - host, piece_end - pos, False, pos)
            pos = piece_end

    def _runs(self, kinds: np.ndarray, hosts: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
        """(kind, first, end, host of first) for runs of blocks of one kind, DATA runs contiguous in the file."""
        for s, e in split_runs(kinds, hosts, self.block_size):
            yield int(kinds[s]), s, e, int(hosts[s])

    def read_mapped(self, ext: Extent, buf: memoryview) -> None:
        """Blocks whose bytes the log replay changed: read them through the overlay."""
        bs = self.block_size
        pos = ext.start
        while pos < ext.end:
            block = pos // bs
            kinds, hosts = self._bat_window(block // BAT_WINDOW_BLOCKS)
            i = block % BAT_WINDOW_BLOCKS
            take = min(ext.end, (block + 1) * bs) - pos
            out = buf[pos - ext.start: pos - ext.start + take]
            if kinds[i] == _ZERO:
                out[:] = bytes(take)
            else:
                out[:] = self._read_file(int(hosts[i]) + pos - block * bs, take, "payload block")
            pos += take

    # -- facts ------------------------------------------------------------------------------------------
    def format_specific(self) -> dict[str, Any]:
        return {
            "vhdx-type": "fixed" if self.leave_blocks_allocated else "dynamic",
            "block-size": self.block_size,
            "logical-sector-size": self.logical_sector_size,
            "physical-sector-size": self.physical_sector_size,
            "virtual-disk-id": self.virtual_disk_id,
            "log": {"replayed": self.log_entries_replayed > 0, "entries": self.log_entries_replayed},
            "creator": self.creator,
        }


class _LogReader:
    """Finds the active sequence of a circular log (2.3.3) and replays its entries into an overlay."""

    def __init__(self, image: VhdxImage, region: _Region, log_guid: bytes) -> None:
        self.image = image
        self.source = image.source
        self.region = region
        self.log_guid = log_guid
        # Entries in a sane log do not overlap, so checksumming reads about the log once; stale or hostile
        # headers claiming long, overlapping entries must not turn the search quadratic.
        self.checksum_budget = 8 * region.length + 64 * MiB

    def _read(self, position: int, length: int) -> bytes:
        """``length`` log bytes from ``position``, wrapping at the end of the circular log."""
        position %= self.region.length
        first = min(length, self.region.length - position)
        data = self.source.read_exact(self.region.offset + position, first, "log", FMT)
        if first < length:
            data += self.source.read_exact(self.region.offset, length - first, "log", FMT)
        return data

    def _candidates(self) -> list[int]:
        """Log positions whose sector starts like an entry header for this log."""
        found: list[int] = []
        signature = np.frombuffer(LOG_ENTRY_SIGNATURE, dtype=np.uint8)
        guid = np.frombuffer(self.log_guid, dtype=np.uint8)
        for chunk_at in range(0, self.region.length, _LOG_READ_CHUNK):
            size = min(_LOG_READ_CHUNK, self.region.length - chunk_at)
            sectors = np.frombuffer(self._read(chunk_at, size), dtype=np.uint8).reshape(-1, LOG_SECTOR)
            match = np.all(sectors[:, 0:4] == signature, axis=1) & np.all(sectors[:, 32:48] == guid, axis=1)
            found.extend((chunk_at + LOG_SECTOR * np.flatnonzero(match)).tolist())
        return found

    def _descriptors(self, position: int, count: int) -> tuple[np.ndarray, bytes]:
        raw = self._read(position + LOG_ENTRY_HEADER.size, count * DESCRIPTOR_SIZE)
        return np.frombuffer(raw, dtype=DESCRIPTOR_DTYPE), raw

    @staticmethod
    def _descriptor_sectors(count: int) -> int:
        """Sectors holding the entry header and ``count`` descriptors (2.3.1: 64 + 32 * count bytes)."""
        return -(-(LOG_ENTRY_HEADER.size + DESCRIPTOR_SIZE * count) // LOG_SECTOR)

    def _entry(self, position: int) -> _LogEntry | None:
        """The entry at ``position`` if it is valid (2.3.1), else None."""
        (signature, checksum, length, tail, sequence, count, _, guid, flushed,
         last) = LOG_ENTRY_HEADER.unpack(self._read(position, LOG_ENTRY_HEADER.size))
        if (signature != LOG_ENTRY_SIGNATURE or guid != self.log_guid or sequence == 0
                or length % LOG_SECTOR or not LOG_SECTOR <= length <= self.region.length
                or tail % LOG_SECTOR or tail >= self.region.length):
            return None
        desc_sectors = self._descriptor_sectors(count)
        if desc_sectors * LOG_SECTOR > length:
            return None
        if count > MAX_DESCRIPTORS_PER_ENTRY:
            raise UnsupportedImage(f"log entry at {position:#x} has {count} descriptors, more than the "
                                   f"{MAX_DESCRIPTORS_PER_ENTRY} diskport replays", path=self.source.name,
                                   fmt=FMT)
        descriptors, _ = self._descriptors(position, count)
        is_data = descriptors["signature"] == DATA_DESCRIPTOR_SIGNATURE
        is_zero = descriptors["signature"] == ZERO_DESCRIPTOR_SIGNATURE
        if not np.all((is_data | is_zero)
                      & (descriptors["sequence"] == sequence)
                      & (descriptors["file_offset"] % LOG_SECTOR == 0)
                      & (~is_zero | (descriptors["leading_or_length"] % LOG_SECTOR == 0))):
            return None
        data_sectors = int(np.count_nonzero(is_data))
        if (desc_sectors + data_sectors) * LOG_SECTOR > length:
            return None
        # The checksum covers the whole entry with its checksum field zero; data sectors carry the
        # entry's sequence number split in two halves (2.3.1.4).
        self.checksum_budget -= length
        if self.checksum_budget < 0:
            raise UnsupportedImage("the log holds too many overlapping entries to search", path=self.source.name,
                                   fmt=FMT, hint="replay the log with Hyper-V or 'qemu-img check -r all' first")
        crc = 0
        high = np.uint32(sequence >> 32)
        low = np.uint32(sequence & 0xFFFFFFFF)
        for done in range(0, length, _LOG_READ_CHUNK):
            chunk = self._read(position + done, min(_LOG_READ_CHUNK, length - done))
            if done == 0:
                chunk = chunk[:4] + bytes(4) + chunk[8:]
            crc = google_crc32c.extend(crc, chunk)
            first_sector = done // LOG_SECTOR
            lo = max(desc_sectors - first_sector, 0)
            hi = min(desc_sectors + data_sectors - first_sector, len(chunk) // LOG_SECTOR)
            if lo < hi:
                sectors = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, LOG_SECTOR)[lo:hi]
                words = np.ascontiguousarray(sectors[:, [*range(0, 8), *range(4092, 4096)]]).view("<u4")
                if not (np.all(words[:, 0] == int.from_bytes(DATA_SECTOR_SIGNATURE, "little"))
                        and np.all(words[:, 1] == high) and np.all(words[:, 2] == low)):
                    return None
        if crc != checksum:
            return None
        return _LogEntry(position, length, sequence, tail, count, flushed, last)

    def active_sequence(self) -> list[_LogEntry]:
        """The entries of the active sequence, tail first; empty when the log holds none (2.3.3)."""
        entries: dict[int, _LogEntry] = {}
        for position in self._candidates():
            entry = self._entry(position)
            if entry is not None:
                entries[position] = entry
        log_length = self.region.length
        successor: dict[int, int] = {}
        for position, entry in entries.items():
            after = (position + entry.length) % log_length
            follower = entries.get(after)
            if follower is not None and follower.sequence == entry.sequence + 1:
                successor[position] = after
        # A sequence runs as far as valid entries follow one another; its last entry is its head. Try heads
        # from the highest sequence number down: the first whose Tail lies in its own sequence is active.
        heads = [e for e in entries.values() if e.position not in successor]
        budget = 4 * len(entries) + 64
        for head in sorted(heads, key=lambda e: e.sequence, reverse=True):
            tail = entries.get(head.tail)
            if tail is None or tail.sequence > head.sequence:
                continue
            chain = [tail]
            position = tail.position
            while position != head.position and len(chain) <= head.sequence - tail.sequence:
                budget -= 1
                if budget < 0:
                    raise UnsupportedImage("the log holds too many overlapping sequences to find the active "
                                           "one", path=self.source.name, fmt=FMT)
                next_position = successor.get(position)
                if next_position is None:
                    break
                position = next_position
                chain.append(entries[position])
            if position == head.position:
                return chain
        return []

    def replay(self, entry: _LogEntry, overlay: _Overlay) -> int:
        """Apply one entry's descriptors to the overlay; returns the file end its writes reach."""
        descriptors, raw = self._descriptors(entry.position, entry.descriptor_count)
        data_position = entry.position + self._descriptor_sectors(entry.descriptor_count) * LOG_SECTOR
        reach = 0
        for i, descriptor in enumerate(descriptors):
            target = int(descriptor["file_offset"])
            if descriptor["signature"] == DATA_DESCRIPTOR_SIGNATURE:
                sector = self._read(data_position, LOG_SECTOR)
                data_position += LOG_SECTOR
                at = i * DESCRIPTOR_SIZE
                # The descriptor keeps the sector's first 8 and last 4 bytes (2.3.1.3, 2.3.1.4).
                overlay.write_sector(target, raw[at + 8: at + 16] + sector[8:4092] + raw[at + 4: at + 8])
                end = target + LOG_SECTOR
                if len(overlay.sectors) * LOG_SECTOR > MAX_OVERLAY_BYTES:
                    raise UnsupportedImage(f"replaying the log needs more than {MAX_OVERLAY_BYTES // MiB} MiB "
                                           "of memory", path=self.source.name, fmt=FMT,
                                           hint="replay the log with Hyper-V or 'qemu-img check -r all' first")
            else:
                end = target + int(descriptor["leading_or_length"])
                if end > MAX_FILE_OFFSET:
                    raise CorruptImage(f"log zeroes up to file offset {end}, which is implausible",
                                       path=self.source.name, fmt=FMT)
                overlay.write_zeros(target, end)
                if len(overlay.zero_starts) > MAX_ZERO_RANGES:
                    raise UnsupportedImage(f"replaying the log needs more than {MAX_ZERO_RANGES} zero ranges",
                                           path=self.source.name, fmt=FMT)
            reach = max(reach, end)
        return reach


def open_vhdx(source: Source) -> VhdxImage:
    return VhdxImage(source)
