"""A streamOptimized VMDK read front to back from a forward-only stream (spec "Stream-Optimized Compressed
Sparse Extents"), checked against its own grain tables as it passes.

streamOptimized read from a file follows its grain tables, read from a stream it follows its grain markers: both
readings must give the same disk, so the grain a table names must carry a marker for that same guest sector, or
the file is corrupt (two disks in one file).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from diskport.errors import CorruptImage
from diskport.formats.base import DiskImage, Extent
from diskport.formats.vmdk.descriptor import parse_descriptor, read_embedded_descriptor, read_identity
from diskport.formats.vmdk.spec import (
    COMPRESSION_DEFLATE,
    DISAGREE,
    FLAG_COMPRESSED_GRAINS,
    FLAG_MARKERS,
    FLAG_ZEROED_GRAIN_GTE,
    FMT,
    GD_AT_END,
    GRAIN_MARKER,
    GTE_ZEROED,
    HEADER,
    MARKER,
    MARKER_END_OF_STREAM,
    MARKER_FOOTER,
    MARKER_GRAIN_DIRECTORY,
    MARKER_GRAIN_TABLE,
    MAX_GD_ENTRIES,
    MAX_GRAIN_SECTORS,
    MAX_GTES_PER_GT,
    MAX_VIRTUAL_SIZE,
    SECTOR,
    SPARSE_MAGIC,
    SparseHeader,
)
from diskport.sources.base import HeadSource
from diskport.sources.compression import inflate_errors
from diskport.sources.stream import DecompressingStream

if TYPE_CHECKING:
    import numpy as np

# numpy, isal and hashlib are imported where a stream is read: this module loads with every VMDK reader.


class StreamedVmdkImage(DiskImage):
    """A streamOptimized VMDK read front to back from a forward-only stream (inside gzip, say), no scratch.

    The grains follow the header and descriptor in ascending order, each behind a grain marker (spec
    "Stream-Optimized Compressed Sparse Extents"); the grain tables, grain directory and footer that follow are
    metadata markers that a sequential reader skips. Grains out of order cannot be streamed and are refused
    with that said. Gaps between grains read as zeros.
    """

    format = FMT

    def __init__(self, stream: DecompressingStream, head: bytes) -> None:
        import hashlib

        super().__init__(stream.source)
        self._blake2b = hashlib.blake2b
        self.stream = stream
        self.compression = [stream.kind] if stream.kind else []
        src = HeadSource(stream.source.name, head)
        header = SparseHeader.unpack(head) if len(head) >= HEADER.size else None
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
        digest = self._blake2b(struct.pack("<QQ", host_sector, index), key=self._key, digest_size=16).digest()
        return int.from_bytes(digest, "little")

    def _read_metadata(self, kind: int, sectors: int, at: int) -> None:
        """A metadata marker's sectors: grain tables and the directory are kept as hashes and entries, the footer
        for where the directory is; anything else is skipped."""
        self._skip(SECTOR - MARKER.size)
        data_sector = at // SECTOR + 1
        header = self.header
        if kind == MARKER_GRAIN_TABLE and sectors * SECTOR <= 4 * MAX_GTES_PER_GT:
            self._table_sums[data_sector] = self._table_sum(self._read(sectors * SECTOR))
            return
        if kind == MARKER_GRAIN_DIRECTORY:
            needed = -(-self.virtual_size // (header.gtes_per_gt * self.grain_size))
            if needed > MAX_GD_ENTRIES or 4 * needed > sectors * SECTOR:
                raise self.corrupt(f"grain directory of {sectors} sectors does not fit the capacity", at)
            import numpy as np

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
        import numpy as np

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
                    import numpy as np

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
            marker = self._read(MARKER.size)
            if not marker:
                self._end_without_marker()
                break
            value, size, kind = MARKER.unpack(marker)
            marker_at = self._consumed - MARKER.size
            if size == 0:  # a metadata marker: read what the check needs, skip the rest
                if kind == MARKER_END_OF_STREAM:
                    break
                if value > MAX_GD_ENTRIES:
                    raise self.corrupt(f"metadata marker of {value} sectors is implausibly large", marker_at)
                self._read_metadata(kind, value, marker_at)
                continue
            offset = value * SECTOR
            if size > 2 * grain or size < MARKER.size - GRAIN_MARKER.size:
                raise self.corrupt(f"compressed grain of {size} bytes is smaller than a zlib stream or larger "
                                   "than twice the grain size",
                                   self._consumed - MARKER.size)
            if offset % grain or offset < pos or offset >= self.virtual_size:
                raise self.unsupported(f"grain for sector {value} is out of order or out of range, so the image "
                                       "cannot be read as a stream", hint="decompress the file first and convert that")
            grain_number = offset // grain
            table = grain_number // self.header.gtes_per_gt
            pair = self._pair(marker_at // SECTOR, grain_number % self.header.gtes_per_gt)
            self._marker_sums[table] = (self._marker_sums.get(table, 0) + pair) % (1 << 128)
            compressed = marker[GRAIN_MARKER.size:] + self._read(size - (MARKER.size - GRAIN_MARKER.size))
            self._skip(-(GRAIN_MARKER.size + size) % SECTOR)
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
        from isal import isal_zlib

        try:
            inflater = isal_zlib.decompressobj()
            out = inflater.decompress(data, self.grain_size)
        except inflate_errors() as e:
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
    if len(head) < HEADER.size or head[:4] != SPARSE_MAGIC:
        return False
    header = SparseHeader.unpack(head)
    return (header.flags & FLAG_MARKERS != 0 and header.flags & FLAG_COMPRESSED_GRAINS != 0
            and (header.descriptor_offset + header.descriptor_size) * SECTOR <= len(head))
