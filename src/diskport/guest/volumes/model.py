"""The partition model every volume reader fills in: :class:`Partition` and :class:`PartitionTable`.

Kept apart from :mod:`~diskport.guest.volumes` so the MBR and GPT readers can build them without importing the
package that imports them. ``as_dict()`` gives the JSON-able form the facts layer and ``--json`` output use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diskport.guest.view import GuestView

#: MBR partition ids of extended partitions (containers of the EBR chain).
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})


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

    @property
    def extended(self) -> bool:
        """An MBR extended partition: a container of logical partitions, not a volume."""
        return self.type.startswith("0x") and int(self.type, 16) in EXTENDED_TYPES

    def as_dict(self, sector_size: int) -> dict[str, object]:
        return {"number": self.number, "start": self.start, "size": self.size,
                "start_sector": self.start // sector_size, "sectors": self.size // sector_size,
                "type": self.type, "type_name": self.type_name, "name": self.name, "uuid": self.uuid,
                "active": self.active, "attributes": self.attributes, "logical": self.logical,
                "extended": self.extended}


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
    #: Bytes of the disk the table was read from.
    disk_size: int = 0
    #: GPT only: which header the partitions come from, "primary" or "backup" (the primary was damaged).
    gpt_header: Literal["primary", "backup"] | None = None
    #: MBR disk signature (bytes 440-443), as 8 hex digits; None without an MBR.
    disk_signature: str | None = None
    #: Hybrid MBR only: the real (non-0xEE) entries of the MBR, which BIOS boot code sees instead of the GPT.
    mbr_partitions: list[Partition] = field(default_factory=list)

    def boot_code_kind(self) -> str | None:
        """What the MBR boot code is: "zero", "grub", "windows", "syslinux", "other"; None without a sector 0."""
        from diskport.guest.volumes.mbr import boot_code_kind

        return None if self.boot_code is None else boot_code_kind(self.boot_code)

    def as_dict(self) -> dict[str, object]:
        return {"scheme": self.scheme, "sector_size": self.sector_size, "disk_size": self.disk_size,
                "disk_guid": self.disk_guid, "disk_signature": self.disk_signature,
                "gpt_header": self.gpt_header, "protective_mbr": self.protective_mbr,
                "hybrid_mbr": self.hybrid_mbr, "boot_code": self.boot_code_kind(),
                "partitions": [p.as_dict(self.sector_size) for p in self.partitions],
                "mbr_partitions": [p.as_dict(self.sector_size) for p in self.mbr_partitions],
                "notes": list(self.notes)}
