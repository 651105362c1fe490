"""The one layer of a containerDisk: ``disk/`` and ``disk/<name>`` in a PAX tar, hashed and compressed in one pass.

A KubeVirt containerDisk is an image ``FROM scratch`` whose single layer holds the directory ``disk/`` (mode 0555)
and the disk file ``disk/<name>`` (mode 0444), both owned by uid and gid 107 (the ``qemu`` user of virt-launcher).

The tar is written by hand rather than with :mod:`tarfile`: a member of many gigabytes has to go through
sha256 (the layer's ``diff_id``), a compressor and a second sha256 (the blob digest) in a single read of the disk,
with holes of a sparse disk left as holes in an uncompressed blob and the disk's bytes on 4 KiB boundaries of the
output so that they can be written with ``O_DIRECT``. tarfile can only copy a member from a file object into a
stream. The headers are small and fixed, so they are made here too (the POSIX.1-2008 pax interchange format:
ustar header blocks, and an extended header of typeflag ``x`` whose records override ustar fields), which also
keeps the bytes, and so the digests, independent of the Python version.

Layout of the layer tar (offsets in bytes)::

    0     ustar header  "disk/"       directory, 0555, 107:107
    512   ustar header  typeflag 'x'  extended header: ``size`` when the disk is 8 GiB or more (ustar's 11 octal
    1024  pax records                 digits stop just below 8 GiB), ``path`` for long or non-ASCII names, and a
                                      ``comment`` record that pads the records so the disk data starts at 4096
    3584  ustar header  "disk/<name>" regular file, 0444, 107:107
    4096  the disk's bytes, padded with zeros to a multiple of 512
    ...   two zero blocks (end of archive)

The length is known before anything is written (:func:`tar_size`), which lets a docker-archive place the layer
inside an outer tar whose header comes first.

Determinism: every time field is the caller's ``mtime`` (``SOURCE_DATE_EPOCH`` or 0), owners are numeric with
empty names, and the compressors are fed the same windows of the tar whatever the disk's layout on the
filesystem. gzip: the stream is cut into 8 MiB windows, each deflated independently (as pigz does) with the
previous window's last 32 KiB as its dictionary, ended by a sync flush (the last by a final block), and the pieces
are joined under a fixed gzip header (mtime 0, no name, OS 255) and a trailer whose CRC is combined from the
windows' CRCs; the output depends only on the tar bytes and the level, not on the number of threads (a hole
window following a hole window always deflates to the same bytes, so that is done once). zstd: the
library's multi-threaded mode, whose output is the same for any number of worker threads of at least one
(checked by the tests against 1 and 4 threads), and which does not depend on how the input is split into calls.
Neither promises the same bytes across versions of isa-l or libzstd.

Threads: a read-ahead thread fills 8 MiB windows from a pool of page-aligned buffers (holes are not read: a
window that is all hole carries no buffer and is hashed from a shared zero mapping; uncompressed, zero blocks
inside the data are found too, and left as holes of the blob); one thread hashes, in order;
the caller's thread writes, or, compressed, hands windows to the compressor (gzip: a thread per core; zstd: its
own workers) and writes what comes out. hashlib, isa-l, zstandard, numpy and ``preadv``/``pwrite`` release the
GIL, so the stages overlap. Memory stays at a few windows whatever the disk's size: four uncompressed, one per
compression thread plus two compressed (threads: one per core, at most 8 unless asked).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import struct
import threading
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import zstandard
from isal import isal_zlib

from diskport.destination import Destination
from diskport.errors import SourceError, UsageError
from diskport.oci.media import LAYER_MEDIA, Descriptor
from diskport.sources.file import FileSource
from diskport.writers import RawWriter, Writer
from diskport.zeros import zero_runs

BLOCK = 512
#: The disk's bytes start at this offset of the tar (and at this alignment inside a docker-archive).
DATA_ALIGN = 4096
#: One window of the pipeline: read, hashed, compressed and written as a unit.
WINDOW = 8 * 1024 * 1024
#: Windows in flight (read ahead, being hashed, being written or compressed).
DEPTH = 4
#: Compression threads by default: one per core, at most this many (each holds a window in flight).
MAX_THREADS = 8
END_OF_ARCHIVE = bytes(2 * BLOCK)

DISK_DIR = "disk"
DISK_UID = DISK_GID = 107
DIR_MODE = 0o555
FILE_MODE = 0o444
#: Longest disk file name, in UTF-8 bytes (NAME_MAX of Linux filesystems).
MAX_NAME = 255

REGTYPE, DIRTYPE, PAXTYPE = b"0", b"5", b"x"
_OCTAL_LIMIT = {8: 8**7, 12: 8**11}  # values a NUL-terminated octal field of that width holds
MAX_MTIME = 8**11 - 1

COMPRESSIONS = tuple(LAYER_MEDIA)  # "none", "gzip", "zstd"
GZIP_LEVEL = 2  # isa-l's levels are 0-3; 2 is its default and measured fastest here, at the ratio of 1 and 3
ZSTD_LEVEL = 3
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # RFC 1952: deflate, no flags, mtime 0, OS unknown
_DEFLATE_DICT = 32 * 1024

Progress = Callable[[int], None]


# --- tar headers ------------------------------------------------------------------------------------------------

def padded(size: int) -> int:
    """``size`` rounded up to whole 512-byte tar blocks."""
    return -(-size // BLOCK) * BLOCK


def check_disk_name(name: str) -> str:
    """The disk's file name inside ``disk/``: one path component a person can read; UsageError otherwise."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise UsageError(f"'{name}' cannot be the disk's file name in the image")
    if "/" in name or any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise UsageError(f"{name!r} cannot be the disk's file name in the image (no '/' or control characters)")
    if len(name.encode()) > MAX_NAME:
        raise UsageError(f"the disk's file name '{name[:40]}...' is longer than {MAX_NAME} bytes")
    return name


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def ustar_header(name: bytes, *, typeflag: bytes, size: int, mode: int, uid: int, gid: int, mtime: int) -> bytes:
    """One 512-byte ustar header (POSIX.1-2008, pax "ustar Interchange Format"). ``name`` must fit its 100
    bytes, and ``size``/``mtime`` their fields; larger values go in a pax record and are given here as 0."""
    if len(name) > 100:
        raise ValueError("ustar name longer than 100 bytes")
    head = b"".join((
        name.ljust(100, b"\0"), _octal(mode, 8), _octal(uid, 8), _octal(gid, 8), _octal(size, 12),
        _octal(mtime, 12), b" " * 8, typeflag, bytes(100), b"ustar\x0000", bytes(32 + 32 + 8 + 8 + 155),
    ))
    checksum = b"%06o\0 " % sum(head)
    return (head[:148] + checksum + head[156:]).ljust(BLOCK, b"\0")


def pax_record(key: str, value: str) -> bytes:
    """``"<length> <key>=<value>\\n"``, where length counts the whole record, its own digits included."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


_PAD_TEXT = "diskport pads this header so that the file's data starts on a 4096-byte boundary of the archive"


def _comment_record(length: int) -> bytes:
    """A pax ``comment`` record of exactly ``length`` bytes (at least 16): readers ignore comments."""
    digits = len(str(length))
    room = length - digits - len(" comment=\n")
    text = (_PAD_TEXT + " " * room)[:room] if room > 0 else ""
    record = f"{length} comment={text}\n".encode()
    if len(record) != length:  # a length on the edge of a digit count; never for the sizes used here
        raise ValueError(f"cannot make a comment record of {length} bytes")
    return record


def member_header(name: str, *, size: int, mode: int, uid: int, gid: int, mtime: int,
                  typeflag: bytes = REGTYPE, start: int = 0, align: int | None = None) -> bytes:
    """The header blocks of one member whose header begins at tar offset ``start`` (a multiple of 512).

    Values ustar cannot hold (a size of 8 GiB or more, a name longer than 100 bytes or not ASCII) go in a pax
    extended header. With ``align``, an extended header is always written and padded with a ``comment``
    record so that the member's data begins at a multiple of ``align`` (a multiple of 512) of the tar.
    """
    if start % BLOCK or (align is not None and align % BLOCK):
        raise ValueError("tar offsets are multiples of 512")
    if not 0 <= mtime <= MAX_MTIME:
        raise ValueError(f"mtime {mtime} does not fit a tar header")
    records = b""
    raw_name = name.encode()
    if len(raw_name) > 100 or not name.isascii():
        records += pax_record("path", name)
        raw_name = name.encode("ascii", "replace")[:100]
    ustar_size = size
    if size >= _OCTAL_LIMIT[12]:
        records += pax_record("size", str(size))
        ustar_size = 0
    member = ustar_header(raw_name, typeflag=typeflag, size=ustar_size, mode=mode, uid=uid, gid=gid, mtime=mtime)
    if align is None and not records:
        return member
    if align is None:
        pax_size = padded(len(records))
    else:
        pax_size = (-(start + 2 * BLOCK)) % align
        while pax_size < len(records) + 16:
            pax_size += align
        records += _comment_record(pax_size - len(records))
    extended = ustar_header(b"././@PaxHeader", typeflag=PAXTYPE, size=len(records), mode=0o644, uid=0, gid=0,
                            mtime=mtime)
    return extended + records.ljust(pax_size, b"\0") + member


def layer_header(name: str, disk_size: int, mtime: int) -> bytes:
    """Everything of the layer tar before the disk's bytes: ``disk/`` and the header of ``disk/<name>``."""
    check_disk_name(name)
    directory = member_header(f"{DISK_DIR}/", size=0, mode=DIR_MODE, uid=DISK_UID, gid=DISK_GID, mtime=mtime,
                              typeflag=DIRTYPE)
    return directory + member_header(f"{DISK_DIR}/{name}", size=disk_size, mode=FILE_MODE, uid=DISK_UID,
                                     gid=DISK_GID, mtime=mtime, start=len(directory), align=DATA_ALIGN)


def tar_size(disk_size: int, name: str) -> int:
    """The exact length of the uncompressed layer tar of a disk of ``disk_size`` bytes."""
    return len(layer_header(name, disk_size, 0)) + padded(disk_size) + len(END_OF_ARCHIVE)


# --- the tar as a stream of windows ------------------------------------------------------------------------------

_HEADER, _DATA, _ZERO = 0, 1, 2
_zero_map: mmap.mmap | None = None
_zero_lock = threading.Lock()


def _zeros() -> memoryview:
    """A shared, never-written mapping of WINDOW zero bytes (every page is the kernel's zero page)."""
    global _zero_map
    with _zero_lock:
        if _zero_map is None:
            _zero_map = mmap.mmap(-1, WINDOW, prot=mmap.PROT_READ)
        return memoryview(_zero_map)


class TarWindow:
    """``length`` bytes of the tar at ``offset``: in a pool buffer, or (``zero``) all zeros and not stored.

    ``runs`` splits a buffered window into ``(start, end, is_zero)`` runs at 4 KiB granularity of the tar, so a
    writer can leave holes. The buffer returns to the pool when every holder has called :meth:`release`; the
    consumer holds it first, and :meth:`retain` adds a holder for work handed to another thread.
    """

    __slots__ = ("_buf", "_holders", "_lock", "_pool", "length", "offset", "runs", "view", "zero")

    def __init__(self, offset: int, length: int, buf: mmap.mmap | None, pool: queue.Queue[mmap.mmap | None],
                 runs: list[tuple[int, int, bool]]) -> None:
        self.offset = offset
        self.length = length
        self.zero = buf is None
        self.view = _zeros()[:length] if buf is None else memoryview(buf)[:length]
        self.runs = runs
        self._buf = buf
        self._pool = pool
        self._holders = 1
        self._lock = threading.Lock()

    @property
    def end(self) -> int:
        return self.offset + self.length

    def retain(self) -> None:
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            done = self._holders == 0
        if done and self._buf is not None:
            self.view.release()
            self._pool.put(self._buf)
            self._buf = None


class TarStream:
    """The uncompressed layer tar of one disk file, as :class:`TarWindow` runs read ahead on a thread.

    A context manager; :meth:`windows` yields each window once, in order. Parts of the disk that are holes of
    the file are not read. ``scan_zeros`` also finds zero blocks inside the data, for writers that leave holes.
    """

    def __init__(self, disk: str, name: str, *, mtime: int, scan_zeros: bool = False, window: int = WINDOW,
                 depth: int = DEPTH) -> None:
        if window % DATA_ALIGN or not DATA_ALIGN <= window <= WINDOW:
            raise ValueError(f"window must be a multiple of 4096 of at most {WINDOW} bytes")
        if not 0 <= mtime <= MAX_MTIME:
            raise UsageError(f"timestamp {mtime} cannot be stored in a tar header (0 to {MAX_MTIME})")
        self.disk = os.fspath(disk)
        self.name = check_disk_name(name)
        self.mtime = mtime
        self.scan_zeros = scan_zeros
        self.window = window
        self.depth = depth
        self.source: FileSource | None = None
        self.disk_size = 0
        self.header = b""
        self.size = 0
        self._pool: queue.Queue[mmap.mmap | None] = queue.Queue()
        # Bounded: hole windows cost nothing to make, and a huge sparse disk must not queue them all.
        self._ready: queue.Queue[TarWindow | BaseException | None] = queue.Queue(maxsize=4 * depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TarStream:
        self.source = FileSource(self.disk)
        try:
            if not (os.path.isfile(self.disk) or self.source.is_block_device):
                raise SourceError("is not a regular file or a block device", path=self.disk)
            self.disk_size = self.source.size
            self.header = layer_header(self.name, self.disk_size, self.mtime)
            self.size = len(self.header) + padded(self.disk_size) + len(END_OF_ARCHIVE)
            for _ in range(self.depth):
                self._pool.put(mmap.mmap(-1, self.window))
            self._thread = threading.Thread(target=self._run, name="diskport-tar-read", daemon=True)
            self._thread.start()
        except BaseException:
            self.source.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        for _ in range(self.depth):
            self._pool.put(None)  # wakes a reader waiting for a free buffer
        if self._thread is not None:
            self._thread.join()
        if self.source is not None:
            self.source.close()

    def windows(self) -> Iterator[TarWindow]:
        while True:
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _spans(self) -> Iterator[tuple[int, int, int]]:
        """``(start, end, kind)`` runs covering the whole tar, in order."""
        assert self.source is not None
        base = len(self.header)
        yield 0, base, _HEADER
        for pos, length, is_data in self.source.allocated_extents(0, self.disk_size):
            yield base + pos, base + pos + length, _DATA if is_data else _ZERO
        yield base + self.disk_size, self.size, _ZERO

    def _emit(self, item: TarWindow | BaseException | None) -> bool:
        """Queue ``item`` for the consumer; False once the consumer has gone (the stream is being closed)."""
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            self._produce()
            self._emit(None)
        except BaseException as e:  # handed to the consumer, which raises it
            self._emit(e)

    def _produce(self) -> None:
        spans = (span for span in self._spans() if span[1] > span[0])
        current = next(spans, None)
        for start in range(0, self.size, self.window):
            if self._stop.is_set():
                return
            end = min(start + self.window, self.size)
            parts: list[tuple[int, int, int]] = []
            while current is not None and current[0] < end:
                parts.append((max(current[0], start), min(current[1], end), current[2]))
                if current[1] > end:
                    break
                current = next(spans, None)
            if all(kind == _ZERO for _, _, kind in parts):
                if not self._emit(TarWindow(start, end - start, None, self._pool, [])):
                    return
                continue
            buf = self._pool.get()
            if buf is None or self._stop.is_set():
                return
            view = memoryview(buf)
            try:
                self._fill(view, start, parts)
                runs = zero_runs(view[: end - start], start, DATA_ALIGN) if self.scan_zeros else []
            finally:
                view.release()
            if not self._emit(TarWindow(start, end - start, buf, self._pool, runs)):
                return

    def _fill(self, view: memoryview, start: int, parts: list[tuple[int, int, int]]) -> None:
        assert self.source is not None
        base = len(self.header)
        for a, b, kind in parts:
            target = view[a - start: b - start]
            if kind == _HEADER:
                target[:] = self.header[a:b]
            elif kind == _ZERO:
                target[:] = _zeros()[: b - a]
            elif self.source.readinto(a - base, target) != b - a:
                raise SourceError(f"ended before {self.disk_size} bytes; the disk changed while it was being "
                                  "read", path=self.disk)


# --- consumers --------------------------------------------------------------------------------------------------

def _write_split(writer: Writer, offset: int, view: memoryview) -> None:
    """Write ``view`` at ``offset``: the 4 KiB-multiple part first (O_DIRECT where aligned), then the rest."""
    whole = len(view) // DATA_ALIGN * DATA_ALIGN
    if whole and whole != len(view):
        writer.write(offset, view[:whole])
        writer.write(offset + whole, view[whole:])
    else:
        writer.write(offset, view)


class _Hasher:
    """sha256 on one thread, in submission order, with a bounded number of pieces in flight."""

    def __init__(self, limit: int = 2 * DEPTH) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="diskport-hash")
        self._pending: deque[Future[None]] = deque()
        self._limit = limit

    def update(self, digest: Any, data: memoryview | bytes, window: TarWindow | None = None) -> None:
        if window is not None:
            window.retain()

        def task() -> None:
            try:
                digest.update(data)
            finally:
                if window is not None:
                    window.release()

        self._pending.append(self._pool.submit(task))
        while len(self._pending) > self._limit:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _hex(digest: Any) -> str:
    return str(digest.hexdigest())


def copy_tar(stream: TarStream, writer: Writer, offset: int = 0, progress: Progress | None = None) -> str:
    """Write the whole uncompressed tar of an entered ``stream`` at ``offset`` of ``writer``; returns its sha256
    digest (the diff_id). Zero blocks go to ``writer.write_zeros`` (left as holes in a new file), so the
    writer's file must read as zeros where nothing is written. ``offset`` should be a multiple of 4096."""
    tar_hash = hashlib.sha256()
    hasher = _Hasher()
    try:
        for w in stream.windows():
            try:
                hasher.update(tar_hash, w.view, w)
                if w.zero:
                    writer.write_zeros(offset + w.offset, w.length)
                else:
                    for a, b, is_zero in w.runs or [(0, w.length, False)]:
                        if is_zero:
                            writer.write_zeros(offset + w.offset + a, b - a)
                        else:
                            _write_split(writer, offset + w.offset + a, w.view[a:b])
            finally:
                w.release()
            if progress is not None:
                progress(w.end)
        hasher.drain()
    finally:
        hasher.close()
    return "sha256:" + _hex(tar_hash)


def write_tar(disk: str, name: str, writer: Writer, offset: int = 0, *, mtime: int,
              progress: Progress | None = None) -> tuple[str, int]:
    """Stream the layer tar of ``disk`` into ``writer`` at ``offset``; returns ``(diff_id, tar size)``."""
    with TarStream(disk, name, mtime=mtime, scan_zeros=True) as stream:
        return copy_tar(stream, writer, offset, progress), stream.size


def _deflate_window(window: TarWindow, zdict: bytes | None, level: int, last: bool) -> tuple[bytes, int]:
    """One window as raw deflate, primed with the previous window's tail; returns (bytes, crc32 of the input)."""
    try:
        if zdict is None:
            comp = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
        else:
            comp = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15, zdict=zdict)
        out = comp.compress(window.view)
        out += comp.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_SYNC_FLUSH)
        return out, int(isal_zlib.crc32(window.view))
    finally:
        window.release()


class _Compressor:
    def feed(self, window: TarWindow, last: bool) -> list[bytes]:
        raise NotImplementedError

    def finish(self) -> list[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ParallelGzip(_Compressor):
    """gzip made of independently deflated windows (see the module docstring); output in window order."""

    def __init__(self, level: int, threads: int) -> None:
        self.level = level
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="diskport-gzip")
        self._jobs: deque[tuple[Future[tuple[bytes, int]], int]] = deque()
        self._limit = threads + 1
        self._zdict: bytes | None = None
        self._previous_zero = False
        self._zero_jobs: dict[tuple[int, bool], Future[tuple[bytes, int]]] = {}
        self._crc = 0
        self._length = 0
        self._started = False

    def feed(self, window: TarWindow, last: bool) -> list[bytes]:
        out: list[bytes] = []
        if not self._started:
            out.append(_GZIP_HEADER)
            self._started = True
        # A hole window after a hole window deflates to the same bytes every time: compress it once.
        key = (window.length, last) if window.zero and self._previous_zero else None
        job = self._zero_jobs.get(key) if key is not None else None
        if job is None:
            window.retain()
            job = self._pool.submit(_deflate_window, window, self._zdict, self.level, last)
            if key is not None:
                self._zero_jobs[key] = job
        self._jobs.append((job, window.length))
        self._zdict = bytes(window.view[-_DEFLATE_DICT:])
        self._previous_zero = window.zero
        while len(self._jobs) > self._limit:
            out.append(self._collect())
        return out

    def _collect(self) -> bytes:
        job, length = self._jobs.popleft()
        data, crc = job.result()
        self._crc = int(isal_zlib.crc32_combine(self._crc, crc, length))
        self._length += length
        return data

    def finish(self) -> list[bytes]:
        out = [self._collect() for _ in range(len(self._jobs))]
        out.append(struct.pack("<II", self._crc, self._length & 0xFFFFFFFF))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Zstd(_Compressor):
    def __init__(self, level: int, threads: int, size: int) -> None:
        # threads >= 1 always: the multi-threaded format is the same for any worker count, unlike threads=0.
        self._obj = zstandard.ZstdCompressor(level=level, threads=max(1, threads)).compressobj(size=size)

    def feed(self, window: TarWindow, last: bool) -> list[bytes]:
        data = self._obj.compress(window.view)
        return [data] if data else []

    def finish(self) -> list[bytes]:
        return [self._obj.flush()]


class _Appender:
    """Appends bytes to a writer through a page-aligned staging buffer, so full chunks can go out O_DIRECT."""

    def __init__(self, writer: Writer, chunk: int = WINDOW) -> None:
        self.writer = writer
        self._buf = mmap.mmap(-1, chunk)
        self._view = memoryview(self._buf)
        self._fill = 0
        self.position = 0  # file offset of the staging buffer's first byte

    def append(self, data: bytes) -> None:
        src = memoryview(data)
        while src:
            n = min(len(src), len(self._buf) - self._fill)
            self._view[self._fill: self._fill + n] = src[:n]
            self._fill += n
            src = src[n:]
            if self._fill == len(self._buf):
                self.writer.write(self.position, self._view)
                self.position += self._fill
                self._fill = 0

    def close(self) -> int:
        """Write what remains; returns the total length written."""
        if self._fill:
            _write_split(self.writer, self.position, self._view[: self._fill])
            self.position += self._fill
            self._fill = 0
        self._view.release()
        self._buf.close()
        return self.position


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, MAX_THREADS))


def _make_compressor(compression: str, level: int | None, threads: int, size: int) -> _Compressor:
    low, high, default = (0, 3, GZIP_LEVEL) if compression == "gzip" else (1, 22, ZSTD_LEVEL)
    level = default if level is None else level
    if not low <= level <= high:
        raise UsageError(f"{compression} level {level} is out of range ({low} to {high})")
    if compression == "gzip":
        return _ParallelGzip(level, threads)
    return _Zstd(level, threads, size)


def copy_compressed(stream: TarStream, writer: Writer, compression: str, *, level: int | None = None,
                    threads: int | None = None, progress: Progress | None = None) -> tuple[str, str, int]:
    """Compress the tar of an entered ``stream`` into ``writer`` from offset 0; returns
    ``(diff_id, blob digest, blob size)``."""
    threads = threads or default_threads()
    tar_hash = hashlib.sha256()
    blob_hash = hashlib.sha256()
    hasher = _Hasher()
    out = _Appender(writer)
    compressor = _make_compressor(compression, level, threads, stream.size)
    try:
        for w in stream.windows():
            try:
                hasher.update(tar_hash, w.view, w)
                pieces = compressor.feed(w, w.end == stream.size)
            finally:
                w.release()
            for piece in pieces:
                hasher.update(blob_hash, piece)
                out.append(piece)
            if progress is not None:
                progress(w.end)
        for piece in compressor.finish():
            hasher.update(blob_hash, piece)
            out.append(piece)
        size = out.close()
        hasher.drain()
    finally:
        compressor.close()
        hasher.close()
    return "sha256:" + _hex(tar_hash), "sha256:" + _hex(blob_hash), size


# --- the layer as a blob ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """A written layer blob: its descriptor (compressed digest and size), its diff_id and its tar's length."""

    descriptor: Descriptor
    diff_id: str
    tar_size: int


def write_layer(disk: str, name: str, blobs_dir: str, compression: str = "gzip", *, mtime: int,
                progress: Progress | None = None, level: int | None = None, threads: int | None = None) -> Layer:
    """Write the containerDisk layer of ``disk`` (the file, as it is) into ``blobs_dir/<digest hex>``.

    ``name`` is the file name under ``disk/``; ``compression`` is ``none``, ``gzip`` or ``zstd``; ``mtime`` is
    every timestamp in the tar. ``progress`` receives the tar bytes done (of :func:`tar_size`). The blob is
    written under a temporary name in ``blobs_dir`` and renamed once its digest is known; on any failure,
    Ctrl-C included, the temporary file is removed. ``level`` and ``threads`` tune the compressor (the output
    depends on the level, not on the threads).
    """
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown layer compression '{compression}' (choose from {', '.join(COMPRESSIONS)})")
    check_disk_name(name)
    threads = threads or default_threads()
    depth = DEPTH if compression == "none" else max(DEPTH, threads + 2)  # a window per thread, and one to read
    with TarStream(disk, name, mtime=mtime, scan_zeros=compression == "none", depth=depth) as stream, \
            Destination(os.path.join(blobs_dir, "layer")) as dest:
        if compression == "none":
            # Sized first: what is not written (holes of the disk, zero blocks) stays a hole of the blob.
            writer = RawWriter(dest.fd, stream.size, name=dest.path, direct_fd=dest.direct_fd)
            writer.behind = dest.behind
            diff_id = digest = copy_tar(stream, writer, 0, progress)
            size = stream.size
        else:
            writer = RawWriter(dest.fd, None, name=dest.path, direct_fd=dest.direct_fd)
            writer.behind = dest.behind
            diff_id, digest, size = copy_compressed(stream, writer, compression, level=level, threads=threads,
                                                    progress=progress)
        tar_length = stream.size
        # Destination renames its temporary file to ``path`` on a clean exit: name it after the digest now.
        dest.path = os.path.join(blobs_dir, digest.removeprefix("sha256:"))
    return Layer(Descriptor(LAYER_MEDIA[compression], digest, size), diff_id, tar_length)
