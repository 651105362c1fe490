"""diskport build and push (containerDisk images) against their natural peers, same run, alternating.

    python bench/containerdisk.py [--size-gib 2] [--rounds 3] [--quick] [--regimes warm,settled]
                                  [--diskport-arg=ARG] [--markdown] [--dir bench-out] [--cache-modes]

Makes a qcow2 of about half data (the sample raw image of the other benchmarks, through ``qemu-img convert``),
then:

- build: ``diskport build --compression none`` (one pass: read, hash, write the layer) against ``sha256sum`` of
  the same disk (one read and one hash, the least any builder must do); ``openssl dgst -sha256`` is timed against
  ``sha256sum`` too, for context (Debian's sha256sum has no SHA-NI code; OpenSSL, like Python's hashlib, does).
  gzip and zstd builds are timed against ``sha256sum`` as well and reported as throughput (GB/s of the disk file).
- push: one OCI layout (``diskport build --compression gzip``) pushed to Debian's docker-registry on loopback
  (``tests.support.registry.RegistryServer``: plain http, no auth) by ``diskport push`` and by ``skopeo copy
  oci:LAYOUT:v1 docker://...``. Every run goes to a repository of its own, so nothing is skipped as already
  there. Between runs the blobs of the repositories pushed so far are deleted from them (the registry keeps one
  copy of each blob in its storage whatever the repository): skopeo remembers where it pushed a blob (its blob
  info cache, /var/lib/containers/cache for root) and would otherwise mount it from the previous repository
  instead of sending it. The registry's access log is checked after every run: a body was uploaded, nothing
  mounted. ``--diskport-arg`` options go to the builds only (``--diskport-arg=--cache=none``), not to push.

``--cache-modes`` times only the builds, diskport against itself: ``build --cache auto`` (what auto chose is
printed once) against ``build --cache none`` (O_DIRECT), per compression, alternating, with each side's user +
system CPU beside the clocks.

The registry (``RegistryServer``) runs in a child process of this script (``--serve-registry``): the test
helpers import pytest and cryptography, and a child's peak RSS (wait4) counts what its parent holds when it
starts, so importing them here would raise every measured peak RSS to about 56 MiB. Even so, every peak RSS has
a floor of about 27 MiB, this process's own with numpy (bench/common.py).

Every case is timed in the warm regime (no pause, the previous output just deleted) and the settled one (sync and
a pause first), and reported on the wall clock (until the command exits) and the durable one (its output fsynced
too: the layout for a build, the registry's storage for a push; sha256sum writes nothing, so its clocks are one);
see bench/common.py. Prints the ratio of the medians (below 1.0 means diskport is faster) and each one's peak
RSS. ``openssl dgst`` against ``sha256sum`` is timed settled only (neither writes anything). The layouts and the
registry's storage are removed at the end; the sample images are kept for later runs, as the others do.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from common import (  # noqa: E402
    DISKPORT,
    DISKPORT_EXTRA,
    Compare,
    MiB,
    Run,
    add_arguments,
    compare,
    configure,
    details,
    diskport,
    measure,
    need,
    print_tables,
    sample_images,
)

GB = 1e9


def push_command(*args: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
    """``diskport push ARGS``, without ``--diskport-arg``s: those are build options (``--cache=none``); push
    writes nothing locally and takes none of them."""
    return [*DISKPORT, "push", *args]


def median(runs: list[Run]) -> float:
    return statistics.median(r.wall for r in runs)


def rmtree(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def blob_digests(layout: Path) -> list[str]:
    """Every blob of the layout's (single-platform) image: config and layers."""
    index = json.loads((layout / "index.json").read_text())
    digests = []
    for entry in index["manifests"]:
        manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"].split(":", 1)[1]).read_text())
        digests += [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    return digests


class Registry:
    """Debian's docker-registry on loopback: ``tests.support.registry.RegistryServer`` (plain http, no auth,
    storage and log in ``prefix``) run by a child process of this script (``--serve-registry``)."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.storage = prefix / "storage"  # as RegistryServer lays it out
        self.log_path = prefix / "registry.log"
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> Registry:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-registry", str(self.prefix)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__()
            raise SystemExit("the registry did not start (see above)")
        self.port = int(line)
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.close()  # the child stops the registry and exits
            proc.wait(60)


def serve_registry(prefix: Path) -> int:
    """The child of :class:`Registry`: start the registry, print its port, serve until stdin closes."""
    from tests.support.registry import RegistryServer

    with RegistryServer(prefix, label="bench registry") as registry:
        print(registry.port, flush=True)
        sys.stdin.read()
    return 0


def delete_blobs(registry: Registry, repository: str, digests: list[str]) -> None:
    """Unlink the blobs from ``repository`` (the registry's storage keeps them for the other repositories)."""
    conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=30)
    try:
        for digest in digests:
            conn.request("DELETE", f"/v2/{repository}/blobs/{digest}")
            response = conn.getresponse()
            response.read()
            if response.status not in (202, 404):
                raise SystemExit(f"deleting {digest} from {repository}: HTTP {response.status}")
    finally:
        conn.close()


def check_uploaded(registry: Registry, repository: str) -> None:
    """From the registry's access log: an upload of ``repository`` was completed, and nothing was mounted."""
    log = registry.log()
    where = re.escape(f"/v2/{repository}/blobs/uploads/")
    if re.search(rf'"POST {where}\?[^"]*mount=[^"]*" 201 ', log):
        raise SystemExit(f"a blob was mounted into {repository} instead of sent; the comparison is void")
    if not re.search(rf'"PUT {where}[^"]*" 201 ', log):
        raise SystemExit(f"no completed blob upload into {repository} in the registry's log ({registry.log_path})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--serve-registry", type=Path, metavar="PREFIX", help=argparse.SUPPRESS)
    parser.add_argument("--cache-modes", action="store_true",
                        help="only the builds: --cache auto against --cache none, per compression")
    args = parser.parse_args()
    if args.serve_registry is not None:
        return serve_registry(args.serve_registry)
    regimes = configure(args)
    qemu_img, skopeo, sha256sum, openssl = need("qemu-img"), need("skopeo"), need("sha256sum"), need("openssl")
    need("docker-registry")
    work: Path = args.dir.resolve()
    _, disk = sample_images(work, args.size_gib, qemu_img)
    disk_bytes = disk.stat().st_size
    out = work / "containerdisk-build.oci"
    layout = work / "containerdisk-push.oci"
    try:
        if args.cache_modes:
            return cache_modes(args, regimes, disk, disk_bytes, out)
        return run(args, regimes, disk, disk_bytes, out, layout, skopeo, sha256sum, openssl)
    finally:
        rmtree(out, layout)


def cache_modes(args: argparse.Namespace, regimes: tuple[str, ...], disk: Path, disk_bytes: int, out: Path) -> int:
    """``build --cache auto`` against ``build --cache none``, alternating, per compression (--cache-modes)."""
    def build(mode: str, compression: str, *extra: str) -> list[str | os.PathLike[str]]:
        return diskport("build", "-q", *extra, "--cache", mode, "--compression", compression, "--output", out,
                        "--force", disk)

    cases: list[Compare] = []
    for compression in ("none", "gzip", "zstd"):
        chosen = subprocess.run(list(map(str, build("auto", compression, "-v"))), capture_output=True, text=True,
                                check=True).stderr.strip()
        rmtree(out)
        print(f"timing build --compression {compression}: --cache auto ({chosen}) vs --cache none ...", flush=True)
        cases.append(compare(
            Compare(f"build --compression {compression}"), args.rounds,
            lambda c=compression: measure(build("auto", c), [out]),
            lambda c=compression: measure(build("none", c), [out]),
            lambda: rmtree(out), regimes))
    print(f"\n{args.size_gib} GiB qcow2 ({disk_bytes / GB:.2f} GB file, about half data), {args.rounds} alternating "
          "rounds per regime; medians of --cache auto against --cache none:")
    print_tables(cases, "--cache none", regimes, args.markdown)
    print("\nuser + system CPU (medians):")
    for case in cases:
        for regime in regimes:
            o, p = case.medians(regime, "cpu")
            print(f"  {case.name:<28} {regime:<8} auto {o:.2f} s, none {p:.2f} s, ratio {o / p:.2f}x")
    print("\nruns (wall/durable seconds):")
    print(details(cases, "--cache none", regimes))
    return 0


def run(args: argparse.Namespace, regimes: tuple[str, ...], disk: Path, disk_bytes: int, out: Path, layout: Path,
        skopeo: str, sha256sum: str, openssl: str) -> int:
    build_cases: list[tuple[str, Compare]] = []
    for compression in ("none", "gzip", "zstd"):
        print(f"timing build --compression {compression} vs sha256sum ...", flush=True)
        build_cases.append((compression, compare(
            Compare(f"build --compression {compression}"), args.rounds,
            lambda c=compression: measure(diskport("build", "-q", "--compression", c, "--output", out, "--force",
                                                   disk), [out]),
            lambda: measure([sha256sum, disk]),
            lambda: rmtree(out), regimes, prime_peer=False)))
    print("timing openssl dgst -sha256 vs sha256sum ...", flush=True)
    hashes = compare(Compare("openssl dgst -sha256"), args.rounds, lambda: measure([openssl, "dgst", "-sha256", disk]),
                     lambda: measure([sha256sum, disk]), lambda: None, ("settled",))

    print("building the layout to push (gzip) ...", flush=True)
    rmtree(layout)
    measure(diskport("build", "-q", "--compression", "gzip", "--output", layout, "-t", "v1", disk))
    digests = blob_digests(layout)
    layer_bytes = sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
    with tempfile.TemporaryDirectory(dir=out.parent, prefix="containerdisk-registry-") as prefix, \
            Registry(Path(prefix) / "registry") as registry:
        home = Path(prefix) / "home"
        (home / "run").mkdir(parents=True)
        auth = home / "auth.json"
        auth.write_text("{}")
        # Nothing of the user's is read: a private HOME and auth file for both clients, no credentials variables.
        env = ["env", "-i", f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}", f"HOME={home}",
               f"XDG_RUNTIME_DIR={home / 'run'}", f"REGISTRY_AUTH_FILE={auth}", f"TMPDIR={home}"]
        pushed: list[str] = []
        cleaned: set[str] = set()

        def push_with(tool: str) -> Callable[[], Run]:
            def push() -> Run:
                repository = f"bench/{tool}-{len(pushed) + 1}"
                target = f"{registry.name}/{repository}:v1"
                pushed.append(repository)
                if tool == "dp":
                    result = measure([*env, *push_command("-q", layout, target)], [registry.storage])
                else:
                    result = measure([*env, skopeo, "--insecure-policy", "copy", "--dest-tls-verify=false",
                                      f"oci:{layout}:v1", f"docker://{target}"], [registry.storage])
                check_uploaded(registry, repository)
                return result
            return push

        def clean_repositories() -> None:
            for repository in pushed:
                if repository not in cleaned:
                    delete_blobs(registry, repository, digests)
                    cleaned.add(repository)

        # Once, not timed: diskport says it sent the bytes (a fresh repository has none of them).
        probe = subprocess.run([*env, *map(str, push_command(layout, f"{registry.name}/bench/dp-probe:v1"))],
                               capture_output=True, text=True, check=True)
        summary = probe.stderr.strip().splitlines()[-1]
        sent = re.search(r": (.+) sent, (.+) already there", summary)
        if sent is None or sent.group(2) != "0 B" or sent.group(1) == "0 B":
            raise SystemExit(f"diskport push did not send the whole image to a fresh repository: {summary}")
        pushed.append("bench/dp-probe")
        print(f"timing push (layout {layer_bytes / MiB:.0f} MiB) ...", flush=True)
        push_case = compare(Compare("push (gzip layout)"), args.rounds, push_with("dp"), push_with("sk"),
                            clean_repositories, regimes)
        storage = sum(f.stat().st_size for f in registry.storage.rglob("*") if f.is_file())

    extra = f", diskport {' '.join(DISKPORT_EXTRA)}" if DISKPORT_EXTRA else ""
    print(f"\n{args.size_gib} GiB qcow2 ({disk_bytes / GB:.2f} GB file, about half data), {args.rounds} alternating "
          f"rounds per regime{extra}; medians (peer: sha256sum of the disk for builds, skopeo copy for push):")
    cases = [case for _, case in build_cases] + [push_case]
    print_tables(cases, "peer", regimes, args.markdown)
    o, p = median(hashes.ours["settled"]), median(hashes.peer["settled"])
    print(f"{hashes.name:<32} settled  wall    openssl {o:.2f} s, sha256sum {p:.2f} s, ratio {o / p:.2f}x")
    print("\nruns (wall/durable seconds):")
    print(details(cases, "peer", regimes))
    print(f"  {'':<28} diskport (untimed probe): {summary}")
    first = regimes[-1]  # settled when it was run
    sha = [r for _, case in build_cases for r in case.peer[first]] + hashes.peer["settled"]
    print(f"\nthroughput, GB/s of the {disk_bytes / GB:.2f} GB disk file (medians, {first}, wall clock):")
    for compression, case in build_cases:
        print(f"  build --compression {compression:<5} {disk_bytes / GB / median(case.ours[first]):5.2f} GB/s   "
              f"{case.ratio(first, 'wall'):5.2f}x sha256sum's time (same rounds)")
    print(f"  sha256sum                  {disk_bytes / GB / median(sha):5.2f} GB/s   (all {len(sha)} runs)")
    print(f"  openssl dgst -sha256       {disk_bytes / GB / median(hashes.ours['settled']):5.2f} GB/s")
    none_case = build_cases[0][1]
    print(f"  build --compression none vs openssl dgst: "
          f"{median(none_case.ours[first]) / median(hashes.ours['settled']):.2f}x")
    print(f"  push: diskport {layer_bytes / GB / median(push_case.ours[first]):.2f} GB/s, skopeo "
          f"{layer_bytes / GB / median(push_case.peer[first]):.2f} GB/s of the {layer_bytes / GB:.2f} GB layout; "
          f"registry storage at the end {storage / GB:.2f} GB")
    for regime in regimes:
        b, q = none_case.ratio(regime, "wall"), push_case.ratio(regime, "wall")
        print(f"targets ({regime}, wall): build(none) <= 1.5x sha256sum: {b:.2f}x {'met' if b <= 1.5 else 'MISSED'}; "
              f"push <= 1.0x skopeo: {q:.2f}x {'met' if q <= 1.0 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
