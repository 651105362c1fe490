"""Advice in the platform's terms, derived from the facts alone: one named rule per field.

A rule's name is what a manifest comment cites to say why a field has its value. The platform's defaults are
``firmware.bootloader: efi`` and a ``virtio`` disk bus and network, so the rules say when those must change:
a BIOS-only disk needs ``bios``; a Windows guest without a boot-start viostor needs ``sata``; without netkvm,
``e1000e``.
"""

from __future__ import annotations

from diskport.guest.facts import AdviceItem, GuestReport


def advise(report: GuestReport) -> list[AdviceItem]:
    items = [_guest_os(report), _bootloader(report)]
    items.append(_secure_boot(report, items[1].value))
    items.append(_bus(report))
    items.append(_network(report))
    return items


def _where(r: GuestReport) -> str:
    return f"logical volume {r.os.lv}" if r.os.lv else f"partition {r.os.partition}"


def _guest_os(r: GuestReport) -> AdviceItem:
    if r.os.type == "windows":
        return AdviceItem("guestOS", "windows", "os-windows", f"Windows found on {_where(r)}")
    if r.os.type == "linux":
        return AdviceItem("guestOS", "linux", "os-linux", f"os-release found on {_where(r)}")
    return AdviceItem("guestOS", "linux", "os-unknown", "no operating system found; the platform's default")


def _bootloader(r: GuestReport) -> AdviceItem:
    fw = r.firmware
    why = "; ".join(fw.reasons)
    if fw.verdict == "bios":
        return AdviceItem("firmware.bootloader", "bios", "firmware-bios-only", why)
    if fw.verdict in ("efi", "bios+efi"):
        rule = "firmware-efi" if fw.verdict == "efi" else "firmware-both-efi-default"
        return AdviceItem("firmware.bootloader", "efi", rule, why)
    return AdviceItem("firmware.bootloader", "efi", "firmware-unknown",
                      f"no boot loader found ({why or 'nothing to read'}); the platform's default")


def _secure_boot(r: GuestReport, loader: str | bool) -> AdviceItem:
    if loader != "efi":
        return AdviceItem("firmware.secureBoot", False, "secure-boot-needs-efi", "BIOS boot")
    if r.firmware.secure_boot:
        return AdviceItem("firmware.secureBoot", True, "secure-boot-signed", r.firmware.secure_boot_reason)
    return AdviceItem("firmware.secureBoot", False, "secure-boot-unsigned", r.firmware.secure_boot_reason)


def _bus(r: GuestReport) -> AdviceItem:
    if r.os.type == "windows":
        viostor = r.driver("viostor")
        if viostor is not None and viostor.state == "installed":
            return AdviceItem("bus", "virtio", "windows-viostor", viostor.evidence)
        why = viostor.evidence if viostor is not None else "no SYSTEM hive"
        return AdviceItem("bus", "sata", "windows-no-viostor",
                          f"viostor is not loaded at boot ({why}): Windows would stop with "
                          "INACCESSIBLE_BOOT_DEVICE on virtio; slipstream the virtio-win drivers before upload "
                          "to use virtio")
    if r.os.type == "linux":
        return _linux_bus(r)
    return AdviceItem("bus", "virtio", "bus-default", "no operating system found; the platform's default")


def _network(r: GuestReport) -> AdviceItem:
    if r.os.type == "windows":
        netkvm = r.driver("netkvm")
        if netkvm is not None and netkvm.state == "installed":
            return AdviceItem("network", "virtio", "windows-netkvm", netkvm.evidence)
        return AdviceItem("network", "e1000e", "windows-no-netkvm",
                          "netkvm (the VirtIO network driver) is not installed; Windows has e1000e inbox")
    if r.os.type == "linux":
        net = r.driver("virtio_net")
        if net is not None and net.state in ("missing",):
            return AdviceItem("network", "e1000e", "linux-no-virtio-net", net.evidence)
        return AdviceItem("network", "virtio", "linux-virtio-net",
                          net.evidence if net is not None else "the platform's default")
    return AdviceItem("network", "virtio", "network-default", "the platform's default")


def _linux_bus(r: GuestReport) -> AdviceItem:
    """virtio when the kernel can reach a virtio disk before the root is mounted: virtio_blk built in, or a
    module its initramfs holds; sata when only ahci can; and the reason says which bus would fail."""
    blk, ahci = r.driver("virtio_blk"), r.driver("ahci")
    sata_ok = ahci is not None and (ahci.state == "builtin" or (ahci.state == "module" and ahci.initramfs is not False))
    no_ahci = "" if ahci is None or sata_ok else (
        "; ahci is missing from the kernel: on the sata bus the disk would not be found either"
        if ahci.state == "missing" else "; ahci is a module the initramfs lacks: sata would not find the disk either")
    if blk is not None and blk.state == "builtin":
        return AdviceItem("bus", "virtio", "linux-virtio-blk", f"virtio_blk builtin: {blk.evidence}")
    if blk is not None and blk.state == "module" and blk.initramfs is not False:
        return AdviceItem("bus", "virtio", "linux-virtio-blk", f"virtio_blk module: {blk.evidence}"
                          + (no_ahci if ahci is not None and ahci.state == "missing" else ""))
    if blk is not None and blk.state == "module":
        if sata_ok:
            return AdviceItem("bus", "sata", "linux-initramfs-no-virtio-blk",
                              f"boots on sata, not on virtio: virtio_blk is a module its initramfs does not hold "
                              f"({blk.evidence}); rebuild the initramfs with virtio_blk (dracut --add-drivers "
                              "virtio_blk, or initramfs-tools' /etc/initramfs-tools/modules) to use virtio")
        return AdviceItem("bus", "virtio", "linux-initramfs-no-disk-driver",
                          f"virtio_blk is a module its initramfs does not hold ({blk.evidence}){no_ahci}: rebuild "
                          "the initramfs with virtio_blk; virtio is the platform's default")
    if ahci is not None and ahci.state == "missing":
        return AdviceItem("bus", "virtio", "linux-no-disk-driver",
                          "the kernel has neither virtio_blk nor ahci; virtio is the platform's default")
    why = blk.evidence if blk is not None else "no kernel found"
    return AdviceItem("bus", "sata", "linux-no-virtio-blk", f"virtio_blk not found ({why}){no_ahci}")
