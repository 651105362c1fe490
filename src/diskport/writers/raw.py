"""Raw writer: a sparse file, or a block device.

In a new regular file zero runs are simply not written: the file is sized up front with ``ftruncate`` so they
stay holes (qemu-img's default sparse detection works at 4 KiB; so does this). A block device may hold old data,
so its zero runs are zeroed with ``BLKZEROOUT`` (which lets the device discard or write zeros itself) or, where
that is refused, by writing zeros; they are never skipped.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct

from diskport.errors import DestinationError
from diskport.writers.base import Writer

BLKZEROOUT = 0x127F  # _IO(0x12, 127), linux/fs.h
_ZERO_CHUNK = 4 * 1024 * 1024


class RawWriter(Writer):
    zero_granularity = 4096

    def __init__(self, fd: int, size: int | None, *, name: str, block_device: bool = False,
                 sync: bool = False, direct_fd: int = -1) -> None:
        self.fd = fd
        self.direct_fd = direct_fd
        self.sync = sync or block_device
        self.size = size
        self.name = name
        self.block_device = block_device
        self._zero_buf: mmap.mmap | None = None
        self._zeroout = block_device
        if not block_device and size is not None:
            self._truncate(size)

    def _truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise DestinationError(f"cannot size the file to {size} bytes: {e.strerror}", path=self.name) from None

    def write(self, offset: int, data: memoryview | bytes) -> None:
        self._pwrite(data, offset)

    def write_zeros(self, offset: int, length: int) -> None:
        if not self.block_device or length <= 0:
            return
        if self._zeroout:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError as e:
                if e.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise DestinationError(f"zeroing {length} bytes at {offset:#x} failed: {e.strerror}",
                                           path=self.name) from None
                self._zeroout = False
        if self._zero_buf is None:
            self._zero_buf = mmap.mmap(-1, _ZERO_CHUNK)  # page aligned, so it can go out through O_DIRECT
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self.write(offset, memoryview(self._zero_buf)[:n])
            offset += n

    def finish(self, virtual_size: int) -> None:
        if not self.block_device and virtual_size != self.size:
            self._truncate(virtual_size)
        if self.sync:
            self._flush()
