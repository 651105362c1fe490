"""The :class:`Source` contract shared by every byte source."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from types import TracebackType

from diskport.errors import CorruptImage, UnsafeImage


class Source(ABC):
    """Random-access bytes with a known size.

    ``name`` is what error messages call the source (a path or URL). ``pread`` never returns more than asked
    and returns fewer bytes only at the end of the source; :meth:`read_exact` turns a short read into a
    :class:`~diskport.errors.CorruptImage` naming the offset, which is what a reader wants for metadata.
    """

    name: str
    size: int
    #: False for a sequential source whose length nobody declared (an HTTP body without Content-Length):
    #: ``size`` is then only an upper bound, and reads end early where the data ends.
    size_known: bool = True
    #: True for a source that can only be read front to back (an HTTP server without ranges), and why.
    sequential: bool = False
    sequential_reason: str = ""

    @abstractmethod
    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at end of source)."""

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns the count read (short only at end of source)."""
        data = self.pread(offset, len(buf))
        buf[: len(data)] = data
        return len(data)

    def read_exact(self, offset: int, length: int, what: str, fmt: str | None = None) -> bytes:
        """Exactly ``length`` bytes of ``what`` at ``offset``, else a CorruptImage that says so."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptImage(
                f"{what} at {offset:#x}+{length:#x} lies beyond the end of the file ({self.size} bytes)",
                path=self.name, fmt=fmt)
        data = self.pread(offset, length)
        if len(data) != length:
            raise CorruptImage(f"{what} is truncated ({len(data)} of {length} bytes)",
                               path=self.name, fmt=fmt, offset=offset)
        return data

    def allocated_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """``(start, length, is_data)`` runs over ``[offset, offset+length)``.

        Sources that know where holes are (sparse files via SEEK_DATA/SEEK_HOLE) report them; the default is
        one data run, which is always correct.
        """
        if length > 0:
            yield offset, length, True

    @property
    def is_block_device(self) -> bool:
        return False

    def open_relative(self, name: str, what: str) -> Source:
        """Open a file that this image names (a VMDK extent), confined to the image's own folder.

        Sources that are not local files cannot follow such references.
        """
        raise UnsafeImage(f"refers to {what} '{name}', which cannot be opened next to a non-local source",
                          path=self.name)

    def allocated_bytes(self) -> int | None:
        """Bytes the source occupies on its storage, when known (for ``actual-size``)."""
        return None

    def prefer_exact_reads(self) -> None:  # noqa: B027 - optional hook
        """The reader will read scattered metadata, not stream the disk: a source that reads ahead (HTTP's
        pipeline of large ranges) fetches what is asked for instead. Guest inspection says this."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the source's resources."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class ReadintoSource(Source):
    """A source that implements :meth:`readinto`; ``pread`` is derived from it."""

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(max(0, min(length, self.size - offset)))
        n = self.readinto(offset, memoryview(buf))
        return bytes(buf[:n])

    @abstractmethod
    def readinto(self, offset: int, buf: memoryview) -> int: ...


class HeadSource(Source):
    """The first bytes of a stream, as a source for probes: reads past them return nothing."""

    def __init__(self, name: str, head: bytes) -> None:
        self.name = name
        self.head = head
        self.size = len(head)

    def pread(self, offset: int, length: int) -> bytes:
        return self.head[offset: offset + length]


class SliceSource(ReadintoSource):
    """``size`` bytes of ``parent`` from ``offset``: a file inside an uncompressed archive, read in place.

    It owns ``parent`` (closing the slice closes it) and keeps its random access: a qcow2 inside an
    uncompressed tar layer on a registry is read with ranged requests, like one at a URL.
    """

    def __init__(self, parent: Source, offset: int, size: int, name: str | None = None) -> None:
        if offset < 0 or size < 0 or offset + size > parent.size:
            raise CorruptImage(f"a member at {offset}+{size} lies beyond the end ({parent.size} bytes)",
                               path=parent.name)
        self.parent = parent
        self.offset = offset
        self.size = size
        self.name = name or parent.name
        self.sequential = parent.sequential
        self.sequential_reason = parent.sequential_reason

    def readinto(self, offset: int, buf: memoryview) -> int:
        n = min(len(buf), self.size - offset)
        return self.parent.readinto(self.offset + offset, buf[:n]) if n > 0 else 0

    def allocated_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        for start, run, data in self.parent.allocated_extents(self.offset + offset, length):
            yield start - self.offset, run, data

    def prefer_exact_reads(self) -> None:
        self.parent.prefer_exact_reads()

    def close(self) -> None:
        self.parent.close()
