"""Compression layers around an image, recognised by their magic numbers.

gzip RFC 1952 2.3.1; xz "The .xz File Format" 2.1.1.1; zstd RFC 8878 3.1.1 (and skippable frames, 3.1.2);
bzip2 stream header ``BZh1``..``BZh9`` followed by a block or end-of-stream magic.

Detection is the magic bytes only: no codec is imported here (each is imported by what decodes its kind).
"""

from __future__ import annotations

import functools
import struct
import zlib
from typing import cast

GZIP, XZ, ZSTD, BZIP2 = "gzip", "xz", "zstd", "bzip2"


@functools.cache
def inflate_errors() -> tuple[type[BaseException], ...]:
    """What damaged deflate data raises: zlib's error, and isa-l's own IsalError (an Exception only; isal's stub
    declares it as an instance, hence the cast). Imports isal: call it where deflate data is decoded."""
    from isal import isal_zlib

    return (cast(type[BaseException], isal_zlib.error), zlib.error)


def detect_compression(head: bytes) -> str | None:
    if head[:3] == b"\x1f\x8b\x08":
        return GZIP
    if head[:6] == b"\xfd7zXZ\x00":
        return XZ
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return ZSTD
    if len(head) >= 4 and (struct.unpack_from("<I", head)[0] & 0xFFFFFFF0) == 0x184D2A50:
        return ZSTD
    if (head[:3] == b"BZh" and len(head) >= 10 and 0x31 <= head[3] <= 0x39
            and head[4:10] in (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")):
        return BZIP2
    return None
