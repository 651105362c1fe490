"""OVAs assembled the way VMware (ovftool) and VirtualBox write them, for the OVA tests.

The disks are real streamOptimized VMDKs from ``qemu-img convert -O vmdk -o subformat=streamOptimized`` (the
format both exporters use), the tar is written by :mod:`tarfile` (ustar, PAX or GNU), the descriptor follows
each exporter's layout and namespaces:

* VMware: OVF 1.0 envelope, ``vmw:`` namespace, ``vmw:osType`` on the OperatingSystemSection, firmware as
  ``<vmw:Config ovf:key="firmware" ovf:value="efi"/>``, a ``vmw:BootOrderSection``, SCSI/SATA/NVMe controllers,
  VmxNet3/E1000 NICs; the manifest (SHA256, or SHA1 for old exports) second, before the disks.
* VirtualBox: OVF 1.0 or 2.0 envelope, ``vbox:Machine`` with ``<Firmware type="EFI"/>``, IDE/SATA controllers;
  the manifest last, after the disks (VirtualBox hashes while it writes).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.images import make_image, qemu_raw_sha256

OVF1 = "http://schemas.dmtf.org/ovf/envelope/1"
OVF2 = "http://schemas.dmtf.org/ovf/envelope/2"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
SASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData"
EPASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData"
VMW = "http://www.vmware.com/schema/ovf"
VBOX = "http://www.virtualbox.org/ovf/machine"
VMDK_STREAM = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"


@dataclass
class Disk:
    path: Path                    # the VMDK file
    capacity: int                 # bytes
    bus: str = "scsi"             # scsi, sata, ide, nvme
    gzip: bool = False            # ovf:compression="gzip"
    chunk: int | None = None      # ovf:chunkSize


@dataclass
class Vm:
    name: str
    disks: list[Disk]
    cpus: int = 2
    memory_mib: int = 2048
    os_id: int = 101
    os_type: str = "ubuntu64Guest"
    firmware: str = "bios"        # bios or efi
    boot_disk: int = 0            # index into disks (VMware: vmw:BootOrderSection)
    nics: list[str] = field(default_factory=lambda: ["VmxNet3"])


def _item(rasd: str, fields: dict[str, str | int], tag: str = "Item", extra: str = "") -> str:
    body = "".join(f"<{rasd}:{k}>{v}</{rasd}:{k}>" for k, v in sorted(fields.items()))
    return f"<{tag}{extra}>{body}</{tag}>"


def vmware_ovf(vms: list[Vm], files: list[tuple[str, int, Disk]], sha1: bool = False) -> str:
    """An ovftool-style OVF 1.0 descriptor (several VMs: a VirtualSystemCollection)."""
    refs = "".join(
        f'<File ovf:href="{href}" ovf:id="file{i}" ovf:size="{size}"'
        + (' ovf:compression="gzip"' if d.gzip else "") + (f' ovf:chunkSize="{d.chunk}"' if d.chunk else "") + "/>"
        for i, (href, size, d) in enumerate(files, 1))
    disks = "".join(
        f'<Disk ovf:capacity="{d.capacity // 2**20}" ovf:capacityAllocationUnits="byte * 2^20" '
        f'ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" ovf:format="{VMDK_STREAM}" '
        f'ovf:populatedSize="{size}"/>' for i, (_, size, d) in enumerate(files, 1))
    systems = []
    n = 0
    for vm in vms:
        items = [_item("rasd", {"AllocationUnits": "hertz * 10^6", "ElementName": f"{vm.cpus} virtual CPU(s)",
                                "InstanceID": 1, "ResourceType": 3, "VirtualQuantity": vm.cpus}),
                 _item("rasd", {"AllocationUnits": "byte * 2^20", "ElementName": f"{vm.memory_mib}MB of memory",
                                "InstanceID": 2, "ResourceType": 4, "VirtualQuantity": vm.memory_mib})]
        controllers = {"scsi": (3, 6, "VirtualSCSI"), "sata": (4, 20, "vmware.sata.ahci"),
                       "ide": (5, 5, ""), "nvme": (6, 20, "vmware.nvme.controller")}
        for bus in dict.fromkeys(d.bus for d in vm.disks):
            inst, rtype, sub = controllers[bus]
            fields: dict[str, str | int] = {"ElementName": f"{bus.upper()} Controller 0", "InstanceID": inst,
                                            "ResourceType": rtype, "Address": 0}
            if sub:
                fields["ResourceSubType"] = sub
            items.append(_item("rasd", fields))
        boot_instance = 0
        for k, d in enumerate(vm.disks):
            n += 1
            inst = 10 + k
            if k == vm.boot_disk:
                boot_instance = inst
            items.append(_item("rasd", {"AddressOnParent": k, "ElementName": f"Hard Disk {k + 1}",
                                        "HostResource": f"ovf:/disk/vmdisk{n}", "InstanceID": inst,
                                        "Parent": controllers[d.bus][0], "ResourceType": 17}))
        for k, nic in enumerate(vm.nics):
            items.append(_item("rasd", {"AddressOnParent": 7 + k, "AutomaticAllocation": "true",
                                        "Connection": "VM Network", "ElementName": f"Network adapter {k + 1}",
                                        "InstanceID": 20 + k, "ResourceSubType": nic, "ResourceType": 10}))
        systems.append(
            f'<VirtualSystem ovf:id="{vm.name}"><Info>A virtual machine</Info><Name>{vm.name}</Name>'
            f'<OperatingSystemSection ovf:id="{vm.os_id}" vmw:osType="{vm.os_type}"><Info>OS</Info>'
            f"<Description>{vm.os_type}</Description></OperatingSystemSection>"
            f"<VirtualHardwareSection><Info>Virtual hardware</Info><System><vssd:ElementName>Virtual Hardware "
            f"Family</vssd:ElementName><vssd:InstanceID>0</vssd:InstanceID><vssd:VirtualSystemType>vmx-19"
            f"</vssd:VirtualSystemType></System>{''.join(items)}"
            f'<vmw:Config ovf:required="false" vmw:key="firmware" ovf:key="firmware" ovf:value="{vm.firmware}"/>'
            f"</VirtualHardwareSection>"
            f'<vmw:BootOrderSection vmw:instanceId="{boot_instance}" vmw:type="disk"><Info>Boot order</Info>'
            f"</vmw:BootOrderSection></VirtualSystem>")
    content = systems[0] if len(systems) == 1 else (
        '<VirtualSystemCollection ovf:id="vApp"><Info>A vApp</Info><Name>vApp</Name>'
        + "".join(systems) + "</VirtualSystemCollection>")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Envelope vmw:buildId="build-1" xmlns="{OVF1}" '
            f'xmlns:ovf="{OVF1}" xmlns:rasd="{RASD}" xmlns:vssd="{VSSD}" xmlns:vmw="{VMW}" '
            f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><References>{refs}</References>'
            f"<DiskSection><Info>Virtual disk information</Info>{disks}</DiskSection>"
            f'<NetworkSection><Info>Networks</Info><Network ovf:name="VM Network"/></NetworkSection>'
            f"{content}</Envelope>")


def virtualbox_ovf(vm: Vm, files: list[tuple[str, int, Disk]], version: int = 1) -> str:
    """A VirtualBox-style descriptor: OVF 1.0 (rasd Items) or 2.0 (StorageItem/EthernetPortItem)."""
    ns = OVF1 if version == 1 else OVF2
    refs = "".join(f'<File ovf:id="file{i}" ovf:href="{href}"/>' for i, (href, _, _) in enumerate(files, 1))
    disks = "".join(f'<Disk ovf:capacity="{d.capacity}" ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" '
                    f'ovf:format="{VMDK_STREAM}"/>' for i, (_, _, d) in enumerate(files, 1))
    items = [_item("rasd", {"Caption": f"{vm.cpus} virtual CPU", "Description": "Number of virtual CPUs",
                            "ElementName": f"{vm.cpus} virtual CPU", "InstanceID": 1, "ResourceType": 3,
                            "VirtualQuantity": vm.cpus}),
             _item("rasd", {"AllocationUnits": "MegaBytes", "Caption": f"{vm.memory_mib} MB of memory",
                            "ElementName": f"{vm.memory_mib} MB of memory", "InstanceID": 2, "ResourceType": 4,
                            "VirtualQuantity": vm.memory_mib}),
             _item("rasd", {"Address": 0, "Caption": "ideController0", "ElementName": "ideController0",
                            "InstanceID": 3, "ResourceSubType": "PIIX4", "ResourceType": 5}),
             _item("rasd", {"Address": 0, "Caption": "sataController0", "ElementName": "sataController0",
                            "InstanceID": 5, "ResourceSubType": "AHCI", "ResourceType": 20})]
    for k, d in enumerate(vm.disks):
        parent = 3 if d.bus == "ide" else 5
        fields: dict[str, str | int] = {"AddressOnParent": k, "Caption": f"disk{k + 1}",
                                        "ElementName": f"disk{k + 1}", "HostResource": f"/disk/vmdisk{k + 1}",
                                        "InstanceID": 10 + k, "Parent": parent, "ResourceType": 17}
        items.append(_item("sasd", fields, "StorageItem") if version == 2 else _item("rasd", fields))
    for k, nic in enumerate(vm.nics):
        fields = {"AutomaticAllocation": "true", "Caption": "Ethernet adapter on 'NAT'", "Connection": "NAT",
                  "ElementName": "Ethernet adapter on 'NAT'", "InstanceID": 20 + k, "ResourceSubType": nic,
                  "ResourceType": 10}
        items.append(_item("epasd", fields, "EthernetPortItem") if version == 2 else _item("rasd", fields))
    firmware = "EFI" if vm.firmware == "efi" else "BIOS"
    return (f'<?xml version="1.0"?>\n<Envelope ovf:version="{version}.0" xml:lang="en-US" xmlns="{ns}" '
            f'xmlns:ovf="{ns}" xmlns:rasd="{RASD}" xmlns:vssd="{VSSD}" xmlns:sasd="{SASD}" xmlns:epasd="{EPASD}" '
            f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="{VBOX}">'
            f"<References>{refs}</References><DiskSection><Info>List of the virtual disks used in the package"
            f"</Info>{disks}</DiskSection><NetworkSection><Info>Logical networks</Info>"
            f'<Network ovf:name="NAT"><Description>Logical network used by this appliance.</Description></Network>'
            f'</NetworkSection><VirtualSystem ovf:id="{vm.name}"><Info>A virtual machine</Info>'
            f'<OperatingSystemSection ovf:id="{vm.os_id}"><Info>The kind of installed guest operating system</Info>'
            f"<Description>{vm.os_type}</Description><vbox:OSType ovf:required=\"false\">{vm.os_type}"
            f"</vbox:OSType></OperatingSystemSection><VirtualHardwareSection><Info>Virtual hardware requirements"
            f"</Info><System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName><vssd:InstanceID>0"
            f"</vssd:InstanceID><vssd:VirtualSystemIdentifier>{vm.name}</vssd:VirtualSystemIdentifier>"
            f"<vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType></System>{''.join(items)}"
            f'</VirtualHardwareSection><vbox:Machine ovf:required="false" version="1.16-linux" '
            f'uuid="{{00000000-0000-0000-0000-000000000001}}" name="{vm.name}" OSType="{vm.os_type}">'
            f"<ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>"
            f'<Hardware><CPU count="{vm.cpus}"/><Memory RAMSize="{vm.memory_mib}"/>'
            f'<Firmware type="{firmware}"/><Boot><Order position="1" device="HardDisk"/></Boot></Hardware>'
            f"</vbox:Machine></VirtualSystem></Envelope>")


def disk_files(disks: list[Disk], stem: str) -> list[tuple[str, bytes, Disk]]:
    """(href, bytes of the file as stored, disk) per disk: gzip-compressed if asked."""
    out = []
    for k, d in enumerate(disks, 1):
        data = d.path.read_bytes()
        if d.gzip:
            data = gzip.compress(data, 6)
        out.append((f"{stem}-disk{k}.vmdk", data, d))
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT,
              compress: bool = False) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1700000000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(gzip.compress(raw, 1) if compress else raw)
    return path


def manifest(members: list[tuple[str, bytes]], algo: str = "sha256") -> bytes:
    label = algo.upper()
    return "".join(f"{label}({name})= {hashlib.new(algo, data).hexdigest()}\n" for name, data in members).encode()


def make_ova(path: Path, vms: list[Vm], *, style: str = "vmware", algo: str = "sha256", version: int = 1,
             fmt: int = tarfile.USTAR_FORMAT, compress: bool = False, with_manifest: bool = True,
             cert: bool = False) -> Path:
    """An OVA at ``path`` holding ``vms`` as ``style`` (vmware or virtualbox) exports them."""
    stem = path.stem
    all_disks = [d for vm in vms for d in vm.disks]
    files = disk_files(all_disks, stem)
    members: list[tuple[str, bytes]] = []
    for href, data, d in files:
        if d.chunk:
            members.extend((f"{href}.{i // d.chunk:09d}", data[i: i + d.chunk]) for i in range(0, len(data), d.chunk))
        else:
            members.append((href, data))
    refs = [(href, len(data), d) for href, data, d in files]
    ovf = (vmware_ovf(vms, refs, sha1=algo == "sha1") if style == "vmware"
           else virtualbox_ovf(vms[0], refs, version)).encode()
    ovf_member = (f"{stem}.ovf", ovf)
    mf = (f"{stem}.mf", manifest([ovf_member, *members], algo))
    ordered = [ovf_member]
    if style == "vmware":
        ordered += ([mf] if with_manifest else []) + ([(f"{stem}.cert", b"-----BEGIN CERTIFICATE-----\n")]
                                                      if cert else []) + members
    else:
        ordered += members + ([mf] if with_manifest else [])
    return write_tar(path, ordered, fmt, compress)


def stream_vmdk(tmp_path: Path, size: int, seed: int) -> tuple[Disk, str]:
    """A streamOptimized VMDK from qemu-img and qemu-img's raw conversion of it (sha256)."""
    vmdk = make_image(tmp_path, "vmdk", size, "subformat=streamOptimized", name=f"src-{seed}.vmdk", seed=seed)
    return Disk(vmdk, size), qemu_raw_sha256(vmdk, tmp_path)


def tar_members(ova: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(ova) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
