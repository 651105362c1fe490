"""VDI (VirtualBox Disk Image): probe. The reader arrives with the formats work."""

from __future__ import annotations

import struct

from diskport.errors import UnsupportedImage
from diskport.formats.base import DiskImage
from diskport.sources.base import Source

FMT = "vdi"
SIGNATURE = 0xBEDA107F


def probe(head: bytes, source: Source) -> int:
    if len(head) >= 0x48 and struct.unpack_from("<I", head, 0x40)[0] == SIGNATURE:
        return 100
    return 0


def open_vdi(source: Source) -> DiskImage:
    raise UnsupportedImage("reading VDI images is not implemented yet", path=source.name, fmt=FMT)
