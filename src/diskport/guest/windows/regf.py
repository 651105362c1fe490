"""A read-only Windows registry hive (regf) reader that reads only the cells it is asked for.

Inspection wants a dozen values from hives of 50-150 MB (SOFTWARE) read through a disk image, perhaps over HTTP:
this reader never reads a hive whole. It reads the 4 KiB base block, then, for each key on a path, the key node,
its subkey lists and the one matching child, through a small LRU of 4 KiB pages (:data:`CACHE_PAGES`).

Format (facts from libyal's libregf "Windows NT Registry File (REGF) format" document and the hivex sources, read,
not copied): a base block (``regf``, primary/secondary sequence numbers, version, root cell offset at 36, hive bins
data size at 40, XOR checksum of the first 508 bytes as 32-bit words at 508), then hive bins (``hbin``, their
offset relative to the first bin, their size, a multiple of 4 KiB) tiled with cells (a signed 32-bit size,
negative when allocated, 8-byte aligned). Cell offsets are relative to the first bin. Cells: ``nk`` key node
(name ASCII when flag 0x20, else UTF-16LE), ``vk`` value (name ASCII when flag 1; data inline in the offset field
when bit 31 of the size is set, else in a data cell, or for more than 16344 bytes in hives of version 1.4 and
later in a ``db`` big-data cell listing segments of 16344 bytes), ``sk`` security (skipped), subkey lists ``lf``
(name hints), ``lh`` (name hashes), ``li`` (offsets only) and ``ri`` (a list of lists).

What is checked, because the bytes may be hostile: the checksum and signature of the base block; the hive bins
size against the file; every cell offset against the bins, its bin's ``hbin`` header (offset field must match),
its size against its bin; every count against the cell that holds it, a key's subkey count against its lists;
list cycles (a list offset seen twice); a listed key's parent field against the key that lists it (else a key
could list its own ancestor and the tree would loop); ``ri`` nesting (:data:`MAX_RI_DEPTH`); value sizes
(:data:`MAX_VALUE` by default); ``db`` segment counts against the value size. Any inconsistency raises
:class:`~diskport.errors.CorruptImage` with ``fmt="regf"``.

A hive whose sequence numbers differ was not cleanly written (Windows 8 and later write hives lazily; the newest
changes may live in the transaction logs): it is read as it is on disk and reported as :attr:`Hive.dirty`. The
transaction logs (``.LOG``, ``.LOG1``, ``.LOG2``) are **not** replayed, so values changed shortly before a
crash or a hibernation may be older than the ones Windows would see.

Why written here: the one capable Python reader (Fox-IT's dissect.regf) is AGPL-3.0; python-registry reads the
whole file into memory; libregf's bindings are LGPL C. hivex (LGPL) is the test oracle only.
"""

from __future__ import annotations

import bisect
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from diskport.errors import CorruptImage, UnsupportedImage
from diskport.guest.view import Readable

FMT = "regf"
BASE = 4096                 # the base block; hive bins follow it
PAGE = 4096
CACHE_PAGES = 256           # 1 MiB of pages at most
MAX_BIN = 16 * 1024 * 1024  # a bin larger than this is refused (real bins are a few pages)
MAX_VALUE = 1024 * 1024     # value data larger than this is refused unless the caller raises the limit
MAX_RI_DEPTH = 2
BIG_SEGMENT = 16344         # bytes of data per db segment

REG_NONE = 0
REG_SZ = 1
REG_EXPAND_SZ = 2
REG_BINARY = 3
REG_DWORD = 4
REG_DWORD_BIG_ENDIAN = 5
REG_LINK = 6
REG_MULTI_SZ = 7
REG_RESOURCE_LIST = 8
REG_FULL_RESOURCE_DESCRIPTOR = 9
REG_RESOURCE_REQUIREMENTS_LIST = 10
REG_QWORD = 11

TYPE_NAMES = {
    REG_NONE: "REG_NONE", REG_SZ: "REG_SZ", REG_EXPAND_SZ: "REG_EXPAND_SZ", REG_BINARY: "REG_BINARY",
    REG_DWORD: "REG_DWORD", REG_DWORD_BIG_ENDIAN: "REG_DWORD_BIG_ENDIAN", REG_LINK: "REG_LINK",
    REG_MULTI_SZ: "REG_MULTI_SZ", REG_RESOURCE_LIST: "REG_RESOURCE_LIST",
    REG_FULL_RESOURCE_DESCRIPTOR: "REG_FULL_RESOURCE_DESCRIPTOR",
    REG_RESOURCE_REQUIREMENTS_LIST: "REG_RESOURCE_REQUIREMENTS_LIST", REG_QWORD: "REG_QWORD",
}

_NONE = 0xFFFFFFFF
_KEY_COMP_NAME = 0x0020
_VALUE_COMP_NAME = 0x0001


def fold(name: str) -> str:
    """A name as Windows compares it: each character upper-cased on its own (no 'ß' -> 'SS')."""
    out = []
    for c in name:
        u = c.upper()
        out.append(u if len(u) == 1 else c)
    return "".join(out)


def lh_hash(name: str) -> int:
    """The ``lh`` list's name hash: h = h * 37 + upper(c) over the name, modulo 2**32."""
    h = 0
    for c in fold(name):
        h = (h * 37 + ord(c)) & 0xFFFFFFFF
    return h


def _decode_name(raw: bytes, ascii_flag: bool) -> str:
    if ascii_flag:
        return raw.decode("latin-1")
    return raw[: len(raw) & ~1].decode("utf-16-le", errors="replace")


def _utf16(data: bytes) -> str:
    return data[: len(data) & ~1].decode("utf-16-le", errors="replace")


class Hive:
    """A hive file (any :class:`Readable`: a file, or a file inside a guest's NTFS)."""

    def __init__(self, src: Readable, *, max_value: int = MAX_VALUE) -> None:
        self.src = src
        self.name = src.name
        self.max_value = max_value
        self._pages: OrderedDict[int, bytes] = OrderedDict()
        self._bin_starts: list[int] = []
        self._bin_ends: dict[int, int] = {}
        if src.size < BASE + PAGE:
            raise self._corrupt(f"{src.size} bytes is too small for a hive")
        base = self._read(0, 512, "the base block")
        if base[:4] != b"regf":
            raise self._corrupt("no 'regf' signature in the base block")
        words = struct.unpack("<127I", base[:508])
        x = 0
        for w in words:
            x ^= w
        x = 1 if x == 0 else 0xFFFFFFFE if x == 0xFFFFFFFF else x
        (stored,) = struct.unpack_from("<I", base, 508)
        if x != stored:
            raise self._corrupt(f"base block checksum {stored:#010x} does not match its bytes ({x:#010x})")
        (self.sequence1, self.sequence2, self.last_written, self.major_version, self.minor_version,
         self.file_type, self.file_format, root, self.bins_size) = struct.unpack_from("<IIQIIIIII", base, 4)
        self.dirty = self.sequence1 != self.sequence2
        if self.major_version != 1:
            raise UnsupportedImage(f"hive version {self.major_version}.{self.minor_version} is not 1.x",
                                   path=self.name, fmt=FMT)
        if self.bins_size < PAGE or self.bins_size % PAGE or BASE + self.bins_size > src.size:
            raise self._corrupt(f"hive bins size {self.bins_size} does not fit the {src.size}-byte file")
        self.root = self._key(root)

    # --- low level ---------------------------------------------------------------------------------------

    def _corrupt(self, message: str, offset: int | None = None) -> CorruptImage:
        return CorruptImage(message, path=self.name, fmt=FMT, offset=offset)

    def _page(self, index: int) -> bytes:
        page = self._pages.get(index)
        if page is not None:
            self._pages.move_to_end(index)
            return page
        page = self.src.pread(index * PAGE, PAGE)
        self._pages[index] = page
        if len(self._pages) > CACHE_PAGES:
            self._pages.popitem(last=False)
        return page

    def _read(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at file ``offset`` through the page cache."""
        if offset < 0 or length < 0 or offset + length > self.src.size:
            raise self._corrupt(f"{what} at {offset:#x}+{length:#x} lies outside the file", offset)
        if length == 0:
            return b""
        first, last = offset // PAGE, (offset + length - 1) // PAGE
        missing = [i for i in range(first, last + 1) if i not in self._pages]
        if len(missing) > 1:   # one read for a run of missing pages (a big cell), not one per page
            lo, hi = missing[0], missing[-1]
            data = self.src.pread(lo * PAGE, (hi - lo + 1) * PAGE)
            for i in missing:
                self._pages[i] = data[(i - lo) * PAGE: (i - lo + 1) * PAGE]
                self._pages.move_to_end(i)
        parts = [self._page(i) for i in range(first, last + 1)]
        while len(self._pages) > CACHE_PAGES:
            self._pages.popitem(last=False)
        data = b"".join(parts)[offset - first * PAGE: offset - first * PAGE + length]
        if len(data) != length:
            raise self._corrupt(f"{what} is truncated", offset)
        return data

    def _bin_of(self, cell: int) -> tuple[int, int]:
        """The (start, end) of the hive bin holding the cell offset, its header checked."""
        i = bisect.bisect_right(self._bin_starts, cell) - 1
        if i >= 0:
            start = self._bin_starts[i]
            if cell < self._bin_ends[start]:
                return start, self._bin_ends[start]
        page = cell - cell % PAGE
        for _ in range(MAX_BIN // PAGE):
            if page < 0:
                break
            head = self._read(BASE + page, 32, "a hive bin header")
            if head[:4] == b"hbin" and struct.unpack_from("<I", head, 4)[0] == page:
                (size,) = struct.unpack_from("<I", head, 8)
                if size < PAGE or size % PAGE or size > MAX_BIN or page + size > self.bins_size:
                    raise self._corrupt(f"hive bin at {page:#x} has a bad size {size:#x}", BASE + page)
                if cell >= page + size:
                    break
                bisect.insort(self._bin_starts, page)
                self._bin_ends[page] = page + size
                return page, page + size
            page -= PAGE
        raise self._corrupt(f"cell offset {cell:#x} is in no hive bin", BASE + cell)

    def cell(self, offset: int, what: str) -> bytes:
        """The data of the allocated cell at ``offset`` (relative to the first bin), its size checked."""
        if offset % 8 or offset < 0x20 or offset + 8 > self.bins_size:
            raise self._corrupt(f"{what} cell offset {offset:#x} lies outside the hive bins", BASE + offset)
        start, end = self._bin_of(offset)
        if offset < start + 0x20:
            raise self._corrupt(f"{what} cell offset {offset:#x} is inside a bin header", BASE + offset)
        (size,) = struct.unpack("<i", self._read(BASE + offset, 4, what))
        if size >= 0:
            raise self._corrupt(f"{what} cell at {offset:#x} is free", BASE + offset)
        size = -size
        if size < 8 or offset + size > end:
            raise self._corrupt(f"{what} cell at {offset:#x} has size {size} beyond its bin", BASE + offset)
        return self._read(BASE + offset + 4, size - 4, what)

    def _key(self, offset: int) -> Key:
        data = self.cell(offset, "key node")
        if data[:2] != b"nk" or len(data) < 76:
            raise self._corrupt(f"cell at {offset:#x} is not a key node", BASE + offset)
        (flags, last_written, _access, parent, nsub, _nvol, sublist, _vollist, nval, vallist, _sk, cls,
         ) = struct.unpack_from("<HQIIIIIIIIII", data, 2)
        name_len, class_len = struct.unpack_from("<HH", data, 72)
        if 76 + name_len > len(data):
            raise self._corrupt(f"key node at {offset:#x} has a name beyond its cell", BASE + offset)
        name = _decode_name(data[76: 76 + name_len], bool(flags & _KEY_COMP_NAME))
        return Key(self, offset, name, flags, last_written, parent, nsub, sublist, nval, vallist, cls, class_len)

    def _subkey_offsets(self, list_offset: int, count: int) -> Iterator[tuple[int, int | None, bytes | None]]:
        """(nk offset, lh hash or None, lf hint or None) of every entry reachable from a subkey list."""
        seen: set[int] = set()
        budget = [count]

        def walk(off: int, depth: int) -> Iterator[tuple[int, int | None, bytes | None]]:
            if off in seen:
                raise self._corrupt(f"subkey list at {off:#x} is listed twice (a cycle)", BASE + off)
            seen.add(off)
            data = self.cell(off, "subkey list")
            sig = data[:2]
            if len(data) < 4:
                raise self._corrupt(f"subkey list at {off:#x} is too short", BASE + off)
            (n,) = struct.unpack_from("<H", data, 2)
            width = 4 if sig in (b"li", b"ri") else 8
            if sig not in (b"lf", b"lh", b"li", b"ri"):
                raise self._corrupt(f"cell at {off:#x} is not a subkey list ({sig!r})", BASE + off)
            if 4 + n * width > len(data):
                raise self._corrupt(f"subkey list at {off:#x} counts {n} entries beyond its cell", BASE + off)
            if sig == b"ri":
                if depth >= MAX_RI_DEPTH:
                    raise self._corrupt(f"index list at {off:#x} nests too deep", BASE + off)
                for (sub,) in struct.iter_unpack("<I", data[4: 4 + 4 * n]):
                    yield from walk(sub, depth + 1)
                return
            for i in range(n):
                if budget[0] <= 0:
                    raise self._corrupt("subkey lists hold more entries than the key counts", BASE + off)
                budget[0] -= 1
                (nk,) = struct.unpack_from("<I", data, 4 + i * width)
                if sig == b"lh":
                    yield nk, struct.unpack_from("<I", data, 8 + i * 8)[0], None
                elif sig == b"lf":
                    yield nk, None, data[8 + i * 8: 12 + i * 8]
                else:
                    yield nk, None, None

        yield from walk(list_offset, 0)
        if budget[0]:
            raise self._corrupt(f"subkey lists hold {count - budget[0]} entries, fewer than the key counts ({count})",
                                BASE + list_offset)

    def _child(self, parent: Key, offset: int) -> Key:
        """The key node at ``offset`` listed by ``parent``, which it must name as its parent: a key listed
        under another (its own child, say) would make the tree a loop."""
        key = self._key(offset)
        if key.parent_offset != parent.offset:
            raise self._corrupt(f"key node at {offset:#x} listed under key {parent.name!r} names another parent "
                                f"({key.parent_offset:#x})", BASE + offset)
        return key

    # --- API ----------------------------------------------------------------------------------------------

    def open_key(self, path: str) -> Key | None:
        """The key at a backslash-separated path below the root (case-insensitive), else None."""
        key: Key | None = self.root
        for part in path.strip("\\").split("\\"):
            if not part:
                continue
            assert key is not None
            key = key.subkey(part)
            if key is None:
                return None
        return key


@dataclass(eq=False)
class Key:
    """One key node (read when its parent listed it); its subkeys and values are read when asked for."""

    hive: Hive
    offset: int
    name: str
    flags: int
    last_written: int          # FILETIME
    parent_offset: int
    subkey_count: int
    _subkey_list: int
    value_count: int
    _value_list: int
    _class_offset: int
    _class_length: int

    def __repr__(self) -> str:
        return f"Key({self.name!r} at {self.offset:#x})"

    @property
    def class_name(self) -> str | None:
        if self._class_offset == _NONE or not self._class_length:
            return None
        data = self.hive.cell(self._class_offset, "class name")
        if self._class_length > len(data):
            raise self.hive._corrupt(f"class name of key {self.name!r} is longer than its cell")
        return _utf16(data[: self._class_length])

    def _entries(self) -> Iterator[tuple[int, int | None, bytes | None]]:
        if self.subkey_count == 0 or self._subkey_list == _NONE:
            return iter(())
        return self.hive._subkey_offsets(self._subkey_list, self.subkey_count)

    def subkeys(self) -> list[Key]:
        return [self.hive._child(self, off) for off, _h, _hint in self._entries()]

    def subkey(self, name: str) -> Key | None:
        """The child named ``name`` (case-insensitive), else None. ``lh`` hashes and ``lf`` hints skip the
        children that cannot match without reading them (for ASCII names only, whose upper case is certain)."""
        want = fold(name)
        ascii_name = name.isascii()
        h = lh_hash(name) if ascii_name else None
        hint = want.encode("latin-1")[:4] if ascii_name else None
        for off, entry_hash, entry_hint in self._entries():
            if ascii_name and entry_hash is not None and entry_hash != h:
                continue
            if (ascii_name and entry_hint is not None and hint is not None
                    and fold(entry_hint.rstrip(b"\0").decode("latin-1")) != hint.decode("latin-1")):
                continue
            key = self.hive._child(self, off)
            if fold(key.name) == want:
                return key
        return None

    def _value_offsets(self) -> list[int]:
        if self.value_count == 0 or self._value_list == _NONE:
            return []
        data = self.hive.cell(self._value_list, "value list")
        if self.value_count * 4 > len(data):
            raise self.hive._corrupt(f"key {self.name!r} counts {self.value_count} values beyond its value list")
        return list(struct.unpack_from(f"<{self.value_count}I", data))

    def _value(self, offset: int) -> Value:
        hive = self.hive
        data = hive.cell(offset, "value")
        if data[:2] != b"vk" or len(data) < 20:
            raise hive._corrupt(f"cell at {offset:#x} is not a value", BASE + offset)
        name_len, size, data_off, vtype, flags = struct.unpack_from("<HIIIH", data, 2)
        if 20 + name_len > len(data):
            raise hive._corrupt(f"value at {offset:#x} has a name beyond its cell", BASE + offset)
        name = _decode_name(data[20: 20 + name_len], bool(flags & _VALUE_COMP_NAME))
        return Value(self, offset, name, vtype, size, data_off)

    def values(self) -> list[Value]:
        return [self._value(off) for off in self._value_offsets()]

    def value(self, name: str | None) -> Value | None:
        """The value named ``name`` (case-insensitive); ``""`` or None is the default value."""
        want = fold(name or "")
        for off in self._value_offsets():
            v = self._value(off)
            if fold(v.name) == want:
                return v
        return None


@dataclass(eq=False)
class Value:
    """One value; its data is read on first use of :attr:`data`."""

    key: Key
    offset: int
    name: str
    type: int
    _size: int
    _data_offset: int

    def __repr__(self) -> str:
        return f"Value({self.name!r}, {TYPE_NAMES.get(self.type, self.type)})"

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"REG_{self.type:#x}")

    @property
    def size(self) -> int:
        return self._size & 0x7FFFFFFF

    @property
    def data(self) -> bytes:
        hive = self.key.hive
        size = self.size
        if self._size & 0x80000000:   # resident in the offset field
            if size > 4:
                raise hive._corrupt(f"value {self.name!r} claims {size} resident bytes (at most 4)")
            return struct.pack("<I", self._data_offset)[:size]
        if size == 0:
            return b""
        if size > hive.max_value:
            raise UnsupportedImage(f"value {self.name!r} of {size} bytes exceeds the {hive.max_value}-byte limit",
                                   path=hive.name, fmt=FMT)
        cell = hive.cell(self._data_offset, "value data")
        if size > BIG_SEGMENT and cell[:2] == b"db" and hive.minor_version >= 4:
            return self._big(cell, size)
        if size > len(cell):
            raise hive._corrupt(f"value {self.name!r} of {size} bytes overruns its {len(cell)}-byte cell")
        return cell[:size]

    def _big(self, cell: bytes, size: int) -> bytes:
        hive = self.key.hive
        if len(cell) < 8:
            raise hive._corrupt(f"big-data cell of value {self.name!r} is too short")
        count, seglist = struct.unpack_from("<HI", cell, 2)
        need = -(-size // BIG_SEGMENT)
        if count < need or count > need + 1:
            raise hive._corrupt(f"value {self.name!r} of {size} bytes has {count} big-data segments")
        offsets = hive.cell(seglist, "big-data segment list")
        if need * 4 > len(offsets):
            raise hive._corrupt(f"big-data segment list of value {self.name!r} is shorter than its count")
        parts = []
        left = size
        for (seg,) in struct.iter_unpack("<I", offsets[: need * 4]):
            chunk = hive.cell(seg, "big-data segment")
            n = min(left, BIG_SEGMENT)
            if len(chunk) < n:
                raise hive._corrupt(f"big-data segment of value {self.name!r} is shorter than {n} bytes")
            parts.append(chunk[:n])
            left -= n
        return b"".join(parts)

    def as_str(self) -> str | None:
        """REG_SZ, REG_EXPAND_SZ or REG_LINK as text (UTF-16LE, cut at the first NUL); else None."""
        if self.type not in (REG_SZ, REG_EXPAND_SZ, REG_LINK):
            return None
        return _utf16(self.data).split("\0", 1)[0]

    def as_strings(self) -> list[str] | None:
        """REG_MULTI_SZ as its strings (up to the empty one that ends the list); a string type as [it]."""
        if self.type == REG_MULTI_SZ:
            out = []
            for item in _utf16(self.data).split("\0"):
                if not item:
                    break
                out.append(item)
            return out
        text = self.as_str()
        return None if text is None else [text]

    def as_int(self) -> int | None:
        """REG_DWORD (little or big endian) or REG_QWORD as a number, a decimal REG_SZ too; else None."""
        data = self.data if self.type in (REG_DWORD, REG_DWORD_BIG_ENDIAN, REG_QWORD) else b""
        if self.type == REG_DWORD and len(data) == 4:
            return int(struct.unpack("<I", data)[0])
        if self.type == REG_DWORD_BIG_ENDIAN and len(data) == 4:
            return int(struct.unpack(">I", data)[0])
        if self.type == REG_QWORD and len(data) == 8:
            return int(struct.unpack("<Q", data)[0])
        s = self.as_str()
        if s is not None and s.strip().isdigit() and s.strip().isascii():
            return int(s.strip())
        return None
