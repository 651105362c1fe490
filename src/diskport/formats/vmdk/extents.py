"""The extents a VMDK disk is made of: ZERO, FLAT (and VMFS) files, and hosted sparse extents with their grain
directory and grain tables (spec "Hosted Sparse Extents"), plain or with compressed grains.

An extent's file is often not the image's (it lies beside the descriptor), so errors name that file through
:func:`~diskport.formats.vmdk.descriptor.file_corrupt` rather than the image's ``corrupt``.

Sharing: a hosted sparse extent has no refcounts and no snapshots, so no grain of the file legitimately backs two
guest grains; grain tables naming one grain many times would expand a 195 KiB file into a terabyte of real data.
Each grain table is checked once, when first read, against one bit per grain-sized slot of the file (per sector
for compressed grains, which each start on their own sector): an uncompressed grain at ``h`` takes slot
``h // grain``, which two grains that do not overlap never share, and a compressed grain takes the sector it
starts at. A slot taken twice is refused as corrupt; the bits are bounded by the file's own size (1/4096 of it
for compressed grains). For the same reason a descriptor may name one sparse file once, and flat extents of one
file may not overlap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from diskport.errors import UnsupportedImage
from diskport.formats.base import file_runs, uint_table
from diskport.formats.vmdk.descriptor import file_corrupt
from diskport.formats.vmdk.spec import (
    COMPRESSION_DEFLATE,
    COMPRESSION_NONE,
    COWD_MAGIC,
    DISAGREE,
    FLAG_MARKERS,
    FLAG_NEWLINE_CHECK,
    FLAG_ZEROED_GRAIN_GTE,
    FMT,
    GD_AT_END,
    GRAIN_MARKER,
    GTE_ZEROED,
    HEADER,
    MARKER,
    MARKER_END_OF_STREAM,
    MARKER_FOOTER,
    MAX_COMPRESSED_GRAIN_BYTES,
    MAX_GD_ENTRIES,
    MAX_GRAIN_SECTORS,
    MAX_GTES_PER_GT,
    MAX_VIRTUAL_SIZE,
    NEWLINE_CHECK_BYTES,
    SECTOR,
    SPARSE_MAGIC,
    SparseHeader,
)
from diskport.runs import RunKind, split_runs
from diskport.sources.base import Source
from diskport.sources.compression import inflate_errors

if TYPE_CHECKING:
    from array import array

    import numpy as np

_GT_CACHE = 16
_GRAIN_CACHE = 4

# Run kinds inside one extent.
_ZERO, _DATA, _COMPRESSED = RunKind.ZERO, RunKind.DATA, RunKind.COMPRESSED


def _zero_fill(buf: memoryview) -> None:
    import numpy as np

    np.frombuffer(buf, dtype=np.uint8)[:] = 0


def read_sparse_header(source: Source) -> SparseHeader:
    """The header at the start of a sparse extent file (not yet resolved through the footer)."""
    if source.size < HEADER.size:
        raise file_corrupt(source, f"file is {source.size} bytes, too short for a VMDK sparse extent header")
    raw = source.read_exact(0, HEADER.size, "sparse extent header", FMT)
    if raw[:4] == COWD_MAGIC:
        raise UnsupportedImage("is an ESX Server sparse extent (COWD, VMFSSPARSE); only hosted sparse extents "
                               "are supported", path=source.name, fmt=FMT,
                               hint="convert it on the ESX host (vmkfstools -i) first")
    if raw[:4] != SPARSE_MAGIC:
        raise file_corrupt(source, f"is not a VMDK sparse extent (magic {raw[:4]!r})", 0)
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
        raise file_corrupt(source, "the grain directory is deferred to the footer but the file is too short to "
                       "hold one", hint="the stream is incomplete")
    at = end - 3 * SECTOR
    raw = source.read_exact(at, 3 * SECTOR, "footer", FMT)
    _, marker_size, marker_type = MARKER.unpack_from(raw, 0)
    eos = MARKER.unpack_from(raw, 2 * SECTOR)
    if (raw[SECTOR:SECTOR + 4] != SPARSE_MAGIC or marker_size != 0 or marker_type != MARKER_FOOTER
            or eos != (0, 0, MARKER_END_OF_STREAM)):
        raise file_corrupt(source, "the grain directory is deferred to the footer, but there is no valid footer "
                       "and end-of-stream marker at the end of the file", at,
                       hint="the stream is incomplete or damaged")
    footer = SparseHeader.unpack(raw, SECTOR)
    if footer.gd_offset == GD_AT_END:
        raise file_corrupt(source, "the footer defers the grain directory to itself", at + SECTOR)
    return footer


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
            raise file_corrupt(source, f"flat extent '{filename}' is {source.size} bytes, but the descriptor "
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
            raise file_corrupt(self.source, f"flat extent data at {self.file_offset + start:#x}+{len(buf):#x} lies "
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
            raise file_corrupt(source, "the header's newline check bytes are altered", 73,
                           hint="the file was probably transferred in text mode (FTP ASCII); copy it again "
                                "in binary mode")
        if header.compress_algorithm not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
            raise UnsupportedImage(f"unknown grain compression algorithm {header.compress_algorithm}",
                                   path=source.name, fmt=FMT)
        if not 1 <= header.gtes_per_gt <= MAX_GTES_PER_GT:
            raise file_corrupt(source, f"{header.gtes_per_gt} entries per grain table is outside 1..{MAX_GTES_PER_GT}",
                           44)
        if not 1 <= header.grain_sectors <= MAX_GRAIN_SECTORS:
            raise file_corrupt(source, f"grain size of {header.grain_sectors} sectors is outside "
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
            raise file_corrupt(source, f"capacity of {header.capacity} sectors is implausibly large", 12)
        if header.overhead * SECTOR > source.size:
            raise file_corrupt(source, f"file is {source.size} bytes but its grains begin at "
                           f"{header.overhead * SECTOR:#x}", 64, hint="the file is truncated")
        self.gtes = header.gtes_per_gt
        self.gt_span = self.gtes * self.grain_size
        self.gd = self._read_grain_directory()
        self._slot = SECTOR if self.compressed else self.grain_size
        self._slots = -(-source.size // self._slot)
        # One bit per slot of the file, made (numpy) when the mapping first reads a grain table.
        self._claimed: np.ndarray | None = None
        self._gt_checked = bytearray(len(self.gd))
        self._tables: OrderedDict[int, tuple[np.ndarray, np.ndarray] | None] = OrderedDict()
        self._grains: OrderedDict[int, bytes] = OrderedDict()

    def _grain_count(self, gt_index: int) -> int:
        """Entries of grain table ``gt_index`` that lie within the capacity (only the last table is short)."""
        rest = self.size - gt_index * self.gt_span
        return min(self.gtes, -(-rest // self.grain_size))

    def _read_grain_directory(self) -> array[int]:
        """The grain directory, each table it names inside the file (checked on the furthest one, with ``max``
        at C speed and no numpy; the first bad entry is only searched for once one is known to exist)."""
        src = self.source
        assert src is not None
        entries = -(-self.size // self.gt_span)
        if entries == 0:
            return uint_table(b"", "I", "little")
        if entries > MAX_GD_ENTRIES:
            raise UnsupportedImage(f"grain directory of {entries} entries exceeds the {MAX_GD_ENTRIES} entry "
                                   "limit", path=src.name, fmt=FMT)
        at = self.header.gd_offset * SECTOR
        if at + 4 * entries > src.size:
            raise file_corrupt(src, f"grain directory at {at:#x} ({entries} entries) lies beyond the end of the "
                           f"file ({src.size} bytes)", 56)
        gd = uint_table(src.read_exact(at, 4 * entries, "grain directory", FMT), "I", "little")
        last_table = 4 * self._grain_count(entries - 1)  # only the last table is short

        def table_end(i: int) -> int:
            return gd[i] * SECTOR + (4 * self.gtes if i < entries - 1 else last_table)

        furthest = max(filter(None, gd[:-1]), default=0)
        if ((furthest and furthest * SECTOR + 4 * self.gtes > src.size)
                or (gd[-1] and table_end(entries - 1) > src.size)):
            i = next(i for i, sector in enumerate(gd) if sector and table_end(i) > src.size)
            raise file_corrupt(src, f"grain directory entry {i} points to a grain table at {gd[i] * SECTOR:#x} "
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
        import numpy as np

        entries = np.frombuffer(raw, dtype="<u4").astype(np.uint64)
        absent = entries == 0
        if self.zeroed_grains:
            absent |= entries == GTE_ZEROED
        hosts = entries * np.uint64(SECTOR)
        kinds = np.where(absent, _ZERO, _COMPRESSED if self.compressed else _DATA).astype(np.int8)
        if self.compressed:
            needed: np.ndarray | int = GRAIN_MARKER.size if self.markers else 1
        else:
            grain_starts = gt_index * self.gt_span + np.arange(count, dtype=np.uint64) * np.uint64(self.grain_size)
            needed = np.minimum(np.uint64(self.grain_size), np.uint64(self.size) - grain_starts)
        bad = np.flatnonzero(~absent & (hosts + needed > np.uint64(src.size)))
        if bad.size:
            i = int(bad[0])
            raise file_corrupt(src, f"grain table {gt_index} maps grain {i} to {int(hosts[i]):#x}, beyond the end "
                           f"of the file ({src.size} bytes)", at + 4 * i)
        if not self._gt_checked[gt_index]:
            self._claim(hosts[~absent], gt_index)
            self._gt_checked[gt_index] = True
        table = (kinds, hosts)
        self._remember(gt_index, table)
        return table

    def _claim(self, hosts: np.ndarray, gt_index: int) -> None:
        """Mark the file slots of a grain table's grains as used; a slot used twice is a shared grain."""
        import numpy as np

        if self._claimed is None:
            self._claimed = np.zeros(-(-self._slots // 8), dtype=np.uint8)
        src = self.source
        assert src is not None
        slots, counts = np.unique(hosts // np.uint64(self._slot), return_counts=True)
        if np.any(counts > 1):
            at = int(slots[np.flatnonzero(counts > 1)[0]]) * self._slot
            raise file_corrupt(src, f"grain table {gt_index} names the grain at {at:#x} for more than one guest grain; "
                           "a sparse extent never shares a grain")
        slots = slots[slots < np.uint64(self._slots)]
        byte = (slots >> np.uint64(3)).astype(np.intp)
        bit = (np.uint8(1) << (slots & np.uint64(7)).astype(np.uint8)).astype(np.uint8)
        taken = np.flatnonzero(self._claimed[byte] & bit)
        if taken.size:
            at = int(slots[taken[0]]) * self._slot
            raise file_corrupt(src, f"grain table {gt_index} names the grain at {at:#x}, which another grain table "
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
        import numpy as np

        gd = np.frombuffer(self.gd, dtype=np.uint32)
        index = gt_index + 1
        step = 64
        while index <= last:
            chunk = gd[index: min(index + step, last + 1)]
            present = np.flatnonzero(chunk)
            if present.size:
                return index + int(present[0])
            index += len(chunk)
            step *= 2
        return last + 1

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        import numpy as np

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
                    raise file_corrupt(src, f"grain data at {host:#x}+{length:#x} lies beyond the end of the file")
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
            raise file_corrupt(src, f"compressed grain {grain_index} inflates to {len(cached)} bytes, not "
                           f"{needed}", host)
        return cached

    def _inflate(self, host: int, grain_index: int) -> bytes:
        src = self.source
        assert src is not None
        limit = 2 * self.grain_size
        if self.markers:
            lba, size = GRAIN_MARKER.unpack(src.read_exact(host, GRAIN_MARKER.size, "grain marker", FMT))
            if size == 0:
                raise file_corrupt(src, "a grain table entry points at a metadata marker, not a grain", host)
            sector = grain_index * self.header.grain_sectors
            if lba != sector:
                raise file_corrupt(src, f"{DISAGREE}: the table maps guest sector {sector} to a grain whose marker "
                               f"says sector {lba}", host)
            if size > limit:
                raise file_corrupt(src, f"compressed grain of {size} bytes exceeds twice the grain size", host)
            data = src.read_exact(host + GRAIN_MARKER.size, size, "compressed grain", FMT)
        else:
            data = src.pread(host, min(limit, src.size - host))
        from isal import isal_zlib

        try:
            # ISA-L inflates the same zlib streams as zlib, about three times faster.
            inflater = isal_zlib.decompressobj()
            out = inflater.decompress(data, self.grain_size)
            if not inflater.eof:
                # Either the stream ends right after grain_size bytes, or it holds more than a grain.
                if inflater.decompress(inflater.unconsumed_tail, 1):
                    raise file_corrupt(src, f"compressed grain inflates to more than {self.grain_size} bytes", host)
                if not inflater.eof:
                    raise file_corrupt(src, "compressed grain is truncated", host)
        except inflate_errors() as e:
            raise file_corrupt(src, f"compressed grain does not inflate: {e}", host) from None
        return out

    def facts(self) -> dict[str, Any]:
        return {**super().facts(), "cluster-size": self.grain_size, "compressed": self.compressed,
                "version": self.header.version}
