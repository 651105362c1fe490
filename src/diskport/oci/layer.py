"""The one layer of a containerDisk, in one pass: the tar hashed (``diff_id``), compressed, hashed again, written.

The tar is written by hand rather than with :mod:`tarfile`: a member of many gigabytes has to go through
sha256 (the layer's ``diff_id``), a compressor and a second sha256 (the blob digest) in a single read of the disk,
with holes of a sparse disk left as holes in an uncompressed blob and the disk's bytes on 4 KiB boundaries of the
output so that they can be written with ``O_DIRECT``. tarfile can only copy a member from a file object into a
stream. The pieces live beside this pipeline: the headers and the tar's layout in :mod:`diskport.oci.tar`, the
tar as windows read ahead in :mod:`diskport.oci.tarstream`, gzip and zstd in :mod:`diskport.oci.compress`.

The length is known before anything is written (:func:`tar_size`), which lets a docker-archive place the layer
inside an outer tar whose header comes first.

Threads: a read-ahead thread (:class:`~diskport.oci.tarstream.TarStream`) fills 8 MiB windows from a pool of
page-aligned buffers (holes are not read: a window that is all hole carries no buffer and is hashed from a shared
zero mapping; uncompressed, zero blocks inside the data are found too, and left as holes of the blob); one thread
hashes, in order; the caller's thread writes, or, compressed, hands windows to the compressor (gzip: a thread
per core; zstd: its own workers) and writes what comes out. hashlib, isa-l, zstandard, numpy and
``preadv``/``pwrite`` release the GIL, so the stages overlap. Memory stays at a few windows whatever the disk's
size: four uncompressed, one per compression thread plus two compressed (threads: one per core, at most 8
unless asked).

Page cache (``cache``: ``auto``, ``writeback``, ``none``, as for convert): the blob's size is learnt only at its
end, but a bound is known before it opens, :func:`layer_bound` (the tar's exact length, plus the compressor's
worst-case growth when compressed), and :func:`diskport.cache.decide` takes that bound as the output's size, so
``auto`` writes back under the same rules as convert (a regular file, at most half the cgroup memory limit and
half of MemAvailable) and otherwise goes ``O_DIRECT``. :attr:`Layer.cache` is the policy chosen and why.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from diskport.cache import CachePolicy
from diskport.destination import Destination
from diskport.errors import UsageError
from diskport.oci.compress import COMPRESSIONS, default_threads, make_compressor
from diskport.oci.media import LAYER_MEDIA, Descriptor
from diskport.oci.tar import (
    BLOCK,
    DATA_ALIGN,
    END_OF_ARCHIVE,
    MAX_MTIME,
    check_disk_name,
    layer_header,
    member_header,
    padded,
    tar_size,
)
from diskport.oci.tarstream import DEPTH, WINDOW, TarStream, TarWindow
from diskport.writers import RawWriter, Writer

__all__ = [
    "BLOCK", "COMPRESSIONS", "DATA_ALIGN", "END_OF_ARCHIVE", "MAX_MTIME", "Layer", "Progress", "TarStream",
    "check_disk_name", "copy_compressed", "copy_tar", "layer_bound", "layer_header", "member_header", "padded",
    "tar_size", "write_layer", "write_tar",
]

Progress = Callable[[int], None]


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


def copy_compressed(stream: TarStream, writer: Writer, compression: str, *, level: int | None = None,
                    threads: int | None = None, progress: Progress | None = None) -> tuple[str, str, int]:
    """Compress the tar of an entered ``stream`` into ``writer`` from offset 0; returns
    ``(diff_id, blob digest, blob size)``."""
    threads = threads or default_threads()
    tar_hash = hashlib.sha256()
    blob_hash = hashlib.sha256()
    hasher = _Hasher()
    out = _Appender(writer)
    compressor = make_compressor(compression, level, threads, stream.size)
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

#: What a compressor may add to incompressible input: zstd's ZSTD_compressBound is ``n + n/256`` plus a little
#: below 128 KiB; deflate's stored blocks cost 5 bytes per 64 KiB, and each 8 MiB gzip window ends with a sync
#: flush of 5 more. ``n/256`` and a fixed 1 MiB cover both with room to spare.
_GROWTH_SHIFT = 8
_GROWTH_FIXED = 1024 * 1024


def layer_bound(disk_size: int, name: str, compression: str) -> int:
    """An upper bound of the blob's length, known before anything is read: the tar's exact length
    (:func:`tar_size`) uncompressed, plus the compressor's worst-case growth for gzip and zstd. It is what
    ``--cache auto`` weighs against memory (the blob's real size is learnt only at its end)."""
    size = tar_size(disk_size, name)
    return size if compression == "none" else size + (size >> _GROWTH_SHIFT) + _GROWTH_FIXED


@dataclass(frozen=True)
class Layer:
    """A written layer blob: its descriptor (compressed digest and size), its diff_id and its tar's length;
    ``cache`` is the page-cache policy it was written with (not part of the layer's identity)."""

    descriptor: Descriptor
    diff_id: str
    tar_size: int
    cache: CachePolicy | None = field(default=None, compare=False)


def write_layer(disk: str, name: str, blobs_dir: str, compression: str = "gzip", *, mtime: int,
                progress: Progress | None = None, level: int | None = None, threads: int | None = None,
                cache: str = "auto") -> Layer:
    """Write the containerDisk layer of ``disk`` (the file, as it is) into ``blobs_dir/<digest hex>``.

    ``name`` is the file name under ``disk/``; ``compression`` is ``none``, ``gzip`` or ``zstd``; ``mtime`` is
    every timestamp in the tar. ``progress`` receives the tar bytes done (of :func:`tar_size`). The blob is
    written under a temporary name in ``blobs_dir`` and renamed once its digest is known; on any failure,
    Ctrl-C included, the temporary file is removed. ``level`` and ``threads`` tune the compressor (the output
    depends on the level, not on the threads). ``cache`` is the page-cache mode (``auto`` decides from
    :func:`layer_bound`; see the module docstring).
    """
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown layer compression '{compression}' (choose from {', '.join(COMPRESSIONS)})")
    check_disk_name(name)
    threads = threads or default_threads()
    depth = DEPTH if compression == "none" else max(DEPTH, threads + 2)  # a window per thread, and one to read
    with TarStream(disk, name, mtime=mtime, scan_zeros=compression == "none", depth=depth) as stream, \
            Destination(os.path.join(blobs_dir, "layer"), size=layer_bound(stream.disk_size, name, compression),
                        cache=cache) as dest:
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
    return Layer(Descriptor(LAYER_MEDIA[compression], digest, size), diff_id, tar_length, dest.policy)
