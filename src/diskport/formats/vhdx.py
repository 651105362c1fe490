"""VHDX ([MS-VHDX] v20160714): probe. The reader arrives with the formats work."""

from __future__ import annotations

from diskport.errors import UnsupportedImage
from diskport.formats.base import DiskImage
from diskport.sources.base import Source

FMT = "vhdx"
SIGNATURE = b"vhdxfile"


def probe(head: bytes, source: Source) -> int:
    return 100 if head[:8] == SIGNATURE else 0


def open_vhdx(source: Source) -> DiskImage:
    raise UnsupportedImage("reading VHDX images is not implemented yet", path=source.name, fmt=FMT)
