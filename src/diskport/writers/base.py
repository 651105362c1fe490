"""The :class:`Writer` contract the engine drives."""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from diskport.cache import PAGE_CACHE_WRITE
from diskport.errors import DestinationError

if TYPE_CHECKING:
    from diskport.cache import WriteBehind

DIRECT_ALIGN = 4096


def _aligned(view: memoryview) -> bool:
    """Whether ``view``'s memory starts on a :data:`DIRECT_ALIGN` boundary (only writable memory can be: the
    engine's windows are page-aligned mappings; bytes objects never are, their data follows a header)."""
    if view.readonly or not view:
        return False
    import ctypes  # only O_DIRECT jobs get here

    return not ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN


class Writer(ABC):
    """Receives the guest disk in ascending offset order: ``write`` for data, ``write_zeros`` for zero runs.

    ``zero_granularity`` is the size and alignment at which the engine should look for zero blocks inside data
    (4 KiB for a sparse raw file, the cluster size for qcow2). A writer may be created without the virtual size
    (a decompressed stream learns it at its end); ``finish`` receives it. ``abort`` stops after a failure.
    """

    zero_granularity: int = 4096
    #: Set by subclasses: the open target, its name for messages, the format written.
    fd: int
    name: str
    fmt: str | None = None
    #: The same target opened with O_DIRECT, or -1 (see :mod:`diskport.destination`).
    direct_fd: int = -1
    #: With ``--cache writeback``: keeps what goes through ``fd`` within a window (see :mod:`diskport.cache`).
    behind: WriteBehind | None = None
    _written: int = 0

    def _pwrite(self, data: memoryview | bytes, offset: int) -> None:
        """Write all of ``data`` at ``offset``; a failure (disk full) is a DestinationError naming the target.

        Writes whose offset, length and memory are 4 KiB aligned go through the O_DIRECT descriptor when there
        is one; the rest (metadata, edges) through the page cache, in pieces of at most
        :data:`~diskport.cache.PAGE_CACHE_WRITE` (large page-cache writes are slow on fresh memory). The kernel
        keeps the two coherent. What goes through the page cache is reported to :attr:`behind` when there is one.
        """
        view = memoryview(data).cast("B")
        fd = self.fd
        if self.direct_fd >= 0 and not (offset | len(view)) % DIRECT_ALIGN and _aligned(view):
            fd = self.direct_fd
        try:
            while view:
                try:
                    n = os.pwrite(fd, view if fd == self.direct_fd else view[:PAGE_CACHE_WRITE], offset)
                except OSError as e:
                    if fd != self.direct_fd or e.errno != errno.EINVAL:
                        raise
                    # The device wants a stricter alignment than 4 KiB: use the page cache from now on.
                    self.direct_fd = -1
                    fd = self.fd
                    continue
                if fd == self.fd and self.behind is not None:
                    self.behind.wrote(offset, n)
                view = view[n:]
                offset += n
                self._written += n
        except OSError as e:
            raise DestinationError(f"write at {offset:#x} failed: {e.strerror}", path=self.name,
                                   fmt=self.fmt) from None

    def _flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise DestinationError(f"flush failed: {e.strerror}", path=self.name, fmt=self.fmt) from None

    @abstractmethod
    def write(self, offset: int, data: memoryview | bytes) -> None: ...

    @abstractmethod
    def write_zeros(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def finish(self, virtual_size: int) -> None:
        """Complete the target; ``virtual_size`` is final here even when it was unknown at the start."""

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Stop writing after a failure; the target will be removed by the caller."""

    @property
    def bytes_written(self) -> int:
        """Bytes of the target file written so far (data, metadata)."""
        return self._written
