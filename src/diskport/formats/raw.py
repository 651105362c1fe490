"""Raw images: the guest bytes are the file's bytes; holes in a sparse file read as zeros.

ISO 9660/UDF images are raw too (:mod:`diskport.formats.iso` only names them).
"""

from __future__ import annotations

from collections.abc import Iterator

from diskport.formats.base import DiskImage, Extent, file_runs
from diskport.sources.base import Source


class RawImage(DiskImage):
    format = "raw"

    def __init__(self, source: Source, fmt: str = "raw") -> None:
        super().__init__(source)
        self.format = fmt
        self.virtual_size = source.size

    def _guest_runs(self, start: int, stop: int) -> Iterator[Extent]:
        return file_runs(self.source, start, stop)


def probe(head: bytes, source: Source) -> int:
    """Raw matches anything, weakest of all: it is what remains when no structure is found."""
    return 1


def open_raw(source: Source) -> RawImage:
    return RawImage(source)
