"""The uncompressed layer tar of one disk file as a stream of 8 MiB windows, read ahead on a thread.

:class:`TarStream` is a :class:`diskport.prefetch.ReadAhead` (the engine's read-ahead, shared): it fills windows
from a pool of page-aligned buffers, the tar's header from :func:`diskport.oci.tar.layer_header` and the disk's
bytes by positional reads. Holes of the disk file are not read: a window that is all hole carries no buffer and
is read from a shared zero mapping; with ``scan_zeros`` (uncompressed layers), zero blocks inside the data are
found too, so a writer can leave them as holes of the blob. The windows are the same whatever the disk's layout
on the filesystem, which keeps the compressors' output deterministic. A :class:`TarWindow` returns its buffer
to the pool when its last holder releases it (the consumer, the hasher thread, a compression thread).
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from collections.abc import Iterator

from diskport.errors import SourceError, UsageError
from diskport.oci.tar import DATA_ALIGN, END_OF_ARCHIVE, MAX_MTIME, check_disk_name, layer_header, padded
from diskport.prefetch import ReadAhead
from diskport.sources.file import FileSource
from diskport.zeros import zero_runs

#: One window of the pipeline: read, hashed, compressed and written as a unit.
WINDOW = 8 * 1024 * 1024
#: Windows in flight (read ahead, being hashed, being written or compressed).
DEPTH = 4

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


class TarStream(ReadAhead[TarWindow]):
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
        # Bounded: hole windows cost nothing to make, and a huge sparse disk must not queue them all.
        super().__init__(window=window, depth=depth, name="diskport-tar-read", bound=4 * depth)
        self.disk = os.fspath(disk)
        self.name = check_disk_name(name)
        self.mtime = mtime
        self.scan_zeros = scan_zeros
        self.source: FileSource | None = None
        self.disk_size = 0
        self.header = b""
        self.size = 0

    def __enter__(self) -> TarStream:
        self.source = FileSource(self.disk)
        try:
            if not (os.path.isfile(self.disk) or self.source.is_block_device):
                raise SourceError("is not a regular file or a block device", path=self.disk)
            self.disk_size = self.source.size
            self.header = layer_header(self.name, self.disk_size, self.mtime)
            self.size = len(self.header) + padded(self.disk_size) + len(END_OF_ARCHIVE)
            super().__enter__()
        except BaseException:
            self.source.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            super().__exit__(exc_type, *exc)
        finally:
            if self.source is not None:
                self.source.close()

    def windows(self) -> Iterator[TarWindow]:
        """Each window once, in order; the consumer releases each (:meth:`TarWindow.release`)."""
        return self.items()

    def _spans(self) -> Iterator[tuple[int, int, int]]:
        """``(start, end, kind)`` runs covering the whole tar, in order."""
        assert self.source is not None
        base = len(self.header)
        yield 0, base, _HEADER
        for pos, length, is_data in self.source.allocated_extents(0, self.disk_size):
            yield base + pos, base + pos + length, _DATA if is_data else _ZERO
        yield base + self.disk_size, self.size, _ZERO

    def produce(self) -> None:
        spans = (span for span in self._spans() if span[1] > span[0])
        current = next(spans, None)
        for start in range(0, self.size, self.window):
            if self.stop.is_set():
                return
            end = min(start + self.window, self.size)
            parts: list[tuple[int, int, int]] = []
            while current is not None and current[0] < end:
                parts.append((max(current[0], start), min(current[1], end), current[2]))
                if current[1] > end:
                    break
                current = next(spans, None)
            if all(kind == _ZERO for _, _, kind in parts):
                if not self.emit(TarWindow(start, end - start, None, self.free, [])):
                    return
                continue
            buf = self.take_buffer()
            if buf is None:
                return
            view = memoryview(buf)
            try:
                self._fill(view, start, parts)
                runs = zero_runs(view[: end - start], start, DATA_ALIGN) if self.scan_zeros else []
            finally:
                view.release()
            if not self.emit(TarWindow(start, end - start, buf, self.free, runs)):
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
