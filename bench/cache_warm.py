"""raw -> qcow2 in the warm regime (the previous output just deleted, its freed pages reused) and, with
``--pause``, the settled one: qemu-img against ``diskport --cache auto``, ``none`` and ``writeback`` (``wb``),
wall time and durable time (the command followed by ``sync``).

    python bench/cache_warm.py [--size-gib 2] [--rounds 5] [--pause 0] [--dir bench-out]

The sample is the benchmarks' sparse raw file of ``--size-gib``, about half data (alternating random and
compressible stripes): 2 GiB with 1 GiB of data by default. Each round runs every tool once per clock, in an
order rotated each round; each timed run follows an untimed run of the same command (and clock) whose output
is deleted just before, as when a user converts again, and, with ``--pause N``, the machine is left alone N
seconds (these VMs hand freed memory back to the host about two seconds after it is freed). Prints the median
of each, its ratio to qemu-img's median in the same run, and the median user+sys CPU of the command (less
sensitive than the wall time to other jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from common import DISKPORT, GiB, make_sample, need  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to wait after deleting the output")
    parser.add_argument("--dir", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    qemu_img = need("qemu-img")
    work: Path = args.dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"warm-{args.size_gib:g}g.raw"
    if not src.exists():
        make_sample(src, int(args.size_gib * GiB))
    out = work / "warm-out.qcow2"
    tools = {
        "qemu-img": [qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(src), str(out)],
        "diskport auto": [*DISKPORT, "convert", "-q", "--force", "--cache", "auto", "-O", "qcow2", str(src),
                          str(out)],
        "diskport none": [*DISKPORT, "convert", "-q", "--force", "--cache", "none", "-O", "qcow2", str(src),
                          str(out)],
        "diskport wb": [*DISKPORT, "convert", "-q", "--force", "--cache", "writeback", "-O", "qcow2", str(src),
                        str(out)],
    }
    subprocess.run(tools["qemu-img"], check=True, stdout=subprocess.DEVNULL)  # the first output to delete
    times: dict[tuple[str, bool], list[float]] = {(t, s): [] for t in tools for s in (False, True)}
    cpu: dict[tuple[str, bool], list[float]] = {k: [] for k in times}
    keys = list(times)
    for r in range(args.rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            name, durable = key
            # The output just deleted is this tool's own, as when a user converts again: what it left in the
            # page cache (nothing, with O_DIRECT) is what is freed for the timed run to reuse.
            out.unlink(missing_ok=True)
            subprocess.run(tools[name], check=True, stdout=subprocess.DEVNULL)
            if durable:
                os.sync()
            out.unlink(missing_ok=True)
            if args.pause:
                time.sleep(args.pause)
            began = time.perf_counter()
            proc = subprocess.Popen(tools[name], stdout=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status):
                raise SystemExit(f"{name} failed")
            if durable:
                os.sync()
            times[key].append(time.perf_counter() - began)
            cpu[key].append(usage.ru_utime + usage.ru_stime)
    out.unlink(missing_ok=True)
    regime = f"settled ({args.pause:g} s pause)" if args.pause else "warm (no pause: just-freed pages reused)"
    print(f"raw -> qcow2, {args.size_gib:g} GiB (about half data), {regime}, "
          f"median of {args.rounds}")
    for durable in (False, True):
        peer = statistics.median(times[("qemu-img", durable)])
        for name in tools:
            runs = times[(name, durable)]
            med = statistics.median(runs)
            print(f"  {'durable (+sync)' if durable else 'wall':<16} {name:<14} {med:6.2f} s  {med / peer:5.2f}x  "
                  f"user+sys {statistics.median(cpu[(name, durable)]):5.2f} s  "
                  f"runs {' '.join(f'{t:.2f}' for t in runs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
