"""ext2, ext3 and ext4, read far enough for inspection: group descriptors, inodes, extent trees and indirect
blocks, inline data, directories (linear and htree lookups), over the on-disk layout of
:mod:`diskport.guest.filesystems.ext_format`, whose docstring describes the format, the bounds kept and the
sources used."""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

from diskport.errors import CorruptImage, UnsupportedImage
from diskport.guest.filesystems.base import Filesystem, FilesystemSpec, FsInfo, Kind, Stat
from diskport.guest.filesystems.ext_format import (
    COMPAT_SPARSE_SUPER2,
    EXTENT_MAGIC,
    FL_CASEFOLD,
    FL_ENCRYPT,
    FL_EXTENTS,
    FL_INDEX,
    FL_INLINE_DATA,
    FLAG_UNSIGNED_HASH,
    GROUP_CACHE,
    INCOMPAT_64BIT,
    INCOMPAT_FILETYPE,
    INCOMPAT_LARGEDIR,
    INCOMPAT_META_BG,
    INCOMPAT_NAMES,
    INODE_CACHE,
    KINDS,
    MAX_DIR_BYTES,
    MAX_EXTENT_DEPTH,
    MAX_SYMLINK,
    N_BLOCKS_BYTES,
    NODE_CACHE,
    OTHER_TYPES,
    READ_INCOMPAT,
    RO_COMPAT_SPARSE_SUPER,
    ROOT_INO,
    S_IFMT,
    dx_hash,
    feature_names,
    identify,
    read_superblock,
)
from diskport.guest.lru import LRU
from diskport.guest.view import Readable, read_exact


@dataclass
class Inode:
    ino: int
    mode: int
    size: int
    flags: int
    block: bytes     # i_block, 60 bytes
    extra: bytes     # the in-inode extended attribute area (after i_extra_isize), b"" if none

    @property
    def kind(self) -> Kind:
        return KINDS.get(self.mode & S_IFMT, "other")


@dataclass(frozen=True)
class ExtNode:
    """A directory entry's inode number (the inode is read when first asked about)."""

    ino: int


@dataclass(frozen=True)
class _ExtentNode:
    depth: int
    keys: list[int]
    entries: list[tuple[int, int, int]]  # leaf: (start, length, physical); index: (start, 0, child block)


class _Mapping:
    """Logical block -> physical block runs of one inode, by extent tree or indirect blocks."""

    def __init__(self, fs: ExtFilesystem, inode: Inode) -> None:
        self.fs = fs
        self.inode = inode
        self.extents = bool(inode.flags & FL_EXTENTS)
        if self.extents:
            self.root = fs._parse_extent_node(inode.block, None, f"inode {inode.ino}'s extent root")

    def run(self, lblk: int) -> tuple[int, int | None]:
        """``(count, physical)``: ``count`` (>= 1) blocks from ``lblk`` that map to ``physical`` onwards, or
        are a hole when ``physical`` is None."""
        return self._extent_run(lblk) if self.extents else self._indirect_run(lblk)

    def _extent_run(self, lblk: int) -> tuple[int, int | None]:
        node = self.root
        limit = 1 << 32
        for _ in range(MAX_EXTENT_DEPTH + 1):
            if not node.keys:
                return limit - lblk, None
            i = bisect.bisect_right(node.keys, lblk) - 1
            if i < 0:
                return min(node.keys[0], limit) - lblk, None
            if i + 1 < len(node.keys):
                limit = min(limit, node.keys[i + 1])
            start, length, phys = node.entries[i]
            if node.depth == 0:
                if lblk < start + length:
                    count = min(start + length, limit) - lblk
                    if phys == 0:  # uninitialised extent: reads as zeros
                        return count, None
                    return count, phys + (lblk - start)
                return limit - lblk, None
            node = self.fs._extent_child(phys, node.depth - 1, self.inode.ino)
        raise CorruptImage(f"inode {self.inode.ino}'s extent tree is deeper than {MAX_EXTENT_DEPTH}",
                           path=self.fs.volume.name, fmt=self.fs.type)

    def _indirect_run(self, lblk: int) -> tuple[int, int | None]:
        fs = self.fs
        per = fs.block_size // 4
        pointers = struct.unpack("<15I", self.inode.block)
        if lblk < 12:
            phys = pointers[lblk]
            return 1, (fs._check_block(phys, 1, f"inode {self.inode.ino}'s block") if phys else None)
        rel = lblk - 12
        span, level = per, 12
        while rel >= span:
            if level == 14:
                return 1, None  # past what indirect blocks address: a hole (the size check keeps reads away)
            rel -= span
            span, level = span * per, level + 1
        ptr = pointers[level]
        while True:
            if ptr == 0:
                return span - rel, None  # the rest of this subtree is a hole
            fs._check_block(ptr, 1, f"inode {self.inode.ino}'s indirect block")
            if span == 1:
                return 1, ptr
            span //= per
            table = fs._pointer_block(ptr)
            ptr = table[rel // span]
            rel %= span


class ExtFile:
    """A regular file's (or slow symlink's) bytes, mapped block by block onto the volume."""

    def __init__(self, fs: ExtFilesystem, inode: Inode, name: str) -> None:
        self.fs = fs
        self.inode = inode
        self.name = name
        self.size = inode.size
        self.inline: bytes | None = None
        if inode.flags & FL_INLINE_DATA:
            self.inline = fs._inline_bytes(inode)
            if inode.size > len(self.inline):
                raise CorruptImage(f"inode {inode.ino} holds {len(self.inline)} inline bytes but says "
                                   f"{inode.size}", path=fs.volume.name, fmt=fs.type)
            self.mapping: _Mapping | None = None
        else:
            self.mapping = _Mapping(fs, inode)
            limit = (1 << 32) if self.mapping.extents else 12 + fs.per + fs.per ** 2 + fs.per ** 3
            if inode.size > limit * fs.block_size:
                raise CorruptImage(f"inode {inode.ino}'s size {inode.size} is more than its block map addresses",
                                   path=fs.volume.name, fmt=fs.type)

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"read {offset}+{length}")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        if self.inline is not None:
            return self.inline[offset:end]
        assert self.mapping is not None
        bs = self.fs.block_size
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            lblk, within = divmod(pos, bs)
            count, phys = self.mapping.run(lblk)
            if phys is not None:  # coalesce physically contiguous runs (indirect maps give one block at a time)
                while count * bs - within < end - pos:
                    more, nxt = self.mapping.run(lblk + count)
                    if nxt != phys + count:
                        break
                    count += more
            span = min(count * bs - within, end - pos)
            if phys is None:
                parts.append(bytes(span))
            else:
                parts.append(read_exact(self.fs.volume, phys * bs + within, span,
                                        f"inode {self.inode.ino}'s data", self.fs.type))
            pos += span
        return b"".join(parts)


class ExtFilesystem(Filesystem[ExtNode]):
    """An ext2/3/4 volume, read-only."""

    def __init__(self, volume: Readable, info: FsInfo) -> None:
        super().__init__(volume, info)
        sb = read_superblock(volume)
        if sb is None:
            raise CorruptImage("no ext superblock", path=volume.name, fmt=info.type)
        self.sb = sb
        if sb.fs_type() == "jbd":
            raise UnsupportedImage("an external ext journal holds no files", path=volume.name, fmt=info.type)
        if sb.checksum_state() == "bad":
            raise CorruptImage("the superblock's checksum is wrong", path=volume.name, fmt=info.type)
        unknown = sb.incompat & ~READ_INCOMPAT
        if unknown:
            names = ", ".join(feature_names(unknown, INCOMPAT_NAMES))
            raise UnsupportedImage(f"incompatible features diskport does not read: {names}", path=volume.name,
                                   fmt=info.type)
        bs = self.block_size = sb.block_size
        self.per = bs // 4
        self.blocks_count = sb.blocks_count
        if not sb.first_data_block < sb.blocks_count:
            self._corrupt(f"first data block {sb.first_data_block} is not below the block count "
                          f"{sb.blocks_count}")
        if not 0 < sb.blocks_per_group <= 8 * bs << max(sb.log_cluster_size - sb.log_block_size, 0):
            self._corrupt(f"{sb.blocks_per_group} blocks per group")
        if not 0 < sb.inodes_per_group <= 8 * bs:
            self._corrupt(f"{sb.inodes_per_group} inodes per group")
        isz = sb.inode_size
        if isz < 128 or isz > bs or isz & (isz - 1):
            self._corrupt(f"inode size {isz}")
        self.inode_size = isz
        ds = sb.desc_size
        if sb.incompat & INCOMPAT_64BIT and (ds < 64 or ds > 1024 or ds & (ds - 1)):
            self._corrupt(f"group descriptor size {ds}")
        self.desc_size = ds
        self.groups = -(-(sb.blocks_count - sb.first_data_block) // sb.blocks_per_group)
        if sb.inodes_count > self.groups * sb.inodes_per_group or sb.inodes_count < ROOT_INO:
            self._corrupt(f"{sb.inodes_count} inodes in {self.groups} groups of {sb.inodes_per_group}")
        self.itable_blocks = -(-sb.inodes_per_group * isz // bs)
        self.filetype = bool(sb.incompat & INCOMPAT_FILETYPE)
        self._inodes: LRU[int, Inode] = LRU(INODE_CACHE)
        self._nodes: LRU[int, _ExtentNode] = LRU(NODE_CACHE)
        self._pointers: LRU[int, tuple[int, ...]] = LRU(NODE_CACHE)
        self._tables: LRU[int, int] = LRU(GROUP_CACHE)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _corrupt(self, message: str) -> NoReturn:
        raise CorruptImage(message, path=self.volume.name, fmt=self.type)

    def _check_block(self, block: int, count: int, what: str) -> int:
        if block < self.sb.first_data_block or count < 0 or block + count > self.blocks_count:
            self._corrupt(f"{what} {block}+{count} lies outside the filesystem ({self.blocks_count} blocks)")
        return block

    def _block(self, block: int, what: str) -> bytes:
        self._check_block(block, 1, what)
        return read_exact(self.volume, block * self.block_size, self.block_size, what, self.type)

    def _has_super(self, group: int) -> bool:
        if self.sb.compat & COMPAT_SPARSE_SUPER2:
            return group == 0 or group in self.sb.backup_bgs
        if group <= 1 or not self.sb.ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        if not group & 1:
            return False
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def _desc_block(self, group: int) -> int:
        per_block = self.block_size // self.desc_size
        meta = group // per_block
        first = self.sb.first_data_block
        if not self.sb.incompat & INCOMPAT_META_BG or meta < self.sb.first_meta_bg:
            return first + 1 + meta
        bg = meta * per_block
        offset = 1 if self._has_super(bg) else 0
        if self.block_size == 1024 and meta == 0 and first == 0:
            offset += 1
        return first + bg * self.sb.blocks_per_group + offset

    def _inode_table(self, group: int) -> int:
        table = self._tables.get(group)
        if table is not None:
            return table
        block = self._desc_block(group)
        at = (group % (self.block_size // self.desc_size)) * self.desc_size
        desc = self._block(block, f"group {group}'s descriptor block")[at: at + self.desc_size]
        table = struct.unpack_from("<I", desc, 0x08)[0]
        if self.desc_size >= 64:
            table |= struct.unpack_from("<I", desc, 0x28)[0] << 32
        self._check_block(table, self.itable_blocks, f"group {group}'s inode table")
        return self._tables.put(group, table)

    def _inode(self, ino: int) -> Inode:
        cached = self._inodes.get(ino)
        if cached is not None:
            return cached
        if not 1 <= ino <= self.sb.inodes_count:
            self._corrupt(f"inode number {ino} is outside 1..{self.sb.inodes_count}")
        group, index = divmod(ino - 1, self.sb.inodes_per_group)
        table = self._inode_table(group)
        raw = read_exact(self.volume, table * self.block_size + index * self.inode_size, self.inode_size,
                         f"inode {ino}", self.type)
        mode, size_lo = struct.unpack_from("<HxxI", raw, 0)
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        size_hi = struct.unpack_from("<I", raw, 0x6C)[0]
        extra = b""
        if self.inode_size > 128:
            extra_isize = struct.unpack_from("<H", raw, 0x80)[0]
            if 128 + extra_isize + 4 <= self.inode_size and extra_isize % 4 == 0:
                extra = raw[128 + extra_isize:]
        if mode & S_IFMT not in KINDS and mode & S_IFMT not in OTHER_TYPES:
            self._corrupt(f"inode {ino} has no valid type (mode {mode:#o}): a free or damaged inode")
        inode = Inode(ino, mode, size_lo | (size_hi << 32), flags, raw[0x28:0x28 + N_BLOCKS_BYTES], extra)
        return self._inodes.put(ino, inode)

    def _parse_extent_node(self, data: bytes, depth: int | None, what: str) -> _ExtentNode:
        magic, count, maximum, node_depth = struct.unpack_from("<HHHH", data, 0)
        if magic != EXTENT_MAGIC:
            self._corrupt(f"{what} has no extent header")
        if count > maximum or maximum > (len(data) - 12) // 12 or node_depth > MAX_EXTENT_DEPTH:
            self._corrupt(f"{what}: {count} of {maximum} entries at depth {node_depth}")
        if depth is not None and node_depth != depth:
            self._corrupt(f"{what} says depth {node_depth}, its parent {depth}")
        keys: list[int] = []
        entries: list[tuple[int, int, int]] = []
        prev_end = -1
        for i in range(count):
            at = 12 + 12 * i
            if node_depth == 0:
                start, length, hi, lo = struct.unpack_from("<IHHI", data, at)
                phys = lo | (hi << 32)
                if length > 32768:     # uninitialised: allocated, reads as zeros
                    length -= 32768
                    phys_used = 0
                else:
                    phys_used = phys
                if length == 0:
                    self._corrupt(f"{what} has an empty extent")
                self._check_block(phys, length, f"{what}'s extent")
                if start < prev_end or start + length > 1 << 32:
                    self._corrupt(f"{what}'s extents overlap or are out of order")
                prev_end = start + length
                entries.append((start, length, phys_used))
            else:
                start, lo, hi = struct.unpack_from("<IIH", data, at)
                child = lo | (hi << 32)
                self._check_block(child, 1, f"{what}'s index")
                if start <= prev_end:
                    self._corrupt(f"{what}'s index entries are out of order")
                prev_end = start
                entries.append((start, 0, child))
            keys.append(start)
        return _ExtentNode(node_depth, keys, entries)

    def _extent_child(self, block: int, depth: int, ino: int) -> _ExtentNode:
        node = self._nodes.get(block)
        if node is None:
            what = f"inode {ino}'s extent block {block}"
            node = self._nodes.put(block, self._parse_extent_node(self._block(block, what), depth, what))
        elif node.depth != depth:
            self._corrupt(f"inode {ino}'s extent block {block} is at depth {node.depth}, wanted at {depth}")
        return node

    def _pointer_block(self, block: int) -> tuple[int, ...]:
        table = self._pointers.get(block)
        if table is None:
            data = self._block(block, f"indirect block {block}")
            table = self._pointers.put(block, struct.unpack(f"<{self.per}I", data))
        return table

    def _inline_bytes(self, inode: Inode) -> bytes:
        """``i_block`` then the ``system.data`` attribute's value: an inline file's or directory's bytes."""
        return inode.block + (self._system_data(inode) or b"")

    def _system_data(self, inode: Inode) -> bytes | None:
        area = inode.extra
        if len(area) < 8 or struct.unpack_from("<I", area, 0)[0] != 0xEA020000:
            return None
        base = 4
        at = base
        while at + 16 <= len(area):
            name_len, index, value_offs, value_inum, value_size = struct.unpack_from("<BBHII", area, at)
            if name_len == 0 and index == 0 and value_offs == 0 and value_inum == 0:
                break
            name = area[at + 16: at + 16 + name_len]
            if at + 16 + name_len > len(area):
                self._corrupt(f"inode {inode.ino}'s extended attributes run past the inode")
            if index == 7 and name == b"data":
                if value_inum:
                    self._corrupt(f"inode {inode.ino}'s inline data lies in another inode")
                if base + value_offs + value_size > len(area):
                    self._corrupt(f"inode {inode.ino}'s inline data runs past the inode")
                return area[base + value_offs: base + value_offs + value_size]
            at += (16 + name_len + 3) & ~3
        return None

    def _check_readable(self, inode: Inode) -> None:
        if inode.flags & FL_ENCRYPT:
            raise UnsupportedImage(f"inode {inode.ino} is encrypted (fscrypt)", path=self.volume.name,
                                   fmt=self.type)

    # ---- the interface -------------------------------------------------------------------------------------
    def root(self) -> ExtNode:
        return ExtNode(ROOT_INO)

    def stat_node(self, node: ExtNode) -> Stat:
        inode = self._inode(node.ino)
        return Stat(inode.kind, inode.size)

    def _dir_chunks(self, inode: Inode) -> Iterator[bytes]:
        """The directory's bytes in record-bounded chunks: each block, or the two inline areas."""
        if inode.flags & FL_INLINE_DATA:
            yield inode.block[4:]          # the first 4 bytes are the parent's inode number
            yield self._system_data(inode) or b""
            return
        if inode.size > MAX_DIR_BYTES:
            self._corrupt(f"directory inode {inode.ino} is {inode.size} bytes (more than {MAX_DIR_BYTES})")
        bs = self.block_size
        mapping = _Mapping(self, inode)
        lblk, blocks = 0, -(-inode.size // bs)
        while lblk < blocks:
            count, phys = mapping.run(lblk)
            count = min(count, blocks - lblk)
            if phys is not None:
                for i in range(count):
                    yield self._block(phys + i, f"directory inode {inode.ino}'s block")
            lblk += count

    def _records(self, chunk: bytes, ino: int) -> Iterator[tuple[bytes, int]]:
        pos = 0
        size = len(chunk)
        while pos + 8 <= size:
            child, rec_len, name_len, _ftype = struct.unpack_from("<IHBB", chunk, pos)
            if self.block_size == 65536 and rec_len in (0, 65535):
                rec_len = 65536
            if not self.filetype:
                name_len |= _ftype << 8
            if rec_len < 8 or rec_len % 4 or pos + rec_len > size:
                self._corrupt(f"directory inode {ino} has a record of length {rec_len} at {pos} of {size}")
            if child and name_len:
                if 8 + name_len > rec_len:
                    self._corrupt(f"directory inode {ino} has a name longer than its record")
                name = chunk[pos + 8: pos + 8 + name_len]
                if name not in (b".", b".."):
                    if b"/" in name or b"\0" in name:
                        self._corrupt(f"directory inode {ino} holds a name with '/' or NUL")
                    if child > self.sb.inodes_count:
                        self._corrupt(f"directory inode {ino} names inode {child}")
                    yield name, child
            pos += rec_len

    def entries(self, node: ExtNode) -> Iterator[tuple[str, ExtNode]]:
        inode = self._inode(node.ino)
        if inode.kind != "dir":
            self._corrupt(f"inode {node.ino} is not a directory")
        self._check_readable(inode)
        for chunk in self._dir_chunks(inode):
            for name, child in self._records(chunk, node.ino):
                yield name.decode("utf-8", "surrogateescape"), ExtNode(child)

    def _htree_find(self, inode: Inode, name: bytes) -> int | None:
        """The inode ``name`` names through the directory's hash index: a number, 0 when the index says it is
        absent, or None when there is no index this reader follows (then the caller reads linearly)."""
        bs = self.block_size
        if not inode.flags & FL_INDEX or inode.flags & (FL_INLINE_DATA | FL_CASEFOLD | FL_ENCRYPT):
            return None
        if inode.size > MAX_DIR_BYTES or inode.size < bs:
            return None
        blocks = inode.size // bs
        mapping = _Mapping(self, inode)

        def logical(lblk: int) -> bytes | None:
            if lblk >= blocks:
                return None
            _count, phys = mapping.run(lblk)
            return None if phys is None else self._block(phys, f"directory inode {inode.ino}'s block")

        root = logical(0)
        if root is None or struct.unpack_from("<H", root, 4)[0] != 12:
            return None
        zero, version, info_len, levels = struct.unpack_from("<IBBB", root, 0x18)
        max_levels = 3 if self.sb.incompat & INCOMPAT_LARGEDIR else 2
        if zero or info_len != 8 or levels >= max_levels or version > 2:
            return None
        if self.sb.raw[0x160] & FLAG_UNSIGNED_HASH:
            version += 3
        want = dx_hash(name, version, self.sb.raw[0xEC:0xFC])
        node, at = root, 0x18 + info_len
        for level in range(levels + 1):
            limit, count = struct.unpack_from("<HH", node, at)
            if count == 0 or count > limit or at + 8 * limit > bs:
                return None
            hashes = [0] + [struct.unpack_from("<I", node, at + 8 * i)[0] for i in range(1, count)]
            targets = [struct.unpack_from("<I", node, at + 8 * i + 4)[0] for i in range(count)]
            i = bisect.bisect_right(hashes, want) - 1
            if level < levels:
                child = logical(targets[i])
                fake_ino, fake_len = struct.unpack_from("<IH", child or bytes(8), 0)
                if child is None or fake_ino or fake_len not in ((bs,) if bs < 65536 else (0, 65535)):
                    return None
                node, at = child, 8
                continue
            for j in range(i, count):   # a run of equal hashes may continue in the next blocks (low bit set)
                if j > i and not (hashes[j] & 1 and hashes[j] & ~1 == want):
                    break
                leaf = logical(targets[j])
                if leaf is None:
                    return None
                for entry, child_ino in self._records(leaf, inode.ino):
                    if entry == name:
                        return child_ino
        return 0

    def find_entry(self, node: ExtNode, name: str) -> ExtNode | None:
        inode = self._inode(node.ino)
        if not inode.flags & FL_CASEFOLD:
            self._check_readable(inode)
            found = self._htree_find(inode, name.encode("utf-8", "surrogateescape"))
            if found is not None:
                return ExtNode(found) if found else None
            return super().find_entry(node, name)
        want = name.casefold()
        for count, (entry, child) in enumerate(self.entries(node)):
            if count >= 100_000:
                self._corrupt("a directory holds more than 100000 entries")
            if entry.casefold() == want:
                return child
        return None

    def open_node(self, node: ExtNode) -> Readable:
        inode = self._inode(node.ino)
        if inode.kind != "file":
            self._corrupt(f"inode {node.ino} is not a regular file")
        self._check_readable(inode)
        return ExtFile(self, inode, f"{self.volume.name}:inode {node.ino}")

    def readlink_node(self, node: ExtNode) -> str:
        inode = self._inode(node.ino)
        if inode.kind != "symlink":
            self._corrupt(f"inode {node.ino} is not a symbolic link")
        self._check_readable(inode)
        if inode.size > MAX_SYMLINK:
            self._corrupt(f"symbolic link inode {node.ino} is {inode.size} bytes long")
        fast = (inode.size < N_BLOCKS_BYTES and not inode.flags & FL_INLINE_DATA
                and not (inode.flags & FL_EXTENTS and inode.block[:2] == b"\x0a\xf3"))
        if fast:
            target = inode.block[:inode.size]
        else:
            target = ExtFile(self, inode, f"{self.volume.name}:inode {node.ino}").pread(0, inode.size)
        if len(target) != inode.size or b"\0" in target:
            self._corrupt(f"symbolic link inode {node.ino} is damaged")
        return target.decode("utf-8", "surrogateescape")


def open_ext(volume: Readable, info: FsInfo) -> ExtFilesystem:
    return ExtFilesystem(volume, info)


#: ext2, ext3 and ext4 share one identify and one reader; ``types`` names the three.
SPEC = FilesystemSpec("ext4", identify, open_ext, types=("ext2", "ext3"))


__all__ = ["SPEC", "ExtFile", "ExtFilesystem", "ExtNode", "Inode", "dx_hash", "identify", "open_ext"]
