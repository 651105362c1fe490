"""Volumes of a guest disk: partition tables (MBR with its EBR chain, GPT) and, later, logical volumes.

:func:`read_volumes` returns a :class:`PartitionTable` whose partitions are slices of the disk's
:class:`~diskport.guest.view.GuestView`; what the tables say that matters for booting (boot code, protective or
hybrid MBR, a damaged primary GPT) is reported beside them, never silently repaired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diskport.guest.view import GuestView


@dataclass
class Partition:
    number: int                    # 1-4 primary, 5... logical (Linux's numbering); GPT entry index + 1
    start: int                     # bytes from the start of the disk
    size: int                      # bytes
    type: str                      # GPT type GUID (lower case) or MBR id as "0x83"
    type_name: str | None          # "EFI System", "Linux filesystem", "Microsoft basic data", "BIOS boot", ...
    view: GuestView
    name: str | None = None        # GPT partition name
    uuid: str | None = None        # GPT unique partition GUID
    active: bool = False           # MBR boot flag
    attributes: int = 0            # GPT attribute bits
    logical: bool = False          # inside an MBR extended partition


@dataclass
class PartitionTable:
    scheme: Literal["gpt", "mbr", "none"]
    sector_size: int
    partitions: list[Partition]
    #: The first 440 bytes of sector 0 (MBR boot code area), None when the disk is smaller than a sector.
    boot_code: bytes | None = None
    disk_guid: str | None = None
    protective_mbr: bool = False   # GPT with the standard 0xEE protective entry
    hybrid_mbr: bool = False       # GPT whose MBR also lists real partitions
    #: What was found wrong or unusual, in words (a damaged primary GPT read from its backup, entries that
    #: overlap or run past the disk, an extended partition loop cut short).
    notes: list[str] = field(default_factory=list)
