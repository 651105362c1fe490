"""Local files and block devices as a :class:`Source`, read with ``os.pread``.

Sparse files report their holes through ``SEEK_DATA``/``SEEK_HOLE`` so a raw image converts without reading
its holes; block devices take their size from seeking to the end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Iterator

from diskport.errors import SourceError, UnsafeImage
from diskport.sources.base import Source


def folder_message(path: str) -> str:
    """What to say when a folder is given as an image: the ``.ovf`` to name when it holds an unpacked appliance,
    else that it holds none (and which disk files it does hold)."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        names = []
    ovfs = [n for n in names if n.lower().endswith(".ovf")]
    if ovfs:
        return f"is a folder, not a disk image; name its descriptor: {', '.join(os.path.join(path, n) for n in ovfs)}"
    disks = [n for n in names if re.search(r"\.(vmdk|qcow2|vhdx?|vdi|img|raw|iso|ova)(\.\d{9})?$", n, re.I)]
    if disks:
        shown = ", ".join(disks[:5]) + (f" and {len(disks) - 5} more" if len(disks) > 5 else "")
        return (f"is a folder, not a disk image; it holds no .ovf descriptor, so name a disk file ({shown}) or "
                "the appliance's .ovf")
    return "is a folder, not a disk image"


class FileSource(Source):
    def __init__(self, path: str | os.PathLike[str], *, fd: int | None = None) -> None:
        self.name = os.fspath(path)
        if fd is not None:
            self._fd = fd
        else:
            try:
                self._fd = os.open(self.name, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise SourceError("no such file", path=self.name) from None
            except IsADirectoryError:
                raise SourceError(folder_message(self.name), path=self.name) from None
            except OSError as e:
                raise SourceError(f"cannot open: {e.strerror}", path=self.name) from None
        st = os.fstat(self._fd)
        self._block = stat.S_ISBLK(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            os.close(self._fd)
            raise SourceError(folder_message(self.name), path=self.name)
        self.size = os.lseek(self._fd, 0, os.SEEK_END) if self._block else st.st_size
        self._blocks = st.st_blocks
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    @classmethod
    def from_fd(cls, fd: int, name: str) -> FileSource:
        """A source over an open descriptor (which it takes ownership of), e.g. an unlinked scratch file."""
        return cls(name, fd=fd)

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def is_block_device(self) -> bool:
        return self._block

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as e:
            raise SourceError(f"read of {length} bytes at {offset:#x} failed: {e.strerror}",
                              path=self.name) from None

    def readinto(self, offset: int, buf: memoryview) -> int:
        done = 0
        total = len(buf)
        try:
            while done < total:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
                if n == 0:
                    break
                done += n
        except OSError as e:
            raise SourceError(f"read of {total} bytes at {offset:#x} failed: {e.strerror}",
                              path=self.name) from None
        return done

    def allocated_bytes(self) -> int | None:
        return None if self._block else self._blocks * 512

    def allocated_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        end = min(offset + length, self.size)
        if self._block:
            yield from super().allocated_extents(offset, end - offset)
            return
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from pos to EOF
                    yield pos, end - pos, False
                    return
                # Filesystem without SEEK_DATA: everything is data.
                yield pos, end - pos, True
                return
            if data > pos:
                hole_end = min(data, end)
                yield pos, hole_end - pos, False
                pos = hole_end
                if pos >= end:
                    return
            try:
                hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(hole, end)
            if hole <= pos:  # defensive: never loop without progress
                hole = end
            yield pos, hole - pos, True
            pos = hole

    def open_relative(self, name: str, what: str) -> Source:
        """Open ``name`` from this file's folder; absolute paths, ``..``, URLs and symlinks that leave the
        folder are refused as external references."""
        folder = os.path.dirname(os.path.abspath(self.name))
        if (not name or os.path.isabs(name) or "://" in name or "\0" in name
                or any(part == ".." for part in name.replace("\\", "/").split("/"))):
            raise UnsafeImage(f"refers to {what} '{name}' outside its own folder; diskport only opens files "
                              "beside the image", path=self.name)
        target = os.path.join(folder, name)
        real_folder = os.path.realpath(folder)
        real = os.path.realpath(target)
        if os.path.commonpath([real_folder, real]) != real_folder:
            raise UnsafeImage(f"refers to {what} '{name}', a link that leaves the image's folder",
                              path=self.name)
        if not os.path.exists(real):
            raise SourceError(f"{what} '{name}' is missing (looked in {folder})", path=self.name)
        # Only a regular file: a named pipe (which an unpacked tar can leave beside the image) would block open()
        # forever, and a device node there is not part of the image. O_NONBLOCK keeps even that open from waiting.
        try:
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            raise SourceError(f"cannot open {what} '{name}': {e.strerror}", path=self.name) from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode)
                    else "a folder" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
            raise UnsafeImage(f"names {what} '{name}', which is {kind}; only regular files beside the image are read",
                              path=self.name)
        os.set_blocking(fd, True)
        return FileSource(real, fd=fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
