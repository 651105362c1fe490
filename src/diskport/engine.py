"""The conversion engine: extents of a :class:`~diskport.formats.base.DiskImage` into a
:class:`~diskport.writers.base.Writer`.

One engine serves convert, import, build and pull. It coalesces small extents into large windows (one
positional read per contiguous host run, one scan for zero blocks per window), sends long zero extents to the
writer without reading anything, and reports progress in guest bytes. :func:`convert` adds the file handling:
the destination is written beside its final name and renamed only when complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from diskport.destination import Destination
from diskport.errors import DestinationError, DiskportError, UsageError
from diskport.formats import open_image
from diskport.formats.base import DiskImage, Extent
from diskport.writers import OUTPUT_FORMATS, Qcow2Writer, RawWriter, Writer
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


def copy_image(image: DiskImage, writer: Writer, progress: Progress | None = None,
               *, window: int = WINDOW) -> CopyStats:
    """Drive every extent of ``image`` into ``writer`` in guest order; does not call ``writer.finish``."""
    total = image.virtual_size
    stats = CopyStats(virtual_size=total)
    gran = writer.zero_granularity
    window = max(gran, window // gran * gran)
    buf = bytearray(window)
    mv = memoryview(buf)
    zero_fill = memoryview(bytes(window))
    wstart = 0
    fill = 0
    wlimit = 0

    def flush() -> None:
        nonlocal fill
        if not fill:
            return
        for a, b, is_zero in zero_runs(mv[:fill], wstart, gran):
            if is_zero:
                writer.write_zeros(wstart + a, b - a)
                stats.zero_bytes += b - a
            else:
                writer.write(wstart + a, mv[a:b])
                stats.data_bytes += b - a
        if progress is not None:
            progress(wstart + fill, total)
        fill = 0

    for ext in image.extents():
        if ext.zero and (fill == 0 or ext.length >= DIRECT_ZERO):
            flush()
            writer.write_zeros(ext.start, ext.length)
            stats.zero_bytes += ext.length
            if progress is not None:
                progress(ext.end, total)
            continue
        pos = ext.start
        while pos < ext.end:
            if fill == 0:
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
                flush()
    flush()
    return stats


def make_writer(output_format: str, dest: Destination, size: int, *, compression: str | None = None,
                cluster_size: int = 65536) -> Writer:
    if output_format == "raw":
        if compression:
            raise UsageError("compression needs -O qcow2; raw output is never compressed")
        return RawWriter(dest.fd, size, name=dest.path, block_device=dest.block_device)
    if output_format == "qcow2":
        return Qcow2Writer(dest.fd, size, name=dest.path, cluster_size=cluster_size, compression=compression)
    raise UsageError(f"unknown output format '{output_format}' (choose from {', '.join(OUTPUT_FORMATS)})")


def write_image(image: DiskImage, destination: str | os.PathLike[str], *, output_format: str = "raw",
                compression: str | None = None, cluster_size: int = 65536, force: bool = False,
                progress: Progress | None = None) -> tuple[CopyStats, int]:
    """Write an opened image to ``destination`` atomically; returns the copy stats and bytes written."""
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format '{output_format}' (choose from {', '.join(OUTPUT_FORMATS)})")
    with Destination(destination, force=force, size=image.virtual_size) as dest:
        writer = make_writer(output_format, dest, image.virtual_size, compression=compression,
                             cluster_size=cluster_size)
        try:
            stats = copy_image(image, writer, progress)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    return stats, writer.bytes_written


def convert(source: str | os.PathLike[str], destination: str | os.PathLike[str], *,
            output_format: str = "raw", source_format: str | None = None, compression: str | None = None,
            cluster_size: int = 65536, force: bool = False, progress: Progress | None = None) -> ConvertResult:
    """Convert the image at ``source`` into ``destination`` (``raw`` or ``qcow2``).

    ``compression`` (``zlib`` or ``zstd``) compresses qcow2 clusters. Nothing exists at ``destination``
    unless the conversion completed.
    """
    began = time.monotonic()
    src = os.fspath(source)
    dst = os.fspath(destination)
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise UsageError("source and destination are the same file", path=dst)
    with open_image(src, source_format) as image:
        try:
            stats, written = write_image(image, dst, output_format=output_format, compression=compression,
                                         cluster_size=cluster_size, force=force, progress=progress)
        except (DestinationError, UsageError):
            raise
        except DiskportError as e:
            raise e.locate(src, image.format) from None
        return ConvertResult(source=src, destination=dst, source_format=image.format,
                             output_format=output_format, virtual_size=image.virtual_size,
                             data_bytes=stats.data_bytes, zero_bytes=stats.zero_bytes,
                             written_bytes=written, seconds=time.monotonic() - began)
