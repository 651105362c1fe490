"""inspect_guest's firmware and bus verdicts, proved by booting the same disks under qemu (TCG).

Each test inspects a disk, predicts from the report alone what the boot will do (:func:`.verdict.predict`: a BIOS
verdict means SeaBIOS reaches our kernel, no UEFI loader means OVMF falls to its shell, no Secure Boot means
OVMF with Microsoft's keys refuses the loader, a missing disk driver means /init finds no root on that bus),
boots the disk, and asserts that the boot did that — and that the verdict is the one this layout must get. A
wrong verdict fails twice: against the literal expectation and against the firmware.

The default run boots five times (about 55 s of guest time over two workers); the other boots are ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diskport.guest import inspect_guest
from diskport.guest.facts import GuestReport
from tests.guest.boot import qemu
from tests.guest.boot.debs import BootParts
from tests.guest.boot.disks import Kit
from tests.guest.boot.verdict import MS_UEFI_CAS, NO_BOOT_WINDOW, TIMEOUT, Record, boot_and_check, observed, predict


def state(report: GuestReport, driver: str) -> str | None:
    found = report.driver(driver)
    return None if found is None else found.state


def assert_linux(report: GuestReport, parts: BootParts) -> None:
    assert report.os.type == "linux" and report.os.distribution == "debian" and report.os.version == "12"
    assert report.os.kernels == [parts.kernel_release] and report.os.architecture == "x86_64"


def test_gpt_with_esp_and_bios_boot_partition_boots_under_bios(
        gpt_both_disk: Path, boot_kit: Kit, tmp_path: Path, record_property: Record) -> None:
    report = inspect_guest(gpt_both_disk)
    assert report.firmware.verdict == "bios+efi" and report.firmware.boot_code == "grub"
    assert report.advised("firmware.bootloader") == "efi" and report.advised("bus") == "virtio"
    assert state(report, "virtio_blk") == "module"
    assert report.advised("network") == "virtio"
    assert_linux(report, boot_kit.parts)
    result = boot_and_check(report, gpt_both_disk, tmp_path, "bios", "virtio", "root-found", record_property)
    assert result.root_device == "/dev/vda3"


@pytest.mark.slow
def test_gpt_with_esp_and_bios_boot_partition_boots_under_uefi(
        gpt_both_disk: Path, tmp_path: Path, record_property: Record) -> None:
    report = inspect_guest(gpt_both_disk)
    assert report.firmware.verdict == "bios+efi" and report.firmware.efi
    boot_and_check(report, gpt_both_disk, tmp_path, "efi", "virtio", "root-found", record_property)


def test_unsigned_loader_is_refused_under_secure_boot(
        gpt_both_disk: Path, tmp_path: Path, record_property: Record) -> None:
    report = inspect_guest(gpt_both_disk)
    fallback = report.firmware.loaders[0]
    assert (fallback.path, fallback.role, fallback.signed) == ("\\EFI\\BOOT\\BOOTX64.EFI", "fallback", False)
    assert not report.firmware.secure_boot and report.advised("firmware.secureBoot") is False
    boot_and_check(report, gpt_both_disk, tmp_path, "efi-secure", "virtio", "access-denied", record_property)


def test_microsoft_signed_shim_boots_under_secure_boot(
        gpt_signed_disk: Path, boot_kit: Kit, tmp_path: Path, record_property: Record) -> None:
    """Debian's chain: shim (Microsoft's UEFI CA) -> grubx64.efi and the kernel (Debian's CA, in shim).

    Until the Authenticode check names the signer, the report has secure_boot False and this test fails on the
    verdict after the boot has shown that Secure Boot works."""
    report = inspect_guest(gpt_signed_disk)
    assert report.firmware.verdict == "efi" and not report.firmware.bios
    assert_linux(report, boot_kit.parts)
    result = qemu.boot(gpt_signed_disk, tmp_path / "qemu", "efi-secure", "virtio", TIMEOUT["efi-secure"])
    record_property("boot_seconds", round(result.seconds, 1))
    record_property("boot_outcome", result.outcome)
    record_property("verdict", report.verdict_line())
    assert observed(result) == "root-found", result
    assert not result.failed_modules, result  # signed modules load under lockdown
    fallback = report.firmware.loaders[0]
    assert (fallback.path, fallback.signed) == ("\\EFI\\BOOT\\BOOTX64.EFI", True)
    assert fallback.signer in MS_UEFI_CAS and fallback.digest_ok is True, fallback
    assert report.firmware.secure_boot, report.firmware.secure_boot_reason
    assert report.advised("firmware.secureBoot") is True
    assert predict(report, "efi-secure", "virtio") == "root-found"


def test_mbr_with_grub_in_the_gap_has_no_uefi_path(
        mbr_gap_disk: Path, tmp_path: Path, record_property: Record) -> None:
    report = inspect_guest(mbr_gap_disk)
    assert report.scheme == "mbr" and report.firmware.verdict == "bios"
    assert any("gap" in r for r in report.firmware.reasons)
    item = next(a for a in report.advice if a.field == "firmware.bootloader")
    assert (item.value, item.rule) == ("bios", "firmware-bios-only")
    boot_and_check(report, mbr_gap_disk, tmp_path, "efi", "virtio", "uefi-shell", record_property)


@pytest.mark.slow
def test_mbr_with_grub_in_the_gap_boots_under_bios(
        mbr_gap_disk: Path, tmp_path: Path, record_property: Record) -> None:
    report = inspect_guest(mbr_gap_disk)
    assert report.firmware.verdict == "bios"
    result = boot_and_check(report, mbr_gap_disk, tmp_path, "bios", "virtio", "root-found", record_property)
    assert result.root_device == "/dev/vda1"


def test_kernel_without_virtio_blk_finds_no_root_on_virtio(
        gpt_novirtio_disk: Path, tmp_path: Path, record_property: Record) -> None:
    report = inspect_guest(gpt_novirtio_disk)
    assert state(report, "virtio_blk") == "missing"
    assert state(report, "ahci") == "module"
    item = next(a for a in report.advice if a.field == "bus")
    assert (item.value, item.rule) == ("sata", "linux-no-virtio-blk")
    result = boot_and_check(report, gpt_novirtio_disk, tmp_path, "bios", "virtio", "root-missing",
                            record_property)
    assert list(result.stages) == ["grub", "kernel"], result  # the kernel ran; only the disk was not there
    assert result.detail is not None and "virtio block device without a driver" in result.detail, result


@pytest.mark.slow
def test_kernel_without_virtio_blk_finds_its_root_on_sata(
        gpt_novirtio_disk: Path, tmp_path: Path, record_property: Record) -> None:
    report = inspect_guest(gpt_novirtio_disk)
    assert report.advised("bus") == "sata"
    result = boot_and_check(report, gpt_novirtio_disk, tmp_path, "bios", "sata", "root-found", record_property)
    assert result.root_device == "/dev/sda3"


def test_initramfs_without_virtio_blk_finds_no_root_on_virtio(
        gpt_initramfs_novirtio_disk: Path, tmp_path: Path, record_property: Record) -> None:
    """virtio_blk is a module of the kernel but the initramfs lacks it: "boots on sata, not on virtio"."""
    report = inspect_guest(gpt_initramfs_novirtio_disk)
    blk = report.driver("virtio_blk")
    assert blk is not None and (blk.state, blk.initramfs) == ("module", False), blk
    item = next(a for a in report.advice if a.field == "bus")
    assert (item.value, item.rule) == ("sata", "linux-initramfs-no-virtio-blk")
    assert "boots on sata, not on virtio" in item.reason
    result = boot_and_check(report, gpt_initramfs_novirtio_disk, tmp_path, "bios", "virtio", "root-missing",
                            record_property)
    assert result.detail is not None and "virtio block device without a driver" in result.detail, result


@pytest.mark.slow
def test_initramfs_without_virtio_blk_finds_its_root_on_sata(
        gpt_initramfs_novirtio_disk: Path, tmp_path: Path, record_property: Record) -> None:
    report = inspect_guest(gpt_initramfs_novirtio_disk)
    assert report.advised("bus") == "sata"
    result = boot_and_check(report, gpt_initramfs_novirtio_disk, tmp_path, "bios", "sata", "root-found",
                            record_property)
    assert result.root_device == "/dev/sda3"


@pytest.mark.slow
def test_hybrid_mbr_with_zeroed_code_boots_nothing_under_bios(
        hybrid_zeroed_disk: Path, tmp_path: Path, record_property: Record) -> None:
    """SeaBIOS checks only 0x55AA, so it jumps into the zeroed code (it never says "No bootable device"):
    nothing after "Booting from Hard Disk..." within the window is the proof that no loader ran."""
    report = inspect_guest(hybrid_zeroed_disk)
    assert report.hybrid_mbr and report.firmware.boot_code == "zero"
    assert not report.firmware.bios and report.firmware.verdict == "efi"
    result = boot_and_check(report, hybrid_zeroed_disk, tmp_path, "bios", "virtio", "no-boot", record_property,
                            timeout=NO_BOOT_WINDOW)
    assert "Booting from Hard Disk" in result.serial + result.firmware_log, result


@pytest.mark.slow
def test_hybrid_mbr_with_zeroed_code_boots_under_uefi(
        hybrid_zeroed_disk: Path, tmp_path: Path, record_property: Record) -> None:
    report = inspect_guest(hybrid_zeroed_disk)
    assert report.firmware.verdict == "efi" and report.advised("firmware.bootloader") == "efi"
    boot_and_check(report, hybrid_zeroed_disk, tmp_path, "efi", "virtio", "root-found", record_property)
