"""Predicting a boot from inspect_guest's report, and booting to check it: shared by the boot tests.

:func:`predict` says from the report alone what booting must do (a BIOS verdict means SeaBIOS reaches our kernel,
no UEFI loader means OVMF falls to its shell, no Secure Boot means OVMF with Microsoft's keys refuses the loader,
a missing disk driver means /init finds no root on that bus); :func:`boot_and_check` boots and asserts the boot,
the prediction and the layout's expected outcome agree.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diskport.guest.facts import GuestReport
from tests.guest.boot import qemu

Record = Callable[[str, object], None]
#: shim 16.1 carries two Authenticode signatures, one chaining to Microsoft Corporation UEFI CA 2011 and one to
#: Microsoft UEFI CA 2023 (openssl pkcs7 -print_certs on each WIN_CERTIFICATE); either names a CA the platform
#: trusts, and the 2011 one is what this OVMF's db holds.
MS_UEFI_CAS = ("Microsoft UEFI CA 2011", "Microsoft UEFI CA 2023")
#: Under SeaBIOS GRUB prints within a second of the MBR running (0.3-0.8 s measured); a disk that shows nothing
#: for this long after "Booting from Hard Disk..." runs no boot loader.
NO_BOOT_WINDOW = 15.0
TIMEOUT = {"bios": 90.0, "efi": 120.0, "efi-secure": 120.0}


def predict(report: GuestReport, firmware: qemu.Firmware, bus: qemu.Bus) -> str:
    """What booting the disk must do, from inspect_guest's report alone."""
    fw = report.firmware
    if firmware == "bios" and not fw.bios:
        return "no-boot"
    if firmware != "bios" and not fw.efi:
        return "uefi-shell"
    if firmware == "efi-secure" and not fw.secure_boot:
        return "access-denied"
    driver = report.driver("virtio_blk" if bus == "virtio" else "ahci")
    usable = driver is not None and (driver.state == "builtin"
                                     or (driver.state == "module" and driver.initramfs is not False))
    return "root-found" if usable else "root-missing"


def observed(result: qemu.BootResult) -> str:
    if result.outcome == "no-bootable-device" or (result.outcome == "timeout" and not result.stages):
        return "no-boot"
    return result.outcome


def boot_and_check(report: GuestReport, disk: Path, tmp_path: Path, firmware: qemu.Firmware, bus: qemu.Bus,
                   expected: str, record: Record, timeout: float | None = None) -> qemu.BootResult:
    result = qemu.boot(disk, tmp_path / "qemu", firmware, bus, timeout or TIMEOUT[firmware])
    record("boot_seconds", round(result.seconds, 1))
    record("boot_outcome", result.outcome)
    record("verdict", report.verdict_line())
    got, predicted = observed(result), predict(report, firmware, bus)
    assert (got, predicted) == (expected, expected), (
        f"boot did {got!r}, the report predicts {predicted!r}, this layout must give {expected!r}\n"
        f"report: {report.verdict_line()}; firmware reasons {report.firmware.reasons}; secure boot: "
        f"{report.firmware.secure_boot_reason}\n{result}")
    assert not result.failed_modules, result  # every module the root's evidence lists loads in the guest
    if got == "root-found":
        assert result.root_disk is not None
        assert result.root_disk.startswith("/dev/vd" if bus == "virtio" else "/dev/sd"), result
        assert list(result.stages) == ["grub", "kernel"], result
    return result
