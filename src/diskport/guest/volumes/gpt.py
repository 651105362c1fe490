"""The GUID Partition Table: primary and backup headers, CRC32 checks, the entry array.

Implements the UEFI specification 2.10 section 5.3 ("GUID Partition Table (GPT) Disk Layout"): the header at
LBA 1 (signature ``EFI PART``, header CRC32 over ``HeaderSize`` bytes with its own CRC field zeroed, ``MyLBA``,
``AlternateLBA``, usable range, disk GUID, ``PartitionEntryLBA``, ``NumberOfPartitionEntries``,
``SizeOfPartitionEntry``, and the CRC32 of the entry array), and the backup header at the disk's last LBA
with its own array before it. Section 5.3.2's validity rules are applied to each header: signature, header CRC,
``MyLBA`` equal to where it was read, and here also bounds that keep a hostile header cheap (entry size a
multiple of 8 and at least 128 bytes, at most :data:`MAX_ENTRIES` entries and :data:`MAX_ARRAY` bytes of
array, inside the disk). When the primary fails, the backup is used (from the primary's ``AlternateLBA`` when
that header is intact, else the last LBA) and a note says so. Partitions span ``StartingLBA..EndingLBA``
inclusive. The logical sector size is found by looking for the header at LBA 1 of 512- and of 4096-byte sectors.

Written here because no Python library checked both CRCs or fell back to the backup, and one reported every
partition a sector short (it read the ending LBA as exclusive).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from diskport.guest.view import GuestView
from diskport.guest.volumes.model import Partition

SIGNATURE = b"EFI PART"
HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # 92 bytes
ENTRY = struct.Struct("<16s16sQQQ72s")          # 128 bytes
MAX_ENTRIES = 16384
MAX_ARRAY = 4 * 1024 * 1024
SECTOR_SIZES = (512, 4096)

#: Names of the common partition type GUIDs (the UEFI specification, the Discoverable Partitions
#: Specification of the UAPI group, Microsoft's and Apple's documentation).
GPT_TYPES: dict[str, str] = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "024dee41-33e7-11d3-9d69-0008c781f39f": "MBR partition scheme",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery environment",
    "5808c8aa-7e8f-42e0-85d2-e1e90434cfb3": "Windows LDM metadata",
    "af9b60a0-1431-4f62-bc68-3311714a69ad": "Windows LDM data",
    "e75caf8f-f680-4cee-afa3-b001e56efc2d": "Windows Storage Spaces",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "44479540-f297-41b2-9af7-d131d5f0458a": "Linux root (x86)",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "69dad710-2ce4-4e3c-b16c-21a1d49abed3": "Linux root (ARM)",
    "b921b045-1df0-41c3-af44-4c6f280d3fae": "Linux root (ARM64)",
    "8484680c-9521-48c6-9c11-b0720656f69e": "Linux /usr (x86-64)",
    "b0e01050-ee5f-4390-949a-9101b17104e9": "Linux /usr (ARM64)",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot (XBOOTLDR)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
    "3b8f8425-20e0-4f3b-907f-1a25a76f98e8": "Linux server data",
    "4d21b016-b534-45c2-a9fb-5c16e091fd2d": "Linux variable data",
    "7ec6f557-3bc5-4aca-b293-16ef5df639d1": "Linux temporary data",
    "ca7d7ccb-63ed-4c53-861c-1742536059cc": "Linux LUKS",
    "7ffec5c9-2d00-49b7-8941-3ea10a5586b7": "Linux dm-crypt",
    "8da63339-0007-60c0-c436-083ac8230908": "Linux reserved",
    "9e1a2d38-c612-4316-aa26-8b49521e5a8b": "PowerPC PReP boot",
    "d3bfe2de-3daf-11df-ba40-e3a556d89593": "Intel Rapid Start",
    "48465300-0000-11aa-aa11-00306543ecac": "Apple HFS/HFS+",
    "7c3457ef-0000-11aa-aa11-00306543ecac": "Apple APFS",
    "6a898cc3-1dd2-11b2-99a6-080020736631": "Solaris /usr or Apple ZFS",
    "516e7cb6-6ecf-11d6-8ff8-00022d09712b": "FreeBSD UFS",
}


@dataclass(frozen=True)
class GptHeader:
    lba: int                # where it was read
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: str
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int


@dataclass
class GptResult:
    sector_size: int
    header: GptHeader
    which: str              # "primary" or "backup"
    partitions: list[Partition]


def guid(raw: bytes) -> str:
    """A GUID stored in the mixed-endian layout of the UEFI specification (Appendix A), in lower case."""
    return str(uuid.UUID(bytes_le=bytes(raw)))


def type_name(type_guid: str) -> str | None:
    return GPT_TYPES.get(type_guid)


def parse_header(raw: bytes, lba: int, sector_size: int, disk_sectors: int) -> GptHeader | str:
    """The header read at ``lba``, or why it is not a valid one (section 5.3.2's checks plus bounds)."""
    if len(raw) < HEADER.size or raw[:8] != SIGNATURE:
        return "no EFI PART signature"
    (_, revision, header_size, header_crc, _, my_lba, alternate, first_usable, last_usable, disk_guid,
     entries_lba, count, entry_size, entries_crc) = HEADER.unpack_from(raw)
    if not HEADER.size <= header_size <= sector_size:
        return f"header size {header_size} is outside {HEADER.size}..{sector_size}"
    body = bytearray(raw[:header_size])
    body[16:20] = b"\0\0\0\0"
    if zlib.crc32(body) != header_crc:
        return "header CRC32 mismatch"
    if revision >> 16 != 1:
        return f"revision {revision:#010x} is not 1.x"
    if my_lba != lba:
        return f"MyLBA is {my_lba}, but the header was read at LBA {lba}"
    if entry_size < ENTRY.size or entry_size % 8:
        return f"entry size {entry_size} is not a multiple of 8 of at least {ENTRY.size}"
    if count > MAX_ENTRIES or count * entry_size > MAX_ARRAY:
        return f"{count} entries of {entry_size} bytes exceed the limit ({MAX_ENTRIES} entries, {MAX_ARRAY} bytes)"
    array_sectors = -(-count * entry_size // sector_size)
    if entries_lba <= 1 or entries_lba + array_sectors > disk_sectors:
        return f"the entry array at LBA {entries_lba} ({array_sectors} sectors) lies outside the disk"
    if first_usable > last_usable + 1:
        return f"first usable LBA {first_usable} is after last usable LBA {last_usable}"
    return GptHeader(lba, alternate, first_usable, last_usable, guid(disk_guid), entries_lba, count, entry_size,
                     entries_crc)


def read_header(view: GuestView, lba: int, sector_size: int) -> GptHeader | str:
    disk_sectors = view.size // sector_size
    if not 0 < lba < disk_sectors:
        return f"LBA {lba} lies outside the disk ({disk_sectors} sectors)"
    return parse_header(view.pread(lba * sector_size, sector_size), lba, sector_size, disk_sectors)


def read_entries(view: GuestView, header: GptHeader, sector_size: int) -> bytes | str:
    """The entry array if its CRC32 matches, else why not."""
    length = header.entry_count * header.entry_size
    data = view.pread(header.entries_lba * sector_size, length)
    if len(data) != length:
        return "the entry array is truncated"
    if zlib.crc32(data) != header.entries_crc:
        return "entry array CRC32 mismatch"
    return data


def partitions(view: GuestView, header: GptHeader, array: bytes, sector_size: int,
               notes: list[str]) -> list[Partition]:
    found = []
    for index in range(header.entry_count):
        at = index * header.entry_size
        type_raw, unique, first, last, attributes, name_raw = ENTRY.unpack_from(array, at)
        if not type_raw.strip(b"\0"):
            continue
        number = index + 1
        if first > last:
            notes.append(f"GPT entry {number} ends (LBA {last}) before it starts (LBA {first}); ignored")
            continue
        if first < header.first_usable or last > header.last_usable:
            notes.append(f"partition {number} (LBA {first}..{last}) lies outside the usable range "
                         f"{header.first_usable}..{header.last_usable}")
        name = name_raw.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        type_guid = guid(type_raw)
        start, size = first * sector_size, (last - first + 1) * sector_size
        found.append(Partition(number=number, start=start, size=size, type=type_guid, type_name=type_name(type_guid),
                               view=view.slice(min(start, view.size), size, name=f"{view.name} partition {number}"),
                               name=name or None, uuid=guid(unique), attributes=attributes))
    return found


def read_gpt(view: GuestView, notes: list[str], *, expected: bool,
             sector_sizes: tuple[int, ...] = SECTOR_SIZES) -> GptResult | None:
    """The GPT of the disk (primary, else backup with a note), or None when no valid header is found.

    The backup is looked for when the primary carries the signature or a GPT is ``expected`` (a protective MBR
    says so); otherwise a disk without a GPT costs no read at its end. Problems of headers that carry the
    signature are added to ``notes`` whether or not a table is found.
    """
    problems: list[str] = []
    for sector_size in sector_sizes:
        if view.size < 3 * sector_size:
            continue
        primary = read_header(view, 1, sector_size)
        signed = view.pread(sector_size, 8) == SIGNATURE
        if isinstance(primary, GptHeader):
            array = read_entries(view, primary, sector_size)
            if isinstance(array, bytes):
                notes.extend(problems)
                return GptResult(sector_size, primary, "primary", partitions(view, primary, array, sector_size,
                                                                                 notes))
            problems.append(f"primary GPT ({sector_size}-byte sectors): {array}")
        elif signed:
            problems.append(f"primary GPT header ({sector_size}-byte sectors): {primary}")
        if not (signed or expected):
            continue
        disk_sectors = view.size // sector_size
        candidates = [disk_sectors - 1]
        if isinstance(primary, GptHeader) and primary.alternate_lba != disk_sectors - 1:
            candidates.insert(0, primary.alternate_lba)
        for lba in candidates:
            backup = read_header(view, lba, sector_size)
            if isinstance(backup, GptHeader):
                array = read_entries(view, backup, sector_size)
                if isinstance(array, bytes):
                    notes.extend(problems)
                    notes.append(f"the primary GPT is damaged; the partitions come from the backup GPT at LBA {lba}")
                    return GptResult(sector_size, backup, "backup", partitions(view, backup, array, sector_size,
                                                                                   notes))
                problems.append(f"backup GPT at LBA {lba} ({sector_size}-byte sectors): {array}")
            elif 0 < lba < disk_sectors and view.pread(lba * sector_size, 8) == SIGNATURE:
                problems.append(f"backup GPT header at LBA {lba} ({sector_size}-byte sectors): {backup}")
            elif signed:
                problems.append(f"no backup GPT header at LBA {lba} ({sector_size}-byte sectors)")
    notes.extend(problems)
    return None


def check_backup(view: GuestView, result: GptResult, notes: list[str]) -> None:
    """When the primary is used, say whether its backup is missing or damaged (it is what a repair needs)."""
    if result.which != "primary":
        return
    ss = result.sector_size
    backup = read_header(view, result.header.alternate_lba, ss)
    if isinstance(backup, str):
        notes.append(f"the backup GPT header at LBA {result.header.alternate_lba} is not valid: {backup}")
        return
    array = read_entries(view, backup, ss)
    if isinstance(array, str):
        notes.append(f"the backup GPT at LBA {backup.lba}: {array}")
