"""diskport inspect --guest vs libguestfs's virt-inspector on the same disks, alternating, with the ratio; then
what inspection costs over HTTP (bytes and requests, from nginx's own access log).

    python bench/guest.py [--rounds 3] [--dir bench-out/guest]

The disks are the test suite's layouts (tests/guest/test_inspect.py), built with Debian tools: a GPT disk with
an ESP, a BIOS boot partition and an ext4 root (bios+efi), an MBR disk with GRUB in the gap (bios), and a
Windows-style GPT disk (ESP, MSR, NTFS with SOFTWARE and SYSTEM hives; tests/guest/windows/disks.py), each as raw
and as qcow2. virt-inspector boots its appliance under TCG here (LIBGUESTFS_BACKEND=direct,
LIBGUESTFS_BACKEND_SETTINGS=force_tcg); the KVM of these VMs is a nested kvm-pvm that fails real guests.

The peer needs Debian's libguestfs-tools and a kernel for its appliance (``apt-get install libguestfs-tools
linux-image-amd64``; in a container without one, extract the package into /boot and /lib/modules and run
``depmod``). Its first run builds the appliance and is not counted: one warm-up run precedes the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from tests.guest.linux_disks import gpt_linux_disk, mbr_linux_disk  # noqa: E402
from tests.guest.windows.disks import windows_disk  # noqa: E402
from tests.support.servers import NginxServer  # noqa: E402

from common import DISKPORT, Case, alternate, need, timed  # noqa: E402


def layouts(work: Path, qemu_img: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, build in (("gpt-bios+efi", gpt_linux_disk), ("mbr-bios", mbr_linux_disk), ("windows-efi", windows_disk)):
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        raw = build(folder)
        qcow2 = raw.with_suffix(".qcow2")
        subprocess.run([qemu_img, "convert", "-O", "qcow2", raw, qcow2], check=True)
        out[f"{name} raw"], out[f"{name} qcow2"] = raw, qcow2
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-out/guest"))
    args = parser.parse_args()
    qemu_img, inspector = need("qemu-img"), need("virt-inspector")
    work: Path = args.dir.resolve()
    disks = layouts(work, qemu_img)
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    timed([inspector, "--format=raw", "-a", next(iter(disks.values()))])  # builds the appliance once

    print("local: diskport inspect --guest --json vs virt-inspector (median of "
          f"{args.rounds} alternating runs each)")
    for name, disk in disks.items():
        fmt = "qcow2" if disk.suffix == ".qcow2" else "raw"
        case = alternate(Case(name), args.rounds,
                         lambda d=disk: timed([*DISKPORT, "inspect", "--guest", "--json", d]),
                         lambda d=disk, f=fmt: timed([inspector, f"--format={f}", "-a", d]),
                         lambda: None)
        print(case.row("virt-inspector"), flush=True)

    print("\nover HTTP (nginx on loopback, the qcow2 of each layout): what diskport fetched")
    with tempfile.TemporaryDirectory(dir=work) as tmp, NginxServer(Path(tmp) / "www", Path(tmp) / "nginx") as nginx:
        for name, disk in disks.items():
            if disk.suffix != ".qcow2":
                continue
            url = nginx.put(disk.name, disk.read_bytes())
            before = len(nginx.access_log())
            done = subprocess.run([*DISKPORT, "inspect", "--guest", "--json", url], check=True,
                                  capture_output=True, text=True)
            report = json.loads(done.stdout)
            entries = [json.loads(line) for line in nginx.access_log()[before:]]
            sent = sum(int(e.get("body_bytes_sent", 0)) for e in entries)
            print(f"{name:<28} {len(entries):3d} requests, {sent / 1024:8.0f} KiB sent by nginx; report says "
                  f"{report['read']['requests']} reads, {report['read']['bytes'] / 1024:.0f} KiB; "
                  f"disk {disk.stat().st_size / 1024 / 1024:.0f} MiB; verdict {report['firmware']['verdict']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
