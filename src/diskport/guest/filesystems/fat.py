"""FAT12, FAT16 and FAT32 (blkid's ``vfat``): identified by the boot sector, read with long file names.

Layout facts from Microsoft's "FAT: General Overview of On-Disk Format" (fatgen103, 2000): section 3 (the
boot sector and BPB), section 3.5 (the FAT type is decided by the count of data clusters alone: fewer than
4085 is FAT12, fewer than 65525 FAT16, else FAT32), section 4 (FAT entries, end-of-chain and bad-cluster
marks), section 6 (directory entries) and section 7 (long names: LFN entries of attribute 0x0F, in reverse
order before their short entry, each with the checksum of the 8.3 name). All fields are little-endian.

* **Identify**: a BPB that holds together (sector size 512-4096, a power-of-two cluster of 1-128 sectors,
  reserved sectors and FATs present, a media byte of 0xF0 or 0xF8-0xFF, the data area inside the volume, a FAT
  large enough for its clusters) and either a ``FAT..`` type string or an x86 jump, as libblkid asks. A BPB
  with ``BPB_FATSz16 == 0`` has the FAT32 layout and is read as FAT32 whatever its cluster count (as Linux
  does); others are FAT12 or FAT16 by cluster count. The label is the root directory's volume-label entry,
  else the boot sector's unless it is ``NO NAME`` (blkid's order); the UUID is the volume serial as
  ``XXXX-XXXX``; the size ``total sectors * sector size``. Names are decoded as code page 437.
* **Reading**: the FAT used is FAT 0, or the one ``BPB_ExtFlags`` names on FAT32 when mirroring is off. The
  root directory is the fixed area after the FATs on FAT12/16 and a cluster chain on FAT32. Long names are
  taken when the sequence numbers run down to 1 and every checksum matches the short entry; otherwise the
  8.3 name is used, lower-cased per the NT byte (0x0C: 0x08 base, 0x10 extension). Deleted (0xE5),
  volume-label, ``.`` and ``..`` entries are skipped; 0x00 ends a directory. Lookups fold case and match the
  8.3 name too (``PROGRA~1``), as Windows does.

**Bounds.** Every cluster number is checked against the cluster count; a chain reaching a free, reserved or
bad cluster is corrupt. A file's chain is walked only as far as a read needs, at most ``size / cluster size``
clusters (the size must fit the volume's clusters), with Brent's cycle test on the way and a checkpoint every
:data:`CHECKPOINT` clusters so a later read restarts near its cluster: memory is a few words per thousand
clusters. A directory is at most 65,536 entries (2 MiB, the spec's limit), which also cuts loops in its chain.
FAT sectors are kept in a small LRU (:data:`FAT_CACHE` chunks of :data:`FAT_CHUNK` bytes). Nothing reads a file
whole. Bad input raises :class:`CorruptImage` with ``fmt="vfat"``.

Written here because the one maintained Python FAT library, pyfatfs (MIT), is a read-write PyFilesystem2
driver over a seekable file that reads every copy of the FAT into memory when it opens a volume (tens of MB
on a large FAT32 disk), where inspection needs a bounded reader over the guest view's positional reads;
mtools (``mdir``, ``mcopy``, ``mshowfat``) is the oracle in the tests.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

from diskport.errors import CorruptImage
from diskport.guest.filesystems.base import MAX_DIR_ENTRIES, Filesystem, FilesystemSpec, FsInfo, Stat
from diskport.guest.view import Readable, read_exact

FMT = "vfat"
#: A directory holds at most this many 32-byte entries (fatgen103 section 6).
MAX_DIR_SLOTS = 65536
CHECKPOINT = 1024
FAT_CHUNK = 4096
FAT_CACHE = 64
_FAT_STRINGS = (b"FAT12   ", b"FAT16   ", b"FAT     ", b"MSDOS", b"FAT32   ")

ATTR_VOLUME_ID = 0x08
ATTR_DIRECTORY = 0x10
ATTR_LFN = 0x0F
NT_LOWER_BASE = 0x08
NT_LOWER_EXT = 0x10


@dataclass(frozen=True)
class Bpb:
    bytes_per_sector: int
    sectors_per_cluster: int
    reserved: int
    fats: int
    root_entries: int
    total_sectors: int
    fat_sectors: int
    fat32: bool
    root_cluster: int
    active_fat: int
    serial: int | None
    boot_label: bytes | None
    clusters: int

    @property
    def cluster_size(self) -> int:
        return self.bytes_per_sector * self.sectors_per_cluster

    @property
    def root_offset(self) -> int:
        return (self.reserved + self.fats * self.fat_sectors) * self.bytes_per_sector

    @property
    def root_size(self) -> int:
        return self.root_entries * 32

    @property
    def data_offset(self) -> int:
        root_sectors = -(-self.root_size // self.bytes_per_sector)
        return self.root_offset + root_sectors * self.bytes_per_sector

    @property
    def bits(self) -> int:
        if self.fat32:
            return 32
        return 12 if self.clusters < 4085 else 16

    @property
    def version(self) -> str:
        return f"FAT{self.bits}"


def _parse_bpb(sector: bytes) -> Bpb | None:
    """The BPB of a boot sector if it holds together as a FAT one, else None."""
    if len(sector) < 512:
        return None
    bps, spc, reserved, fats, root_entries, tot16, media, fatsz16 = struct.unpack_from("<HBHBHHBH", sector, 0x0B)
    tot32 = struct.unpack_from("<I", sector, 0x20)[0]
    fat32 = fatsz16 == 0
    typed = sector[0x52:0x5A] == b"FAT32   " if fat32 else any(sector[0x36:0x3E].startswith(s)
                                                              for s in _FAT_STRINGS)
    if not typed and sector[0] not in (0xEB, 0xE9):
        return None
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or reserved == 0 or fats == 0:
        return None
    if media != 0xF0 and media < 0xF8:
        return None
    total = tot16 or tot32
    if fat32:
        fat_sectors, ext_flags, root_cluster = struct.unpack_from("<IHxxI", sector, 0x24)
        if root_entries != 0:
            return None
        active = ext_flags & 0x0F if ext_flags & 0x80 else 0
        if active >= fats:
            return None
        sig_at = 0x42
    else:
        fat_sectors, root_cluster, active = fatsz16, 0, 0
        sig_at = 0x26
    if total == 0 or fat_sectors == 0:
        return None
    root_sectors = -(-root_entries * 32 // bps)
    data_start = reserved + fats * fat_sectors + root_sectors
    if data_start >= total:
        return None
    clusters = (total - data_start) // spc
    if clusters == 0:
        return None
    serial: int | None = None
    label: bytes | None = None
    if sector[sig_at] in (0x28, 0x29):
        serial = struct.unpack_from("<I", sector, sig_at + 1)[0]
        if sector[sig_at] == 0x29:
            label = sector[sig_at + 5: sig_at + 16]
    bpb = Bpb(bps, spc, reserved, fats, root_entries, total, fat_sectors, fat32, root_cluster, active, serial,
              label, clusters)
    if fat_sectors * bps * 8 < (clusters + 2) * bpb.bits:  # the FAT cannot describe every cluster
        return None
    if fat32 and not 2 <= root_cluster < clusters + 2:
        return None
    return bpb


def _decode_label(raw: bytes) -> str | None:
    text = raw.rstrip(b" \0").decode("cp437")
    return text or None


def identify(volume: Readable) -> FsInfo | None:
    """A FAT12/16/32 volume (type ``vfat``) from its boot sector, or None."""
    if volume.size < 512:
        return None
    bpb = _parse_bpb(volume.pread(0, 512))
    if bpb is None:
        return None
    details: dict[str, object] = {"cluster_size": bpb.cluster_size, "clusters": bpb.clusters,
                                  "sector_size": bpb.bytes_per_sector}
    if not bpb.fat32:
        details["sec_type"] = "msdos"
    label = None
    readable = True
    try:
        fs = FatFilesystem(volume, FsInfo(type=FMT, version=bpb.version), bpb=bpb)
        root_label = fs.volume_label()
        label = _decode_label(root_label) if root_label is not None else None
    except CorruptImage as exc:
        readable = False
        details["error"] = exc.message
    if label is None and bpb.boot_label is not None and bpb.boot_label != b"NO NAME    ":
        label = _decode_label(bpb.boot_label)
    uuid = None if bpb.serial is None else f"{bpb.serial >> 16:04X}-{bpb.serial & 0xFFFF:04X}"
    return FsInfo(type=FMT, label=label, uuid=uuid, size=bpb.total_sectors * bpb.bytes_per_sector,
                  version=bpb.version, readable=readable, details=details)


def lfn_checksum(short: bytes) -> int:
    """The checksum an LFN entry carries of its 11-byte short name (fatgen103 section 7)."""
    total = 0
    for byte in short:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def short_name(raw: bytes, nt: int) -> str:
    """The 8.3 name of a directory entry as ``NAME.EXT``, lower-cased as the NT byte asks."""
    first = b"\xe5" if raw[0] == 0x05 else raw[:1]
    base = (first + raw[1:8]).rstrip(b" ").decode("cp437")
    ext = raw[8:11].rstrip(b" ").decode("cp437")
    if nt & NT_LOWER_BASE:
        base = base.lower()
    if nt & NT_LOWER_EXT:
        ext = ext.lower()
    return f"{base}.{ext}" if ext else base


@dataclass(frozen=True)
class FatNode:
    """A file or directory: its first cluster (0: empty file, or the FAT12/16 root) and size."""

    is_dir: bool
    cluster: int
    size: int
    root: bool = False


class _Chain:
    """The clusters of one chain, walked lazily with checkpoints and Brent's cycle test."""

    def __init__(self, fs: FatFilesystem, first: int, limit: int) -> None:
        self.fs = fs
        self.limit = limit                  # clusters this chain may have at most
        fs._check_cluster(first, "a chain's first cluster")
        self.checkpoints = [first]          # cluster at index k * CHECKPOINT
        self.frontier = (0, first)          # furthest index walked and its cluster
        self.ended: int | None = None       # chain length once its end mark is seen
        self.tortoise, self.power, self.lam = first, 1, 1

    def _next(self, cluster: int) -> int | None:
        value = self.fs._fat_entry(cluster)
        if value >= self.fs.eoc:
            return None
        if value < 2 or value >= self.fs.bpb.clusters + 2:
            kind = "a free cluster" if value == 0 else "a bad cluster" if value == self.fs.eoc - 1 else \
                f"cluster {value:#x}"
            raise CorruptImage(f"a cluster chain runs into {kind} after cluster {cluster}", path=self.fs.volume.name,
                               fmt=FMT)
        return value

    def _advance(self) -> bool:
        index, cluster = self.frontier
        nxt = self._next(cluster)
        if nxt is None:
            self.ended = index + 1
            return False
        index += 1
        if index >= self.limit:
            raise CorruptImage(f"a cluster chain is longer than {self.limit} clusters (a loop?)",
                               path=self.fs.volume.name, fmt=FMT)
        if nxt == self.tortoise:
            raise CorruptImage(f"a cluster chain loops back to cluster {nxt}", path=self.fs.volume.name, fmt=FMT)
        if self.lam == self.power:
            self.tortoise, self.power, self.lam = nxt, self.power * 2, 0
        self.lam += 1
        self.frontier = (index, nxt)
        if index % CHECKPOINT == 0:
            self.checkpoints.append(nxt)
        return True

    def walk(self, start: int) -> Iterator[int]:
        """The clusters from index ``start`` to the end of the chain (or as far as the caller takes them)."""
        index, cluster = self.frontier
        if start < index:   # inside the part already walked (and tested for loops): from the nearest checkpoint
            index = start - start % CHECKPOINT
            cluster = self.checkpoints[index // CHECKPOINT]
            while index < self.frontier[0]:
                if index >= start:
                    yield cluster
                nxt = self._next(cluster)
                if nxt is None:
                    raise CorruptImage("a cluster chain changed while read", path=self.fs.volume.name, fmt=FMT)
                index, cluster = index + 1, nxt
        while True:
            index, cluster = self.frontier
            if index >= start:
                yield cluster
            if self.ended is not None or not self._advance():
                return


class FatFile:
    """A file's bytes, read cluster run by cluster run."""

    def __init__(self, fs: FatFilesystem, node: FatNode, name: str) -> None:
        self.fs = fs
        self.name = name
        self.size = node.size
        cs = fs.bpb.cluster_size
        needed = -(-node.size // cs)
        if needed > fs.bpb.clusters:
            raise CorruptImage(f"a file of {node.size} bytes is larger than the volume's clusters", path=fs.volume.name,
                               fmt=FMT)
        if needed and node.cluster == 0:
            raise CorruptImage(f"a file of {node.size} bytes has no clusters", path=fs.volume.name, fmt=FMT)
        self.needed = needed
        self.chain = _Chain(fs, node.cluster, needed) if needed else None

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"read {offset}+{length}")
        end = min(offset + length, self.size)
        if offset >= end or self.chain is None:
            return b""
        cs = self.fs.bpb.cluster_size
        parts: list[bytes] = []
        pos = offset
        run_cluster: int | None = None
        run_index = offset // cs    # file cluster index where the current run of contiguous clusters starts
        run_len = 0
        for cluster in self.chain.walk(run_index):
            if run_cluster is not None and cluster == run_cluster + run_len:
                run_len += 1
            else:
                if run_cluster is not None:
                    pos = self._flush(parts, run_cluster, run_index, run_len, pos, end)
                    run_index += run_len
                run_cluster, run_len = cluster, 1
            if (run_index + run_len) * cs >= end:
                break
        if run_cluster is None or (run_index + run_len) * cs < end:
            raise CorruptImage(f"a file's cluster chain ends before its size ({self.size} bytes)",
                               path=self.fs.volume.name, fmt=FMT)
        self._flush(parts, run_cluster, run_index, run_len, pos, end)
        return b"".join(parts)

    def _flush(self, parts: list[bytes], cluster: int, first_index: int, count: int, pos: int, end: int) -> int:
        cs = self.fs.bpb.cluster_size
        stop = min(end, (first_index + count) * cs)
        at = self.fs._cluster_offset(cluster) + (pos - first_index * cs)
        parts.append(read_exact(self.fs.volume, at, stop - pos, "file data", FMT))
        return stop


class FatFilesystem(Filesystem[FatNode]):
    """A FAT12/16/32 volume, read-only, names compared without case."""

    case_insensitive = True

    def __init__(self, volume: Readable, info: FsInfo, *, bpb: Bpb | None = None) -> None:
        super().__init__(volume, info)
        if bpb is None:
            bpb = _parse_bpb(volume.pread(0, 512))
            if bpb is None:
                raise CorruptImage("no FAT boot sector", path=volume.name, fmt=FMT)
        self.bpb = bpb
        self.eoc = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[bpb.bits]
        self.fat_offset = (bpb.reserved + bpb.active_fat * bpb.fat_sectors) * bpb.bytes_per_sector
        self.fat_bytes = bpb.fat_sectors * bpb.bytes_per_sector
        self._chunks: OrderedDict[int, bytes] = OrderedDict()

    def _corrupt(self, message: str) -> NoReturn:
        raise CorruptImage(message, path=self.volume.name, fmt=FMT)

    def _check_cluster(self, cluster: int, what: str) -> None:
        if not 2 <= cluster < self.bpb.clusters + 2:
            self._corrupt(f"{what} {cluster} is outside the volume's clusters 2..{self.bpb.clusters + 1}")

    def _cluster_offset(self, cluster: int) -> int:
        return self.bpb.data_offset + (cluster - 2) * self.bpb.cluster_size

    def _fat_bytes(self, at: int, n: int) -> bytes:
        """``n`` (1-4) bytes at offset ``at`` of the active FAT, through the chunk cache."""
        out = b""
        while n:
            index, within = divmod(at, FAT_CHUNK)
            chunk = self._chunks.get(index)
            if chunk is None:
                size = min(FAT_CHUNK, self.fat_bytes - index * FAT_CHUNK)
                chunk = read_exact(self.volume, self.fat_offset + index * FAT_CHUNK, size, "the FAT", FMT)
                self._chunks[index] = chunk
                if len(self._chunks) > FAT_CACHE:
                    self._chunks.popitem(last=False)
            else:
                self._chunks.move_to_end(index)
            piece = chunk[within: within + n]
            if not piece:
                self._corrupt(f"a FAT entry at byte {at} lies past the FAT ({self.fat_bytes} bytes)")
            out += piece
            at += len(piece)
            n -= len(piece)
        return out

    def _fat_entry(self, cluster: int) -> int:
        bits = self.bpb.bits
        if bits == 32:
            return int.from_bytes(self._fat_bytes(cluster * 4, 4), "little") & 0x0FFFFFFF
        if bits == 16:
            return int.from_bytes(self._fat_bytes(cluster * 2, 2), "little")
        pair = int.from_bytes(self._fat_bytes(cluster * 3 // 2, 2), "little")
        return pair >> 4 if cluster & 1 else pair & 0xFFF

    # ---- directories ------------------------------------------------------------------------------------
    def _slots(self, node: FatNode) -> Iterator[bytes]:
        """The directory's 32-byte entries in order, up to the end mark or MAX_DIR_SLOTS."""
        if node.root and not self.bpb.fat32:
            area = self.bpb.root_size
            for at in range(0, area, 4096):
                block = read_exact(self.volume, self.bpb.root_offset + at, min(4096, area - at), "the root directory",
                                   FMT)
                for i in range(0, len(block) - 31, 32):
                    yield block[i: i + 32]
            return
        cs = self.bpb.cluster_size
        chain = _Chain(self, node.cluster, min(self.bpb.clusters, max(1, MAX_DIR_SLOTS * 32 // cs)))
        for cluster in chain.walk(0):
            data = read_exact(self.volume, self._cluster_offset(cluster), cs, "a directory cluster", FMT)
            for i in range(0, cs, 32):
                yield data[i: i + 32]

    def volume_label(self) -> bytes | None:
        """The raw 11-byte name of the root directory's volume-label entry, if it has one."""
        for count, slot in enumerate(self._slots(self.root())):
            if slot[0] == 0 or count >= 2048:
                return None
            if slot[0] != 0xE5 and slot[11] & 0x3F != ATTR_LFN and slot[11] & ATTR_VOLUME_ID:
                return slot[:11]
        return None

    def _named(self, node: FatNode) -> Iterator[tuple[str, str, FatNode]]:
        """``(long or short name, short name, node)`` of each live entry."""
        parts: dict[int, bytes] = {}
        expect = 0          # next LFN sequence number wanted (0: none in progress)
        checksum = -1
        for slot in self._slots(node):
            first, attr = slot[0], slot[11]
            if first == 0:
                return
            if first == 0xE5:
                expect = 0
                continue
            if attr & 0x3F == ATTR_LFN:
                seq = first & 0x1F
                if first & 0x40:
                    parts, expect, checksum = {}, seq, slot[13]
                if seq == 0 or seq != expect or slot[13] != checksum:
                    expect = 0
                    continue
                parts[seq] = slot[1:11] + slot[14:26] + slot[28:32]
                expect = seq - 1 if seq > 1 else -1     # -1: complete, the short entry comes next
                continue
            long_name = None
            if expect == -1 and parts and lfn_checksum(slot[:11]) == checksum:
                raw = b"".join(parts[i] for i in sorted(parts))
                end = len(raw)
                for i in range(0, len(raw), 2):
                    if raw[i: i + 2] == b"\0\0":
                        end = i
                        break
                long_name = raw[:end].decode("utf-16-le", "surrogatepass") or None
            expect = 0
            if attr & ATTR_VOLUME_ID:
                continue
            short = short_name(slot[:11], slot[12])
            if short in (".", ".."):
                continue
            hi, lo, size = struct.unpack_from("<H4xHI", slot, 20)
            cluster = lo | (hi << 16 if self.bpb.fat32 else 0)
            is_dir = bool(attr & ATTR_DIRECTORY)
            if is_dir:
                if cluster == 0:
                    self._corrupt(f"directory {short!r} has no clusters")
                size = 0
            name = long_name or short
            if "/" in name or "\0" in name:
                self._corrupt(f"a directory entry's name holds '/' or NUL: {name!r}")
            yield name, short, FatNode(is_dir, cluster, size)

    # ---- the interface ---------------------------------------------------------------------------------------
    def root(self) -> FatNode:
        return FatNode(True, self.bpb.root_cluster if self.bpb.fat32 else 0, 0, root=True)

    def stat_node(self, node: FatNode) -> Stat:
        return Stat("dir" if node.is_dir else "file", node.size)

    def entries(self, node: FatNode) -> Iterator[tuple[str, FatNode]]:
        if not node.is_dir:
            self._corrupt("not a directory")
        for name, _short, child in self._named(node):
            yield name, child

    def find_entry(self, node: FatNode, name: str) -> FatNode | None:
        want = name.casefold()
        for count, (entry, short, child) in enumerate(self._named(node)):
            if count >= MAX_DIR_ENTRIES:
                self._corrupt(f"a directory holds more than {MAX_DIR_ENTRIES} entries")
            if entry.casefold() == want or short.casefold() == want:
                return child
        return None

    def open_node(self, node: FatNode) -> Readable:
        if node.is_dir:
            self._corrupt("not a regular file")
        return FatFile(self, node, f"{self.volume.name}:cluster {node.cluster}")


def open_fat(volume: Readable, info: FsInfo) -> FatFilesystem:
    return FatFilesystem(volume, info)


SPEC = FilesystemSpec(FMT, identify, open_fat)
