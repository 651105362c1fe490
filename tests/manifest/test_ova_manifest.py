"""``diskport manifest`` of an OVA: disks laid out with sgdisk/mkfs.ext4/GRUB as the inspection tests lay them out,
made streamOptimized by qemu-img and packed as VMware and VirtualBox export them (tests/ova/build.py); the
VirtualMachine and its DataVolumes checked against KubeVirt's and CDI's OpenAPI definitions, the workload against
the provider's field names (tests/manifest/checks.py).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

from diskport.guest import inspect_guest
from tests.guest.filesystems.images import mkfs_ext
from tests.guest.linux_disks import gpt_linux_disk, mbr_linux_disk, put
from tests.guest.support import blank, convert, sgdisk
from tests.manifest.checks import check_cpln, check_kubevirt, comments_before
from tests.ova.build import Disk, Vm, make_ova
from tests.support import MiB
from tests.support.clients import run_cli

SECTOR = 512
BASE = "https://disks.example.com/web01/"


def manifest(*args: str | Path) -> tuple[str, str]:
    proc = run_cli("manifest", *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def stream_optimized(raw: Path) -> Disk:
    """The raw disk as the streamOptimized VMDK an exporter writes (qemu-img), with its capacity."""
    return Disk(convert(raw, "vmdk", "subformat=streamOptimized"), raw.stat().st_size)


def data_only_disk(tmp: Path, name: str, size: int = 48 * MiB) -> Path:
    """GPT with one ext4 data partition and no boot loader or OS: guest inspection's firmware verdict is
    'unknown'."""
    disk = blank(tmp / f"{name}.raw", size)
    sgdisk(disk, "-n", "1:2048:0", "-t", "1:8300", "-c", "1:data")
    tree = tmp / f"{name}-tree"
    (tree / "srv").mkdir(parents=True)
    (tree / "srv" / "README").write_text("data\n")
    put(disk, 2048 * SECTOR, mkfs_ext(tmp / f"{name}.ext4", tree, size="40M", label="data"))
    return disk


def test_vmware_efi_in_the_ovf_over_a_disk_that_cannot_tell(tmp_path: Path) -> None:
    raw = data_only_disk(tmp_path, "boot")
    assert inspect_guest(raw).firmware.verdict == "unknown"
    vm = Vm("web01", [stream_optimized(raw)], cpus=4, memory_mib=6144, os_id=112,
            os_type="windows2019srv_64Guest", firmware="efi")
    ova = make_ova(tmp_path / "web01.ova", [vm])
    kv_text, kv_err = manifest(ova, "--url", BASE, "--target", "kubevirt")
    vm_doc = check_kubevirt(kv_text, inspect_guest(ova).virtual_size)
    domain = vm_doc["spec"]["template"]["spec"]["domain"]
    assert domain["firmware"]["bootloader"] == {"efi": {"secureBoot": False}}
    assert any("from the OVF, vmw:Config firmware=efi; the disk cannot tell: firmware-unknown" in c
               for c in comments_before(kv_text, "bootloader")), kv_text
    assert domain["cpu"] == {"cores": 4} and domain["memory"] == {"guest": "6Gi"}
    assert any("the OVF's VirtualHardwareSection: 4 virtual CPU(s)" in c for c in comments_before(kv_text, "cpu"))
    assert vm_doc["metadata"]["name"] == "web01"
    url = vm_doc["spec"]["dataVolumeTemplates"][0]["spec"]["source"]["http"]["url"]
    assert url == BASE + "web01-disk1.raw"  # the name `convert web01.ova DIR --all-disks` writes
    assert "guestOS windows is the OVF's" in kv_err
    cp_text, _ = manifest(ova, "--url", BASE, "--volume-set", "boot")
    workload = check_cpln(cp_text)
    assert workload["spec"]["vm"]["firmware"] == {"bootloader": "efi"}
    assert workload["spec"]["vm"]["guestOS"] == "windows"  # inspection found no OS: the OperatingSystemSection's
    assert any("ovf:id=112, osType=windows2019srv_64Guest" in c for c in comments_before(cp_text, "guestOS"))
    assert workload["spec"]["containers"][0]["cpu"] == "4000m" and workload["spec"]["containers"][0]["memory"] == "6Gi"
    assert any("6144 MiB of memory" in c for c in comments_before(cp_text, "memory"))
    # the flags still override what the OVF says
    flagged, _ = manifest(ova, "--url", BASE, "--volume-set", "boot", "--cpu", "1", "--memory", "1Gi",
                          "--firmware", "bios")
    workload = check_cpln(flagged)
    assert workload["spec"]["containers"][0] == {"name": "vm", "cpu": "1000m", "memory": "1Gi"}
    assert workload["spec"]["vm"]["firmware"] == {"bootloader": "bios"}
    assert any("set by --firmware (inferred: efi)" in c for c in comments_before(flagged, "bootloader"))


def test_the_disk_wins_over_the_ovf_and_says_so(tmp_path: Path) -> None:
    bios = mbr_linux_disk(tmp_path)  # GRUB in the MBR, no ESP: BIOS only
    assert inspect_guest(bios).firmware.verdict == "bios"
    ova = make_ova(tmp_path / "web01.ova", [Vm("web01", [stream_optimized(bios)], firmware="efi")])
    text, err = manifest(ova, "--url", BASE + "boot.qcow2", "--volume-set", "boot")
    workload = check_cpln(text)
    assert workload["spec"]["vm"]["firmware"] == {"bootloader": "bios"}
    assert any("firmware-bios-only" in c and "the OVF's vmw:Config firmware=efi is overruled by the disk" in c
               for c in comments_before(text, "bootloader")), text
    assert "the OVF says vmw:Config firmware=efi, but the disk boots with bios only: the disk wins" in err
    assert "# warning: the OVF says vmw:Config firmware=efi" in text
    assert workload["spec"]["vm"]["bootDisk"]["source"]["http"]["url"] == BASE + "boot.qcow2"
    assert workload["spec"]["vm"]["guestOS"] == "linux"
    assert any("os-linux" in c for c in comments_before(text, "guestOS"))  # the disk's, not the OVF's


def test_a_disk_booting_both_ways_follows_the_ovf(tmp_path: Path) -> None:
    both = gpt_linux_disk(tmp_path)  # ESP with BOOTX64.EFI and GRUB in the MBR and the BIOS boot partition
    assert inspect_guest(both).firmware.verdict == "bios+efi"
    ova = make_ova(tmp_path / "vb.ova", [Vm("vb", [stream_optimized(both)], firmware="bios")], style="virtualbox")
    text, _ = manifest(ova, "--url", BASE, "--target", "kubevirt")
    vm = check_kubevirt(text, inspect_guest(ova).virtual_size)
    assert vm["spec"]["template"]["spec"]["domain"]["firmware"]["bootloader"] == {"bios": {}}
    assert any("from the OVF, vbox:Machine Firmware=bios; the disk boots both ways" in c
               for c in comments_before(text, "bootloader")), text


def _three_disks(tmp_path: Path) -> tuple[Disk, Disk, Disk]:
    boot = stream_optimized(mbr_linux_disk(tmp_path))
    return boot, stream_optimized(data_only_disk(tmp_path, "data1", 40 * MiB)), \
        stream_optimized(data_only_disk(tmp_path, "data2", 1200 * MiB))


def test_vmware_three_disks_one_volume_each(tmp_path: Path) -> None:
    boot, data1, data2 = _three_disks(tmp_path)
    data1.bus, data2.bus = "sata", "nvme"
    # the boot disk is the second in the hardware; vmw:BootOrderSection names it
    vm = Vm("web01", [data1, boot, data2], boot_disk=1)
    ova = make_ova(tmp_path / "web01.ova", [vm])
    text, _ = manifest(ova, "--url", BASE + "web01-disk2.qcow2", "--target", "kubevirt")
    vm_doc = check_kubevirt(text, inspect_guest(ova).virtual_size)
    template = vm_doc["spec"]["template"]["spec"]
    disks = template["domain"]["devices"]["disks"]
    assert [(d["name"], d["disk"]["bus"], d.get("bootOrder")) for d in disks] == [
        ("rootdisk", "virtio", 1), ("datadisk1", "sata", None), ("datadisk2", "virtio", None)]
    assert [v["dataVolume"]["name"] for v in template["volumes"]] == [
        "web01-rootdisk", "web01-datadisk1", "web01-datadisk2"]
    templates = vm_doc["spec"]["dataVolumeTemplates"]
    assert [t["spec"]["source"]["http"]["url"] for t in templates] == [
        BASE + "web01-disk2.qcow2", BASE + "web01-disk1.qcow2", BASE + "web01-disk3.qcow2"]
    assert [t["spec"]["storage"]["resources"]["requests"]["storage"] for t in templates] == ["1Gi", "1Gi", "2Gi"]
    assert "vmdisk1, bus: sata (the OVF puts vmdisk1 on a sata controller (vmware.sata.ahci))" in text
    assert ("vmdisk3, bus: virtio (the OVF puts vmdisk3 on a nvme controller (vmware.nvme.controller), which the "
            "platform does not have; the boot disk's bus)") in text
    # the workload has one disk: the boot disk, and a warning listing the others
    cp_text, err = manifest(ova, "--url", BASE + "web01-disk2.qcow2", "--volume-set", "boot")
    workload = check_cpln(cp_text)
    assert workload["spec"]["vm"]["bootDisk"]["source"]["http"]["url"] == BASE + "web01-disk2.qcow2"
    warning = ("only the boot disk is written; not attached: disk 1 vmdisk1 (1Gi, sata) at "
               f"{BASE}web01-disk1.qcow2; disk 2 vmdisk3 (2Gi, virtio) at {BASE}web01-disk3.qcow2")
    assert warning in err and warning in cp_text
    assert any("its 2 data disk(s) cannot be attached" in c for c in comments_before(cp_text, "bootDisk"))


def test_virtualbox_three_disks_with_a_checksum_over_http(tmp_path: Path, nginx: object) -> None:
    boot, data1, data2 = _three_disks(tmp_path)
    boot.bus, data1.bus, data2.bus = "sata", "ide", "sata"
    ova = make_ova(tmp_path / "vb.ova", [Vm("vb", [boot, data1, data2], cpus=2, memory_mib=1536, firmware="bios")],
                   style="virtualbox", version=2)
    url = nginx.put("vb.ova", ova.read_bytes())  # type: ignore[attr-defined]
    digest = "sha256:" + hashlib.sha256(b"the converted boot disk").hexdigest()
    text, _ = manifest(url, "--url", BASE, "--target", "kubevirt", "--checksum", digest)
    docs = list(yaml.safe_load_all(text))
    vm = check_kubevirt(text, inspect_guest(ova).virtual_size)
    assert [d["kind"] for d in docs] == ["DataVolume", "VirtualMachine"]
    assert docs[0]["spec"]["source"]["http"] == {"url": BASE + "vb-disk1.raw", "checksum": digest}
    templates = vm["spec"]["dataVolumeTemplates"]
    assert [t["metadata"]["name"] for t in templates] == ["vb-datadisk1", "vb-datadisk2"]
    disks = vm["spec"]["template"]["spec"]["domain"]["devices"]["disks"]
    assert [d["disk"]["bus"] for d in disks] == ["virtio", "sata", "sata"]
    assert "the OVF puts vmdisk2 on a ide controller (PIIX4); the platform has no IDE, sata is its nearest bus" in text
    assert "the OVF puts vmdisk3 on a sata controller (AHCI)" in text
    domain = vm["spec"]["template"]["spec"]["domain"]
    assert domain["cpu"] == {"cores": 2} and domain["memory"] == {"guest": "1536Mi"}
    assert domain["firmware"]["bootloader"] == {"bios": {}}
    assert any("the OVF agrees (vbox:Machine Firmware=bios)" in c for c in comments_before(text, "bootloader"))


def test_an_ova_needs_the_url_of_its_disks(tmp_path: Path, nginx: object) -> None:
    ova = make_ova(tmp_path / "one.ova", [Vm("one", [stream_optimized(data_only_disk(tmp_path, "d"))])])
    url = nginx.put("one.ova", ova.read_bytes())  # type: ignore[attr-defined]
    bare = run_cli("manifest", url, "--target", "kubevirt")
    assert bare.returncode == 2 and "is an OVA, which neither CDI nor the platform downloads" in bare.stderr
    assert "Traceback" not in bare.stderr
    computed = run_cli("manifest", ova, "--url", BASE, "--target", "kubevirt", "--compute-checksum")
    assert computed.returncode == 2 and "--compute-checksum reads SOURCE, an OVA" in computed.stderr
    not_ova = run_cli("manifest", tmp_path / "d.raw", "--url", BASE + "d.raw", "--vm", "x")
    assert not_ova.returncode == 2 and "is not an OVA" in not_ova.stderr
    # import --manifest would point the platform at the OVA's URL: the disk is imported, the manifest refused
    imported = run_cli("import", url, tmp_path / "out.raw", "--manifest", tmp_path / "w.yaml", "--volume-set", "v",
                       "-q")
    assert imported.returncode == 2 and "is an OVA, which neither CDI nor the platform downloads" in imported.stderr
    assert (tmp_path / "out.raw").exists() and not (tmp_path / "w.yaml").exists()


def test_two_virtual_machines_need_vm(tmp_path: Path) -> None:
    first = stream_optimized(data_only_disk(tmp_path, "a"))
    second = stream_optimized(mbr_linux_disk(tmp_path))
    ova = make_ova(tmp_path / "vapp.ova", [Vm("db", [first], cpus=8), Vm("web", [second], cpus=2, memory_mib=512)])
    unchosen = run_cli("manifest", ova, "--url", BASE, "--volume-set", "v")
    assert unchosen.returncode == 1 and "2 virtual machines (db, web)" in unchosen.stderr
    assert "--vm NAME" in unchosen.stderr
    text, _ = manifest(ova, "--url", BASE, "--volume-set", "v", "--vm", "web")
    workload = check_cpln(text)
    assert workload["name"] == "web" and workload["spec"]["containers"][0]["cpu"] == "2000m"
    assert workload["spec"]["containers"][0]["memory"] == "512Mi"
    assert workload["spec"]["vm"]["firmware"] == {"bootloader": "bios"}  # the second VM's disk, not the first's
    assert workload["spec"]["vm"]["bootDisk"]["source"]["http"]["url"] == BASE + "vapp-disk2.raw"


def test_operating_system_and_controller_names() -> None:
    """The OperatingSystemSection names exporters write, and controllers neither builder above makes."""
    from diskport.manifest.model import Choice, OvfDisk, OvfFacts, bus_for_controller, guest_os_from_ovf

    def os_of(os_type: str, description: str | None = None) -> str | None:
        choice = guest_os_from_ovf(OvfFacts("vm", os_type=os_type, os_description=description))
        return None if choice is None else str(choice.value)

    assert os_of("windows9_64Guest") == "windows" and os_of("Windows2019_64") == "windows"
    assert os_of("rhel9_64Guest") == "linux" and os_of("Oracle_64", "Oracle Linux 9") == "linux"
    assert os_of("solaris11_64Guest", "Oracle Solaris 11 (64-bit)") is None
    assert os_of("darwin19_64Guest") is None and os_of("otherGuest64") is None
    boot = Choice("sata", "windows-no-viostor")
    virtio = OvfDisk("d", 1, "other", "virtio-blk")
    assert bus_for_controller(virtio, boot).value == "virtio"
    assert bus_for_controller(OvfDisk("d", 1, "scsi", "VirtioSCSI"), boot).value == "scsi"
    assert bus_for_controller(OvfDisk("d", 1, None, None), boot).value == "sata"


def test_an_ova_from_a_server_without_ranges(tmp_path: Path, plain_http: object, serve_dir: Path) -> None:
    """Read in tar order: the boot disk is spooled for inspection (it needs random access), then removed."""
    boot, data = stream_optimized(mbr_linux_disk(tmp_path)), stream_optimized(data_only_disk(tmp_path, "data"))
    data.bus = "sata"
    ova = make_ova(serve_dir / "vb.ova", [Vm("vb", [boot, data], cpus=3, memory_mib=3072)], style="virtualbox")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    url = plain_http.url(ova.name)  # type: ignore[attr-defined]
    text, _ = manifest(url, "--url", BASE, "--target", "kubevirt", "--scratch", scratch)
    vm = check_kubevirt(text, inspect_guest(ova).virtual_size)
    domain = vm["spec"]["template"]["spec"]["domain"]
    assert domain["cpu"] == {"cores": 3} and domain["memory"] == {"guest": "3Gi"}
    assert domain["firmware"]["bootloader"] == {"bios": {}}
    assert [d["disk"]["bus"] for d in domain["devices"]["disks"]] == ["virtio", "sata"]
    assert list(scratch.iterdir()) == []


def test_names_from_the_ovf_cannot_forge_yaml(tmp_path: Path) -> None:
    evil = "web\n---\nkind: Secret # "
    vm = Vm(evil, [stream_optimized(data_only_disk(tmp_path, "d"))], os_type="ubuntu64Guest\nkind: Secret")
    ova = make_ova(tmp_path / "evil.ova", [vm])
    text, err = manifest(ova, "--url", BASE, "--target", "kubevirt")
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["VirtualMachine"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", docs[0]["metadata"]["name"])
    assert all(line.lstrip().startswith("#") or "Secret" not in line for line in text.splitlines())
    assert "\nkind: Secret" not in err
