"""Which kernel modules an initramfs holds, listed in bounded memory without unpacking it.

An initramfs is one or more cpio archives in the "newc" format (magic ``070701``, or ``070702`` with a
checksum), concatenated, each optionally compressed, as the kernel's ``Documentation/driver-api/early-userspace/
buffer-format.rst`` describes: dracut and initramfs-tools put an uncompressed early-microcode archive first,
then the main archive compressed with gzip, xz, zstd, lz4 (the legacy frame ``lz4 -l`` writes, or the LZ4
frame format), bzip2 or lzma. Zero bytes may pad between archives; zstd frames that follow one another are one
stream (the data of one archive may run across them).

A newc header is 110 ASCII bytes: the magic then thirteen 8-digit hex fields (ino, mode, uid, gid, nlink,
mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check); the name (``namesize`` bytes
with its NUL) follows, padded to 4 bytes from the header's start, then the data, padded to 4. The entry
``TRAILER!!!`` ends an archive.

Only headers and names are kept: in an uncompressed archive the data of each entry is skipped by offset (never
read); in a compressed one it is decompressed and thrown away as it streams. The decompressors are asked for
bounded output each step (zstd is fed 1 KiB at a time since its streaming object takes no output limit), the
whole is bounded by :data:`MAX_UNPACKED` bytes and :data:`MAX_ENTRIES` entries, names by :data:`MAX_NAME`, so a
hostile archive (a huge ``namesize`` or ``filesize``, a decompression bomb) ends with a one-line error in
bounded time and memory. Listing stops early once every module asked for has been seen.

By hand because cpio newc is a fixed header; Python's libraries for it read whole archives into memory.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import lz4.block
import lz4.frame
import zstandard

from diskport.errors import CorruptImage
from diskport.guest.view import Readable

#: Bytes decompressed from one initramfs at most (a distribution's is 30-150 MiB unpacked).
MAX_UNPACKED = 1 << 30
MAX_ENTRIES = 500_000
#: PATH_MAX: the kernel refuses longer names too.
MAX_NAME = 4096
HEADER = 110
CHUNK = 64 * 1024
LZ4_LEGACY_BLOCK = 8 << 20
READ_AHEAD = 1 << 20
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
FMT = "initramfs"

MAGICS: list[tuple[bytes, str]] = [
    (b"070701", "cpio"), (b"070702", "cpio"), (b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x02\x21\x4c\x18", "lz4"), (b"\x04\x22\x4d\x18", "lz4"),
    (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma"), (b"\x89LZO", "lzo"), (b"070707", "cpio-odc"),
]


@dataclass
class Listing:
    """What one initramfs holds, as far as it was read."""

    archives: list[str] = field(default_factory=list)    # "cpio", "cpio+zstd", ... in file order
    entries: int = 0
    modules: dict[str, str] = field(default_factory=dict)  # module name -> path inside the archive
    complete: bool = False                                 # read to its end
    problem: str | None = None                             # why it was not read to its end


def module_name(path: str) -> str | None:
    """``virtio_blk`` for ``usr/lib/modules/6.5/kernel/drivers/block/virtio_blk.ko.xz``; None if not a module."""
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)].replace("-", "_")
    return None


class _Budget:
    def __init__(self, name: str) -> None:
        self.name = name
        self.unpacked = 0

    def spend(self, n: int) -> None:
        self.unpacked += n
        if self.unpacked > MAX_UNPACKED:
            raise CorruptImage(f"unpacks to more than {MAX_UNPACKED} bytes", path=self.name, fmt=FMT)


class _Raw:
    """The file's bytes read forward in chunks from ``pos``, fetched :data:`READ_AHEAD` bytes at a time (one
    request for many blocks over HTTP)."""

    def __init__(self, src: Readable, pos: int) -> None:
        self.src, self.pos = src, pos
        self._ahead = b""
        self._ahead_at = pos

    def chunk(self, size: int = CHUNK) -> bytes:
        within = self.pos - self._ahead_at
        if not 0 <= within < len(self._ahead):
            self._ahead_at, self._ahead = self.pos, self.src.pread(self.pos, max(READ_AHEAD, size))
            within = 0
        data = self._ahead[within:within + size]
        if len(data) < size and within + len(data) == len(self._ahead) and len(self._ahead) >= READ_AHEAD:
            data += self.src.pread(self.pos + len(data), size - len(data))
        self.pos += len(data)
        return data


class _Stream:
    """Decompressed bytes with ``read`` and ``skip``; ``end`` gives the raw offset after the stream, if known."""

    def __init__(self, kind: str, raw: _Raw, budget: _Budget) -> None:
        self.kind, self.raw, self.budget = kind, raw, budget
        self.buffer = b""
        self.done = False
        self.end: int | None = None
        self.truncated = False
        self._produce: Callable[[int], bytes] = getattr(self, f"_{kind.replace('-', '_')}")
        if kind == "gzip":
            self._z = zlib.decompressobj(wbits=31)
        elif kind in ("xz", "lzma"):
            self._l = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
        elif kind == "bzip2":
            self._b = bz2.BZ2Decompressor()
        elif kind == "zstd":
            self._d = zstandard.ZstdDecompressor().decompressobj()
        elif kind == "lz4":
            head = raw.chunk(4)
            self._legacy = head == b"\x02\x21\x4c\x18"
            if not self._legacy:
                raw.pos -= 4
                self._f = lz4.frame.LZ4FrameDecompressor()
        self._pending = b""

    def _fail(self, message: str) -> CorruptImage:
        return CorruptImage(f"{self.kind} data is damaged: {message}", path=self.budget.name, fmt=FMT)

    def _finish(self, unused: bytes) -> bytes:
        self.done = True
        self.end = self.raw.pos - len(unused)
        return b""

    def _gzip(self, limit: int) -> bytes:
        while True:
            if self._z.eof:
                return self._finish(self._z.unused_data)
            data = self._z.unconsumed_tail or self.raw.chunk()
            if not data:
                self.truncated = True
                return b""
            try:
                out = self._z.decompress(data, limit)
            except zlib.error as e:
                raise self._fail(str(e)) from None
            if out:
                return out

    def _lzma_like(self, obj: lzma.LZMADecompressor | bz2.BZ2Decompressor, limit: int) -> bytes:
        while True:
            if obj.eof:
                return self._finish(obj.unused_data)
            data = b""
            if obj.needs_input:
                data = self.raw.chunk()
                if not data:
                    self.truncated = True
                    return b""
            try:
                out = obj.decompress(data, limit)
            except (lzma.LZMAError, OSError, EOFError) as e:
                raise self._fail(str(e)) from None
            if out:
                return out

    def _xz(self, limit: int) -> bytes:
        return self._lzma_like(self._l, limit)

    def _lzma(self, limit: int) -> bytes:
        return self._lzma_like(self._l, limit)

    def _bzip2(self, limit: int) -> bytes:
        return self._lzma_like(self._b, limit)

    def _zstd(self, limit: int) -> bytes:
        while True:
            if self._d.eof:
                unused = self._d.unused_data
                if len(unused) < 4:
                    unused += self.raw.chunk(4 - len(unused))
                if not unused.startswith(b"\x28\xb5\x2f\xfd"):
                    return self._finish(unused)
                # another frame continues the same data (pzstd and zstd --rsyncable write several), as the
                # kernel's decompressor reads them
                self._d = zstandard.ZstdDecompressor().decompressobj()
                out = self._decompress_zstd(unused)
                if out:
                    return out
                continue
            data = self.raw.chunk(1024)
            if not data:
                self.truncated = True
                return b""
            out = self._decompress_zstd(data)
            if out:
                return out

    def _decompress_zstd(self, data: bytes) -> bytes:
        try:
            return bytes(self._d.decompress(data))
        except zstandard.ZstdError as e:
            raise self._fail(str(e)) from None

    def _lz4(self, limit: int) -> bytes:
        if not self._legacy:
            while True:
                if self._f.eof:
                    return self._finish(self._f.unused_data)
                data = b"" if self._f.needs_input is False else self.raw.chunk()
                if self._f.needs_input and not data:
                    self.truncated = True
                    return b""
                try:
                    out = bytes(self._f.decompress(data, limit))
                except RuntimeError as e:
                    raise self._fail(str(e)) from None
                if out:
                    return out
        head = self.raw.chunk(4)
        if len(head) < 4:
            return self._finish(b"")
        (size,) = struct.unpack("<I", head)
        if size == 0x184C2102:   # the next legacy stream: its blocks continue ours
            return self._lz4(limit)
        if size > LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK // 255 + 16:
            return self._finish(head)   # not a block length: the stream ended (lz4 -l writes no end mark)
        block = self.raw.chunk(size)
        if len(block) < size:
            self.truncated = True
            return b""
        try:
            return bytes(lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK))
        except lz4.block.LZ4BlockError as e:
            raise self._fail(str(e)) from None

    def _fill(self, n: int) -> None:
        while len(self.buffer) < n and not self.done and not self.truncated:
            out = self._produce(max(n - len(self.buffer), CHUNK))
            self.budget.spend(len(out))
            self.buffer += out

    def read(self, n: int) -> bytes:
        self._fill(n)
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def skip(self, n: int) -> int:
        """Drop ``n`` bytes; returns how many there were."""
        dropped = 0
        while dropped < n:
            if not self.buffer:
                self._fill(1)
                if not self.buffer:
                    break
            take = min(n - dropped, len(self.buffer))
            self.buffer = self.buffer[take:]
            dropped += take
        return dropped


class _Plain:
    """An uncompressed archive read in place: ``skip`` moves the offset without reading."""

    def __init__(self, src: Readable, pos: int) -> None:
        self.src, self.pos = src, pos
        self.end: int | None = None

    def read(self, n: int) -> bytes:
        data = self.src.pread(self.pos, n)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        n = min(n, max(self.src.size - self.pos, 0))
        self.pos += n
        return n


def _cpio(reader: _Plain | _Stream, listing: Listing, name: str, want: set[str]) -> bool:
    """Entries of one newc archive until its trailer: True at the trailer, False where the data ended."""
    while True:
        header = reader.read(HEADER)
        if not header:
            return False
        if len(header) < HEADER:
            raise CorruptImage(f"a cpio header is truncated after entry {listing.entries}", path=name, fmt=FMT)
        if header[:6] not in (b"070701", b"070702"):
            raise CorruptImage(f"entry {listing.entries + 1} has no cpio newc magic ({header[:6]!r})", path=name,
                               fmt=FMT)
        try:
            fields = [int(header[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise CorruptImage(f"entry {listing.entries + 1}'s cpio header is not hex", path=name,
                               fmt=FMT) from None
        filesize, namesize = fields[6], fields[11]
        if namesize == 0 or namesize > MAX_NAME:
            raise CorruptImage(f"entry {listing.entries + 1} has a name of {namesize} bytes (at most {MAX_NAME})",
                               path=name, fmt=FMT)
        raw_name = reader.read(namesize)
        if len(raw_name) < namesize:
            raise CorruptImage(f"entry {listing.entries + 1}'s name is truncated", path=name, fmt=FMT)
        reader.skip((-(HEADER + namesize)) % 4)
        entry = raw_name.rstrip(b"\0").decode("utf-8", "surrogateescape")
        if entry == "TRAILER!!!":
            return True
        listing.entries += 1
        if listing.entries > MAX_ENTRIES:
            raise CorruptImage(f"more than {MAX_ENTRIES} entries", path=name, fmt=FMT)
        if reader.skip(filesize + (-filesize) % 4) < filesize:
            raise CorruptImage(f"entry {entry!r} says {filesize} bytes, more than the archive holds", path=name,
                               fmt=FMT)
        module = module_name(entry)
        if module is not None and (fields[1] & 0o170000) == 0o100000:
            listing.modules.setdefault(module, entry)
        if want and want <= listing.modules.keys():
            return True


def _skip_zeros(src: Readable, pos: int) -> int:
    while pos < src.size:
        data = src.pread(pos, CHUNK)
        stripped = data.lstrip(b"\0")
        if stripped:
            return pos + len(data) - len(stripped)
        pos += len(data)
    return pos


def list_initramfs(src: Readable, want: set[str] | None = None) -> Listing:
    """Every archive of the initramfs ``src`` and the kernel modules in them; stops once all of ``want`` are
    found. Damage ends the listing with ``problem`` set (what was listed before stays)."""
    listing = Listing()
    wanted = set(want or ())
    budget = _Budget(src.name)
    pos = 0
    try:
        for _ in range(64):   # archives in one file
            pos = _skip_zeros(src, pos)
            if pos >= src.size:
                listing.complete = True
                return listing
            head = src.pread(pos, 8)
            kind = next((k for magic, k in MAGICS if head.startswith(magic)), None)
            if kind is None:
                listing.problem = f"unknown data at offset {pos} (not cpio or a known compression)"
                return listing
            if kind in ("lzo", "cpio-odc"):
                listing.archives.append(kind)
                listing.problem = f"a {kind} archive at offset {pos} is not read"
                return listing
            if kind == "cpio":
                plain = _Plain(src, pos)
                listing.archives.append("cpio")
                trailer = _cpio(plain, listing, src.name, wanted)
                pos = plain.pos
                if wanted and wanted <= listing.modules.keys():
                    return listing
                if not trailer:
                    listing.complete = True
                    return listing
                continue
            stream = _Stream(kind, _Raw(src, pos), budget)
            listing.archives.append(f"cpio+{kind}")
            while True:
                trailer = _cpio(stream, listing, src.name, wanted)
                if wanted and wanted <= listing.modules.keys():
                    return listing
                if not trailer:
                    break
                while True:   # zero padding before another archive in the same stream
                    byte = stream.read(1)
                    if byte != b"\0":
                        break
                if not byte:
                    break
                stream.buffer = byte + stream.buffer
            if stream.truncated:
                listing.problem = f"the {kind} data ends early"
                return listing
            if stream.end is None:
                listing.complete = True
                return listing
            pos = stream.end
        listing.problem = "more than 64 archives"
        return listing
    except CorruptImage as e:
        listing.problem = e.message
        return listing
