"""The Rocky-style (GPT, XFS /boot, XFS root on a two-segment LV) and Fedora-style (GPT, ext4 /boot, btrfs
``root`` subvolume, UEFI only) layouts of :mod:`.layouts`, inspected and then booted under each firmware.

inspect_guest's report on the disk predicts the boot (:func:`.verdict.predict`); GRUB built with only
``xfs``+``lvm`` or ``ext2``+``btrfs`` must then read the kernel and initramfs from that /boot and the root's
os-release from the LV or the subvolume, and /init must find the root on virtio. The Fedora disk has no BIOS
boot path, so SeaBIOS must run nothing, as its verdict says.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diskport.guest import inspect_guest
from diskport.guest.facts import GuestReport
from tests.guest.boot import qemu
from tests.guest.boot.disks import Kit
from tests.guest.boot.initramfs import LOOPED
from tests.guest.boot.layouts import Layout
from tests.guest.boot.verdict import NO_BOOT_WINDOW, Record, boot_and_check

pytestmark = pytest.mark.slow


def check_rocky(report: GuestReport, layout: Layout, kit: Kit) -> None:
    assert report.os.type == "linux" and report.os.distribution == "rocky" and report.os.version == "9.3"
    assert report.os.lv == f"{layout.vg}/root" and report.os.partition is None and report.os.boot_partition == 3
    assert report.os.kernels == [kit.parts.kernel_release]
    assert report.firmware.verdict == "bios+efi" and report.firmware.boot_code == "grub"
    assert [(v.number, v.filesystem) for v in report.volumes] == [
        (1, "vfat"), (2, None), (3, "xfs"), (4, "LVM2_member"), (None, "xfs"), (None, "swap")], report.volumes
    root = report.volumes[4]
    assert (root.lv, root.vg, root.lv_segments) == ("root", layout.vg, 2)
    blk = report.driver("virtio_blk")
    assert blk is not None and (blk.state, blk.initramfs) == ("module", True), blk
    assert report.advised("bus") == "virtio" and report.advised("firmware.bootloader") == "efi"


def check_fedora(report: GuestReport, kit: Kit) -> None:
    assert report.os.type == "linux" and report.os.distribution == "fedora" and report.os.version == "39"
    assert report.os.partition == 3 and report.os.root_subvolume == "root" and report.os.boot_partition == 2
    assert report.os.kernels == [kit.parts.kernel_release]
    assert report.firmware.verdict == "efi" and not report.firmware.bios
    blk = report.driver("virtio_blk")
    assert blk is not None and (blk.state, blk.initramfs) == ("module", True), blk
    assert report.advised("bus") == "virtio" and report.advised("firmware.bootloader") == "efi"


def booted(report: GuestReport, layout: Layout, tmp_path: Path, firmware: qemu.Firmware,
           record: Record) -> qemu.BootResult:
    result = boot_and_check(report, layout.disk, tmp_path, firmware, "virtio", "root-found", record)
    assert result.root_device == layout.root_device, result
    grub_at = result.serial.index("DISKPORT-GRUB")
    assert layout.os_release_line in result.serial[grub_at:], result  # GRUB read the root where inspect did
    return result


@pytest.mark.parametrize("firmware", ["bios", "efi"])
def test_rocky_xfs_boot_and_lvm_root_boot_as_the_verdict_says(
        rocky_boot_disk: Layout, boot_kit: Kit, tmp_path: Path, record_property: Record,
        firmware: qemu.Firmware) -> None:
    report = inspect_guest(rocky_boot_disk.disk)
    check_rocky(report, rocky_boot_disk, boot_kit)
    result = booted(report, rocky_boot_disk, tmp_path, firmware, record_property)
    assert f"{LOOPED} vda4@" in result.serial, result


def test_fedora_btrfs_boots_under_uefi(
        fedora_boot_disk: Layout, boot_kit: Kit, tmp_path: Path, record_property: Record) -> None:
    report = inspect_guest(fedora_boot_disk.disk)
    check_fedora(report, boot_kit)
    booted(report, fedora_boot_disk, tmp_path, "efi", record_property)


def test_fedora_btrfs_boots_nothing_under_bios(
        fedora_boot_disk: Layout, boot_kit: Kit, tmp_path: Path, record_property: Record) -> None:
    """No BIOS boot partition and the zeroed code sgdisk's protective MBR has: SeaBIOS runs nothing."""
    report = inspect_guest(fedora_boot_disk.disk)
    check_fedora(report, boot_kit)
    result = boot_and_check(report, fedora_boot_disk.disk, tmp_path, "bios", "virtio", "no-boot",
                            record_property, timeout=NO_BOOT_WINDOW)
    assert "Booting from Hard Disk" in result.serial + result.firmware_log, result
