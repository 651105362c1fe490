"""diskport import of an OVA vs what a user does without it: download it, ``tar x`` it, ``qemu-img convert`` the
disk. Same inputs, same run, alternating (bench/common.py).

    python bench/ova.py [--size-gib 4] [--rounds 3] [--dir bench-out]

The OVA holds the benchmarks' sample disk (about half data) as a streamOptimized VMDK made by qemu-img, an OVF
descriptor and a SHA256 manifest, as VMware exports it. Served two ways by Debian's nginx on loopback:

* the ``.ova`` with ranges: diskport reads the member in place (and hashes it as it passes); the peer is
  ``curl -o x.ova && tar xf x.ova && qemu-img convert``;
* the ``.ova.gz`` (a stream, like a server without ranges): diskport reads the tar in order out of gzip and
  converts the VMDK straight from the stream; the peer is ``curl | gzip -dc | tar x && qemu-img convert``.

Prints the ratio of the medians and each one's peak RSS. diskport also verifies the manifest; the peer does not.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from tests.ova.build import Disk, Vm, vmware_ovf  # noqa: E402
from tests.support.servers import NginxServer  # noqa: E402

from common import DISKPORT, Case, GiB, alternate, derived, need, remove, sample_images, timed  # noqa: E402


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_ova(work: Path, vmdk: Path, size: int) -> Path:
    ova = work / "sample.ova"
    if ova.exists() and ova.stat().st_mtime >= vmdk.stat().st_mtime:
        return ova
    ovf = vmware_ovf([Vm("sample", [Disk(vmdk, size)])], [("sample-disk1.vmdk", vmdk.stat().st_size,
                                                           Disk(vmdk, size))]).encode()
    ovf_path = work / "sample.ovf"
    ovf_path.write_bytes(ovf)
    mf = work / "sample.mf"
    mf.write_text(f"SHA256(sample.ovf)= {hashlib.sha256(ovf).hexdigest()}\n"
                  f"SHA256(sample-disk1.vmdk)= {sha256(vmdk)}\n")
    tmp = ova.with_name("sample.ova.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(ovf_path, "sample.ovf")
        tar.add(mf, "sample.mf")
        tar.add(vmdk, "sample-disk1.vmdk")
    tmp.rename(ova)
    return ova


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    qemu_img, curl = need("qemu-img"), need("curl")
    need("gzip")
    need("tar")
    work: Path = args.dir.resolve()
    raw, _ = sample_images(work, args.size_gib, qemu_img)
    vmdk = derived(raw, "sample-stream.vmdk", [qemu_img, "convert", "-f", "raw", "-O", "vmdk", "-o",
                                               "subformat=streamOptimized", "{raw}", "{out}"])
    ova = make_ova(work, vmdk, int(args.size_gib * GiB))
    derived(ova, "sample.ova.gz", ["gzip", "-1", "-c", str(ova)])
    out = work / "ova-out.raw"
    unpack = work / "ova-unpacked"
    cases = []
    for name, fetch in (("sample.ova", f"'{curl}' -sf -o '{unpack}/x.ova' '{{url}}' && tar xf '{unpack}/x.ova' "
                                       f"-C '{unpack}'"),
                        ("sample.ova.gz", f"'{curl}' -sf '{{url}}' | gzip -dc | tar x -C '{unpack}'")):
        with tempfile.TemporaryDirectory() as prefix, NginxServer(work, Path(prefix)) as nginx:
            url = nginx.url(name)
            probe = subprocess.run([*DISKPORT, "import", "--force", "--progress", "none", url, str(out)],
                                   capture_output=True, text=True, check=True)
            access = probe.stderr.splitlines()[0]
            remove(out)
            peer = (f"rm -rf '{unpack}' && mkdir '{unpack}' && " + fetch.format(url=url)
                    + f" && '{qemu_img}' convert -f vmdk -O raw '{unpack}/sample-disk1.vmdk' '{out}'"
                    f" && rm -rf '{unpack}'")
            case = alternate(Case(name),
                             args.rounds,
                             lambda url=url: timed([*DISKPORT, "import", "-q", "--force", url, str(out)]),
                             lambda peer=peer: timed(["sh", "-c", peer]),
                             lambda: (remove(out), subprocess.run(["rm", "-rf", str(unpack)], check=True)))
            cases.append((case, access))
    print(f"OVA import, {args.size_gib} GiB disk (streamOptimized VMDK, SHA256 manifest), {args.rounds} rounds")
    for case, access in cases:
        print(case.row("curl+tar+qemu-img"))
        print(f"{'':<28} diskport: {access}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
