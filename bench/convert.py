"""diskport convert vs qemu-img convert on the same inputs, same run, alternating, in both regimes and clocks.

    python bench/convert.py [--size-gib 2] [--rounds 3] [--quick] [--cases core,sync,direct,formats,compressed]
                            [--regimes warm,settled] [--diskport-arg=--cache=none] [--markdown] [--dir bench-out]

Makes a raw image with about half its bytes data (part random, part compressible, the rest zero) and, from it
with qemu-img, the inputs of each case. Then times diskport and the peer alternately, in the warm regime (no
pause, the previous output just deleted) and the settled one (sync and a pause first), and prints for each case,
regime and clock (wall: until the command exits; durable: until its output is fsynced too) the medians and their
ratio (below 1.0 means diskport is faster); see bench/common.py for the vocabulary.

- core (with sync, the default): qcow2 -> raw, raw -> qcow2, streamOptimized VMDK -> raw, dynamic VHDX -> raw against
  ``qemu-img convert`` with its defaults; the targets are at most 1.0x its wall time and 0.9x its durable time.
- sync: the same four with ``diskport convert --sync``, the command for an output that must be on stable storage
  when it exits (it starts writeback as it writes, see diskport.cache), against the same qemu-img runs; its wall
  clock includes its flush, its durable clock is the one that counts.
- direct: qcow2 -> raw and raw -> qcow2 against ``qemu-img convert -t none`` (O_DIRECT).
- formats: dynamic VDI -> raw against ``qemu-img convert``.
- compressed: qcow2.gz and qcow2.xz -> raw against the pipeline a platform importer runs without diskport:
  decompress to a scratch file (gzip -dc / xz -dc), then ``qemu-img convert``, then remove the scratch file.

Extra arguments for every diskport command: ``--diskport-arg=ARG`` (repeatable) or ``DISKPORT_ARGS``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    DISKPORT_EXTRA,
    Compare,
    add_arguments,
    compare,
    configure,
    derived,
    details,
    diskport,
    measure,
    need,
    print_tables,
    remove,
    sample_images,
)

GROUPS = ("core", "sync", "direct", "formats", "compressed")
TARGETS = (1.0, 0.9)  # issue 15: wall, durable against qemu-img's defaults


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--cases", default="core,sync", help=f"comma separated, from {', '.join(GROUPS)} or all "
                                                        "[default: core,sync]")
    args = parser.parse_args()
    regimes = configure(args)
    groups = set(GROUPS) if args.cases == "all" else set(args.cases.split(","))
    if groups - set(GROUPS):
        parser.error(f"--cases: choose from {', '.join(GROUPS)} or all")
    qemu_img = need("qemu-img")
    work: Path = args.dir.resolve()
    raw, qcow2 = sample_images(work, args.size_gib, qemu_img)
    out_raw = work / "out.raw"
    out_qcow2 = work / "out.qcow2"
    scratch = work / "scratch.img"
    cases: list[Compare] = []

    def versus_qemu(name: str, src: Path, fmt: str, out: Path, out_fmt: str, qemu_flags: tuple[str, ...] = (),
                    targets: tuple[float | None, float | None] | None = None,
                    ours: tuple[str, ...] = ()) -> None:
        print(f"timing {name} ...", flush=True)
        cases.append(compare(
            Compare(name, targets=targets), args.rounds,
            lambda: measure(diskport("convert", "-q", *ours, "-O", out_fmt, src, out), [out]),
            lambda: measure([qemu_img, "convert", *qemu_flags, "-f", fmt, "-O", out_fmt, src, out], [out]),
            lambda: remove(out), regimes))

    def made_by_qemu(name: str, fmt: str, options: str) -> Path:
        return derived(raw, f"sample-{name}", [qemu_img, "convert", "-f", "raw", "-O", fmt, "-o", options,
                                               "{raw}", "{out}"])

    core = [("qcow2 -> raw", qcow2, "qcow2", out_raw, "raw"), ("raw -> qcow2", raw, "raw", out_qcow2, "qcow2")]
    if groups & {"core", "sync"}:
        core += [("streamOptimized.vmdk -> raw", made_by_qemu("streamOptimized.vmdk", "vmdk",
                                                              "subformat=streamOptimized"), "vmdk", out_raw, "raw"),
                 ("dynamic.vhdx -> raw", made_by_qemu("dynamic.vhdx", "vhdx", "subformat=dynamic"), "vhdx",
                  out_raw, "raw")]
    for suffix, ours in [("", ()), (", --sync", ("--sync",))]:
        if ("sync" if ours else "core") in groups:
            for name, src, fmt, out, out_fmt in core:
                versus_qemu(name + suffix, src, fmt, out, out_fmt, ours=ours,
                            targets=(None, TARGETS[1]) if ours else TARGETS)  # --sync: durable only
    if "direct" in groups:
        versus_qemu("qcow2 -> raw (qemu -t none)", qcow2, "qcow2", out_raw, "raw", ("-t", "none"))
        versus_qemu("raw -> qcow2 (qemu -t none)", raw, "raw", out_qcow2, "qcow2", ("-t", "none"))
    if "formats" in groups:
        versus_qemu("dynamic.vdi -> raw", made_by_qemu("dynamic.vdi", "vdi", "static=off"), "vdi", out_raw, "raw")
    if "compressed" in groups:
        for ext, tool in [("gz", "gzip"), ("xz", "xz")]:
            need(tool)
            packed = derived(qcow2, f"sample.qcow2.{ext}", [tool, "-c", "-T0" if tool == "xz" else "-6",
                                                           str(qcow2)])
            pipeline = (f"{tool} -dc '{packed}' > '{scratch}' && "
                        f"'{qemu_img}' convert -f qcow2 -O raw '{scratch}' '{out_raw}' && rm -f '{scratch}'")
            print(f"timing qcow2.{ext} -> raw ...", flush=True)
            cases.append(compare(
                Compare(f"qcow2.{ext} -> raw"), args.rounds,
                lambda p=packed: measure(diskport("convert", "-q", "--scratch", work, p, out_raw), [out_raw]),
                lambda c=pipeline: measure(["bash", "-c", c], [out_raw]),
                lambda: remove(out_raw, scratch), regimes))

    extra = f", diskport {' '.join(DISKPORT_EXTRA)}" if DISKPORT_EXTRA else ""
    print(f"\n{args.size_gib} GiB image (about half data), {args.rounds} alternating rounds per regime{extra}; "
          "medians (peer: qemu-img, or decompress-to-scratch + qemu-img for compressed input):")
    print_tables(cases, "peer", regimes, args.markdown)
    print("\nruns (wall/durable seconds):")
    print(details(cases, "peer", regimes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
