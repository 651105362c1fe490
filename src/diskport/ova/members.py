"""The sources an OVA's disks are read through: a member borrowed from the package's source, chunked files
joined into one, and a member read in place that is hashed by the reads that convert it."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

from diskport.errors import CorruptImage
from diskport.sources.base import ReadintoSource, SliceSource, Source


class _Borrowed(SliceSource):
    """A member read in place; the package owns (and closes) the OVA's source."""

    def close(self) -> None:
        pass


class ConcatSource(ReadintoSource):
    """The parts of a chunked OVF file (``disk.vmdk.000000000``, ``.000000001``, ...) as one file."""

    def __init__(self, parts: list[Source], name: str) -> None:
        self.parts = parts
        self.name = name
        self.starts: list[int] = []
        total = 0
        for part in parts:
            self.starts.append(total)
            total += part.size
        self.size = total
        self.sequential = any(p.sequential for p in parts)
        self.sequential_reason = next((p.sequential_reason for p in parts if p.sequential), "")

    def readinto(self, offset: int, buf: memoryview) -> int:
        done = 0
        for part, start in zip(self.parts, self.starts, strict=True):
            if done == len(buf):
                break
            pos = offset + done
            if pos >= start + part.size or pos < start:
                continue
            n = min(len(buf) - done, start + part.size - pos)
            got = part.readinto(pos - start, buf[done: done + n])
            done += got
            if got < n:
                break
        return done

    def close(self) -> None:
        for part in self.parts:
            part.close()


class InPlaceDigest(ReadintoSource):
    """A member read in place (random access), hashed by the very reads that convert it, where they run on in
    order from the member's start; :meth:`finish` reads only what they did not cover.

    For a raw member (and any format the engine reads front to back) that is nothing: every byte is read once.
    For a sparse format (qcow2, monolithicSparse VMDK, VHDX, VDI) the conversion reads metadata out of order and
    skips unallocated clusters, so the digest stops at the first jump and the rest of the member is read a
    second time before commit; the package's summary says how many bytes (``reread``). Unlike
    :class:`~diskport.sources.checksum.ChecksumSource` it never reads ahead to fill a gap (that would read a
    sparse member's clusters twice, out of order) and it keeps the member's random access."""

    def __init__(self, inner: Source, algo: str, expected: str) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.sequential = inner.sequential
        self.sequential_reason = inner.sequential_reason
        self.algo = algo
        self.expected = expected
        self.hash = hashlib.new(algo)
        self.hashed = 0
        self.reread = 0
        self._lock = threading.Lock()

    def readinto(self, offset: int, buf: memoryview) -> int:
        n = self.inner.readinto(offset, buf)
        with self._lock:
            if offset <= self.hashed < offset + n:
                self.hash.update(buf[self.hashed - offset: n])
                self.hashed = offset + n
        return n

    def allocated_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        return self.inner.allocated_extents(offset, length)

    def prefer_exact_reads(self) -> None:
        self.inner.prefer_exact_reads()

    def finish(self) -> str:
        """The digest of the whole member: what the conversion left unread is read now."""
        buf = memoryview(bytearray(1 << 20))
        with self._lock:
            while self.hashed < self.size:
                n = self.inner.readinto(self.hashed, buf[: min(len(buf), self.size - self.hashed)])
                if n == 0:
                    raise CorruptImage(f"the member ends after {self.hashed} bytes", path=self.name, fmt="ova")
                self.hash.update(buf[:n])
                self.hashed += n
                self.reread += n
            return self.hash.hexdigest()

    def close(self) -> None:
        self.inner.close()
