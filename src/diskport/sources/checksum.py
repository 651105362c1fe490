"""Verifying a download: a source wrapper that hashes every byte once, in order, as it is read.

A checksum is over the file as published, so every byte must pass through the hash in order. Wrapping a source
in :class:`ChecksumSource` makes it ``sequential``: the opener then reads it front to back (streaming or
spooling, as for a compressed file), and :meth:`ChecksumSource.verify` hashes whatever the reader did not need
(trailing metadata) before comparing. The destination is renamed into place only after that.
"""

from __future__ import annotations

import hashlib
import hmac

from diskport.errors import SourceError, UsageError
from diskport.sources.base import ReadintoSource, Source

ALGORITHMS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
CHUNK = 8 * 1024 * 1024


def parse_checksum(text: str) -> tuple[str, str]:
    """``ALGO:HEX`` -> (algo, hex), checked for a known algorithm and the right number of hex digits."""
    algo, sep, digest = text.partition(":")
    algo = algo.strip().lower()
    digest = digest.strip().lower()
    if not sep or algo not in ALGORITHMS:
        raise UsageError(f"--checksum takes ALGO:HEX with ALGO one of {', '.join(ALGORITHMS)}, not '{text}'")
    if len(digest) != ALGORITHMS[algo] or any(c not in "0123456789abcdef" for c in digest):
        raise UsageError(f"a {algo} checksum is {ALGORITHMS[algo]} hexadecimal digits, not '{digest}'")
    return algo, digest


class ChecksumSource(ReadintoSource):
    sequential = True

    def __init__(self, inner: Source, algo: str, expected: str) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.algo = algo
        self.expected = expected
        self.hash = hashlib.new(algo)
        self.hashed = 0
        self.sequential_reason = "the download (--checksum reads every byte in order)"

    def _hash_up_to(self, end: int) -> None:
        """Hash the bytes from ``hashed`` to ``end`` that no reader asked for."""
        buf = bytearray(CHUNK)
        while self.hashed < end:
            n = self.inner.readinto(self.hashed, memoryview(buf)[: min(CHUNK, end - self.hashed)])
            if n == 0:
                break
            self.hash.update(memoryview(buf)[:n])
            self.hashed += n

    def readinto(self, offset: int, buf: memoryview) -> int:
        if offset > self.hashed:
            self._hash_up_to(offset)
        n = self.inner.readinto(offset, buf)
        end = offset + n
        if end > self.hashed:
            self.hash.update(buf[self.hashed - offset: n])
            self.hashed = end
        return n

    def verify(self) -> None:
        self._hash_up_to(self.size)
        actual = self.hash.hexdigest()
        if not hmac.compare_digest(actual, self.expected):
            raise SourceError(f"{self.algo} checksum mismatch: expected {self.expected}, downloaded file has "
                              f"{actual}", path=self.name, hint="nothing was written; check the URL and checksum")

    def close(self) -> None:
        self.inner.close()
