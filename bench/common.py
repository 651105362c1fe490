"""Helpers shared by the benchmarks: timing child processes with their peak RSS, alternating peers.

Vocabulary (bench/convert.py, bench/import.py, bench/containerdisk.py and the README use it):

- **wall** clock: from the start of the command until it exits, what a user waits for at a prompt.
- **durable** clock: the same run until its output is on stable storage: the command, then an ``fsync`` of every
  output file and of the folders that name them, counted in the time. A tool that leaves dirty pages behind pays
  for them here; one that wrote with O_DIRECT or flushed already pays almost nothing more.
- **warm** regime: no pause; the previous output of the same tool was deleted just before, so the run reuses the
  memory pages that deletion freed (a busy host or a workstation converting one image after another).
- **settled** regime: the previous output deleted, ``sync``, then a pause of ``SETTLE`` seconds (these VMs hand
  freed pages back to the host about two seconds after they are freed, so the run must fault in fresh ones: a
  platform importer's first job on a node); ``--drop-caches`` also empties the page cache (inputs then come
  from disk).

Every case is timed in both regimes, diskport and its peer alternating, and each clock is reported as the ratio of
the medians (below 1.0 means diskport is faster).
"""

from __future__ import annotations

import argparse
import os
import shlex
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
REGIMES = ("warm", "settled")
#: Arguments given to every diskport subcommand after its name: DISKPORT_ARGS (split like a shell) and
#: ``--diskport-arg`` (see :func:`configure`), e.g. ``--cache=none``.
DISKPORT_EXTRA: list[str] = shlex.split(os.environ.get("DISKPORT_ARGS", ""))
DROP_CACHES = False


def diskport(command: str, *args: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
    """``python -m diskport COMMAND [extra args] ARGS``."""
    return [*DISKPORT, command, *DISKPORT_EXTRA, *args]


def add_arguments(parser: argparse.ArgumentParser, *, size_gib: float = 2, rounds: int = 3) -> None:
    """The options every two-regime benchmark takes."""
    parser.add_argument("--size-gib", type=float, default=size_gib)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--dir", type=Path, default=Path("bench-out"))
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds of a 1 GiB image: a first look in about a minute or two")
    parser.add_argument("--regimes", default=",".join(REGIMES),
                        help="warm, settled or both, comma separated [default: both]")
    parser.add_argument("--diskport-arg", action="append", default=[], metavar="ARG",
                        help="pass ARG to every diskport command, e.g. --diskport-arg=--cache=none (repeat it for "
                             "more; the environment variable DISKPORT_ARGS is added too, split like a shell)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="settled runs also drop the page cache first (root; slows the rest of the machine)")
    parser.add_argument("--markdown", action="store_true", help="also print the table in Markdown")


def configure(args: argparse.Namespace) -> tuple[str, ...]:
    """Apply the common options; returns the regimes to run."""
    global DROP_CACHES
    DISKPORT_EXTRA.extend(args.diskport_arg)
    DROP_CACHES = args.drop_caches
    if args.quick:
        args.rounds = min(args.rounds, 2)
        args.size_gib = min(args.size_gib, 1)
    regimes = tuple(r for r in args.regimes.split(",") if r)
    unknown = set(regimes) - set(REGIMES)
    if unknown or not regimes:
        raise SystemExit(f"--regimes: choose from {', '.join(REGIMES)}")
    return regimes


@dataclass
class Timing:
    seconds: float
    peak_rss: int  # bytes
    cpu: float = 0.0  # the child's user + system CPU seconds (from wait4)


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
    return Timing(elapsed, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


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


@dataclass
class Run:
    wall: float      # seconds until the command exited
    durable: float   # seconds until its outputs were flushed to stable storage too
    peak_rss: int    # bytes
    cpu: float = 0.0  # user + system CPU seconds of the command (not of the flush)


def flush(paths: Sequence[Path]) -> None:
    """fsync every file under ``paths`` (files or folders; missing ones are skipped) and the folders naming them."""
    folders: set[Path] = set()

    def sync(path: Path, flags: int) -> None:
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    for path in paths:
        if path.is_dir():
            for root, _dirs, files in os.walk(path):
                folders.add(Path(root))
                for name in files:
                    sync(Path(root) / name, os.O_RDONLY)
        else:
            sync(path, os.O_RDONLY)
        folders.add(path.parent)
    for folder in folders:
        sync(folder, os.O_RDONLY | os.O_DIRECTORY)


def measure(cmd: Sequence[str | os.PathLike[str]], outputs: Sequence[Path] = ()) -> Run:
    """Run ``cmd``: its wall time, its durable time (``outputs`` flushed after it) and its peak RSS."""
    began = time.perf_counter()
    timing = timed(cmd)
    flush(outputs)
    return Run(timing.seconds, time.perf_counter() - began, timing.peak_rss, timing.cpu)


@dataclass
class Compare:
    """One case timed in both regimes: the runs of diskport and of its peer, by regime."""

    name: str
    ours: dict[str, list[Run]] = field(default_factory=dict)
    peer: dict[str, list[Run]] = field(default_factory=dict)
    targets: tuple[float | None, float | None] | None = None  # (wall, durable) ratios to meet, if any

    def medians(self, regime: str, clock: str) -> tuple[float, float]:
        """Median ``clock`` (wall, durable or cpu) of each side."""
        return (statistics.median(getattr(r, clock) for r in self.ours[regime]),
                statistics.median(getattr(r, clock) for r in self.peer[regime]))

    def ratio(self, regime: str, clock: str) -> float:
        o, p = self.medians(regime, clock)
        return o / p


def settle() -> None:
    os.sync()
    if DROP_CACHES:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(SETTLE)


def compare(case: Compare, rounds: int, ours: Callable[[], Run], peer: Callable[[], Run],
            between: Callable[[], None], regimes: Sequence[str] = REGIMES, *, prime_ours: bool = True,
            prime_peer: bool = True) -> Compare:
    """Time ``ours`` and ``peer`` ``rounds`` times each in every regime, alternating which goes first.

    settled: ``between()`` (removes the previous output), sync, pause. warm: ``between()`` and at once the
    timed run; before it the same tool runs once untimed (its output flushed and removed like a timed one's), so
    the pages the timed run reuses are the ones its own previous output freed, whichever tool ran before.
    ``prime_peer=False`` (``prime_ours=False``) skips that run for a side that writes nothing (a hash).
    """
    for i in range(rounds):
        for regime in regimes:
            order = [(case.ours, ours, prime_ours), (case.peer, peer, prime_peer)]
            if i % 2:
                order.reverse()
            for results, run, prime in order:
                between()
                if regime == "settled":
                    settle()
                elif prime:
                    run()
                    between()
                results.setdefault(regime, []).append(run())
    between()
    return case


def table(cases: Sequence[Compare], peer_label: str, regimes: Sequence[str], markdown: bool = False) -> str:
    """One row per case, regime and clock: the medians, their ratio, and the target when the case has one."""
    lines = []
    if markdown:
        lines += [f"| case | regime | clock | diskport | {peer_label} | ratio | target |",
                  "|---|---|---|---|---|---|---|"]
    else:
        lines.append(f"{'case':<36} {'regime':<8} {'clock':<8} {'diskport':>9} {peer_label[:10]:>10} {'ratio':>7}"
                     f"  target")
    for case in cases:
        for regime in regimes:
            for k, clock in enumerate(("wall", "durable")):
                o, p = case.medians(regime, clock)
                target = ""
                goal = None if case.targets is None else case.targets[k]
                if goal is not None:
                    target = f"<= {goal:.1f}x {'met' if o / p <= goal else 'MISSED'}"
                if markdown:
                    lines.append(f"| {case.name} | {regime} | {clock} | {o:.2f} s | {p:.2f} s | {o / p:.2f}x | "
                                 f"{target} |")
                else:
                    lines.append(f"{case.name:<36} {regime:<8} {clock:<8} {o:7.2f} s {p:8.2f} s {o / p:6.2f}x  "
                                 f"{target}")
    return "\n".join(lines)


def print_tables(cases: Sequence[Compare], peer_label: str, regimes: Sequence[str], markdown: bool) -> None:
    """The ratio table as text, and again in Markdown when asked (--markdown)."""
    print(table(cases, peer_label, regimes))
    if markdown:
        print("\n" + table(cases, peer_label, regimes, markdown=True))


def details(cases: Sequence[Compare], peer_label: str, regimes: Sequence[str]) -> str:
    """Every run (wall/durable) and each side's peak RSS."""
    lines = []
    for case in cases:
        ours = [r for regime in regimes for r in case.ours[regime]]
        peer = [r for regime in regimes for r in case.peer[regime]]
        lines.append(f"{case.name}: peak RSS diskport {max(r.peak_rss for r in ours) / MiB:.0f} MiB, {peer_label} "
                     f"{max(r.peak_rss for r in peer) / MiB:.0f} MiB")
        for regime in regimes:
            runs = [("diskport", case.ours[regime]), (peer_label, case.peer[regime])]
            lines.append(f"  {regime:<8} " + "; ".join(
                f"{who} " + " ".join(f"{r.wall:.2f}/{r.durable:.2f}" for r in rs) for who, rs in runs))
    return "\n".join(lines)


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
