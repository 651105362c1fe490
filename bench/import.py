"""diskport import vs the pipeline a platform importer runs without it (KubeVirt CDI's): download to a scratch
file with curl, then ``qemu-img convert -O raw``. Same inputs, same run, alternating, in both regimes and clocks.

    python bench/import.py [--size-gib 2] [--rounds 3] [--quick] [--regimes warm,settled]
                           [--diskport-arg=--cache=none] [--rate-per-connection 200m] [--markdown] [--dir bench-out]

Serves a qcow2 of about half data and its .gz from Debian's nginx on loopback, and the qcow2 again from an
nginx that caps each connection's rate (``--rate-per-connection``), as CDNs and object stores do. For the .gz
the pipeline is ``curl | gzip -dc > scratch`` then ``qemu-img convert``. Prints, for each case, regime (warm: no
pause; settled: sync and a pause first) and clock (wall; durable: the output fsynced too), the medians and
their ratio, each one's peak RSS, and diskport's access path (a ranged qcow2 must use no scratch at all). See
bench/common.py for the vocabulary. diskport import flushes its output before it exits, so its two clocks are
close; the pipeline's qemu-img leaves the flush to the durable clock.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from tests.support.servers import NginxServer  # noqa: E402

from common import (  # noqa: E402
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--rate-per-connection", metavar="RATE", default="200m",
                        help="also serve the qcow2 from an nginx that caps each connection at RATE (nginx syntax, "
                             "as CDNs and object stores do); 'none' to skip [default: 200m]")
    args = parser.parse_args()
    regimes = configure(args)
    qemu_img, curl = need("qemu-img"), need("curl")
    need("gzip")
    work: Path = args.dir.resolve()
    raw, _ = sample_images(work, args.size_gib, qemu_img)
    derived(raw, "sample.qcow2.gz", ["gzip", "-c", str(work / "sample.qcow2")])
    out = work / "import-out.raw"
    scratch = work / "import-scratch.img"
    cases: list[tuple[Compare, str]] = []
    download = f"'{curl}' -sf -o '{scratch}' '{{url}}'"
    runs = [("sample.qcow2", None, download),
            ("sample.qcow2.gz", None, f"'{curl}' -sf '{{url}}' | gzip -dc > '{scratch}'")]
    if args.rate_per_connection != "none":
        runs.append(("sample.qcow2", args.rate_per_connection, download))
    for name, rate, pipeline in runs:
        with tempfile.TemporaryDirectory() as prefix, NginxServer(work, Path(prefix),
                                                                  rate_per_connection=rate) as nginx:
            url = nginx.url(name)
            probe = subprocess.run([str(a) for a in diskport("import", "--force", url, out)], capture_output=True,
                                   text=True, check=True)
            access = probe.stderr.splitlines()[0]
            remove(out)
            peer = (pipeline.format(url=url) + f" && '{qemu_img}' convert -f qcow2 -O raw '{scratch}' '{out}'"
                    f" && rm -f '{scratch}'")
            label = f"{name}, limit_rate {rate} a connection" if rate else name
            print(f"timing {label} ...", flush=True)
            case = compare(Compare(f"import {label}"), args.rounds,
                           lambda u=url: measure(diskport("import", "-q", u, out), [out]),
                           lambda c=peer: measure(["bash", "-c", c], [out]),
                           lambda: remove(out, scratch), regimes)
            cases.append((case, access))
    extra = f", diskport {' '.join(DISKPORT_EXTRA)}" if DISKPORT_EXTRA else ""
    print(f"\n{args.size_gib} GiB image, {args.rounds} alternating rounds per regime{extra}; medians "
          "(peer: curl to a scratch file, then qemu-img convert):")
    print_tables([c for c, _ in cases], "pipeline", regimes, args.markdown)
    print("\nruns (wall/durable seconds):")
    print(details([c for c, _ in cases], "pipeline", regimes))
    for case, access in cases:
        print(f"{case.name}: diskport {access.split(': ', 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
