"""Spooling: a forward-only stream copied into a scratch file so a random-access reader can work on it.

The scratch file is unlinked the moment it is created (``tempfile.TemporaryFile``), so the kernel removes it on
every exit path, a crash or SIGKILL included; nothing is ever left in the scratch folder. Zero blocks are not
written (the scratch file is sparse), and the copy is bounded by ``limit`` so a decompression bomb is refused
after at most ``limit`` bytes rather than filling the disk.
"""

from __future__ import annotations

import os

from diskport.cache import pwrite_cached
from diskport.errors import DestinationError, UnsafeImage
from diskport.sources.file import FileSource
from diskport.sources.stream import DecompressingStream

CHUNK = 8 * 1024 * 1024


def spool(stream: DecompressingStream, head: bytes, scratch_dir: str, limit: int, what: str) -> FileSource:
    """Copy ``head`` (already read from the stream) and the rest of ``stream`` into an unlinked scratch file."""
    import tempfile  # imported when a spool is made, not by every command that could make one

    from diskport.zeros import zero_runs  # numpy: only a spool scans for zeros

    try:
        handle = tempfile.TemporaryFile(prefix=".diskport-spool-", dir=scratch_dir)  # noqa: SIM115 - closed below
    except OSError as e:
        raise DestinationError(f"cannot create a scratch file: {e.strerror}", path=scratch_dir) from None
    fd = handle.fileno()
    try:
        os.pwrite(fd, head, 0)
        pos = len(head)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = stream.readinto(view)
            if not n:
                break
            if pos + n > limit:
                raise UnsafeImage(f"holds more than {limit} bytes, more than {what} allows"
                                  + (" (decompression bomb?)" if stream.kind else ""),
                                  path=stream.source.name, fmt=stream.kind)
            for a, b, is_zero in zero_runs(view[:n], pos, 4096):
                if not is_zero:
                    pwrite_cached(fd, view[a:b], pos + a)
            pos += n
        os.ftruncate(fd, pos)
        source = FileSource.from_fd(os.dup(fd), f"{stream.source.name} (spooled)")
    except OSError as e:
        raise DestinationError(f"writing the scratch file failed: {e.strerror}", path=scratch_dir) from None
    finally:
        handle.close()
    return source
