"""diskport convert vs qemu-img convert on the same inputs, same run, alternating.

    python bench/convert.py [--size-gib 4] [--rounds 3] [--dir bench-out] [--cases core,formats,compressed]

Makes a raw image with about half its bytes data (part random, part compressible, the rest zero) and, from it
with qemu-img, the inputs of each case. Then times diskport and the peer alternately and prints the ratio of the
medians (below 1.0 means diskport is faster) and each one's peak RSS.

- core: qcow2 -> raw and raw -> qcow2 against ``qemu-img convert``, with its default cache and with ``-t none``
  (O_DIRECT, which diskport uses for bulk writes by default).
- formats: streamOptimized VMDK, VHDX and VDI -> raw against ``qemu-img convert``.
- compressed: qcow2.gz and qcow2.xz -> raw against the pipeline a platform importer runs without diskport:
  decompress to a scratch file (gzip -dc / xz -dc), then ``qemu-img convert``, then remove the scratch file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DISKPORT, Case, alternate, derived, need, remove, sample_images, timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-out"))
    parser.add_argument("--cases", default="core,formats,compressed")
    args = parser.parse_args()
    groups = set(args.cases.split(","))
    qemu_img = need("qemu-img")
    work: Path = args.dir.resolve()
    raw, qcow2 = sample_images(work, args.size_gib, qemu_img)
    out_raw = work / "out.raw"
    out_qcow2 = work / "out.qcow2"
    scratch = work / "scratch.img"
    cases: list[Case] = []

    def versus_qemu(name: str, src: Path, fmt: str, out: Path, out_fmt: str, qemu_flags: tuple[str, ...] = ()) -> None:
        print(f"timing {name} ...", flush=True)
        cases.append(alternate(
            Case(name), args.rounds,
            lambda: timed([*DISKPORT, "convert", "-q", "-O", out_fmt, src, out]),
            lambda: timed([qemu_img, "convert", *qemu_flags, "-f", fmt, "-O", out_fmt, src, out]),
            lambda: remove(out)))

    if "core" in groups:
        versus_qemu("qcow2 -> raw", qcow2, "qcow2", out_raw, "raw")
        versus_qemu("raw -> qcow2", raw, "raw", out_qcow2, "qcow2")
        # diskport writes bulk data with O_DIRECT; qemu-img does so with -t none. Same comparison, like for like.
        versus_qemu("qcow2 -> raw (qemu -t none)", qcow2, "qcow2", out_raw, "raw", ("-t", "none"))
        versus_qemu("raw -> qcow2 (qemu -t none)", raw, "raw", out_qcow2, "qcow2", ("-t", "none"))
    if "formats" in groups:
        for name, fmt, options in [("streamOptimized.vmdk", "vmdk", "subformat=streamOptimized"),
                                   ("dynamic.vhdx", "vhdx", "subformat=dynamic"),
                                   ("dynamic.vdi", "vdi", "static=off")]:
            src = derived(raw, f"sample-{name}", [qemu_img, "convert", "-f", "raw", "-O", fmt, "-o", options,
                                                  "{raw}", "{out}"])
            versus_qemu(f"{name} -> raw", src, fmt, out_raw, "raw")
    if "compressed" in groups:
        for ext, tool in [("gz", "gzip"), ("xz", "xz")]:
            need(tool)
            packed = derived(qcow2, f"sample.qcow2.{ext}", [tool, "-c", "-T0" if tool == "xz" else "-6",
                                                           str(qcow2)])
            pipeline = (f"{tool} -dc '{packed}' > '{scratch}' && "
                        f"'{qemu_img}' convert -f qcow2 -O raw '{scratch}' '{out_raw}' && rm -f '{scratch}'")
            print(f"timing qcow2.{ext} -> raw ...", flush=True)
            cases.append(alternate(
                Case(f"qcow2.{ext} -> raw"), args.rounds,
                lambda p=packed: timed([*DISKPORT, "convert", "-q", "--scratch", work, p, out_raw]),
                lambda c=pipeline: timed(["bash", "-c", c]),
                lambda: remove(out_raw, scratch)))

    print(f"\n{args.size_gib} GiB image, {args.rounds} alternating rounds, medians (peer: qemu-img, or "
          "decompress-to-scratch + qemu-img for compressed input):")
    for case in cases:
        print(case.row("peer"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
