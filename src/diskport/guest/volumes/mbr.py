"""The MBR partition table: four primary entries, the EBR chain of logical partitions, and the boot code.

Layout (the IBM PC/AT convention, as documented in the UEFI specification 2.10 section 5.2.1 "Legacy MBR" and
in Linux's ``block/partitions/msdos.c``): 440 bytes of boot code, a 4-byte disk signature at 440, four 16-byte
entries at 446 (status, CHS start, type, CHS end, LBA start, sector count, little-endian), ``55 AA`` at 510. An
extended partition (ids 0x05, 0x0F, 0x85) holds a chain of extended boot records: each EBR's first data entry is
a logical partition (its start relative to that EBR), its extended entry points at the next EBR (relative to the
start of the outermost extended partition). Logical partitions are numbered 5, 6, ... in chain order, as Linux
does. CHS fields are ignored: LBA fields are what every current system uses.

Written here because the Python libraries tried either do not check the entries at all (a FAT or NTFS boot
sector also ends in ``55 AA`` and turns into invented partitions) or follow the EBR chain without a bound.
Here a sector 0 is a partition table only when every entry's status is 0x00 or 0x80 and, if it also looks like
a filesystem's boot sector, when its entries lie inside the disk without overlapping. The EBR chain is followed
for at most :data:`MAX_EBRS` links, a revisited EBR ends it, and every problem becomes a note.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from diskport.guest.view import GuestView
from diskport.guest.volumes.model import EXTENDED_TYPES, Partition

SECTOR = 512
BOOT_CODE = 440
ENTRIES_AT = 446
SIGNATURE = b"\x55\xaa"
GPT_PROTECTIVE = 0xEE
#: EBRs followed in one chain (Linux stops at 256 partitions per disk, DISK_MAX_PARTS).
MAX_EBRS = 256
#: Logical partitions kept from one disk.
MAX_LOGICAL = 256

#: Names of the common MBR partition ids (util-linux's list, shortened where it is long).
MBR_TYPES: dict[int, str] = {
    0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16", 0x07: "HPFS/NTFS/exFAT",
    0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)", 0x0E: "W95 FAT16 (LBA)", 0x0F: "W95 Ext'd (LBA)",
    0x11: "Hidden FAT12", 0x12: "Compaq diagnostics", 0x14: "Hidden FAT16 <32M", 0x16: "Hidden FAT16",
    0x17: "Hidden HPFS/NTFS", 0x1B: "Hidden W95 FAT32", 0x1C: "Hidden W95 FAT32 (LBA)",
    0x1E: "Hidden W95 FAT16 (LBA)", 0x27: "Hidden NTFS WinRE", 0x42: "SFS (Windows dynamic disk)",
    0x82: "Linux swap / Solaris", 0x83: "Linux", 0x84: "OS/2 hidden or Intel hibernation", 0x85: "Linux extended",
    0x86: "NTFS volume set", 0x87: "NTFS volume set", 0x8E: "Linux LVM", 0xA5: "FreeBSD", 0xA6: "OpenBSD",
    0xA8: "Darwin UFS", 0xA9: "NetBSD", 0xAF: "HFS / HFS+", 0xBF: "Solaris", 0xDA: "Non-FS data",
    0xDE: "Dell Utility", 0xEA: "Linux extended boot", 0xEE: "GPT", 0xEF: "EFI (FAT-12/16/32)",
    0xFB: "VMware VMFS", 0xFC: "VMware VMKCORE", 0xFD: "Linux raid autodetect",
}


@dataclass(frozen=True)
class MbrEntry:
    """One 16-byte entry as written (LBA fields in sectors of the disk's logical sector size)."""

    slot: int      # 0..3
    status: int
    type: int
    lba: int
    sectors: int

    @property
    def empty(self) -> bool:
        return self.type == 0 or self.sectors == 0


def has_signature(sector: bytes) -> bool:
    return len(sector) >= SECTOR and sector[510:512] == SIGNATURE


def parse_entries(sector: bytes) -> list[MbrEntry]:
    """The four entries of an MBR or EBR sector (at least 512 bytes)."""
    entries = []
    for slot in range(4):
        status, ptype, lba, sectors = struct.unpack_from("<B3xB3xII", sector, ENTRIES_AT + 16 * slot)
        entries.append(MbrEntry(slot, status, ptype, lba, sectors))
    return entries


def type_name(ptype: int) -> str | None:
    return MBR_TYPES.get(ptype)


def type_id(ptype: int) -> str:
    return f"0x{ptype:02x}"


def looks_like_boot_sector(sector: bytes) -> bool:
    """Whether sector 0 is a filesystem's boot sector (FAT, NTFS, exFAT, HPFS): an x86 jump then a BPB."""
    if len(sector) < SECTOR:
        return False
    jump = (sector[0] == 0xEB and sector[2] == 0x90) or sector[0] == 0xE9
    if not jump:
        return False
    if sector[3:11] in (b"NTFS    ", b"EXFAT   ") or sector[3:11].startswith(b"-FVE-FS-"):
        return True
    bytes_per_sector = int.from_bytes(sector[11:13], "little")
    sectors_per_cluster = sector[13]
    reserved = int.from_bytes(sector[14:16], "little")
    fats = sector[16]
    return (bytes_per_sector in (512, 1024, 2048, 4096) and sectors_per_cluster in (1, 2, 4, 8, 16, 32, 64, 128)
            and reserved >= 1 and fats in (1, 2))


def sane_table(entries: list[MbrEntry]) -> str | None:
    """Why the four entries cannot be a partition table (a status byte other than 0x00/0x80), else None."""
    for entry in entries:
        if entry.status not in (0x00, 0x80):
            return f"entry {entry.slot + 1} has status {entry.status:#04x} (a table has 0x00 or 0x80)"
    return None


def layout_problems(entries: list[MbrEntry], disk_sectors: int) -> list[str]:
    """Primary entries that run past the disk or overlap each other."""
    problems = []
    used = [e for e in entries if not e.empty]
    for entry in used:
        if entry.lba + entry.sectors > disk_sectors:
            problems.append(f"partition {entry.slot + 1} (sectors {entry.lba}+{entry.sectors}) runs past the end "
                            f"of the disk ({disk_sectors} sectors)")
    for i, a in enumerate(used):
        for b in used[i + 1:]:
            if a.lba < b.lba + b.sectors and b.lba < a.lba + a.sectors:
                problems.append(f"partitions {a.slot + 1} and {b.slot + 1} overlap")
    return problems


def make_partition(view: GuestView, number: int, lba: int, sectors: int, ptype: int, sector_size: int, *,
                   active: bool = False, logical: bool = False) -> Partition:
    start, size = lba * sector_size, sectors * sector_size
    at = min(start, view.size)
    return Partition(number=number, start=start, size=size, type=type_id(ptype), type_name=type_name(ptype),
                     view=view.slice(at, size, name=f"{view.name} partition {number}"), active=active,
                     logical=logical)


def primary_partitions(view: GuestView, entries: list[MbrEntry], sector_size: int,
                       notes: list[str]) -> list[Partition]:
    """The primary partitions, each extended one followed by its logical partitions (numbered from 5)."""
    disk_sectors = view.size // sector_size
    parts: list[Partition] = []
    logical: list[Partition] = []
    for entry in entries:
        if entry.empty:
            continue
        if entry.lba == 0:
            notes.append(f"partition {entry.slot + 1} starts at sector 0, over the partition table itself "
                         "(an isohybrid layout)")
        parts.append(make_partition(view, entry.slot + 1, entry.lba, entry.sectors, entry.type, sector_size,
                                    active=entry.status == 0x80))
        if entry.type in EXTENDED_TYPES:
            logical += logical_partitions(view, entry, sector_size, disk_sectors, 5 + len(logical), notes)
    return parts + logical


def logical_partitions(view: GuestView, extended: MbrEntry, sector_size: int, disk_sectors: int, first: int,
                       notes: list[str]) -> list[Partition]:
    """Follow the EBR chain of one extended partition: bounded, loops cut, every problem noted."""
    base, limit = extended.lba, extended.lba + extended.sectors
    found: list[Partition] = []
    seen: set[int] = set()
    ebr = base
    for _ in range(MAX_EBRS):
        if ebr in seen:
            notes.append(f"the EBR chain loops back to sector {ebr}; cut there")
            return found
        seen.add(ebr)
        if not base <= ebr < min(limit, disk_sectors):
            notes.append(f"an EBR at sector {ebr} lies outside the extended partition or the disk; chain cut")
            return found
        sector = view.pread(ebr * sector_size, SECTOR)
        if not has_signature(sector):
            if ebr != base:
                notes.append(f"the EBR at sector {ebr} has no 55AA signature; chain cut")
            return found
        entries = parse_entries(sector)
        following: MbrEntry | None = None
        for entry in entries:
            if entry.empty:
                continue
            if entry.type in EXTENDED_TYPES:
                following = following or entry
                continue
            if len(found) >= MAX_LOGICAL:
                notes.append(f"more than {MAX_LOGICAL} logical partitions; the rest are ignored")
                return found
            number = first + len(found)
            start = ebr + entry.lba
            if start + entry.sectors > limit:
                notes.append(f"logical partition {number} (sectors {start}+{entry.sectors}) runs past its "
                             f"extended partition (ends at sector {limit})")
            found.append(make_partition(view, number, start, entry.sectors, entry.type, sector_size,
                                        active=entry.status == 0x80, logical=True))
        if following is None:
            return found
        ebr = base + following.lba
    notes.append(f"the EBR chain is longer than {MAX_EBRS} links; cut there")
    return found


def boot_code_kind(code: bytes) -> str:
    """What sits in the MBR's boot code area (its first 440 bytes), by markers that survive versions:

    * ``zero``: all bytes zero (nothing boots from it under BIOS);
    * ``grub``: GRUB's boot.img (and GRUB legacy's stage1) keep their messages together as
      ``"GRUB \\0Geom\\0Hard Disk\\0Read\\0 Error"``; the ``GRUB \\0Geom\\0`` run is the marker;
    * ``syslinux``: mbr.bin, altmbr.bin and gptmbr.bin all carry "Multiple active partitions" or
      "Operating system load error" or "Missing OS" plus "Disk error" (gptmbr), strings Windows does not use;
    * ``windows``: Windows Vista and later measure the boot into the TPM (``TCPA`` as an immediate, the same in
      every language edition); older and English editions carry "Invalid partition table" and
      "Missing operating system" (without syslinux's trailing period);
    * ``other``: anything else non-zero.
    """
    code = bytes(code[:BOOT_CODE])
    if not code.strip(b"\x00"):
        return "zero"
    if b"GRUB \x00Geom\x00" in code:
        return "grub"
    if (b"Multiple active partitions" in code or b"Operating system load error" in code
            or (b"Missing OS" in code and b"Disk error" in code)):
        return "syslinux"
    if b"TCPA" in code or (b"Invalid partition table" in code and b"Missing operating system" in code):
        return "windows"
    return "other"
