"""Small helpers the identify-only superblock probes share: bounded reads and the usual text decodings.

Every probe reads a few KiB at most at fixed offsets; a volume too small for a structure simply does not hold
it (``None``), which is not an error: identification must never raise on foreign bytes.
"""

from __future__ import annotations

import uuid

from diskport.guest.view import Readable


def chunk(volume: Readable, offset: int, length: int) -> bytes | None:
    """Exactly ``length`` bytes at ``offset``, or None when the volume is too small to hold them."""
    if offset < 0 or length < 0 or offset + length > volume.size:
        return None
    data = volume.pread(offset, length)
    return data if len(data) == length else None


def uuid_text(raw: bytes) -> str:
    """16 bytes in on-disk (big-endian) order as the usual 8-4-4-4-12 text, as blkid prints them."""
    return str(uuid.UUID(bytes=bytes(raw)))


def c_string(raw: bytes, encoding: str = "utf-8") -> str | None:
    """A NUL-terminated (or NUL-padded) string; None when empty."""
    text = raw.split(b"\0", 1)[0].decode(encoding, errors="replace").strip()
    return text or None
