"""inspect_guest end to end on disks assembled here with Debian tools (sgdisk/sfdisk, mkfs.vfat + mtools,
mkfs.ext4 -d, GRUB's boot.img and grub-mkimage images), read through several formats and over HTTP.

The boot tests in tests/guest/boot prove, by booting under SeaBIOS and OVMF, the firmware verdicts these same
kinds of layouts get; here every fact the report gives is checked against what the test put on the disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diskport.guest import inspect_guest
from tests.guest.linux_disks import (
    KERNEL,
    SECTOR,
    gpt_linux_disk,
    mbr_linux_disk,
)
from tests.guest.support import convert, patch, sgdisk
from tests.support.clients import run_cli

MiB = 1024 * 1024
def test_gpt_disk_with_both_loaders_is_bios_and_efi(tmp_path: Path) -> None:
    report = inspect_guest(gpt_linux_disk(tmp_path, fstab_device="/dev/sda3"))
    assert report.scheme == "gpt" and report.protective_mbr and not report.hybrid_mbr
    assert [(v.number, v.filesystem) for v in report.volumes] == [(1, "vfat"), (2, None), (3, "ext4")]
    fw = report.firmware
    assert fw.verdict == "bios+efi" and fw.boot_code == "grub"
    assert any("BIOS boot partition 2" in r for r in fw.reasons)
    assert [(x.path, x.role, x.signed) for x in fw.loaders] == [("\\EFI\\BOOT\\BOOTX64.EFI", "fallback", False)]
    assert not fw.secure_boot and "not signed" in fw.secure_boot_reason
    assert report.os.type == "linux" and report.os.distribution == "debian" and report.os.version == "12"
    assert report.os.pretty_name == "Debian GNU/Linux 12 (bookworm)" and report.os.partition == 3
    assert report.os.kernels == [KERNEL] and report.os.architecture == "x86_64"
    states = {d.name: d.state for d in report.drivers}
    assert states == {"virtio_blk": "module", "virtio_scsi": "missing", "virtio_net": "builtin", "ahci": "module"}
    assert report.agents["cloud-init"] and not report.agents["qemu-guest-agent"]
    assert any("/dev/sda3" in w for w in report.warnings)
    assert report.advised("firmware.bootloader") == "efi" and report.advised("firmware.secureBoot") is False
    assert report.advised("bus") == "virtio" and report.advised("network") == "virtio"
    assert report.advised("guestOS") == "linux"


def test_mbr_grub_disk_is_bios_only_and_advised_bios(tmp_path: Path) -> None:
    report = inspect_guest(mbr_linux_disk(tmp_path))
    assert report.scheme == "mbr"
    assert report.firmware.verdict == "bios" and report.firmware.boot_code == "grub"
    assert any("gap" in r for r in report.firmware.reasons)
    assert report.advised("firmware.bootloader") == "bios"
    assert report.advised("firmware.secureBoot") is False


def test_empty_gap_and_zeroed_code_are_not_bios_bootable(tmp_path: Path) -> None:
    disk = mbr_linux_disk(tmp_path)
    patch(disk, SECTOR, bytes(SECTOR * 2000))
    assert inspect_guest(disk).firmware.verdict == "unknown"
    patch(disk, 0, bytes(440))
    report = inspect_guest(disk)
    assert report.firmware.boot_code == "zero" and not report.firmware.bios


def test_hybrid_mbr_with_zeroed_code_is_efi_only(tmp_path: Path) -> None:
    disk = gpt_linux_disk(tmp_path)
    sgdisk(disk, "-h", "1:3")
    patch(disk, 0, bytes(440))
    report = inspect_guest(disk)
    assert report.hybrid_mbr
    assert report.firmware.verdict == "efi"
    assert any("zeroed" in r and "hybrid" in r for r in report.firmware.reasons)


def test_linux_without_virtio_blk_is_advised_sata(tmp_path: Path) -> None:
    report = inspect_guest(gpt_linux_disk(tmp_path, virtio_blk=False))
    assert report.driver("virtio_blk") is not None and report.driver("virtio_blk").state == "missing"  # type: ignore[union-attr]
    item = next(a for a in report.advice if a.field == "bus")
    assert item.value == "sata" and item.rule == "linux-no-virtio-blk"


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vpc", "vdi"])
def test_same_verdict_through_every_format(tmp_path: Path, fmt: str) -> None:
    raw = gpt_linux_disk(tmp_path)
    expected = inspect_guest(raw).to_json()
    got = inspect_guest(convert(raw, fmt)).to_json()
    for key in ("filename", "format", "read", "virtual-size", "access"):
        expected.pop(key)
        got.pop(key)
    if fmt == "vpc":  # the VHD's CHS-rounded size moves the backup GPT; everything inside is the same
        got["partition-table"]["notes"] = expected["partition-table"]["notes"]
    assert got == expected


def test_over_http_ranges_reads_little(tmp_path: Path, nginx: object) -> None:
    raw = gpt_linux_disk(tmp_path)
    image = convert(raw, "qcow2")
    url = nginx.put("disk.qcow2", image.read_bytes())  # type: ignore[attr-defined]
    report = inspect_guest(url)
    assert report.firmware.verdict == "bios+efi" and report.os.distribution == "debian"
    assert report.bytes_read < 4 * MiB, report.bytes_read


def test_cli_json_and_text(tmp_path: Path) -> None:
    disk = mbr_linux_disk(tmp_path)
    out = run_cli("inspect", "--guest", "--json", disk)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["advice"]["firmware.bootloader"] == "bios"
    assert data["os"]["distribution"] == "debian"
    assert data["partitions"][0]["filesystem"] == "ext4"
    assert {r["field"] for r in data["rules"]} == {"guestOS", "firmware.bootloader", "firmware.secureBoot", "bus",
                                                    "network"}
    text = run_cli("inspect", "--guest", disk)
    assert text.returncode == 0 and "firmware.bootloader: bios" in text.stdout
    assert "Debian GNU/Linux 12" in text.stdout


def test_bare_volume_and_garbage_are_reported_not_refused(tmp_path: Path, testdata: Path) -> None:
    report = inspect_guest(testdata / "ext2.qcow2")
    assert report.scheme == "none" and report.volumes[0].filesystem == "ext2"
    assert report.firmware.verdict == "unknown" and report.os.type == "unknown"
    junk = tmp_path / "junk.raw"
    junk.write_bytes(bytes(range(256)) * 8192)
    report = inspect_guest(junk)
    assert report.volumes[0].filesystem is None


def test_names_from_the_image_cannot_forge_lines(tmp_path: Path) -> None:
    """The ext4 label (s_volume_name, 16 bytes at 0x78 of the superblock) set to an OSC sequence and a newline."""
    disk = mbr_linux_disk(tmp_path)
    patch(disk, 2048 * SECTOR + 1024 + 0x78, b"\x1b]0;t\x07\nFAKE: ok\r")
    out = run_cli("inspect", "--guest", disk)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\r" not in out.stdout
    assert not any(line.startswith("FAKE") for line in out.stdout.splitlines())
    assert "FAKE: ok" in out.stdout  # shown, escaped, on the partition's own line
