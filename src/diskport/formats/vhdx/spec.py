"""VHDX on-disk layout ([MS-VHDX] v20160714): constants, GUIDs and the fixed structures, each unpacked once
into a named dataclass. A leaf: it imports nothing else of diskport's but the two names the package face
defines for its probe (which must not import this module: its dataclasses cost a few milliseconds)."""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from diskport.formats.vhdx import FMT as FMT  # re-exported: every module here takes them from spec
from diskport.formats.vhdx import SIGNATURE as SIGNATURE

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


def guid(text: str) -> bytes:
    """A GUID as stored on disk (first three fields little-endian, 2.2.2)."""
    return uuid.UUID(text).bytes_le


BAT_REGION = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")  # "page 83 data"
LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
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
BAT_CACHE_WINDOWS = 4

# -- log (2.3) --------------------------------------------------------------------------------------------
LOG_SECTOR = 4 * KiB
LOG_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
LOG_ENTRY_SIGNATURE = b"loge"
DATA_DESCRIPTOR_SIGNATURE = b"desc"
ZERO_DESCRIPTOR_SIGNATURE = b"zero"
DATA_SECTOR_SIGNATURE = b"data"
DESCRIPTOR_SIZE = 32
#: A log descriptor's fields, as a numpy structured dtype's (name, type) list (the log reader builds the dtype).
DESCRIPTOR_FIELDS = [("signature", "S4"), ("trailing", "<u4"), ("leading_or_length", "<u8"),
                     ("file_offset", "<u8"), ("sequence", "<u8")]
MAX_LOG_LENGTH = 1 * GiB
MAX_DESCRIPTORS_PER_ENTRY = 1 << 20
MAX_OVERLAY_BYTES = 64 * MiB
MAX_ZERO_RANGES = 65536
#: No structure, replayed or not, may claim to lie beyond this file offset.
MAX_FILE_OFFSET = 1 << 52
LOG_READ_CHUNK = 4 * MiB

ZERO_GUID = bytes(16)


def crc32c(data: bytes, checksum_at: int) -> int:
    """CRC-32C of ``data`` with its 4-byte checksum field at ``checksum_at`` taken as zero (2.2.2.1)."""
    import google_crc32c  # the checksums are computed when an image opens, not when this module loads

    return int(google_crc32c.value(data[:checksum_at] + bytes(4) + data[checksum_at + 4:]))


def guid_text(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


@dataclass(frozen=True)
class Header:
    """One of the two headers (2.2.2); ``valid`` when its signature, version and CRC-32C are right."""

    sequence: int
    log_guid: bytes
    log_version: int
    log_length: int
    log_offset: int
    valid: bool
    raw: bytes  # the structure's bytes, to tell two headers of one sequence number apart

    @classmethod
    def unpack(cls, block: bytes) -> Header:
        """The header in ``block``, the 4 KiB its checksum covers."""
        (signature, checksum, sequence, _file_write, _data_write, log_guid, log_version, version,
         log_length, log_offset) = HEADER.unpack_from(block)
        valid = signature == HEADER_SIGNATURE and version == 1 and crc32c(block, 4) == checksum
        return cls(sequence, log_guid, log_version, log_length, log_offset, valid, block[:HEADER.size])


@dataclass(frozen=True)
class Region:
    """A file range named by the region table or a header (offset and length in bytes)."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class TableEntry:
    """An entry of the region table (2.2.3.2) or of the metadata table (2.6.1.2): a GUID, where, and flags."""

    guid: bytes
    offset: int
    length: int
    flags: int

    @classmethod
    def region(cls, table: bytes, index: int) -> TableEntry:
        guid, offset, length, flags = REGION_TABLE_ENTRY.unpack_from(
            table, REGION_TABLE_HEADER.size + index * REGION_TABLE_ENTRY.size)
        return cls(guid, offset, length, flags)

    @classmethod
    def metadata(cls, table: bytes, index: int) -> TableEntry:
        guid, offset, length, flags = METADATA_TABLE_ENTRY.unpack_from(
            table, METADATA_TABLE_HEADER.size + index * METADATA_TABLE_ENTRY.size)
        return cls(guid, offset, length, flags)


@dataclass(frozen=True)
class LogEntryHeader:
    """The 64-byte header of a log entry (2.3.1.1)."""

    signature: bytes
    checksum: int
    length: int
    tail: int
    sequence: int
    descriptor_count: int
    log_guid: bytes
    flushed_file_offset: int
    last_file_offset: int

    @classmethod
    def unpack(cls, raw: bytes) -> LogEntryHeader:
        (signature, checksum, length, tail, sequence, count, _, guid, flushed,
         last) = LOG_ENTRY_HEADER.unpack(raw)
        return cls(signature, checksum, length, tail, sequence, count, guid, flushed, last)
