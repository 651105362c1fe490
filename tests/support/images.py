"""Checks and fuzzing helpers that every reader's tests share."""

from __future__ import annotations

import itertools
import random
import struct

from diskport.formats.base import DiskImage, Extent

MiB = 1024 * 1024
INTERESTING_32 = [0, 1, 0x7F, 0x80, 0x1FF, 0x200, 0x400, 0xFFFF, 0x10000, 0x100000, 0x7FFFFFFF, 0x80000000,
                  0xFFFFFFFE, 0xFFFFFFFF]
INTERESTING_64 = [0, 0x200, 0x600, 1 << 20, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def full_read(image: DiskImage) -> bytes:
    out = bytearray(image.virtual_size)
    image.read_into(0, memoryview(out))
    return bytes(out)


def check_extent_contract(image: DiskImage, start: int = 0, end: int | None = None) -> list[Extent]:
    """Extents cover [start, end) in order with no gap or overlap, and neighbours never merge further."""
    stop = image.virtual_size if end is None else min(end, image.virtual_size)
    exts = list(image.extents(start, end))
    pos = start
    for e in exts:
        assert e.start == pos and e.length > 0, (e, pos)
        assert not (e.zero and e.host is not None)
        pos = e.end
    assert pos == max(stop, start)
    for a, b in itertools.pairwise(exts):
        assert not (a.zero and b.zero)
        assert a.zero or b.zero or a.host is None or b.host is None or a.host + a.length != b.host
    return exts


def mutate(buf: bytearray, regions: list[tuple[int, int]], rng: random.Random, byteorder: str = "<") -> None:
    """A few random edits inside ``regions``: bit flips, random bytes, and boundary values in 32/64-bit fields."""
    for _ in range(rng.randint(1, 4)):
        lo, hi = rng.choice(regions)
        at = rng.randrange(lo, hi)
        kind = rng.randrange(5)
        if kind == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[at] = rng.randrange(256)
        elif kind == 2 and at - at % 4 + 4 <= len(buf):
            struct.pack_into(byteorder + "I", buf, at - at % 4, rng.choice(INTERESTING_32))
        elif kind == 3 and at - at % 8 + 8 <= len(buf):
            struct.pack_into(byteorder + "Q", buf, at - at % 8, rng.choice(INTERESTING_64))
        elif at + 4 <= len(buf):
            struct.pack_into(byteorder + "I", buf, at, rng.randrange(1 << 32))


def exercise(image: DiskImage) -> None:
    """Everything a conversion does: every extent, every data byte (in bounded chunks)."""
    pos = 0
    chunk = bytearray(MiB)
    for ext in image.extents():
        assert ext.start == pos and ext.length > 0
        pos = ext.end
        if ext.zero:
            continue
        at = ext.start
        while at < ext.end:
            n = min(len(chunk), ext.end - at)
            host = None if ext.host is None else ext.host + (at - ext.start)
            image.read_extent(Extent(at, n, False, host), memoryview(chunk)[:n])
            at += n
    assert pos == image.virtual_size
