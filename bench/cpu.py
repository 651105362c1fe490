"""User + system CPU per GiB of data: diskport convert vs qemu-img convert on the same input, alternating.

    python bench/cpu.py [--size-gib 2] [--rounds 5] [--cases raw-qcow2,qcow2-raw] [--regimes warm,settled]
                        [--diskport-arg=ARG] [--dir bench-out]

The input is the benchmarks' sample raw image (about half data: random and compressible stripes, the rest
holes) or the qcow2 qemu-img makes from it; "data" is the allocated part of the raw file, the bytes both tools
must read and write. The CPU of a run is the child's user + system time as wait4 reports it (all its threads),
with Python's start-up included for diskport; diskport's start-up alone (``diskport --version``, median of the
same number of runs) is printed beside it, and the difference is the CPU the conversion itself costs.

System time depends on the regime (bench/common.py): a page-cache write that must fault in fresh pages (settled)
costs far more kernel time than one reusing just-freed pages (warm), so both are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    DISKPORT,
    DISKPORT_EXTRA,
    Compare,
    GiB,
    add_arguments,
    compare,
    configure,
    diskport,
    measure,
    need,
    remove,
    sample_images,
)

CASES = {"raw-qcow2": ("raw", "qcow2"), "qcow2-raw": ("qcow2", "raw")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, rounds=5)
    parser.add_argument("--cases", default="raw-qcow2", help=f"comma separated, from {', '.join(CASES)} "
                                                             "[default: raw-qcow2]")
    args = parser.parse_args()
    regimes = configure(args)
    names = args.cases.split(",")
    if set(names) - set(CASES):
        parser.error(f"--cases: choose from {', '.join(CASES)}")
    qemu_img = need("qemu-img")
    work: Path = args.dir.resolve()
    raw, qcow2 = sample_images(work, args.size_gib, qemu_img)
    data_gib = raw.stat().st_blocks * 512 / GiB
    startup = [measure([*DISKPORT, "--version"]).cpu for _ in range(args.rounds)]
    base = statistics.median(startup)
    results: list[Compare] = []
    for name in names:
        src_fmt, out_fmt = CASES[name]
        src = raw if src_fmt == "raw" else qcow2
        out = work / f"cpu-out.{out_fmt}"
        print(f"timing {src_fmt} -> {out_fmt} ...", flush=True)
        results.append(compare(
            Compare(f"{src_fmt} -> {out_fmt}"), args.rounds,
            lambda s=src, o=out, f=out_fmt: measure(diskport("convert", "-q", "-O", f, s, o)),
            lambda s=src, o=out, i=src_fmt, f=out_fmt: measure([qemu_img, "convert", "-f", i, "-O", f, s, o]),
            lambda o=out: remove(o), regimes))
    extra = f", diskport {' '.join(DISKPORT_EXTRA)}" if DISKPORT_EXTRA else ""
    print(f"\n{args.size_gib} GiB image, {data_gib:.2f} GiB of data, {args.rounds} alternating rounds per regime"
          f"{extra}; medians of user + system CPU:")
    print(f"diskport start-up (diskport --version): {base:.3f} s  (runs {' '.join(f'{c:.2f}' for c in startup)})")
    print(f"{'case':<16} {'regime':<8} {'diskport s/GiB':>15} {'minus start-up':>15} {'qemu-img s/GiB':>15} "
          f"{'ratio':>7}")
    for case in results:
        for regime in regimes:
            o, p = case.medians(regime, "cpu")
            print(f"{case.name:<16} {regime:<8} {o / data_gib:15.3f} {(o - base) / data_gib:15.3f} "
                  f"{p / data_gib:15.3f} {o / p:6.2f}x")
            print(f"{'':<25} runs: diskport {' '.join(f'{r.cpu:.2f}' for r in case.ours[regime])}; "
                  f"qemu-img {' '.join(f'{r.cpu:.2f}' for r in case.peer[regime])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
