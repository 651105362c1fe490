"""Helpers shared by the benchmarks: timing child processes with their peak RSS, alternating peers."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MiB = 1024 * 1024
GiB = 1024 * MiB
REPO = Path(__file__).resolve().parent.parent
DISKPORT = [sys.executable, "-m", "diskport"]
SETTLE = 5.0  # seconds between runs; see alternate()


@dataclass
class Timing:
    seconds: float
    peak_rss: int  # bytes


def timed(cmd: Sequence[str | os.PathLike[str]]) -> Timing:
    """Run ``cmd``; wall time and the child's peak RSS (from wait4)."""
    began = time.perf_counter()
    proc = subprocess.Popen([os.fspath(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{err}")
    return Timing(elapsed, usage.ru_maxrss * 1024)


@dataclass
class Case:
    name: str
    ours: list[Timing] = field(default_factory=list)
    peer: list[Timing] = field(default_factory=list)

    def ratio(self) -> float:
        return statistics.median(t.seconds for t in self.ours) / statistics.median(t.seconds for t in self.peer)

    def row(self, peer_name: str) -> str:
        o = statistics.median(t.seconds for t in self.ours)
        p = statistics.median(t.seconds for t in self.peer)
        return (f"{self.name:<28} diskport {o:7.2f} s  {peer_name} {p:7.2f} s  ratio {o / p:5.2f}x  "
                f"peak RSS {max(t.peak_rss for t in self.ours) / MiB:5.0f} MiB vs "
                f"{max(t.peak_rss for t in self.peer) / MiB:5.0f} MiB\n"
                f"{'':<28} runs: diskport {' '.join(f'{t.seconds:.2f}' for t in self.ours)}; "
                f"{peer_name} {' '.join(f'{t.seconds:.2f}' for t in self.peer)}")


def alternate(case: Case, rounds: int, ours: Callable[[], Timing], peer: Callable[[], Timing],
              between: Callable[[], None]) -> Case:
    """Run ours and the peer alternately, ``rounds`` times each, starting with a different one each round.

    Before every run the previous output is removed, dirty pages are written back, and the machine is left
    alone for ``SETTLE`` seconds. These VMs hand freed memory back to the host about two seconds after it is
    freed (virtio-balloon free page reporting); a run that starts at once reuses the pages the previous run's
    output just released and writes several times faster than one that must fault in fresh pages. Without the
    pause a run's speed depends on which tool ran before it and how long it took; with it every run starts
    from the same state.
    """
    for i in range(rounds):
        order = [(case.ours, ours), (case.peer, peer)]
        if i % 2:
            order.reverse()
        for results, run in order:
            between()
            os.sync()
            time.sleep(SETTLE)
            results.append(run())
    between()
    return case


def sample_raw(path: Path, size: int, seed: int = 7) -> Path:
    """About half data (alternating random and compressible stripes), the rest zeros, as a sparse file."""
    rng = np.random.default_rng(seed)
    stripe = 64 * MiB
    text = (b"".join(b"line %08d of a compressible guest file system block\n" % i for i in range(80000)))
    text_block = (text * (stripe // 2 // len(text) + 1))[: stripe // 2]
    with open(path, "wb") as f:
        f.truncate(size)
        for n, offset in enumerate(range(0, size, stripe)):
            f.seek(offset)
            f.write(rng.bytes(stripe // 2) if n % 2 == 0 else text_block)
    return path


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SystemExit(f"{tool} is not installed (make system-deps installs it)")
    return path


def remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def make_sample(path: Path, size: int) -> None:
    # In a child process, so this process stays small: a child's peak RSS includes what it inherits at fork.
    code = ("import sys, pathlib; from common import sample_raw; "
            "sample_raw(pathlib.Path(sys.argv[1]), int(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, str(path), str(size)], check=True,
                   cwd=Path(__file__).resolve().parent)


def derived(raw: Path, name: str, build: list[str]) -> Path:
    """An input made from the sample raw image, made once and kept for later runs."""
    out = raw.with_name(name)
    if not out.exists() or out.stat().st_mtime < raw.stat().st_mtime:
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "wb") as f:
            subprocess.run([arg.replace("{raw}", str(raw)).replace("{out}", str(tmp)) for arg in build],
                           check=True, stdout=f if "{out}" not in " ".join(build) else None)
        tmp.rename(out)
    return out


def sample_images(work: Path, size_gib: float, qemu_img: str) -> tuple[Path, Path]:
    """The sample raw image (about half data) of ``size_gib`` in ``work`` and the qcow2 made from it by
    qemu-img; both made once and kept for later runs (and the other benchmarks)."""
    work.mkdir(parents=True, exist_ok=True)
    size = int(size_gib * GiB)
    raw = work / "sample.raw"
    if not raw.exists() or raw.stat().st_size != size:
        print(f"making a {size_gib} GiB sample (about half data) in {work}", flush=True)
        make_sample(raw, size)
    return raw, derived(raw, "sample.qcow2", [qemu_img, "convert", "-f", "raw", "-O", "qcow2", "{raw}", "{out}"])
