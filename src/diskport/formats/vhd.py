"""VHD reader: fixed and dynamic disks (Microsoft "Virtual Hard Disk Image Format Specification", 2006).

Layout (all fields big-endian):

* **Hard disk footer** (spec "Hard Disk Footer Format"), 512 bytes at the end of every VHD. A fixed disk is the
  guest bytes followed by the footer. A dynamic disk keeps a copy of the footer at offset 0 too (spec
  "Implementing a Dynamic Disk", which lists the file layout: footer copy, header, BAT, blocks, footer). The footer's
  checksum is the one's complement of the byte sum of the footer with the checksum field zeroed; a mismatch is a
  :class:`CorruptImage`. When a dynamic disk's footer at the end is damaged or missing and the copy at offset 0
  is good, the copy is used and ``format-specific`` says so; when both are good but disagree about the layout,
  the image is refused rather than one of them guessed.
* **Dynamic disk header** (spec "Dynamic Disk Header Format"), 1024 bytes at the footer's ``data_offset``:
  cookie ``cxsparse``, the Block Allocation Table offset, ``max_table_entries``, the block size and the parent's
  name and UUID for differencing disks, with its own checksum.
* **Block Allocation Table** (spec "Block Allocation Table and Data Blocks"): one uint32 per block, the sector
  number of the block in the file; ``0xFFFFFFFF`` means unallocated (reads as zeros). A block is a sector
  bitmap (one bit per 512-byte sector, most significant bit first, padded to a 512-byte boundary) followed by
  the block's data. A sector whose bit is clear has no data in this file; in a dynamic (non-differencing) disk
  it reads as zeros.

Differencing disks (disk type 4, spec "Implementing a Differencing Hard Disk") need their parent and are refused with
:class:`UnsafeImage` naming it; diskport never follows external references.

**Virtual size rule.** The footer stores the size twice: as ``current_size`` and as a CHS geometry
(cylinders x heads x sectors-per-track x 512). Tools disagree on which one is the disk size, so the rule follows
the tool named in the footer's creator application field:

1. If the geometry is the maximum 65535/16/255, the size is ``current_size`` (the geometry cannot express the
   size; qemu writes this geometry with ``force_size=on``, Hyper-V for large disks).
2. Otherwise, if the creator is Virtual PC (``"vpc "``) or qemu without ``force_size`` (``"qemu"``), the size is
   the CHS product: these tools size the disk by its geometry.
3. Otherwise (Hyper-V ``"win "``, qemu with ``force_size=on`` ``"qem2"``, Disk2vhd ``"d2v "``, XenServer
   ``"tap\\0"``, XenConverter ``"CTXS"``, Azure ``"wa\\0\\0"``, VirtualBox ``"vbox"`` and any other creator),
   the size is ``current_size``.

``current_size`` is rounded down to whole sectors, as qemu does. This is exactly the rule of qemu 10.0 and later
(``vpc_ignore_current_size`` in ``block/vpc.c``). qemu before 10.0 (7.2 is what the tests run against) used the
CHS product for every creator *except* ``win ``, ``qem2``, ``d2v ``, ``CTXS`` and ``tap\\0``; so for images
whose creator is none of those nor ``vpc ``/``qemu`` (Azure, VirtualBox, other tools) older qemu-img reports the
CHS size, usually a little smaller, and diskport reports ``current_size``, which is what those tools meant.
Every image qemu-img itself creates gets the same size from both. diskport has no override of the rule.

Other differences from qemu-img, all on images qemu-img does not make:

* qemu ignores the sector bitmaps when reading (it reads a block's data whatever its bits say); diskport follows
  the specification and reads sectors whose bit is clear as zeros. Images made by qemu (which sets every bit of
  a block it allocates) or by tools that zero-fill new blocks read the same either way.
* qemu reads a dynamic disk through the footer copy at offset 0 only; diskport trusts the footer at the end (the
  specification's primary copy), falls back to the copy when the end one is damaged, and refuses the image when
  both are intact but disagree.
* qemu refuses any disk over 2040 GiB; diskport accepts larger fixed disks (their data is the file itself) and
  bounds dynamic disks by :data:`MAX_BAT_BYTES` instead.

**Safety.** The Block Allocation Table is bounded by what the virtual size needs (at most one sector of
entries more than ``current_size`` or the virtual size requires) and by :data:`MAX_BAT_BYTES`; only the entries
the virtual size needs are read. The block size must be a power of two from 512 bytes to 256 MiB. Every
allocated block (bitmap and data) must lie inside the file, and so must every table. Malformed input raises
:class:`~diskport.errors.DiskportError` subclasses only.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diskport.errors import CorruptImage, UnsafeImage, UnsupportedImage
from diskport.formats.base import DiskImage, Extent, file_runs, uint_table
from diskport.runs import split_runs
from diskport.sources.base import Source

if TYPE_CHECKING:
    from array import array

FMT = "vpc"
COOKIE = b"conectix"
DYNAMIC_COOKIE = b"cxsparse"

SECTOR = 512
FOOTER_SIZE = 512
DYNAMIC_HEADER_SIZE = 1024
FOOTER_CHECKSUM_AT = 64
DYNAMIC_CHECKSUM_AT = 36

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
DISK_TYPE_NAMES = {0: "none", 1: "reserved (deprecated)", DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic",
                   DISK_DIFFERENCING: "differencing"}

#: Geometry meaning "the size does not fit in CHS; use current_size" (spec Appendix "CHS Calculation").
CHS_MAX = (65535, 16, 255)
#: Creators that size the disk by its CHS geometry (see the module docstring).
CHS_CREATORS = (b"vpc ", b"qemu")

BAT_UNALLOCATED = 0xFFFFFFFF
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 256 * 1024 * 1024
#: Largest BAT diskport decodes: 8 Mi entries, 16 TiB of guest space with the usual 2 MiB blocks.
MAX_BAT_BYTES = 32 * 1024 * 1024
#: Entries per BAT sector: a table padded to its last sector is still sized by the disk.
_BAT_ENTRIES_PER_SECTOR = SECTOR // 4
#: Blocks whose BAT entries are decoded per step of a dynamic disk's extent walk.
_BLOCKS_PER_STEP = 4096

SIZE_RULE_CHS = "chs-geometry"
SIZE_RULE_CURRENT = "current-size"
SIZE_RULE_CHS_MAX = "current-size (geometry is the 65535/16/255 maximum)"

_FOOTER_STRUCT = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_DYNAMIC_STRUCT = struct.Struct(">8sQQIIII16sII512s")


def probe(head: bytes, source: Source) -> int:
    if head[:8] == COOKIE:
        return 100  # dynamic/differencing: footer copy at offset 0
    if source.size >= 512 + 512 and source.pread(source.size - 512, 8) == COOKIE:
        return 90  # fixed: footer at the end only
    return 0


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def vhd_checksum(raw: bytes, checksum_at: int) -> int:
    """One's complement of the byte sum of ``raw`` with the 4-byte checksum field at ``checksum_at`` zeroed."""
    total = sum(raw) - sum(raw[checksum_at: checksum_at + 4])
    return ~total & 0xFFFFFFFF


def printable(field: bytes) -> str:
    """A 4-byte creator field as text, with non-printable bytes escaped (``tap\\x00``)."""
    return "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in field)


@dataclass(frozen=True)
class Footer:
    """The fields of a hard disk footer (spec "Hard Disk Footer Format")."""

    features: int
    format_version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    stored_checksum: int
    unique_id: bytes
    saved_state: int
    computed_checksum: int

    @classmethod
    def parse(cls, raw: bytes) -> Footer | None:
        """The footer in ``raw``, or None if ``raw`` does not start with the cookie."""
        if len(raw) < FOOTER_SIZE or raw[:8] != COOKIE:
            return None
        (_cookie, features, format_version, data_offset, timestamp, creator_app, creator_version, creator_os,
         original_size, current_size, cylinders, heads, sectors, disk_type, checksum, unique_id,
         saved_state) = _FOOTER_STRUCT.unpack_from(raw, 0)
        return cls(features, format_version, data_offset, timestamp, creator_app, creator_version, creator_os,
                   original_size, current_size, cylinders, heads, sectors, disk_type, checksum, unique_id,
                   saved_state, vhd_checksum(raw[:FOOTER_SIZE], FOOTER_CHECKSUM_AT))

    @property
    def checksum_ok(self) -> bool:
        return self.stored_checksum == self.computed_checksum

    @property
    def geometry(self) -> tuple[int, int, int]:
        return self.cylinders, self.heads, self.sectors_per_track

    @property
    def chs_size(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track * SECTOR

    def layout(self) -> tuple[int, int, int, tuple[int, int, int], bytes]:
        """The fields that decide how the disk is read; a footer and its copy must agree on them."""
        return self.disk_type, self.data_offset, self.current_size, self.geometry, self.creator_app

    def size_and_rule(self) -> tuple[int, str]:
        """The virtual size and the name of the rule that chose it (see the module docstring)."""
        current = self.current_size // SECTOR * SECTOR
        if self.geometry == CHS_MAX:
            return current, SIZE_RULE_CHS_MAX
        if self.creator_app in CHS_CREATORS:
            return self.chs_size, SIZE_RULE_CHS
        return current, SIZE_RULE_CURRENT


@dataclass(frozen=True)
class DynamicHeader:
    """The fields of a dynamic disk header (spec "Dynamic Disk Header Format") that a reader needs."""

    table_offset: int
    header_version: int
    max_table_entries: int
    block_size: int
    parent_unique_id: bytes
    parent_name: str


class VhdImage(DiskImage):
    format = FMT

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.footer, self.footer_location = self._find_footer()
        self.virtual_size, self.size_rule = self.footer.size_and_rule()
        self.dynamic: DynamicHeader | None = None
        self.block_size = 0
        self.bitmap_size = 0
        self._bat: array[int] = uint_table(b"", "I", "big")
        if self.footer.disk_type == DISK_FIXED:
            self._check_fixed()
        else:
            self._open_dynamic()


    # -- footer -----------------------------------------------------------------------------------------
    def _find_footer(self) -> tuple[Footer, str]:
        """The footer to trust and where it was found (spec "Hard Disk Footer Format")."""
        src = self.source
        if src.size < FOOTER_SIZE:
            raise self.corrupt(f"file is {src.size} bytes, too short for a VHD footer")
        end_at = src.size - FOOTER_SIZE
        end = Footer.parse(src.pread(end_at, FOOTER_SIZE))
        copy = Footer.parse(src.pread(0, FOOTER_SIZE)) if end_at > 0 else None
        if end is not None and end.checksum_ok:
            self._check_footer(end)
            if end.disk_type == DISK_FIXED:
                return end, "end"
            if copy is None:
                return end, "end (the copy at offset 0 is missing)"
            if not copy.checksum_ok:
                return end, "end (the copy at offset 0 has a bad checksum)"
            if copy.layout() != end.layout():
                raise self.corrupt("the footer at the end and its copy at offset 0 disagree about the disk "
                                 "layout (type, size, geometry, creator or header offset)")
            return end, "end"
        if copy is not None and copy.checksum_ok and copy.disk_type != DISK_FIXED:
            self._check_footer(copy)
            damage = "is missing" if end is None else "has a bad checksum"
            return copy, f"copy at offset 0 (the footer at the end {damage})"
        if end is not None:
            raise self.corrupt(f"footer checksum mismatch (stored {end.stored_checksum:#010x}, computed "
                             f"{end.computed_checksum:#010x})", end_at + FOOTER_CHECKSUM_AT)
        if copy is not None and not copy.checksum_ok:
            raise self.corrupt(f"footer copy checksum mismatch (stored {copy.stored_checksum:#010x}, computed "
                             f"{copy.computed_checksum:#010x}) and there is no footer at the end",
                             FOOTER_CHECKSUM_AT)
        if copy is not None:
            raise self.corrupt("the footer copy at offset 0 describes a fixed disk, which has no copy, and "
                             "there is no footer at the end")
        raise self.corrupt("no VHD footer (cookie 'conectix') at the end of the file")

    def _check_footer(self, footer: Footer) -> None:
        if footer.format_version >> 16 != 1:
            raise UnsupportedImage(f"footer format version {footer.format_version >> 16}."
                                   f"{footer.format_version & 0xFFFF} is not supported (only 1.x)",
                                   path=self.source.name, fmt=FMT)
        if footer.disk_type not in (DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING):
            name = DISK_TYPE_NAMES.get(footer.disk_type, "unknown")
            raise UnsupportedImage(f"disk type {footer.disk_type} ({name}) is not supported; only fixed and "
                                   "dynamic disks are read", path=self.source.name, fmt=FMT)

    def _check_fixed(self) -> None:
        data_end = self.source.size - FOOTER_SIZE
        if self.virtual_size > data_end:
            raise self.corrupt(f"fixed disk of {self.virtual_size} bytes ({self.size_rule}) holds only "
                             f"{data_end} bytes of data before its footer: the file is truncated")

    # -- dynamic header and BAT -------------------------------------------------------------------------
    def _read_dynamic_header(self) -> DynamicHeader:
        src = self.source
        at = self.footer.data_offset
        if at + DYNAMIC_HEADER_SIZE > src.size:
            raise self.corrupt(f"dynamic disk header offset {at:#x} lies beyond the end of the file "
                             f"({src.size} bytes)", 16)
        raw = src.read_exact(at, DYNAMIC_HEADER_SIZE, "dynamic disk header", FMT)
        (cookie, _next, table_offset, header_version, max_entries, block_size, checksum, parent_id,
         _parent_time, _reserved, parent_name_raw) = _DYNAMIC_STRUCT.unpack_from(raw, 0)
        if cookie != DYNAMIC_COOKIE:
            raise self.corrupt(f"no dynamic disk header (cookie 'cxsparse') at {at:#x}", at)
        computed = vhd_checksum(raw, DYNAMIC_CHECKSUM_AT)
        if checksum != computed:
            raise self.corrupt(f"dynamic disk header checksum mismatch (stored {checksum:#010x}, computed "
                             f"{computed:#010x})", at + DYNAMIC_CHECKSUM_AT)
        if header_version >> 16 != 1:
            raise UnsupportedImage(f"dynamic disk header version {header_version >> 16}."
                                   f"{header_version & 0xFFFF} is not supported (only 1.x)",
                                   path=src.name, fmt=FMT)
        parent_name = parent_name_raw.decode("utf-16-be", "replace").split("\0", 1)[0]
        return DynamicHeader(table_offset, header_version, max_entries, block_size, parent_id, parent_name)

    def _open_dynamic(self) -> None:
        src = self.source
        header = self._read_dynamic_header()
        self.dynamic = header
        if self.footer.disk_type == DISK_DIFFERENCING:
            name = header.parent_name or "(unnamed)"
            raise UnsafeImage(f"is a differencing disk whose parent is '{name}' "
                              f"(parent UUID {uuid.UUID(bytes=header.parent_unique_id)}); "
                              "diskport does not follow external references", path=src.name, fmt=FMT,
                              hint="merge it into its parent with the tool that made it and convert the result")
        bs = header.block_size
        if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise self.corrupt(f"block size {bs} is not a power of two from {MIN_BLOCK_SIZE} bytes to "
                             f"{MAX_BLOCK_SIZE >> 20} MiB", self.footer.data_offset + 32)
        self.block_size = self.cluster_size = bs
        sectors_per_block = bs // SECTOR
        self.bitmap_size = round_up(ceil_div(sectors_per_block, 8), SECTOR)

        needed = ceil_div(self.virtual_size, bs)
        declared_size = max(self.virtual_size, self.footer.current_size // SECTOR * SECTOR)
        allowed = round_up(ceil_div(declared_size, bs), _BAT_ENTRIES_PER_SECTOR)
        entries = header.max_table_entries
        if entries < needed:
            raise self.corrupt(f"Block Allocation Table has {entries} entries; the virtual size "
                             f"{self.virtual_size} needs {needed}", self.footer.data_offset + 28)
        if entries > allowed:
            raise self.corrupt(f"Block Allocation Table has {entries} entries, more than the {allowed} that "
                             f"a disk of {declared_size} bytes can use", self.footer.data_offset + 28)
        if needed * 4 > MAX_BAT_BYTES:
            raise UnsupportedImage(f"Block Allocation Table of {needed * 4} bytes exceeds the {MAX_BAT_BYTES} "
                                   "byte limit", path=src.name, fmt=FMT)
        table_at = header.table_offset
        if table_at + entries * 4 > src.size:
            raise self.corrupt(f"Block Allocation Table at {table_at:#x} ({entries} entries) runs past the end "
                             f"of the file ({src.size} bytes)", self.footer.data_offset + 16)
        raw = src.read_exact(table_at, needed * 4, "Block Allocation Table", FMT)
        bat = uint_table(raw, "I", "big")
        span = self.bitmap_size + bs  # the furthest allocated block (max at C speed, no numpy) must fit the file
        furthest = max(filter(BAT_UNALLOCATED.__ne__, bat), default=-1)
        if furthest >= 0 and furthest * SECTOR + span > src.size:
            i = next(i for i, e in enumerate(bat) if e != BAT_UNALLOCATED and e * SECTOR + span > src.size)
            raise self.corrupt(f"BAT entry {i} puts block {i} at {int(bat[i]) * SECTOR:#x}, and its "
                             f"{self.bitmap_size + bs} bytes (bitmap and data) run past the end of the file "
                             f"({src.size} bytes)", table_at + 4 * i)
        self._bat = bat
        self._full_bitmap = b"\xff" * (sectors_per_block // 8)

    # -- mapping ----------------------------------------------------------------------------------------
    def _guest_runs(self, start: int, stop: int) -> Iterator[Extent]:
        if self.footer.disk_type == DISK_FIXED:  # guest bytes are the file's bytes
            return file_runs(self.source, start, stop)
        return self._dynamic_runs(start, stop)

    def _dynamic_runs(self, start: int, stop: int) -> Iterator[Extent]:
        import numpy as np

        bs = self.block_size
        first = start // bs
        last = ceil_div(stop, bs)
        bat = np.frombuffer(self._bat, dtype=np.uint32)
        for step_first in range(first, last, _BLOCKS_PER_STEP):
            step_last = min(step_first + _BLOCKS_PER_STEP, last)
            entries = bat[step_first:step_last]
            zero_from = step_first
            for i in np.flatnonzero(entries != np.uint32(BAT_UNALLOCATED)).tolist():
                block = step_first + i
                if block > zero_from:
                    lo, hi = max(zero_from * bs, start), min(block * bs, stop)
                    yield Extent(lo, hi - lo, True, None)
                yield from self._block_runs(block, int(entries[i]), start, stop)
                zero_from = block + 1
            if zero_from < step_last:
                lo, hi = max(zero_from * bs, start), min(step_last * bs, stop)
                yield Extent(lo, hi - lo, True, None)

    def _block_runs(self, block: int, entry: int, start: int, stop: int) -> Iterator[Extent]:
        """Runs of one allocated block inside ``[start, stop)``, split where its sector bitmap changes."""
        bs = self.block_size
        base = block * bs
        lo, hi = max(base, start), min(base + bs, stop)
        bitmap_at = entry * SECTOR
        data_at = bitmap_at + self.bitmap_size
        bitmap = self.source.read_exact(bitmap_at, self.bitmap_size, f"sector bitmap of block {block}", FMT)
        if self._full_bitmap and bitmap.startswith(self._full_bitmap):
            yield Extent(lo, hi - lo, False, data_at + (lo - base))
            return
        import numpy as np

        first_sector = (lo - base) // SECTOR
        last_sector = ceil_div(hi - base, SECTOR)
        present = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8),
                                count=bs // SECTOR)[first_sector:last_sector].astype(bool)
        for s, e in split_runs(present):
            g0 = max(base + (first_sector + s) * SECTOR, lo)
            g1 = min(base + (first_sector + e) * SECTOR, hi)
            if present[s]:
                yield Extent(g0, g1 - g0, False, data_at + (g0 - base))
            else:
                yield Extent(g0, g1 - g0, True, None)

    # -- facts ------------------------------------------------------------------------------------------
    def format_specific(self) -> dict[str, Any]:
        f = self.footer
        facts: dict[str, Any] = {
            "vhd-type": DISK_TYPE_NAMES.get(f.disk_type, str(f.disk_type)),
            "creator-application": printable(f.creator_app),
            "creator-version": f"{f.creator_version >> 16}.{f.creator_version & 0xFFFF}",
            "creator-os": printable(f.creator_os),
            "geometry": {"cylinders": f.cylinders, "heads": f.heads, "sectors": f.sectors_per_track},
            "current-size": f.current_size,
            "size-rule": self.size_rule,
            "footer": self.footer_location,
            "unique-id": str(uuid.UUID(bytes=f.unique_id)),
        }
        if self.dynamic is not None:
            facts["block-size"] = self.block_size
            facts["bat-entries"] = self.dynamic.max_table_entries
        return facts


def fixed_footer_size(raw: bytes, data_length: int) -> int | None:
    """For a stream whose last 512 bytes are ``raw``: the virtual size if they are a valid fixed-disk footer.

    A decompressing stream cannot look at the end first, so the streamed raw reader asks this at the end; a
    fixed disk whose footer promises more than the ``data_length`` bytes before it is truncated.
    """
    footer = Footer.parse(raw)
    if footer is None or not footer.checksum_ok or footer.disk_type != DISK_FIXED:
        return None
    size, rule = footer.size_and_rule()
    if size > data_length:
        raise CorruptImage(f"fixed disk of {size} bytes ({rule}) holds only {data_length} bytes of data before "
                           "its footer: the file is truncated", fmt=FMT)
    return size


def open_vhd(source: Source) -> VhdImage:
    return VhdImage(source)
