"""VHD (Virtual Hard Disk Image Format Specification, Microsoft 2006): probe. Reader: formats work."""

from __future__ import annotations

from diskport.errors import UnsupportedImage
from diskport.formats.base import DiskImage
from diskport.sources.base import Source

FMT = "vpc"
COOKIE = b"conectix"


def probe(head: bytes, source: Source) -> int:
    if head[:8] == COOKIE:
        return 100  # dynamic/differencing: footer copy at offset 0
    if source.size >= 512 + 512 and source.pread(source.size - 512, 8) == COOKIE:
        return 90  # fixed: footer at the end only
    return 0


def open_vhd(source: Source) -> DiskImage:
    raise UnsupportedImage("reading VHD images is not implemented yet", path=source.name, fmt=FMT)
