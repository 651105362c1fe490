"""Linux disks assembled with Debian tools (sgdisk/sfdisk, mkfs.ext4 -d, mkfs.vfat + mtools, GRUB's boot.img
and grub-mkimage images): the layouts tests/guest/test_inspect.py checks and the manifest, OVA and verdict tests
(and bench/guest.py) reuse."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.guest.filesystems.images import mkfs_ext, mkfs_fat, mtools
from tests.guest.support import blank, patch, sfdisk, sgdisk
from tests.support.clients import require_tool, run

MiB = 1024 * 1024
SECTOR = 512
KERNEL = "6.1.0-99-amd64"
BOOT_IMG = Path("/usr/lib/grub/i386-pc/boot.img")


def linux_tree(root: Path, *, virtio_blk: bool = True, fstab_device: str = "UUID=1234") -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian '
                                             'GNU/Linux"\nVERSION_ID="12"\nID=debian\n')
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "etc/fstab").write_text(f"{fstab_device} / ext4 errors=remount-ro 0 1\n")
    (root / "var/lib/dpkg").mkdir(parents=True)  # virt-inspector (bench/guest.py) reads a Debian's package list
    (root / "var/lib/dpkg/status").write_text("Package: base-files\nStatus: install ok installed\nVersion: 12.4\n\n")
    (root / "usr/bin").mkdir()
    shutil.copy("/bin/dash", root / "usr/bin/sh")
    (root / "bin").symlink_to("usr/bin")
    shutil.copy("/bin/true", root / "usr/bin/cloud-init")
    modules = root / "usr/lib/modules" / KERNEL
    (modules / "kernel/drivers/ata").mkdir(parents=True)
    (modules / "kernel/drivers/ata/ahci.ko.xz").write_bytes(b"module")
    if virtio_blk:
        (modules / "kernel/drivers/block").mkdir(parents=True)
        (modules / "kernel/drivers/block/virtio_blk.ko.xz").write_bytes(b"module")
    (modules / "modules.builtin").write_text("kernel/drivers/net/virtio_net.ko\nkernel/fs/ext4/ext4.ko\n")
    (root / "lib").symlink_to("usr/lib")
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{KERNEL}").write_bytes(b"kernel")
    (root / "boot" / f"config-{KERNEL}").write_text("CONFIG_SCSI_VIRTIO=m\n")
    return root


def efi_loader(tmp: Path) -> Path:
    out = tmp / "BOOTX64.EFI"
    run(require_tool("grub-mkimage"), "-O", "x86_64-efi", "-o", out, "-p", "/EFI/BOOT", "normal")
    return out


def grub_core(tmp: Path) -> Path:
    out = tmp / "core.img"
    run(require_tool("grub-mkimage"), "-O", "i386-pc", "-o", out, "-p", "(hd0,gpt3)/boot/grub", "biosdisk",
        "part_gpt", "part_msdos", "ext2")
    return out


def write_boot_code(disk: Path) -> None:
    patch(disk, 0, BOOT_IMG.read_bytes()[:440])


def put(disk: Path, offset: int, source: Path) -> None:
    patch(disk, offset, source.read_bytes())


def gpt_linux_disk(tmp: Path, *, virtio_blk: bool = True, fstab_device: str = "UUID=1234") -> Path:
    """GPT: 1 ESP with the UEFI fallback loader, 2 BIOS boot holding GRUB's core, 3 ext4 root."""
    disk = blank(tmp / "gpt.raw", 160 * MiB)
    sgdisk(disk, "-n", "1:2048:+32M", "-t", "1:EF00", "-c", "1:EFI System", "-n", "2:0:+1M", "-t", "2:EF02",
           "-n", "3:0:0", "-t", "3:8304", "-c", "3:root")
    esp = mkfs_fat(tmp / "esp.img", 16, 32 * 1024)
    mtools("mmd", esp, "::EFI", "::EFI/BOOT")
    mtools("mcopy", esp, str(efi_loader(tmp)), "::EFI/BOOT/BOOTX64.EFI")
    put(disk, 2048 * SECTOR, esp)
    put(disk, (2048 + 65536) * SECTOR, grub_core(tmp))
    root = mkfs_ext(tmp / "root.img", linux_tree(tmp / "tree", virtio_blk=virtio_blk, fstab_device=fstab_device),
                    size="100M")
    put(disk, (2048 + 65536 + 2048) * SECTOR, root)
    write_boot_code(disk)
    return disk


def mbr_linux_disk(tmp: Path) -> Path:
    """MBR: GRUB boot code, its core in the gap, one active ext4 partition."""
    disk = blank(tmp / "mbr.raw", 120 * MiB)
    sfdisk(disk, "label: dos\nstart=2048, type=83, bootable\n")
    put(disk, SECTOR, grub_core(tmp))
    put(disk, 2048 * SECTOR, mkfs_ext(tmp / "root.img", linux_tree(tmp / "tree"), size="100M"))
    write_boot_code(disk)
    return disk
