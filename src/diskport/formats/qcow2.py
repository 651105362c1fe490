"""qcow2 reader, versions 2 and 3 (qemu ``docs/interop/qcow2.rst``).

Implements the header (spec "Header"), header extensions, the two-level L1/L2 cluster mapping, zero clusters,
compressed clusters (deflate and zstd, spec "Compressed Clusters Descriptor") and extended L2 entries with
32 subclusters per cluster (spec "Extended L2 Entries"). Refcounts and snapshots are not needed to read the
active image and are not read.

Safety: every table offset is checked against the file size and alignment before it is read; the L1 table is
bounded by what the virtual size needs (and by qemu's own 32 MiB limit); only one L2 table is decoded at a time
(plus a small cache), so memory does not grow with the image. Images that need anything outside the file
(backing file, external data file) or a key (encryption) are refused with the feature named.

Sharing: in the active image's mapping (one L1 table and the L2 tables it names) every guest cluster has its own
host cluster. qcow2 shares clusters only between snapshots (and counts the sharing in the refcounts, which
copy-on-write then honours), never between two guest clusters of one L1 tree, and an L2 table belongs to
one L1 entry. So a host cluster named by two L1 entries, by two data entries, or by an L2 table and a data entry
is refused as corrupt without reading the refcounts: that is how a 256 KiB file would otherwise expand into a
terabyte of real data. The check keeps one bit per host cluster of the file (its own cluster count, 2 MiB for
1 TiB of 64 KiB clusters) and claims each L2 table's clusters once, when the table is first read. Compressed
clusters are packed byte by byte and may share a host cluster, so for them only a descriptor repeated within
one L2 table is refused.

Opening needs no numpy (``inspect`` reads no L2 table): the L1 table is checked with the standard library at C
speed (see :meth:`Qcow2Image._check_l1`), and numpy is imported when the mapping first decodes an L2 table;
zstandard when a zstd cluster is first decompressed.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from diskport.errors import CorruptImage, UnsafeImage, UnsupportedImage
from diskport.formats.base import DiskImage, Extent, uint_table
from diskport.formats.qcow2_spec import (
    COMPRESSION_NAMES,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    FMT,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    INCOMPAT_KNOWN,
    L1_OFFSET_MASK,
    L2_OFFSET_MASK,
    MAGIC,
    MAX_L1_BYTES,
    OFLAG_COMPRESSED,
    OFLAG_ZERO,
)
from diskport.runs import RunKind, split_runs
from diskport.sources.base import Source

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

MAX_VIRTUAL_SIZE = 1 << 62
_L2_CACHE = 16

_ZERO, _DATA, _COMPRESSED = RunKind.ZERO, RunKind.DATA, RunKind.COMPRESSED


@functools.cache
def _decompress_pool() -> ThreadPoolExecutor:
    from concurrent.futures import ThreadPoolExecutor  # only compressed images need it: not at start-up

    return ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="qcow2-decompress")


def probe(head: bytes, source: Source) -> int:
    if head[:4] == MAGIC and len(head) >= 8 and struct.unpack(">I", head[4:8])[0] in (2, 3):
        return 100
    return 60 if head[:4] == MAGIC else 0


class Qcow2Image(DiskImage):
    format = FMT
    cs: int

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self._parse_header()
        self._l2_cache: OrderedDict[int, np.ndarray] = OrderedDict()

    # -- header -----------------------------------------------------------------------------------------

    def _parse_header(self) -> None:
        src = self.source
        if src.size < 72:
            raise self.corrupt(f"file is {src.size} bytes, too short for a qcow2 header")
        head = src.read_exact(0, min(src.size, 4096), "header", FMT)
        (magic, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off,
         _rc_off, _rc_clusters, nb_snapshots, _snap_off) = struct.unpack_from(">4sIQIIQIIQQIIQ", head, 0)
        if magic != MAGIC:
            raise self.corrupt("bad magic")
        if version not in (2, 3):
            raise UnsupportedImage(f"qcow2 version {version} is not supported (only 2 and 3)",
                                   path=src.name, fmt=FMT)
        self.version = version
        if not 9 <= cluster_bits <= 21:
            raise self.corrupt(f"cluster_bits {cluster_bits} outside 9..21", 20)
        self.cluster_bits = cluster_bits
        self.cluster_size = self.cs = cs = 1 << cluster_bits
        incompat = compat = autoclear = 0
        refcount_order = 4
        header_length = 72
        compression_type = 0
        if version == 3:
            if len(head) < 104:
                raise self.corrupt("version 3 header is truncated")
            incompat, compat, autoclear, refcount_order, header_length = struct.unpack_from(">QQQII", head, 72)
            if header_length < 104 or header_length > cs or header_length > len(head):
                raise self.corrupt(f"header_length {header_length} out of range", 100)
            if header_length > 104:
                compression_type = head[104]
        self.incompatible = incompat
        self.compatible = compat
        self.autoclear = autoclear
        self.refcount_bits = 1 << refcount_order if refcount_order < 7 else 0
        self.nb_snapshots = nb_snapshots

        extensions = self._parse_extensions(head, header_length, cs)

        if incompat & INCOMPAT_CORRUPT:
            raise CorruptImage("image is marked corrupt by qemu (incompatible feature bit 1)",
                               path=src.name, fmt=FMT, hint="repair it with 'qemu-img check -r all' first")
        unknown = incompat & ~INCOMPAT_KNOWN
        if unknown:
            names = self._feature_names(extensions, unknown)
            raise UnsupportedImage(f"unknown incompatible features {names}", path=src.name, fmt=FMT)
        if backing_off:
            if backing_len > 1023 or backing_off + backing_len > src.size:
                raise self.corrupt("backing file name out of range", 8)
            name = src.read_exact(backing_off, backing_len, "backing file name", FMT).decode("utf-8", "replace")
            raise UnsafeImage(f"has a backing file '{name}'; diskport does not follow external references",
                              path=src.name, fmt=FMT,
                              hint="convert the whole chain into one image with its own tools first")
        if incompat & INCOMPAT_DATA_FILE:
            name = extensions.get(EXT_DATA_FILE, b"").decode("utf-8", "replace") or "(unnamed)"
            raise UnsafeImage(f"keeps its data in an external data file '{name}'; "
                              "diskport does not follow external references", path=src.name, fmt=FMT)
        if crypt:
            kind = {1: "AES", 2: "LUKS"}.get(crypt, f"method {crypt}")
            raise UnsupportedImage(f"is encrypted ({kind}); decrypt it first", path=src.name, fmt=FMT)
        if compression_type not in COMPRESSION_NAMES:
            raise UnsupportedImage(f"unknown compression type {compression_type}", path=src.name, fmt=FMT)
        if compression_type and not incompat & INCOMPAT_COMPRESSION:
            raise self.corrupt("compression type set without its incompatible feature bit", 104)
        self.compression_type = compression_type

        if size > MAX_VIRTUAL_SIZE:
            raise self.corrupt(f"virtual size {size} is implausibly large", 24)
        self.virtual_size = size
        self.extended_l2 = bool(incompat & INCOMPAT_EXTL2)
        if self.extended_l2 and cluster_bits < 14:
            raise self.corrupt("extended L2 entries need clusters of at least 16 KiB", 20)
        self.l2_entry_size = 16 if self.extended_l2 else 8
        self.l2_entries = cs // self.l2_entry_size
        self.l2_span = self.l2_entries * cs
        self.subcluster_size = cs // 32 if self.extended_l2 else cs
        needed = -(-size // self.l2_span)
        if l1_size < needed:
            raise self.corrupt(f"L1 table has {l1_size} entries, the virtual size needs {needed}", 36)
        if needed * 8 > MAX_L1_BYTES:
            raise UnsupportedImage(f"L1 table of {needed * 8} bytes exceeds the {MAX_L1_BYTES} byte limit",
                                   path=src.name, fmt=FMT)
        if needed and (l1_off % cs or l1_off == 0):
            raise self.corrupt(f"L1 table offset {l1_off:#x} is not cluster aligned", 40)
        self.l1_offset = l1_off
        raw_l1 = src.read_exact(l1_off, needed * 8, "L1 table", FMT) if needed else b""
        self.l1 = uint_table(raw_l1, "Q", "big")
        self._check_l1(raw_l1, l1_off)
        # One bit per host cluster of the file: set once a cluster is known to hold metadata or one guest cluster.
        # Made (numpy) when the mapping first reads an L2 table; opening alone claims nothing.
        self._host_clusters = -(-src.size // cs)
        self._claimed: np.ndarray | None = None
        self._l2_checked = bytearray(len(self.l1))

    def _check_l1(self, raw: bytes, l1_off: int) -> None:
        """Every L2 table the L1 table names is cluster aligned, lies inside the file, and belongs to one L1 entry.

        Done on the whole table at C speed without numpy: the offsets are masked as one big integer, their
        alignment is one AND of it, the furthest table is ``max`` over an array of the masked entries, and
        sharing is a ``set`` of them. The first offending entry is only searched for once one is known to exist.
        """
        n = len(raw) // 8
        if raw.count(0) == len(raw):  # no L2 table at all (an empty image): one memchr-speed pass
            return
        cs, size = self.cs, self.source.size
        offsets = int.from_bytes(raw, "big") & int.from_bytes(L1_OFFSET_MASK.to_bytes(8, "big") * n, "big")
        misaligned = offsets & int.from_bytes(((cs - 1) & L1_OFFSET_MASK).to_bytes(8, "big") * n, "big")
        masked = uint_table(offsets.to_bytes(n * 8, "big"), "Q", "big")
        furthest = max(masked)
        if misaligned or (furthest and furthest + cs > size):
            i = next(i for i, off in enumerate(masked) if off and (off % cs or off + cs > size))
            raise self.corrupt(f"L1 entry {i} points to an L2 table at {masked[i]:#x} that is unaligned "
                               f"or past the end of the file", l1_off + 8 * i)
        tables = n - masked.count(0)
        if tables > 1:
            distinct = set(masked)
            distinct.discard(0)
            if len(distinct) != tables:
                shared = min(off for off, count in Counter(masked).items() if off and count > 1)
                raise self.corrupt(f"two L1 entries name the same L2 table at {shared:#x}; an L2 table belongs "
                                   "to one L1 entry", l1_off)

    def _claim_metadata(self) -> None:
        """Start the claims bitmap: the header cluster and every L2 table (none shared: :meth:`_check_l1`)."""
        import numpy as np

        self._claimed = np.zeros(-(-self._host_clusters // 8), dtype=np.uint8)
        l2_offsets = np.frombuffer(self.l1, dtype=np.uint64) & np.uint64(L1_OFFSET_MASK)
        tables = np.sort(l2_offsets[l2_offsets != 0] // np.uint64(self.cs))
        self._claim(np.concatenate([np.zeros(1, dtype=np.uint64), tables]), "metadata")

    def _parse_extensions(self, head: bytes, pos: int, cs: int) -> dict[int, bytes]:
        exts: dict[int, bytes] = {}
        limit = min(len(head), cs)
        for _ in range(64):
            if pos + 8 > limit:
                break
            etype, elen = struct.unpack_from(">II", head, pos)
            if etype == EXT_END:
                break
            if pos + 8 + elen > limit:
                raise self.corrupt(f"header extension {etype:#x} runs past the header cluster", pos)
            exts[etype] = head[pos + 8: pos + 8 + elen]
            pos += 8 + ((elen + 7) & ~7)
        return exts

    @staticmethod
    def _feature_names(exts: dict[int, bytes], bits: int) -> str:
        table = exts.get(EXT_FEATURE_TABLE, b"")
        names = {}
        for i in range(0, len(table) - 47, 48):
            ftype, fbit = table[i], table[i + 1]
            if ftype == 0:
                names[fbit] = table[i + 2: i + 48].split(b"\0")[0].decode("ascii", "replace")
        return ", ".join(names.get(b, f"bit {b}") for b in range(64) if bits >> b & 1)

    # -- mapping ----------------------------------------------------------------------------------------
    def _l2_table(self, l1_index: int) -> np.ndarray | None:
        """The raw L2 entries (big-endian decoded) for one L1 index, or None if unallocated."""
        off = int(self.l1[l1_index]) & L1_OFFSET_MASK
        if off == 0:
            return None
        cached = self._l2_cache.get(off)
        if cached is not None:
            self._l2_cache.move_to_end(off)
            return cached
        import numpy as np

        raw = self.source.read_exact(off, self.cs, f"L2 table {l1_index}", FMT)
        table = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        if not self._l2_checked[l1_index]:
            if self._claimed is None:
                self._claim_metadata()
            self._claim_table(l1_index, table)
            self._l2_checked[l1_index] = True
        self._l2_cache[off] = table
        if len(self._l2_cache) > _L2_CACHE:
            self._l2_cache.popitem(last=False)
        return table

    def _claim(self, clusters: np.ndarray, what: str) -> None:
        """Mark host clusters (indices, each once in ``clusters``) as used; one already used is corrupt."""
        import numpy as np

        assert self._claimed is not None
        clusters = clusters[clusters < np.uint64(self._host_clusters)]
        if clusters.size == 0:
            return
        byte = (clusters >> np.uint64(3)).astype(np.intp)
        bit = (np.uint8(1) << (clusters & np.uint64(7)).astype(np.uint8)).astype(np.uint8)
        taken = np.flatnonzero(self._claimed[byte] & bit)
        if taken.size:
            at = int(clusters[taken[0]]) * self.cs
            raise self.corrupt(f"{what} names host cluster {at:#x}, which another guest cluster or an L2 table "
                             "already uses; qcow2 never shares a cluster within one image's mapping")
        np.bitwise_or.at(self._claimed, byte, bit)

    def _claim_table(self, l1_index: int, table: np.ndarray) -> None:
        """Claim the host clusters of every data entry of an L2 table (within the virtual size), once."""
        import numpy as np

        count = min(self.l2_entries, -(-(self.virtual_size - l1_index * self.l2_span) // self.cs))
        if self.extended_l2:
            entries = table[0::2][:count]
            allocated = (table[1::2][:count] & np.uint64(0xFFFF_FFFF)) != 0
        else:
            entries = table[:count]
            allocated = (entries & np.uint64(OFLAG_ZERO)) == 0
        compressed = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
        hosts = entries & np.uint64(L2_OFFSET_MASK)
        data = ~compressed & allocated & (hosts != 0)
        where = f"L2 table {l1_index}"
        clusters, counts = np.unique(hosts[data] // np.uint64(self.cs), return_counts=True)
        if np.any(counts > 1):
            at = int(clusters[np.flatnonzero(counts > 1)[0]]) * self.cs
            raise self.corrupt(f"{where} maps host cluster {at:#x} for more than one guest cluster; qcow2 never "
                             "shares a cluster within one image's mapping")
        self._claim(clusters, where)
        descriptors = entries[compressed]
        if descriptors.size and np.unique(descriptors).size != descriptors.size:
            raise self.corrupt(f"{where} names the same compressed cluster for more than one guest cluster")

    def _runs(self, l1_index: int, first: int, last: int) -> Iterator[tuple[int, int, int, int]]:
        """(kind, first_unit, unit_count, host) runs over units [first, last) of one L2 table.

        A unit is a cluster, or a subcluster with extended L2 entries. ``host`` is the host offset of the
        run's first unit for DATA runs, the first cluster's descriptor for COMPRESSED runs.
        """
        import numpy as np

        table = self._l2_table(l1_index)
        units_per_cluster = 32 if self.extended_l2 else 1
        if table is None:
            yield _ZERO, first, last - first, 0
            return
        cs = self.cs
        c0 = first // units_per_cluster
        c1 = -(-last // units_per_cluster)
        if self.extended_l2:
            entries = table[0::2][c0:c1]
            bitmaps = table[1::2][c0:c1]
        else:
            entries = table[c0:c1]
        compressed = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
        hosts = entries & np.uint64(L2_OFFSET_MASK)
        if self.extended_l2:
            sub = np.arange(32, dtype=np.uint64)
            alloc = ((bitmaps[:, None] >> sub) & np.uint64(1)).astype(bool)
            zero = ((bitmaps[:, None] >> (sub + np.uint64(32))) & np.uint64(1)).astype(bool)
            plain = ~compressed
            if np.any(alloc & zero):
                i = int(np.flatnonzero((alloc & zero).any(axis=1))[0])
                raise self.corrupt(f"L2 entry {c0 + i} of table {l1_index} marks a subcluster both allocated "
                                 "and zero")
            kind = np.where(alloc, _DATA, _ZERO).astype(np.int8)
            kind[compressed] = _COMPRESSED
            kind = kind.reshape(-1)
            unit_host = (hosts[:, None] + sub * np.uint64(self.subcluster_size)).reshape(-1)
            allocated = plain[:, None] & alloc
            self._check_hosts(hosts[plain & alloc.any(axis=1)], l1_index, c0, aligned_only=True)
            self._check_hosts(unit_host.reshape(-1, 32)[allocated], l1_index, c0, aligned_only=False)
            raw_desc = np.repeat(entries, 32)
            unit_host = np.where(kind == _COMPRESSED, raw_desc, unit_host)
            u0 = c0 * 32
            kind = kind[first - u0: last - u0]
            unit_host = unit_host[first - u0: last - u0]
            step = np.uint64(self.subcluster_size)
        else:
            is_zero = (entries & np.uint64(OFLAG_ZERO)) != 0
            kind = np.where(compressed, _COMPRESSED,
                            np.where((hosts != 0) & ~is_zero, _DATA, _ZERO)).astype(np.int8)
            data = kind == _DATA
            self._check_hosts(hosts[data], l1_index, c0)
            unit_host = np.where(compressed, entries, hosts)
            step = np.uint64(cs)
        for s, e in split_runs(kind, unit_host, step):
            yield int(kind[s]), first + s, e - s, int(unit_host[s])

    def _check_hosts(self, hosts: np.ndarray, l1_index: int, c0: int, aligned_only: bool | None = None) -> None:
        """Allocated clusters must be cluster aligned and start inside the file.

        A cluster (or subcluster) that starts inside the file but ends past it is legal: qemu extends the file
        only as far as it wrote, and reads past the end as zeros. One that starts past the end means the file
        was truncated.
        """
        import numpy as np

        if hosts.size == 0:
            return
        cs = np.uint64(self.cs)
        bad = np.zeros(hosts.shape, dtype=bool)
        if aligned_only is not False:
            bad |= hosts % cs != 0
        if aligned_only is not True:
            bad |= hosts >= np.uint64(self.source.size)
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise self.corrupt(f"L2 table {l1_index} maps data to {int(hosts[i]):#x}, which is unaligned or "
                             f"past the end of the file ({self.source.size} bytes); the file may be truncated")

    def read_extent(self, ext: Extent, buf: memoryview) -> None:
        if ext.host is not None and not ext.zero:
            n = self.source.readinto(ext.host, buf)
            if n < len(buf):  # the tail of the last cluster lies past the end of the file: zeros, as qemu
                buf[n:] = bytes(len(buf) - n)
            return
        super().read_extent(ext, buf)

    def _guest_runs(self, start: int, stop: int) -> Iterator[Extent]:
        unit = self.subcluster_size
        span = self.l2_span
        pos = start
        while pos < stop:
            l1_index = pos // span
            base = l1_index * span
            table_end = min(base + span, stop)
            first = (pos - base) // unit
            last = -(-(table_end - base) // unit)
            for kind, u, count, host in self._runs(l1_index, first, last):
                g0 = max(base + u * unit, pos)
                g1 = min(base + (u + count) * unit, table_end)
                if kind == _DATA:
                    yield Extent(g0, g1 - g0, False, host + (g0 - base - u * unit))
                else:
                    yield Extent(g0, g1 - g0, kind == _ZERO, None)
            pos = table_end

    # -- compressed clusters --------------------------------------------------------------------------
    def _descriptor(self, guest: int) -> int:
        l1_index = guest // self.l2_span
        table = self._l2_table(l1_index)
        assert table is not None
        ci = (guest % self.l2_span) // self.cs
        return int(table[ci * 2] if self.extended_l2 else table[ci])

    def _decompress_cluster(self, desc: int) -> bytes:
        cs = self.cs
        shift = 62 - (self.cluster_bits - 8)
        offset = desc & ((1 << shift) - 1)
        sectors = ((desc >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        csize = sectors * 512 - (offset & 511)
        if offset >= self.source.size:
            raise self.corrupt(f"compressed cluster at {offset:#x} lies past the end of the file")
        data = self.source.pread(offset, min(csize, self.source.size - offset))
        if self.compression_type == 0:
            errors: tuple[type[Exception], ...] = (zlib.error,)
        else:
            import zstandard  # only zstd-compressed clusters need it: not at start-up

            errors = (zstandard.ZstdError,)
        try:
            if self.compression_type == 0:
                out = zlib.decompressobj(-12).decompress(data, cs)
            else:
                reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=False)
                out = reader.read(cs)
        except errors as e:
            raise self.corrupt(f"compressed cluster does not decompress: {e}", offset) from None
        if len(out) != cs:
            raise self.corrupt(f"compressed cluster decompresses to {len(out)} bytes, not {cs}", offset)
        return out

    def read_mapped(self, ext: Extent, buf: memoryview) -> None:
        """Decompress the clusters under ``ext``; several at once on a thread pool (the codecs release the GIL),
        as qemu does, so a compressed image converts at the speed of all cores."""
        cs = self.cs
        first = ext.start - ext.start % cs
        starts = range(first, ext.end, cs)
        descriptors = [self._descriptor(g) for g in starts]
        clusters = (map(self._decompress_cluster, descriptors) if len(descriptors) < 4
                    else _decompress_pool().map(self._decompress_cluster, descriptors))
        for cstart, data in zip(starts, clusters, strict=True):
            a = max(cstart, ext.start)
            b = min(cstart + cs, ext.end)
            buf[a - ext.start: b - ext.start] = data[a - cstart: b - cstart]

    # -- facts ------------------------------------------------------------------------------------------
    def format_specific(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"compat": "0.10" if self.version == 2 else "1.1"}
        if self.version == 3:
            facts.update({
                "compression-type": COMPRESSION_NAMES[self.compression_type],
                "lazy-refcounts": bool(self.compatible & 1),
                "refcount-bits": self.refcount_bits,
                "corrupt": False,
                "extended-l2": self.extended_l2,
            })
        if self.nb_snapshots:
            facts["snapshots"] = self.nb_snapshots
        if self.incompatible & INCOMPAT_DIRTY:
            facts["dirty"] = True
        return facts


def open_qcow2(source: Source) -> Qcow2Image:
    return Qcow2Image(source)
