"""A Fedora-style disk inspected end to end: GPT with an ESP, ext4 /boot holding BLS entries, the kernel and its
initramfs (an early-microcode cpio then a zstd one, as dracut writes), and btrfs with ``root`` and ``home``
subvolumes written by the kernel through a loop mount. The initramfs decides the bus: virtio_blk is a module
(as in Fedora's kernel), so the disk boots on virtio only if the initramfs holds it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from diskport.guest import inspect_guest
from tests.guest.filesystems.btrfs_images import btrfs, mkfs_btrfs, mounted
from tests.guest.filesystems.images import blkid, mkfs_ext, mkfs_fat, mtools
from tests.guest.initramfs_images import initramfs
from tests.guest.linux_disks import efi_loader, put
from tests.guest.support import blank, convert, sgdisk
from tests.support.clients import run_cli

MiB = 1024 * 1024
SECTOR = 512
VERSION = "6.5.6-300.fc39.x86_64"
ROOT_UUID = "5f2b7e0c-3a1d-4c53-9d0e-2b1a6c7d8e9f"
MACHINE_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def fedora_btrfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fedora-root")
    image = mkfs_btrfs(base / "root.img", 300 * MiB, None, "-U", ROOT_UUID)
    with mounted(image, base / "mnt", "compress=zstd:1") as mnt:
        btrfs("subvolume", "create", mnt / "root")
        btrfs("subvolume", "create", mnt / "home")
        root = mnt / "root"
        for rel in ("etc", "usr/bin", "usr/lib", "home", "boot", "var"):
            (root / rel).mkdir(parents=True)
        (root / "usr/lib/os-release").write_text('NAME="Fedora Linux"\nVERSION="39 (Cloud Edition)"\nID=fedora\n'
                                                 'VERSION_ID=39\nPRETTY_NAME="Fedora Linux 39 (Cloud Edition)"\n')
        os.symlink("../usr/lib/os-release", root / "etc/os-release")
        (root / "etc/fstab").write_text(f"UUID={ROOT_UUID} / btrfs subvol=root,compress=zstd:1 0 0\n"
                                        "UUID=b007b007-0000-4000-8000-000000000002 /boot ext4 defaults 1 2\n"
                                        f"UUID={ROOT_UUID} /home btrfs subvol=home,compress=zstd:1 0 0\n")
        shutil.copy("/bin/dash", root / "usr/bin/sh")
        os.symlink("usr/bin", root / "bin")
        os.symlink("usr/lib", root / "lib")
        shutil.copy("/bin/true", root / "usr/bin/qemu-ga")
        (root / ".autorelabel").write_text("")
        modules = root / "usr/lib/modules" / VERSION
        (modules / "kernel/drivers/block").mkdir(parents=True)
        (modules / "kernel/drivers/block/virtio_blk.ko.xz").write_bytes(b"module")
        (modules / "kernel/drivers/net").mkdir(parents=True)
        (modules / "kernel/drivers/net/virtio_net.ko.xz").write_bytes(b"module")
        (modules / "modules.builtin").write_text("kernel/fs/btrfs/btrfs.ko\n")
        (mnt / "home/fedora").mkdir()
    return image


def boot_volume(base: Path, *, virtio_in_initramfs: bool, ahci: bool, filler: int = 200_000) -> Path:
    tree = base / "boot"
    (tree / "loader/entries").mkdir(parents=True)
    (tree / "grub2").mkdir()
    (tree / f"vmlinuz-{VERSION}").write_bytes(os.urandom(4096))
    config = "CONFIG_VIRTIO_BLK=m\nCONFIG_SCSI_VIRTIO=m\nCONFIG_VIRTIO_NET=m\n"
    config += "CONFIG_SATA_AHCI=y\n" if ahci else "# CONFIG_SATA_AHCI is not set\n"
    (tree / f"config-{VERSION}").write_text(config)
    modules = {"virtio_net": "drivers/net", "btrfs": "fs/btrfs"}
    if virtio_in_initramfs:
        modules["virtio_blk"] = "drivers/block"
    (tree / f"initramfs-{VERSION}.img").write_bytes(initramfs(base / "initramfs", VERSION, modules, "zstd",
                                                                         filler=filler))
    (tree / "loader/entries" / f"{MACHINE_ID}-{VERSION}.conf").write_text(
        f"title Fedora Linux (6.5.6-300.fc39.x86_64) 39 (Cloud Edition)\nversion {VERSION}\n"
        f"linux /vmlinuz-{VERSION}\ninitrd /initramfs-{VERSION}.img $tuned_initrd\n"
        f"options root=UUID={ROOT_UUID} ro rootflags=subvol=root no_timer_check console=tty1\n"
        "grub_users $grub_users\ngrub_arg --unrestricted\ngrub_class fedora\n")
    (tree / "grub2/grub.cfg").write_text("set default=0\ninsmod blscfg\nblscfg\n")
    return mkfs_ext(base / "boot.img", tree, size="120M", label="boot",
                    options=("-U", "b007b007-0000-4000-8000-000000000002"))


def fedora_disk(base: Path, root: Path, *, virtio_in_initramfs: bool = True, ahci: bool = True,
                filler: int = 200_000) -> Path:
    disk = blank(base / "fedora.raw", 500 * MiB)
    sgdisk(disk, "-n", "1:2048:+32M", "-t", "1:EF00", "-c", "1:EFI System Partition", "-n", "2:0:+120M",
           "-t", "2:8300", "-c", "2:boot", "-n", "3:0:+300M", "-t", "3:8300", "-c", "3:root")
    esp = mkfs_fat(base / "esp.img", 16, 32 * 1024)
    mtools("mmd", esp, "::EFI", "::EFI/BOOT", "::EFI/fedora")
    mtools("mcopy", esp, str(efi_loader(base)), "::EFI/BOOT/BOOTX64.EFI")
    put(disk, 2048 * SECTOR, esp)
    put(disk, (2048 + 65536) * SECTOR, boot_volume(base, virtio_in_initramfs=virtio_in_initramfs, ahci=ahci,
                                                   filler=filler))
    put(disk, (2048 + 65536 + 245760) * SECTOR, root)
    return disk


def test_fedora_btrfs_disk_end_to_end(tmp_path: Path, fedora_btrfs: Path) -> None:
    report = inspect_guest(fedora_disk(tmp_path, fedora_btrfs))
    assert [(v.number, v.filesystem, v.readable) for v in report.volumes] == [
        (1, "vfat", True), (2, "ext4", True), (3, "btrfs", True)]
    assert report.volumes[2].fs_uuid == blkid(fedora_btrfs)["UUID"] == ROOT_UUID
    os_ = report.os
    assert os_.type == "linux" and os_.distribution == "fedora" and os_.version == "39"
    assert os_.partition == 3 and os_.root_subvolume == "root" and os_.boot_partition == 2
    assert os_.kernels == [VERSION] and os_.architecture == "x86_64"
    assert os_.root_device == f"UUID={ROOT_UUID}" and os_.kernel_root == f"UUID={ROOT_UUID}"
    entry = os_.boot_entries[0]
    assert entry.source == f"/loader/entries/{MACHINE_ID}-{VERSION}.conf" and entry.initrd == [
        f"/initramfs-{VERSION}.img"]
    assert "rootflags=subvol=root" in entry.options
    assert os_.selinux_relabel and any("autorelabel" in w for w in report.warnings)
    assert not any("names the root" in w for w in report.warnings), report.warnings   # fstab and root= agree
    kernel = os_.kernel_details[0]
    assert kernel.image == f"/vmlinuz-{VERSION}"
    assert kernel.initramfs is not None and kernel.initramfs.archives == ["cpio", "cpio+zstd"]
    assert kernel.initramfs.path == f"/initramfs-{VERSION}.img"
    states = {d.name: (d.state, d.initramfs) for d in report.drivers}
    assert states == {"virtio_blk": ("module", True), "virtio_scsi": ("missing", None),
                      "virtio_net": ("module", True), "ahci": ("builtin", None)}
    assert report.advised("bus") == "virtio" and report.advised("network") == "virtio"
    assert report.agents["qemu-guest-agent"] and report.firmware.efi


def test_initramfs_without_virtio_blk_boots_on_sata(tmp_path: Path, fedora_btrfs: Path) -> None:
    report = inspect_guest(fedora_disk(tmp_path, fedora_btrfs, virtio_in_initramfs=False))
    blk = report.driver("virtio_blk")
    assert blk is not None and blk.state == "module" and blk.initramfs is False
    item = next(a for a in report.advice if a.field == "bus")
    assert item.value == "sata" and item.rule == "linux-initramfs-no-virtio-blk"
    assert "boots on sata, not on virtio" in item.reason and f"initramfs-{VERSION}.img" in item.reason
    data = json.loads(run_cli("inspect", "--guest", "--json", tmp_path / "fedora.raw").stdout)
    assert data["advice"]["bus"] == "sata" and data["os"]["root-subvolume"] == "root"
    assert {d["name"]: d["in-initramfs"] for d in data["drivers"]}["virtio_blk"] is False
    assert data["os"]["kernel-details"][0]["initramfs"]["archives"] == ["cpio", "cpio+zstd"]


def test_kernel_without_ahci_says_sata_would_not_find_the_disk(tmp_path: Path, fedora_btrfs: Path) -> None:
    """Debian's cloud kernel has no ahci: on virtio it boots; the reason warns off sata."""
    report = inspect_guest(fedora_disk(tmp_path, fedora_btrfs, ahci=False))
    item = next(a for a in report.advice if a.field == "bus")
    assert item.value == "virtio" and "ahci is missing" in item.reason and "not be found" in item.reason
    (tmp_path / "b").mkdir()
    both = inspect_guest(fedora_disk(tmp_path / "b", fedora_btrfs, ahci=False, virtio_in_initramfs=False))
    item = next(a for a in both.advice if a.field == "bus")
    assert item.rule == "linux-initramfs-no-disk-driver" and "rebuild" in item.reason


def test_fedora_over_http_ranges(tmp_path: Path, fedora_btrfs: Path, nginx: object) -> None:
    image = convert(fedora_disk(tmp_path, fedora_btrfs), "qcow2")
    url = nginx.put("fedora.qcow2", image.read_bytes())  # type: ignore[attr-defined]
    report = inspect_guest(url)
    assert report.os.distribution == "fedora" and report.os.root_subvolume == "root"
    assert report.advised("bus") == "virtio"
    print(f"fedora btrfs over HTTP: {report.bytes_read} bytes in {report.reads} requests")
    assert report.bytes_read < 8 * MiB, report.bytes_read


def test_initramfs_read_to_its_end_over_http_costs_few_requests(tmp_path: Path, fedora_btrfs: Path,
                                                                  nginx: object) -> None:
    """Without virtio_blk the whole initramfs (here 30 MiB of incompressible data) is read: in 1 MiB reads,
    not one request per 64 KiB block."""
    image = convert(fedora_disk(tmp_path, fedora_btrfs, virtio_in_initramfs=False, filler=30 * MiB), "qcow2")
    url = nginx.put("fedora.qcow2", image.read_bytes())  # type: ignore[attr-defined]
    report = inspect_guest(url)
    assert report.advised("bus") == "sata"
    size = (tmp_path / "boot" / f"initramfs-{VERSION}.img").stat().st_size
    print(f"fedora, {size} byte initramfs read to its end over HTTP: {report.bytes_read} bytes in "
          f"{report.reads} requests")
    assert size < report.bytes_read < size + 8 * MiB
    assert report.reads < 30 + size // MiB, report.reads
