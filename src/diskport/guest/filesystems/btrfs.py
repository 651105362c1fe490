"""btrfs, read-only, single device: the chunk map, tree walks (root tree, subvolumes, FS trees), directories and
file extents, over the on-disk layout of :mod:`diskport.guest.filesystems.btrfs_format`, whose docstring
describes the format, the bounds kept and the sources used.

It is a little over the house's 600 lines because it is one reader: the chunk map, the tree walks and the file
extents share one node cache and one key order, and change together; the layout already lives apart.
"""

from __future__ import annotations

import bisect
import io
import struct
import zlib
from collections.abc import Iterator
from typing import NoReturn

import lzallright
import zstandard

from diskport.errors import CorruptImage, UnsupportedImage
from diskport.guest.filesystems.base import Filesystem, FilesystemSpec, FsInfo, Stat
from diskport.guest.filesystems.btrfs_format import (
    BG_DATA,
    BG_METADATA,
    BG_SYSTEM,
    CHUNK_ITEM,
    CSUM_TYPES,
    DIR_INDEX,
    DIR_ITEM,
    DUP,
    EMPTY_SUBVOL_DIR,
    EXTENT_CACHE,
    EXTENT_DATA,
    FIRST_FREE,
    FS_TREE,
    HEADER,
    INODE_CACHE,
    INODE_ITEM,
    ITEM,
    KEY_PTR,
    LAST_FREE,
    MAX_CHUNKS,
    MAX_COMPRESSED,
    MAX_EXTENT,
    MAX_INLINE,
    MAX_LEVEL,
    MAX_SUBVOLUMES,
    MAX_SYMLINK,
    NODE_CACHE,
    PROFILES,
    READ_INCOMPAT,
    ROOT_BACKREF,
    ROOT_ITEM,
    ROOT_TREE_DIR,
    SYS_CHUNK_ARRAY,
    U64,
    Block,
    BtrfsNode,
    Chunk,
    Inode,
    Key,
    Subvolume,
    Superblock,
    csum,
    identify,
    name_hash,
    parse_chunk,
    read_key,
    read_superblock,
)
from diskport.guest.lru import LRU
from diskport.guest.view import Readable, read_exact


class BtrfsFilesystem(Filesystem[BtrfsNode]):
    """A single-device btrfs volume, read-only, rooted at its default subvolume (or another one: :meth:`at`)."""

    sb: Superblock
    notes: dict[str, object]
    chunks: list[Chunk]
    starts: list[int]
    tree: int
    _s_nodes: LRU[int, Block]
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
        if sb.incompat & ~READ_INCOMPAT:
            raise UnsupportedImage(f"incompatible features {sb.incompat & ~READ_INCOMPAT:#x} are not read",
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
            _objectid, kind, logical = read_key(raw, at)
            if kind != CHUNK_ITEM:
                self._corrupt(f"the system chunk array holds a key of type {kind}")
            chunk_, size = parse_chunk(raw, at + 17, "a system chunk", CorruptImage)
            self._add_chunk(logical, chunk_)
            at += 17 + size
        if not self.chunks:
            self._corrupt("the superblock's system chunk array is empty")

    def _load_chunk_tree(self) -> None:
        lo, hi = (FIRST_FREE, CHUNK_ITEM, 0), (FIRST_FREE, CHUNK_ITEM, U64)
        for key, data in self._items(self.sb.chunk_root, self.sb.chunk_root_level, None, lo, hi, "chunk tree"):
            if key[:2] != lo[:2]:
                continue
            chunk_, size = parse_chunk(data, 0, f"chunk item {key[2]:#x}", CorruptImage)
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

    def _block(self, bytenr: int, level: int, generation: int | None, what: str) -> Block:
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

    def _parse_block(self, bytenr: int, what: str) -> Block:
        ns = self.nodesize
        if bytenr % self.sb.sectorsize:
            self._corrupt(f"{what}: tree block {bytenr:#x} is not sector-aligned")
        copies = 2 if self._chunk_of(bytenr).type & DUP else 1
        problem = ""
        for copy in range(copies):
            raw = self._read_logical(bytenr, ns, f"tree block {bytenr:#x}", copy)
            want = csum(self.sb.csum_type, raw[32:])
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

    def _parse_items(self, bytenr: int, raw: bytes, what: str) -> Block:
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
            key = read_key(raw, at)
            if keys and key <= keys[-1]:
                self._corrupt(f"{where} has keys out of order")
            keys.append(key)
            a, b = struct.unpack_from("<QQ" if level else "<II", raw, at + 17)
            if not level and (a + b > room or a < nritems * ITEM):
                self._corrupt(f"{where} has item {i} at {a}+{b}, outside the block")
            slots.append((a, b))
        return Block(level, generation, keys, raw, slots)

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
            location = read_key(data, at)
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


__all__ = ["FS_TREE", "SPEC", "BtrfsFile", "BtrfsFilesystem", "BtrfsNode", "identify", "name_hash", "open_btrfs",
           "read_superblock"]
