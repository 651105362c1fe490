"""Read-only byte views of a guest disk, for inspection.

A :class:`GuestView` reads guest bytes of a :class:`~diskport.formats.base.DiskImage` at random, whatever the
format and wherever its bytes live (a file, HTTP ranges, a registry layer, a spool). Partitions and logical
volumes are :meth:`GuestView.slice` views of it; a file inside a filesystem is any object with the same
:class:`Readable` shape, so the hive, PE and cpio parsers take either.

Inspection reads metadata: small reads scattered over the disk. The engine's bulk windows (8 MiB, several in
flight) would move tens of MB to read one; here every read goes through one bounded LRU of small blocks
(:data:`BLOCK` bytes, :data:`CACHE_BLOCKS` of them) shared by every slice of the disk, and the view counts what
it read so the report can say so. A read spanning several blocks fetches each run of missing ones with one
read of the image (at most half the cache at once), so a file streamed in large reads costs few requests.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from diskport.errors import CorruptImage
from diskport.formats.base import DiskImage

BLOCK = 64 * 1024
CACHE_BLOCKS = 128  # 8 MiB at most


@runtime_checkable
class Readable(Protocol):
    """Bytes of known size read at random: a disk, a partition, a file inside a filesystem."""

    name: str
    size: int

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; fewer only at the end."""
        ...


def read_exact(src: Readable, offset: int, length: int, what: str, fmt: str | None = None) -> bytes:
    """Exactly ``length`` bytes of ``what`` at ``offset`` of ``src``, else a CorruptImage naming them."""
    if offset < 0 or length < 0 or offset + length > src.size:
        raise CorruptImage(f"{what} at {offset:#x}+{length:#x} lies beyond the end ({src.size} bytes)",
                           path=src.name, fmt=fmt)
    data = src.pread(offset, length)
    if len(data) != length:
        raise CorruptImage(f"{what} is truncated ({len(data)} of {length} bytes)", path=src.name, fmt=fmt,
                           offset=offset)
    return data


@dataclass
class ReadStats:
    """What inspection cost: guest bytes fetched from the image (whole blocks) and the number of fetches."""

    bytes_read: int = 0
    reads: int = 0


class _BlockCache:
    def __init__(self, image: DiskImage) -> None:
        self.image = image
        self.blocks: OrderedDict[int, bytes] = OrderedDict()
        self.stats = ReadStats()

    def block(self, index: int) -> bytes:
        data = self.blocks.get(index)
        if data is not None:
            self.blocks.move_to_end(index)
            return data
        start = index * BLOCK
        data = self.image.read(start, min(BLOCK, self.image.virtual_size - start))
        self.stats.bytes_read += len(data)
        self.stats.reads += 1
        self.blocks[index] = data
        if len(self.blocks) > CACHE_BLOCKS:
            self.blocks.popitem(last=False)
        return data

    def prefetch(self, first: int, last: int) -> None:
        """Blocks ``first..last`` cached, each run of missing ones fetched with one read (a long sequential
        read, such as an initramfs streamed, then costs one request per run rather than one per block)."""
        last = min(last, first + CACHE_BLOCKS // 2 - 1)
        index = first
        while index <= last:
            if index in self.blocks:
                index += 1
                continue
            stop = index
            while stop + 1 <= last and stop + 1 not in self.blocks:
                stop += 1
            if stop == index:
                self.block(index)
            else:
                start = index * BLOCK
                data = self.image.read(start, min((stop + 1) * BLOCK, self.image.virtual_size) - start)
                self.stats.bytes_read += len(data)
                self.stats.reads += 1
                for n in range(index, stop + 1):
                    self.blocks[n] = data[(n - index) * BLOCK:(n - index + 1) * BLOCK]
                    if len(self.blocks) > CACHE_BLOCKS:
                        self.blocks.popitem(last=False)
            index = stop + 1


class GuestView:
    """``size`` guest bytes from ``offset`` of a disk image, read-only, through the disk's block cache."""

    def __init__(self, image: DiskImage, *, name: str | None = None, _cache: _BlockCache | None = None,
                 _offset: int = 0, _size: int | None = None) -> None:
        self._cache = _cache or _BlockCache(image)
        self.image = image
        self.offset = _offset
        self.size = image.virtual_size - _offset if _size is None else _size
        self.name = name or image.source.name

    @property
    def stats(self) -> ReadStats:
        return self._cache.stats

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"read {offset}+{length}")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        start, stop = self.offset + offset, self.offset + end
        first, last = start // BLOCK, (stop - 1) // BLOCK
        if first == last:
            at = start - first * BLOCK
            return self._cache.block(first)[at: at + (stop - start)]
        self._cache.prefetch(first, last)
        parts = []
        for index in range(first, last + 1):
            block = self._cache.block(index)
            lo = max(start - index * BLOCK, 0)
            hi = min(stop - index * BLOCK, len(block))
            parts.append(block[lo:hi])
        return b"".join(parts)

    def read_exact(self, offset: int, length: int, what: str, fmt: str | None = None) -> bytes:
        return read_exact(self, offset, length, what, fmt)

    def slice(self, offset: int, size: int, name: str | None = None) -> GuestView:
        """The bytes ``[offset, offset+size)`` of this view (a partition, a logical volume), clamped to it."""
        if offset < 0 or size < 0 or offset > self.size:
            raise CorruptImage(f"a volume at {offset}+{size} lies outside the disk ({self.size} bytes)",
                               path=self.name)
        return GuestView(self.image, name=name or self.name, _cache=self._cache, _offset=self.offset + offset,
                         _size=min(size, self.size - offset))
