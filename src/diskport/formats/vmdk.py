"""VMDK (VMware Virtual Disk Format 1.1): probe. The reader arrives with the formats work."""

from __future__ import annotations

import struct

from diskport.errors import UnsupportedImage
from diskport.formats.base import DiskImage
from diskport.sources.base import Source

FMT = "vmdk"
SPARSE_MAGIC = b"KDMV"
DESCRIPTOR_MARK = b"# Disk DescriptorFile"


def probe(head: bytes, source: Source) -> int:
    if head[:4] == SPARSE_MAGIC and len(head) >= 8 and struct.unpack_from("<I", head, 4)[0] in (1, 2, 3):
        return 100
    if head[:4] == SPARSE_MAGIC:
        return 60
    if head[:4] == b"COWD":
        return 90
    text = head[:4096]
    if text.startswith(DESCRIPTOR_MARK) or (b"createType=" in text and b"\0" not in text[:1024]):
        return 90
    return 0


def open_vmdk(source: Source) -> DiskImage:
    raise UnsupportedImage("reading VMDK images is not implemented yet", path=source.name, fmt=FMT)
