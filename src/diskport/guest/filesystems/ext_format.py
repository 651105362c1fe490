"""ext2, ext3 and ext4 on disk: constants and feature bits, the superblock (and ``identify``) and the htree
directory-index name hashes. The reader (inodes, extent trees and indirect blocks, directories) is
:mod:`diskport.guest.filesystems.ext`.

ext2, ext3 and ext4: identified by the superblock, read far enough for inspection.

Layout facts come from the kernel's ``Documentation/filesystems/ext4/`` (the "ext4 Data Structures and
Algorithms" pages: super.rst, group_descr.rst, inodes.rst, ifork.rst, directory.rst, inlinedata.rst,
attributes.rst); all fields are little-endian.

* **Superblock**: 1024 bytes at byte 1024 of the volume, magic ``0xEF53`` at 0x38. Block size
  ``1024 << s_log_block_size``, 1 KiB to 64 KiB. The type follows libblkid's rule: a journal device is ``jbd``;
  a volume with any feature that ext3 lacks (extents, flex_bg, 64bit, huge_file, metadata_csum, inline_data,
  ...) is ``ext4``; else one with a journal (``has_journal``) is ``ext3``, else ``ext2``. Label
  (``s_volume_name``), UUID (``s_uuid``; all zeros is no UUID, as blkid has it) and size
  (``s_blocks_count * block size``). ``version`` is ``"rev.minor"`` as blkid prints it (``1.0``).
  With ``metadata_csum`` the superblock's own CRC32C (``s_checksum``) is verified: a bad one is reported in
  ``details`` and makes the volume unreadable. No other checksum (group descriptors, inodes, extent blocks,
  directory blocks) is checked: a reader that only looks does not need them, and every field it uses is
  bounds-checked instead.
* **Group descriptors**: 32 bytes, or ``s_desc_size`` (64 or more, a power of two) with the ``64bit`` feature;
  the table follows the superblock's block, or with ``meta_bg`` (groups at and past ``s_first_meta_bg``) sits
  in the first block of each meta group after its superblock backup (``sparse_super`` and ``sparse_super2``
  decide which groups hold one). ``flex_bg`` needs nothing more: descriptors say where each inode table is.
* **Inodes** of any size ``s_inode_size`` (128 up to the block size, a power of two). Data is mapped by an
  **extent tree** (``EXT4_EXTENTS_FL``: header magic ``0xF30A``, index and leaf entries; uninitialised extents
  read as zeros), by **indirect blocks** (12 direct, single, double, triple; a zero pointer is a hole read as
  zeros), or held **inline** (``inline_data``: the 60 bytes of ``i_block`` then the ``system.data`` extended
  attribute in the inode's extra space). **Symlinks** are fast (the target in ``i_block``), inline, or slow
  (in data blocks).
* **Directories** are read linearly, block after block, as e2fsprogs' ``ls`` does: an htree (``dir_index``)
  directory's root block reads as ``.`` then a ``..`` record whose length covers the dx_root, and its interior
  nodes are records of inode 0 spanning the block, so both are skipped by the ordinary rules; the
  ``metadata_csum`` tail (inode 0) likewise. A lookup in an htree directory follows the index instead (legacy,
  half-MD4 and TEA hashes, signed or unsigned, with the superblock's seed; at most 2 index levels, 3 with
  ``large_dir``; a run of equal hashes followed into the next blocks); an index it cannot follow (another
  hash, a damaged root) falls back to the linear scan. A directory with the casefold
  flag is looked up without case (Python's case folding, which agrees with the kernel's for ASCII and most
  of Unicode). Encrypted inodes are refused with :class:`UnsupportedImage`.

**Bounds.** Every block number read from a structure (descriptor tables, inode tables, extent index and leaf
entries, indirect pointers, directory blocks) is checked against ``s_blocks_count`` and read through
:func:`read_exact`, which checks the volume's size. An extent tree is at most :data:`MAX_EXTENT_DEPTH` levels,
each child's depth must be its parent's minus one, entries are checked sorted and non-overlapping, so a walk
ends in at most that many block reads. A file's size is bounded by what its mapping can address; directories
by :data:`MAX_DIR_BYTES`; symlink targets by :data:`MAX_SYMLINK`. Nothing here reads a file whole: a file's
:meth:`pread` maps the asked range to volume reads; the only memory kept is a few small caches
(:data:`INODE_CACHE` inodes, :data:`NODE_CACHE` parsed extent/indirect blocks, :data:`GROUP_CACHE`
descriptors), each a bounded LRU. Bad input raises :class:`CorruptImage` with ``fmt`` the volume's type.

Written here because the Python libraries that read ext4 are AGPL (dissect.extfs) or LGPL C bindings, which
this Apache-2.0 tool cannot take at run time; debugfs (e2fsprogs) serves as the oracle in the tests.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass

import google_crc32c

from diskport.guest.filesystems.base import FsInfo, Kind
from diskport.guest.view import Readable

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
MAGIC = 0xEF53
EXTENT_MAGIC = 0xF30A
ROOT_INO = 2
N_BLOCKS_BYTES = 60          # i_block: 15 uint32

#: Extent tree levels below the inode (the kernel builds at most 5 for 2^32 blocks).
MAX_EXTENT_DEPTH = 5
#: Largest directory read (a directory of 100,000 entries with long names is a few MiB).
MAX_DIR_BYTES = 64 * 1024 * 1024
#: Longest symlink target (PATH_MAX).
MAX_SYMLINK = 4096
INODE_CACHE = 512
NODE_CACHE = 64
GROUP_CACHE = 1024

# Feature bits (super.rst).
COMPAT_HAS_JOURNAL = 0x4
COMPAT_SPARSE_SUPER2 = 0x200
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_BTREE_DIR = 0x4
RO_COMPAT_METADATA_CSUM = 0x400

#: What libblkid lets ext2 and ext3 have; anything else makes a volume ext4.
_EXT3_RO_COMPAT = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR
_EXT3_INCOMPAT = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG
#: Incompatible features this reader understands (others make the volume unreadable, not misread).
READ_INCOMPAT = (INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG | INCOMPAT_EXTENTS | INCOMPAT_64BIT
                  | INCOMPAT_MMP | INCOMPAT_FLEX_BG | INCOMPAT_EA_INODE | INCOMPAT_CSUM_SEED | INCOMPAT_LARGEDIR
                  | INCOMPAT_INLINE_DATA | INCOMPAT_ENCRYPT | INCOMPAT_CASEFOLD)

_COMPAT_NAMES = {0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x4: "has_journal", 0x8: "ext_attr",
                 0x10: "resize_inode", 0x20: "dir_index", 0x40: "lazy_bg", 0x80: "exclude_inode",
                 0x100: "exclude_bitmap", 0x200: "sparse_super2", 0x400: "fast_commit", 0x800: "stable_inodes",
                 0x1000: "orphan_file"}
INCOMPAT_NAMES = {0x1: "compression", 0x2: "filetype", 0x4: "needs_recovery", 0x8: "journal_dev",
                   0x10: "meta_bg", 0x40: "extent", 0x80: "64bit", 0x100: "mmp", 0x200: "flex_bg",
                   0x400: "ea_inode", 0x1000: "dirdata", 0x2000: "metadata_csum_seed", 0x4000: "large_dir",
                   0x8000: "inline_data", 0x10000: "encrypt", 0x20000: "casefold"}
_RO_COMPAT_NAMES = {0x1: "sparse_super", 0x2: "large_file", 0x4: "btree_dir", 0x8: "huge_file",
                    0x10: "uninit_bg", 0x20: "dir_nlink", 0x40: "extra_isize", 0x80: "has_snapshot",
                    0x100: "quota", 0x200: "bigalloc", 0x400: "metadata_csum", 0x800: "replica",
                    0x1000: "read-only", 0x2000: "project", 0x4000: "shared_blocks", 0x8000: "verity",
                    0x10000: "orphan_present"}

# Inode flags (inodes.rst).
FL_INDEX = 0x1000
FL_ENCRYPT = 0x800
FL_EXTENTS = 0x80000
FL_INLINE_DATA = 0x10000000
FL_CASEFOLD = 0x40000000

S_IFMT = 0xF000
KINDS: dict[int, Kind] = {0x8000: "file", 0x4000: "dir", 0xA000: "symlink"}
OTHER_TYPES = {0x1000, 0x2000, 0x6000, 0xC000}  # fifo, char, block, socket



def feature_names(bits: int, names: dict[int, str]) -> list[str]:
    out = []
    for bit in range(32):
        if bits & (1 << bit):
            out.append(names.get(1 << bit, f"unknown_{1 << bit:#x}"))
    return out


@dataclass(frozen=True)
class Superblock:
    inodes_count: int
    blocks_count: int
    first_data_block: int
    log_block_size: int
    log_cluster_size: int
    blocks_per_group: int
    clusters_per_group: int
    inodes_per_group: int
    rev_level: int
    minor_rev_level: int
    inode_size: int
    compat: int
    incompat: int
    ro_compat: int
    uuid: bytes
    volume_name: bytes
    desc_size: int
    first_meta_bg: int
    backup_bgs: tuple[int, int]
    checksum_type: int
    checksum: int
    raw: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Superblock:
        incompat = struct.unpack_from("<I", raw, 0x60)[0]
        wide = bool(incompat & INCOMPAT_64BIT)
        rev = struct.unpack_from("<I", raw, 0x4C)[0]
        return cls(
            inodes_count=struct.unpack_from("<I", raw, 0x00)[0],
            blocks_count=struct.unpack_from("<I", raw, 0x04)[0]
            | ((struct.unpack_from("<I", raw, 0x150)[0] << 32) if wide else 0),
            first_data_block=struct.unpack_from("<I", raw, 0x14)[0],
            log_block_size=struct.unpack_from("<I", raw, 0x18)[0],
            log_cluster_size=struct.unpack_from("<I", raw, 0x1C)[0],
            blocks_per_group=struct.unpack_from("<I", raw, 0x20)[0],
            clusters_per_group=struct.unpack_from("<I", raw, 0x24)[0],
            inodes_per_group=struct.unpack_from("<I", raw, 0x28)[0],
            rev_level=rev,
            minor_rev_level=struct.unpack_from("<H", raw, 0x3E)[0],
            inode_size=struct.unpack_from("<H", raw, 0x58)[0] if rev >= 1 else 128,
            compat=struct.unpack_from("<I", raw, 0x5C)[0] if rev >= 1 else 0,
            incompat=incompat if rev >= 1 else 0,
            ro_compat=struct.unpack_from("<I", raw, 0x64)[0] if rev >= 1 else 0,
            uuid=raw[0x68:0x78],
            volume_name=raw[0x78:0x88],
            desc_size=struct.unpack_from("<H", raw, 0xFE)[0] if wide else 32,
            first_meta_bg=struct.unpack_from("<I", raw, 0x104)[0],
            backup_bgs=struct.unpack_from("<II", raw, 0x24C),
            checksum_type=raw[0x175],
            checksum=struct.unpack_from("<I", raw, 0x3FC)[0],
            raw=raw,
        )

    @property
    def block_size(self) -> int:
        return 1024 << self.log_block_size

    def fs_type(self) -> str:
        if self.incompat & INCOMPAT_JOURNAL_DEV:
            return "jbd"
        if self.ro_compat & ~_EXT3_RO_COMPAT or self.incompat & ~_EXT3_INCOMPAT:
            return "ext4"
        return "ext3" if self.compat & COMPAT_HAS_JOURNAL else "ext2"

    def checksum_state(self) -> str:
        """"ok", "bad" or "none" (no metadata_csum): the superblock's CRC32C, stored without final inversion."""
        if not self.ro_compat & RO_COMPAT_METADATA_CSUM:
            return "none"
        if self.checksum_type != 1:
            return "bad"
        crc = ~google_crc32c.value(self.raw[:0x3FC]) & 0xFFFFFFFF
        return "ok" if crc == self.checksum else "bad"


def read_superblock(volume: Readable) -> Superblock | None:
    if volume.size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE:
        return None
    raw = volume.pread(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE)
    if len(raw) < SUPERBLOCK_SIZE or struct.unpack_from("<H", raw, 0x38)[0] != MAGIC:
        return None
    sb = Superblock.parse(raw)
    if sb.log_block_size > 6:  # no ext block is larger than 64 KiB: not a superblock we know
        return None
    return sb


def identify(volume: Readable) -> FsInfo | None:
    """ext2/ext3/ext4 (or ``jbd``, an external journal) from the superblock; None if there is none."""
    sb = read_superblock(volume)
    if sb is None:
        return None
    fs_type = sb.fs_type()
    label = sb.volume_name.split(b"\0", 1)[0].decode("utf-8", "replace") or None
    uuid = str(uuidlib.UUID(bytes=sb.uuid)) if any(sb.uuid) else None
    checksum = sb.checksum_state()
    unknown = sb.incompat & ~READ_INCOMPAT
    details: dict[str, object] = {
        "block_size": sb.block_size,
        "inode_size": sb.inode_size,
        "features": feature_names(sb.compat, _COMPAT_NAMES) + feature_names(sb.incompat, INCOMPAT_NAMES)
        + feature_names(sb.ro_compat, _RO_COMPAT_NAMES),
        "needs_recovery": bool(sb.incompat & INCOMPAT_RECOVER),
        "superblock_checksum": checksum,
    }
    return FsInfo(type=fs_type, label=label, uuid=uuid, size=sb.blocks_count * sb.block_size,
                  version=f"{sb.rev_level}.{sb.minor_rev_level}",
                  readable=fs_type != "jbd" and checksum != "bad" and not unknown, details=details)


# ---- the htree name hash (directory.rst, "Hash Tree Directories"; the kernel's fs/ext4/hash.c) -----------------
_M32 = 0xFFFFFFFF
_HASH_NAMES = {0: "legacy", 1: "half_md4", 2: "tea"}
FLAG_UNSIGNED_HASH = 0x2


def _rol(x: int, s: int) -> int:
    return ((x << s) | (x >> (32 - s))) & _M32


def _hash_words(name: bytes, count: int, signed: bool) -> list[int]:
    """The name packed into ``count`` 32-bit words as ext4 pads it (its length repeated in every byte)."""
    pad = (len(name) | (len(name) << 8)) & _M32
    pad = (pad | (pad << 16)) & _M32
    words: list[int] = []
    value = pad
    for i, byte in enumerate(name[: count * 4]):
        char = byte - 256 if signed and byte >= 128 else byte
        value = (char + (value << 8)) & _M32
        if i % 4 == 3:
            words.append(value)
            value = pad
    if len(words) < count:
        words.append(value)
    words.extend([pad] * (count - len(words)))
    return words


def _half_md4(state: list[int], data: list[int]) -> None:
    a, b, c, d = state

    def f(x: int, y: int, z: int) -> int:
        return z ^ (x & (y ^ z))

    def g(x: int, y: int, z: int) -> int:
        return ((x & y) + ((x ^ y) & z)) & _M32

    def h(x: int, y: int, z: int) -> int:
        return x ^ y ^ z

    for fn, key, order, shifts in ((f, 0, (0, 1, 2, 3, 4, 5, 6, 7), (3, 7, 11, 19)),
                                   (g, 0o13240474631, (1, 3, 5, 7, 0, 2, 4, 6), (3, 5, 9, 13)),
                                   (h, 0o15666365641, (3, 7, 2, 6, 1, 5, 0, 4), (3, 9, 11, 15))):
        for i, word in enumerate(order):
            x = (data[word] + key) & _M32
            shift = shifts[i % 4]
            if i % 4 == 0:
                a = _rol((a + fn(b, c, d) + x) & _M32, shift)
            elif i % 4 == 1:
                d = _rol((d + fn(a, b, c) + x) & _M32, shift)
            elif i % 4 == 2:
                c = _rol((c + fn(d, a, b) + x) & _M32, shift)
            else:
                b = _rol((b + fn(c, d, a) + x) & _M32, shift)
    state[0] = (state[0] + a) & _M32
    state[1] = (state[1] + b) & _M32
    state[2] = (state[2] + c) & _M32
    state[3] = (state[3] + d) & _M32


def _tea(state: list[int], data: list[int]) -> None:
    total, b0, b1 = 0, state[0], state[1]
    a, b, c, d = data[:4]
    for _ in range(16):
        total = (total + 0x9E3779B9) & _M32
        b0 = (b0 + ((((b1 << 4) + a) & _M32) ^ ((b1 + total) & _M32) ^ (((b1 >> 5) + b) & _M32))) & _M32
        b1 = (b1 + ((((b0 << 4) + c) & _M32) ^ ((b0 + total) & _M32) ^ (((b0 >> 5) + d) & _M32))) & _M32
    state[0] = (state[0] + b0) & _M32
    state[1] = (state[1] + b1) & _M32


def dx_hash(name: bytes, version: int, seed: bytes = bytes(16)) -> int:
    """The major htree hash of ``name`` (low bit clear) for hash ``version`` 0-5 (3-5: unsigned chars)."""
    signed = version < 3
    kind = version % 3
    if kind == 0:
        h0, h1 = 0x12A3FE2D, 0x37ABE8F9
        for byte in name:
            char = byte - 256 if signed and byte >= 128 else byte
            value = (h1 + (h0 ^ ((char * 7152373) & _M32))) & _M32
            if value & 0x80000000:
                value = (value - 0x7FFFFFFF) & _M32
            h1, h0 = h0, value
        major = (h0 << 1) & _M32
    else:
        state = list(struct.unpack("<4I", seed)) if any(seed) else [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476]
        step = 32 if kind == 1 else 16
        for at in range(0, max(len(name), 1), step):
            words = _hash_words(name[at:], 8 if kind == 1 else 4, signed)
            (_half_md4 if kind == 1 else _tea)(state, words)
        major = state[1] if kind == 1 else state[0]
    major &= ~1 & _M32
    if major == (0x7FFFFFFF << 1):
        major = (0x7FFFFFFF - 1) << 1
    return major
