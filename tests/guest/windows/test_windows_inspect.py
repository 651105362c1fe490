"""inspect_guest on Windows-style GPT disks (tests/guest/windows/disks.py): ESP with bootmgfw.efi and the
fallback loader, MSR, an NTFS volume with SOFTWARE and SYSTEM hives written by hivex.

Every fact is checked against what the test wrote, and the SYSTEM hive always holds a decoy ControlSet001 that
says the opposite of the control set ``Select\\Current`` names, so reading the wrong one fails.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from diskport.guest import inspect_guest
from diskport.guest.facts import GuestReport
from tests.guest.filesystems.ntfs_images import ntfscat
from tests.guest.support import convert, read
from tests.guest.windows import hives
from tests.guest.windows.disks import ESP_MIB, MSR_MIB, MiB, WindowsLayout, windows_disk
from tests.support.clients import run_cli

NTFS_AT = (1 + ESP_MIB + MSR_MIB) * MiB


def states(report: GuestReport) -> dict[str, str]:
    return {d.name: d.state for d in report.drivers}


def rule(report: GuestReport, name: str) -> tuple[str | bool, str]:
    item = next(a for a in report.advice if a.field == name)
    return item.value, item.rule


@pytest.fixture(scope="module")
def win11(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Windows 11 Pro x64 (ProductName still "Windows 10 Pro"), Select\\Current = 2, viostor boot-start,
    vioscsi disabled (Start 4), netkvm demand-start."""
    return windows_disk(tmp_path_factory.mktemp("win11"), WindowsLayout())


def test_windows_11_client_with_viostor(win11: Path, tmp_path: Path) -> None:
    report = inspect_guest(win11)
    assert report.scheme == "gpt" and report.protective_mbr
    assert [(v.number, v.type_name, v.filesystem) for v in report.volumes] == [
        (1, "EFI System", "vfat"), (2, "Microsoft reserved", None), (3, "Microsoft basic data", "ntfs")]
    os = report.os
    assert (os.type, os.partition, os.distribution) == ("windows", 3, "windows")
    assert os.product_name == "Windows 10 Pro" and os.pretty_name == "Windows 11 Pro"
    assert (os.edition, os.installation_type, os.build, os.version) == ("Professional", "Client", 22631, "23H2")
    assert os.architecture == "x86_64"
    assert any("Select\\Current = 2" in e for e in os.evidence)
    # the oracle: what hivex reads from the very hives on the disk (extracted with ntfscat)
    volume = tmp_path / "ntfs.img"
    volume.write_bytes(read(win11, NTFS_AT, 64 * MiB))
    system = tmp_path / "SYSTEM"
    system.write_bytes(ntfscat(volume, "/Windows/System32/config/SYSTEM"))
    software = tmp_path / "SOFTWARE"
    software.write_bytes(ntfscat(volume, "/Windows/System32/config/SOFTWARE"))
    assert hivexget_int(system, "Select", "Current") == 2
    assert hives.hivexget(software, hives.CURRENT_VERSION, "EditionID").strip() == os.edition
    assert hivexget_int(system, "ControlSet002\\Services\\viostor", "Start") == 0
    assert hivexget_int(system, "ControlSet001\\Services\\vioscsi", "Start") == 0      # the decoy
    assert hivexget_int(system, "ControlSet002\\Services\\vioscsi", "Start") == 4

    assert states(report) == {"viostor": "installed", "vioscsi": "disabled", "netkvm": "installed"}
    viostor = report.driver("viostor")
    assert viostor is not None and "ControlSet002\\Services\\viostor Start=0" in viostor.evidence
    assert "viostor.sys" in viostor.evidence
    fw = report.firmware
    assert fw.verdict == "efi" and fw.efi and not fw.bios and fw.boot_code == "zero"
    assert {(x.path, x.role) for x in fw.loaders} == {("\\EFI\\BOOT\\BOOTX64.EFI", "fallback"),
                                                      ("\\EFI\\Microsoft\\Boot\\bootmgfw.efi", "windows")}
    assert report.advised("guestOS") == "windows"
    assert rule(report, "firmware.bootloader") == ("efi", "firmware-efi")
    assert rule(report, "bus") == ("virtio", "windows-viostor")
    assert rule(report, "network") == ("virtio", "windows-netkvm")
    assert not report.warnings, report.warnings
    assert report.verdict_line().startswith("Windows 11 Pro; guestOS: windows, firmware.bootloader: efi")
    assert 0 < report.bytes_read < 4 * MiB and report.reads < 100, (report.bytes_read, report.reads)


def hivexget_int(hive: Path, path: str, value: str) -> int:
    return int(hives.hivexget(hive, path, value)) & 0xFFFFFFFF


def test_windows_without_virtio_drivers_hibernated(tmp_path: Path) -> None:
    """No VirtIO driver the current set loads (viostor's key without a Start value, vioscsi's .sys without a
    key, netkvm nowhere), though the decoy ControlSet001 boot-starts all three; Fast Startup on and a
    hibernation image in hiberfil.sys."""
    layout = WindowsLayout(services={"viostor": None}, sys_files=("viostor", "vioscsi"), hiberboot=1,
                           hiberfil=b"HIBR" + struct.pack("<I", 0x1000))
    report = inspect_guest(windows_disk(tmp_path, layout))
    assert report.os.type == "windows" and report.os.pretty_name == "Windows 11 Pro"
    assert states(report) == {"viostor": "missing", "vioscsi": "missing", "netkvm": "missing"}
    evidence = {d.name: d.evidence for d in report.drivers}
    assert "no Start value" in evidence["viostor"] and "no ControlSet002\\Services\\vioscsi key" in \
        evidence["vioscsi"]
    assert rule(report, "bus") == ("sata", "windows-no-viostor")
    assert rule(report, "network") == ("e1000e", "windows-no-netkvm")
    assert report.advised("guestOS") == "windows" and report.advised("firmware.bootloader") == "efi"
    assert any("HiberbootEnabled = 1" in w for w in report.warnings)
    assert any("hiberfil.sys holds a hibernation image" in w for w in report.warnings)
    assert len(report.warnings) == 2


def test_viostor_not_boot_start_is_not_enough(tmp_path: Path) -> None:
    """viostor demand-start (3) is installed but not loaded at boot: a virtio boot disk would not be found.
    netkvm demand-start is fine: Plug and Play loads it when the NIC appears."""
    layout = WindowsLayout(services={"viostor": 3, "netkvm": 3}, sys_files=("viostor", "netkvm"), current_set=1)
    report = inspect_guest(windows_disk(tmp_path, layout))
    assert states(report) == {"viostor": "disabled", "vioscsi": "missing", "netkvm": "installed"}
    assert any("Select\\Current = 1" in e for e in report.os.evidence)
    assert rule(report, "bus") == ("sata", "windows-no-viostor")
    assert rule(report, "network") == ("virtio", "windows-netkvm")


def test_drivers_only_staged_in_the_driver_store(tmp_path: Path) -> None:
    """Staged but never installed: Plug and Play installs netkvm when the NIC appears, but viostor is needed
    before that, to find the boot disk."""
    layout = WindowsLayout(services={}, sys_files=(), staged=("viostor", "netkvm"))
    report = inspect_guest(windows_disk(tmp_path, layout))
    assert states(report) == {"viostor": "missing", "vioscsi": "missing", "netkvm": "installed"}
    assert "only staged in the DriverStore" in report.driver("viostor").evidence  # type: ignore[union-attr]
    assert rule(report, "bus") == ("sata", "windows-no-viostor")
    assert rule(report, "network") == ("virtio", "windows-netkvm")


def test_windows_server_core_arm64(tmp_path: Path) -> None:
    """Server 2022 (build 20348: no renaming), Server Core, ARM64, only CurrentBuild written."""
    layout = WindowsLayout(product="Windows Server 2022 Datacenter", edition="ServerDatacenter",
                           installation_type="Server Core", build="20348", display_version="21H2",
                           use_current_build=True, architecture="ARM64")
    report = inspect_guest(windows_disk(tmp_path, layout))
    os = report.os
    assert os.pretty_name == os.product_name == "Windows Server 2022 Datacenter"
    assert (os.edition, os.installation_type, os.build) == ("ServerDatacenter", "Server Core", 20348)
    assert os.architecture == "aarch64"


def test_windows_10_keeps_its_name(tmp_path: Path) -> None:
    layout = WindowsLayout(product="Windows 10 Enterprise", edition="Enterprise", build="19045",
                           display_version="22H2", architecture="x86")
    report = inspect_guest(windows_disk(tmp_path, layout))
    assert report.os.pretty_name == "Windows 10 Enterprise" and report.os.build == 19045
    assert report.os.version == "22H2" and report.os.architecture == "i386"


def test_corrupt_system_hive_is_a_warning_not_a_lost_report(win11: Path, tmp_path: Path) -> None:
    """The SYSTEM hive's base block checksum broken on the disk: Windows is still reported, from SOFTWARE, the
    drivers are unknown and the bus advice falls back to sata."""
    disk = tmp_path / "broken.raw"
    disk.write_bytes(win11.read_bytes())
    volume = tmp_path / "ntfs.img"
    volume.write_bytes(read(disk, NTFS_AT, 64 * MiB))
    system = ntfscat(volume, "/Windows/System32/config/SYSTEM")
    at = find_on_disk(disk, system[:4096], NTFS_AT)
    with open(disk, "r+b") as f:
        f.seek(at + 48)
        f.write(b"XX")
    report = inspect_guest(disk)
    assert report.os.type == "windows" and report.os.pretty_name == "Windows 11 Pro"
    assert set(states(report).values()) == {"unknown"}
    assert any("SYSTEM hive unreadable" in w and "checksum" in w for w in report.warnings), report.warnings
    assert rule(report, "bus") == ("sata", "windows-no-viostor")


def find_on_disk(disk: Path, needle: bytes, start: int) -> int:
    data = disk.read_bytes()
    at = data.find(needle, start)
    assert at >= 0 and data.find(needle, at + 1) < 0
    return at


def test_cli_json_and_text(win11: Path) -> None:
    out = run_cli("inspect", win11, "--guest", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["os"]["type"] == "windows" and data["os"]["pretty-name"] == "Windows 11 Pro"
    assert data["os"]["product-name"] == "Windows 10 Pro" and data["os"]["build"] == 22631
    assert data["os"]["installation-type"] == "Client" and data["os"]["architecture"] == "x86_64"
    assert data["advice"] == {"guestOS": "windows", "firmware.bootloader": "efi", "firmware.secureBoot": False,
                              "bus": "virtio", "network": "virtio"}
    assert {d["name"]: d["state"] for d in data["drivers"]} == {"viostor": "installed", "vioscsi": "disabled",
                                                                "netkvm": "installed"}
    assert data["firmware"]["verdict"] == "efi"
    assert [p["filesystem"] for p in data["partitions"]] == ["vfat", None, "ntfs"]
    assert data["read"]["bytes"] > 0
    text = run_cli("inspect", "--guest", win11)
    assert text.returncode == 0, text.stderr
    assert "Windows 11 Pro" in text.stdout and "bus: virtio" in text.stdout


def test_same_report_through_qcow2_and_vhdx(win11: Path) -> None:
    expected = inspect_guest(win11).to_json()
    for fmt in ("qcow2", "vhdx"):
        got = inspect_guest(convert(win11, fmt)).to_json()
        for key in ("filename", "format", "read", "virtual-size", "access"):
            got.pop(key)
        assert got == {k: v for k, v in expected.items() if k not in ("filename", "format", "read",
                                                                       "virtual-size", "access")}


def test_over_http_ranges_reads_little(win11: Path, nginx: object) -> None:
    image = convert(win11, "qcow2")
    url = nginx.put("windows.qcow2", image.read_bytes())  # type: ignore[attr-defined]
    report = inspect_guest(url)
    assert report.os.pretty_name == "Windows 11 Pro" and report.advised("bus") == "virtio"
    assert report.bytes_read < 4 * MiB and report.reads < 100, (report.bytes_read, report.reads)


def test_large_software_hive_is_not_read_whole(tmp_path: Path) -> None:
    """A SOFTWARE hive padded to about 24 MB (15000 keys of 1 KiB values): inspection reads a small part."""
    layout = WindowsLayout(pad_keys=15000, pad_value_bytes=1024, ntfs_mib=96)
    disk = windows_disk(tmp_path, layout)
    volume = tmp_path / "ntfs.img"
    volume.write_bytes(read(disk, NTFS_AT, layout.ntfs_mib * MiB))
    hive_size = len(ntfscat(volume, "/Windows/System32/config/SOFTWARE"))
    assert hive_size > 20 * MiB
    report = inspect_guest(disk)
    assert report.os.pretty_name == "Windows 11 Pro"
    assert report.bytes_read < 4 * MiB < hive_size // 5, (report.bytes_read, hive_size)
