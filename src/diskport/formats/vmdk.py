"""VMDK reader (VMware *Virtual Disk Format 1.1* technical note).

A VMDK disk is a list of *extents* laid end to end in guest order, named by a text *descriptor* (spec "The
Descriptor File": a header with ``version``, ``CID``, ``parentCID`` and ``createType``, then "Extent
Descriptions" lines ``ACCESS SECTORS TYPE "file" [OFFSET]``, then the disk database ``ddb.*``). The descriptor
is either its own small file (``monolithicFlat``, ``twoGbMaxExtentFlat``, ``twoGbMaxExtentSparse``), whose
extents live in files beside it, or it is embedded in a single *hosted sparse extent* (``monolithicSparse``,
``streamOptimized``), which then is the whole disk.

Extent types read here:

* ``FLAT``: the guest bytes are the bytes of a file from a sector offset on.
* ``ZERO``: reads as zeros, no file.
* ``SPARSE``: a hosted sparse extent (spec "Hosted Sparse Extents"). Its header (spec "Hosted Sparse Extent
  Header", magic ``KDMV``, versions 1 to 3) gives the capacity, the grain size and the offset of the grain
  directory. Each grain directory entry (GDE) holds the sector of a grain table (GT); each grain table entry
  (GTE) holds the sector of one grain. A GTE of 0 is an unallocated grain and a GTE of 1 is a zeroed grain when
  the header's zeroed-grain flag is set (spec "Grain Directories and Grain Tables"); both read as zeros, as
  diskport never follows a parent disk.
* ``streamOptimized`` sparse extents (spec "Stream-Optimized Compressed Sparse Extents") store each grain
  deflate-compressed behind a grain marker (sector number and compressed size). When the header's grain
  directory offset is ``GD_AT_END`` the real header is the *footer*, the second-last sector of the file, between
  a footer marker and the end-of-stream marker (spec "The Footer"); it is read there as qemu does.

``VMFS`` extents (the ``-flat.vmdk`` of a disk copied off an ESX datastore) are plain flat files and are read
as ``FLAT``. Refused: ESX-only extents (``VMFSSPARSE``, ``VMFSRDM``, ``VMFSRAW``, ``SESPARSE``; spec "ESX Server
Sparse Extents", magic ``COWD``) and raw device descriptors as unsupported; delta disks (a real ``parentCID``
or a ``parentFileNameHint``) and extent names outside the image's folder as unsafe, since diskport never follows
references out of the image (extent files are opened only through :meth:`Source.open_relative`).

Safety: the descriptor is at most 1 MiB; every structure's offset and length is checked against its file's size
before it is read; the grain directory is sized by what the capacity needs (and capped at qemu's 32 Mi entries);
only one grain table is decoded at a time (plus a small cache) with numpy; a compressed grain is at most twice
the grain size and inflates to at most one grain. The work done is bounded by the virtual size whatever the
tables point at, since every grain is looked up once through a two-level table without chains (shared or
self-referencing tables only repeat bytes); stretches of unallocated tables are skipped with numpy and an empty
table costs one small read.

Sharing: a hosted sparse extent has no refcounts and no snapshots, so no grain of the file legitimately backs two
guest grains; grain tables naming one grain many times would expand a 195 KiB file into a terabyte of real data.
Each grain table is checked once, when first read, against one bit per grain-sized slot of the file (per sector
for compressed grains, which each start on their own sector): an uncompressed grain at ``h`` takes slot
``h // grain``, which two grains that do not overlap never share, and a compressed grain takes the sector it
starts at. A slot taken twice is refused as corrupt; the bits are bounded by the file's own size (1/4096 of it
for compressed grains). For the same reason a descriptor may name one sparse file once, and flat extents of one
file may not overlap.

streamOptimized read from a file follows its grain tables, read from a stream it follows its grain markers: both
readings must give the same disk, so the grain a table names must carry a marker for that same guest sector, or
the file is corrupt (two disks in one file).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
import struct
import zlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from isal import isal_zlib

from diskport.errors import CorruptImage, UnsafeImage, UnsupportedImage
from diskport.formats.base import DiskImage, Extent, file_runs
from diskport.formats.compression import INFLATE_ERRORS
from diskport.formats.runs import RunKind, split_runs
from diskport.sources.base import HeadSource, Source
from diskport.sources.stream import DecompressingStream

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
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
#: A metadata marker: value, size (0 for metadata markers), type.
_MARKER = struct.Struct("<QII")
#: A grain marker: the grain's guest sector, then the compressed size; the deflate stream follows.
_GRAIN_MARKER = struct.Struct("<QI")

MAX_DESCRIPTOR_BYTES = 1024 * 1024
MAX_GRAIN_SECTORS = 0x200000          # 1 GiB grains, qemu's bound
MAX_COMPRESSED_GRAIN_BYTES = 16 * 1024 * 1024
MAX_GTES_PER_GT = 512                 # the spec's fixed value and qemu's bound
MAX_GD_ENTRIES = 32 * 1024 * 1024     # qemu's bound on the grain directory (its "L1 size")
MAX_EXTENTS = 4096
MAX_VIRTUAL_SIZE = 1 << 62
_GT_CACHE = 16
_GRAIN_CACHE = 4

# Run kinds inside one extent.
_ZERO, _DATA, _COMPRESSED = RunKind.ZERO, RunKind.DATA, RunKind.COMPRESSED

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

# What malformed bytes can make Python raise on the way to a check; always reported as a CorruptImage.
_MALFORMED_ERRORS: tuple[type[BaseException], ...] = (
    struct.error, IndexError, KeyError, ValueError, OverflowError, zlib.error, MemoryError)



_CREATE_TYPE_LINE = re.compile(rb"^[ \t]*createType[ \t]*=", re.MULTILINE)


def probe(head: bytes, source: Source) -> int:
    if head[:4] == SPARSE_MAGIC and len(head) >= 8 and struct.unpack_from("<I", head, 4)[0] in (1, 2, 3):
        return 100
    if head[:4] == SPARSE_MAGIC:
        return 60
    if head[:4] == COWD_MAGIC:
        return 90
    text = head[:4096]
    if text.startswith(DESCRIPTOR_MARK) or (b"\0" not in text[:1024] and _CREATE_TYPE_LINE.search(text)):
        return 90
    return 0


@contextmanager
def _malformed_is_corrupt(image: DiskImage) -> Iterator[None]:
    """Turn a Python error that malformed input slipped past the checks into a CorruptImage."""
    try:
        yield
    except _MALFORMED_ERRORS as e:
        raise image.corrupt(f"malformed VMDK structure ({type(e).__name__}: {e})") from None


def _corrupt(source: Source, message: str, offset: int | None = None, hint: str | None = None) -> CorruptImage:
    """The error for bad structure in a file that is not (yet) a :class:`DiskImage`, naming that file.

    The image's own checks use :meth:`DiskImage.corrupt`. This one is for the two places where that would name
    the wrong file or none: the descriptor and sparse headers, parsed before the image exists (and parsed the same
    way from a stream's head), and the extent readers, whose file is an extent beside the descriptor, not the image.
    """
    return CorruptImage(message, path=source.name, fmt=FMT, offset=offset, hint=hint)


def _zero_fill(buf: memoryview) -> None:
    np.frombuffer(buf, dtype=np.uint8)[:] = 0


# -- descriptor ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtentLine:
    """One line of the descriptor's "Extent Descriptions" section."""

    access: str
    sectors: int
    kind: str
    filename: str | None
    offset_sectors: int | None
    line_number: int


@dataclass
class Descriptor:
    """The parsed descriptor: ``key=value`` fields (keys lowercased, first occurrence wins) and extent lines."""

    fields: dict[str, str] = field(default_factory=dict)
    extents: list[ExtentLine] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        return self.fields.get(key.lower())


_EXTENT_ACCESS = ("RW", "RDONLY", "NOACCESS")
_EXTENT_LINE = re.compile(
    r'(RW|RDONLY|NOACCESS)\s+(\d{1,20})\s+([A-Za-z]{1,20})(?:\s+"([^"\r\n]*)"(?:\s+(\d{1,20}))?)?')
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,127}")
_CID = re.compile(r"[0-9A-Fa-f]{1,8}")


def decode_descriptor_text(raw: bytes) -> str:
    """Descriptor bytes as text: up to the first NUL (embedded descriptors are zero padded), UTF-8 or else
    Latin-1 (older descriptors use the host's code page; file names then fail to open rather than decode)."""
    raw = raw.split(b"\0", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_descriptor(raw: bytes, source: Source, *, with_extents: bool = True) -> Descriptor:
    """Parse descriptor text (spec "The Descriptor File"). Lines that are neither comments, extent lines nor
    ``key=value`` are ignored, as VMware and qemu do; a malformed extent line is an error."""
    desc = Descriptor()
    for number, line in enumerate(decode_descriptor_text(raw).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split(None, 1)[0]
        if first in _EXTENT_ACCESS:
            if not with_extents:
                continue
            m = _EXTENT_LINE.fullmatch(line)
            if m is None:
                raise _corrupt(source, f"descriptor line {number} is not a valid extent line: {line[:120]!r}")
            access, sectors, kind, filename, offset = m.groups()
            desc.extents.append(ExtentLine(access, int(sectors), kind, filename,
                                           None if offset is None else int(offset), number))
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not _KEY.fullmatch(key):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        desc.fields.setdefault(key.lower(), value)
    return desc


def _parse_cid(desc: Descriptor, key: str, source: Source) -> int | None:
    text = desc.get(key)
    if text is None:
        return None
    if not _CID.fullmatch(text):
        raise _corrupt(source, f"descriptor {key} {text[:40]!r} is not a 32-bit hexadecimal number")
    return int(text, 16)


def read_identity(desc: Descriptor, source: Source) -> tuple[int | None, int | None]:
    """CID and parentCID of a descriptor; a delta disk (one with a parent) is refused with the parent named."""
    cid = _parse_cid(desc, "CID", source)
    parent_cid = _parse_cid(desc, "parentCID", source)
    parent = desc.get("parentFileNameHint")
    if parent or (parent_cid is not None and parent_cid != NO_PARENT_CID):
        named = f"'{parent}'" if parent else f"with CID {parent_cid:08x} (no parentFileNameHint)"
        raise UnsafeImage(f"is a delta disk of the parent disk {named}; diskport does not follow external "
                          "references", path=source.name, fmt=FMT,
                          hint="consolidate the snapshot chain into one disk (VMware, or qemu-img convert) first")
    return cid, parent_cid


# -- sparse extent header ---------------------------------------------------------------------------------
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
         check, compress) = _HEADER.unpack_from(raw, at)
        return cls(version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead, unclean,
                   check, compress)


def read_sparse_header(source: Source) -> SparseHeader:
    """The header at the start of a sparse extent file (not yet resolved through the footer)."""
    if source.size < _HEADER.size:
        raise _corrupt(source, f"file is {source.size} bytes, too short for a VMDK sparse extent header")
    raw = source.read_exact(0, _HEADER.size, "sparse extent header", FMT)
    if raw[:4] == COWD_MAGIC:
        raise UnsupportedImage("is an ESX Server sparse extent (COWD, VMFSSPARSE); only hosted sparse extents "
                               "are supported", path=source.name, fmt=FMT,
                               hint="convert it on the ESX host (vmkfstools -i) first")
    if raw[:4] != SPARSE_MAGIC:
        raise _corrupt(source, f"is not a VMDK sparse extent (magic {raw[:4]!r})", 0)
    return SparseHeader.unpack(raw)


def resolve_footer(source: Source, header: SparseHeader) -> SparseHeader:
    """The header that describes the extent: the footer's when the header defers the grain directory to it.

    The last three 512-byte sectors of the file are the footer marker, the footer (a full header) and the
    end-of-stream marker (spec "The Footer"); qemu reads it the same way.
    """
    if header.gd_offset != GD_AT_END:
        return header
    end = source.size // SECTOR * SECTOR
    if end < 4 * SECTOR:
        raise _corrupt(source, "the grain directory is deferred to the footer but the file is too short to "
                       "hold one", hint="the stream is incomplete")
    at = end - 3 * SECTOR
    raw = source.read_exact(at, 3 * SECTOR, "footer", FMT)
    _, marker_size, marker_type = _MARKER.unpack_from(raw, 0)
    eos = _MARKER.unpack_from(raw, 2 * SECTOR)
    if (raw[SECTOR:SECTOR + 4] != SPARSE_MAGIC or marker_size != 0 or marker_type != MARKER_FOOTER
            or eos != (0, 0, MARKER_END_OF_STREAM)):
        raise _corrupt(source, "the grain directory is deferred to the footer, but there is no valid footer "
                       "and end-of-stream marker at the end of the file", at,
                       hint="the stream is incomplete or damaged")
    footer = SparseHeader.unpack(raw, SECTOR)
    if footer.gd_offset == GD_AT_END:
        raise _corrupt(source, "the footer defers the grain directory to itself", at + SECTOR)
    return footer


def read_embedded_descriptor(source: Source, header: SparseHeader) -> bytes:
    if header.descriptor_offset == 0 or header.descriptor_size == 0:
        return b""
    if header.descriptor_size * SECTOR > MAX_DESCRIPTOR_BYTES:
        raise _corrupt(source, f"embedded descriptor of {header.descriptor_size} sectors exceeds the "
                       f"{MAX_DESCRIPTOR_BYTES // 1024} KiB limit", 36)
    return source.read_exact(header.descriptor_offset * SECTOR, header.descriptor_size * SECTOR,
                             "embedded descriptor", FMT)


# -- extents ----------------------------------------------------------------------------------------------
class ExtentReader(ABC):
    """One extent of the disk. Offsets given to :meth:`runs` and :meth:`read` are relative to its start."""

    kind: str = ""
    size: int = 0
    filename: str | None = None
    source: Source | None = None

    @abstractmethod
    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """``(kind, start, length, host)`` runs covering ``[start, end)``; host (an offset in
        :attr:`source`) is meaningful for ``_DATA`` runs only."""

    @abstractmethod
    def read(self, start: int, buf: memoryview) -> None:
        """Fill ``buf`` with the extent's bytes from ``start``, whatever their kind."""

    def facts(self) -> dict[str, Any]:
        return {"filename": self.filename, "type": self.kind, "virtual-size": self.size}


class ZeroExtent(ExtentReader):
    kind = "ZERO"

    def __init__(self, size: int) -> None:
        self.size = size

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        yield _ZERO, start, end - start, 0

    def read(self, start: int, buf: memoryview) -> None:
        _zero_fill(buf)


class FlatExtent(ExtentReader):
    kind = "FLAT"

    def __init__(self, source: Source, filename: str, file_offset: int, size: int) -> None:
        self.source = source
        self.filename = filename
        self.file_offset = file_offset
        self.size = size
        if file_offset + size > source.size:
            raise _corrupt(source, f"flat extent '{filename}' is {source.size} bytes, but the descriptor "
                           f"places {size} bytes at offset {file_offset}", hint="the file is truncated")

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        assert self.source is not None
        for ext in file_runs(self.source, start, end, self.file_offset):
            host = ext.start + self.file_offset
            yield (_ZERO, ext.start, ext.length, 0) if ext.zero else (_DATA, ext.start, ext.length, host)

    def read(self, start: int, buf: memoryview) -> None:
        assert self.source is not None
        got = self.source.readinto(self.file_offset + start, buf)
        if got != len(buf):
            raise _corrupt(self.source, f"flat extent data at {self.file_offset + start:#x}+{len(buf):#x} lies "
                           "beyond the end of the file")

    def facts(self) -> dict[str, Any]:
        return {**super().facts(), "offset": self.file_offset}


class SparseExtent(ExtentReader):
    """A hosted sparse extent, plain or stream-optimized (compressed grains)."""

    kind = "SPARSE"

    def __init__(self, source: Source, filename: str, header: SparseHeader) -> None:
        self.source = source
        self.filename = filename
        self.header = header = resolve_footer(source, header)
        if header.version not in (1, 2, 3):
            raise UnsupportedImage(f"sparse extent version {header.version} is not supported (only 1 to 3)",
                                   path=source.name, fmt=FMT)
        if header.flags & FLAG_NEWLINE_CHECK and header.newline_check != NEWLINE_CHECK_BYTES:
            raise _corrupt(source, "the header's newline check bytes are altered", 73,
                           hint="the file was probably transferred in text mode (FTP ASCII); copy it again "
                                "in binary mode")
        if header.compress_algorithm not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
            raise UnsupportedImage(f"unknown grain compression algorithm {header.compress_algorithm}",
                                   path=source.name, fmt=FMT)
        if not 1 <= header.gtes_per_gt <= MAX_GTES_PER_GT:
            raise _corrupt(source, f"{header.gtes_per_gt} entries per grain table is outside 1..{MAX_GTES_PER_GT}",
                           44)
        if not 1 <= header.grain_sectors <= MAX_GRAIN_SECTORS:
            raise _corrupt(source, f"grain size of {header.grain_sectors} sectors is outside "
                           f"1..{MAX_GRAIN_SECTORS}", 20)
        self.compressed = header.compress_algorithm == COMPRESSION_DEFLATE
        self.markers = bool(header.flags & FLAG_MARKERS)
        self.zeroed_grains = bool(header.flags & FLAG_ZEROED_GRAIN_GTE)
        self.grain_size = header.grain_sectors * SECTOR
        if self.compressed and self.grain_size > MAX_COMPRESSED_GRAIN_BYTES:
            raise UnsupportedImage(f"compressed grains of {self.grain_size} bytes exceed the "
                                   f"{MAX_COMPRESSED_GRAIN_BYTES} byte limit", path=source.name, fmt=FMT)
        self.size = header.capacity * SECTOR
        if self.size > MAX_VIRTUAL_SIZE:
            raise _corrupt(source, f"capacity of {header.capacity} sectors is implausibly large", 12)
        if header.overhead * SECTOR > source.size:
            raise _corrupt(source, f"file is {source.size} bytes but its grains begin at "
                           f"{header.overhead * SECTOR:#x}", 64, hint="the file is truncated")
        self.gtes = header.gtes_per_gt
        self.gt_span = self.gtes * self.grain_size
        self.gd = self._read_grain_directory()
        self._slot = SECTOR if self.compressed else self.grain_size
        self._slots = -(-source.size // self._slot)
        self._claimed = np.zeros(-(-self._slots // 8), dtype=np.uint8)
        self._gt_checked = np.zeros(len(self.gd), dtype=bool)
        self._tables: OrderedDict[int, tuple[np.ndarray, np.ndarray] | None] = OrderedDict()
        self._grains: OrderedDict[int, bytes] = OrderedDict()

    def _grain_count(self, gt_index: int) -> int:
        """Entries of grain table ``gt_index`` that lie within the capacity (only the last table is short)."""
        rest = self.size - gt_index * self.gt_span
        return min(self.gtes, -(-rest // self.grain_size))

    def _read_grain_directory(self) -> np.ndarray:
        src = self.source
        assert src is not None
        entries = -(-self.size // self.gt_span)
        if entries == 0:
            return np.zeros(0, dtype=np.uint32)
        if entries > MAX_GD_ENTRIES:
            raise UnsupportedImage(f"grain directory of {entries} entries exceeds the {MAX_GD_ENTRIES} entry "
                                   "limit", path=src.name, fmt=FMT)
        at = self.header.gd_offset * SECTOR
        if at + 4 * entries > src.size:
            raise _corrupt(src, f"grain directory at {at:#x} ({entries} entries) lies beyond the end of the "
                           f"file ({src.size} bytes)", 56)
        gd = np.frombuffer(src.read_exact(at, 4 * entries, "grain directory", FMT), dtype="<u4").astype(np.uint32)
        table_ends = gd.astype(np.uint64) * np.uint64(SECTOR) + np.uint64(4 * self.gtes)
        table_ends[-1] -= np.uint64(4 * (self.gtes - self._grain_count(entries - 1)))
        bad = np.flatnonzero((gd != 0) & (table_ends > np.uint64(src.size)))
        if bad.size:
            i = int(bad[0])
            raise _corrupt(src, f"grain directory entry {i} points to a grain table at {int(gd[i]) * SECTOR:#x} "
                           f"beyond the end of the file ({src.size} bytes)", at + 4 * i)
        return gd

    def _table(self, gt_index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(run kind, host offset) per grain of one grain table, checked against the file; None if the table
        is absent or maps no grain (qemu preallocates empty tables)."""
        gt_sector = int(self.gd[gt_index])
        if gt_sector == 0:
            return None
        if gt_index in self._tables:
            self._tables.move_to_end(gt_index)
            return self._tables[gt_index]
        src = self.source
        assert src is not None
        count = self._grain_count(gt_index)
        at = gt_sector * SECTOR
        raw = src.read_exact(at, 4 * count, f"grain table {gt_index}", FMT)
        if raw.count(0) == len(raw):
            self._remember(gt_index, None)
            return None
        entries = np.frombuffer(raw, dtype="<u4").astype(np.uint64)
        absent = entries == 0
        if self.zeroed_grains:
            absent |= entries == GTE_ZEROED
        hosts = entries * np.uint64(SECTOR)
        kinds = np.where(absent, _ZERO, _COMPRESSED if self.compressed else _DATA).astype(np.int8)
        if self.compressed:
            needed: np.ndarray | int = _GRAIN_MARKER.size if self.markers else 1
        else:
            grain_starts = gt_index * self.gt_span + np.arange(count, dtype=np.uint64) * np.uint64(self.grain_size)
            needed = np.minimum(np.uint64(self.grain_size), np.uint64(self.size) - grain_starts)
        bad = np.flatnonzero(~absent & (hosts + needed > np.uint64(src.size)))
        if bad.size:
            i = int(bad[0])
            raise _corrupt(src, f"grain table {gt_index} maps grain {i} to {int(hosts[i]):#x}, beyond the end "
                           f"of the file ({src.size} bytes)", at + 4 * i)
        if not self._gt_checked[gt_index]:
            self._claim(hosts[~absent], gt_index)
            self._gt_checked[gt_index] = True
        table = (kinds, hosts)
        self._remember(gt_index, table)
        return table

    def _claim(self, hosts: np.ndarray, gt_index: int) -> None:
        """Mark the file slots of a grain table's grains as used; a slot used twice is a shared grain."""
        src = self.source
        assert src is not None
        slots, counts = np.unique(hosts // np.uint64(self._slot), return_counts=True)
        if np.any(counts > 1):
            at = int(slots[np.flatnonzero(counts > 1)[0]]) * self._slot
            raise _corrupt(src, f"grain table {gt_index} names the grain at {at:#x} for more than one guest grain; "
                           "a sparse extent never shares a grain")
        slots = slots[slots < np.uint64(self._slots)]
        byte = (slots >> np.uint64(3)).astype(np.intp)
        bit = (np.uint8(1) << (slots & np.uint64(7)).astype(np.uint8)).astype(np.uint8)
        taken = np.flatnonzero(self._claimed[byte] & bit)
        if taken.size:
            at = int(slots[taken[0]]) * self._slot
            raise _corrupt(src, f"grain table {gt_index} names the grain at {at:#x}, which another grain table "
                           "already names; a sparse extent never shares a grain")
        np.bitwise_or.at(self._claimed, byte, bit)

    def _remember(self, gt_index: int, table: tuple[np.ndarray, np.ndarray] | None) -> None:
        self._tables[gt_index] = table
        if len(self._tables) > _GT_CACHE:
            self._tables.popitem(last=False)

    def _next_present_table(self, gt_index: int, last: int) -> int:
        """The first grain table after ``gt_index`` (up to ``last``) that is allocated, else ``last + 1``.

        Scans in doubling chunks, so a long stretch of unallocated tables costs one numpy pass, not a Python
        step per table.
        """
        index = gt_index + 1
        step = 64
        while index <= last:
            chunk = self.gd[index: min(index + step, last + 1)]
            present = np.flatnonzero(chunk)
            if present.size:
                return index + int(present[0])
            index += len(chunk)
            step *= 2
        return last + 1

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        grain = self.grain_size
        span = self.gt_span
        pos = start
        while pos < end:
            gt_index = pos // span
            base = gt_index * span
            stop = min(base + span, end)
            table = self._table(gt_index)
            if table is None:
                stop = min(self._next_present_table(gt_index, (end - 1) // span) * span, end)
                yield _ZERO, pos, stop - pos, 0
                pos = stop
                continue
            first = (pos - base) // grain
            last = -(-(stop - base) // grain)
            kinds = table[0][first:last]
            hosts = table[1][first:last]
            for s, e in split_runs(kinds, hosts, np.uint64(grain)):
                grain_start = base + (first + s) * grain
                r0 = max(grain_start, pos)
                r1 = min(base + (first + e) * grain, stop)
                kind = int(kinds[s])
                host = int(hosts[s]) + (r0 - grain_start) if kind == _DATA else 0
                yield kind, r0, r1 - r0, host
            pos = stop

    def read(self, start: int, buf: memoryview) -> None:
        src = self.source
        assert src is not None
        for kind, r0, length, host in self.runs(start, start + len(buf)):
            view = buf[r0 - start: r0 - start + length]
            if kind == _ZERO:
                _zero_fill(view)
            elif kind == _DATA:
                if src.readinto(host, view) != length:
                    raise _corrupt(src, f"grain data at {host:#x}+{length:#x} lies beyond the end of the file")
            else:
                self._read_compressed(r0, view)

    def _read_compressed(self, start: int, buf: memoryview) -> None:
        grain = self.grain_size
        pos = start
        end = start + len(buf)
        while pos < end:
            grain_index = pos // grain
            grain_start = grain_index * grain
            data = self._grain(grain_index)
            take = min(end, grain_start + grain) - pos
            buf[pos - start: pos - start + take] = data[pos - grain_start: pos - grain_start + take]
            pos += take

    def _grain(self, grain_index: int) -> bytes:
        """The inflated bytes of compressed grain ``grain_index`` (at least its part within the capacity)."""
        table = self._table(grain_index // self.gtes)
        entry = grain_index % self.gtes
        if table is None or int(table[0][entry]) != _COMPRESSED:
            return bytes(self.grain_size)
        host = int(table[1][entry])
        cached = self._grains.get(host)
        if cached is None:
            cached = self._inflate(host, grain_index)
            self._grains[host] = cached
            if len(self._grains) > _GRAIN_CACHE:
                self._grains.popitem(last=False)
        else:
            self._grains.move_to_end(host)
        needed = min(self.grain_size, self.size - grain_index * self.grain_size)
        if len(cached) < needed:
            src = self.source
            assert src is not None
            raise _corrupt(src, f"compressed grain {grain_index} inflates to {len(cached)} bytes, not "
                           f"{needed}", host)
        return cached

    def _inflate(self, host: int, grain_index: int) -> bytes:
        src = self.source
        assert src is not None
        limit = 2 * self.grain_size
        if self.markers:
            lba, size = _GRAIN_MARKER.unpack(src.read_exact(host, _GRAIN_MARKER.size, "grain marker", FMT))
            if size == 0:
                raise _corrupt(src, "a grain table entry points at a metadata marker, not a grain", host)
            sector = grain_index * self.header.grain_sectors
            if lba != sector:
                raise _corrupt(src, f"{DISAGREE}: the table maps guest sector {sector} to a grain whose marker "
                               f"says sector {lba}", host)
            if size > limit:
                raise _corrupt(src, f"compressed grain of {size} bytes exceeds twice the grain size", host)
            data = src.read_exact(host + _GRAIN_MARKER.size, size, "compressed grain", FMT)
        else:
            data = src.pread(host, min(limit, src.size - host))
        try:
            # ISA-L inflates the same zlib streams as zlib, about three times faster.
            inflater = isal_zlib.decompressobj()
            out = inflater.decompress(data, self.grain_size)
            if not inflater.eof:
                # Either the stream ends right after grain_size bytes, or it holds more than a grain.
                if inflater.decompress(inflater.unconsumed_tail, 1):
                    raise _corrupt(src, f"compressed grain inflates to more than {self.grain_size} bytes", host)
                if not inflater.eof:
                    raise _corrupt(src, "compressed grain is truncated", host)
        except INFLATE_ERRORS as e:
            raise _corrupt(src, f"compressed grain does not inflate: {e}", host) from None
        return out

    def facts(self) -> dict[str, Any]:
        return {**super().facts(), "cluster-size": self.grain_size, "compressed": self.compressed,
                "version": self.header.version}


# -- the image --------------------------------------------------------------------------------------------
class VmdkImage(DiskImage):
    format = FMT

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.layout: list[ExtentReader] = []
        self._starts: list[int] = []
        self._extent_sources: dict[str, Source] = {}
        self.create_type = ""
        self.version: int | None = None
        self.cid: int | None = None
        self.parent_cid: int | None = None
        try:
            with _malformed_is_corrupt(self):
                self._open()
        except BaseException:
            self._close_extent_sources()
            raise

    # -- opening ------------------------------------------------------------------------------------------
    def _open(self) -> None:
        src = self.source
        if src.size < 4:
            raise self.corrupt(f"file is {src.size} bytes, too short for a VMDK image")
        magic = src.read_exact(0, 4, "magic", FMT)
        if magic in (SPARSE_MAGIC, COWD_MAGIC):
            header = read_sparse_header(src)
            if header.capacity == 0 and header.descriptor_offset:
                # A sparse header that holds only a descriptor: the descriptor names the extents.
                self._open_descriptor(parse_descriptor(read_embedded_descriptor(src, header), src))
                return
            desc = parse_descriptor(read_embedded_descriptor(src, header), src, with_extents=False)
            self._read_identity(desc)
            sparse = SparseExtent(src, src.name, header)
            self.create_type = "streamOptimized" if sparse.compressed else "monolithicSparse"
            self.version = sparse.header.version
            self._append(sparse)
            return
        if src.size > MAX_DESCRIPTOR_BYTES:
            raise self.corrupt(f"is {src.size} bytes and has no sparse extent header; a VMDK descriptor file is "
                               f"at most {MAX_DESCRIPTOR_BYTES // 1024} KiB")
        self._open_descriptor(parse_descriptor(src.read_exact(0, src.size, "descriptor", FMT), src))

    def _read_identity(self, desc: Descriptor) -> None:
        """CID and parentCID; a delta disk (one with a parent) is refused before any extent is opened."""
        self.cid, self.parent_cid = read_identity(desc, self.source)

    def _open_descriptor(self, desc: Descriptor) -> None:
        self._read_identity(desc)
        create_type = desc.get("createType")
        if create_type is None:
            raise self.corrupt("descriptor has no createType")
        if create_type in DEVICE_CREATE_TYPES:
            raise self.unsupported(f"createType '{create_type}' describes ESX or raw device storage, which is not "
                                   "supported")
        self.create_type = create_type
        version = desc.get("version")
        self.version = int(version) if version and version.isascii() and version.isdigit() and len(version) < 6 \
            else None
        if len(desc.extents) > MAX_EXTENTS:
            raise self.unsupported(f"descriptor lists {len(desc.extents)} extents, more than the {MAX_EXTENTS} "
                                   "supported")
        for line in desc.extents:
            self._open_extent(line)
        if not self.layout:
            raise self.corrupt("descriptor lists no extents")

    def _open_extent(self, line: ExtentLine) -> None:
        where = f"extent on descriptor line {line.line_number}"
        if line.access == "NOACCESS":
            raise self.unsupported(f"{where} is NOACCESS; its data cannot be read")
        if line.sectors == 0:
            return  # an empty extent adds nothing (qemu skips it too)
        size = line.sectors * SECTOR
        if line.kind in ESX_EXTENT_TYPES:
            raise self.unsupported(f"{where} has type {line.kind}, which only ESX hosts read",
                                   hint="convert it on the ESX host (vmkfstools -i) first")
        if line.kind == "ZERO":
            if line.filename is not None:
                raise self.corrupt(f"ZERO {where} names a file")
            self._append(ZeroExtent(size))
            return
        if line.kind not in FLAT_EXTENT_TYPES and line.kind != "SPARSE":
            raise self.unsupported(f"{where} has unknown type '{line.kind}'")
        if line.filename is None:
            raise self.corrupt(f"{line.kind} {where} names no file")
        extent_source = self._extent_source(line.filename)
        if line.kind in FLAT_EXTENT_TYPES:
            self._append(FlatExtent(extent_source, line.filename, (line.offset_sectors or 0) * SECTOR, size))
            return
        if line.offset_sectors is not None:
            raise self.corrupt(f"SPARSE {where} has an offset")
        header = read_sparse_header(extent_source)
        if header.capacity == 0 and header.descriptor_offset:
            raise _corrupt(extent_source, "sparse extent holds only a descriptor; descriptors are not nested")
        sparse = SparseExtent(extent_source, line.filename, header)
        if sparse.size != size:
            raise _corrupt(extent_source, f"sparse extent has a capacity of {sparse.header.capacity} sectors, but "
                           f"the descriptor gives it {line.sectors}")
        self._append(sparse)

    def _extent_source(self, filename: str) -> Source:
        opened = self._extent_sources.get(filename)
        if opened is None:
            opened = self.source.open_relative(filename, "extent file")
            self._extent_sources[filename] = opened
        return opened

    def _append(self, extent: ExtentReader) -> None:
        start = self.virtual_size
        if start + extent.size > MAX_VIRTUAL_SIZE:
            raise self.corrupt("the extents add up to an implausibly large disk")
        self.layout.append(extent)
        self._starts.append(start)
        self.virtual_size = start + extent.size
        if self.cluster_size is None and isinstance(extent, SparseExtent):
            self.cluster_size = extent.grain_size

    # -- mapping ------------------------------------------------------------------------------------------
    def _guest_runs(self, start: int, stop: int) -> Iterator[Extent]:
        """Each extent's runs in guest order; DATA runs keep their host only when they lie in this file (the
        others are read through :meth:`read_mapped`)."""
        with _malformed_is_corrupt(self):
            index = bisect.bisect_right(self._starts, start) - 1
            while index < len(self.layout) and self._starts[index] < stop:
                extent = self.layout[index]
                base = self._starts[index]
                mapped = extent.source is self.source
                for kind, rel, length, host in extent.runs(max(start, base) - base,
                                                           min(stop, base + extent.size) - base):
                    if kind == _ZERO:
                        yield Extent(base + rel, length, True, None)
                    else:
                        yield Extent(base + rel, length, False, host if kind == _DATA and mapped else None)
                index += 1

    def read_mapped(self, ext: Extent, buf: memoryview) -> None:
        if ext.start < 0 or ext.end > self.virtual_size or len(buf) != ext.length:
            raise ValueError(f"extent {ext.start:#x}+{ext.length:#x} does not fit the image or the buffer")
        with _malformed_is_corrupt(self):
            pos = ext.start
            index = bisect.bisect_right(self._starts, pos) - 1
            while pos < ext.end:
                extent = self.layout[index]
                base = self._starts[index]
                take = min(ext.end, base + extent.size) - pos
                extent.read(pos - base, buf[pos - ext.start: pos - ext.start + take])
                pos += take
                index += 1

    # -- facts and lifetime -------------------------------------------------------------------------------
    def allocated_size(self) -> int | None:
        total = 0
        for src in [self.source, *self._extent_sources.values()]:
            used = src.allocated_bytes()
            if used is None:
                return None
            total += used
        return total

    def data_in_other_files(self) -> bool:
        return any(getattr(extent, "source", self.source) is not self.source for extent in self.layout)

    def format_specific(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"create-type": self.create_type}
        if self.version is not None:
            facts["version"] = self.version
        if self.cid is not None:
            facts["cid"] = self.cid
        if self.parent_cid is not None:
            facts["parent-cid"] = self.parent_cid
        facts["compressed"] = any(isinstance(e, SparseExtent) and e.compressed for e in self.layout)
        if self.cluster_size:
            facts["cluster-size"] = self.cluster_size
        facts["extents"] = [e.facts() for e in self.layout]
        return facts

    def _close_extent_sources(self) -> None:
        sources = list(self._extent_sources.values())
        self._extent_sources.clear()
        for src in sources:
            if src is not self.source:
                src.close()

    def close(self) -> None:
        try:
            self._close_extent_sources()
        finally:
            super().close()


def open_vmdk(source: Source) -> VmdkImage:
    return VmdkImage(source)


# -- streamOptimized as a stream ---------------------------------------------------------------------------
class StreamedVmdkImage(DiskImage):
    """A streamOptimized VMDK read front to back from a forward-only stream (inside gzip, say), no scratch.

    The grains follow the header and descriptor in ascending order, each behind a grain marker (spec
    "Stream-Optimized Compressed Sparse Extents"); the grain tables, grain directory and footer that follow are
    metadata markers that a sequential reader skips. Grains out of order cannot be streamed and are refused
    with that said. Gaps between grains read as zeros.
    """

    format = FMT

    def __init__(self, stream: DecompressingStream, head: bytes) -> None:
        super().__init__(stream.source)
        self.stream = stream
        self.compression = [stream.kind] if stream.kind else []
        src = HeadSource(stream.source.name, head)
        header = SparseHeader.unpack(head) if len(head) >= _HEADER.size else None
        if (header is None or header.flags & (FLAG_COMPRESSED_GRAINS | FLAG_MARKERS)
                != FLAG_COMPRESSED_GRAINS | FLAG_MARKERS or header.compress_algorithm != COMPRESSION_DEFLATE):
            raise self.unsupported("only streamOptimized VMDK can be read as a stream")
        if not 1 <= header.grain_sectors <= MAX_GRAIN_SECTORS or header.grain_sectors & (header.grain_sectors - 1):
            raise self.corrupt(f"grain size of {header.grain_sectors} sectors is not a power of two up to "
                               f"{MAX_GRAIN_SECTORS}", 20)
        if header.capacity * SECTOR > MAX_VIRTUAL_SIZE:
            raise self.corrupt(f"capacity of {header.capacity} sectors is implausibly large", 12)
        if not 1 <= header.gtes_per_gt <= MAX_GTES_PER_GT:
            raise self.corrupt(f"{header.gtes_per_gt} entries per grain table is outside 1..{MAX_GTES_PER_GT}", 44)
        desc = parse_descriptor(read_embedded_descriptor(src, header), src, with_extents=False)
        self.cid, self.parent_cid = read_identity(desc, src)
        self.header = header
        self.virtual_size = header.capacity * SECTOR
        self.cluster_size = self.grain_size = header.grain_sectors * SECTOR
        self._head = head
        self._consumed = 0  # bytes of the decompressed stream handed out so far
        self._grain_start = 0
        self._grain = b""
        self._started = False
        # What the markers and the tables say, as keyed multiset hashes per grain table (see _check_tables).
        self._key = os.urandom(16)
        self._marker_sums: dict[int, int] = {}
        self._table_sums: dict[int, int] = {}
        self._directories: dict[int, np.ndarray] = {}
        self._footer_gd: int | None = None

    def _pair(self, host_sector: int, index: int) -> int:
        digest = hashlib.blake2b(struct.pack("<QQ", host_sector, index), key=self._key, digest_size=16).digest()
        return int.from_bytes(digest, "little")

    def _read_metadata(self, kind: int, sectors: int, at: int) -> None:
        """A metadata marker's sectors: grain tables and the directory are kept as hashes and entries, the footer
        for where the directory is; anything else is skipped."""
        self._skip(SECTOR - _MARKER.size)
        data_sector = at // SECTOR + 1
        header = self.header
        if kind == MARKER_GRAIN_TABLE and sectors * SECTOR <= 4 * MAX_GTES_PER_GT:
            self._table_sums[data_sector] = self._table_sum(self._read(sectors * SECTOR))
            return
        if kind == MARKER_GRAIN_DIRECTORY:
            needed = -(-self.virtual_size // (header.gtes_per_gt * self.grain_size))
            if needed > MAX_GD_ENTRIES or 4 * needed > sectors * SECTOR:
                raise self.corrupt(f"grain directory of {sectors} sectors does not fit the capacity", at)
            raw = self._read(4 * needed)
            self._directories[data_sector] = np.frombuffer(raw, dtype="<u4").copy()
            self._skip(sectors * SECTOR - 4 * needed)
            return
        if kind == MARKER_FOOTER and sectors == 1:
            raw = self._read(SECTOR)
            if raw[:4] == SPARSE_MAGIC:
                self._footer_gd = SparseHeader.unpack(raw).gd_offset
            return
        self._skip(sectors * SECTOR)

    def _table_sum(self, raw: bytes) -> int:
        header = self.header
        entries = np.frombuffer(raw[: 4 * header.gtes_per_gt], dtype="<u4")
        present = entries != 0
        if header.flags & FLAG_ZEROED_GRAIN_GTE:
            present &= entries != GTE_ZEROED
        return sum(self._pair(int(entries[i]), int(i)) for i in np.flatnonzero(present).tolist()) % (1 << 128)

    def _read_overhead(self) -> None:
        """The sectors before the first grain. When the header names its grain directory (qemu's layout: the
        directory and then the tables sit here, before the grains), they are kept for :meth:`_check_tables` as
        they pass, one chunk at a time; a table placed before the directory cannot be checked and is refused."""
        header = self.header
        end = header.overhead * SECTOR
        if header.gd_offset == GD_AT_END or not 0 < header.gd_offset * SECTOR < end:
            self._skip(end - self._consumed)
            return
        needed = -(-self.virtual_size // (header.gtes_per_gt * self.grain_size))
        if needed > MAX_GD_ENTRIES:
            raise self.corrupt(f"grain directory of {needed} entries exceeds the {MAX_GD_ENTRIES} limit")
        gd_at = header.gd_offset * SECTOR
        gd_end = gd_at + 4 * needed
        gd = bytearray()
        tables: dict[int, bytearray] = {}  # table start (bytes) -> bytes gathered so far
        wanted: list[int] = []
        table_bytes = 4 * header.gtes_per_gt
        pos = self._consumed
        while pos < end:
            chunk = self._read(min(end - pos, 1 << 20))
            if not chunk:
                raise self.corrupt("stream ends inside the header area", hint="the file is truncated")
            stop = pos + len(chunk)
            if gd_at < stop and pos < gd_end:
                gd += chunk[max(gd_at, pos) - pos: min(gd_end, stop) - pos]
                if len(gd) == gd_end - gd_at:
                    directory = np.frombuffer(bytes(gd), dtype="<u4").copy()
                    self._directories[header.gd_offset] = directory
                    wanted = sorted({int(x) * SECTOR for x in directory.tolist() if x})
                    if wanted and wanted[0] < gd_end:
                        raise self.corrupt(f"{DISAGREE}: a grain table lies before the grain directory, "
                                           "where a stream cannot check it")
            for at in wanted:
                if at >= stop:
                    break
                if at + table_bytes > pos:
                    part = tables.setdefault(at, bytearray())
                    part += chunk[max(at, pos) - pos: min(at + table_bytes, stop) - pos]
                    if len(part) == table_bytes:
                        self._table_sums[at // SECTOR] = self._table_sum(bytes(part))
                        del tables[at]
            wanted = [at for at in wanted if at + table_bytes > stop]
            pos = stop

    def _check_tables(self) -> None:
        """At the end of the stream: the grains its markers carried are exactly those its tables name.

        Both sides are reduced to a sum, per grain table, of a keyed hash of (grain's sector in the file, index in
        its table): the key is random per read, so no file can be made whose sums agree while its pairs differ.
        Memory is one number per table and the directory, not one entry per grain."""
        gd_sector = self._footer_gd if self._footer_gd is not None else self.header.gd_offset
        directory = self._directories.get(gd_sector)
        if directory is None:
            raise self.corrupt(f"{DISAGREE}: the stream holds no grain directory at sector {gd_sector}")
        marker_sums = dict(self._marker_sums)
        for index, table_sector in enumerate(directory.tolist()):
            if table_sector == 0:
                expected = 0
            elif table_sector in self._table_sums:
                expected = self._table_sums[table_sector]
            else:
                raise self.corrupt(f"{DISAGREE}: the directory names a grain table at sector "
                                   f"{table_sector}, which the stream does not hold")
            if marker_sums.pop(index, 0) != expected:
                raise self.corrupt(f"{DISAGREE}: grain table {index} names other grains than the "
                                   "markers carry")
        if marker_sums:
            raise self.corrupt(f"{DISAGREE}: grains beyond the grain directory")

    def _end_without_marker(self) -> None:
        """The stream ended where a marker was due. qemu-img writes no footer and no end-of-stream marker but puts
        the grain directory and tables before the grains (the header names them): those tables say which grains
        the file holds, so when every one has arrived the stream is complete, and when one is missing it is
        truncated. Without tables read up front (``GD_AT_END``) nothing says what is missing: truncated."""
        cut = f"stream ends after {self._consumed} bytes without an end-of-stream marker"
        if self.header.gd_offset == GD_AT_END or self.header.gd_offset not in self._directories:
            raise self.corrupt(cut, hint="the file is truncated")
        try:
            self._check_tables()
        except CorruptImage:
            raise self.corrupt(f"{cut}, before all the grains its grain tables name",
                               hint="the file is truncated") from None

    def _read(self, n: int) -> bytes:
        """Exactly ``n`` more bytes of the stream (b"" at its very end), from the head first."""
        out = bytearray()
        if self._consumed < len(self._head):
            out += self._head[self._consumed: self._consumed + n]
        if len(out) < n:
            buf = bytearray(n - len(out))
            got = self.stream.readinto(memoryview(buf))
            out += buf[:got]
        self._consumed += len(out)
        if out and len(out) < n:
            raise self.corrupt(f"stream ends inside a marker or grain after {self._consumed} bytes",
                               hint="the file is truncated")
        return bytes(out)

    def _skip(self, n: int) -> None:
        while n > 0:
            step = min(n, 8 * 1024 * 1024)
            if len(self._read(step)) != step:
                raise self.corrupt("stream ends inside metadata", hint="the file is truncated")
            n -= step

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        if start != 0 or end is not None or self._started:
            raise self.unsupported("a compressed streamOptimized VMDK can only be read once, from the start")
        self._started = True
        grain = self.grain_size
        self._read_overhead()
        pos = 0  # guest bytes covered so far
        while True:
            marker = self._read(_MARKER.size)
            if not marker:
                self._end_without_marker()
                break
            value, size, kind = _MARKER.unpack(marker)
            marker_at = self._consumed - _MARKER.size
            if size == 0:  # a metadata marker: read what the check needs, skip the rest
                if kind == MARKER_END_OF_STREAM:
                    break
                if value > MAX_GD_ENTRIES:
                    raise self.corrupt(f"metadata marker of {value} sectors is implausibly large", marker_at)
                self._read_metadata(kind, value, marker_at)
                continue
            offset = value * SECTOR
            if size > 2 * grain or size < _MARKER.size - _GRAIN_MARKER.size:
                raise self.corrupt(f"compressed grain of {size} bytes is smaller than a zlib stream or larger "
                                   "than twice the grain size",
                                   self._consumed - _MARKER.size)
            if offset % grain or offset < pos or offset >= self.virtual_size:
                raise self.unsupported(f"grain for sector {value} is out of order or out of range, so the image "
                                       "cannot be read as a stream", hint="decompress the file first and convert that")
            grain_number = offset // grain
            table = grain_number // self.header.gtes_per_gt
            pair = self._pair(marker_at // SECTOR, grain_number % self.header.gtes_per_gt)
            self._marker_sums[table] = (self._marker_sums.get(table, 0) + pair) % (1 << 128)
            compressed = marker[_GRAIN_MARKER.size:] + self._read(size - (_MARKER.size - _GRAIN_MARKER.size))
            self._skip(-(_GRAIN_MARKER.size + size) % SECTOR)
            length = min(grain, self.virtual_size - offset)
            self._grain = self._inflate_grain(compressed, length, offset)
            if offset > pos:
                yield Extent(pos, offset - pos, True, None)
            self._grain_start = offset
            yield Extent(offset, length, False, None)
            pos = offset + length
        self._check_tables()
        if pos < self.virtual_size:
            yield Extent(pos, self.virtual_size - pos, True, None)

    def read_mapped(self, ext: Extent, buf: memoryview) -> None:
        at = ext.start - self._grain_start
        buf[:] = self._grain[at: at + ext.length]

    def format_specific(self) -> dict[str, Any]:
        return {"create-type": "streamOptimized", "version": self.header.version, "cluster-size": self.grain_size,
                "compressed": True, "cid": self.cid, "parent-cid": self.parent_cid}

    def _inflate_grain(self, data: bytes, length: int, offset: int) -> bytes:
        """One compressed grain (a zlib stream) inflated to exactly ``length`` bytes (the last grain may be
        short)."""
        try:
            inflater = isal_zlib.decompressobj()
            out = inflater.decompress(data, self.grain_size)
        except INFLATE_ERRORS as e:
            raise self.corrupt(f"compressed grain for guest offset {offset:#x} does not inflate: {e}") from None
        if len(out) < length:
            out += bytes(length - len(out)) if inflater.eof else b""
            if len(out) < length:
                raise self.corrupt(f"compressed grain for guest offset {offset:#x} is truncated")
        return out[:length]

    def close(self) -> None:
        self.stream.close()
        super().close()


def is_stream_optimized(head: bytes) -> bool:
    """Whether ``head`` starts a streamOptimized extent whose descriptor lies within it (streamable)."""
    if len(head) < _HEADER.size or head[:4] != SPARSE_MAGIC:
        return False
    header = SparseHeader.unpack(head)
    return (header.flags & FLAG_MARKERS != 0 and header.flags & FLAG_COMPRESSED_GRAINS != 0
            and (header.descriptor_offset + header.descriptor_size) * SECTOR <= len(head))
