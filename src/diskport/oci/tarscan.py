"""Find the disk inside a layer's tar, without extracting anything: the pull side of a containerDisk.

Tar headers are read here rather than with :mod:`tarfile` because the member's bytes must go on to the engine
as a :class:`~diskport.sources.base.Source`: a slice of the blob read in place when the layer is uncompressed
(so a qcow2 inside converts over ranged requests, with no scratch space), or the rest of the decompressing
stream otherwise. ``tarfile``'s stream mode reads 10 KiB records through its own buffer and cannot hand the
stream over at a member's first byte. What is read: ustar headers (checksum verified, octal and base-256
sizes, the prefix field), PAX extended headers (``path``, ``size``) and GNU long names, each bounded; global
PAX headers and long link names are skipped.

The layers are walked as a container runtime stacks them: top layer first, whiteouts (``disk/.wh.NAME``)
hiding a lower layer's file and an opaque whiteout (``disk/.wh..wh..opq``) hiding every lower layer's folder.
The disk is the single regular file directly under ``disk/``.

A compressed layer gets the same checks as an uncompressed one, only later: the walk must stop at the disk's
first byte to hand the stream over, so :meth:`MemberStream.check_rest` reads the rest of the layer once the disk
has been read (before the destination is put in place), refusing a disk shorter than its header says, a second
file under ``disk/`` and a link there, as the in-place walk refuses them up front.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from diskport.errors import CorruptImage, UnsafeImage, UnsupportedImage
from diskport.sources.base import ReadintoSource, Source
from diskport.sources.stream import DecompressingStream

BLOCK = 512
MAX_META = 1024 * 1024   # a PAX header or GNU long name larger than this is hostile, not a file name
DISK_DIR = "disk/"
_REGULAR = (b"0", b"\0", b"7")


@dataclass(frozen=True)
class TarEntry:
    name: str
    kind: bytes           # the typeflag: b"0" regular file, b"5" folder, b"1"/b"2" links ...
    size: int
    data_offset: int      # where the member's bytes start in the uncompressed tar


class TarReader(Protocol):
    name: str
    position: int

    def read(self, n: int) -> bytes: ...

    def skip_to(self, position: int) -> None: ...


class RandomTarReader:
    """An uncompressed tar in a random-access source: skipping a member costs nothing."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.name = source.name
        self.position = 0

    def read(self, n: int) -> bytes:
        data = self.source.pread(self.position, n)
        self.position += len(data)
        return data

    def skip_to(self, position: int) -> None:
        if position > self.source.size:
            raise CorruptImage("the tar ends inside a member", path=self.name, fmt="tar")
        self.position = position


class StreamTarReader:
    """A tar inside a decompressing stream: skipping a member reads through it. ``prefix`` is the stream's
    first bytes when a probe has already taken them from it."""

    def __init__(self, stream: DecompressingStream, name: str, prefix: bytes = b"") -> None:
        self.stream = stream
        self.name = name
        self.position = 0
        self._prefix = prefix

    def readinto(self, buf: memoryview) -> int:
        """Up to ``len(buf)`` bytes from the current position (fewer only at the end), position advanced."""
        got = 0
        if self.position < len(self._prefix):
            got = min(len(buf), len(self._prefix) - self.position)
            buf[:got] = self._prefix[self.position: self.position + got]
        if got < len(buf):
            got += self.stream.readinto(buf[got:])
        self.position += got
        return got

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto(memoryview(buf))
        return bytes(buf[:got])

    def skip_to(self, position: int) -> None:
        scratch = memoryview(bytearray(min(1 << 20, max(0, position - self.position)) or 1))
        while self.position < position:
            if not self.readinto(scratch[: position - self.position]):
                raise CorruptImage("the tar ends inside a member", path=self.name, fmt="tar")


def _number(field: bytes, what: str, name: str) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # base-256 (GNU), for sizes of 8 GiB and more
        if field[0] == 0xFF:
            raise CorruptImage(f"negative {what} in a tar header", path=name, fmt="tar")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise CorruptImage(f"tar header {what} {text!r} is not a number", path=name, fmt="tar") from None


def _pax(data: bytes, name: str) -> dict[str, str]:
    """PAX records: ``"<len> <key>=<value>\\n"``, each length counting the whole record."""
    out: dict[str, str] = {}
    at = 0
    while at < len(data):
        space = data.find(b" ", at)
        if space < 0:
            if not data[at:].strip(b"\0"):
                break
            raise CorruptImage("malformed PAX header record", path=name, fmt="tar")
        try:
            length = int(data[at:space])
        except ValueError:
            raise CorruptImage("malformed PAX record length", path=name, fmt="tar") from None
        record = data[space + 1: at + length]
        if length <= space - at or at + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise CorruptImage("malformed PAX header record", path=name, fmt="tar")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        at += length
    return out


def iter_tar(reader: TarReader) -> Iterator[TarEntry]:
    """The entries of a tar, in order. After each one is yielded, the walk goes on at the next header, whether
    or not the caller read the member."""
    pax: dict[str, str] = {}
    long_name: str | None = None
    name = reader.name
    while True:
        header = reader.read(BLOCK)
        if not header:
            return  # no end-of-archive blocks: tolerated, as every tar reader does
        if len(header) < BLOCK:
            raise CorruptImage("the tar ends inside a tar header", path=name, fmt="tar")
        if header == bytes(BLOCK):
            return
        stored = _number(header[148:156], "checksum", name)
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise CorruptImage(f"tar header checksum mismatch at {reader.position - BLOCK}", path=name, fmt="tar")
        kind = header[156:157]
        size = _number(header[124:136], "size", name)
        data_offset = reader.position
        end = data_offset + -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"g", b"L", b"K"):
            if size > MAX_META:
                raise UnsafeImage(f"a tar metadata entry of {size} bytes (limit {MAX_META})", path=name, fmt="tar")
            data = reader.read(size)
            if len(data) < size:
                raise CorruptImage("the tar ends inside a tar metadata entry", path=name, fmt="tar")
            reader.skip_to(end)
            if kind == b"x":
                pax = _pax(data, name)
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        member = header[:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0" and header[345:500].strip(b"\0"):
            member = header[345:500].split(b"\0", 1)[0] + b"/" + member
        path = pax.get("path") or long_name or member.decode("utf-8", "surrogateescape")
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise CorruptImage(f"PAX size {pax['size']!r} is not a number", path=name, fmt="tar") from None
            if size < 0:
                raise CorruptImage(f"PAX size {pax['size'][:40]!r} of {path!r} is negative", path=name, fmt="tar")
            end = data_offset + -(-size // BLOCK) * BLOCK
        pax, long_name = {}, None
        yield TarEntry(path, kind, size, data_offset)
        reader.skip_to(end)


def _disk_name(path: str) -> str | None:
    """``NAME`` for ``disk/NAME`` (also ``./disk/NAME``, ``/disk/NAME``); None for anything else."""
    while path.startswith(("./", "/")):
        path = path[2:] if path.startswith("./") else path[1:]
    if not path.startswith(DISK_DIR):
        return None
    rest = path[len(DISK_DIR):].rstrip("/")
    return rest if rest and "/" not in rest else None


@dataclass
class LayerScan:
    """What one layer says about ``disk/``: the file it holds, and what it hides in the layers below."""

    disk: TarEntry | None = None
    disk_name: str = ""
    whiteouts: frozenset[str] = frozenset()
    opaque: bool = False


def _check_entry(entry: TarEntry, disk_name: str, found: LayerScan | None, where: str) -> LayerScan | None:
    """The checks every entry under ``disk/`` gets (not a whiteout, not hidden): a second file or a link is
    refused; a regular file is the disk, returned."""
    if entry.kind in _REGULAR:
        if found is not None:
            raise UnsupportedImage(f"the layer holds more than one file under disk/ ({found.disk_name}, "
                                   f"{disk_name}); a containerDisk has exactly one", path=where)
        return LayerScan(entry, disk_name)
    if entry.kind in (b"1", b"2"):
        raise UnsupportedImage(f"disk/{disk_name} is a link; a containerDisk holds the disk itself", path=where)
    return found


def scan_layer(reader: TarReader, hidden: frozenset[str]) -> LayerScan:
    """Walk a layer until it shows a disk file that ``hidden`` (whiteouts from the layers above) does not hide.

    The reader is left at that file's first byte. A layer holding two disk files is refused: a containerDisk
    has exactly one. A stream stops at the first one (it cannot come back to it); :meth:`MemberStream.check_rest`
    does the rest of the checks once the disk is read."""
    whiteouts: set[str] = set()
    opaque = False
    found: LayerScan | None = None
    for entry in iter_tar(reader):
        disk_name = _disk_name(entry.name)
        if disk_name is None:
            continue
        if disk_name == ".wh..wh..opq":
            opaque = True
        elif disk_name.startswith(".wh."):
            whiteouts.add(disk_name[4:])
        elif disk_name in hidden:
            continue
        else:
            before = found
            found = _check_entry(entry, disk_name, found, reader.name)
            if found is not before:
                if isinstance(reader, StreamTarReader):
                    break  # a stream cannot come back to it: the first file is the disk
                reader.skip_to(entry.data_offset + entry.size)  # and on, to check there is no second one
    if found is not None:
        return found
    return LayerScan(whiteouts=frozenset(whiteouts), opaque=opaque)


class MemberStream(ReadintoSource):
    """A tar member's bytes, forward only, from a decompressing stream positioned at its first byte.

    The first :data:`HEAD` bytes are kept, so the format probe can read them and the reader then start again
    from 0, as with any other stream."""

    sequential = True
    HEAD = 64 * 1024

    def __init__(self, reader: StreamTarReader, size: int, name: str, label: str,
                 scan: LayerScan | None = None) -> None:
        self.reader = reader
        self.size = size
        self.name = name
        self.sequential_reason = label
        self.scan = scan
        self._start = reader.position
        self._head = reader.read(min(self.HEAD, size))
        if len(self._head) < min(self.HEAD, size):
            raise self._short(len(self._head))

    def _short(self, got: int) -> CorruptImage:
        return CorruptImage(f"the layer ends {got} bytes into the disk, whose tar header says {self.size} bytes",
                            path=self.name, fmt="tar", hint="the layer is truncated")

    def check_rest(self, hidden: frozenset[str] = frozenset()) -> None:
        """Read through what is left of the disk and of the layer, with the checks an uncompressed layer gets
        while it is scanned: the disk as long as its header says, no second file and no link under ``disk/``."""
        end = self._start + self.size
        scratch = memoryview(bytearray(1 << 20))
        while self.reader.position < end:
            if not self.reader.readinto(scratch[: end - self.reader.position]):
                raise self._short(self.reader.position - self._start)
        self.reader.skip_to(end + -self.size % BLOCK)
        found: LayerScan | None = self.scan or LayerScan(None, self.name.rsplit("/", 1)[-1])
        for entry in iter_tar(self.reader):
            disk_name = _disk_name(entry.name)
            if disk_name is None or disk_name.startswith(".wh.") or disk_name in hidden:
                continue
            found = _check_entry(entry, disk_name, found, self.reader.name)

    def readinto(self, offset: int, buf: memoryview) -> int:
        n = min(len(buf), self.size - offset)
        if n <= 0:
            return 0
        if offset < len(self._head):
            k = min(n, len(self._head) - offset)
            buf[:k] = self._head[offset: offset + k]
            return k + (self.readinto(offset + k, buf[k:n]) if k < n else 0)
        if self._start + offset != self.reader.position:
            raise CorruptImage(f"a layer stream can only be read in order (asked for {offset:#x})", path=self.name)
        got = self.reader.readinto(buf[:n])
        if not got:
            raise self._short(offset)
        return got

    def close(self) -> None:
        self.reader.stream.close()
        self.reader.stream.source.close()
