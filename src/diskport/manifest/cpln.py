"""The Control Plane (cpln) workload that boots the disk: ``kind: workload``, ``spec.type: vm``.

No schema is published for it; the field names are the platform's own, from its public Terraform provider
(controlplane-com/terraform-provider-cpln, ``internal/provider/client/workload.go``: the JSON names of
``WorkloadVm``, ``WorkloadVmBootDisk``, ``...Source{Oci,Http}``, ``...Persist``, ``WorkloadVmFirmware``; and
``docs/resources/workload.md`` for their rules): ``spec.vm.bootDisk.source.oci.image`` or
``source.http.{url,checksum}`` (checksum ``sha256:HEX`` or ``sha512:HEX``), ``bootDisk.persist.volumeSet``
(``cpln://volumeset/NAME``; required for a non-OCI source), ``bootDisk.bus`` (virtio, sata, scsi),
``vm.guestOS`` (linux, windows), ``vm.firmware.bootloader`` (bios, efi; **default efi**) and
``vm.firmware.secureBoot`` (default false); the CPU and memory are the single container's ``cpu`` and
``memory``, which must not set ``image``.

Rules chosen: ``firmware.bootloader`` is always written (a BIOS disk left to the default would not boot);
``secureBoot`` only when true; a containerDisk not in raw or qcow2 is imported through a volume set too, so it
needs ``--volume-set`` as an http source does. The provider's ``WorkloadVm`` has one disk only (``bootDisk``; no
data-disk field), so of an OVA's several disks the boot disk is written and the plan's warning, in the header,
lists the others with the URL and bus each would have.
"""

from __future__ import annotations

from diskport.errors import UsageError
from diskport.manifest.model import CONTAINERDISK_FORMATS, Plan
from diskport.manifest.yamlout import Document

CHECKSUM_ALGORITHMS = ("sha256", "sha512")


def millicores(cpus: int) -> str:
    return f"{cpus * 1000}m"


def build(plan: Plan) -> list[Document]:
    src = plan.source
    vm_path = ("spec", "vm")
    disk_path = (*vm_path, "bootDisk")
    boot: dict[str, object] = {}
    doc = Document({})
    if src.kind == "docker":
        boot["source"] = {"oci": {"image": src.image}}
        doc.note((*disk_path, "source"), "containerDisk pinned by digest" +
                 (f" (resolved from {src.pinned_from})" if src.pinned_from else ""))
        needs_persist = src.disk_format not in CONTAINERDISK_FORMATS
        why_persist = (f"the containerDisk holds {src.disk_format}, which boots only after CDI imports it into a "
                       "volume")
    else:
        http: dict[str, object] = {"url": src.url}
        if src.checksum:
            algo = src.checksum.split(":", 1)[0].lower()
            if algo not in CHECKSUM_ALGORITHMS:
                raise UsageError(f"--checksum {algo}: the platform's workload takes sha256:HEX or sha512:HEX only",
                                 hint="pass a sha256 or sha512 checksum, or --compute-checksum")
            http["checksum"] = src.checksum
        boot["source"] = {"http": http}
        if src.checksum:
            doc.note((*disk_path, "source", "http", "checksum"), src.checksum_why)
        needs_persist = True
        why_persist = "an http source is imported into a volume"
    if plan.volume_set:
        boot["persist"] = {"volumeSet": plan.volume_set}
        doc.note((*disk_path, "persist"), "set by --volume-set" + (f" (required: {why_persist})"
                                                                   if needs_persist else ""))
    elif needs_persist:
        raise UsageError(f"the workload needs bootDisk.persist.volumeSet: {why_persist}",
                         hint="pass --volume-set NAME (a volume set in the workload's GVC)")
    if plan.data_disks:
        doc.note(disk_path, f"the OVA's boot disk; its {len(plan.data_disks)} data disk(s) cannot be attached "
                            "(see the warning above)")
    boot["bus"] = plan.bus.value
    doc.note((*disk_path, "bus"), f"bus: {plan.bus.value} ({plan.bus.why})")
    firmware: dict[str, object] = {"bootloader": plan.bootloader.value}
    doc.note((*vm_path, "firmware", "bootloader"),
             f"firmware: {plan.bootloader.value} ({plan.bootloader.why})"
             + ("; written out because the platform's default is efi" if plan.bootloader.value == "bios" else ""))
    if plan.secure_boot.value:
        firmware["secureBoot"] = True
        doc.note((*vm_path, "firmware", "secureBoot"), f"secure boot ({plan.secure_boot.why})")
    elif plan.bootloader.value == "efi":
        doc.note((*vm_path, "firmware"), f"no secureBoot ({plan.secure_boot.why})")
    container = {"name": "vm", "cpu": millicores(int(plan.cpu.value)), "memory": str(plan.memory.value)}
    doc.note(("spec", "containers", 0, "cpu"), f"cpu: {plan.cpu.why}")
    if plan.memory.why != plan.cpu.why:
        doc.note(("spec", "containers", 0, "memory"), f"memory: {plan.memory.why}")
    doc.data = {
        "kind": "workload",
        "name": plan.name,
        **({"description": plan.guest.pretty_name[:200]} if plan.guest.pretty_name else {}),
        "spec": {
            "type": "vm",
            "containers": [container],
            "vm": {"bootDisk": boot, "firmware": firmware, "guestOS": plan.guest_os.value},
        },
    }
    doc.note((*vm_path, "guestOS"), f"guestOS: {plan.guest_os.value} ({plan.guest_os.why})")
    return [doc]
