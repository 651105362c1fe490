"""The conversion engine: extents of a :class:`~diskport.formats.base.DiskImage` into a
:class:`~diskport.writers.base.Writer`.

One engine serves convert, import, build and pull. It coalesces small extents into large windows (one
positional read per contiguous host run, one scan for zero blocks per window), sends long zero extents to the
writer without reading anything, and reports progress in guest bytes. :func:`convert` adds the file handling:
the destination is written beside its final name and renamed only when complete.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from diskport.cache import CachePolicy
from diskport.destination import Destination, refuse_existing
from diskport.errors import DestinationError, UsageError, located
from diskport.formats import open_image
from diskport.formats.base import Access, DiskImage, Extent
from diskport.ova import DEFAULT, OvaChoice
from diskport.prefetch import ReadAhead
from diskport.writers import OUTPUT_FORMATS, Qcow2Writer, RawWriter, Writer
from diskport.writers.qcow2 import check_virtual_size
from diskport.zeros import zero_runs

#: Size of one read/scan/write window. Large enough that per-call overhead vanishes, small enough to stay in
#: the CPU cache hierarchy's reach and keep memory flat.
WINDOW = 8 * 1024 * 1024
#: Zero extents at least this long go straight to the writer instead of being zero-filled into a window.
DIRECT_ZERO = 64 * 1024

Progress = Callable[[int, int], None]


@dataclass
class CopyStats:
    virtual_size: int = 0
    data_bytes: int = 0    # guest bytes written as data
    zero_bytes: int = 0    # guest bytes left as zeros (holes, unallocated clusters)
    cache: CachePolicy | None = None  # the destination's page-cache policy (set by write_image)


@dataclass
class ConvertResult:
    source: str
    destination: str
    source_format: str
    output_format: str
    virtual_size: int
    data_bytes: int
    zero_bytes: int
    written_bytes: int
    seconds: float
    compression: list[str]
    access: Access
    #: The page-cache policy used and why (:mod:`diskport.cache`).
    cache: CachePolicy = field(default_factory=lambda: CachePolicy("none", "not reported"))


Run = tuple[int, int, bool]  # (start, end, is_zero) inside a window
Item = tuple[int, int, "mmap.mmap | None", list[Run]]


class _Prefetcher(ReadAhead[Item]):
    """Reads the image ahead of the writer on a background thread (:class:`diskport.prefetch.ReadAhead`).

    The producer walks the extents, fills windows from a small pool of page-aligned buffers (so they can be
    written with O_DIRECT) and finds the zero blocks in each; the caller's thread writes them in order. preadv,
    pwrite, the codecs and numpy release the GIL, so reading and scanning overlap writing. Items are
    ``(start, length, buffer, runs)``; ``buffer`` None means a zero run sent straight to the writer.
    """

    DEPTH = 3
    UNWIND_WAIT = 1.0  # seconds

    def __init__(self, image: DiskImage, window: int, gran: int) -> None:
        super().__init__(window=window, depth=self.DEPTH, name="diskport-prefetch", unwind_wait=self.UNWIND_WAIT)
        self.image = image
        self.gran = gran

    def __enter__(self) -> _Prefetcher:
        super().__enter__()
        return self

    def produce(self) -> None:
        image, window, gran = self.image, self.window, self.gran
        zero_fill = memoryview(bytes(window))
        buf: mmap.mmap | None = None
        mv = memoryview(b"")
        wstart = fill = wlimit = 0

        def emit() -> None:
            nonlocal buf, fill
            if buf is not None and fill:
                self.emit((wstart, fill, buf, zero_runs(mv[:fill], wstart, gran)))
                buf = None
                fill = 0

        for ext in image.extents():
            if self.stop.is_set():
                return
            if ext.zero and (fill == 0 or ext.length >= DIRECT_ZERO):
                emit()
                self.emit((ext.start, ext.length, None, []))
                continue
            pos = ext.start
            while pos < ext.end:
                if fill == 0:
                    if buf is None:
                        buf = self.take_buffer()
                        if buf is None:
                            return
                        mv = memoryview(buf)
                    wstart = pos
                    # End windows on granularity boundaries so zero blocks line up with the writer's.
                    wlimit = (pos + window) // gran * gran
                    if wlimit <= pos:
                        wlimit = pos + window
                take = min(ext.end, wlimit) - pos
                if ext.zero:
                    mv[fill: fill + take] = zero_fill[:take]
                else:
                    host = None if ext.host is None else ext.host + (pos - ext.start)
                    image.read_extent(Extent(pos, take, False, host), mv[fill: fill + take])
                fill += take
                pos += take
                if pos >= wlimit:
                    emit()
        emit()

    def items(self) -> Iterator[Item]:
        for item in super().items():
            yield item
            if item[2] is not None:
                self.recycle(item[2])


def copy_image(image: DiskImage, writer: Writer, progress: Progress | None = None,
               *, window: int = WINDOW) -> CopyStats:
    """Drive every extent of ``image`` into ``writer`` in guest order; does not call ``writer.finish``."""
    total = image.virtual_size if image.size_known else 0  # 0: not known until a stream ends
    stats = CopyStats()
    gran = writer.zero_granularity
    window = max(gran, window // gran * gran)
    with _Prefetcher(image, window, gran) as prefetch:
        for start, length, buf, runs in prefetch.items():
            if buf is None:
                writer.write_zeros(start, length)
                stats.zero_bytes += length
            else:
                mv = memoryview(buf)[:length]
                for a, b, is_zero in runs:
                    if is_zero:
                        writer.write_zeros(start + a, b - a)
                        stats.zero_bytes += b - a
                    else:
                        writer.write(start + a, mv[a:b])
                        stats.data_bytes += b - a
            if progress is not None:
                progress(start + length, total)
    stats.virtual_size = image.virtual_size
    return stats


def make_writer(output_format: str, dest: Destination, size: int | None, *, compression: str | None = None,
                cluster_size: int = 65536, sync: bool = False) -> Writer:
    """A writer for ``dest``. ``sync`` flushes to stable storage at the end; block devices always are."""
    sync = sync or dest.block_device
    writer: Writer
    if output_format == "raw":
        if compression:
            raise UsageError("compression needs -O qcow2; raw output is never compressed")
        writer = RawWriter(dest.fd, size, name=dest.path, block_device=dest.block_device, sync=sync,
                           direct_fd=dest.direct_fd)
    elif output_format == "qcow2":
        writer = Qcow2Writer(dest.fd, size, name=dest.path, cluster_size=cluster_size, compression=compression,
                             sync=sync, direct_fd=dest.direct_fd)
    else:
            raise UsageError(f"unknown output format '{output_format}' (choose from {', '.join(OUTPUT_FORMATS)})")
    writer.behind = dest.behind
    return writer


def write_image(image: DiskImage, destination: str | os.PathLike[str], *, output_format: str = "raw",
                compression: str | None = None, cluster_size: int = 65536, force: bool = False,
                sync: bool = False, progress: Progress | None = None, grow_to: int | None = None,
                before_commit: Callable[[], None] | None = None, cache: str = "auto") -> tuple[CopyStats, int]:
    """Write an opened image to ``destination`` atomically; returns the copy stats and bytes written.

    ``cache`` is the page-cache policy (:mod:`diskport.cache`); the one chosen is in the stats' ``cache``.

    ``grow_to`` makes the disk at least that large (a persistent disk bigger than the image). ``before_commit``
    runs after the last byte is written and before the destination is renamed into place; if it raises (a
    checksum mismatch), nothing is left behind.
    """
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format '{output_format}' (choose from {', '.join(OUTPUT_FORMATS)})")
    size = image.virtual_size if image.size_known else None
    if output_format == "qcow2" and size is not None:  # before anything exists at the destination
        check_virtual_size(max(size, grow_to or 0), cluster_size, os.fspath(destination))
    with Destination(destination, force=force, size=size, cache=cache, sync=sync) as dest:
        writer = make_writer(output_format, dest, size, compression=compression,
                             cluster_size=cluster_size, sync=sync)
        try:
            stats = copy_image(image, writer, progress)
            stats.cache = dest.policy
            if grow_to is not None and grow_to < image.virtual_size:
                raise DestinationError(f"the disk holds {image.virtual_size} bytes, more than the {grow_to} "
                                       "bytes asked for", path=dest.path)
            writer.finish(max(image.virtual_size, grow_to or 0))
            for check in image.checks:
                check()
            if before_commit is not None:
                before_commit()
        except BaseException:
            writer.abort()
            raise
    return stats, writer.bytes_written


def convert(source: str | os.PathLike[str], destination: str | os.PathLike[str], *,
            output_format: str = "raw", source_format: str | None = None, compression: str | None = None,
            cluster_size: int = 65536, force: bool = False, sync: bool = False, scratch_dir: str | None = None,
            size_limit: int | None = None, progress: Progress | None = None,
            ova: OvaChoice = DEFAULT, cache: str = "auto") -> ConvertResult:
    """Convert the image at ``source`` into ``destination`` (``raw`` or ``qcow2``).

    ``compression`` (``zlib`` or ``zstd``) compresses qcow2 clusters. Nothing exists at ``destination``
    unless the conversion completed. ``sync`` flushes the result to stable storage before it is renamed into
    place (like qemu-img, a file is not flushed by default; a block device always is). A random-access format
    inside a compressed file is spooled to an unlinked scratch file in ``scratch_dir`` (default: the
    destination's folder); ``size_limit`` bounds what a compressed raw disk may expand to. ``ova`` picks the
    disk of an OVA appliance (its boot disk by default). ``cache`` is the page-cache policy, ``auto``,
    ``writeback`` or ``none`` (:mod:`diskport.cache`); the result's ``cache`` says which was used and why.
    """
    began = time.monotonic()
    src = os.fspath(source)
    dst = os.fspath(destination)
    refuse_existing(dst, force)
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise UsageError("source and destination are the same file", path=dst)
    scratch = scratch_dir or os.path.dirname(os.path.abspath(dst))
    with open_image(src, source_format, scratch_dir=scratch, size_limit=size_limit, ova=ova) as image:
        with located(src, image.format):
            stats, written = write_image(image, dst, output_format=output_format, compression=compression,
                                         cluster_size=cluster_size, force=force, sync=sync, progress=progress,
                                         cache=cache)
        assert stats.cache is not None
        return ConvertResult(source=src, destination=dst, source_format=image.format,
                             output_format=output_format, virtual_size=image.virtual_size,
                             data_bytes=stats.data_bytes, zero_bytes=stats.zero_bytes,
                             written_bytes=written, seconds=time.monotonic() - began,
                             compression=list(image.compression), access=image.access, cache=stats.cache)
