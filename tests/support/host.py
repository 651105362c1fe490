"""The host as the page-cache policy sees it: fake /proc and /sys trees, a real cgroup v1 memory group to run a
command in, and what the page cache holds of a file (``fincore``) and how much of it is dirty (``cachestat``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import require_tool, run

CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def fake_host(root: Path, cgroup: str, files: dict[str, str], available_kib: int | None = 16 * 1024 * 1024,
              ) -> tuple[Path, Path]:
    """A /proc and a /sys under ``root``: ``cgroup`` is /proc/self/cgroup, ``files`` are paths under /sys."""
    proc, sysfs = root / "proc", root / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    meminfo = "MemTotal:       32000000 kB\nMemFree:         1000000 kB\n"
    if available_kib is not None:
        meminfo += f"MemAvailable:   {available_kib} kB\n"
    (proc / "meminfo").write_text(meminfo + "Buffers:           1000 kB\n")
    for name, text in files.items():
        path = sysfs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return proc, sysfs


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (``fincore``)."""
    out = run(require_tool("fincore"), "--bytes", "--noheadings", "--output", "RES", path).stdout
    return int(out.split()[0])


_CACHESTAT = 451  # x86_64 and the generic table alike (Linux 6.5)


def dirty_bytes(fd: int) -> int:
    """Bytes of the file behind ``fd`` that are dirty in the page cache (``cachestat(2)``: writeback not yet
    started). There is no command-line tool for it; the system call is made through ctypes."""
    libc = ctypes.CDLL(None, use_errno=True)
    span = (ctypes.c_uint64 * 2)(0, 0)  # offset 0, length 0: the whole file
    stat = (ctypes.c_uint64 * 5)()  # nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted
    if libc.syscall(ctypes.c_long(_CACHESTAT), ctypes.c_int(fd), span, stat, ctypes.c_uint(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cachestat: {os.strerror(err)}")
    return int(stat[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def memory_group(name: str) -> Iterator[Path]:
    """A fresh cgroup v1 memory group (the machine has one; a host without it fails the test)."""
    if not os.access(CGROUP_V1, os.W_OK) or not (CGROUP_V1 / "memory.limit_in_bytes").exists():
        pytest.fail(f"{CGROUP_V1} is not a writable cgroup v1 memory hierarchy; run as root on a host with it",
                    pytrace=False)
    path = CGROUP_V1 / f"diskport-test-{os.getpid()}-{name[-20:]}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


def run_in(group: Path, limit: int, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """``diskport ARGS`` inside ``group``, limited to ``limit`` bytes (swap included where the host has it)."""
    (group / "memory.limit_in_bytes").write_text(str(limit))
    if (group / "memory.memsw.limit_in_bytes").exists():
        (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
    return subprocess.run([sys.executable, "-m", "diskport", *map(os.fspath, args)], capture_output=True,
                          text=True, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
