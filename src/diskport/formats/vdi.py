"""VDI reader: VirtualBox Disk Images, header version 1.1, static and dynamic.

VirtualBox documents the layout only in its source (``src/VBox/Storage/VDICore.h``: ``VDIPREHEADER`` and
``VDIHEADER1``); qemu's ``block/vdi.c`` reads the same layout. All fields are little-endian:

* **Pre-header** at 0: 64 bytes of text (``<<< Oracle VM VirtualBox Disk Image >>>``), the signature
  ``0xBEDA107F`` at 0x40 and the version at 0x44 (``0x00010001`` = 1.1, the only version written since
  VirtualBox 1.x; others are refused with :class:`UnsupportedImage`).
* **Header 1.1** at 0x48 (``cbHeader`` bytes, 0x180 or more): image type (1 = normal, i.e. dynamic,
  2 = fixed, i.e. static, 3 = undo, 4 = differencing), flags, a 256-byte comment, the block map offset
  (``offBlocks``), the data offset (``offData``), the legacy geometry with its sector size (must be 512), the
  disk size (``cbDisk``), the block size (``cbBlock``, 1 MiB in practice), the extra bytes per block
  (``cbBlockExtra``, must be 0), the number of blocks (``cBlocks``) and of allocated blocks
  (``cBlocksAllocated``), and four UUIDs: this image, its last modification, and for differencing images
  the parent (``uuidLinkage``) and the parent's modification.
* **Block map** at ``offBlocks``: one uint32 per block, the index of the block in the data area (the block's
  data is at ``offData + index * cbBlock``); ``0xFFFFFFFF`` = never written and ``0xFFFFFFFE`` = discarded
  (zeroed) both read as zeros. A static image maps every block; a dynamic one maps blocks as they are written.

The virtual size is ``cbDisk`` rounded up to whole sectors, as qemu does (``VBoxManage convertfromraw`` can
write odd sizes).

Undo and differencing images hold only the changes to a parent image, which they identify by UUID alone (no
name or path is stored); they are refused with :class:`UnsafeImage` naming that UUID, as are normal images
that nevertheless name a parent.

**Safety.** The block map is bounded by what the disk size needs (``cBlocks`` must equal
ceil(``cbDisk`` / ``cbBlock``)) and by :data:`MAX_BLOCK_MAP_BYTES`; it must lie between the header and the data
area. Every mapped index must be below ``cBlocksAllocated`` and the part of the block the guest uses must lie
inside the file. Malformed input raises :class:`~diskport.errors.DiskportError` subclasses only.

Differences from qemu-img (``block/vdi.c``), none of which affect images qemu-img or VirtualBox make: qemu
accepts only 1 MiB blocks, diskport any power of two from 512 bytes to 256 MiB; qemu accepts a block map with
more entries than the disk needs, diskport refuses it; qemu reads blocks that lie past the end of the file as
zeros, diskport refuses the image as truncated.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from diskport.errors import UnsafeImage
from diskport.formats.base import DiskImage, Extent, uint_table
from diskport.runs import split_runs
from diskport.sources.base import Source

if TYPE_CHECKING:
    from array import array

FMT = "vdi"
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001

SECTOR = 512
PRE_HEADER_SIZE = 0x48
HEADER_V1_MIN_SIZE = 0x180
#: Bytes read for the pre-header and a version 1.1 header.
HEADER_READ = 0x200

IMAGE_NORMAL = 1
IMAGE_FIXED = 2
IMAGE_UNDO = 3
IMAGE_DIFF = 4
IMAGE_TYPE_NAMES = {IMAGE_NORMAL: "dynamic", IMAGE_FIXED: "static", IMAGE_UNDO: "undo",
                    IMAGE_DIFF: "differencing"}

BLOCK_FREE = 0xFFFFFFFF
BLOCK_ZERO = 0xFFFFFFFE
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 256 * 1024 * 1024
#: Largest block map diskport decodes: 16 Mi blocks, 16 TiB with the usual 1 MiB blocks.
MAX_BLOCK_MAP_BYTES = 64 * 1024 * 1024
#: Blocks decoded per step of :meth:`VdiImage.extents`.
_BLOCKS_PER_STEP = 1 << 16

# Offsets inside the file (pre-header + header 1.1).
_AT_VERSION = 0x44
_AT_HEADER_SIZE = 0x48
_AT_BLOCK_MAP_OFFSET = 0x154
_AT_DATA_OFFSET = 0x158
_AT_SECTOR_SIZE = 0x168
_AT_BLOCK_SIZE = 0x178
_AT_BLOCK_EXTRA = 0x17C
_AT_BLOCKS = 0x180
_AT_BLOCKS_ALLOCATED = 0x184

_HEADER_TYPE = struct.Struct("<IIIII")  # signature, version, header size, image type, flags (at 0x40)
_HEADER_LAYOUT = struct.Struct("<IIIIIIIQIIII16s16s16s16s")  # from offBlocks (at 0x154)


def probe(head: bytes, source: Source) -> int:
    if len(head) >= 0x48 and struct.unpack_from("<I", head, 0x40)[0] == SIGNATURE:
        return 100
    return 0


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class VdiImage(DiskImage):
    format = FMT

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self._parse_header()



    def _parse_header(self) -> None:
        src = self.source
        if src.size < HEADER_READ:
            raise self.corrupt(f"file is {src.size} bytes, too short for a VDI header")
        head = src.read_exact(0, HEADER_READ, "header", FMT)
        signature, version, header_size, image_type, flags = _HEADER_TYPE.unpack_from(head, 0x40)
        if signature != SIGNATURE:
            raise self.corrupt(f"bad signature {signature:#010x} (expected {SIGNATURE:#010x})", 0x40)
        if version != VERSION_1_1:
            raise self.unsupported(f"VDI header version {version >> 16}.{version & 0xFFFF} is not supported "
                                    "(only 1.1, which every VirtualBox since 1.x writes)")
        self.version = version
        if header_size < HEADER_V1_MIN_SIZE:
            raise self.corrupt(f"header size {header_size} is smaller than a version 1.1 header "
                             f"({HEADER_V1_MIN_SIZE})", _AT_HEADER_SIZE)
        (block_map_at, data_at, _cylinders, _heads, _sectors, sector_size, _unused, disk_size, block_size,
         block_extra, blocks, blocks_allocated, image_id, modify_id, parent_id,
         parent_modify_id) = _HEADER_LAYOUT.unpack_from(head, _AT_BLOCK_MAP_OFFSET)
        self.image_type = image_type
        self.flags = flags
        self.image_uuid = uuid.UUID(bytes_le=image_id)
        self.modify_uuid = uuid.UUID(bytes_le=modify_id)
        parent = uuid.UUID(bytes_le=parent_id)
        if image_type in (IMAGE_UNDO, IMAGE_DIFF):
            kind = IMAGE_TYPE_NAMES[image_type]
            raise UnsafeImage(f"is a{'n' if kind == 'undo' else ''} {kind} image holding only the changes to "
                              f"its parent image {parent}; diskport does not follow external references",
                              path=src.name, fmt=FMT,
                              hint="merge it into its parent with VirtualBox (VBoxManage clonemedium of the "
                                   "snapshot) and convert the result")
        if image_type not in (IMAGE_NORMAL, IMAGE_FIXED):
            raise self.unsupported(f"image type {image_type} is not supported (only 1 = dynamic, 2 = static)")
        if parent_id != bytes(16) or parent_modify_id != bytes(16):
            raise UnsafeImage(f"is a {IMAGE_TYPE_NAMES[image_type]} image that names a parent image "
                              f"{parent}; diskport does not follow external references",
                              path=src.name, fmt=FMT)
        if sector_size != SECTOR:
            raise self.unsupported(f"sector size {sector_size} is not supported (only 512)")
        if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise self.corrupt(f"block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} bytes to "
                             f"{MAX_BLOCK_SIZE >> 20} MiB", _AT_BLOCK_SIZE)
        if block_extra:
            raise self.unsupported(f"blocks carry {block_extra} bytes of extra data each, which diskport "
                                    "does not read (only 0 is supported)")
        self.block_size = self.cluster_size = block_size
        self.virtual_size = ceil_div(disk_size, SECTOR) * SECTOR
        needed = ceil_div(self.virtual_size, block_size)
        if blocks != needed:
            relation = "fewer" if blocks < needed else "more"
            raise self.corrupt(f"block map has {blocks} entries, {relation} than the {needed} a disk of "
                             f"{disk_size} bytes needs", _AT_BLOCKS)
        if needed * 4 > MAX_BLOCK_MAP_BYTES:
            raise self.unsupported(f"block map of {needed * 4} bytes exceeds the {MAX_BLOCK_MAP_BYTES} byte "
                                    "limit")
        if blocks_allocated > blocks:
            raise self.corrupt(f"{blocks_allocated} blocks are allocated but the disk has only {blocks}",
                             _AT_BLOCKS_ALLOCATED)
        self.blocks_allocated = blocks_allocated
        header_end = PRE_HEADER_SIZE + header_size
        if block_map_at % SECTOR or block_map_at < header_end:
            raise self.corrupt(f"block map offset {block_map_at:#x} is not sector aligned or overlaps the "
                             "header", _AT_BLOCK_MAP_OFFSET)
        if data_at % SECTOR or data_at < block_map_at + needed * 4:
            raise self.corrupt(f"data offset {data_at:#x} is not sector aligned or overlaps the block map",
                             _AT_DATA_OFFSET)
        self.data_offset = data_at
        raw = src.read_exact(block_map_at, needed * 4, "block map", FMT)
        block_map = uint_table(raw, "I", "little")
        self._check_block_map(block_map, block_map_at)
        self._block_map = block_map

    def _check_block_map(self, block_map: array[int], block_map_at: int) -> None:
        """Every allocated entry names an allocated data block that lies inside the file.

        Checked on the furthest entry (``max`` over the allocated ones, at C speed, no numpy); the first bad
        entry is only searched for once one is known to exist."""
        def allocated(entries: array[int]) -> Iterator[int]:
            return filter(BLOCK_ZERO.__gt__, entries)

        bs, n = int(self.block_size), len(block_map)
        if max(allocated(block_map), default=-1) >= self.blocks_allocated:
            i = next(i for i, e in enumerate(block_map) if e < BLOCK_ZERO and e >= self.blocks_allocated)
            raise self.corrupt(f"block map entry {i} points to data block {block_map[i]}, but only "
                             f"{self.blocks_allocated} blocks are allocated", block_map_at + 4 * i)

        def used(i: int) -> int:  # the last block holds only what is left of the disk
            return bs if i < n - 1 else int(self.virtual_size) - (n - 1) * bs

        def end(i: int) -> int:
            return int(self.data_offset) + block_map[i] * bs + used(i)

        furthest = max(allocated(block_map[:-1]), default=-1)
        if (furthest >= 0 and self.data_offset + furthest * bs + bs > self.source.size) or (
                n and block_map[-1] < BLOCK_ZERO and end(n - 1) > self.source.size):
            i = next(i for i, e in enumerate(block_map) if e < BLOCK_ZERO and end(i) > self.source.size)
            raise self.corrupt(f"block {i} lies at {end(i) - used(i):#x}, past the end of the file "
                             f"({self.source.size} bytes): the image is truncated", block_map_at + 4 * i)

    # -- mapping ----------------------------------------------------------------------------------------
    def _guest_runs(self, start: int, stop: int) -> Iterator[Extent]:
        """Runs of blocks in ``[start, stop)``: unmapped blocks as zeros, consecutive blocks that are
        consecutive in the file as one data run."""
        import numpy as np

        bs = self.block_size
        first = start // bs
        last = ceil_div(stop, bs)
        step = np.int64(bs)
        block_map = np.frombuffer(self._block_map, dtype=np.uint32)
        for step_first in range(first, last, _BLOCKS_PER_STEP):
            step_last = min(step_first + _BLOCKS_PER_STEP, last)
            entries = block_map[step_first:step_last]
            zero = entries >= np.uint32(BLOCK_ZERO)
            hosts = np.int64(self.data_offset) + entries.astype(np.int64) * step
            for s, e in split_runs(zero, hosts, step, contiguous=~zero):
                base = (step_first + s) * bs
                lo, hi = max(base, start), min((step_first + e) * bs, stop)
                if zero[s]:
                    yield Extent(lo, hi - lo, True, None)
                else:
                    yield Extent(lo, hi - lo, False, int(hosts[s]) + (lo - base))

    # -- facts ------------------------------------------------------------------------------------------
    def format_specific(self) -> dict[str, Any]:
        return {
            "image-type": IMAGE_TYPE_NAMES[self.image_type],
            "version": f"{self.version >> 16}.{self.version & 0xFFFF}",
            "block-size": self.block_size,
            "blocks-allocated": self.blocks_allocated,
            "uuid": str(self.image_uuid),
            "modification-uuid": str(self.modify_uuid),
        }


def open_vdi(source: Source) -> VdiImage:
    return VdiImage(source)
