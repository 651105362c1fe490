"""Which firmware boots the disk: BIOS, UEFI, both, or neither that can be seen — and whether Secure Boot can.

BIOS boots sector 0's code. It counts as a BIOS boot path when that code is a known loader and what it needs is
there: GRUB's boot.img needs its core image (in a BIOS boot partition on GPT, or in the gap after the MBR);
Windows' and syslinux's MBR code need an active partition. Zeroed code boots nothing under BIOS, which is what
a hybrid MBR written by a UEFI-only tool usually has.

UEFI with a fresh NVRAM, as a new VM has, boots only the removable-media path ``\\EFI\\BOOT\\BOOTX64.EFI``
(BOOTAA64.EFI on arm64) of a FAT volume; vendor loaders (``\\EFI\\Microsoft\\Boot\\bootmgfw.efi``, shim, grub,
systemd-boot) are listed beside it, and a disk that has only those is flagged, since no boot entry will point at
them. The ESP is the GPT/MBR-typed one; another FAT volume with the fallback loader is taken too, with a reason.

Secure Boot under the platform's OVMF (Microsoft's keys enrolled) is possible when the fallback loader carries an
Authenticode signature from Microsoft's UEFI CA (shim, third-party loaders) or Windows Production PCA (Windows
Boot Manager) and its image digest matches the signature.
"""

from __future__ import annotations

from typing import Any

from diskport.errors import DiskportError
from diskport.guest.authenticode import AUTHORITIES, read_signature
from diskport.guest.facts import FirmwareFacts, LoaderFacts
from diskport.guest.filesystems.base import Filesystem
from diskport.guest.view import GuestView
from diskport.guest.volumes import Partition, PartitionTable

ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
BIOS_BOOT_GUID = "21686148-6449-6e6f-744e-656564454649"
FALLBACK = ("/EFI/BOOT/BOOTX64.EFI", "/EFI/BOOT/BOOTAA64.EFI")
VENDOR_LOADERS = {
    "/EFI/Microsoft/Boot/bootmgfw.efi": "windows",
    "shimx64.efi": "shim",
    "grubx64.efi": "grub",
    "systemd-bootx64.efi": "systemd-boot",
}
#: Signers whose certificates the platform's Secure Boot db (Microsoft's keys) trusts.
TRUSTED_SIGNERS = tuple(AUTHORITIES.values())


def is_esp(part: Partition) -> bool:
    return part.type.lower() in (ESP_GUID, "0xef")


def firmware_facts(table: PartitionTable, view: GuestView,
                   fat_volumes: list[tuple[Partition, Filesystem[Any]]]) -> FirmwareFacts:
    facts = FirmwareFacts()
    facts.boot_code = table.boot_code_kind()
    _bios(facts, table, view)
    _efi(facts, fat_volumes)
    facts.verdict = ("bios+efi" if facts.bios and facts.efi else "bios" if facts.bios
                     else "efi" if facts.efi else "unknown")
    return facts


def _bios(facts: FirmwareFacts, table: PartitionTable, view: GuestView) -> None:
    code = facts.boot_code
    if table.scheme == "none":
        facts.boot_code = None
        facts.reasons.append("no partition table: sector 0 is a filesystem's own boot sector")
        return
    if code in (None, "zero"):
        facts.reasons.append("MBR boot code is zeroed: nothing boots under BIOS" +
                             (" (a hybrid MBR)" if table.hybrid_mbr else "") if code == "zero" else
                             "no sector 0")
        return
    if code == "grub":
        bios_boot = [p for p in table.partitions if p.type.lower() == BIOS_BOOT_GUID]
        if table.scheme == "gpt":
            if bios_boot and any(bios_boot[0].view.pread(0, 512)):
                facts.bios = True
                facts.reasons.append(f"GRUB boot code in the MBR, its core in BIOS boot partition "
                                     f"{bios_boot[0].number}")
            else:
                facts.reasons.append("GRUB boot code in the MBR, but no BIOS boot partition holds its core")
            return
        first = min((p.start for p in table.partitions), default=view.size)
        if first >= 2 * table.sector_size and any(view.pread(table.sector_size, 512)):
            facts.bios = True
            facts.reasons.append("GRUB boot code in the MBR, its core in the gap after it")
        else:
            facts.reasons.append("GRUB boot code in the MBR, but the gap after it is empty")
        return
    active = [p for p in table.partitions if p.active]
    if code in ("windows", "syslinux"):
        if active:
            facts.bios = True
            facts.reasons.append(f"{code} boot code in the MBR, active partition {active[0].number}")
        else:
            facts.reasons.append(f"{code} boot code in the MBR, but no partition is active")
        return
    if table.scheme == "mbr" and active:
        facts.bios = True
        facts.reasons.append(f"unrecognised MBR boot code, active partition {active[0].number}")
    else:
        facts.reasons.append("unrecognised MBR boot code and no active partition")


def _efi(facts: FirmwareFacts, fat_volumes: list[tuple[Partition, Filesystem[Any]]]) -> None:
    ordered = sorted(fat_volumes, key=lambda pv: not is_esp(pv[0]))
    for part, fs in ordered:
        for path in FALLBACK:
            handle = fs.open(path)
            if handle is None:
                continue
            loader = _loader(part, path, "fallback", handle)
            facts.loaders.append(loader)
            if not facts.efi:
                facts.efi = True
                where = "ESP" if is_esp(part) else f"FAT partition of type {part.type} (not typed as an ESP)"
                signed = f", signed by {loader.signer}" if loader.signed else ", unsigned"
                facts.reasons.append(f"{where} {part.number} with {_windows_path(path)}{signed}")
        for path, role in _vendor_loaders(fs):
            handle = fs.open(path)
            if handle is not None:
                facts.loaders.append(_loader(part, path, role, handle))
    if not facts.efi and facts.loaders:
        facts.reasons.append("vendor EFI loaders but no \\EFI\\BOOT\\BOOTX64.EFI: a new VM's empty NVRAM has no "
                             "boot entry for them")
    fallback = next((x for x in facts.loaders if x.role == "fallback"), None)
    if fallback is None:
        facts.secure_boot_reason = "no UEFI fallback loader"
    elif not fallback.signed:
        facts.secure_boot_reason = f"{fallback.path} is not signed" + (
            f" ({fallback.problem})" if fallback.problem else "")
    elif fallback.signer is None:
        facts.secure_boot_reason = f"{fallback.path} has a signature that cannot be read ({fallback.problem})"
    elif fallback.digest_ok is not True:
        facts.secure_boot_reason = (f"{fallback.path} was changed after {fallback.signer} signed it"
                                    if fallback.digest_ok is False else
                                    f"{fallback.path}'s signed digest cannot be read ({fallback.problem})")
    elif fallback.signer in TRUSTED_SIGNERS:
        facts.secure_boot = True
        facts.secure_boot_reason = f"{fallback.path} signed by {fallback.signer}"
    else:
        facts.secure_boot_reason = (f"{fallback.path} signed by {fallback.signer}, which "
                                    "Microsoft's Secure Boot keys do not trust")


def _vendor_loaders(fs: Filesystem[Any]) -> list[tuple[str, str]]:
    found = []
    if fs.stat("/EFI/Microsoft/Boot/bootmgfw.efi") is not None:
        found.append(("/EFI/Microsoft/Boot/bootmgfw.efi", "windows"))
    for vendor in fs.listdir("/EFI")[:64]:
        if vendor.upper() == "BOOT":
            continue
        names = {n.lower(): n for n in fs.listdir(f"/EFI/{vendor}")[:256]}
        for file, role in VENDOR_LOADERS.items():
            if "/" not in file and file in names:
                found.append((f"/EFI/{vendor}/{names[file]}", role))
    return found


def _loader(part: Partition, path: str, role: str, handle: Any) -> LoaderFacts:
    loader = LoaderFacts(partition=part.number, path=_windows_path(path), role=role)
    try:
        sig = read_signature(handle)
    except DiskportError as e:
        loader.problem = e.message
        return loader
    loader.machine, loader.signed, loader.signer = sig.machine, sig.signed, sig.signer
    loader.digest_ok, loader.problem = sig.digest_ok, sig.problem
    return loader


def _windows_path(path: str) -> str:
    return path.replace("/", "\\")
