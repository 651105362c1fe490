"""NTFS, read-only: identify a volume (label, serial, size) and read its files and directories.

Implements, after the Linux-NTFS project's "NTFS Documentation" (*$MFT*, *$ATTRIBUTE_LIST*, *$FILE_NAME*,
*$INDEX_ROOT*, *$INDEX_ALLOCATION*, *$UpCase*, *Index record*) and [MS-FSCC] 2.1.2 (symbolic link and mount
point reparse data): the $MFT located through its own runlist in record 0 (a fragmented MFT works), MFT records
with fixups (:mod:`~diskport.guest.filesystems.ntfs_records`), attributes spread over extension records through
a resident or non-resident $ATTRIBUTE_LIST, the unnamed $DATA stream resident or mapped through its runlist
(sparse runs and the initialized size read as zeros; named streams are ignored), directories as $I30 B+ trees
($INDEX_ROOT plus INDX blocks of $INDEX_ALLOCATION, fixups verified) walked in order for listings and descended
for lookups, with names compared through the volume's $UpCase table as NTFS collates them.

Listings give each name once: the Win32 (or POSIX, or Win32&DOS) name, never the DOS 8.3 duplicate, and they
leave out the metadata files of records 0-15 ($MFT, $Extend, ...), which lookups still find, as Windows does.
Symbolic links and junctions are ``symlink`` (their targets read as volume paths: ``C:\\x`` becomes ``/x``);
other reparse points (WOF/compact-OS files, dedup, cloud placeholders) are ``other`` and are not read, since
their unnamed $DATA is not their contents. Compressed (LZNT1) and EFS-encrypted files raise UnsupportedImage
naming the file: decompression is not implemented (Windows does not compress its hives or drivers).

Written here for the licence reasons given in :mod:`~diskport.guest.filesystems.ntfs_records`.

Bounds (each is a constant here or there):

* records read per lookup step: the directory's base record and its extension records (at most one per
  $ATTRIBUTE_LIST entry), then at most :data:`MAX_INDEX_DEPTH` INDX blocks for a plain descent and at most
  :data:`MAX_INDEX_NODES` when names equal but for case must be searched on both sides; recently used records
  are cached (:data:`RECORD_CACHE`);
* index depth :data:`MAX_INDEX_DEPTH` (32), and no INDX block visited twice in one walk (a loop);
* runlists: :data:`~diskport.guest.filesystems.ntfs_records.MAX_RUNS` runs per attribute, every run inside the
  volume, extents contiguous in VCN;
* $ATTRIBUTE_LIST: :data:`~diskport.guest.filesystems.ntfs_records.MAX_ATTRIBUTE_LIST` bytes (256 KiB);
* $UpCase read once (128 KiB); nothing else is read whole.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from diskport.errors import CorruptImage, UnsupportedImage
from diskport.guest.filesystems.base import Filesystem, FilesystemSpec, FsInfo, Stat
from diskport.guest.filesystems.ntfs_records import (
    AT_ATTRIBUTE_LIST,
    AT_DATA,
    AT_FILE_NAME,
    AT_INDEX_ALLOCATION,
    AT_INDEX_ROOT,
    AT_REPARSE_POINT,
    AT_VOLUME_INFORMATION,
    AT_VOLUME_NAME,
    ATTR_COMPRESSED,
    ATTR_ENCRYPTED,
    FMT,
    MAX_ATTRIBUTE_LIST,
    MAX_RESIDENT,
    MAX_RUNS,
    MFT_DIRECTORY,
    MFT_IN_USE,
    Attribute,
    BootSector,
    BytesReadable,
    FileRecord,
    Run,
    RunReader,
    apply_fixups,
    corrupt,
    decode_runlist,
    parse_attribute_list,
    parse_boot_sector,
    parse_record,
)
from diskport.guest.view import Readable, read_exact

#: Depth of a directory's B+ tree (a million names in 4 KiB blocks need 4).
MAX_INDEX_DEPTH = 32
#: INDX blocks one lookup may visit.
MAX_INDEX_NODES = 256
#: Parsed MFT records kept.
RECORD_CACHE = 512
#: Parsed index nodes kept (each at most one INDX block's entries).
NODE_CACHE = 64
#: Records 0-15 are the volume's metadata files.
FIRST_USER_RECORD = 16
UPCASE_RECORD = 10
UPCASE_BYTES = 65536 * 2

REPARSE_SYMLINK = 0xA000000C
REPARSE_MOUNT_POINT = 0xA0000003

NS_DOS = 2
REF_MASK = 0xFFFFFFFFFFFF


@dataclass
class Inode:
    number: int
    sequence: int
    flags: int
    attributes: list[Attribute]

    def find(self, atype: int, name: str = "") -> list[Attribute]:
        return [a for a in self.attributes if a.type == atype and a.name == name]


@dataclass(frozen=True)
class FileName:
    parent: int
    flags: int
    namespace: int
    name: str
    codes: tuple[int, ...]


def parse_file_name(value: bytes, name: str, what: str) -> FileName:
    if len(value) < 0x42:
        raise corrupt(f"{what}: $FILE_NAME of {len(value)} bytes is too short", name)
    parent = struct.unpack_from("<Q", value, 0)[0]
    flags = struct.unpack_from("<I", value, 0x38)[0]
    length, namespace = value[0x40], value[0x41]
    if 0x42 + 2 * length > len(value) or length == 0:
        raise corrupt(f"{what}: $FILE_NAME name of {length} characters does not fit", name)
    raw = value[0x42: 0x42 + 2 * length]
    return FileName(parent, flags, namespace, raw.decode("utf-16-le", "surrogatepass"),
                    struct.unpack(f"<{length}H", raw))


@dataclass(frozen=True)
class IndexEntry:
    ref: int
    key: FileName | None   # None for the last (empty) entry of a node
    child: int | None      # VCN of the sub-node, if any


def _codes(name: str) -> tuple[int, ...]:
    raw = name.encode("utf-16-le", "surrogatepass")
    return struct.unpack(f"<{len(raw) // 2}H", raw)


def identify(volume: Readable) -> FsInfo | None:
    """An NTFS volume's label, serial (blkid's 16 hex digits), size and version, from its boot sector and
    $Volume, or None when the boot sector is not NTFS's."""
    if volume.size < 512:
        return None
    boot = parse_boot_sector(volume.pread(0, 512))
    if boot is None:
        return None
    mft_at = boot.mft_lcn * boot.cluster_size
    if volume.pread(mft_at, 4) != b"FILE":
        return None
    details: dict[str, object] = {
        "sector_size": boot.bytes_per_sector, "cluster_size": boot.cluster_size,
        "mft_record_size": boot.record_size, "index_block_size": boot.index_block_size,
    }
    if boot.size > volume.size:
        details["truncated"] = f"the volume holds {volume.size} of {boot.size} bytes"
    label = version = None
    try:  # $Volume is record 3, inside the MFT's first run on every volume Windows or mkntfs writes
        buf = bytearray(read_exact(volume, mft_at + 3 * boot.record_size, boot.record_size, "$Volume", FMT))
        apply_fixups(buf, b"FILE", volume.name, "$Volume")
        rec = parse_record(buf, 3, volume.name)
        for attr in rec.attributes:
            if attr.resident and attr.type == AT_VOLUME_NAME and attr.value:
                label = attr.value.decode("utf-16-le", "replace")
            elif attr.resident and attr.type == AT_VOLUME_INFORMATION and len(attr.value) >= 10:
                version = f"{attr.value[8]}.{attr.value[9]}"
    except CorruptImage as exc:
        details["volume_error"] = exc.message
    return FsInfo(type="ntfs", label=label, uuid=f"{boot.serial:016X}", size=boot.size, version=version,
                  readable=True, details=details)


class NtfsFilesystem(Filesystem[int]):
    """An NTFS volume. Nodes are MFT file references (record number, sequence number in the top 16 bits)."""

    case_insensitive = True

    def __init__(self, volume: Readable, info: FsInfo) -> None:
        super().__init__(volume, info)
        boot = parse_boot_sector(volume.pread(0, 512))
        if boot is None:
            raise corrupt("the boot sector is not NTFS's", volume.name)
        self.boot: BootSector = boot
        self.records_read = 0
        self._cache: OrderedDict[int, Inode] = OrderedDict()
        self._nodes: OrderedDict[tuple[int, int], list[IndexEntry]] = OrderedDict()
        self._upcase: tuple[int, ...] | None = None
        self.upcase_source = "unread"
        # The MFT maps itself: record 0's first $DATA extent locates the records that hold the rest of it.
        self._mft_records = 1 << 32
        raw = bytearray(read_exact(volume, boot.mft_lcn * boot.cluster_size, boot.record_size, "$MFT record 0",
                                   FMT))
        self.records_read += 1
        apply_fixups(raw, b"FILE", volume.name, "MFT record 0")
        rec0 = parse_record(raw, 0, volume.name)
        first = [a for a in rec0.attributes if a.type == AT_DATA and not a.name and a.lowest_vcn == 0]
        if not first or first[0].resident:
            raise corrupt("$MFT has no non-resident $DATA in record 0", volume.name)
        self._mft: Readable = self._stream_reader([first[0]], "$MFT")
        self._mft_records = first[0].data_size // boot.record_size
        if any(a.type == AT_ATTRIBUTE_LIST for a in rec0.attributes):
            mft = self._inode(0)
            self._mft = self._stream_reader(mft.find(AT_DATA), "$MFT")
            self._cache.clear()

    # ---- records ------------------------------------------------------------------------------------
    def _read_record(self, number: int) -> FileRecord:
        size = self.boot.record_size
        if not 0 <= number < self._mft_records:
            raise corrupt(f"MFT record {number} is past the end of the MFT ({self._mft_records} records)",
                          self.volume.name)
        buf = bytearray(read_exact(self._mft, number * size, size, f"MFT record {number}", FMT))
        self.records_read += 1
        apply_fixups(buf, b"FILE", self.volume.name, f"MFT record {number}")
        return parse_record(buf, number, self.volume.name)

    def _inode(self, ref: int) -> Inode:
        number, seq = ref & REF_MASK, ref >> 48
        inode = self._cache.get(number)
        if inode is None:
            inode = self._load(number)
            self._cache[number] = inode
            if len(self._cache) > RECORD_CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(number)
        if seq and seq != inode.sequence:
            raise corrupt(f"a directory entry names MFT record {number} with sequence {seq}, but the record"
                          f" has sequence {inode.sequence} (a stale entry)", self.volume.name)
        return inode

    def _load(self, number: int) -> Inode:
        rec = self._read_record(number)
        what = f"MFT record {number}"
        if not rec.flags & MFT_IN_USE:
            raise corrupt(f"{what} is referenced but not in use", self.volume.name)
        if rec.base:
            raise corrupt(f"{what} is an extension record of {rec.base}, not a file", self.volume.name)
        lists = [a for a in rec.attributes if a.type == AT_ATTRIBUTE_LIST]
        if not lists:
            return Inode(number, rec.sequence, rec.flags, rec.attributes)
        if len(lists) > 1:
            raise corrupt(f"{what} has {len(lists)} attribute lists", self.volume.name)
        alist = lists[0]
        size = len(alist.value) if alist.resident else alist.data_size
        if size > MAX_ATTRIBUTE_LIST:
            raise corrupt(f"{what}: attribute list of {size} bytes exceeds {MAX_ATTRIBUTE_LIST}", self.volume.name)
        data = self._stream_reader([alist], f"{what} $ATTRIBUTE_LIST").pread(0, size)
        attrs = [a for a in rec.attributes if a.type != AT_ATTRIBUTE_LIST]
        seen = {number}
        for entry in parse_attribute_list(data, self.volume.name, what):
            if entry.type == AT_ATTRIBUTE_LIST and entry.record != number:
                raise corrupt(f"{what}: the attribute list names an attribute list in record {entry.record}",
                              self.volume.name)
            if entry.record in seen:
                continue
            seen.add(entry.record)
            ext = self._read_record(entry.record)
            if ext.base != number or not ext.flags & MFT_IN_USE or (entry.sequence and
                                                                    entry.sequence != ext.sequence):
                raise corrupt(f"{what}: its attribute list names record {entry.record}, which is not one of its"
                              " extension records", self.volume.name)
            if any(a.type == AT_ATTRIBUTE_LIST for a in ext.attributes):
                raise corrupt(f"{what}: extension record {entry.record} holds an attribute list",
                              self.volume.name)
            attrs.extend(ext.attributes)
        return Inode(number, rec.sequence, rec.flags, attrs)

    def _stream_reader(self, extents: list[Attribute], what: str) -> Readable:
        """One attribute's value over all its extents: resident bytes or runs read at random."""
        if len(extents) == 1 and extents[0].resident:
            return BytesReadable(extents[0].value, what)
        if any(a.resident for a in extents):
            raise corrupt(f"{what}: a resident attribute in several extents", self.volume.name)
        extents = sorted(extents, key=lambda a: a.lowest_vcn)
        head = extents[0]
        if head.lowest_vcn != 0:
            raise corrupt(f"{what}: no extent starts at VCN 0", self.volume.name)
        runs: list[Run] = []
        vcn = 0
        for ext in extents:
            if ext.lowest_vcn != vcn:
                raise corrupt(f"{what}: extents are not contiguous (VCN {ext.lowest_vcn}, expected {vcn})",
                              self.volume.name)
            runs += decode_runlist(ext.mapping, ext.lowest_vcn, ext.highest_vcn, self.boot.clusters,
                                   self.volume.name, what, MAX_RUNS - len(runs))
            vcn = ext.highest_vcn + 1
        cluster = self.boot.cluster_size
        if head.data_size > vcn * cluster or head.allocated_size > vcn * cluster:
            raise corrupt(f"{what}: {head.data_size} bytes but runs for only {vcn * cluster}", self.volume.name)
        return RunReader(self.volume, cluster, runs, head.data_size, head.initialized_size, what)

    def _name_of(self, inode: Inode) -> str:
        names = []
        for attr in inode.find(AT_FILE_NAME):
            if attr.resident and len(attr.value) >= 0x42:
                try:
                    fn = parse_file_name(attr.value, self.volume.name, "")
                except CorruptImage:
                    continue
                names.append((fn.namespace == NS_DOS, fn.name))
        return min(names)[1] if names else f"MFT record {inode.number}"

    # ---- the Filesystem interface -------------------------------------------------------------------
    def root(self) -> int:
        return 5

    def _reparse_tag(self, inode: Inode) -> int | None:
        attrs = inode.find(AT_REPARSE_POINT)
        if not attrs:
            return None
        data = self._stream_reader(attrs, f"MFT record {inode.number} $REPARSE_POINT").pread(0, 4)
        if len(data) < 4:
            raise corrupt(f"MFT record {inode.number}: reparse point too short", self.volume.name)
        return int(struct.unpack("<I", data)[0])

    def stat_node(self, node: int) -> Stat:
        inode = self._inode(node)
        tag = self._reparse_tag(inode)
        if tag is not None:
            return Stat("symlink" if tag in (REPARSE_SYMLINK, REPARSE_MOUNT_POINT) else "other", 0)
        if inode.flags & MFT_DIRECTORY:
            return Stat("dir", 0)
        data = [a for a in inode.find(AT_DATA) if a.lowest_vcn == 0]
        if not data:
            return Stat("other", 0)
        return Stat("file", len(data[0].value) if data[0].resident else data[0].data_size)

    def open_node(self, node: int) -> Readable:
        inode = self._inode(node)
        extents = inode.find(AT_DATA)
        if not extents:
            raise corrupt(f"{self._name_of(inode)} has no data stream", self.volume.name)
        flags = min(extents, key=lambda a: a.lowest_vcn).flags
        if flags & ATTR_ENCRYPTED:
            raise UnsupportedImage(f"{self._name_of(inode)} is EFS-encrypted", path=self.volume.name, fmt=FMT)
        if flags & ATTR_COMPRESSED:
            raise UnsupportedImage(f"{self._name_of(inode)} is NTFS-compressed (LZNT1), which diskport does not"
                                   " decompress", path=self.volume.name, fmt=FMT)
        return self._stream_reader(extents, self._name_of(inode))

    def readlink_node(self, node: int) -> str:
        inode = self._inode(node)
        attrs = inode.find(AT_REPARSE_POINT)
        if not attrs:
            raise corrupt(f"{self._name_of(inode)} is not a reparse point", self.volume.name)
        data = self._stream_reader(attrs, f"MFT record {inode.number} $REPARSE_POINT").pread(0, MAX_RESIDENT)
        name = self._name_of(inode)
        if len(data) < 16:
            raise corrupt(f"{name}: reparse data too short", self.volume.name)
        tag = struct.unpack_from("<I", data)[0]
        sub_off, sub_len = struct.unpack_from("<HH", data, 8)
        base = 8 + (12 if tag == REPARSE_SYMLINK else 8)
        relative = tag == REPARSE_SYMLINK and len(data) >= 20 and struct.unpack_from("<I", data, 16)[0] & 1
        if tag not in (REPARSE_SYMLINK, REPARSE_MOUNT_POINT) or base + sub_off + sub_len > len(data) or sub_len % 2:
            raise corrupt(f"{name}: reparse data is not a well-formed link", self.volume.name)
        target = data[base + sub_off: base + sub_off + sub_len].decode("utf-16-le", "replace")
        if relative:
            return target.replace("\\", "/")
        for prefix in ("\\??\\", "\\\\?\\"):
            if target.startswith(prefix):
                target = target[len(prefix):]
        if len(target) >= 2 and target[1] == ":" and target[0].isalpha():
            return "/" + target[2:].lstrip("\\").replace("\\", "/")
        raise UnsupportedImage(f"{name} links to {target!r}, outside any volume path", path=self.volume.name,
                               fmt=FMT)

    # ---- directories -----------------------------------------------------------------------------------
    def _index(self, node: int) -> tuple[Inode, bytes, Readable | None, int]:
        """A directory's $INDEX_ROOT value, its $INDEX_ALLOCATION (if any) and INDX block size."""
        inode = self._inode(node)
        what = f"MFT record {inode.number}"
        roots = inode.find(AT_INDEX_ROOT, "$I30")
        if len(roots) != 1 or not roots[0].resident:
            raise corrupt(f"{what}: a directory without one resident $INDEX_ROOT", self.volume.name)
        root = roots[0].value
        if len(root) < 0x20:
            raise corrupt(f"{what}: $INDEX_ROOT too short", self.volume.name)
        indexed, collation, block = struct.unpack_from("<III", root, 0)
        if indexed != AT_FILE_NAME or collation != 1:
            raise corrupt(f"{what}: $I30 does not index file names (type {indexed:#x}, collation {collation})",
                          self.volume.name)
        if block & (block - 1) or not 512 <= block <= 65536:
            raise corrupt(f"{what}: index block size {block}", self.volume.name)
        allocs = inode.find(AT_INDEX_ALLOCATION, "$I30")
        alloc = self._stream_reader(allocs, f"{what} $INDEX_ALLOCATION") if allocs else None
        return inode, root, alloc, block

    def _node_entries(self, buf: bytes, header: int, what: str) -> list[IndexEntry]:
        if header + 16 > len(buf):
            raise corrupt(f"{what}: index header past its block", self.volume.name)
        first, used = struct.unpack_from("<II", buf, header)
        pos, end = header + first, header + used
        if first < 16 or end > len(buf) or pos > end:
            raise corrupt(f"{what}: index entries at {first:#x}+{used:#x} lie outside it", self.volume.name)
        out = []
        while True:
            if pos + 16 > end:
                raise corrupt(f"{what}: index entries end without a last entry", self.volume.name)
            ref, length, key_len, flags = struct.unpack_from("<QHHH", buf, pos)
            if length < 16 or length % 8 or pos + length > end or 16 + key_len > length:
                raise corrupt(f"{what}: index entry at {pos:#x} has length {length}", self.volume.name)
            child = None
            if flags & 1:
                if length < 24 or (key_len and 16 + key_len > length - 8):
                    raise corrupt(f"{what}: index entry at {pos:#x} has no room for its sub-node", self.volume.name)
                child = struct.unpack_from("<q", buf, pos + length - 8)[0]
            key = None
            if not flags & 2:
                key = parse_file_name(buf[pos + 16: pos + 16 + key_len], self.volume.name, what)
            out.append(IndexEntry(ref, key, child))
            if flags & 2:
                return out
            pos += length
            if len(out) > len(buf) // 16:
                raise corrupt(f"{what}: too many index entries", self.volume.name)

    def _node(self, number: int, vcn: int, parse: Callable[[], list[IndexEntry]]) -> list[IndexEntry]:
        """A parsed index node of directory ``number`` (``vcn`` -1 for its root), through a small cache."""
        key = (number, vcn)
        items = self._nodes.get(key)
        if items is None:
            items = parse()
            self._nodes[key] = items
            if len(self._nodes) > NODE_CACHE:
                self._nodes.popitem(last=False)
        else:
            self._nodes.move_to_end(key)
        return items

    def _root_node(self, inode: Inode, root: bytes, what: str) -> list[IndexEntry]:
        return self._node(inode.number, -1, lambda: self._node_entries(root, 0x10, what))

    def _block(self, inode: Inode, alloc: Readable | None, block: int, vcn: int, what: str) -> list[IndexEntry]:
        return self._node(inode.number, vcn, lambda: self._read_block(alloc, block, vcn, what))

    def _read_block(self, alloc: Readable | None, block: int, vcn: int, what: str) -> list[IndexEntry]:
        if alloc is None:
            raise corrupt(f"{what}: a sub-node at VCN {vcn} but no $INDEX_ALLOCATION", self.volume.name)
        vcn_size = self.boot.cluster_size if block >= self.boot.cluster_size else 512
        if vcn < 0 or vcn * vcn_size + block > alloc.size:
            raise corrupt(f"{what}: sub-node VCN {vcn} lies outside its $INDEX_ALLOCATION", self.volume.name)
        buf = bytearray(read_exact(alloc, vcn * vcn_size, block, f"{what} INDX block", FMT))
        apply_fixups(buf, b"INDX", self.volume.name, f"{what} INDX block at VCN {vcn}")
        if struct.unpack_from("<q", buf, 0x10)[0] != vcn:
            raise corrupt(f"{what}: INDX block at VCN {vcn} says it is VCN {struct.unpack_from('<q', buf, 0x10)[0]}",
                          self.volume.name)
        return self._node_entries(bytes(buf), 0x18, f"{what} INDX block at VCN {vcn}")

    def entries(self, node: int) -> Iterator[tuple[str, int]]:
        inode, root, alloc, block = self._index(node)
        what = f"directory MFT record {inode.number}"
        visited: set[int] = set()
        stack = [_Frame(self._root_node(inode, root, what))]
        while stack:  # in order: an entry's sub-node, then the entry
            frame = stack[-1]
            if frame.next >= len(frame.items):
                stack.pop()
                continue
            entry = frame.items[frame.next]
            if entry.child is not None and not frame.descended:
                frame.descended = True
                self._check_child(entry.child, visited, len(stack), what)
                stack.append(_Frame(self._block(inode, alloc, block, entry.child, what)))
                continue
            frame.next, frame.descended = frame.next + 1, False
            key = entry.key
            if key is None or key.namespace == NS_DOS:
                continue
            self._check_parent(key, inode.number, what)
            number = entry.ref & REF_MASK
            if number == inode.number or (number < FIRST_USER_RECORD and key.name.startswith("$")):
                continue
            yield key.name, entry.ref

    def _check_parent(self, key: FileName, number: int, what: str) -> None:
        if key.parent & REF_MASK != number:
            raise corrupt(f"{what}: the entry {key.name!r} says its directory is record {key.parent & REF_MASK}",
                          self.volume.name)

    def _check_child(self, vcn: int, visited: set[int], depth: int, what: str, limit: int | None = None) -> None:
        """A sub-node may be entered: not seen before in this walk, not too deep, within the walk's budget."""
        if vcn in visited:
            raise corrupt(f"{what}: INDX block at VCN {vcn} is reached twice (a loop)", self.volume.name)
        if depth >= MAX_INDEX_DEPTH:
            raise corrupt(f"{what}: index deeper than {MAX_INDEX_DEPTH}", self.volume.name)
        if limit is not None and len(visited) >= limit:
            raise corrupt(f"{what}: more than {limit} index blocks in one lookup", self.volume.name)
        visited.add(vcn)

    # ---- lookups through the B+ tree -------------------------------------------------------------------
    def upcase(self) -> tuple[int, ...] | None:
        """The volume's $UpCase table (read once), or None when it is missing or malformed."""
        if self.upcase_source == "unread":
            self.upcase_source = "casefold (no usable $UpCase)"
            try:
                inode = self._inode(UPCASE_RECORD)
                if self._name_of(inode) == "$UpCase":
                    data = self.open_node(UPCASE_RECORD)
                    if data.size == UPCASE_BYTES:
                        raw = read_exact(data, 0, UPCASE_BYTES, "$UpCase", FMT)
                        self._upcase = struct.unpack(f"<{UPCASE_BYTES // 2}H", raw)
                        self.upcase_source = "$UpCase"
            except (CorruptImage, UnsupportedImage) as exc:
                self.upcase_source = f"casefold ($UpCase unreadable: {exc.message})"
            self.info.details["upcase"] = self.upcase_source
        return self._upcase

    def find_entry(self, node: int, name: str) -> int | None:
        up = self.upcase()
        if up is None:
            return super().find_entry(node, name)
        inode, root, alloc, block = self._index(node)
        what = f"directory MFT record {inode.number}"
        codes = _codes(name)
        want = [up[c] for c in codes]
        visited: set[int] = set()
        found: list[int] = []  # entries equal but for case, in tree order

        def search(items: list[IndexEntry], depth: int) -> int | None:
            for entry in items:
                key = entry.key
                order = -1 if key is None else _compare(want, [up[c] for c in key.codes])
                if order <= 0 and entry.child is not None:
                    self._check_child(entry.child, visited, depth, what, MAX_INDEX_NODES)
                    hit = search(self._block(inode, alloc, block, entry.child, what), depth + 1)
                    if hit is not None:
                        return hit
                if order < 0:
                    return None
                if order == 0 and key is not None:
                    self._check_parent(key, inode.number, what)
                    if key.codes == codes:
                        return entry.ref
                    found.append(entry.ref)
            return None

        exact = search(self._root_node(inode, root, what), 1)
        if exact is not None:
            return exact
        return found[0] if found else None


def _compare(a: list[int], b: list[int]) -> int:
    return (a > b) - (a < b)


@dataclass
class _Frame:
    items: list[IndexEntry]
    next: int = 0
    descended: bool = False


def _open(volume: Readable, info: FsInfo) -> NtfsFilesystem:
    return NtfsFilesystem(volume, info)


SPEC = FilesystemSpec("ntfs", identify, _open)
