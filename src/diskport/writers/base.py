"""The :class:`Writer` contract the engine drives."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

from diskport.errors import DestinationError


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
    _written: int = 0

    def _pwrite(self, data: memoryview | bytes, offset: int) -> None:
        """Write all of ``data`` at ``offset``; a failure (disk full) is a DestinationError naming the target."""
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
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
