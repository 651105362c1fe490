"""Raw images: the guest bytes are the file's bytes; holes in a sparse file read as zeros.

ISO 9660/UDF images are raw too (:mod:`diskport.formats.iso` only names them).
"""

from __future__ import annotations

from collections.abc import Iterator

from diskport.formats.base import DiskImage, Extent, coalesce
from diskport.sources.base import Source

# Holes smaller than this are read as data: the filesystem's holes are at least a block anyway, and
# splitting extents finer only costs calls.
_MIN_HOLE = 4096


class RawImage(DiskImage):
    format = "raw"

    def __init__(self, source: Source, fmt: str = "raw") -> None:
        super().__init__(source)
        self.format = fmt
        self.virtual_size = source.size

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        stop = self.virtual_size if end is None else min(end, self.virtual_size)
        runs = self.source.allocated_extents(start, stop - start)
        yield from coalesce(Extent(pos, length, zero, None if zero else pos)
                            for pos, length, is_data in runs
                            for zero in (not is_data and length >= _MIN_HOLE,))


def probe(head: bytes, source: Source) -> int:
    """Raw matches anything, weakest of all: it is what remains when no structure is found."""
    return 1


def open_raw(source: Source) -> RawImage:
    return RawImage(source)
