"""The layer's compressors: deterministic parallel gzip (isa-l) and multi-threaded zstd, fed tar windows in order.

Determinism: the compressors are fed the same windows of the tar whatever the disk's layout on the filesystem.
gzip: the stream is cut into 8 MiB windows, each deflated independently (as pigz does) with the previous
window's last 32 KiB as its dictionary, ended by a sync flush (the last by a final block), and the pieces are
joined under a fixed gzip header (mtime 0, no name, OS 255) and a trailer whose CRC is combined from the windows'
CRCs; the output depends only on the tar bytes and the level, not on the number of threads (a hole window
following a hole window always deflates to the same bytes, so that is done once). zstd: the library's
multi-threaded mode, whose output is the same for any number of worker threads of at least one (checked by the
tests against 1 and 4 threads), and which does not depend on how the input is split into calls. Neither promises
the same bytes across versions of isa-l or libzstd.

A new compressor is a :class:`Compressor` subclass, a case in :func:`make_compressor`, and its media type in
:data:`diskport.oci.media.LAYER_MEDIA`.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import zstandard
from isal import isal_zlib

from diskport.errors import UsageError
from diskport.oci.media import LAYER_MEDIA
from diskport.oci.tarstream import TarWindow

#: Compression threads by default: one per core, at most this many (each holds a window in flight).
MAX_THREADS = 8
COMPRESSIONS = tuple(LAYER_MEDIA)  # "none", "gzip", "zstd"
GZIP_LEVEL = 2  # isa-l's levels are 0-3; 2 is its default and measured fastest here, at the ratio of 1 and 3
ZSTD_LEVEL = 3
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # RFC 1952: deflate, no flags, mtime 0, OS unknown
_DEFLATE_DICT = 32 * 1024


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


class Compressor:
    def feed(self, window: TarWindow, last: bool) -> list[bytes]:
        raise NotImplementedError

    def finish(self) -> list[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ParallelGzip(Compressor):
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


class _Zstd(Compressor):
    def __init__(self, level: int, threads: int, size: int) -> None:
        # threads >= 1 always: the multi-threaded format is the same for any worker count, unlike threads=0.
        self._obj = zstandard.ZstdCompressor(level=level, threads=max(1, threads)).compressobj(size=size)

    def feed(self, window: TarWindow, last: bool) -> list[bytes]:
        data = self._obj.compress(window.view)
        return [data] if data else []

    def finish(self) -> list[bytes]:
        return [self._obj.flush()]


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, MAX_THREADS))


def make_compressor(compression: str, level: int | None, threads: int, size: int) -> Compressor:
    low, high, default = (0, 3, GZIP_LEVEL) if compression == "gzip" else (1, 22, ZSTD_LEVEL)
    level = default if level is None else level
    if not low <= level <= high:
        raise UsageError(f"{compression} level {level} is out of range ({low} to {high})")
    if compression == "gzip":
        return _ParallelGzip(level, threads)
    return _Zstd(level, threads, size)
