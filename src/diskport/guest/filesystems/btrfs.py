"""btrfs, read-only, single device: superblock, chunk tree, root tree, subvolumes, directories and file extents.

Layout facts come from the btrfs documentation's on-disk format pages and btrfs-progs'
``kernel-shared/uapi/btrfs_tree.h`` (field names and numbers only); everything is little-endian.

* **Superblock**: 4096 bytes at 64 KiB, magic ``_BHRfS_M`` at 64, its checksum over bytes 32..4096 in the first
  bytes (crc32c, xxhash64, sha256 or blake2b-256). When the primary is missing or its
  checksum is bad, the mirrors at 64 MiB and 256 GiB are tried (each must hold its own offset in ``bytenr``
  and a good checksum) and the report says which copy was used. A primary without the magic counts as damaged
  only when its 4 KiB are zeros (wiped): other bytes there belong to another filesystem, which leaves a btrfs
  that was once on the volume its stale mirrors. Fields: ``fsid`` 32, ``bytenr`` 48, ``flags`` 56,
  ``generation`` 72, ``root`` 80, ``chunk_root`` 88, ``total_bytes`` 112, ``num_devices`` 136, ``sectorsize``
  144, ``nodesize`` 148, ``sys_chunk_array_size`` 160, ``incompat_flags`` 188, ``csum_type`` 196,
  ``root_level`` 198, ``chunk_root_level`` 199, ``dev_item`` 201 (``devid`` first, ``uuid`` at +66), ``label``
  299, ``metadata_uuid`` 571, ``sys_chunk_array`` 811 (2048 bytes).
* **Chunks** map logical addresses to device offsets. The superblock's ``sys_chunk_array`` (pairs of a 17-byte
  key and a chunk item: ``length``, ``owner``, ``stripe_len``, ``type`` at 24, ..., ``num_stripes`` at 44, then
  32-byte stripes ``devid, offset, dev_uuid``) maps the chunk tree, whose CHUNK_ITEMs (key type 228) map the
  rest. Single and DUP chunks are read (DUP: the first copy, the second when the first's checksum fails);
  RAID0/1/10/5/6/1C3/1C4 and filesystems of more than one device are identified and reported, not read.
* **Tree blocks** (``nodesize`` bytes): a 101-byte header (``csum``, ``fsid`` 32, ``bytenr`` 48, ``generation``
  80, ``owner`` 88, ``nritems`` 96, ``level`` 100), then leaf items (25 bytes: key, data offset and size from
  the end of the header) or node pointers (33 bytes: key, ``blockptr``, ``generation``).
* **Root tree**: ROOT_ITEMs (132) give each tree's root block (``bytenr`` at 176, ``level`` at 238 of the
  item; ``root_dirid`` at 168); ROOT_REF/ROOT_BACKREF (156/144: ``dirid``, ``sequence``, ``name_len``, name)
  give the subvolume tree with names. The default subvolume is the DIR_ITEM "default" of directory 6.
* **FS trees**: INODE_ITEM (1: ``size`` at 16, ``mode`` at 52), DIR_ITEM (84, keyed by the crc32c name hash:
  used for lookups) and DIR_INDEX (96: the listing order), each ``location`` key (17), ``transid``,
  ``data_len``, ``name_len``, ``type``, name; a location of type ROOT_ITEM enters another subvolume.
  EXTENT_DATA (108, keyed by file offset): ``ram_bytes`` 8, ``compression`` 16, ``encryption`` 17, ``type`` 20
  (inline, regular, prealloc); inline data from 21; regular ``disk_bytenr`` 21, ``disk_num_bytes`` 29,
  ``offset`` 37, ``num_bytes`` 45. A hole is a zero ``disk_bytenr`` or no item at all (``no-holes``); prealloc
  reads as zeros. Symlink targets are an inline extent.
* **Compression**: zlib (the zlib module), zstd (zstandard), and lzo: btrfs frames LZO1X data as a 4-byte total
  length, then segments of a 4-byte length and at most one sector's compressed data, a segment header never
  crossing a sector boundary (the bytes left before it are padding). The LZO1X segments are decoded by
  lzallright (MIT, a Rust port of lzokay): python-lzo wraps the GPL liblzo2, which this Apache-2.0 tool cannot
  take at run time.

**Bounds.** Every tree block's checksum, ``bytenr``, ``fsid``, level (the expected one: a child is its parent's
level minus one, so a walk is at most :data:`MAX_LEVEL` deep and cannot loop) and generation (the parent's
pointer says which) are checked, keys must increase within a block and lie inside the range the parent gives
the child, item data must lie inside the block; a logical address outside every chunk, or a chunk stripe
outside the device, is refused. Compressed extents are at most 128 KiB each way and must not expand beyond
their ``ram_bytes``; inline extents at most :data:`MAX_INLINE`. Caches (parsed blocks, inodes, decompressed
extents) are bounded LRUs; a file is never read whole.

xxhash64 (``mkfs.btrfs --csum xxhash``) is computed by :func:`xxh64`, written here from the xxHash
specification: one small fixed algorithm did not justify a dependency.

Written here because the Python btrfs readers are AGPL (dissect.btrfs) or need the kernel (python-btrfs's
ioctls); ``btrfs inspect-internal dump-tree`` and the mounted filesystem are the oracles in the tests.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import google_crc32c
import lzallright
import zstandard

from diskport.errors import CorruptImage, UnsupportedImage
from diskport.guest.filesystems._superblock import c_string, chunk, uuid_text
from diskport.guest.filesystems.base import Filesystem, FilesystemSpec, FsInfo, Kind, Stat
from diskport.guest.lru import LRU
from diskport.guest.view import Readable, read_exact

SUPER_OFFSET = 0x10000
SUPER_SIZE = 4096
#: Where the superblock's copies are (the primary first).
MIRRORS = (0x10000, 0x4000000, 0x4000000000)
MAGIC = b"_BHRfS_M"
DEV_ITEM = 201
SYS_CHUNK_ARRAY = 811
SYS_CHUNK_ARRAY_MAX = 2048
HEADER = 101
ITEM = 25
KEY_PTR = 33
CHUNK_HEADER = 48
STRIPE = 32

#: Tree levels (btrfs's BTRFS_MAX_LEVEL).
MAX_LEVEL = 8
#: Chunks mapped at most.
MAX_CHUNKS = 1 << 17
#: Largest inline extent read (max_inline cannot exceed a sector; 64 KiB sectors exist).
MAX_INLINE = 64 * 1024
#: btrfs's compressed extent limit, both before and after compression.
MAX_COMPRESSED = 128 * 1024
#: A regular extent's largest span (BTRFS_MAX_EXTENT_SIZE): the window searched before a read's offset.
MAX_EXTENT = 128 * 1024 * 1024
MAX_SYMLINK = 4096
MAX_SUBVOLUMES = 4096
NODE_CACHE = 256
INODE_CACHE = 512
EXTENT_CACHE = 16

# Tree and object ids.
ROOT_TREE = 1
CHUNK_TREE = 3
FS_TREE = 5
ROOT_TREE_DIR = 6
FIRST_FREE = 256
EMPTY_SUBVOL_DIR = 2
LAST_FREE = (1 << 64) - 256
# Key types.
INODE_ITEM = 1
DIR_ITEM = 84
DIR_INDEX = 96
EXTENT_DATA = 108
ROOT_ITEM = 132
ROOT_BACKREF = 144
ROOT_REF = 156
CHUNK_ITEM = 228
U64 = (1 << 64) - 1

# Block group profile bits.
BG_DATA, BG_SYSTEM, BG_METADATA = 0x1, 0x2, 0x4
PROFILES = {0x8: "raid0", 0x10: "raid1", 0x20: "dup", 0x40: "raid10", 0x80: "raid5", 0x100: "raid6",
            0x200: "raid1c3", 0x400: "raid1c4"}
DUP = 0x20

CSUM_TYPES = {0: "crc32c", 1: "xxhash64", 2: "sha256", 3: "blake2b"}
INCOMPAT_METADATA_UUID = 0x400
_INCOMPAT_NAMES = {0x1: "mixed_backref", 0x2: "default_subvol", 0x4: "mixed_groups", 0x8: "compress_lzo",
                   0x10: "compress_zstd", 0x20: "big_metadata", 0x40: "extended_iref", 0x80: "raid56",
                   0x100: "skinny_metadata", 0x200: "no_holes", 0x400: "metadata_uuid", 0x800: "raid1c34",
                   0x1000: "zoned", 0x2000: "extent_tree_v2", 0x4000: "raid_stripe_tree",
                   0x10000: "simple_quota"}
#: Incompatible features this reader understands; others make a volume unreadable rather than misread.
_READ_INCOMPAT = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 | 0x10000

S_IFMT = 0o170000
_KINDS: dict[int, Kind] = {0o100000: "file", 0o040000: "dir", 0o120000: "symlink"}

Key = tuple[int, int, int]


def _key(raw: bytes, at: int) -> Key:
    objectid, kind, offset = struct.unpack_from("<QBQ", raw, at)
    return objectid, kind, offset


def _csum(csum_type: int, data: bytes) -> bytes | None:
    """The checksum btrfs stores for ``data`` (zero-padded to 32 bytes is not needed: callers compare a prefix),
    or None for a type this reader does not compute."""
    if csum_type == 0:
        return struct.pack("<I", google_crc32c.value(data))
    if csum_type == 1:
        return struct.pack("<Q", xxh64(data))
    if csum_type == 2:
        return hashlib.sha256(data).digest()
    if csum_type == 3:
        return hashlib.blake2b(data, digest_size=32).digest()
    return None


_M64 = (1 << 64) - 1
_P1, _P2, _P3, _P4, _P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
                           0x27D4EB2F165667C5)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _xround(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M64, 31) * _P1) & _M64


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` (the xxHash specification, seed 0 as btrfs uses it)."""
    n = len(data)
    at = 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M64, (seed + _P2) & _M64, seed, (seed - _P1) & _M64]
        lanes = struct.unpack_from(f"<{(n // 32) * 4}Q", data)
        for i in range(0, len(lanes), 4):
            v = [_xround(v[j], lanes[i + j]) for j in range(4)]
        at = (n // 32) * 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M64
        for lane in v:
            h = ((h ^ _xround(0, lane)) * _P1 + _P4) & _M64
    else:
        h = (seed + _P5) & _M64
    h = (h + n) & _M64
    while at + 8 <= n:
        h ^= _xround(0, struct.unpack_from("<Q", data, at)[0])
        h = (_rotl(h, 27) * _P1 + _P4) & _M64
        at += 8
    if at + 4 <= n:
        h ^= (struct.unpack_from("<I", data, at)[0] * _P1) & _M64
        h = (_rotl(h, 23) * _P2 + _P3) & _M64
        at += 4
    while at < n:
        h ^= (data[at] * _P5) & _M64
        h = (_rotl(h, 11) * _P1) & _M64
        at += 1
    h ^= h >> 33
    h = (h * _P2) & _M64
    h ^= h >> 29
    h = (h * _P3) & _M64
    return h ^ (h >> 32)


def name_hash(name: bytes) -> int:
    """btrfs's DIR_ITEM key offset: crc32c seeded with ~1, without the final inversion."""
    return ~int(google_crc32c.extend(1, name)) & 0xFFFFFFFF


@dataclass(frozen=True)
class Superblock:
    raw: bytes
    offset: int
    fsid: bytes
    generation: int
    root: int
    chunk_root: int
    total_bytes: int
    bytes_used: int
    num_devices: int
    sectorsize: int
    nodesize: int
    sys_chunk_array_size: int
    incompat: int
    csum_type: int
    root_level: int
    chunk_root_level: int
    devid: int
    dev_uuid: bytes
    label: str | None
    metadata_uuid: bytes

    @classmethod
    def parse(cls, raw: bytes, offset: int) -> Superblock:
        incompat = struct.unpack_from("<Q", raw, 188)[0]
        return cls(raw=raw, offset=offset, fsid=raw[32:48], generation=struct.unpack_from("<Q", raw, 72)[0],
                   root=struct.unpack_from("<Q", raw, 80)[0], chunk_root=struct.unpack_from("<Q", raw, 88)[0],
                   total_bytes=struct.unpack_from("<Q", raw, 112)[0],
                   bytes_used=struct.unpack_from("<Q", raw, 120)[0],
                   num_devices=struct.unpack_from("<Q", raw, 136)[0],
                   sectorsize=struct.unpack_from("<I", raw, 144)[0], nodesize=struct.unpack_from("<I", raw, 148)[0],
                   sys_chunk_array_size=struct.unpack_from("<I", raw, 160)[0], incompat=incompat,
                   csum_type=struct.unpack_from("<H", raw, 196)[0], root_level=raw[198], chunk_root_level=raw[199],
                   devid=struct.unpack_from("<Q", raw, DEV_ITEM)[0], dev_uuid=raw[DEV_ITEM + 66:DEV_ITEM + 82],
                   label=c_string(raw[299:299 + 256]),
                   metadata_uuid=raw[571:587] if incompat & INCOMPAT_METADATA_UUID else raw[32:48])

    def checksum_ok(self) -> bool | None:
        want = _csum(self.csum_type, self.raw[32:])
        return None if want is None else self.raw[:len(want)] == want

    def sane(self) -> bool:
        ss, ns = self.sectorsize, self.nodesize
        return (not ss & (ss - 1) and 512 <= ss <= 65536 and not ns & (ns - 1) and ss <= ns <= 65536
                and self.sys_chunk_array_size <= SYS_CHUNK_ARRAY_MAX)


def _superblock_at(volume: Readable, offset: int) -> tuple[Superblock | None, str]:
    """The superblock copy at ``offset`` and its state: "ok", "bad checksum", "unverified", or why it is none."""
    raw = chunk(volume, offset, SUPER_SIZE)
    if raw is None:
        return None, "beyond the volume"
    if raw[64:72] != MAGIC:
        return None, "no magic"
    sb = Superblock.parse(raw, offset)
    if struct.unpack_from("<Q", raw, 48)[0] != offset or not sb.sane():
        return None, "damaged"
    ok = sb.checksum_ok()
    return sb, "unverified" if ok is None else "ok" if ok else "bad checksum"


def read_superblock(volume: Readable) -> tuple[Superblock | None, dict[str, object]]:
    """The superblock to use (the primary, else the newest good mirror) and what was found, for the report."""
    primary, state = _superblock_at(volume, SUPER_OFFSET)
    notes: dict[str, object] = {"superblock": "primary", "superblock_checksum": state}
    if primary is not None and state in ("ok", "unverified"):
        return primary, notes
    if state == "no magic":
        raw = chunk(volume, SUPER_OFFSET, SUPER_SIZE)
        if raw is None or any(raw):   # another filesystem's bytes, not a wiped btrfs: its old mirrors are stale
            return None, notes
    best: Superblock | None = None
    for offset in MIRRORS[1:]:
        copy, copy_state = _superblock_at(volume, offset)
        if copy is not None and copy_state == "ok" and (best is None or copy.generation > best.generation):
            best = copy
    if best is not None:
        where = "64 MiB" if best.offset == MIRRORS[1] else "256 GiB"
        notes.update(superblock=f"mirror at {where}", superblock_checksum="ok",
                     primary_superblock=state)
        return best, notes
    return primary, notes


def identify(volume: Readable) -> FsInfo | None:
    sb, notes = read_superblock(volume)
    if sb is None:
        return None
    unknown = sb.incompat & ~_READ_INCOMPAT
    features = [name for bit, name in _INCOMPAT_NAMES.items() if sb.incompat & bit]
    details: dict[str, object] = {
        "uuid_sub": uuid_text(sb.dev_uuid), "block_size": sb.sectorsize, "node_size": sb.nodesize,
        "devices": sb.num_devices, "bytes_used": sb.bytes_used, "generation": sb.generation,
        "checksum_type": CSUM_TYPES.get(sb.csum_type, str(sb.csum_type)), "features": features, **notes,
    }
    problem = None
    if sb.num_devices != 1:
        problem = f"a multi-device filesystem ({sb.num_devices} devices) is not read"
    elif unknown:
        problem = "incompatible features diskport does not read: " + ", ".join(
            _INCOMPAT_NAMES.get(1 << b, f"unknown_{1 << b:#x}") for b in range(64) if unknown & (1 << b))
    elif notes["superblock_checksum"] == "bad checksum":
        problem = "every superblock copy has a bad checksum"
    elif sb.csum_type not in CSUM_TYPES:
        problem = f"checksum type {sb.csum_type} is not known to diskport"
    if problem:
        details["problem"] = problem
    return FsInfo(type="btrfs", label=sb.label, uuid=uuid_text(sb.fsid), size=sb.total_bytes,
                  readable=problem is None, details=details)


@dataclass(frozen=True)
class Chunk:
    logical: int
    length: int
    type: int
    stripes: tuple[tuple[int, int], ...]   # (devid, physical offset)

    @property
    def profile(self) -> str:
        return next((name for bit, name in PROFILES.items() if self.type & bit), "single")


@dataclass(frozen=True)
class _Block:
    level: int
    generation: int
    keys: list[Key]
    raw: bytes
    slots: list[tuple[int, int]]      # leaf: (data offset, size); node: (blockptr, generation)

    def data(self, i: int) -> bytes:
        at, size = self.slots[i]
        return self.raw[HEADER + at: HEADER + at + size]


@dataclass(frozen=True)
class Inode:
    size: int
    mode: int
    flags: int

    @property
    def kind(self) -> Kind:
        return _KINDS.get(self.mode & S_IFMT, "other")


@dataclass(frozen=True)
class BtrfsNode:
    """An inode of one subvolume's tree."""

    tree: int
    ino: int


@dataclass(frozen=True)
class Subvolume:
    id: int
    path: str          # from the top level, "/" separated
    parent: int
    generation: int


def _parse_chunk(raw: bytes, at: int, what: str, fail: type[CorruptImage]) -> tuple[Chunk, int]:
    """A chunk item at ``at`` of ``raw`` (its logical start supplied by the caller) and its length in bytes."""
    if at + CHUNK_HEADER > len(raw):
        raise fail(f"{what} is truncated")
    length, _owner, _stripe_len, ctype = struct.unpack_from("<QQQQ", raw, at)
    num_stripes = struct.unpack_from("<H", raw, at + 44)[0]
    size = CHUNK_HEADER + num_stripes * STRIPE
    if num_stripes == 0 or at + size > len(raw):
        raise fail(f"{what} has {num_stripes} stripes in {len(raw) - at} bytes")
    stripes = tuple(struct.unpack_from("<QQ", raw, at + CHUNK_HEADER + i * STRIPE) for i in range(num_stripes))
    return Chunk(0, length, ctype, stripes), size


class BtrfsFilesystem(Filesystem[BtrfsNode]):
    """A single-device btrfs volume, read-only, rooted at its default subvolume (or another one: :meth:`at`)."""

    sb: Superblock
    notes: dict[str, object]
    chunks: list[Chunk]
    starts: list[int]
    tree: int
    _s_nodes: LRU[int, _Block]
    _s_inodes: LRU[tuple[int, int], Inode]
    _s_extents: LRU[tuple[int, int], bytes]
    _s_roots: dict[int, tuple[int, int, int]]

    def __init__(self, volume: Readable, info: FsInfo, *, _shared: BtrfsFilesystem | None = None,
                 _tree: int | None = None) -> None:
        super().__init__(volume, info)
        if _shared is not None:
            self._s_nodes, self._s_inodes = _shared._s_nodes, _shared._s_inodes
            self._s_extents, self._s_roots = _shared._s_extents, _shared._s_roots
            self.sb = _shared.sb
            self.chunks, self.starts, self.notes = _shared.chunks, _shared.starts, _shared.notes
            self.tree = _tree if _tree is not None else _shared.tree
            self._root_dir = self._tree_root(self.tree)[2]
            return
        sb, notes = read_superblock(volume)
        if sb is None:
            raise CorruptImage("no btrfs superblock", path=volume.name, fmt="btrfs")
        self.sb, self.notes = sb, notes
        if sb.num_devices != 1:
            raise UnsupportedImage(f"a multi-device filesystem ({sb.num_devices} devices) is not read",
                                   path=volume.name, fmt="btrfs")
        if notes["superblock_checksum"] == "bad checksum":
            self._corrupt("every superblock copy has a bad checksum")
        if sb.csum_type not in CSUM_TYPES:
            raise UnsupportedImage(f"checksum type {sb.csum_type} is not known", path=volume.name, fmt="btrfs")
        if sb.incompat & ~_READ_INCOMPAT:
            raise UnsupportedImage(f"incompatible features {sb.incompat & ~_READ_INCOMPAT:#x} are not read",
                                   path=volume.name, fmt="btrfs")
        self._s_nodes = LRU(NODE_CACHE)
        self._s_inodes = LRU(INODE_CACHE)
        self._s_extents = LRU(EXTENT_CACHE)
        self._s_roots = {}
        self.chunks = []
        self.starts = []
        self._load_sys_chunks()
        self._load_chunk_tree()
        self.tree = self._default_subvolume()
        self._root_dir = self._tree_root(self.tree)[2]

    # ---- helpers ------------------------------------------------------------------------------------------
    def _corrupt(self, message: str) -> NoReturn:
        raise CorruptImage(message, path=self.volume.name, fmt="btrfs")

    def _add_chunk(self, logical: int, chunk_: Chunk) -> None:
        if len(self.chunks) >= MAX_CHUNKS:
            self._corrupt(f"more than {MAX_CHUNKS} chunks")
        if chunk_.length == 0 or logical + chunk_.length > U64:
            self._corrupt(f"chunk at {logical:#x} has length {chunk_.length}")
        i = bisect.bisect_left(self.starts, logical)
        if i < len(self.starts) and self.starts[i] == logical:
            return  # the chunk tree repeats the system chunks
        if (i > 0 and self.chunks[i - 1].logical + self.chunks[i - 1].length > logical) or (
                i < len(self.starts) and logical + chunk_.length > self.starts[i]):
            self._corrupt(f"chunk at {logical:#x} overlaps another")
        self.chunks.insert(i, Chunk(logical, chunk_.length, chunk_.type, chunk_.stripes))
        self.starts.insert(i, logical)

    def _load_sys_chunks(self) -> None:
        raw = self.sb.raw[SYS_CHUNK_ARRAY:SYS_CHUNK_ARRAY + self.sb.sys_chunk_array_size]
        at = 0
        while at < len(raw):
            if at + 17 > len(raw):
                self._corrupt("the superblock's system chunk array is truncated")
            _objectid, kind, logical = _key(raw, at)
            if kind != CHUNK_ITEM:
                self._corrupt(f"the system chunk array holds a key of type {kind}")
            chunk_, size = _parse_chunk(raw, at + 17, "a system chunk", CorruptImage)
            self._add_chunk(logical, chunk_)
            at += 17 + size
        if not self.chunks:
            self._corrupt("the superblock's system chunk array is empty")

    def _load_chunk_tree(self) -> None:
        lo, hi = (FIRST_FREE, CHUNK_ITEM, 0), (FIRST_FREE, CHUNK_ITEM, U64)
        for key, data in self._items(self.sb.chunk_root, self.sb.chunk_root_level, None, lo, hi, "chunk tree"):
            if key[:2] != lo[:2]:
                continue
            chunk_, size = _parse_chunk(data, 0, f"chunk item {key[2]:#x}", CorruptImage)
            if size > len(data):
                self._corrupt(f"chunk item {key[2]:#x} is truncated")
            self._add_chunk(key[2], chunk_)

    def profiles(self) -> dict[str, str]:
        """Each block group kind's profile ("data": "single", "metadata": "dup", ...)."""
        out: dict[str, str] = {}
        for c in self.chunks:
            for bit, name in ((BG_DATA, "data"), (BG_METADATA, "metadata"), (BG_SYSTEM, "system")):
                if c.type & bit:
                    out.setdefault(name, c.profile)
        return out

    def _physical(self, logical: int, length: int, copy: int = 0) -> list[tuple[int, int]]:
        """Device ``(offset, length)`` runs of ``length`` bytes at ``logical`` (copy ``copy`` of a DUP chunk)."""
        runs: list[tuple[int, int]] = []
        while length > 0:
            i = bisect.bisect_right(self.starts, logical) - 1
            if i < 0 or logical >= self.chunks[i].logical + self.chunks[i].length:
                self._corrupt(f"logical address {logical:#x} lies outside every chunk")
            c = self.chunks[i]
            if c.type & ~DUP & sum(PROFILES):
                raise UnsupportedImage(f"a {c.profile} chunk at {c.logical:#x} is not read (single and DUP are)",
                                       path=self.volume.name, fmt="btrfs")
            if len(c.stripes) < (2 if c.type & DUP else 1):
                self._corrupt(f"chunk at {c.logical:#x} has too few stripes for {c.profile}")
            devid, start = c.stripes[min(copy, len(c.stripes) - 1)]
            if devid != self.sb.devid:
                self._corrupt(f"chunk at {c.logical:#x} lies on device {devid}, not this one ({self.sb.devid})")
            within = logical - c.logical
            span = min(length, c.length - within)
            phys = start + within
            if phys + span > self.volume.size:
                self._corrupt(f"chunk at {c.logical:#x} maps to {phys:#x}+{span:#x}, outside the device "
                              f"({self.volume.size} bytes)")
            runs.append((phys, span))
            logical += span
            length -= span
        return runs

    def _read_logical(self, logical: int, length: int, what: str, copy: int = 0) -> bytes:
        return b"".join(read_exact(self.volume, phys, span, what, "btrfs")
                        for phys, span in self._physical(logical, length, copy))

    def _block(self, bytenr: int, level: int, generation: int | None, what: str) -> _Block:
        cached = self._s_nodes.get(bytenr)
        if cached is None:
            cached = self._s_nodes.put(bytenr, self._parse_block(bytenr, what))
        if cached.level != level:
            self._corrupt(f"{what}: tree block {bytenr:#x} is at level {cached.level}, its parent wants {level} "
                          "(a loop or a misdirected pointer)")
        if generation is not None and cached.generation != generation:
            self._corrupt(f"{what}: tree block {bytenr:#x} has generation {cached.generation}, its parent says "
                          f"{generation} (a stale or misdirected block)")
        return cached

    def _parse_block(self, bytenr: int, what: str) -> _Block:
        ns = self.nodesize
        if bytenr % self.sb.sectorsize:
            self._corrupt(f"{what}: tree block {bytenr:#x} is not sector-aligned")
        copies = 2 if self._chunk_of(bytenr).type & DUP else 1
        problem = ""
        for copy in range(copies):
            raw = self._read_logical(bytenr, ns, f"tree block {bytenr:#x}", copy)
            want = _csum(self.sb.csum_type, raw[32:])
            assert want is not None
            if raw[:len(want)] != want:
                problem = "has a bad checksum"
                continue
            if struct.unpack_from("<Q", raw, 48)[0] != bytenr:
                problem = "holds another block's address"
                continue
            if raw[32:48] != self.sb.metadata_uuid:
                problem = "belongs to another filesystem"
                continue
            return self._parse_items(bytenr, raw, what)
        self._corrupt(f"{what}: tree block {bytenr:#x} {problem}")

    def _chunk_of(self, logical: int) -> Chunk:
        i = bisect.bisect_right(self.starts, logical) - 1
        if i < 0 or logical >= self.chunks[i].logical + self.chunks[i].length:
            self._corrupt(f"logical address {logical:#x} lies outside every chunk")
        return self.chunks[i]

    def _parse_items(self, bytenr: int, raw: bytes, what: str) -> _Block:
        generation = struct.unpack_from("<Q", raw, 80)[0]
        nritems = struct.unpack_from("<I", raw, 96)[0]
        level = raw[100]
        where = f"{what}: tree block {bytenr:#x}"
        if level >= MAX_LEVEL:
            self._corrupt(f"{where} says level {level}")
        size = KEY_PTR if level else ITEM
        if nritems > (len(raw) - HEADER) // size or (level and nritems == 0):
            self._corrupt(f"{where} holds {nritems} items")
        keys: list[Key] = []
        slots: list[tuple[int, int]] = []
        room = len(raw) - HEADER
        for i in range(nritems):
            at = HEADER + i * size
            key = _key(raw, at)
            if keys and key <= keys[-1]:
                self._corrupt(f"{where} has keys out of order")
            keys.append(key)
            a, b = struct.unpack_from("<QQ" if level else "<II", raw, at + 17)
            if not level and (a + b > room or a < nritems * ITEM):
                self._corrupt(f"{where} has item {i} at {a}+{b}, outside the block")
            slots.append((a, b))
        return _Block(level, generation, keys, raw, slots)

    @property
    def nodesize(self) -> int:
        return self.sb.nodesize

    def _items(self, bytenr: int, level: int, generation: int | None, lo: Key, hi: Key, what: str,
               floor: bool = False, bounds: tuple[Key | None, Key | None] = (None, None),
               depth: int = 0) -> Iterator[tuple[Key, bytes]]:
        """Leaf items with keys in ``[lo, hi]`` in key order (with ``floor``, the last one before ``lo`` too)."""
        if depth > MAX_LEVEL:
            self._corrupt(f"{what} is deeper than {MAX_LEVEL} levels")
        block = self._block(bytenr, level, generation, what)
        low, high = bounds
        if block.keys and ((low is not None and block.keys[0] < low) or (high is not None and block.keys[-1] >= high)):
            self._corrupt(f"{what}: tree block {bytenr:#x} holds keys outside the range its parent gives it")
        if level == 0:
            start = bisect.bisect_left(block.keys, lo)
            if floor and start > 0 and (start == len(block.keys) or block.keys[start] != lo):
                start -= 1
            for i in range(start, len(block.keys)):
                if block.keys[i] > hi:
                    return
                yield block.keys[i], block.data(i)
            return
        first = max(bisect.bisect_right(block.keys, lo) - 1, 0)
        for i in range(first, len(block.keys)):
            if block.keys[i] > hi:
                return
            upper = block.keys[i + 1] if i + 1 < len(block.keys) else high
            child, gen = block.slots[i]
            yield from self._items(child, level - 1, gen, lo, hi, what, floor and i == first,
                                   (block.keys[i], upper), depth + 1)

    def _tree_root(self, tree: int) -> tuple[int, int, int]:
        """``(bytenr, level, root_dirid)`` of a tree, from its newest ROOT_ITEM in the root tree."""
        known = self._s_roots.get(tree)
        if known is not None:
            return known
        found: bytes | None = None
        for key, data in self._items(self.sb.root, self.sb.root_level, None, (tree, ROOT_ITEM, 0),
                                     (tree, ROOT_ITEM, U64), "root tree"):
            if key[:2] == (tree, ROOT_ITEM):
                found = data
        if found is None or len(found) < 239:
            self._corrupt(f"the root tree has no usable root item for tree {tree}")
        dirid, bytenr = struct.unpack_from("<QQ", found, 168)
        root = (bytenr, found[238], dirid)
        if len(self._s_roots) < MAX_SUBVOLUMES:
            self._s_roots[tree] = root
        return root

    def _default_subvolume(self) -> int:
        for key, data in self._items(self.sb.root, self.sb.root_level, None, (ROOT_TREE_DIR, DIR_ITEM, 0),
                                     (ROOT_TREE_DIR, DIR_ITEM, U64), "root tree"):
            for location, name, _ in self._dir_items(data, key):
                if name == b"default" and location[1] == ROOT_ITEM:
                    return location[0]
        return FS_TREE

    @property
    def default_subvolume(self) -> int:
        return self._default_subvolume()

    def subvolumes(self) -> list[Subvolume]:
        """Every subvolume and snapshot below the top level, with its path, from the root tree's ROOT_BACKREFs."""
        refs: dict[int, tuple[int, int, bytes]] = {}
        gens: dict[int, int] = {}
        for key, data in self._items(self.sb.root, self.sb.root_level, None, (FIRST_FREE, 0, 0),
                                     (LAST_FREE, ROOT_BACKREF, U64), "root tree"):
            if key[1] == ROOT_ITEM and len(data) >= 168:
                gens[key[0]] = struct.unpack_from("<Q", data, 160)[0]
            if key[1] != ROOT_BACKREF:
                continue
            if len(data) < 18 or 18 + struct.unpack_from("<H", data, 16)[0] > len(data):
                self._corrupt(f"subvolume {key[0]}'s back reference is damaged")
            dirid = struct.unpack_from("<Q", data, 0)[0]
            refs[key[0]] = (key[2], dirid, data[18:18 + struct.unpack_from("<H", data, 16)[0]])
            if len(refs) > MAX_SUBVOLUMES:
                self._corrupt(f"more than {MAX_SUBVOLUMES} subvolumes")
        out = []
        dir_paths: dict[tuple[int, int], str] = {}   # snapshots share their folders: each is walked once
        for sub, (parent, dirid, name) in refs.items():
            parts = [name.decode("utf-8", "surrogateescape")]
            for _ in range(256):
                if (parent, dirid) not in dir_paths:
                    dir_paths[(parent, dirid)] = self._dir_path(parent, dirid)
                parts.insert(0, dir_paths[(parent, dirid)])
                if parent == FS_TREE or parent not in refs:
                    break
                if parent == sub:
                    self._corrupt(f"subvolume {sub} lies inside itself")
                parent, dirid, p_name = refs[parent]
                parts.insert(0, p_name.decode("utf-8", "surrogateescape"))
            else:
                self._corrupt(f"subvolume {sub} is nested more than 256 deep (a loop)")
            out.append(Subvolume(sub, "/".join(p for p in parts if p), refs[sub][0], gens.get(sub, 0)))
        return sorted(out, key=lambda s: s.id)

    def _dir_path(self, tree: int, dirid: int) -> str:
        """The path of directory ``dirid`` inside subvolume ``tree``, by INODE_REFs (bounded depth)."""
        parts: list[str] = []
        try:
            root_dir = self._tree_root(tree)[2]
        except CorruptImage:
            return ""
        ino = dirid
        for _ in range(256):
            if ino == root_dir:
                return "/".join(reversed(parts))
            ref = next(iter(self._tree_items(tree, (ino, 12, 0), (ino, 12, U64))), None)
            if ref is None or len(ref[1]) < 10:
                return "/".join(reversed(parts))
            name_len = struct.unpack_from("<H", ref[1], 8)[0]
            parts.append(ref[1][10:10 + name_len].decode("utf-8", "surrogateescape"))
            ino = ref[0][2]
        self._corrupt(f"directory {dirid} of subvolume {tree} is more than 256 levels deep")

    def at(self, subvolume: int) -> BtrfsFilesystem:
        """The same filesystem rooted at another subvolume (sharing its caches)."""
        return BtrfsFilesystem(self.volume, self.info, _shared=self, _tree=subvolume)

    def _tree_items(self, tree: int, lo: Key, hi: Key, floor: bool = False) -> Iterator[tuple[Key, bytes]]:
        bytenr, level, _ = self._tree_root(tree)
        return self._items(bytenr, level, None, lo, hi, f"subvolume {tree}", floor)

    def _dir_items(self, data: bytes, key: Key) -> Iterator[tuple[Key, bytes, int]]:
        """``(location, name, type)`` of the one or more dir items packed in one item's data."""
        at = 0
        while at < len(data):
            if at + 30 > len(data):
                self._corrupt(f"directory {key[0]}'s entry is truncated")
            location = _key(data, at)
            data_len, name_len, ftype = struct.unpack_from("<HHB", data, at + 25)
            end = at + 30 + name_len + data_len
            if end > len(data) or name_len == 0:
                self._corrupt(f"directory {key[0]}'s entry runs past its item")
            name = data[at + 30: at + 30 + name_len]
            if b"/" in name or b"\0" in name:
                self._corrupt(f"directory {key[0]} holds a name with '/' or NUL")
            yield location, name, ftype
            at = end

    def _inode(self, node: BtrfsNode) -> Inode:
        cached = self._s_inodes.get((node.tree, node.ino))
        if cached is not None:
            return cached
        found = None
        for key, data in self._tree_items(node.tree, (node.ino, INODE_ITEM, 0), (node.ino, INODE_ITEM, U64)):
            if key[:2] == (node.ino, INODE_ITEM):
                found = data
                break
        if found is None:
            if node.ino == EMPTY_SUBVOL_DIR:  # a snapshot's placeholder for a subvolume it does not hold
                return Inode(0, 0o040000, 0)
            self._corrupt(f"subvolume {node.tree} has no inode {node.ino}")
        if len(found) < 160:
            self._corrupt(f"inode {node.ino} of subvolume {node.tree} is truncated")
        size = struct.unpack_from("<Q", found, 16)[0]
        mode = struct.unpack_from("<I", found, 52)[0]
        flags = struct.unpack_from("<Q", found, 64)[0]
        return self._s_inodes.put((node.tree, node.ino), Inode(size, mode, flags))

    def _child(self, node: BtrfsNode, location: Key) -> BtrfsNode:
        if location[1] == ROOT_ITEM:
            return BtrfsNode(location[0], self._tree_root(location[0])[2])
        if location[1] != INODE_ITEM:
            self._corrupt(f"directory {node.ino} names a location of type {location[1]}")
        return BtrfsNode(node.tree, location[0])

    # ---- the interface -------------------------------------------------------------------------------------
    def root(self) -> BtrfsNode:
        return BtrfsNode(self.tree, self._root_dir)

    def stat_node(self, node: BtrfsNode) -> Stat:
        inode = self._inode(node)
        return Stat(inode.kind, inode.size)

    def entries(self, node: BtrfsNode) -> Iterator[tuple[str, BtrfsNode]]:
        if self._inode(node).kind != "dir":
            self._corrupt(f"inode {node.ino} of subvolume {node.tree} is not a directory")
        if node.ino == EMPTY_SUBVOL_DIR:
            return
        any_index = False
        for key, data in self._tree_items(node.tree, (node.ino, DIR_INDEX, 0), (node.ino, DIR_INDEX, U64)):
            if key[:2] != (node.ino, DIR_INDEX):
                continue
            for location, name, _ in self._dir_items(data, key):
                any_index = True
                yield name.decode("utf-8", "surrogateescape"), self._child(node, location)
        if any_index:
            return
        for key, data in self._tree_items(node.tree, (node.ino, DIR_ITEM, 0), (node.ino, DIR_ITEM, U64)):
            if key[:2] == (node.ino, DIR_ITEM):
                for location, name, _ in self._dir_items(data, key):
                    yield name.decode("utf-8", "surrogateescape"), self._child(node, location)

    def find_entry(self, node: BtrfsNode, name: str) -> BtrfsNode | None:
        raw = name.encode("utf-8", "surrogateescape")
        if self._inode(node).kind != "dir" or node.ino == EMPTY_SUBVOL_DIR:
            return None
        key = (node.ino, DIR_ITEM, name_hash(raw))
        for found, data in self._tree_items(node.tree, key, key):
            for location, entry, _ in self._dir_items(data, found):
                if entry == raw:
                    return self._child(node, location)
        return None

    def open_node(self, node: BtrfsNode) -> Readable:
        inode = self._inode(node)
        if inode.kind != "file":
            self._corrupt(f"inode {node.ino} of subvolume {node.tree} is not a regular file")
        return BtrfsFile(self, node, inode.size, f"{self.volume.name}:subvolume {node.tree} inode {node.ino}")

    def readlink_node(self, node: BtrfsNode) -> str:
        inode = self._inode(node)
        if inode.kind != "symlink":
            self._corrupt(f"inode {node.ino} of subvolume {node.tree} is not a symbolic link")
        if inode.size > MAX_SYMLINK:
            self._corrupt(f"symbolic link {node.ino} of subvolume {node.tree} is {inode.size} bytes long")
        target = BtrfsFile(self, node, inode.size, f"{self.volume.name}:inode {node.ino}").pread(0, inode.size)
        if len(target) != inode.size or b"\0" in target:
            self._corrupt(f"symbolic link {node.ino} of subvolume {node.tree} is damaged")
        return target.decode("utf-8", "surrogateescape")

    # ---- extents --------------------------------------------------------------------------------------------
    def _decompress(self, method: int, data: bytes, ram_bytes: int, what: str) -> bytes:
        if method == 1:
            try:
                d = zlib.decompressobj()
                out = d.decompress(data, ram_bytes + 1)
            except zlib.error as e:
                self._corrupt(f"{what}: zlib data is damaged ({e})")
        elif method == 3:
            try:
                out = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read(ram_bytes + 1)
            except zstandard.ZstdError as e:
                self._corrupt(f"{what}: zstd data is damaged ({e})")
        elif method == 2:
            out = self._lzo(data, ram_bytes, what)
        else:
            raise UnsupportedImage(f"{what} uses compression {method}", path=self.volume.name, fmt="btrfs")
        if len(out) > ram_bytes:
            self._corrupt(f"{what} expands beyond its ram_bytes ({ram_bytes})")
        return out.ljust(ram_bytes, b"\0")

    def _lzo(self, data: bytes, ram_bytes: int, what: str) -> bytes:
        ss = self.sb.sectorsize
        if len(data) < 4:
            self._corrupt(f"{what}: lzo data is truncated")
        total = struct.unpack_from("<I", data, 0)[0]
        if total > len(data) or total < 4:
            self._corrupt(f"{what}: lzo data says {total} bytes in {len(data)}")
        worst = ss + ss // 16 + 64 + 3
        parts: list[bytes] = []
        produced, at = 0, 4
        while at < total and produced < ram_bytes:
            if ss - at % ss < 4:
                at += ss - at % ss
                continue
            if at + 4 > total:
                self._corrupt(f"{what}: lzo segment header is truncated")
            seg = struct.unpack_from("<I", data, at)[0]
            at += 4
            if seg == 0 or seg > worst or at + seg > total:
                self._corrupt(f"{what}: lzo segment of {seg} bytes at {at - 4}")
            try:
                out = lzallright.LZOCompressor.decompress(data[at:at + seg], output_size_hint=ss)
            except lzallright.LZOError as e:
                self._corrupt(f"{what}: lzo segment at {at - 4} is damaged ({e.args[0]})")
            if len(out) > ss:
                self._corrupt(f"{what} expands beyond its ram_bytes ({ram_bytes}): an lzo segment gives "
                              f"{len(out)} bytes")
            parts.append(out)
            produced += len(out)
            at += seg
        return b"".join(parts)

    def _extent_bytes(self, key: Key, data: bytes, node: BtrfsNode) -> tuple[int, int, bytes | tuple[int, int] | None]:
        """``(file offset, length, source)`` of one EXTENT_DATA item: bytes (inline or decompressed), a logical
        ``(address, length)`` to read, or None for a hole or preallocated range."""
        what = f"inode {node.ino} of subvolume {node.tree}'s extent at {key[2]}"
        if len(data) < 21:
            self._corrupt(f"{what} is truncated")
        ram_bytes = struct.unpack_from("<Q", data, 8)[0]
        compression, encryption, other, etype = struct.unpack_from("<BBHB", data, 16)
        if encryption or other:
            raise UnsupportedImage(f"{what} is encrypted or encoded", path=self.volume.name, fmt="btrfs")
        if etype == 0:
            if ram_bytes > MAX_INLINE:
                self._corrupt(f"{what} is inline and says {ram_bytes} bytes")
            payload = data[21:]
            if compression:
                cache_key = (node.tree << 32 ^ node.ino, -1 - key[2])
                got = self._s_extents.get(cache_key)
                if got is None:
                    got = self._s_extents.put(cache_key, self._decompress(compression, payload, ram_bytes, what))
                payload = got
            elif len(payload) < ram_bytes:
                self._corrupt(f"{what} holds {len(payload)} inline bytes but says {ram_bytes}")
            return key[2], ram_bytes, payload[:ram_bytes]
        if etype not in (1, 2) or len(data) < 53:
            self._corrupt(f"{what} has type {etype}")
        disk_bytenr, disk_num, offset, num_bytes = struct.unpack_from("<QQQQ", data, 21)
        if num_bytes == 0 or key[2] + num_bytes > U64:
            self._corrupt(f"{what} spans {num_bytes} bytes")
        if disk_bytenr == 0 or etype == 2:
            return key[2], num_bytes, None
        if num_bytes > MAX_EXTENT:
            self._corrupt(f"{what} spans {num_bytes} bytes (more than {MAX_EXTENT})")
        if compression:
            if disk_num > MAX_COMPRESSED or ram_bytes > MAX_COMPRESSED:
                self._corrupt(f"{what} is compressed from {ram_bytes} to {disk_num} bytes (at most "
                              f"{MAX_COMPRESSED} each)")
            if offset + num_bytes > ram_bytes:
                self._corrupt(f"{what} takes {offset}+{num_bytes} of {ram_bytes} decompressed bytes")
            got = self._s_extents.get((disk_bytenr, disk_num))
            if got is None:
                raw = self._read_logical(disk_bytenr, disk_num, what)
                got = self._s_extents.put((disk_bytenr, disk_num),
                                          self._decompress(compression, raw, ram_bytes, what))
            return key[2], num_bytes, got[offset:offset + num_bytes]
        if offset + num_bytes > max(disk_num, ram_bytes):
            self._corrupt(f"{what} takes {offset}+{num_bytes} of an extent of {disk_num} bytes")
        return key[2], num_bytes, (disk_bytenr + offset, num_bytes)


class BtrfsFile:
    """A regular file's (or symlink's) bytes: its EXTENT_DATA items, looked up per read from the tree."""

    def __init__(self, fs: BtrfsFilesystem, node: BtrfsNode, size: int, name: str) -> None:
        self.fs, self.node, self.size, self.name = fs, node, size, name

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"read {offset}+{length}")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        fs, ino = self.fs, self.node.ino
        parts: list[bytes] = []
        pos = offset
        lo = (ino, EXTENT_DATA, offset)  # with floor: the extent that starts before offset and may cover it
        for key, data in fs._tree_items(self.node.tree, lo, (ino, EXTENT_DATA, end - 1), floor=True):
            if key[:2] != (ino, EXTENT_DATA):
                continue
            start, span, source = fs._extent_bytes(key, data, self.node)
            if start + span <= pos:
                continue
            if start > pos:
                parts.append(bytes(min(start, end) - pos))
                pos = min(start, end)
                if pos >= end:
                    break
            take = min(start + span, end) - pos
            within = pos - start
            if source is None:
                parts.append(bytes(take))
            elif isinstance(source, bytes):
                piece = source[within:within + take]
                parts.append(piece.ljust(take, b"\0"))
            else:
                parts.append(fs._read_logical(source[0] + within, take, f"inode {ino}'s data"))
            pos += take
            if pos >= end:
                break
        if pos < end:
            parts.append(bytes(end - pos))
        return b"".join(parts)


def open_btrfs(volume: Readable, info: FsInfo) -> BtrfsFilesystem:
    return BtrfsFilesystem(volume, info)


SPEC = FilesystemSpec("btrfs", identify, open_btrfs)
