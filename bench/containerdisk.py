"""diskport build and push (containerDisk images) against their natural peers, same run, alternating.

    python bench/containerdisk.py [--size-gib 4] [--rounds 3] [--dir bench-out]

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
  mounted.

The registry (``RegistryServer``) runs in a child process of this script (``--serve-registry``): the test
helpers import pytest and cryptography, and a child's peak RSS (wait4) counts what its parent holds when it
starts, so importing them here would raise every measured peak RSS to about 56 MiB. Even so, every peak RSS has
a floor of about 27 MiB, this process's own with numpy (bench/common.py).

Prints the ratio of the medians (below 1.0 means diskport is faster) and each one's peak RSS. The layouts and the
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

from common import DISKPORT, Case, MiB, Timing, alternate, need, sample_images, timed  # noqa: E402

GB = 1e9


def median(timings: list[Timing]) -> float:
    return statistics.median(t.seconds for t in timings)


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
    parser.add_argument("--size-gib", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-out"))
    parser.add_argument("--serve-registry", type=Path, metavar="PREFIX", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_registry is not None:
        return serve_registry(args.serve_registry)
    qemu_img, skopeo, sha256sum, openssl = need("qemu-img"), need("skopeo"), need("sha256sum"), need("openssl")
    need("docker-registry")
    work: Path = args.dir.resolve()
    _, disk = sample_images(work, args.size_gib, qemu_img)
    disk_bytes = disk.stat().st_size
    out = work / "containerdisk-build.oci"
    layout = work / "containerdisk-push.oci"
    try:
        return run(args, disk, disk_bytes, out, layout, skopeo, sha256sum, openssl)
    finally:
        rmtree(out, layout)


def run(args: argparse.Namespace, disk: Path, disk_bytes: int, out: Path, layout: Path, skopeo: str,
        sha256sum: str, openssl: str) -> int:
    build_cases: list[tuple[str, Case]] = []
    for compression in ("none", "gzip", "zstd"):
        print(f"timing build --compression {compression} vs sha256sum ...", flush=True)
        build_cases.append((compression, alternate(
            Case(f"build --compression {compression}"), args.rounds,
            lambda c=compression: timed([*DISKPORT, "build", "-q", "--compression", c, "--output", out, "--force",
                                         disk]),
            lambda: timed([sha256sum, disk]),
            lambda: rmtree(out))))
    print("timing openssl dgst -sha256 vs sha256sum ...", flush=True)
    hashes = alternate(Case("openssl dgst -sha256"), args.rounds, lambda: timed([openssl, "dgst", "-sha256", disk]),
                       lambda: timed([sha256sum, disk]), lambda: None)

    print("building the layout to push (gzip) ...", flush=True)
    rmtree(layout)
    timed([*DISKPORT, "build", "-q", "--compression", "gzip", "--output", layout, "-t", "v1", disk])
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

        def push_with(tool: str) -> Callable[[], Timing]:
            def push() -> Timing:
                repository = f"bench/{tool}-{len(pushed) + 1}"
                target = f"{registry.name}/{repository}:v1"
                pushed.append(repository)
                if tool == "dp":
                    result = timed([*env, *DISKPORT, "push", "-q", layout, target])
                else:
                    result = timed([*env, skopeo, "--insecure-policy", "copy", "--dest-tls-verify=false",
                                    f"oci:{layout}:v1", f"docker://{target}"])
                check_uploaded(registry, repository)
                return result
            return push

        def clean_repositories() -> None:
            for repository in pushed:
                if repository not in cleaned:
                    delete_blobs(registry, repository, digests)
                    cleaned.add(repository)

        # Once, not timed: diskport says it sent the bytes (a fresh repository has none of them).
        probe = subprocess.run([*env, *DISKPORT, "push", str(layout), f"{registry.name}/bench/dp-probe:v1"],
                               capture_output=True, text=True, check=True)
        summary = probe.stderr.strip().splitlines()[-1]
        sent = re.search(r": (.+) sent, (.+) already there", summary)
        if sent is None or sent.group(2) != "0 B" or sent.group(1) == "0 B":
            raise SystemExit(f"diskport push did not send the whole image to a fresh repository: {summary}")
        pushed.append("bench/dp-probe")
        print(f"timing push (layout {layer_bytes / MiB:.0f} MiB) ...", flush=True)
        push_case = alternate(Case("push (gzip layout)"), args.rounds, push_with("dp"), push_with("sk"),
                              clean_repositories)
        storage = sum(f.stat().st_size for f in registry.storage.rglob("*") if f.is_file())

    sha = [t for _, case in build_cases for t in case.peer] + hashes.peer
    print(f"\n{args.size_gib} GiB qcow2 ({disk_bytes / GB:.2f} GB file, about half data), {args.rounds} alternating "
          "rounds, medians (peer: sha256sum of the disk for builds, skopeo copy for push):")
    for _, case in build_cases:
        print(case.row("sha256sum"))
    o, p = median(hashes.ours), median(hashes.peer)
    print(f"{hashes.name:<28} openssl  {o:7.2f} s  sha256sum {p:7.2f} s  ratio {o / p:5.2f}x  "
          f"peak RSS {max(t.peak_rss for t in hashes.ours) / MiB:5.0f} MiB vs "
          f"{max(t.peak_rss for t in hashes.peer) / MiB:5.0f} MiB\n"
          f"{'':<28} runs: openssl {' '.join(f'{t.seconds:.2f}' for t in hashes.ours)}; "
          f"sha256sum {' '.join(f'{t.seconds:.2f}' for t in hashes.peer)}")
    print(push_case.row("skopeo"))
    print(f"{'':<28} diskport (untimed probe): {summary}")
    print(f"\nthroughput, GB/s of the {disk_bytes / GB:.2f} GB disk file (medians):")
    for compression, case in build_cases:
        print(f"  build --compression {compression:<5} {disk_bytes / GB / median(case.ours):5.2f} GB/s   "
              f"{case.ratio():5.2f}x sha256sum's time (same rounds)")
    print(f"  sha256sum                  {disk_bytes / GB / median(sha):5.2f} GB/s   (all {len(sha)} runs)")
    print(f"  openssl dgst -sha256       {disk_bytes / GB / median(hashes.ours):5.2f} GB/s")
    none_case = build_cases[0][1]
    print(f"  build --compression none vs openssl dgst: {median(none_case.ours) / median(hashes.ours):.2f}x")
    print(f"  push: diskport {layer_bytes / GB / median(push_case.ours):.2f} GB/s, skopeo "
          f"{layer_bytes / GB / median(push_case.peer):.2f} GB/s of the {layer_bytes / GB:.2f} GB layout; "
          f"registry storage at the end {storage / GB:.2f} GB")
    print(f"\ntargets: build(none) <= 1.5x sha256sum: {none_case.ratio():.2f}x "
          f"{'met' if none_case.ratio() <= 1.5 else 'MISSED'}; push <= 1.0x skopeo: {push_case.ratio():.2f}x "
          f"{'met' if push_case.ratio() <= 1.0 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
