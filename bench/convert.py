"""diskport convert vs qemu-img convert on the same inputs, same run, alternating.

    python bench/convert.py [--size-gib 4] [--rounds 3] [--dir bench-out]

Makes a raw image with about half its bytes data (part random, part compressible, the rest zero), converts it
to qcow2 with qemu-img, then times qcow2->raw and raw->qcow2 with both tools and prints the ratio of the
medians (below 1.0 means diskport is faster) and each tool's peak RSS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DISKPORT, Case, GiB, alternate, need, remove, sample_raw, timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    qemu_img = need("qemu-img")
    work: Path = args.dir
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GiB)
    raw = work / "sample.raw"
    qcow2 = work / "sample.qcow2"
    if not raw.exists() or raw.stat().st_size != size:
        print(f"making a {args.size_gib} GiB sample (about half data) in {work}", flush=True)
        sample_raw(raw, size)
        remove(qcow2)
    if not qcow2.exists():
        timed([qemu_img, "convert", "-f", "raw", "-O", "qcow2", raw, qcow2])
    out_raw = work / "out.raw"
    out_qcow2 = work / "out.qcow2"

    cases = [
        alternate(Case("qcow2 -> raw"), args.rounds,
                  lambda: timed([*DISKPORT, "convert", "-q", "-O", "raw", qcow2, out_raw]),
                  lambda: timed([qemu_img, "convert", "-f", "qcow2", "-O", "raw", qcow2, out_raw]),
                  lambda: remove(out_raw)),
        alternate(Case("raw -> qcow2"), args.rounds,
                  lambda: timed([*DISKPORT, "convert", "-q", "-O", "qcow2", raw, out_qcow2]),
                  lambda: timed([qemu_img, "convert", "-f", "raw", "-O", "qcow2", raw, out_qcow2]),
                  lambda: remove(out_qcow2)),
    ]
    print(f"\n{args.size_gib} GiB image, {args.rounds} alternating rounds, medians:")
    for case in cases:
        print(case.row("qemu-img"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
