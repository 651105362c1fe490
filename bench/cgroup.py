"""diskport import inside a memory-limited cgroup, as in a pod: does the job finish, and how close does it get?

    python bench/cgroup.py [--size-gib 4] [--limit-mib 600] [--dir bench-out] [--cache auto,writeback,none]

Serves the benchmarks' sample qcow2 (about half data) and its .gz from Debian's nginx on loopback and imports
each into a raw file with the job in a fresh memory cgroup (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``)
of ``--limit-mib``, once per page-cache mode of ``--cache`` (``diskport import --cache MODE``). Prints the exit
status, the wall time, the cgroup's peak usage (page cache included, which is what a pod's limit counts) and
how often it hit the limit (v1 ``memory.failcnt``, v2 ``memory.events`` max), and the mode the job reported
choosing (``-v``). Needs root.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from tests.support.servers import NginxServer  # noqa: E402

from common import DISKPORT, MiB, derived, need, sample_images  # noqa: E402

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup/unified")


class MemoryCgroup:
    def __init__(self, limit: int) -> None:
        self.v1 = (V1 / "memory.limit_in_bytes").exists()
        base = V1 if self.v1 else V2
        self.path = base / f"diskport-bench-{os.getpid()}"
        self.path.mkdir()
        (self.path / ("memory.limit_in_bytes" if self.v1 else "memory.max")).write_text(str(limit))
        if self.v1 and (self.path / "memory.memsw.limit_in_bytes").exists():
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))

    def run(self, cmd: list[str]) -> tuple[int, float, str]:
        """Exit status, wall seconds, and stderr of ``cmd`` run inside the group."""
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=lambda: (self.path / "cgroup.procs").write_text(str(os.getpid())))
        _, err = proc.communicate()
        text = err.decode(errors="replace").strip()
        if proc.returncode:
            print(text[-400:])
        return proc.returncode, time.perf_counter() - began, text

    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        return int((self.path / name).read_text())

    def hits(self) -> int:
        if self.v1:
            return int((self.path / "memory.failcnt").read_text())
        events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
        return int(events.get("max", 0))

    def close(self) -> None:
        self.path.rmdir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=4)
    parser.add_argument("--limit-mib", type=int, default=600)
    parser.add_argument("--dir", type=Path, default=Path("bench-out"))
    parser.add_argument("--cache", default="auto,writeback,none",
                        help="comma-separated page-cache modes to run each import with [default: all three]")
    args = parser.parse_args()
    modes = [m for m in args.cache.split(",") if m]
    if not modes or set(modes) - {"auto", "writeback", "none"}:
        parser.error("--cache takes a comma-separated list of auto, writeback, none")
    qemu_img = need("qemu-img")
    work: Path = args.dir.resolve()
    _, qcow2 = sample_images(work, args.size_gib, qemu_img)
    gz = derived(qcow2, "sample.qcow2.gz", ["gzip", "-1", "-c", "{raw}"])
    print(f"import into a {args.limit_mib} MiB memory cgroup ({args.size_gib} GiB disk, about half data)")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        (Path(tmp) / "www").mkdir()
        with NginxServer(Path(tmp) / "www", Path(tmp) / "nginx") as nginx:
            _imports(nginx, Path(tmp), (qcow2, gz), args.limit_mib, modes)
    return 0


def _imports(nginx: NginxServer, tmp: Path, sources: tuple[Path, ...], limit_mib: int, modes: list[str]) -> None:
    for source in sources:
        os.link(source, tmp / "www" / source.name)
        url = nginx.url(source.name)
        dest = tmp / "disk.raw"
        for mode in modes:
            group = MemoryCgroup(limit_mib * MiB)
            try:
                code, seconds, err = group.run([*DISKPORT, "import", "-q", "-v", "--cache", mode, url, str(dest)])
                chosen = next((line.removeprefix("cache: ") for line in err.splitlines()
                               if line.startswith("cache: ")), "?")
                print(f"{source.name:<20} --cache {mode:<9} exit {code}  {seconds:6.1f} s  "
                      f"cgroup peak {group.peak() / MiB:5.0f} MiB (limit {limit_mib} MiB, failcnt {group.hits()})"
                      f"  -> {chosen}", flush=True)
            finally:
                dest.unlink(missing_ok=True)
                group.close()


if __name__ == "__main__":
    raise SystemExit(main())
