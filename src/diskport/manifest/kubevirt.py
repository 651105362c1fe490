"""The KubeVirt ``kubevirt.io/v1`` VirtualMachine that boots the disk (with its DataVolume for a URL).

Field names and types are KubeVirt's and CDI's API (their OpenAPI definitions; the tests validate against them).
The rules the admission webhooks add, kept here:

* a URL with a checksum gets a DataVolume document of its own before the VM, since KubeVirt's VirtualMachine
  API (its OpenAPI definitions vendor CDI's types) has no ``checksum`` in ``dataVolumeTemplates``' http source
  and the API server prunes fields its schema lacks; without a checksum the DataVolume is a template of the VM;

* ``firmware.bootloader.efi.secureBoot`` is true when left out, and secure boot needs ``features.smm.enabled:
  true``: so UEFI is always written with ``secureBoot`` explicit, and true only together with SMM;
* a DataVolume's requested size must hold the virtual size (CDI: "A larger PVC is required"): the disk's
  virtual size rounded up to a whole Gi, or ``--size``; ``spec.storage`` (not ``pvc``) so CDI adds the
  filesystem overhead itself;
* a containerDisk is booted as it is: raw or qcow2 only, and always a ``disk`` (never a ``lun``);
* an OVA's data disks (:attr:`Plan.data_disks`) follow the boot disk: a ``disk`` with the bus mapped from the
  OVF controller, a ``dataVolume`` volume and a ``dataVolumeTemplates`` entry each (no checksum is known for
  them, so a template is enough), sized from the OVF capacity; only the boot disk has a ``bootOrder``.

Windows gets what KubeVirt's common-instancetypes ``windows`` preferences set (their ``hyperv`` component: the
Hyper-V enlightenments, a UTC clock with the HPET off, PIT delay, RTC catch-up, the Hyper-V timer; and a
termination grace period of an hour, since Windows may install updates while shutting down), written out so the
VM is right without the preference too. A preference is named when one fits (``windows.2k22.virtio``,
``fedora``...); the VM's explicit fields override what it prefers.
"""

from __future__ import annotations

from typing import Any

from diskport.errors import UsageError
from diskport.manifest.model import CONTAINERDISK_FORMATS, Plan
from diskport.manifest.yamlout import Document

DISK = "rootdisk"
WINDOWS_GRACE_SECONDS = 3600


def hyperv_features() -> dict[str, Any]:
    """The enlightenments of common-instancetypes' ``hyperv`` preference component."""
    return {"relaxed": {}, "vapic": {}, "vpindex": {}, "spinlocks": {"spinlocks": 8191}, "synic": {},
            "synictimer": {"direct": {}}, "tlbflush": {}, "frequencies": {}, "reenlightenment": {}, "ipi": {},
            "runtime": {}, "reset": {}}


def windows_clock() -> dict[str, Any]:
    return {"utc": {}, "timer": {"hpet": {"present": False}, "pit": {"tickPolicy": "delay"},
                                 "rtc": {"tickPolicy": "catchup"}, "hyperv": {}}}


def build(plan: Plan) -> list[Document]:
    doc = Document({})
    before: list[Document] = []
    templates: list[dict[str, Any]] = []
    src = plan.source
    vmi = ("spec", "template", "spec")
    domain = (*vmi, "domain")
    windows = plan.guest.os_type == "windows"
    if src.kind == "docker":
        if src.disk_format not in CONTAINERDISK_FORMATS:
            raise UsageError(f"the containerDisk holds {src.disk_format}: KubeVirt boots a containerDisk only in "
                             "raw or qcow2", path=src.image,
                             hint="rebuild it with `diskport build --convert qcow2`, or import it with a "
                                  "DataVolume whose source is the registry (source.registry)")
        volume: dict[str, Any] = {"name": DISK, "containerDisk": {"image": src.image}}
        doc.note((*vmi, "volumes", 0, "containerDisk"), "containerDisk pinned by digest" +
                 (f" (resolved from {src.pinned_from})" if src.pinned_from else "") + f"; it holds {src.disk_format}")
    else:
        if plan.size is None:
            raise UsageError("the disk's virtual size is unknown: pass --size for the DataVolume")
        http: dict[str, Any] = {"url": src.url}
        if src.checksum:
            http["checksum"] = src.checksum
        dv_name = f"{plan.name}-{DISK}"
        dv_spec = {"source": {"http": http}, "storage": {"resources": {"requests": {"storage": plan.size.value}}}}
        size_why = f"{plan.size.why}; CDI adds the filesystem overhead"
        if src.checksum:
            # KubeVirt's VirtualMachine API vendors a CDI DataVolumeSourceHTTP without checksum, so in
            # dataVolumeTemplates the API server would prune it: the DataVolume is its own document then.
            dv = Document({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                           "metadata": {"name": dv_name}, "spec": dv_spec})
            dv.note(("spec", "storage", "resources", "requests", "storage"), size_why)
            dv.note(("spec", "source", "http", "checksum"), src.checksum_why)
            dv.note(("kind",), "a DataVolume of its own: KubeVirt's dataVolumeTemplates have no http checksum "
                               "field (the API server would drop it)")
            before.append(dv)
        else:
            templates = [{"metadata": {"name": dv_name}, "spec": dv_spec}]
            doc.note(("spec", "dataVolumeTemplates", 0, "spec", "storage", "resources", "requests", "storage"),
                     size_why)
        volume = {"name": DISK, "dataVolume": {"name": dv_name}}

    bootloader: dict[str, Any]
    features: dict[str, Any] = {}
    if plan.bootloader.value == "bios":
        bootloader = {"bios": {}}
    elif plan.secure_boot.value:
        bootloader = {"efi": {"secureBoot": True}}
        features["smm"] = {"enabled": True}
    else:
        bootloader = {"efi": {"secureBoot": False}}
    doc.note((*domain, "firmware", "bootloader"), f"firmware: {plan.bootloader.value} ({plan.bootloader.why})")
    if plan.bootloader.value == "efi":
        doc.note((*domain, "firmware", "bootloader", "efi", "secureBoot"),
                 f"secure boot: {str(plan.secure_boot.value).lower()} ({plan.secure_boot.why})"
                 + ("; it needs SMM, enabled below" if plan.secure_boot.value else
                    "; written out because KubeVirt's default is true"))
    if windows:
        features.update({"acpi": {}, "apic": {}, "hyperv": hyperv_features()})
    interface: dict[str, Any] = {"name": "default", "masquerade": {}}
    if plan.network.value != "virtio":
        interface["model"] = plan.network.value
    spec_domain: dict[str, Any] = {
        "cpu": {"cores": int(plan.cpu.value)},
        "memory": {"guest": str(plan.memory.value)},
        "firmware": {"bootloader": bootloader},
    }
    if features:
        spec_domain["features"] = features
        if windows:
            doc.note((*domain, "features"), "Windows: the Hyper-V enlightenments of common-instancetypes' "
                                            "windows preferences" + (" and SMM for secure boot"
                                                                     if "smm" in features else ""))
    if windows:
        spec_domain["clock"] = windows_clock()
        doc.note((*domain, "clock"), "Windows: UTC, HPET off, RTC catch-up, Hyper-V timer (as common-instancetypes)")
    spec_domain["devices"] = {
        "disks": [{"name": DISK, "disk": {"bus": plan.bus.value}, "bootOrder": 1}],
        "interfaces": [interface],
    }
    doc.note((*domain, "cpu"), f"cpu: {plan.cpu.why}")
    if plan.memory.why != plan.cpu.why:
        doc.note((*domain, "memory"), f"memory: {plan.memory.why}")
    doc.note((*domain, "devices", "disks", 0, "disk"), f"bus: {plan.bus.value} ({plan.bus.why})")
    volumes = [volume]
    for data in plan.data_disks:
        n = len(volumes)
        dv_name = f"{plan.name}-{data.name}"
        spec_domain["devices"]["disks"].append({"name": data.name, "disk": {"bus": data.bus.value}})
        doc.note((*domain, "devices", "disks", n, "disk"), f"{data.disk_id}, bus: {data.bus.value} ({data.bus.why})")
        volumes.append({"name": data.name, "dataVolume": {"name": dv_name}})
        doc.note((*vmi, "volumes", n, "dataVolume"), f"data disk {n} of the OVA ({data.disk_id})")
        k = len(templates)
        templates.append({"metadata": {"name": dv_name}, "spec": {
            "source": {"http": {"url": data.url}},
            "storage": {"resources": {"requests": {"storage": data.size.value}}}}})
        doc.note(("spec", "dataVolumeTemplates", k, "spec", "storage", "resources", "requests", "storage"),
                 f"{data.size.why}; CDI adds the filesystem overhead")
    doc.note((*domain, "devices", "interfaces", 0, "model" if "model" in interface else "masquerade"),
             f"network: {plan.network.value} ({plan.network.why})")
    template_spec: dict[str, Any] = {"domain": spec_domain, "networks": [{"name": "default", "pod": {}}],
                                     "volumes": volumes}
    if windows:
        template_spec = {"terminationGracePeriodSeconds": WINDOWS_GRACE_SECONDS, **template_spec}
        doc.note((*vmi, "terminationGracePeriodSeconds"), "Windows may install updates while it shuts down")
    spec: dict[str, Any] = {"runStrategy": "Always"}
    if plan.preference is not None:
        spec["preference"] = {"kind": "VirtualMachineClusterPreference", "name": plan.preference.value}
        doc.note(("spec", "preference"), str(plan.preference.why))
    if templates:
        spec["dataVolumeTemplates"] = templates
    spec["template"] = {"metadata": {"labels": {"kubevirt.io/domain": plan.name}}, "spec": template_spec}
    doc.data = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": plan.name},
                "spec": spec}
    return [*before, doc]
