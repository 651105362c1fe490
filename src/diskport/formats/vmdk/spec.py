"""The VMDK on-disk vocabulary (VMware *Virtual Disk Format 1.1*): magic numbers, flags, marker types, limits
and the hosted sparse extent header, unpacked once into :class:`SparseHeader`. A leaf: it imports nothing of
diskport's, so every other module of the reader can import it."""

from __future__ import annotations

import struct
from dataclasses import dataclass

FMT = "vmdk"
SPARSE_MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"
DESCRIPTOR_MARK = b"# Disk DescriptorFile"

SECTOR = 512
#: Header ``gdOffset`` meaning "the grain directory offset is in the footer" (stream-optimized extents).
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF

FLAG_NEWLINE_CHECK = 1 << 0
FLAG_REDUNDANT_GD = 1 << 1
FLAG_ZEROED_GRAIN_GTE = 1 << 2
FLAG_COMPRESSED_GRAINS = 1 << 16
FLAG_MARKERS = 1 << 17

COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1
#: The four header bytes that a text-mode (FTP ASCII) transfer would mangle (spec "singleEndLineChar"...).
NEWLINE_CHECK_BYTES = b"\n \r\n"
GTE_ZEROED = 1
MARKER_END_OF_STREAM = 0
MARKER_GRAIN_TABLE = 1
MARKER_GRAIN_DIRECTORY = 2
MARKER_FOOTER = 3
#: A streamOptimized file whose tables and grain markers give two different disks.
DISAGREE = "the grain tables and the grain markers disagree (one file, two disks)"
NO_PARENT_CID = 0xFFFF_FFFF

#: magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize, numGTEsPerGT, rgdOffset,
#: gdOffset, overHead, uncleanShutdown, the four newline check bytes, compressAlgorithm (all little-endian).
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
#: A metadata marker: value, size (0 for metadata markers), type.
MARKER = struct.Struct("<QII")
#: A grain marker: the grain's guest sector, then the compressed size; the deflate stream follows.
GRAIN_MARKER = struct.Struct("<QI")

MAX_DESCRIPTOR_BYTES = 1024 * 1024
MAX_GRAIN_SECTORS = 0x200000          # 1 GiB grains, qemu's bound
MAX_COMPRESSED_GRAIN_BYTES = 16 * 1024 * 1024
MAX_GTES_PER_GT = 512                 # the spec's fixed value and qemu's bound
MAX_GD_ENTRIES = 32 * 1024 * 1024     # qemu's bound on the grain directory (its "L1 size")
MAX_EXTENTS = 4096
MAX_VIRTUAL_SIZE = 1 << 62

# createType values that describe a raw physical device or partition, or ESX-only sparse formats, rather than
# files diskport can read. ("vmfs", "vmfsThin", "vmfsPreallocated" and "vmfsEagerZeroedThick" are plain flat
# files once copied off the datastore, and are read.)
DEVICE_CREATE_TYPES = frozenset({
    "fullDevice", "partitionedDevice", "vmfsRaw", "vmfsRawDeviceMap", "vmfsPassthroughRawDeviceMap",
    "vmfsSparse", "seSparse",
})
ESX_EXTENT_TYPES = frozenset({"VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE"})
#: Extent types whose file holds the guest bytes as they are. A VMFS extent is the ``-flat.vmdk`` of a disk
#: copied off an ESX datastore: a plain flat file, read like FLAT (qemu does the same).
FLAT_EXTENT_TYPES = frozenset({"FLAT", "VMFS"})


@dataclass(frozen=True)
class SparseHeader:
    """A hosted sparse extent header (spec "Hosted Sparse Extent Header"); sizes and offsets in sectors."""

    version: int
    flags: int
    capacity: int
    grain_sectors: int
    descriptor_offset: int
    descriptor_size: int
    gtes_per_gt: int
    redundant_gd_offset: int
    gd_offset: int
    overhead: int
    unclean_shutdown: int
    newline_check: bytes
    compress_algorithm: int

    @classmethod
    def unpack(cls, raw: bytes, at: int = 0) -> SparseHeader:
        (_magic, version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead, unclean,
         check, compress) = HEADER.unpack_from(raw, at)
        return cls(version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead, unclean,
                   check, compress)
