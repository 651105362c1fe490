"""ISO 9660 and UDF images: probed by their volume descriptors (ECMA-119 8.1, ECMA-167 2/9.1) at 32 KiB.

Their bytes are the guest bytes, so they convert as raw; ``inspect`` reports ``iso``.
"""

from __future__ import annotations

from diskport.formats.raw import RawImage
from diskport.sources.base import Source

FMT = "iso"
_VRS_START = 0x8000
_IDENTIFIERS = (b"CD001", b"BEA01", b"NSR02", b"NSR03", b"TEA01")


def probe(head: bytes, source: Source) -> int:
    if source.size < _VRS_START + 2048:
        return 0
    block = head[_VRS_START: _VRS_START + 2048] if len(head) >= _VRS_START + 2048 else \
        source.pread(_VRS_START, 2048)
    return 50 if block[1:6] in _IDENTIFIERS else 0


def open_iso(source: Source) -> RawImage:
    return RawImage(source, fmt=FMT)
