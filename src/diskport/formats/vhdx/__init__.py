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

Modules, as qemu splits vhdx.c / vhdx-log.c and keeps the structs in vhdx.h: :mod:`.spec` (constants, GUIDs and
the fixed structures as named dataclasses; a leaf), :mod:`.header` (steps 1 and 3), :mod:`.log` (step 2),
:mod:`.metadata` (step 4), :mod:`.bat` (step 5) and :mod:`.image`, which runs them in order and maps extents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diskport._lazy import lazy_getattr

if TYPE_CHECKING:
    from diskport.formats.vhdx.image import VhdxImage, open_vhdx
    from diskport.sources.base import Source

FMT = "vhdx"
SIGNATURE = b"vhdxfile"  # the file type identifier (2.1.1)


def probe(head: bytes, source: Source) -> int:
    """The file type identifier's signature (2.1.1). Here, not in :mod:`.image`, so that probing loads no reader:
    the reader (with the BAT, the log and google_crc32c) is imported when a VHDX is opened."""
    return 100 if head[:8] == SIGNATURE else 0


__getattr__ = lazy_getattr(__name__, {"VhdxImage": "diskport.formats.vhdx.image",
                                      "open_vhdx": "diskport.formats.vhdx.image"})

__all__ = ["FMT", "SIGNATURE", "VhdxImage", "open_vhdx", "probe"]
