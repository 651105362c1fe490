"""Volumes of a guest disk: partition tables (MBR with its EBR chain, GPT) and, later, logical volumes.

:func:`read_volumes` returns a :class:`PartitionTable` whose partitions are slices of the disk's
:class:`~diskport.guest.view.GuestView`; what the tables say that matters for booting (boot code, protective or
hybrid MBR, a damaged primary GPT) is reported beside them, never silently repaired.

How a disk's scheme is chosen (the rules Linux's ``block/partitions/`` and UEFI firmware follow, section 5.2.3 of
the UEFI specification for the protective MBR):

* an MBR whose entries are sane (status 0x00/0x80) and that holds a 0xEE entry announces a GPT: the GPT is read
  (primary, else backup with a note); the MBR is *protective* when 0xEE is its only entry, *hybrid* when it also
  lists real partitions (those are kept in ``mbr_partitions``). If neither GPT header is valid the disk is
  refused (:class:`~diskport.errors.CorruptImage`): its table cannot be trusted either way;
* a sane MBR without 0xEE is an MBR disk, even when a GPT header is also present (noted): that is what Linux and
  firmware use. A sector 0 that is also a filesystem's boot sector (FAT, NTFS, exFAT all end in ``55 AA``) is a
  table only if its entries are non-empty and lie inside the disk without overlapping;
* no MBR (no signature, or a status byte other than 0x00/0x80): a valid GPT is still used (noted), else the disk
  has no table (``scheme="none"``: a bare filesystem, or nothing known) and no partitions are invented.
"""

from __future__ import annotations

import heapq

from diskport.errors import CorruptImage
from diskport.guest.view import GuestView
from diskport.guest.volumes import gpt, mbr
from diskport.guest.volumes.model import Partition, PartitionTable

#: Overlapping pairs named one by one in the notes; more are counted.
MAX_OVERLAP_NOTES = 16


def read_volumes(view: GuestView, *, sector_size: int | None = None) -> PartitionTable:
    """The partition table of a disk. ``sector_size`` forces the logical sector size (found from the GPT
    otherwise; an MBR disk is read with 512-byte sectors unless told)."""
    if sector_size is not None and sector_size not in gpt.SECTOR_SIZES:
        raise ValueError(f"sector size {sector_size} is not one of {gpt.SECTOR_SIZES}")
    sector0 = view.pread(0, mbr.SECTOR)
    if len(sector0) < mbr.SECTOR:
        return PartitionTable("none", sector_size or mbr.SECTOR, [], boot_code=None, disk_size=view.size,
                              notes=["the disk is smaller than one sector"])
    table = PartitionTable("none", sector_size or mbr.SECTOR, [], boot_code=sector0[:mbr.BOOT_CODE],
                           disk_size=view.size)
    signed = mbr.has_signature(sector0)
    entries = mbr.parse_entries(sector0) if signed else []
    insane = mbr.sane_table(entries) if signed else "no 55AA signature"
    if insane is None:
        table.disk_signature = sector0[440:444][::-1].hex()
    protective = [e for e in entries if e.type == mbr.GPT_PROTECTIVE and not e.empty] if insane is None else []
    sizes = (sector_size,) if sector_size else gpt.SECTOR_SIZES
    gpt_notes: list[str] = []
    found = gpt.read_gpt(view, gpt_notes, expected=bool(protective), sector_sizes=sizes)

    if protective:
        if found is None:
            detail = "; ".join(gpt_notes) or "no GPT header at LBA 1 or at the last LBA"
            raise CorruptImage(f"the MBR announces a GPT (0xEE) but no valid GPT header was found: {detail}",
                               path=view.name, fmt="gpt")
        _use_gpt(view, table, found, gpt_notes)
        others = [e for e in entries if not e.empty and e.type != mbr.GPT_PROTECTIVE]
        table.hybrid_mbr = bool(others)
        table.protective_mbr = not others
        ss = found.sector_size
        disk_sectors = view.size // ss
        pmbr = protective[0]
        if table.protective_mbr and (pmbr.lba != 1 or pmbr.sectors != min(disk_sectors - 1, 0xFFFFFFFF)):
            table.notes.append(f"the protective MBR entry covers sectors {pmbr.lba}+{pmbr.sectors}, not the "
                               f"whole disk (1+{min(disk_sectors - 1, 0xFFFFFFFF)})")
        if others:
            table.notes.append("hybrid MBR: BIOS boot code sees MBR partitions "
                               + ", ".join(str(e.slot + 1) for e in others) + " instead of the GPT")
            table.mbr_partitions = mbr.primary_partitions(view, others, ss, table.notes)
        return table

    if insane is None:
        problems = mbr.layout_problems(entries, view.size // table.sector_size)
        used = [e for e in entries if not e.empty]
        if mbr.looks_like_boot_sector(sector0) and (problems or not used):
            table.notes.append("no partition table: sector 0 is a filesystem's boot sector")
            return table
        if found is not None:
            table.notes.append(f"a valid {found.which} GPT is present but the MBR has no 0xEE entry: the MBR is "
                               "used, as Linux and UEFI firmware do")
        else:
            table.notes.extend(gpt_notes)
        table.scheme = "mbr"
        table.partitions = mbr.primary_partitions(view, entries, table.sector_size, table.notes)
        _check_layout(table)
        return table

    if found is not None:
        _use_gpt(view, table, found, gpt_notes)
        table.notes.append(f"the disk has no protective MBR ({insane}); the GPT is used anyway")
        return table
    table.notes.extend(gpt_notes)
    if signed and not mbr.looks_like_boot_sector(sector0):
        table.notes.append(f"sector 0 ends in 55AA but is not a partition table: {insane}")
    return table


def _use_gpt(view: GuestView, table: PartitionTable, found: gpt.GptResult, gpt_notes: list[str]) -> None:
    table.scheme = "gpt"
    table.sector_size = found.sector_size
    table.disk_guid = found.header.disk_guid
    table.gpt_header = "primary" if found.which == "primary" else "backup"
    table.partitions = found.partitions
    table.notes.extend(gpt_notes)
    gpt.check_backup(view, found, table.notes)
    _check_layout(table)


def _check_layout(table: PartitionTable) -> None:
    """Note partitions that run past the disk and pairs that overlap (a logical inside its extended is fine)."""
    for part in table.partitions:
        if part.start + part.size > table.disk_size:
            table.notes.append(f"partition {part.number} ({part.start}+{part.size} bytes) runs past the end of "
                               f"the disk ({table.disk_size} bytes)")
    ordered = sorted(table.partitions, key=lambda p: (p.start, p.number))
    pairs: list[tuple[int, int]] = []
    extra = 0
    live: list[tuple[int, int, Partition]] = []  # a heap of (end, number, partition) still open at this start
    for part in ordered:
        while live and live[0][0] <= part.start:
            heapq.heappop(live)
        if len(pairs) >= MAX_OVERLAP_NOTES:
            extra += len(live)  # counted without walking them: a hostile GPT may overlap 16384 entries
        else:
            for _, _, other in live:
                if (other.extended and part.logical) or (part.extended and other.logical):
                    continue
                if len(pairs) < MAX_OVERLAP_NOTES:
                    pairs.append((min(other.number, part.number), max(other.number, part.number)))
                else:
                    extra += 1
        if part.size:
            heapq.heappush(live, (part.start + part.size, part.number, part))
    for a, b in pairs:
        table.notes.append(f"partitions {a} and {b} overlap")
    if extra:
        table.notes.append(f"{extra} more overlapping pairs")


__all__ = ["Partition", "PartitionTable", "read_volumes"]
