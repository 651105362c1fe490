"""Decompressing streams: a forward-only view of the bytes inside gzip, xz, zstd or bzip2.

Each codec is the well-kept library made for it: isal's igzip for gzip (several times zlib's speed; handles
multi-member files), the standard library's lzma (multi-stream, stream padding) and bz2 (multi-stream), and
zstandard (multi-frame). They read from a :class:`SourceReader`, a file object over any
:class:`~diskport.sources.base.Source`, so a local file and, later, an HTTP body decompress alike.
Each codec is imported when a stream of its kind is opened, so reading a plain file loads none of them.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from diskport.errors import CorruptImage, UnsupportedImage
from diskport.sources.base import Source
from diskport.sources.compression import BZIP2, GZIP, XZ, ZSTD, inflate_errors

#: What any decoder raises on damaged input (beside its own error class, added per kind).
_STREAM_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)


def _is_end_check(error: BaseException) -> bool:
    """A gzip/bzip2/xz error found by the checksum or length at the end of a member, not at the damage."""
    text = str(error).lower()
    return any(word in text for word in ("crc", "checksum", "length", "incorrect data check"))


class SourceReader(io.RawIOBase):
    """A sequential, read-only file object over a :class:`Source`."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buf).cast("B")
        n = min(len(view), self.source.size - self.pos)
        if n <= 0:
            return 0
        got = self.source.readinto(self.pos, view[:n])
        self.pos += got
        return got


class DecompressingStream:
    """Forward-only decompressed bytes of ``source``.

    ``kind`` None is the identity: the bytes of a source that can only be read in order (an HTTP server without
    ranges, a download being hashed), which then take the same streaming or spooling path as compressed data.
    """

    def __init__(self, source: Source, kind: str | None) -> None:
        self.source = source
        self.kind = kind
        self._raw = SourceReader(source)
        buffered = io.BufferedReader(self._raw, buffer_size=1024 * 1024)
        self._reader: BinaryIO
        self._errors = _STREAM_ERRORS
        if kind is None:
            self._reader = buffered
        elif kind == GZIP:
            from isal import igzip

            self._errors += inflate_errors()
            self._reader = igzip.IGzipFile(fileobj=buffered, mode="rb")  # type: ignore[no-untyped-call,assignment]
        elif kind == XZ:
            import lzma

            from diskport.sources import xz

            self._errors += (lzma.LZMAError,)
            # Multi-block files decode on every core; the rest through the standard, sequential decoder.
            parallel = xz.parallel_reader(source)
            self._reader = (parallel if parallel is not None  # type: ignore[assignment]
                            else lzma.LZMAFile(buffered))  # noqa: SIM115 - closed in close()
        elif kind == BZIP2:
            import bz2

            self._reader = bz2.BZ2File(buffered)  # type: ignore[assignment]
        elif kind == ZSTD:
            import zstandard

            self._errors += (zstandard.ZstdError,)
            self._reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
        else:
            raise UnsupportedImage(f"unknown compression '{kind}'", path=source.name)
        self.position = 0

    @property
    def label(self) -> str:
        """How messages name this stream: "the gzip stream", or the reason a plain source is read in order."""
        return f"the {self.kind} stream" if self.kind else (self.source.sequential_reason or "the data, in order")


    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` as far as the stream goes; fewer bytes only at its end."""
        done = 0
        try:
            while done < len(buf):
                n = self._reader.readinto(buf[done:])  # type: ignore[attr-defined]
                if not n:
                    break
                done += n
        except self._errors as e:
            # The decoder has decoded more than it handed out (its buffers, and a CRC or length checked only at
            # the end of a member), so the decompressed count is a lower bound; the compressed position, read
            # ahead by at most the 1 MiB buffer, says where in the file the decoder stopped.
            at, total, out = self._raw.pos, self.source.size, self.position + done
            what = (f"{self.kind} data fails its end-of-member check, so it is damaged somewhere before "
                    f"compressed byte {at} of {total} (at least {out} bytes were decompressed)"
                    if _is_end_check(e) else
                    f"{self.kind or 'the'} data is damaged at about compressed byte {at} of {total} (after at least "
                    f"{out} decompressed bytes)")
            raise CorruptImage(f"{what}: {e}", path=self.source.name, fmt=self.kind) from None
        self.position += done
        return done

    def close(self) -> None:
        self._reader.close()
