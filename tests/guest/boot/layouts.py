"""The Rocky-style and Fedora-style guest layouts of tests/guest/test_inspect_lvm.py and test_fedora.py, made
bootable: Debian's kernel and the busybox initramfs of :mod:`.initramfs` in the distribution's own places, and
a GRUB from ``grub-mkimage`` that reads them from the distribution's /boot.

- Rocky: GPT with 1 ESP (a standalone x86_64-efi GRUB), 2 a BIOS boot partition (an i386-pc core, boot.img in
  the protective MBR), 3 XFS /boot (``mkfs.xfs -p``) holding the kernel, ``initramfs-VERSION.img`` and a BLS
  entry, 4 an LVM PV whose VG holds an XFS root LV of two segments (``lvextend``) and a swap LV.
- Fedora: GPT with 1 ESP (GRUB as above), 2 ext4 /boot with a BLS entry, 3 btrfs with ``root`` and ``home``
  subvolumes, written through a loop mount with zstd compression; no BIOS boot partition and no MBR code, as a
  UEFI install leaves the disk.

GRUB also ``cat``s the root's os-release (from the LV through its ``lvm`` module, from the ``root`` subvolume
through ``btrfs``) before loading the kernel, so the serial console shows that an independent reader found the
root where inspection did; on the LV that file's data lies in the second segment (checked when it is built).
Each GRUB is built with only the modules its layout needs, so a missing one fails.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.guest.boot import grub_bios
from tests.guest.boot.disks import GRUB_MARK, SECTOR, Kit, dd
from tests.guest.boot.initramfs import ROOT_LABEL, build_initramfs, install_modules, module_closure
from tests.guest.filesystems.btrfs_images import btrfs, mkfs_btrfs, mounted
from tests.guest.filesystems.images import mkfs_ext
from tests.guest.filesystems.xfs_images import fsblock_byte, mkfs_xfs, xfs_db
from tests.guest.support import blank, sgdisk
from tests.guest.volumes.lvm_images import extent_size, lvm, pe_starts, pv_files, segments, vg_name, write_linear_lv
from tests.support.clients import require_tool, run

MiB = 1024 * 1024
ESP_SECTORS = 65536
BIOS_BOOT_SECTORS = 2048
ROCKY_OS_RELEASE = ('NAME="Rocky Linux"\nVERSION="9.3 (Blue Onyx)"\nID="rocky"\nID_LIKE="rhel centos fedora"\n'
                    'VERSION_ID="9.3"\nPRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"\n')
FEDORA_OS_RELEASE = ('NAME="Fedora Linux"\nVERSION="39 (Cloud Edition)"\nID=fedora\nVERSION_ID=39\n'
                     'PRETTY_NAME="Fedora Linux 39 (Cloud Edition)"\n')
FEDORA_ROOT_UUID = "5f2b7e0c-3a1d-4c53-9d0e-2b1a6c7d8e9f"
FEDORA_BOOT_UUID = "b007b007-0000-4000-8000-000000000002"
MACHINE_ID = "0123456789abcdef0123456789abcdef"
#: GRUB's output to the serial port only: SeaBIOS (no VGA here) sends int 10h text to the same port, so GRUB's
#: "console" terminal as well would interleave every character twice.
SERIAL = "serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial\n"
BIOS_BASE = ("biosdisk", "part_gpt", "linux", "serial", "terminal", "echo", "cat")
EFI_BASE = ("part_gpt", "fat", "linux", "echo", "cat", "normal")


@dataclass
class Layout:
    disk: Path
    #: The PRETTY_NAME line GRUB prints when it has read the root's os-release.
    os_release_line: str
    #: The root device /init must find (by the label): a partition, or the loop over the LV's first extent.
    root_device: str
    vg: str | None = None


def _bls(kit: Kit, options: str, title: str) -> str:
    rel = kit.parts.kernel_release
    return (f"title {title}\nversion {rel}\nlinux /vmlinuz-{rel}\ninitrd /initramfs-{rel}.img\n"
            f"options {options}\n")


def _grub_script(kit: Kit, *, serial: bool, root_os_release: str, boot: str, options: str) -> str:
    rel = kit.parts.kernel_release
    return (f"{SERIAL if serial else ''}echo {GRUB_MARK}\ncat {root_os_release}\n"
            f"linux {boot}/vmlinuz-{rel} {options}\ninitrd {boot}/initramfs-{rel}.img\nboot\n")


def _efi_grub(kit: Kit, name: str, script: str, modules: tuple[str, ...]) -> Path:
    out = kit.work / f"grubx64-{name}.efi"
    cfg = out.with_suffix(".cfg")
    cfg.write_text(script)
    run(require_tool("grub-mkimage"), "-O", "x86_64-efi", "-o", out, "-c", cfg, "-p", "/EFI/BOOT", *modules)
    return out


def _bios_core(kit: Kit, name: str, script: str, prefix: str, modules: tuple[str, ...]) -> Path:
    out = kit.work / f"core-{name}.img"
    cfg = out.with_suffix(".cfg")
    cfg.write_text(script)
    return grub_bios.core_image(out, cfg, prefix, modules)


def _usrmerged_root(kit: Kit, tree: Path, os_release: str, fstab: str, drivers: tuple[str, ...]) -> None:
    """/usr-merged as Rocky and Fedora are: os-release in /usr/lib, bin and lib symlinks, busybox as sh,
    the kernel's modules (exactly those the initramfs carries) under /usr/lib/modules."""
    for rel in ("etc", "usr/bin", "usr/lib", "boot", "home", "var"):
        (tree / rel).mkdir(parents=True, exist_ok=True)
    (tree / "usr/lib/os-release").write_text(os_release)
    os.symlink("../usr/lib/os-release", tree / "etc/os-release")
    (tree / "etc/fstab").write_text(fstab)
    shutil.copy(require_tool("busybox"), tree / "usr/bin/sh")
    os.symlink("usr/bin", tree / "bin")
    os.symlink("usr/lib", tree / "lib")
    p = kit.parts
    install_modules(tree, p.modules, p.kernel_release, module_closure(p.modules, drivers, kit.work))


def _boot_tree(kit: Kit, tree: Path, name: str, drivers: tuple[str, ...], bls: str) -> Path:
    p = kit.parts
    (tree / "loader/entries").mkdir(parents=True)
    shutil.copy(p.vmlinuz, tree / p.vmlinuz.name)
    shutil.copy(p.config, tree / p.config.name)
    build_initramfs(tree / f"initramfs-{p.kernel_release}.img", kit.work / f"stage-{name}", p.modules,
                    p.kernel_release, drivers)
    (tree / "loader/entries" / f"{MACHINE_ID}-{p.kernel_release}.conf").write_text(bls)
    return tree


def _xfs_data_byte(image: Path, path: str) -> int:
    """Where the first block of ``path``'s data lies in the XFS ``image`` (``xfs_db bmap``, then ``convert``)."""
    out = xfs_db(image, f"path {path}", "bmap")
    m = re.search(r"startblock (\d+)", out)
    if m is None:
        raise AssertionError(f"xfs_db bmap {path}: {out}")
    return fsblock_byte(image, int(m[1]))


def rocky(kit: Kit, out: Path) -> Layout:
    work = kit.work / "rocky"
    work.mkdir()
    vg = vg_name()
    drivers = (*kit.drivers(True), "loop")
    fstab = (f"/dev/mapper/{vg}-root / xfs defaults 0 0\nLABEL=boot /boot xfs defaults 0 0\n"
             f"/dev/mapper/{vg}-swap none swap defaults 0 0\n")
    tree = work / "root"
    _usrmerged_root(kit, tree, ROCKY_OS_RELEASE, fstab, drivers)
    root = mkfs_xfs(work / "root.img", tree, ("-L", ROOT_LABEL), size=320 * MiB)
    swap = blank(work / "swap.img", 16 * MiB)
    run(require_tool("mkswap"), swap)
    with pv_files(work, 400 * MiB) as [(pv_file, dev)]:
        lvm("vgcreate", "--driverloaded", "n", vg, dev)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-L", "200M", "-n", "root", vg)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-L", "16M", "-n", "swap", vg)
        lvm("lvextend", "--driverloaded", "n", "-L", "320M", f"{vg}/root")
        root_segments = [s for s in segments(vg) if s.lv == "root"]
        if len(root_segments) != 2:
            raise AssertionError(f"lvextend gave {root_segments}, not two segments")
        first = min(root_segments, key=lambda s: s.start)
        lv_offset = pe_starts(vg)[first.pv] + first.first_pe * extent_size(vg)
        at = _xfs_data_byte(root, "/usr/lib/os-release")
        if at < first.size:  # mkfs.xfs put /usr/lib in a later allocation group: keep it so
            raise AssertionError(f"os-release's data is at {at} in the LV, in its first segment: GRUB's read "
                                 "of it would not show that the second segment is mapped")
        write_linear_lv(vg, "root", root, {dev: pv_file})
        write_linear_lv(vg, "swap", swap, {dev: pv_file})
    options = (f"root=/dev/mapper/{vg}-root ro rd.lvm.lv={vg}/root console=ttyS0 panic=-1 "
               f"diskport.loop=vda4@{lv_offset}")
    boot = mkfs_xfs(work / "boot.img", _boot_tree(kit, work / "boot", "rocky", drivers,
                                                  _bls(kit, options, "Rocky Linux")), ("-L", "boot"))
    esp_lba, bios_lba = 2048, 2048 + ESP_SECTORS
    boot_lba = bios_lba + BIOS_BOOT_SECTORS
    boot_sectors = boot.stat().st_size // SECTOR
    pv_lba = boot_lba + boot_sectors
    pv_sectors = pv_file.stat().st_size // SECTOR
    disk = blank(out, (pv_lba + pv_sectors + 2048) * SECTOR)
    sgdisk(disk, "-n", f"1:{esp_lba}:+{ESP_SECTORS}", "-t", "1:EF00", "-c", "1:EFI System Partition",
           "-n", f"2:{bios_lba}:+{BIOS_BOOT_SECTORS}", "-t", "2:EF02", "-c", "2:BIOS boot",
           "-n", f"3:{boot_lba}:+{boot_sectors}", "-t", "3:8300", "-c", "3:boot",
           "-n", f"4:{pv_lba}:+{pv_sectors}", "-t", "4:8E00", "-c", "4:lvm")
    lv_root = f"(lvm/{vg}-root)/usr/lib/os-release"
    efi = _efi_grub(kit, "rocky", _grub_script(kit, serial=False, root_os_release=lv_root, boot="(hd0,gpt3)",
                                               options=options), (*EFI_BASE, "xfs", "lvm"))
    dd(kit.esp("rocky", {"/EFI/BOOT/BOOTX64.EFI": efi}), disk, esp_lba)
    dd(boot, disk, boot_lba)
    dd(pv_file, disk, pv_lba)
    core = _bios_core(kit, "rocky", _grub_script(kit, serial=True, root_os_release=lv_root, boot="(hd0,gpt3)",
                                                 options=options),
                      "(hd0,gpt3)/grub2", (*BIOS_BASE, "xfs", "lvm"))
    grub_bios.install(disk, core, bios_lba, BIOS_BOOT_SECTORS)
    return Layout(disk, 'PRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"', "/dev/loop0", vg)


def fedora(kit: Kit, out: Path) -> Layout:
    work = kit.work / "fedora"
    work.mkdir()
    drivers = kit.drivers(True)
    image = mkfs_btrfs(work / "root.img", 300 * MiB, None, "-U", FEDORA_ROOT_UUID, label=ROOT_LABEL)
    fstab = (f"UUID={FEDORA_ROOT_UUID} / btrfs subvol=root,compress=zstd:1 0 0\n"
             f"UUID={FEDORA_BOOT_UUID} /boot ext4 defaults 1 2\n"
             f"UUID={FEDORA_ROOT_UUID} /home btrfs subvol=home,compress=zstd:1 0 0\n")
    with mounted(image, work / "mnt", "compress=zstd:1") as mnt:
        btrfs("subvolume", "create", mnt / "root")
        btrfs("subvolume", "create", mnt / "home")
        _usrmerged_root(kit, mnt / "root", FEDORA_OS_RELEASE, fstab, drivers)
        (mnt / "home/fedora").mkdir()
    options = f"root=UUID={FEDORA_ROOT_UUID} ro rootflags=subvol=root console=ttyS0 panic=-1"
    tree = _boot_tree(kit, work / "boot", "fedora", drivers,
                      _bls(kit, options, "Fedora Linux 39 (Cloud Edition)"))
    (tree / "grub2").mkdir()
    (tree / "grub2/grub.cfg").write_text("set default=0\ninsmod blscfg\nblscfg\n")
    boot = mkfs_ext(work / "boot.img", tree, size="120M", label="boot", options=("-U", FEDORA_BOOT_UUID))
    esp_lba = 2048
    boot_lba = esp_lba + ESP_SECTORS
    boot_sectors = boot.stat().st_size // SECTOR
    root_lba = boot_lba + boot_sectors
    root_sectors = image.stat().st_size // SECTOR
    disk = blank(out, (root_lba + root_sectors + 2048) * SECTOR)
    sgdisk(disk, "-n", f"1:{esp_lba}:+{ESP_SECTORS}", "-t", "1:EF00", "-c", "1:EFI System Partition",
           "-n", f"2:{boot_lba}:+{boot_sectors}", "-t", "2:8300", "-c", "2:boot",
           "-n", f"3:{root_lba}:+{root_sectors}", "-t", "3:8300", "-c", "3:root")
    efi = _efi_grub(kit, "fedora", _grub_script(kit, serial=False, root_os_release="(hd0,gpt3)/root/usr/lib/"
                                                "os-release", boot="(hd0,gpt2)", options=options),
                    (*EFI_BASE, "ext2", "btrfs"))
    dd(kit.esp("fedora", {"/EFI/BOOT/BOOTX64.EFI": efi}), disk, esp_lba)
    dd(boot, disk, boot_lba)
    dd(image, disk, root_lba)
    return Layout(disk, 'PRETTY_NAME="Fedora Linux 39 (Cloud Edition)"', "/dev/vda3")
