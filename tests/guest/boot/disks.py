"""Bootable disks made with Debian's tools only, never mounted: sgdisk/sfdisk for the tables, ``mkfs.ext4 -d``
for the root, ``mkfs.vfat -C`` + mtools for the ESP, each filesystem built as its own image and written into
its partition with ``dd conv=notrunc``; GRUB from ``grub-mkimage`` (and :mod:`.grub_bios` for the MBR side);
Debian's signed shim, GRUB and kernel from :mod:`.debs`.

The root filesystem is a small but real one: Debian's os-release, busybox as /bin/sh, the kernel, its config
and the initramfs in /boot, and under /lib/modules exactly the modules the initramfs carries, with the real
``modules.builtin`` — the evidence inspection reads is the evidence the booted guest has.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.guest.boot import grub_bios
from tests.guest.boot.debs import BootParts
from tests.guest.boot.initramfs import (
    ROOT_LABEL,
    SATA_DRIVERS,
    VIRTIO_DRIVERS,
    build_initramfs,
    install_modules,
    module_closure,
)
from tests.guest.filesystems.images import mkfs_ext, mkfs_fat, mtools
from tests.guest.support import blank, sfdisk, sgdisk
from tests.support.clients import require_tool, run

MiB = 1024 * 1024
SECTOR = 512
ESP_SECTORS = 65536      # 32 MiB
BIOS_BOOT_SECTORS = 2048  # 1 MiB
ROOT_SIZE = "48M"
ROOT_SECTORS = 48 * MiB // SECTOR
GRUB_MARK = "DISKPORT-GRUB"
OS_RELEASE = ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
              'VERSION_CODENAME=bookworm\nID=debian\n')
BIOS_CORE_MODULES = ("biosdisk", "part_gpt", "part_msdos", "ext2", "linux", "serial", "terminal", "echo")
EFI_MODULES = ("part_gpt", "part_msdos", "fat", "ext2", "linux", "echo", "normal")


@dataclass
class Kit:
    """What every disk is assembled from: the packages and, per driver set, a root filesystem image."""

    parts: BootParts
    work: Path

    def drivers(self, virtio: bool) -> tuple[str, ...]:
        """The modules the guest has: without virtio, the block driver alone is left out (the pci transport
        and virtio_net stay), so only the disk bus changes."""
        return (VIRTIO_DRIVERS if virtio else ("virtio_pci",)) + SATA_DRIVERS + ("virtio_net",)

    def root_image(self, virtio: bool, initramfs_virtio: bool | None = None) -> Path:
        """The ext4 root (built once per driver set): os-release, busybox, kernel, initramfs, the modules.
        ``initramfs_virtio=False`` with ``virtio``: virtio_blk is installed under /lib/modules but left out of
        the initramfs (a host-only initramfs built on a sata host)."""
        in_initramfs = virtio if initramfs_virtio is None else initramfs_virtio
        name = ("virtio" if virtio else "novirtio") + ("" if in_initramfs == virtio else "-initramfs-novirtio")
        image = self.work / f"root-{name}.ext4"
        if image.exists():
            return image
        p = self.parts
        tree = self.work / f"root-{name}"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc/os-release").write_text(OS_RELEASE)
        (tree / "etc/fstab").write_text(f"LABEL={ROOT_LABEL} / ext4 defaults 0 1\n")
        (tree / "bin").mkdir()
        shutil.copy(require_tool("busybox"), tree / "bin/sh")
        (tree / "boot").mkdir()
        shutil.copy(p.vmlinuz, tree / "boot" / p.vmlinuz.name)
        shutil.copy(p.config, tree / "boot" / p.config.name)
        drivers = self.drivers(virtio)
        build_initramfs(tree / "boot" / f"initrd.img-{p.kernel_release}", self.work / f"stage-{name}",
                        p.modules, p.kernel_release, self.drivers(in_initramfs))
        install_modules(tree, p.modules, p.kernel_release, module_closure(p.modules, drivers, self.work))
        return mkfs_ext(image, tree, size=ROOT_SIZE, label=ROOT_LABEL)

    def grub_script(self, root: str, serial: bool) -> str:
        rel = self.parts.kernel_release
        head = ("serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n"
                if serial else "")
        return (f"{head}echo {GRUB_MARK}\n"
                f"linux {root}/boot/vmlinuz-{rel} root=LABEL={ROOT_LABEL} console=ttyS0 panic=-1\n"
                f"initrd {root}/boot/initrd.img-{rel}\nboot\n")

    def grub_efi_unsigned(self, root: str) -> Path:
        """A standalone GRUB EFI image (no signature), its config embedded."""
        out = self.work / f"grubx64-unsigned-{root.strip('()').replace(',', '-')}.efi"
        if not out.exists():
            cfg = out.with_suffix(".cfg")
            cfg.write_text(self.grub_script(root, serial=False))
            run(require_tool("grub-mkimage"), "-O", "x86_64-efi", "-o", out, "-c", cfg, "-p", "/EFI/BOOT",
                *EFI_MODULES)
        return out

    def bios_core(self, root: str) -> Path:
        out = self.work / f"core-{root.strip('()').replace(',', '-')}.img"
        if not out.exists():
            cfg = out.with_suffix(".cfg")
            cfg.write_text(self.grub_script(root, serial=True))
            grub_bios.core_image(out, cfg, f"{root}/boot/grub", BIOS_CORE_MODULES)
        return out

    def esp(self, name: str, files: dict[str, Path | str]) -> Path:
        """A 32 MiB FAT16 ESP holding ``files`` (ESP path -> host file, or text)."""
        image = self.work / f"esp-{name}.img"
        image.unlink(missing_ok=True)  # mkfs.vfat -C makes the file and refuses an existing one
        mkfs_fat(image, 16, ESP_SECTORS * SECTOR // 1024)
        made: set[str] = set()
        for target in files:
            parts = target.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in made:
                    mtools("mmd", image, f"::{d}")
                    made.add(d)
        for target, source in files.items():
            if isinstance(source, str):
                text = self.work / f"esp-{name}-{target.replace('/', '_')}"
                text.write_text(source)
                source = text
            mtools("mcopy", image, str(source), f"::{target.strip('/')}")
        return image


def dd(image: Path, disk: Path, lba: int) -> None:
    run(require_tool("dd"), f"if={image}", f"of={disk}", "bs=512", f"seek={lba}", "conv=notrunc,sparse",
        "status=none")


def gpt_both(kit: Kit, out: Path, *, virtio: bool = True, initramfs_virtio: bool | None = None) -> Path:
    """GPT: 1 ESP with unsigned GRUB as \\EFI\\BOOT\\BOOTX64.EFI, 2 BIOS boot partition holding GRUB's core
    (boot.img in the protective MBR), 3 the ext4 root."""
    esp_lba, bios_lba = 2048, 2048 + ESP_SECTORS
    root_lba = bios_lba + BIOS_BOOT_SECTORS
    disk = blank(out, (root_lba + ROOT_SECTORS + 2048) * SECTOR)
    sgdisk(disk, "-n", f"1:{esp_lba}:+{ESP_SECTORS}", "-t", "1:EF00", "-c", "1:EFI System",
           "-n", f"2:{bios_lba}:+{BIOS_BOOT_SECTORS}", "-t", "2:EF02", "-c", "2:BIOS boot",
           "-n", f"3:{root_lba}:+{ROOT_SECTORS}", "-t", "3:8304", "-c", "3:root")
    dd(kit.esp("gpt", {"/EFI/BOOT/BOOTX64.EFI": kit.grub_efi_unsigned("(hd0,gpt3)")}), disk, esp_lba)
    dd(kit.root_image(virtio, initramfs_virtio), disk, root_lba)
    grub_bios.install(disk, kit.bios_core("(hd0,gpt3)"), bios_lba, BIOS_BOOT_SECTORS)
    return disk


def mbr_gap(kit: Kit, out: Path) -> Path:
    """MBR: GRUB's boot.img, its core in the gap after the MBR, one active ext4 root; no ESP at all."""
    root_lba = 2048
    disk = blank(out, (root_lba + ROOT_SECTORS) * SECTOR)
    sfdisk(disk, f"label: dos\nstart={root_lba}, size={ROOT_SECTORS}, type=83, bootable\n")
    dd(kit.root_image(True), disk, root_lba)
    grub_bios.install(disk, kit.bios_core("(hd0,msdos1)"), 1, root_lba - 1)
    return disk


def gpt_signed(kit: Kit, out: Path) -> Path:
    """GPT, UEFI only, Debian's Secure Boot chain: Microsoft-signed shim as \\EFI\\BOOT\\BOOTX64.EFI,
    Debian-signed GRUB beside it as grubx64.efi (shim loads it from its own folder), the grub.cfg where that
    GRUB looks (its built-in prefix is /EFI/debian), the Debian-signed kernel on the root."""
    esp_lba = 2048
    root_lba = esp_lba + ESP_SECTORS
    disk = blank(out, (root_lba + ROOT_SECTORS + 2048) * SECTOR)
    sgdisk(disk, "-n", f"1:{esp_lba}:+{ESP_SECTORS}", "-t", "1:EF00", "-c", "1:EFI System",
           "-n", f"2:{root_lba}:+{ROOT_SECTORS}", "-t", "2:8304", "-c", "2:root")
    p = kit.parts
    esp = kit.esp("signed", {"/EFI/BOOT/BOOTX64.EFI": p.shim, "/EFI/BOOT/grubx64.efi": p.grub_signed,
                             "/EFI/debian/grub.cfg": kit.grub_script("(hd0,gpt2)", serial=False)})
    dd(esp, disk, esp_lba)
    dd(kit.root_image(True), disk, root_lba)
    return disk


def hybrid_zeroed(source: Path, out: Path) -> Path:
    """``source`` (a :func:`gpt_both` disk) with a hybrid MBR (sgdisk -h 1:3) and its boot code zeroed, as a
    UEFI-only tool leaves one: the table and 0x55AA stay, the code that would run under BIOS is gone."""
    run(require_tool("cp"), "--sparse=always", source, out)
    sgdisk(out, "-h", "1:3")
    with open(out, "r+b") as f:
        f.write(bytes(440))
    return out
