"""inspect_guest end to end on a Rocky-style disk: GPT with an ESP, XFS /boot, and an LVM PV whose VG holds an
XFS root LV of two segments (lvextend) and a swap LV, all made here with sgdisk, mkfs.vfat + mtools,
mkfs.xfs -p, mkswap and LVM's own tools; read from the raw file, from qcow2, and over HTTP ranges."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from diskport.guest import inspect_guest
from diskport.guest.render import render_guest
from tests.guest.filesystems.images import mkfs_fat, mtools
from tests.guest.filesystems.xfs_images import mkfs_xfs
from tests.guest.linux_disks import efi_loader
from tests.guest.support import blank, convert, patch, sgdisk
from tests.guest.volumes.lvm_images import lvm, pv_files, segments, vg_name, write_linear_lv
from tests.support.clients import require_tool, run

MiB = 1024 * 1024
SECTOR = 512
KERNEL = "5.14.0-362.8.1.el9_3.x86_64"


def rocky_root(root: Path, vg: str) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/os-release").write_text('NAME="Rocky Linux"\nVERSION="9.3 (Blue Onyx)"\nID="rocky"\n'
                                             'ID_LIKE="rhel centos fedora"\nVERSION_ID="9.3"\n'
                                             'PRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"\n')
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "etc/fstab").write_text(f"/dev/mapper/{vg}-root / xfs defaults 0 0\n"
                                    "UUID=0000 /boot xfs defaults 0 0\n"
                                    f"/dev/mapper/{vg}-swap none swap defaults 0 0\n")
    (root / "usr/bin").mkdir()
    shutil.copy("/bin/dash", root / "usr/bin/sh")
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    modules = root / "usr/lib/modules" / KERNEL
    (modules / "kernel/drivers/block").mkdir(parents=True)
    (modules / "kernel/drivers/block/virtio_blk.ko.xz").write_bytes(b"module")
    (modules / "kernel/drivers/ata").mkdir(parents=True)
    (modules / "kernel/drivers/ata/ahci.ko.xz").write_bytes(b"module")
    (modules / "modules.builtin").write_text("kernel/drivers/net/virtio_net.ko\nkernel/fs/xfs/xfs.ko\n")
    (root / "boot").mkdir()
    (root / "usr/lib/locale").mkdir()
    (root / "usr/lib/locale/locale-archive").write_bytes(random.Random(9).randbytes(48 * MiB))  # bulk not read
    return root


def rocky_boot(boot: Path, vg: str) -> Path:
    boot.mkdir(parents=True)
    (boot / f"vmlinuz-{KERNEL}").write_bytes(b"kernel" * 1000)
    (boot / f"config-{KERNEL}").write_text("CONFIG_VIRTIO_BLK=m\nCONFIG_SCSI_VIRTIO=m\n")
    (boot / "loader/entries").mkdir(parents=True)
    (boot / f"loader/entries/abc-{KERNEL}.conf").write_text(
        f"title Rocky Linux\nversion {KERNEL}\nlinux /vmlinuz-{KERNEL}\n"
        f"options root=/dev/mapper/{vg}-root ro rd.lvm.lv={vg}/root\n")
    return boot


@pytest.fixture(scope="module")
def rocky_disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("rocky")
    vg = vg_name()
    esp = mkfs_fat(tmp / "esp.img", 16, 32 * 1024)
    mtools("mmd", esp, "::EFI", "::EFI/BOOT")
    mtools("mcopy", esp, str(efi_loader(tmp)), "::EFI/BOOT/BOOTX64.EFI")
    boot = mkfs_xfs(tmp / "boot.img", rocky_boot(tmp / "boot", vg))
    root = mkfs_xfs(tmp / "root.img", rocky_root(tmp / "root", vg), size=320 * MiB)
    swap = blank(tmp / "swap.img", 16 * MiB)
    run(require_tool("mkswap"), swap)
    with pv_files(tmp, 400 * MiB) as [(pv_file, dev)]:
        lvm("vgcreate", "--driverloaded", "n", vg, dev)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-L", "200M", "-n", "root", vg)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-L", "16M", "-n", "swap", vg)
        lvm("lvextend", "--driverloaded", "n", "-L", "320M", f"{vg}/root")
        assert len([s for s in segments(vg) if s.lv == "root"]) == 2
        write_linear_lv(vg, "root", root, {dev: pv_file})
        write_linear_lv(vg, "swap", swap, {dev: pv_file})
    disk = blank(tmp / "rocky.raw", 800 * MiB)
    sgdisk(disk, "-n", "1:2048:+32M", "-t", "1:EF00", "-c", "1:EFI System Partition", "-n", "2:0:+300M",
           "-t", "2:8300", "-n", "3:0:+400M", "-t", "3:8E00")
    for number, image in ((1, esp), (2, boot), (3, pv_file)):
        start = {1: 2048, 2: 2048 + 65536, 3: 2048 + 65536 + 614400}[number]
        with open(image, "rb") as f:
            at = start * SECTOR
            while chunk := f.read(4 * MiB):
                if any(chunk):
                    patch(disk, at, chunk)
                at += len(chunk)
    return disk, vg


def check_rocky(report: object, vg: str) -> None:
    from diskport.guest.facts import GuestReport

    assert isinstance(report, GuestReport)
    assert report.os.type == "linux" and report.os.distribution == "rocky" and report.os.version == "9.3"
    assert report.os.pretty_name == "Rocky Linux 9.3 (Blue Onyx)"
    assert report.os.lv == f"{vg}/root" and report.os.partition is None
    assert report.os.kernels == [KERNEL] and report.os.architecture == "x86_64"
    assert report.firmware.verdict == "efi"
    assert [(v.number, v.filesystem) for v in report.volumes] == [
        (1, "vfat"), (2, "xfs"), (3, "LVM2_member"), (None, "xfs"), (None, "swap")]
    root = report.volumes[3]
    assert (root.name, root.lv, root.vg, root.lv_kind, root.lv_segments, root.readable) == (
        f"{vg}/root", "root", vg, "linear", 2, True)
    assert root.size == 320 * MiB
    states = {d.name: d.state for d in report.drivers}
    assert states["virtio_blk"] == "module" and states["virtio_net"] == "builtin"
    assert report.advised("bus") == "virtio" and report.advised("firmware.bootloader") == "efi"
    reason = next(a.reason for a in report.advice if a.field == "guestOS")
    assert f"logical volume {vg}/root" in reason


def test_rocky_on_lvm_and_xfs(rocky_disk: tuple[Path, str]) -> None:
    disk, vg = rocky_disk
    report = inspect_guest(disk)
    check_rocky(report, vg)
    text = render_guest(report)
    assert f"on logical volume {vg}/root" in text and f"{vg}/root" in text
    data = report.to_json()
    assert data["os"]["lv"] == f"{vg}/root" and data["partitions"][3]["lv-segments"] == 2
    print(f"rocky raw: {report.bytes_read} bytes in {report.reads} reads")


def test_rocky_over_http_ranges(rocky_disk: tuple[Path, str], nginx: object, tmp_path: Path) -> None:
    disk, vg = rocky_disk
    image = convert(disk, "qcow2")
    url = nginx.put("rocky.qcow2", image.read_bytes())  # type: ignore[attr-defined]
    report = inspect_guest(url)
    check_rocky(report, vg)
    entries = [e for e in nginx.access_entries() if "rocky.qcow2" in e["uri"]]  # type: ignore[attr-defined]
    sent = sum(int(e["body_bytes_sent"]) for e in entries)
    print(f"\nrocky qcow2 over HTTP: {len(entries)} requests, {sent} body bytes; guest: {report.reads} block "
          f"reads, {report.bytes_read} bytes; qcow2 {image.stat().st_size} bytes")
    assert report.bytes_read < 4 * MiB, report.bytes_read
    assert image.stat().st_size > 48 * MiB
    assert len(entries) <= 40 and sent <= 8 * MiB
