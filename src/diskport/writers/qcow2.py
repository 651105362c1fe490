"""qcow2 v3 writer (qemu ``docs/interop/qcow2.rst``), streaming in guest order.

Layout, chosen so that the file is written front to back once and memory stays bounded:

* cluster 0 the header (written last, once everything it points to exists);
* data clusters in guest order, each L2 table written right after the data it maps (only the L2 table being
  filled is in memory);
* at the end the L1 table, the refcount blocks and the refcount table.

Because the L1 table comes last, the virtual size need not be known until :meth:`finish`: a disk arriving as a
decompressed stream of unknown length is written in one pass like any other.

Zero clusters stay unallocated (the image has no backing file, so they read as zeros). With compression
(deflate as qemu writes it: raw deflate with a 4 KiB window; or zstd), clusters are compressed on a thread pool
(zlib and zstandard release the GIL) and packed byte by byte as qemu does; a cluster that does not shrink is
stored uncompressed. Refcounts are kept as one 16-bit counter per host cluster: 32 KiB per GiB of output at
64 KiB clusters. The tables are :mod:`array` arrays in native order, byte-swapped to big-endian as they are
written (no numpy: the copy path does not pay its import).

The L1 table is never sized from a declared virtual size up front: it grows as L2 tables are written, so memory
follows the data actually written. The virtual size itself is checked before anything is written
(:func:`check_virtual_size`): an L1 table larger than qemu's 32 MiB limit (2 PiB at 64 KiB clusters) would make an
image qemu refuses to open, so such a size is refused with the limit named rather than written.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import zlib
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from diskport.errors import DestinationError, UsageError
from diskport.formats.qcow2_spec import (
    COMPRESSION_TYPES,
    HEADER_LENGTH,
    INCOMPAT_COMPRESSION,
    MAGIC,
    MAX_L1_BYTES,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
)
from diskport.writers.base import Writer


def max_virtual_size(cluster_size: int) -> int:
    """The largest virtual size whose L1 table qemu accepts, at ``cluster_size``."""
    return MAX_L1_BYTES // 8 * (cluster_size // 8) * cluster_size


def check_virtual_size(virtual_size: int, cluster_size: int, name: str) -> None:
    """Refuse, before anything is written, a virtual size no qcow2 at this cluster size can hold."""
    limit = max_virtual_size(cluster_size)
    if virtual_size > limit:
        raise DestinationError(f"a virtual size of {virtual_size} bytes needs an L1 table larger than qemu's "
                               f"{MAX_L1_BYTES // (1024 * 1024)} MiB limit (at most {limit} bytes with "
                               f"{cluster_size}-byte clusters)", path=name, fmt="qcow2",
                               hint="the source's declared size is implausible; check it with 'diskport inspect'")


def _deflate(data: memoryview) -> bytes:
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


_zstd_local = threading.local()


def _zstd(data: memoryview) -> bytes:
    # A ZstdCompressor is not thread safe: one per worker thread.
    comp = getattr(_zstd_local, "compressor", None)
    if comp is None:
        import zstandard  # only a zstd job pays its import

        comp = _zstd_local.compressor = zstandard.ZstdCompressor(level=3)
    return bytes(comp.compress(data))


def _big_endian(table: array[int]) -> bytes:
    """``table``'s bytes in big-endian order (qcow2's), leaving ``table`` as it is."""
    if sys.byteorder == "little":
        table = array(table.typecode, table)
        table.byteswap()
    return table.tobytes()


def _zeros(typecode: str, n: int) -> array[int]:
    return array(typecode, bytes(n * array(typecode).itemsize))


class Qcow2Writer(Writer):
    fmt = "qcow2"

    def __init__(self, fd: int, virtual_size: int | None, *, name: str, cluster_size: int = 65536,
                 compression: str | None = None, threads: int | None = None, sync: bool = False,
                 direct_fd: int = -1) -> None:
        if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * 1024 * 1024:
            raise UsageError(f"cluster size {cluster_size} is not a power of two from 512 to 2097152")
        if compression is not None and compression not in COMPRESSION_TYPES:
            raise UsageError(f"unknown qcow2 compression '{compression}' (zlib or zstd)")
        self.fd = fd
        self.direct_fd = direct_fd
        self.name = name
        self.sync = sync
        self.size = virtual_size  # None until finish() when the source is a stream
        self.cs = cluster_size
        self.cluster_bits = cluster_size.bit_length() - 1
        self.zero_granularity = cluster_size
        self.compression = compression
        self.l2_entries = cluster_size // 8
        self.l2_span = self.l2_entries * cluster_size
        if virtual_size is not None:
            check_virtual_size(virtual_size, cluster_size, name)
        self.l1: array[int] = array("Q")  # grows with the L2 tables written (never from a declared size)
        self.next_cluster = 1  # first free host cluster; cluster 0 holds the header
        self.comp_pos: int | None = None     # byte offset for the next compressed cluster, if one is open
        self.refcounts = _zeros("H", 1024)
        self.refcounts[0] = 1  # the header's cluster
        self.l2: array[int] | None = None
        self.l2_index = -1
        self.pending_index = -1
        self.pending: bytearray | None = None
        self._compress: Callable[[memoryview], bytes] | None = None
        self._pool: ThreadPoolExecutor | None = None
        if compression is not None:
            self._compress = _deflate if COMPRESSION_TYPES[compression] == 0 else _zstd
            self._pool = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 2,
                                            thread_name_prefix="qcow2-compress")
        self._csize_shift = 62 - (self.cluster_bits - 8)

    # -- low level ---------------------------------------------------------------------------------------
    def _ref(self, first: int, count: int) -> None:
        end = first + count
        rc = self.refcounts
        if end > len(rc):
            rc.extend(_zeros("H", max(end, len(rc) * 2) - len(rc)))
        if count > 2 and not any(rc[first:end]):  # fresh clusters (all but a compressed run's edges)
            rc[first:end] = array("H", [1]) * count
        else:
            for i in range(first, end):
                rc[i] += 1

    def _close_compressed(self) -> None:
        if self.comp_pos is not None:
            self.next_cluster = -(-self.comp_pos // self.cs)
            self.comp_pos = None

    def _alloc_clusters(self, count: int) -> int:
        """Host cluster index of ``count`` fresh, contiguous clusters."""
        self._close_compressed()
        first = self.next_cluster
        self.next_cluster += count
        self._ref(first, count)
        return first

    def _l2_for(self, l1_index: int) -> array[int]:
        if l1_index != self.l2_index:
            self._flush_l2()
            self.l2 = _zeros("Q", self.l2_entries)
            self.l2_index = l1_index
        assert self.l2 is not None
        return self.l2

    def _flush_l2(self) -> None:
        if self.l2 is None:
            return
        host = self._alloc_clusters(1) * self.cs
        self._pwrite(_big_endian(self.l2), host)
        if self.l2_index >= len(self.l1):
            if (self.l2_index + 1) * 8 > MAX_L1_BYTES:
                raise DestinationError(f"data at guest offset {self.l2_index * self.l2_span:#x} is beyond what a "
                                       f"qcow2 L1 table of {MAX_L1_BYTES} bytes maps", path=self.name, fmt="qcow2")
            grow = min(max(self.l2_index + 1 - len(self.l1), len(self.l1)), MAX_L1_BYTES // 8 - len(self.l1))
            self.l1.extend(_zeros("Q", grow))
        self.l1[self.l2_index] = host | OFLAG_COPIED
        self.l2 = None
        self.l2_index = -1

    def _map(self, guest_cluster: int, entries: array[int]) -> None:
        """Store L2 entries for consecutive guest clusters starting at ``guest_cluster``."""
        i = 0
        while i < len(entries):
            ci = guest_cluster + i
            l1_index, slot = divmod(ci, self.l2_entries)
            take = min(len(entries) - i, self.l2_entries - slot)
            self._l2_for(l1_index)[slot: slot + take] = entries[i: i + take]
            i += take

    # -- clusters ----------------------------------------------------------------------------------------
    def _write_full(self, guest_cluster: int, data: memoryview) -> None:
        n = len(data) // self.cs
        if self._compress is None:
            first = self._alloc_clusters(n)
            self._pwrite(data, first * self.cs)
            cs = self.cs  # OFLAG_COPIED is bit 63, above every host offset: adding it is or-ing it
            self._map(guest_cluster, array("Q", range(first * cs | OFLAG_COPIED, (first + n) * cs | OFLAG_COPIED,
                                                      cs)))
            return
        assert self._pool is not None
        cs = self.cs
        pieces = [data[i * cs: (i + 1) * cs] for i in range(n)]
        entries = _zeros("Q", n)
        for i, packed in enumerate(self._pool.map(self._compress, pieces)):
            entries[i] = self._store_compressed(pieces[i], packed)
        self._map(guest_cluster, entries)

    def _store_compressed(self, raw: memoryview, packed: bytes) -> int:
        cs = self.cs
        if len(packed) >= cs - 512:  # does not pay: store as a normal cluster
            first = self._alloc_clusters(1)
            self._pwrite(raw, first * cs)
            return (first * cs) | OFLAG_COPIED
        if self.comp_pos is None:
            self.comp_pos = self.next_cluster * cs
        off = self.comp_pos
        end = off + len(packed)
        self._pwrite(packed, off)
        first_c, last_c = off // cs, (end - 1) // cs
        self._ref(first_c, last_c - first_c + 1)
        self.comp_pos = end
        self.next_cluster = last_c + 1
        sectors = ((end - 1) >> 9) - (off >> 9)
        return OFLAG_COMPRESSED | (sectors << self._csize_shift) | off

    def _flush_pending(self) -> None:
        if self.pending is None:
            return
        buf, index = self.pending, self.pending_index
        self.pending = None
        self.pending_index = -1
        if buf.count(0) != len(buf):
            self._write_full(index, memoryview(buf))

    # -- Writer API ----------------------------------------------------------------------------------------
    def write(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        cs = self.cs
        while view:
            ci, within = divmod(offset, cs)
            if within == 0 and len(view) >= cs:
                self._flush_pending()
                n = len(view) // cs
                self._write_full(ci, view[: n * cs])
                view = view[n * cs:]
                offset += n * cs
                continue
            if self.pending_index != ci:
                self._flush_pending()
                self.pending = bytearray(cs)
                self.pending_index = ci
            assert self.pending is not None
            take = min(cs - within, len(view))
            self.pending[within: within + take] = view[:take]
            view = view[take:]
            offset += take
            if within + take == cs:
                self._flush_pending()

    def write_zeros(self, offset: int, length: int) -> None:
        # Unallocated clusters read as zeros; a partly written cluster keeps the zeros it was created with.
        if self.pending is not None and offset // self.cs != self.pending_index:
            self._flush_pending()

    def finish(self, virtual_size: int) -> None:
        try:
            self._finish(virtual_size)
        finally:
            self._shutdown()

    def _finish(self, virtual_size: int) -> None:
        cs = self.cs
        self.size = virtual_size
        check_virtual_size(virtual_size, cs, self.name)
        self._flush_pending()
        self._flush_l2()
        l1_size = -(-virtual_size // self.l2_span)
        if len(self.l1) > l1_size and any(self.l1[l1_size:]):
            raise DestinationError(f"data was written past the virtual size {virtual_size}", path=self.name,
                                   fmt="qcow2")
        l1 = self.l1[:l1_size]
        l1.extend(_zeros("Q", l1_size - len(l1)))
        l1_offset = 0
        if l1_size:
            l1_offset = self._alloc_clusters(-(-l1_size * 8 // cs)) * cs
            self._pwrite(_big_endian(l1), l1_offset)
        self._close_compressed()
        used = self.next_cluster
        per_block = cs * 8 // 16
        blocks = table = 1
        while True:
            total = used + blocks + table
            need_blocks = -(-total // per_block)
            need_table = -(-need_blocks * 8 // cs)
            if need_blocks == blocks and need_table == table:
                break
            blocks, table = need_blocks, need_table
        first_block = self._alloc_clusters(blocks)
        table_at = self._alloc_clusters(table)
        total = self.next_cluster
        counts = self.refcounts[:total]
        counts.extend(_zeros("H", blocks * per_block - len(counts)))
        self._pwrite(_big_endian(counts), first_block * cs)
        rc_table = array("Q", range(first_block * cs, (first_block + blocks) * cs, cs))
        rc_table.extend(_zeros("Q", table * cs // 8 - blocks))
        self._pwrite(_big_endian(rc_table), table_at * cs)
        incompat = INCOMPAT_COMPRESSION if self.compression == "zstd" else 0
        ctype = COMPRESSION_TYPES.get(self.compression or "zlib", 0)
        header = struct.pack(">4sIQIIQIIQQIIQQQQII", MAGIC, 3, 0, 0, self.cluster_bits, virtual_size, 0,
                             l1_size, l1_offset, table_at * cs, table, 0, 0,
                             incompat, 0, 0, 4, HEADER_LENGTH)
        header += bytes([ctype]) + bytes(7) + bytes(8)  # compression type, padding, end of extensions
        self._pwrite(header, 0)
        if self.sync:
            self._flush()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def abort(self) -> None:
        self._shutdown()
