"""Parallel xz decompression for multi-block files (``xz -T0``, pixz and most image publishers make them).

The standard library decodes an .xz file on one core. Every block of an .xz stream is independent, and the
index at the end of each stream lists them (".xz File Format" 1.0.4, sections 2.1.2 Stream Footer, 4 Index), so
when the file can be read at random (a local file, a server with ranges) the blocks are located from the index
and decoded on a thread pool (liblzma releases the GIL), then handed out in order. Each block is decoded by
wrapping it as a one-block stream of its own (the original stream header, the block, a one-record index and a
footer), so liblzma still checks the block's integrity check.

Memory is bounded: at most ``workers`` blocks are being decoded or waiting, and only blocks of up to
:data:`MAX_BLOCK` bytes are decoded this way; files with bigger blocks, a single block, or anything this module
does not recognise fall back to the sequential decoder. No library on PyPI does this for the standard ``lzma``
module (python-xz gives seeking, not parallel decoding), hence by hand.
"""

from __future__ import annotations

import io
import lzma
import os
import struct
import zlib
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diskport.errors import CorruptImage
from diskport.sources.base import Source

if TYPE_CHECKING:
    from concurrent.futures import Future

HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
MAX_BLOCK = 32 * 1024 * 1024  # xz -T0 at the default level makes 24 MiB blocks
MAX_INDEX = 16 * 1024 * 1024
MAX_STREAMS = 1024


@dataclass(frozen=True)
class XzBlock:
    stream_header: bytes   # the 12-byte header of the stream the block belongs to
    offset: int            # where the block starts in the file
    unpadded: int          # block header + compressed data + check
    uncompressed: int


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        if pos >= len(data):
            raise ValueError("truncated integer")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos
    raise ValueError("integer longer than 9 bytes")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def find_blocks(source: Source) -> list[XzBlock] | None:
    """The blocks of every stream in the file, from their indexes; None if the file is not laid out as expected."""
    blocks: list[XzBlock] = []
    end = source.size
    try:
        for _ in range(MAX_STREAMS):
            # Stream padding: zero bytes in multiples of four after a stream.
            while end >= 4 and source.pread(end - 4, 4) == b"\0\0\0\0":
                end -= 4
            if end == 0:
                break
            if end < 24:
                return None
            footer = source.pread(end - 12, 12)
            if footer[10:] != FOOTER_MAGIC or zlib.crc32(footer[4:10]) != struct.unpack_from("<I", footer)[0]:
                return None
            index_size = (struct.unpack_from("<I", footer, 4)[0] + 1) * 4
            if index_size > MAX_INDEX or index_size > end - 24:
                return None
            index_at = end - 12 - index_size
            index = source.pread(index_at, index_size)
            if index[0] != 0 or zlib.crc32(index[:-4]) != struct.unpack_from("<I", index, len(index) - 4)[0]:
                return None
            count, pos = _varint(index, 1)
            records = []
            for _ in range(count):
                unpadded, pos = _varint(index, pos)
                uncompressed, pos = _varint(index, pos)
                records.append((unpadded, uncompressed))
            stream_blocks = sum((u + 3) & ~3 for u, _ in records)
            stream_start = index_at - stream_blocks - 12
            if stream_start < 0:
                return None
            header = source.pread(stream_start, 12)
            if header[:6] != HEADER_MAGIC or header[6:8] != footer[8:10]:
                return None
            offset = stream_start + 12
            stream = []
            for unpadded, uncompressed in records:
                stream.append(XzBlock(header, offset, unpadded, uncompressed))
                offset += (unpadded + 3) & ~3
            blocks[:0] = stream
            end = stream_start
        else:
            return None
    except (ValueError, IndexError, struct.error):
        return None
    return blocks if end == 0 else None


def _decode(source: Source, block: XzBlock) -> bytes:
    padded = (block.unpadded + 3) & ~3
    index = bytearray(b"\0" + _encode_varint(1) + _encode_varint(block.unpadded)
                      + _encode_varint(block.uncompressed))
    index += bytes(-len(index) % 4)
    index += struct.pack("<I", zlib.crc32(index))
    tail = struct.pack("<I", len(index) // 4 - 1) + block.stream_header[6:8]
    footer = struct.pack("<I", zlib.crc32(tail)) + tail + FOOTER_MAGIC
    # The one-block stream, assembled in place: the block is read straight into the middle (no second copy).
    stream = bytearray(12 + padded + len(index) + 12)
    stream[:12] = block.stream_header
    if source.readinto(block.offset, memoryview(stream)[12: 12 + padded]) != padded:
        raise CorruptImage(f"xz block at {block.offset:#x} runs past the end of the file", path=source.name,
                           fmt="xz")
    stream[12 + padded:] = bytes(index) + footer
    try:
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(stream, block.uncompressed + 1)
    except lzma.LZMAError as e:
        raise CorruptImage(f"xz block at {block.offset:#x} is damaged: {e}", path=source.name, fmt="xz") from None
    if len(out) != block.uncompressed:
        raise CorruptImage(f"xz block at {block.offset:#x} decodes to {len(out)} bytes, its index says "
                           f"{block.uncompressed}", path=source.name, fmt="xz")
    return out


class ParallelXzReader(io.RawIOBase):
    """Sequential reads of the decompressed bytes, with the blocks ahead decoded in parallel."""

    def __init__(self, source: Source, blocks: list[XzBlock], workers: int | None = None) -> None:
        self.source = source
        self.blocks = blocks
        self.workers = workers or os.cpu_count() or 2
        from concurrent.futures import ThreadPoolExecutor  # multi-block xz only: not at start-up

        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="xz-decode")
        self.next_block = 0
        self.ahead: deque[Future[bytes]] = deque()
        self.current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while len(self.ahead) < self.workers and self.next_block < len(self.blocks):
            self.ahead.append(self.pool.submit(_decode, self.source, self.blocks[self.next_block]))
            self.next_block += 1

    def readinto(self, buf: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buf).cast("B")
        while not self.current:
            self._fill()
            if not self.ahead:
                return 0
            self.current = memoryview(self.ahead.popleft().result())
            self._fill()
        n = min(len(view), len(self.current))
        view[:n] = self.current[:n]
        self.current = self.current[n:]
        return n

    def close(self) -> None:
        for future in self.ahead:
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        super().close()


def parallel_reader(source: Source) -> ParallelXzReader | None:
    """A parallel reader when ``source`` is random-access and holds several blocks of bounded size."""
    if getattr(source, "sequential", False):
        return None
    blocks = find_blocks(source)
    if not blocks or len(blocks) < 2 or max(b.uncompressed for b in blocks) > MAX_BLOCK:
        return None
    return ParallelXzReader(source, blocks)
