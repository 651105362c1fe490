"""Windows-style GPT disks for the inspection tests, laid out as Windows Setup lays them out on UEFI:
1 the EFI system partition (FAT, ``\\EFI\\Microsoft\\Boot\\bootmgfw.efi`` and the fallback
``\\EFI\\BOOT\\BOOTX64.EFI``), 2 the Microsoft reserved partition (0C01, empty), 3 the basic data partition (0700)
holding an NTFS volume with ``Windows\\System32\\config\\SOFTWARE`` and ``SYSTEM`` (hives written by hivex, see
hives.py), the drivers' ``.sys`` files and optionally ``hiberfil.sys`` (written by ``ntfscp``: wimlib's capture
leaves that name out).

The loaders are GRUB EFI images (grub-mkimage): firmware detection looks at where they are and their PE headers;
whether they are Microsoft's is the Authenticode signer's business, tested elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.guest.filesystems.images import mkfs_fat, mtools
from tests.guest.filesystems.ntfs_images import build_ntfs_volume
from tests.guest.linux_disks import efi_loader
from tests.guest.support import blank, patch, sgdisk
from tests.guest.windows import hives
from tests.support.clients import require_tool, run

MiB = 1024 * 1024
SECTOR = 512
ESP_MIB, MSR_MIB = 32, 16


@dataclass
class WindowsLayout:
    """What to put on the disk; the defaults are a Windows 11 Pro x64 guest with the VirtIO storage driver."""

    product: str = "Windows 10 Pro"           # what Windows 11 still writes
    edition: str = "Professional"
    installation_type: str = "Client"
    build: str = "22631"
    display_version: str = "23H2"
    use_current_build: bool = False            # only CurrentBuild, no CurrentBuildNumber
    current_set: int = 2
    #: Services key -> Start (None: the key without a Start value); a driver left out has no key
    services: Mapping[str, int | None] = field(default_factory=lambda: {"viostor": 0, "vioscsi": 4, "netkvm": 3})
    #: .sys files in System32\drivers
    sys_files: tuple[str, ...] = ("viostor", "vioscsi", "netkvm")
    #: drivers staged in System32\DriverStore\FileRepository (NAME.inf_amd64_<hash>)
    staged: tuple[str, ...] = ()
    architecture: str = "AMD64"
    hiberboot: int = 0
    hiberfil: bytes | None = None              # hiberfil.sys's first bytes, None for no file
    pad_keys: int = 0                          # keys padding SOFTWARE to a realistic size
    pad_value_bytes: int = 0
    ntfs_mib: int = 64


def windows_tree(root: Path, layout: WindowsLayout) -> Path:
    config = root / "Windows/System32/config"
    config.mkdir(parents=True)
    hives.software_hive(config / "SOFTWARE", product=layout.product, edition=layout.edition,
                        installation_type=layout.installation_type, build=layout.build,
                        display_version=layout.display_version, use_current_build=layout.use_current_build,
                        pad_keys=layout.pad_keys, pad_value_bytes=layout.pad_value_bytes)
    hives.system_hive(config / "SYSTEM", current=layout.current_set, drivers=layout.services,
                      hiberboot=layout.hiberboot, architecture=layout.architecture)
    drivers = root / "Windows/System32/drivers"
    drivers.mkdir()
    for name in ("disk", "storahci", *layout.sys_files):
        (drivers / f"{name}.sys").write_bytes(b"MZ" + name.encode() * 100)
    (root / "Windows/System32/DriverStore/FileRepository").mkdir(parents=True)
    for name in ("disk", *layout.staged):
        folder = root / f"Windows/System32/DriverStore/FileRepository/{name}.inf_amd64_0123456789abcdef"
        folder.mkdir()
        (folder / f"{name}.sys").write_bytes(b"MZ" + name.encode() * 100)
    (root / "Windows/explorer.exe").write_bytes(b"MZ explorer")
    (root / "Program Files").mkdir()
    (root / "Users/Public").mkdir(parents=True)
    return root


def windows_disk(tmp: Path, layout: WindowsLayout | None = None) -> Path:
    """A raw GPT disk as described in the module docstring."""
    layout = layout or WindowsLayout()
    size = (1 + ESP_MIB + MSR_MIB + layout.ntfs_mib + 1) * MiB
    disk = blank(tmp / "windows.raw", size)
    sgdisk(disk, "-n", f"1:2048:+{ESP_MIB}M", "-t", "1:EF00", "-c", "1:EFI system partition",
           "-n", f"2:0:+{MSR_MIB}M", "-t", "2:0C01", "-c", "2:Microsoft reserved partition",
           "-n", f"3:0:+{layout.ntfs_mib}M", "-t", "3:0700", "-c", "3:Basic data partition")
    esp = mkfs_fat(tmp / "esp.img", 16, ESP_MIB * 1024, label="SYSTEM")
    loader = efi_loader(tmp)
    mtools("mmd", esp, "::EFI", "::EFI/BOOT", "::EFI/Microsoft", "::EFI/Microsoft/Boot")
    mtools("mcopy", esp, str(loader), "::EFI/BOOT/BOOTX64.EFI")
    mtools("mcopy", esp, str(loader), "::EFI/Microsoft/Boot/bootmgfw.efi")
    patch(disk, 1 * MiB, esp.read_bytes())
    tree = windows_tree(tmp / "windows-tree", layout)
    ntfs = build_ntfs_volume(tmp / "ntfs.img", tree, layout.ntfs_mib * MiB, label="Windows")
    if layout.hiberfil is not None:   # wimlib's capture leaves hiberfil.sys out, as Windows imaging does
        hiberfil = tmp / "hiberfil.sys"
        hiberfil.write_bytes(layout.hiberfil.ljust(64 * 1024, b"\0"))
        run(require_tool("ntfscp"), ntfs, hiberfil, "/hiberfil.sys")
    with open(ntfs, "rb") as src, open(disk, "r+b") as dst:
        dst.seek((1 + ESP_MIB + MSR_MIB) * MiB)
        while chunk := src.read(MiB):
            if chunk.count(0) == len(chunk):   # keep the disk sparse
                dst.seek(len(chunk), 1)
            else:
                dst.write(chunk)
    ntfs.unlink()
    esp.unlink()
    return disk
