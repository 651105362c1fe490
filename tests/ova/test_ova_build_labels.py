"""``build`` of an OVA: the image's ``io.diskport.guest.*`` labels carry what the OVF descriptor says where the disk
cannot tell (firmware, the OS type) and the VM's CPUs and memory, decided as ``manifest X.ova`` decides them; read
back with skopeo from the built layout, and by ``manifest``'s label reader."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from diskport.guest.facts import LABEL_PREFIX
from diskport.manifest.model import facts_from_labels, join_ovf
from diskport.oci.build import build_image
from tests.ova.build import Disk, Vm, make_ova
from tests.support.clients import run_cli, skopeo_json


def test_build_labels_take_the_ovf_facts(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    (a, _), _, _ = disks
    ova = make_ova(tmp_path / "win.ova", [Vm("win", [a], cpus=4, memory_mib=8192, firmware="efi",
                                                os_type="windows2019srv_64Guest")])
    out = tmp_path / "win.oci"
    result = build_image(str(ova), output=str(out), convert_to="qcow2", compression="none")
    image = next(iter(result.images.values()))
    assert image.guest is not None and image.guest.firmware.verdict == "unknown"  # a disk with no boot loader
    config = skopeo_json(tmp_path, "inspect", "--config", f"oci:{out}")
    labels = config["config"]["Labels"]
    assert labels[LABEL_PREFIX + "firmware"] == "unknown"       # the disk's own verdict stays
    assert labels[LABEL_PREFIX + "bootloader"] == "efi"         # decided from the OVF's vmw:Config firmware
    assert labels[LABEL_PREFIX + "guest-os"] == "windows"       # from vmw:osType, inspection found no OS
    assert labels[LABEL_PREFIX + "cpus"] == "4" and labels[LABEL_PREFIX + "memory"] == "8Gi"
    assert labels[LABEL_PREFIX + "ovf-vm"] == "win"
    assert labels[LABEL_PREFIX + "ovf-os-type"] == "windows2019srv_64Guest"

    # manifest's label reader takes them back (what `manifest docker://REF` of this image decides) ...
    facts = facts_from_labels(labels, "the image")
    assert facts is not None
    joined = join_ovf(facts, None)
    assert (joined.bootloader.value, joined.guest_os.value) == ("efi", "windows")
    assert joined.cpu is not None and joined.cpu.value == 4 and "label io.diskport.guest.cpus" in joined.cpu.why
    assert joined.memory is not None and joined.memory.value == "8Gi"
    # ... and they are what `manifest win.ova` decides from the package itself
    proc = run_cli("manifest", ova, "--url", "https://disks.example.com/win/", "--target", "kubevirt")
    assert proc.returncode == 0, proc.stderr
    vm = next(d for d in yaml.safe_load_all(proc.stdout) if d["kind"] == "VirtualMachine")
    domain = vm["spec"]["template"]["spec"]["domain"]
    assert "efi" in domain["firmware"]["bootloader"]
    assert domain["cpu"]["cores"] == 4 and domain["memory"]["guest"] == "8Gi", json.dumps(domain)


def test_build_of_a_bios_linux_ova(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    (a, _), _, _ = disks
    ova = make_ova(tmp_path / "lin.ova", [Vm("lin", [a], cpus=1, memory_mib=1536, firmware="bios")],
                   style="virtualbox", version=2)
    out = tmp_path / "lin.oci"
    build_image(str(ova), output=str(out), convert_to="qcow2", compression="none")
    labels = skopeo_json(tmp_path, "inspect", "--config", f"oci:{out}")["config"]["Labels"]
    assert (labels[LABEL_PREFIX + "bootloader"], labels[LABEL_PREFIX + "guest-os"]) == ("bios", "linux")
    assert labels[LABEL_PREFIX + "cpus"] == "1" and labels[LABEL_PREFIX + "memory"] == "1536Mi"
