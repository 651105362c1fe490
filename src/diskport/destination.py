"""Where output goes: a new file written beside its final name and renamed at the end, or a block device.

:class:`Destination` is a context manager. On a clean exit the temporary file is flushed and renamed over the
final name (and the folder synced); on any exception, including ``KeyboardInterrupt`` and the
:class:`~diskport.signals.Interrupted` raised for SIGTERM, the temporary file is removed, so a failed job leaves
neither a half-written destination nor scratch behind. A block device is written in place: it cannot be
renamed, and it is checked to be large enough before anything is written.

The job's page-cache policy (``cache``: ``auto``, ``writeback`` or ``none``) is decided as the target is opened,
by :func:`diskport.cache.decide`, and kept in :attr:`Destination.policy`. With ``none``, beside the ordinary
descriptor ``fd``, :attr:`Destination.direct_fd` is the same file opened with ``O_DIRECT`` where the filesystem
or device allows it (-1 where not). Writers send aligned bulk data through it: it bypasses the page cache, so
converting a disk does not fill memory with gigabytes of output (in a Kubernetes pod the page cache counts
against the memory limit) and, on the machines measured, writes faster than the page cache can take fresh
pages. qemu-img offers the same as ``-t none``; ovirt-imageio does it by default. With ``writeback`` there is no
``O_DIRECT`` descriptor and :attr:`Destination.behind` bounds what the page cache holds of the output.

**Leftovers of a killed job.** SIGKILL (an OOM kill, a pod past its grace period) runs no cleanup, and a part
file the size of the disk left beside DST would make every later run fail for lack of space. So the part file's
name records the process id (``.DST.<pid>.<random>.diskport-part``) and the live job holds an exclusive
``flock`` on it. Before it creates its own, a job for DST removes the part files of earlier jobs for the same
DST: only names of exactly that form, regular files of this user, whose recorded process is gone (or is this
very process id, as after a container restart where every job is pid 1), and only after taking the lock
itself -- so the file of a job that is still running, here or (where the filesystem shares locks) on another
host, is never touched. Output staged under a part name and renamed later (``make_part_file``: the disks of
an OVA, renamed together once every manifest check has passed) is named and cleaned the same way, and a part
file's own part file (its writer's) goes with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import tempfile
from dataclasses import replace
from types import TracebackType

from diskport.cache import MODES, BackgroundWriteback, CachePolicy, WriteBehind, decide
from diskport.errors import DestinationError, UsageError

PART_SUFFIX = ".diskport-part"


def _part_pattern(base: str) -> re.Pattern[str]:
    """The names :class:`Destination` gives the part files of ``base`` (mkstemp's 8 random characters)."""
    return re.compile(rf"\.{re.escape(base)}\.(\d+)\.[a-z0-9_]{{8}}{re.escape(PART_SUFFIX)}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_parts(path: str, *, folders: bool = False) -> list[str]:
    """Remove the part files that killed jobs left for the destination ``path`` (see the module docstring);
    the names removed. With ``folders``, part folders (an OCI layout being written) are what is looked for."""
    folder = os.path.dirname(os.path.abspath(path))
    pattern = _part_pattern(os.path.basename(path))
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _process_alive(pid):
            continue
        candidate = os.path.join(folder, name)
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            kind_ok = stat.S_ISDIR(st.st_mode) if folders else stat.S_ISREG(st.st_mode)
            if not kind_ok or st.st_uid != os.getuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its job is alive and holds it
            if os.lstat(candidate).st_ino != st.st_ino:
                continue
            if folders:
                import shutil  # logging and shutil only when a stale part is removed: not on every job

                shutil.rmtree(candidate)  # does not follow links inside it
            else:
                os.unlink(candidate)
                # A part file may itself have been a destination (a disk staged by export.write_disks): what
                # its own writer left beside it is as dead.
                removed.extend(remove_stale_parts(candidate))
            removed.append(name)
            import logging

            logging.getLogger(__name__).info("removed %s, left by an earlier job that was killed", candidate)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def make_part_folder(path: str) -> tuple[str, int]:
    """A part folder beside ``path`` named and locked as part files are (``.NAME.<pid>.<random>.diskport-part``),
    after removing what killed jobs left for it; the folder and the descriptor holding its lock (close it when
    the folder is renamed or removed)."""
    remove_stale_parts(path, folders=True)
    folder = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=PART_SUFFIX,
                              dir=os.path.dirname(os.path.abspath(path)))
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return folder, fd


def make_part_file(path: str) -> tuple[str, int]:
    """An empty part file beside ``path``, named and locked as :class:`Destination`'s are, after removing what
    killed jobs left for it: for output that is written under this name first and renamed to ``path`` later
    (several disks staged until every check has passed). The name and the descriptor holding its lock; after
    writing to the name (a rename replaces the locked inode), call :func:`relock` with it. A missing folder is
    a :class:`DestinationError`, as for :class:`Destination`."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DestinationError(f"folder {folder} does not exist", path=path)
    remove_stale_parts(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=PART_SUFFIX,
                                    dir=folder)
    except OSError as e:
        raise DestinationError(f"cannot create a file beside the destination: {e.strerror}", path=path) from None
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return name, fd


def relock(name: str, fd: int) -> int:
    """The lock of a part file moved to the file now at ``name`` (its first inode was replaced by a rename);
    the new descriptor (``fd`` is closed once the new one is open; on failure it is left to the caller)."""
    try:
        new = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise DestinationError(f"cannot reopen the staged file: {e.strerror}", path=name) from None
    with contextlib.suppress(OSError):
        fcntl.flock(new, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    return new


def refuse_existing(path: str, force: bool) -> None:
    """An existing file at ``path`` is replaced only with ``force``; a block device is written in place.

    :class:`Destination` checks this as it opens; commands call it first too, so the user hears it before a
    download or a conversion starts.
    """
    if force or not os.path.exists(path) or os.path.isdir(path) or is_block_device(path):
        return
    raise UsageError("already exists; pass --force to replace it", path=path)


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _open_direct(path: str) -> int:
    """``path`` opened for O_DIRECT writes, or -1 where the filesystem refuses it (tmpfs, some FUSE)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Destination:
    def __init__(self, path: str | os.PathLike[str], *, force: bool = False, size: int | None = None,
                 cache: str = "auto", sync: bool = False) -> None:
        if cache not in MODES:
            raise UsageError(f"unknown cache mode '{cache}' (choose from {', '.join(MODES)})")
        self.path = os.fspath(path)
        self.force = force
        self.size = size
        self.cache = cache
        #: The job flushes the output at its end: writeback through the page cache is started as it goes.
        self.sync = sync
        self.fd = -1
        self.direct_fd = -1
        self.tmp_path: str | None = None
        self.block_device = False
        #: Decided in ``__enter__``; what ``-v`` and JSON report.
        self.policy = CachePolicy("none", "not opened yet")
        self.behind: WriteBehind | None = None

    def _apply_policy(self, path: str) -> None:
        self.policy = decide(self.cache, block_device=self.block_device, size=self.size)
        if self.policy.mode == "none":
            self.direct_fd = _open_direct(path)
        elif self.policy.window:
            self.behind = WriteBehind(self.fd, self.policy.window)
        elif self.sync:
            self.behind = BackgroundWriteback(self.fd)
            self.policy = replace(self.policy, reason=f"{self.policy.reason}; writeback started as data is "
                                                      "written, since the job flushes at its end")

    def __enter__(self) -> Destination:
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise DestinationError(f"cannot use destination: {e.strerror}", path=self.path) from None
        if st is not None and stat.S_ISBLK(st.st_mode):
            self._open_block_device()
            return self
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise DestinationError("is a folder; name the file to write", path=self.path)
        refuse_existing(self.path, self.force)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise DestinationError(f"folder {folder} does not exist", path=self.path)
        remove_stale_parts(self.path)
        try:
            self.fd, self.tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.{os.getpid()}.",
                                                      suffix=PART_SUFFIX, dir=folder)
            with contextlib.suppress(OSError):  # says "alive" to another job's cleanup (which, where locks
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fail, removes nothing)
            os.fchmod(self.fd, 0o666 & ~_umask())
        except OSError as e:
            raise DestinationError(f"cannot create a file beside the destination: {e.strerror}",
                                   path=self.path) from None
        self._apply_policy(self.tmp_path)
        return self

    def _open_block_device(self) -> None:
        self.block_device = True
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DestinationError(f"cannot open block device: {e.strerror}", path=self.path) from None
        device_size = os.lseek(self.fd, 0, os.SEEK_END)
        if self.size is not None and device_size < self.size:
            os.close(self.fd)
            self.fd = -1
            raise DestinationError(f"block device holds {device_size} bytes; the disk needs {self.size}",
                                   path=self.path)
        self._apply_policy(self.path)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def _close(self) -> None:
        if self.behind is not None:
            self.behind.close()
            self.behind = None
        for fd in (self.direct_fd, self.fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.direct_fd = -1

    def commit(self) -> None:
        self._close()
        if self.tmp_path is not None:
            try:
                os.replace(self.tmp_path, self.path)
            except OSError as e:
                self.discard()
                raise DestinationError(f"cannot rename the finished file into place: {e.strerror}",
                                       path=self.path) from None
            self.tmp_path = None
            with contextlib.suppress(OSError):
                dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)

    def discard(self) -> None:
        self._close()
        if self.tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)
            self.tmp_path = None
