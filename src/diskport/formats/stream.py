"""Raw and ISO images read straight from a decompressing stream, without scratch space.

The size of a raw disk inside gzip or bzip2 is not known until the stream ends, so :class:`StreamedRawImage`
learns its ``virtual_size`` as it goes (writers take the final size at ``finish``). It always holds back the
last 512 bytes: a fixed VHD is a raw disk followed by a 512-byte footer and nothing at its start says so, so
when the held-back bytes turn out to be a valid fixed-VHD footer the image becomes a ``vpc`` image and the
footer is not written as data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from diskport.errors import UnsafeImage, UnsupportedImage, located
from diskport.formats.base import DiskImage, Extent
from diskport.sources.stream import DecompressingStream

CHUNK = 8 * 1024 * 1024
TRAILER = 512

#: ``(footer, bytes before it) -> virtual size`` when ``footer`` is a fixed-VHD footer, else None.
FooterCheck = Callable[[bytes, int], "int | None"]


class StreamedRawImage(DiskImage):
    """Read once, in order, from ``extents()``; ``virtual_size`` is final once the extents are exhausted."""

    size_known = False

    def __init__(self, stream: DecompressingStream, head: bytes, fmt: str, *, limit: int,
                 fixed_vhd_footer: FooterCheck | None = None) -> None:
        super().__init__(stream.source)
        self.stream = stream
        self.format = fmt
        self.compression = [stream.kind] if stream.kind else []
        self.virtual_size = 0
        self.limit = limit
        self._head = head
        self._footer_check = fixed_vhd_footer
        self._chunk_start = 0
        self._chunk = memoryview(b"")
        self._started = False

    def _fill(self, buf: bytearray, have: int) -> int:
        view = memoryview(buf)
        while have < len(buf):
            n = self.stream.readinto(view[have:])
            if not n:
                break
            have += n
        return have

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        if start != 0 or end is not None or self._started:
            raise UnsupportedImage("a compressed raw image can only be read once, from the start",
                                   path=self.source.name, fmt=self.format)
        self._started = True
        buf = bytearray(CHUNK + TRAILER)
        buf[: len(self._head)] = self._head
        have = self._fill(buf, len(self._head))
        pos = 0
        while have == len(buf):
            # More may follow: everything but the last TRAILER bytes is certainly data.
            yield from self._emit(pos, memoryview(buf)[:CHUNK])
            pos += CHUNK
            next_buf = bytearray(CHUNK + TRAILER)
            next_buf[:TRAILER] = buf[CHUNK:]
            buf = next_buf
            have = self._fill(buf, TRAILER)
        data = have
        if have >= TRAILER and self._footer_check is not None:
            with located(self.source.name, "vpc"):
                size = self._footer_check(bytes(buf[have - TRAILER: have]), pos + have - TRAILER)
            if size is not None:
                self.format = "vpc"
                data = size - pos
        if data > 0:
            yield from self._emit(pos, memoryview(buf)[:data])
        self.virtual_size = pos + max(data, 0)
        self.size_known = True

    def _emit(self, pos: int, chunk: memoryview) -> Iterator[Extent]:
        if pos + len(chunk) > self.limit:
            raise UnsafeImage(f"holds more than {self.limit} bytes" + (" (decompression bomb?)" if self.stream.kind
                                                                      else ""),
                              path=self.source.name, fmt=self.stream.kind,
                              hint="pass --size if the disk really is larger")
        self._chunk_start = pos
        self._chunk = chunk
        self.virtual_size = pos + len(chunk)
        yield Extent(pos, len(chunk), False, None)

    def read_mapped(self, ext: Extent, buf: memoryview) -> None:
        at = ext.start - self._chunk_start
        buf[:] = self._chunk[at: at + ext.length]

    def close(self) -> None:
        self.stream.close()
        super().close()
