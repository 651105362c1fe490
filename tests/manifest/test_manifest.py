"""``diskport manifest`` (and ``build``/``import --manifest``) on disks laid out as the inspection tests lay them
out with Debian tools, checked against KubeVirt's and CDI's OpenAPI definitions, the admission rules, and the
platform workload's documented fields (tests/manifest/checks.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from diskport.guest import inspect_guest
from diskport.manifest import TARGETS
from tests.guest.filesystems.images import mtools
from tests.guest.linux_disks import gpt_linux_disk, mbr_linux_disk
from tests.guest.support import convert, patch
from tests.guest.windows.disks import WindowsLayout, windows_disk
from tests.manifest.checks import check_cpln, check_kubevirt, comments_before, data_volume, quantity_bytes
from tests.support.clients import require_tool, run, run_cli
from tests.support.registry import RegistryServer

MiB = 1024 * 1024
ESP_OFFSET = 2048 * 512  # where gpt_linux_disk's and windows_disk's ESP starts


def manifest(*args: str | Path) -> str:
    proc = run_cli("manifest", *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def both(disk: Path, *extra: str) -> tuple[dict, dict, str, str]:  # type: ignore[type-arg]
    url = f"https://disks.example.com/{disk.name}"
    cp = manifest(disk, "--url", url, "--volume-set", "boot", *extra)
    kv = manifest(disk, "--url", url, "--target", "kubevirt", *extra)
    size = inspect_guest(disk).virtual_size
    return check_cpln(cp), check_kubevirt(kv, size), cp, kv


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's shim, signed by Microsoft's UEFI CA (as tests/guest/test_authenticode.py fetches it)."""
    for tool in ("apt-get", "dpkg"):
        require_tool(tool)
    d = tmp_path_factory.mktemp("shim")
    got = subprocess.run(["apt-get", "download", "shim-signed"], cwd=d, capture_output=True, text=True)
    assert got.returncode == 0, f"apt-get download failed: {got.stderr}"
    for deb in d.glob("*.deb"):
        run("dpkg", "-x", deb, d / "x")
    return d / "x/usr/lib/shim/shimx64.efi.signed"


def test_targets_table_is_the_cli_choice() -> None:
    proc = run_cli("manifest", "--help")
    assert all(name in proc.stdout for name in TARGETS) and set(TARGETS) == {"cpln", "kubevirt"}


def test_bios_mbr_linux_says_bios_explicitly(tmp_path: Path) -> None:
    disk = mbr_linux_disk(tmp_path)
    cp, kv, cp_text, kv_text = both(disk)
    assert cp["spec"]["vm"]["firmware"] == {"bootloader": "bios"}  # the default is efi: bios must be written
    assert cp["spec"]["vm"]["guestOS"] == "linux" and cp["spec"]["vm"]["bootDisk"]["bus"] == "virtio"
    assert any("firmware: bios (firmware-bios-only: GRUB boot code in the MBR" in c
               for c in comments_before(cp_text, "bootloader"))
    domain = kv["spec"]["template"]["spec"]["domain"]
    assert domain["firmware"]["bootloader"] == {"bios": {}} and "features" not in domain
    assert kv["spec"]["preference"]["name"] == "debian"
    requested = quantity_bytes(kv["spec"]["dataVolumeTemplates"][0]["spec"]["storage"]["resources"]["requests"]
                               ["storage"])
    assert requested == 1024 ** 3 and "rounded up to a whole Gi" in kv_text


def test_gpt_esp_is_efi_without_secure_boot(tmp_path: Path) -> None:
    disk = gpt_linux_disk(tmp_path)
    patch(disk, 0, bytes(440))  # no BIOS boot code: UEFI only
    assert inspect_guest(disk).firmware.verdict == "efi"
    cp, kv, cp_text, kv_text = both(disk)
    assert cp["spec"]["vm"]["firmware"] == {"bootloader": "efi"}  # secureBoot only when signed
    assert any("ESP 1 with \\EFI\\BOOT\\BOOTX64.EFI" in c for c in comments_before(cp_text, "bootloader"))
    domain = kv["spec"]["template"]["spec"]["domain"]
    assert domain["firmware"]["bootloader"] == {"efi": {"secureBoot": False}}
    assert any("not signed" in c for c in comments_before(kv_text, "secureBoot"))


def test_signed_shim_makes_secure_boot_with_smm(tmp_path: Path, shim: Path) -> None:
    disk = gpt_linux_disk(tmp_path)
    mtools("mcopy", Path(f"{disk}@@{ESP_OFFSET}"), "-o", str(shim), "::EFI/BOOT/BOOTX64.EFI")
    report = inspect_guest(disk)
    signer = report.firmware.loaders[0].signer
    assert report.firmware.secure_boot and signer and "Microsoft" in signer
    cp, kv, cp_text, _ = both(disk)
    assert cp["spec"]["vm"]["firmware"] == {"bootloader": "efi", "secureBoot": True}
    assert any(f"signed by {signer}" in c for c in comments_before(cp_text, "secureBoot"))
    domain = kv["spec"]["template"]["spec"]["domain"]
    assert domain["firmware"]["bootloader"] == {"efi": {"secureBoot": True}}
    assert domain["features"]["smm"] == {"enabled": True}
    # a flag turns it off, and says so; the VM stays admissible without SMM then
    off = manifest(disk, "--url", "https://x.example/d.raw", "--target", "kubevirt", "--no-secure-boot")
    vm = check_kubevirt(off, report.virtual_size)
    assert vm["spec"]["template"]["spec"]["domain"]["firmware"]["bootloader"] == {"efi": {"secureBoot": False}}
    assert any("set by --no-secure-boot" in c for c in comments_before(off, "secureBoot"))


def test_windows_without_viostor_is_sata_e1000e_with_a_warning(tmp_path: Path) -> None:
    disk = windows_disk(tmp_path, WindowsLayout(product="Windows Server 2022 Datacenter", edition="ServerDatacenter",
                                                installation_type="Server", build="20348", services={},
                                                sys_files=()))
    cp, kv, cp_text, kv_text = both(disk)
    assert cp["spec"]["vm"]["bootDisk"]["bus"] == "sata" and cp["spec"]["vm"]["guestOS"] == "windows"
    assert cp["spec"]["containers"][0]["cpu"] == "4000m" and cp["spec"]["containers"][0]["memory"] == "8Gi"
    template = kv["spec"]["template"]["spec"]
    assert template["domain"]["devices"]["disks"][0]["disk"] == {"bus": "sata"}
    assert template["domain"]["devices"]["interfaces"][0]["model"] == "e1000e"
    assert template["terminationGracePeriodSeconds"] == 3600
    hyperv = template["domain"]["features"]["hyperv"]
    assert hyperv["spinlocks"] == {"spinlocks": 8191} and {"relaxed", "vapic", "synic", "vpindex"} <= set(hyperv)
    assert template["domain"]["clock"]["timer"]["hpet"] == {"present": False}
    assert template["domain"]["clock"]["timer"]["rtc"] == {"tickPolicy": "catchup"}
    assert kv["spec"]["preference"]["name"] == "windows.2k22"
    assert any("vmStateStorageClass" in c for c in comments_before(kv_text, "preference"))
    for text in (cp_text, kv_text):
        assert re.search(r"^# warning: Windows without a boot-start viostor", text, re.M)
        assert re.search(r"^# warning: Windows without netkvm", text, re.M)
    assert any("INACCESSIBLE_BOOT_DEVICE" in c for c in comments_before(kv_text, "disk"))


def test_windows_with_virtio_drivers_is_virtio(tmp_path: Path) -> None:
    disk = windows_disk(tmp_path)  # Windows 11 Pro with viostor boot-start and netkvm
    cp, kv, _, kv_text = both(disk)
    assert cp["spec"]["vm"]["bootDisk"]["bus"] == "virtio"
    domain = kv["spec"]["template"]["spec"]["domain"]
    assert domain["devices"]["disks"][0]["disk"] == {"bus": "virtio"}
    assert "model" not in domain["devices"]["interfaces"][0]
    assert kv["spec"]["preference"]["name"] == "windows.11.virtio"
    assert "# warning:" not in kv_text


def test_flags_override_and_say_so(tmp_path: Path) -> None:
    disk = mbr_linux_disk(tmp_path)
    text = manifest(disk, "--url", "https://x.example/d.raw", "--volume-set", "boot", "--bus", "sata",
                    "--cpu", "4", "--memory", "8Gi", "--name", "web-1", "--firmware", "efi")
    cp = check_cpln(text)
    assert cp["name"] == "web-1" and cp["spec"]["containers"][0] == {"name": "vm", "cpu": "4000m", "memory": "8Gi"}
    assert cp["spec"]["vm"]["bootDisk"]["bus"] == "sata"
    assert comments_before(text, "bus") == ["# bus: sata (set by --bus (inferred: virtio))"]
    assert "set by --firmware (inferred: bios)" in comments_before(text, "bootloader")[0]
    bios_secure = run_cli("manifest", disk, "--url", "https://x/d.raw", "--secure-boot", "--volume-set", "v")
    assert bios_secure.returncode == 2 and "--secure-boot needs UEFI" in bios_secure.stderr
    unsigned = run_cli("manifest", disk, "--url", "https://x/d.raw", "--target", "kubevirt", "--firmware", "efi",
                       "--secure-boot")
    assert unsigned.returncode == 0 and "warning: --secure-boot asked" in unsigned.stderr
    vm = check_kubevirt(unsigned.stdout, disk.stat().st_size)  # secure boot asked: SMM comes with it
    assert vm["spec"]["template"]["spec"]["domain"]["features"]["smm"] == {"enabled": True}
    small = run_cli("manifest", disk, "--url", "https://x/d.raw", "--target", "kubevirt", "--size", "1M")
    assert small.returncode == 2 and "smaller than the disk's virtual size" in small.stderr


def test_checksums_the_workload_refuses_and_the_usage_errors(tmp_path: Path) -> None:
    disk = mbr_linux_disk(tmp_path)
    md5 = "md5:" + hashlib.md5(disk.read_bytes()).hexdigest()
    refused = run_cli("manifest", disk, "--url", "https://x/d.raw", "--volume-set", "v", "--checksum", md5)
    assert refused.returncode == 2 and "sha256:HEX or sha512:HEX only" in refused.stderr
    assert "Traceback" not in refused.stderr
    kv = manifest(disk, "--url", "https://x/d.raw", "--target", "kubevirt", "--checksum", md5)
    check_kubevirt(kv, disk.stat().st_size)
    assert data_volume(kv)["source"]["http"]["checksum"] == md5  # CDI takes md5
    assert kv.startswith("# diskport") and "\n---\n" in kv  # the DataVolume first, then the VM
    no_set = run_cli("manifest", disk, "--url", "https://x/d.raw")
    assert no_set.returncode == 2 and "--volume-set" in no_set.stderr
    local = run_cli("manifest", disk)
    assert local.returncode == 2 and "--url" in local.stderr
    unpushed = run_cli("build", disk, "--manifest", tmp_path / "m.yaml", cwd=tmp_path)
    assert unpushed.returncode == 2 and "--push" in unpushed.stderr and not (tmp_path / "mbr.oci").exists()
    local_import = run_cli("import", disk, tmp_path / "o.raw", "--manifest", tmp_path / "m.yaml")
    assert local_import.returncode == 2 and "--url URL" in local_import.stderr
    assert not (tmp_path / "o.raw").exists() and not (tmp_path / "m.yaml").exists()


def test_http_source_over_nginx_with_computed_checksum(tmp_path: Path, nginx: object) -> None:
    image = convert(gpt_linux_disk(tmp_path), "qcow2")
    url = nginx.put("disk.qcow2", image.read_bytes())  # type: ignore[attr-defined]
    out = tmp_path / "vm.yaml"
    proc = run_cli("manifest", url, "--target", "kubevirt", "--compute-checksum", "-o", out)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    vm = check_kubevirt(text, inspect_guest(image).virtual_size)
    assert "dataVolumeTemplates" not in vm["spec"]
    http = data_volume(text)["source"]["http"]
    assert http == {"url": url, "checksum": "sha256:" + hashlib.sha256(image.read_bytes()).hexdigest()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".diskport")] == []


def test_import_manifest_from_the_same_run(tmp_path: Path, nginx: object) -> None:
    image = convert(mbr_linux_disk(tmp_path), "qcow2")
    url = nginx.put("mbr.qcow2", image.read_bytes())  # type: ignore[attr-defined]
    digest = "sha256:" + hashlib.sha256(image.read_bytes()).hexdigest()
    proc = run_cli("import", url, tmp_path / "out.raw", "--checksum", digest, "--manifest", tmp_path / "w.yaml",
                   "--volume-set", "boot", "-q")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "w.yaml").read_text()
    cp = check_cpln(text)
    assert cp["spec"]["vm"]["bootDisk"]["source"]["http"] == {"url": url, "checksum": digest}
    assert cp["spec"]["vm"]["firmware"] == {"bootloader": "bios"}
    assert "verified by the import" in text


def _registry_gets(registry: RegistryServer) -> list[str]:
    return re.findall(r'"GET (\S+) HTTP', registry.log())


def test_docker_source_reads_the_labels_not_the_disk(registry: RegistryServer, tmp_path: Path) -> None:
    image = convert(gpt_linux_disk(tmp_path), "qcow2")
    ref = f"{registry.name}/containerdisks/debian:12"
    built = run_cli("build", image, "-t", ref, "--push", "--manifest", tmp_path / "built.yaml", "--target",
                    "kubevirt", "--instancetype", "u1.medium", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    pushed = re.search(r"pushed \S+@(sha256:[0-9a-f]{64})", built.stderr)
    assert pushed
    got = httpx.get(f"http://{registry.name}/v2/containerdisks/debian/manifests/12",
                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    layer = got.json()["layers"][0]["digest"]
    config = httpx.get(f"http://{registry.name}/v2/containerdisks/debian/blobs/{got.json()['config']['digest']}",
                       follow_redirects=True).json()
    # KubeVirt's hint, which CDI turns into the PVC label preference.inferFromVolume reads
    assert "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE=debian" in config["config"]["Env"]
    assert "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.medium" in config["config"]["Env"]
    before = len(_registry_gets(registry))
    text = manifest(f"docker://{ref}", "--target", "kubevirt")
    gets = _registry_gets(registry)[before:]
    assert gets and not any(layer in g for g in gets), f"the disk blob was fetched: {gets}"
    assert any("/manifests/12" in g for g in gets)
    vm = check_kubevirt(text)
    volume = vm["spec"]["template"]["spec"]["volumes"][0]
    assert volume["containerDisk"]["image"] == f"{registry.name}/containerdisks/debian@{pushed.group(1)}"
    assert "facts from the labels of" in text
    # the same YAML as build --manifest wrote from its own inspection, but for where the facts came from
    built_text = (tmp_path / "built.yaml").read_text()
    assert yaml.safe_load(built_text) == vm
    cp = check_cpln(manifest(f"docker://{ref}"))
    assert cp["spec"]["vm"]["bootDisk"]["source"] == {"oci": {"image": volume["containerDisk"]["image"]}}
    assert "persist" not in cp["spec"]["vm"]["bootDisk"]  # qcow2 boots as it is
    # import docker://REF --manifest pins the same digest and imports what it pins
    proc = run_cli("import", f"docker://{ref}", tmp_path / "d.raw", "--manifest", tmp_path / "imported.yaml", "-q")
    assert proc.returncode == 0, proc.stderr
    imported = check_cpln((tmp_path / "imported.yaml").read_text())
    assert imported["spec"]["vm"]["bootDisk"]["source"] == cp["spec"]["vm"]["bootDisk"]["source"]
    assert imported["spec"]["vm"]["firmware"] == cp["spec"]["vm"]["firmware"] == {"bootloader": "efi"}


def test_containerdisk_holding_vmdk_gets_the_advice(registry: RegistryServer, tmp_path: Path) -> None:
    image = convert(mbr_linux_disk(tmp_path), "vmdk")
    ref = f"{registry.name}/containerdisks/legacy:v1"
    built = run_cli("build", image, "-t", ref, "--push", cwd=tmp_path)
    assert built.returncode == 0 and "not a format a KubeVirt containerDisk boots" in built.stderr
    kv = run_cli("manifest", f"docker://{ref}", "--target", "kubevirt")
    assert kv.returncode == 2 and "--convert qcow2" in kv.stderr and "source.registry" in kv.stderr
    cp = run_cli("manifest", f"docker://{ref}")
    assert cp.returncode == 2 and "--volume-set" in cp.stderr and "vmdk" in cp.stderr
    text = manifest(f"docker://{ref}", "--volume-set", "boot")
    workload = check_cpln(text)
    assert workload["spec"]["vm"]["bootDisk"]["persist"] == {"volumeSet": "cpln://volumeset/boot"}
    assert workload["spec"]["vm"]["firmware"] == {"bootloader": "bios"}


def test_unlabelled_image_is_inspected(registry: RegistryServer, tmp_path: Path) -> None:
    """An image built by another tool carries no verdict labels: the disk itself is read."""
    image = convert(mbr_linux_disk(tmp_path), "qcow2")
    ref = f"{registry.name}/plain/mbr:v1"
    layout = tmp_path / "plain.oci"
    # diskport's own build with its labels stripped: the layout a plain containerDisk build gives
    built = run_cli("build", image, "--output", layout, "-t", "v1", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    _strip_labels(layout)
    pushed = run_cli("push", layout, ref)
    assert pushed.returncode == 0, pushed.stderr
    text = manifest(f"docker://{ref}", "--target", "kubevirt")
    assert "facts from guest inspection of the disk in" in text
    vm = check_kubevirt(text)
    assert vm["spec"]["template"]["spec"]["domain"]["firmware"]["bootloader"] == {"bios": {}}


def _strip_labels(layout: Path) -> None:
    """Rewrite the layout's config without Labels (and the manifest without annotations), as a plain image."""
    import json

    index = json.loads((layout / "index.json").read_text())
    entry = index["manifests"][0]
    blobs = layout / "blobs/sha256"
    manifest_obj = json.loads((blobs / entry["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest_obj["config"]["digest"].split(":")[1]).read_text())
    config["config"] = {}
    data = json.dumps(config).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    manifest_obj["config"].update(digest=f"sha256:{digest}", size=len(data))
    manifest_obj.pop("annotations", None)
    body = json.dumps(manifest_obj).encode()
    mdigest = hashlib.sha256(body).hexdigest()
    (blobs / mdigest).write_bytes(body)
    entry.update(digest=f"sha256:{mdigest}", size=len(body))
    (layout / "index.json").write_text(json.dumps(index))


def test_names_from_the_image_cannot_forge_yaml_or_comments() -> None:
    """A PRETTY_NAME with a newline and YAML in it stays one comment line and one scalar."""
    from diskport.manifest import BootSource, Overrides, render
    from diskport.manifest.model import GuestFacts, make_plan

    evil = "Evil\nkind: Secret\r\x1b[2J# x"
    facts = GuestFacts(os_type="linux", distribution="debian", pretty_name=evil, origin=f"labels of {evil}")
    source = BootSource("docker", "qcow2", 10 * MiB, image="r.example/x@sha256:" + "a" * 64)
    for target in TARGETS:
        text = render(make_plan(source, facts, Overrides(), target=target), target, "docker://r.example/x:1")
        docs = list(yaml.safe_load_all(text))
        assert docs[-1]["kind"] in ("workload", "VirtualMachine")
        assert not any(line.startswith("kind: Secret") for line in text.splitlines())
        assert "\x1b" not in text and "\r" not in text


def test_an_image_with_no_guest_gets_defaults_and_a_warning(tmp_path: Path) -> None:
    disk = tmp_path / "blank.raw"
    disk.write_bytes(bytes(4 * MiB))
    proc = run_cli("manifest", disk, "--url", "https://x/blank.raw", "--target", "kubevirt")
    assert proc.returncode == 0, proc.stderr
    assert "warning: no operating system found" in proc.stderr
    vm = check_kubevirt(proc.stdout, 4 * MiB)
    assert "preference" not in vm["spec"]
    assert vm["spec"]["template"]["spec"]["domain"]["firmware"]["bootloader"] == {"efi": {"secureBoot": False}}
    assert any("firmware-unknown" in c for c in comments_before(proc.stdout, "bootloader"))
    missing = run_cli("manifest", tmp_path / "nope.raw", "--url", "https://x/n.raw")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "nope.raw" in missing.stderr


def test_labels_with_values_build_never_writes_are_not_a_verdict() -> None:
    from diskport.manifest.model import facts_from_labels

    good = {"io.diskport.guest.os": "linux", "io.diskport.guest.bootloader": "bios", "io.diskport.guest.bus": "sata"}
    facts = facts_from_labels(good, "r/x@sha256:0")
    assert facts is not None and facts.bus.value == "sata" and facts.bootloader.value == "bios"
    assert facts_from_labels({**good, "io.diskport.guest.bus": "lun"}, "r/x@sha256:0") is None
    assert facts_from_labels({"io.diskport.guest.os": "linux"}, "r/x@sha256:0") is None
    verdict = "Windows 11 Pro; bus: sata (2 warnings: Fast Startup is on (hiberfil.sys))"
    labelled = facts_from_labels({**good, "io.diskport.guest.verdict": verdict}, "r/x@sha256:0")
    assert labelled is not None and labelled.warnings == ["Fast Startup is on (hiberfil.sys)"]


def test_instancetype_hint_is_checked(tmp_path: Path) -> None:
    image = convert(gpt_linux_disk(tmp_path), "qcow2")
    bad = run_cli("build", image, "--output", tmp_path / "x.oci", "--instancetype", "U1 Medium")
    assert bad.returncode == 2 and "not a Kubernetes resource name" in bad.stderr
    plain = run_cli("build", image, "--output", tmp_path / "y.oci", "-q")
    assert plain.returncode == 0, plain.stderr
    index = json.loads((tmp_path / "y.oci" / "index.json").read_text())
    blob = tmp_path / "y.oci/blobs/sha256"
    manifest_obj = json.loads((blob / index["manifests"][0]["digest"].removeprefix("sha256:")).read_text())
    config = json.loads((blob / manifest_obj["config"]["digest"].removeprefix("sha256:")).read_text())
    assert not any(e.startswith("INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=") for e in config["config"]["Env"])
