"""The page-cache policy of a job that writes a disk: ``--cache auto|writeback|none``, named like qemu-img's ``-t``.

* ``none``: bulk data goes out with ``O_DIRECT`` (aligned writes; metadata and edges through the page cache).
  Nothing of the output stays in memory, which is right inside a memory-limited pod (the page cache counts
  against its limit) and where fresh pages are slow to get.
* ``writeback``: everything through the page cache, which is fastest when the kernel hands out just-freed pages
  (a busy host, a workstation). Still bounded: :class:`WriteBehind` starts writeback of every
  :data:`KICK_BYTES` written (``sync_file_range(SYNC_FILE_RANGE_WRITE)``), and once more than the window is in
  flight it waits for the oldest range and drops it from the cache (``posix_fadvise(POSIX_FADV_DONTNEED)``), so
  the output's dirty and cached pages never exceed the window. Under a cgroup memory limit the window is half
  the limit's headroom and a quarter of the limit at most; without a limit, a quarter of MemAvailable
  (:data:`MIN_WINDOW` to :data:`MAX_WINDOW`). When ``auto`` chose writeback and there is no cgroup limit, there
  is no write-behind at all (window 0): the output is at most half of MemAvailable, the kernel's own dirty
  limits throttle the dirty part and the clean part is reclaimable, so the job runs as ``qemu-img -t
  writeback`` does, with no flushing in its way. A job that flushes at its end (import, ``--sync``) has its
  writeback started as it goes instead, on a thread of its own (:class:`BackgroundWriteback`), so that the
  disk writes while the job converts and the final flush finds little left: measured on raw -> qcow2 of 1 GiB
  of data, the job to stable storage in 0.46-0.53 s against 0.72-0.84 s for writing, then flushing.
* ``auto`` (the default): ``writeback`` when all of these hold, else ``none``:

  - the target is a regular file (a block device always gets ``none``);
  - the output's size is known and at most **half of the cgroup memory limit** (cgroup v2 ``memory.max`` of the
    process's cgroup from ``/proc/self/cgroup``, or v1 ``memory.limit_in_bytes``; the smallest limit on the way
    up to the root counts), or there is no limit;
  - the output's size is at most **half of MemAvailable** (``/proc/meminfo``).

  The output's size is the disk's virtual size, an upper bound of what is written. A stream whose size is
  learnt only at its end (a compressed raw image) gets ``none``.

Whatever the mode, ``--sync`` (and import, which always syncs) flushes the output to stable storage with
``fdatasync`` before success. The decision reads files under ``proc`` and ``sys`` roots, which tests point at
fake trees.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diskport.units import human_size

if TYPE_CHECKING:
    import ctypes

# ctypes (whose util module imports subprocess, tempfile and shutil) is imported by the function that uses it:
# the spool imports this module, and reading a local file must not pay for it. The cgroup and /proc files are
# named with os.path, not pathlib (whose import, with urllib.parse and ipaddress, costs a job 3-4 ms).

MODES = ("auto", "writeback", "none")
#: A cgroup limit at or above this means "no limit" (v1 writes 2**63 rounded down to the page size).
_UNLIMITED = 1 << 60
#: Writeback is started every KICK_BYTES written.
KICK_BYTES = 16 * 1024 * 1024
MIN_WINDOW = 64 * 1024 * 1024
#: What goes through the page cache is written in pieces of at most this size. Measured here (kernel 6.18, ext4,
#: ``dd`` of 1 GiB): once the memory a deleted output freed has gone back to the host, writes of 1 MiB or more
#: cost 2.0-3.4 s of system time, writes of 32-768 KiB 0.28-0.5 s; just after the delete both cost 0.33-0.40 s.
#: diskport's 8 MiB windows, written whole, made ``--cache writeback`` 5x slower than qemu-img, which writes
#: smaller pieces. The extra system calls cost nothing measurable.
PAGE_CACHE_WRITE = 512 * 1024
MAX_WINDOW = 1024 * 1024 * 1024


@dataclass(frozen=True)
class CachePolicy:
    """The mode chosen (``writeback`` or ``none``), why, and for writeback the most of the output kept in memory
    (``window``; 0: no write-behind, the kernel's dirty limits alone)."""

    mode: str
    reason: str
    window: int = 0

    def line(self) -> str:
        """What ``-v`` prints."""
        return f"cache: {self.mode} ({self.reason})"

    def to_json(self) -> dict[str, str]:
        return {"mode": self.mode, "reason": self.reason}


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _limit_value(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _UNLIMITED else None


def _walk_up(mount: str, cgroup_path: str, name: str) -> tuple[int | None, int | None]:
    """The smallest limit in file ``name`` from the cgroup up to the mount's root, and that cgroup's usage file
    value (``memory.current`` / ``memory.usage_in_bytes``). When the path named by /proc/self/cgroup is not
    under the mount (a container whose cgroup namespace is not its own), the mount's root is the cgroup."""
    parts = [p for p in cgroup_path.strip("/").split("/") if p and p != ".."]
    while parts and not os.path.isdir(os.path.join(mount, *parts)):
        parts.pop(0)  # a host path seen from inside a container: its tail may be the container's root
    usage_name = "memory.current" if name == "memory.max" else "memory.usage_in_bytes"
    own = os.path.join(mount, *parts)
    usage = _limit_value(_read(os.path.join(own, usage_name)))
    limit: int | None = None
    while True:
        value = _limit_value(_read(os.path.join(mount, *parts, name)))
        if value is not None and (limit is None or value < limit):
            limit = value
        if not parts:
            break
        parts.pop()
    return limit, usage


def cgroup_memory_limit(proc: str | os.PathLike[str] = "/proc",
                        sys: str | os.PathLike[str] = "/sys") -> tuple[int | None, int | None, str]:
    """The memory limit of this process's cgroup (bytes, or None), its usage (or None), and ``"v1"``/``"v2"``/``""``.

    cgroup v2: the ``0::PATH`` line of ``PROC/self/cgroup``, ``memory.max`` under ``SYS/fs/cgroup`` (or
    ``SYS/fs/cgroup/unified`` on a hybrid host). cgroup v1: the line whose controllers include ``memory``,
    ``memory.limit_in_bytes`` under ``SYS/fs/cgroup/memory``. A limit anywhere up the tree applies.
    """
    text = _read(os.path.join(proc, "self", "cgroup"))
    if text is None:
        return None, None, ""
    cg = os.path.join(sys, "fs", "cgroup")
    best: tuple[int | None, int | None, str] = (None, None, "")
    for line in text.splitlines():
        hier, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not sep or not sep2:
            continue
        if hier == "0" and controllers == "":
            for mount in (cg, os.path.join(cg, "unified")):
                if os.path.exists(os.path.join(mount, "cgroup.controllers")):
                    limit, usage = _walk_up(mount, path, "memory.max")
                    if limit is not None and (best[0] is None or limit < best[0]):
                        best = (limit, usage, "v2")
        elif "memory" in controllers.split(","):
            limit, usage = _walk_up(os.path.join(cg, "memory"), path, "memory.limit_in_bytes")
            if limit is not None and (best[0] is None or limit < best[0]):
                best = (limit, usage, "v1")
    return best


def mem_available(proc: str | os.PathLike[str] = "/proc") -> int | None:
    """MemAvailable from ``PROC/meminfo`` in bytes, or None."""
    text = _read(os.path.join(proc, "meminfo")) or ""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            try:
                return int(fields[1]) * (1024 if fields[2:3] == ["kB"] else 1)
            except (IndexError, ValueError):
                return None
    return None


def _window(limit: int | None, usage: int | None, available: int | None) -> int:
    """How much of the output writeback may keep in memory: under a limit, half its headroom and a quarter of
    it at most (at least one kick); without one, a quarter of MemAvailable (64 MiB to 1 GiB)."""
    if limit is not None:
        return max(KICK_BYTES, min(max(limit - (usage or 0), 0) // 2, limit // 4, MAX_WINDOW))
    return max(MIN_WINDOW, min((available or 0) // 4, MAX_WINDOW))


def decide(requested: str, *, block_device: bool, size: int | None,
           proc: str | os.PathLike[str] = "/proc", sys: str | os.PathLike[str] = "/sys") -> CachePolicy:
    """The policy for writing ``size`` bytes (None: not known yet) to a block device or a regular file."""
    if requested not in MODES:
        raise ValueError(f"unknown cache mode '{requested}' (choose from {', '.join(MODES)})")
    if requested == "none":
        return CachePolicy("none", "asked for: O_DIRECT")
    limit, usage, version = cgroup_memory_limit(proc, sys)
    available = mem_available(proc)
    window = _window(limit, usage, available)
    if requested == "writeback":
        return CachePolicy("writeback", f"asked for; at most {human_size(window)} of the output in memory",
                           window)
    if block_device:
        return CachePolicy("none", "the target is a block device")
    if size is None:
        return CachePolicy("none", "the output's size is not known until the end")
    out = human_size(size)
    if limit is not None and size > limit // 2:
        return CachePolicy("none", f"{out} output > half of the {human_size(limit)} cgroup memory limit")
    if available is None:
        return CachePolicy("none", "MemAvailable not known")
    if size > available // 2:
        return CachePolicy("none", f"{out} output > half of {human_size(available)} available")
    where = (f"{out} output <= half of the {human_size(limit)} cgroup {version} memory limit"
             if limit is not None else "no cgroup memory limit")
    return CachePolicy("writeback", f"{where}; {out} output <= half of {human_size(available)} available",
                       0 if limit is None else window)


_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_libc: ctypes.CDLL | None = None


def _sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    import ctypes  # loaded once, by the first call

    global _libc
    if _libc is None:
        import ctypes.util

        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    if _libc.sync_file_range(fd, offset, length, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class WriteBehind:
    """Keeps the page-cached output of one descriptor within ``window`` bytes (see the module docstring).

    ``wrote(offset, n)`` after each write through the page cache. The ranges written since the last kick are
    merged into one span; each kick starts writeback of its span, and the oldest spans are waited for and
    dropped from the cache while more than ``window`` bytes are in flight. A descriptor that refuses
    sync_file_range (not every filesystem has it) leaves the bound to the kernel's dirty limits.
    """

    def __init__(self, fd: int, window: int, kick: int = KICK_BYTES) -> None:
        self.fd = fd
        self.window = max(window, kick)
        self.kick = kick
        self._lo = self._hi = -1
        self._pending = 0
        self._flight: deque[tuple[int, int, int]] = deque()  # (start, end, bytes written in it)
        self._in_flight = 0
        self.enabled = True

    def wrote(self, offset: int, n: int) -> None:
        if not self.enabled or n <= 0:
            return
        end = offset + n
        if self._lo < 0:
            self._lo, self._hi = offset, end
        else:
            self._lo, self._hi = min(self._lo, offset), max(self._hi, end)
        self._pending += n
        if self._pending >= self.kick:
            self._start()

    def _start(self) -> None:
        lo, hi, n = self._lo, self._hi, self._pending
        self._lo = self._hi = -1
        self._pending = 0
        try:
            _sync_file_range(self.fd, lo, hi - lo, _SYNC_FILE_RANGE_WRITE)
        except OSError:
            self.enabled = False
            return
        self._flight.append((lo, hi, n))
        self._in_flight += n
        while self._in_flight > self.window and self._flight:
            self._drop_oldest()

    def close(self) -> None:
        """The output is being closed; nothing is left to do (what is in flight finishes in the kernel)."""

    def _drop_oldest(self) -> None:
        lo, hi, n = self._flight.popleft()
        self._in_flight -= n
        try:
            _sync_file_range(self.fd, lo, hi - lo, _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                             | _SYNC_FILE_RANGE_WAIT_AFTER)
            os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        except OSError:
            self.enabled = False


class BackgroundWriteback(WriteBehind):
    """Starts writeback of each :data:`KICK_BYTES` written, on a thread of its own, and never waits for it.

    For a job that flushes at its end (see the module docstring): the writer hands the spans over and goes on,
    the thread asks the kernel to write them out (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which blocks when
    the device's queue is full: on the writer's thread that cost 0.1 s of a 0.4 s job). The thread works on a
    duplicate of the descriptor, which it closes after the last span, so closing the output never races it.
    """

    def __init__(self, fd: int, kick: int = KICK_BYTES) -> None:
        import queue
        import threading

        super().__init__(os.dup(fd), 0, kick)
        self._spans: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="diskport-writeback", daemon=True)
        self.thread.start()

    def _start(self) -> None:
        self._spans.put((self._lo, self._hi))
        self._lo = self._hi = -1
        self._pending = 0

    def _run(self) -> None:
        try:
            while (span := self._spans.get()) is not None:
                if self.enabled:
                    try:
                        _sync_file_range(self.fd, span[0], span[1] - span[0], _SYNC_FILE_RANGE_WRITE)
                    except OSError:
                        self.enabled = False  # not every filesystem has it; the final flush does the work
        finally:
            os.close(self.fd)

    def close(self) -> None:
        """No more spans: the thread finishes what it was handed (without waiting for the disk) and exits."""
        self._spans.put(None)


def pwrite_cached(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` through the page cache, in pieces of :data:`PAGE_CACHE_WRITE`."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view[:PAGE_CACHE_WRITE], offset)
        view = view[n:]
        offset += n
