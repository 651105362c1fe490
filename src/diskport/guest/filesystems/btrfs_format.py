"""btrfs on disk: constants, checksums, the superblock (and ``identify``), chunk items and the records the reader
unpacks. The reader, which walks the trees and reads files, is :mod:`diskport.guest.filesystems.btrfs`.

btrfs, read-only, single device: superblock, chunk tree, root tree, subvolumes, directories and file extents.

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

import hashlib
import struct
from dataclasses import dataclass

import google_crc32c

from diskport.errors import CorruptImage
from diskport.guest.filesystems._superblock import c_string, chunk, uuid_text
from diskport.guest.filesystems.base import FsInfo, Kind
from diskport.guest.view import Readable

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
READ_INCOMPAT = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 | 0x10000

S_IFMT = 0o170000
_KINDS: dict[int, Kind] = {0o100000: "file", 0o040000: "dir", 0o120000: "symlink"}

Key = tuple[int, int, int]


def read_key(raw: bytes, at: int) -> Key:
    objectid, kind, offset = struct.unpack_from("<QBQ", raw, at)
    return objectid, kind, offset


def csum(csum_type: int, data: bytes) -> bytes | None:
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
        want = csum(self.csum_type, self.raw[32:])
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
    unknown = sb.incompat & ~READ_INCOMPAT
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
class Block:
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


def parse_chunk(raw: bytes, at: int, what: str, fail: type[CorruptImage]) -> tuple[Chunk, int]:
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
