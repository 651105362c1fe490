"""Linux boot facts on other layouts: Ubuntu's ``@`` subvolume beside ``@home``, openSUSE's default subvolume
inside ``@/.snapshots``, and a Debian ext4 root booted through /boot/grub/grub.cfg with a gzip initramfs."""

from __future__ import annotations

import os
from pathlib import Path

from diskport.guest import inspect_guest
from tests.guest.filesystems.btrfs_images import btrfs, mkfs_btrfs, mounted, open_btrfs
from tests.guest.filesystems.images import mkfs_ext
from tests.guest.initramfs_images import initramfs
from tests.guest.linux_disks import KERNEL, linux_tree, put
from tests.guest.support import blank, sfdisk

MiB = 1024 * 1024


def os_files(root: Path, distro: str) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text(f"ID={distro}\nPRETTY_NAME=\"{distro}\"\n")
    (root / "etc/fstab").write_text("LABEL=fedora / btrfs defaults 0 0\n")


def test_ubuntu_at_subvolume_is_found(tmp_path: Path) -> None:
    image = mkfs_btrfs(tmp_path / "u.img", 200 * MiB)
    with mounted(image, tmp_path / "mnt") as mnt:
        for name in ("@home", "@snapshots", "@"):
            btrfs("subvolume", "create", mnt / name)
        os_files(mnt / "@", "ubuntu")
        os.makedirs(mnt / "@snapshots/old")
        os_files(mnt / "@snapshots/old/x", "ubuntu-old")
    report = inspect_guest(image)   # a bare volume: no partition table
    assert report.os.distribution == "ubuntu" and report.os.root_subvolume == "@"
    assert report.os.root_device == "LABEL=fedora"
    assert not any("names the root" in w for w in report.warnings)   # the label is the volume's


def test_opensuse_default_snapshot_is_the_root(tmp_path: Path) -> None:
    image = mkfs_btrfs(tmp_path / "s.img", 200 * MiB)
    with mounted(image, tmp_path / "mnt") as mnt:
        btrfs("subvolume", "create", mnt / "@")
        os.makedirs(mnt / "@/.snapshots/1")
        btrfs("subvolume", "create", mnt / "@/.snapshots/1/snapshot")
        os_files(mnt / "@/.snapshots/1/snapshot", "opensuse-tumbleweed")
        btrfs("subvolume", "set-default", mnt / "@/.snapshots/1/snapshot")
        for n in range(2, 10):   # snapper's read-only snapshots beside the default one
            os.makedirs(mnt / f"@/.snapshots/{n}")
            btrfs("subvolume", "snapshot", "-r", mnt / "@/.snapshots/1/snapshot", mnt / f"@/.snapshots/{n}/snapshot")
    report = inspect_guest(image)
    assert report.os.distribution == "opensuse-tumbleweed"
    assert report.os.root_subvolume == "@/.snapshots/1/snapshot"
    for fs in open_btrfs(image):
        paths = {sub.path for sub in fs.subvolumes()}
        assert paths == {"@"} | {f"@/.snapshots/{n}/snapshot" for n in range(1, 10)}


def test_debian_grub_cfg_and_gzip_initramfs(tmp_path: Path) -> None:
    tree = linux_tree(tmp_path / "tree")
    (tree / "boot/grub").mkdir()
    (tree / "boot/grub/grub.cfg").write_text(
        "set default=0\nmenuentry 'Debian GNU/Linux' --class debian {\n"
        f"\tlinux\t/boot/vmlinuz-{KERNEL} root=/dev/sda1 ro quiet\n\tinitrd\t/boot/initrd.img-{KERNEL}\n}}\n")
    (tree / f"boot/initrd.img-{KERNEL}").write_bytes(
        initramfs(tmp_path / "i", KERNEL, {"ahci": "drivers/ata"}, "gzip", microcode=False))
    (tree / ".autorelabel").write_text("")
    disk = blank(tmp_path / "d.raw", 120 * MiB)
    sfdisk(disk, "label: dos\nstart=2048, type=83, bootable\n")
    put(disk, 2048 * 512, mkfs_ext(tmp_path / "root.img", tree, size="100M"))
    report = inspect_guest(disk)
    entry = report.os.boot_entries[0]
    assert (entry.source, entry.title, entry.kernel) == ("/boot/grub/grub.cfg", "Debian GNU/Linux",
                                                         f"/boot/vmlinuz-{KERNEL}")
    assert entry.initrd == [f"/boot/initrd.img-{KERNEL}"] and report.os.kernel_root == "/dev/sda1"
    assert any("root=/dev/sda1" in w for w in report.warnings)
    assert any(w.startswith("/etc/fstab names the root UUID=1234, but the root was found on partition 1")
               for w in report.warnings), report.warnings
    assert report.os.selinux_relabel and report.os.boot_partition is None
    kernel = report.os.kernel_details[0]
    assert kernel.initramfs is not None and kernel.initramfs.archives == ["cpio+gzip"]
    states = {d.name: (d.state, d.initramfs) for d in report.drivers}
    assert states["virtio_blk"] == ("module", False) and states["ahci"] == ("module", True)
    item = next(a for a in report.advice if a.field == "bus")
    assert item.value == "sata" and "boots on sata, not on virtio" in item.reason
