"""The OVF descriptor (DMTF DSP0243, OVF 1.x and 2.x): what an appliance's disks are and what VM they belong to.

Parsed with :mod:`defusedxml` (no DTD entities, no external references: an entity bomb or an ``<!ENTITY SYSTEM>``
is refused, not expanded) from at most :data:`MAX_DESCRIPTOR` bytes. Elements and attributes are matched by their
local names, so OVF 1.0 (``.../ovf/envelope/1``) and 2.0 (``.../ovf/envelope/2``) envelopes, and the CIM RASD,
SASD and EPASD items of either, read alike; VMware's ``vmw:`` and VirtualBox's ``vbox:`` extensions are read for
firmware, guest OS and boot order. Hand-written because no permissively licensed OVF reader exists for Python;
the field names and ResourceType numbers are the DMTF's (CIM_ResourceAllocationSettingData).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import defusedxml
from defusedxml import ElementTree as SafeET

from diskport.errors import CorruptImage, UnsafeImage, UnsupportedImage

MAX_DESCRIPTOR = 4 * 1024 * 1024
#: A capacity above this is hostile (1 EiB, say), not a disk; it is the ceiling of every other reader too.
MAX_CAPACITY = 64 * 1024**4
FMT = "ovf"

# CIM_ResourceAllocationSettingData.ResourceType values that matter here.
RT_CPU, RT_MEMORY, RT_IDE, RT_SCSI, RT_ETHERNET, RT_DISK, RT_OTHER_STORAGE, RT_SATA = 3, 4, 5, 6, 10, 17, 20, 20
CONTROLLER_BUS = {RT_IDE: "ide", RT_SCSI: "scsi", 7: "fc", 8: "iscsi", 9: "ib"}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(elem: ET.Element, name: str) -> str | None:
    """An attribute by local name, whatever its namespace (``ovf:href``, ``vmw:osType``, plain ``href``)."""
    for key, value in elem.attrib.items():
        if _local(key) == name:
            return value
    return None


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in elem if _local(child.tag) == name]


def _child_text(elem: ET.Element, name: str) -> str | None:
    for child in elem:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


_UNIT = re.compile(r"\s*byte\s*(?:\*\s*(\d+)\s*\^\s*(-?\d+))?\s*", re.IGNORECASE)
_NAMED_UNITS = {"byte": 1, "bytes": 1, "kb": 1024, "kilobytes": 1024, "kib": 1024, "mb": 1024**2,
                "megabytes": 1024**2, "mib": 1024**2, "gb": 1024**3, "gigabytes": 1024**3, "gib": 1024**3,
                "tb": 1024**4, "terabytes": 1024**4}


def parse_units(text: str | None, where: str) -> int:
    """Bytes per unit of a DSP0004 programmatic unit (``byte * 2^30``) or a common name (``MegaBytes``)."""
    if text is None or not text.strip():
        return 1
    m = _UNIT.fullmatch(text)
    if m:
        if m.group(1) is None:
            return 1
        base, power = int(m.group(1)), int(m.group(2))
        if base not in (2, 10) or not 0 <= power <= 60:
            raise UnsupportedImage(f"allocation unit '{text}' is not byte * 2^N or byte * 10^N", path=where, fmt=FMT)
        return int(base**power)
    named = _NAMED_UNITS.get(text.strip().lower())
    if named is None:
        raise UnsupportedImage(f"allocation unit '{text}' is not one diskport knows", path=where, fmt=FMT)
    return named


def _int(text: str | None, what: str, where: str) -> int | None:
    if text is None or text == "":
        return None
    if not text.strip().isdigit():
        raise CorruptImage(f"{what} '{text[:40]}' is not a whole number", path=where, fmt=FMT)
    return int(text)


def check_href(href: str, where: str) -> str:
    """A file reference as a member name of the package: relative, inside it, no URL."""
    if (not href or "://" in href or href.startswith(("/", "\\")) or "\\" in href or "\0" in href
            or any(part == ".." for part in href.split("/")) or re.match(r"^[A-Za-z]:", href)):
        raise UnsafeImage(f"refers to the file '{href}', which is not a member of the package "
                          "(only relative names inside the OVA are read, no absolute paths, '..' or URLs)",
                          path=where, fmt=FMT)
    while href.startswith("./"):
        href = href[2:]
    return href


@dataclass
class FileRef:
    id: str
    href: str
    size: int | None
    compression: str | None   # "gzip" or None
    chunk_size: int | None


@dataclass
class DiskDef:
    id: str
    file: FileRef | None
    capacity: int
    populated_size: int | None
    format: str | None


@dataclass
class Controller:
    instance: str
    bus: str
    subtype: str | None
    name: str | None


@dataclass
class Attachment:
    disk_id: str
    instance: str
    controller: Controller | None
    address: int | None


@dataclass
class VirtualSystem:
    id: str
    name: str | None
    cpus: int | None = None
    memory: int | None = None
    os_id: int | None = None
    os_type: str | None = None
    os_description: str | None = None
    firmware: str | None = None
    firmware_source: str | None = None
    controllers: list[Controller] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    nics: list[dict[str, Any]] = field(default_factory=list)
    boot_order: list[str] = field(default_factory=list)   # instance ids, as the descriptor gives them

    def boot_disk_id(self, disks: dict[str, DiskDef]) -> str | None:
        """The disk on the first boot device, else the first disk the hardware attaches, else None."""
        by_instance = {a.instance: a.disk_id for a in self.attachments}
        for instance in self.boot_order:
            if instance in by_instance:
                return by_instance[instance]
        for attachment in self.attachments:
            if attachment.disk_id in disks:
                return attachment.disk_id
        return None


@dataclass
class Descriptor:
    version: str
    files: dict[str, FileRef]
    disks: dict[str, DiskDef]
    systems: list[VirtualSystem]

    def system(self, name: str | None, where: str) -> VirtualSystem:
        if name is None:
            if len(self.systems) > 1:
                names = ", ".join(s.name or s.id for s in self.systems)
                raise UnsupportedImage(f"the appliance holds {len(self.systems)} virtual machines ({names})",
                                       path=where, fmt=FMT, hint="choose one with --vm NAME")
            if not self.systems:
                raise CorruptImage("the descriptor describes no virtual machine", path=where, fmt=FMT)
            return self.systems[0]
        for vs in self.systems:
            if name in (vs.name, vs.id):
                return vs
        raise UnsupportedImage(f"no virtual machine named '{name}' (known: "
                               f"{', '.join(s.name or s.id for s in self.systems)})", path=where, fmt=FMT)

    def disks_of(self, vs: VirtualSystem) -> list[DiskDef]:
        """The disks of ``vs``, boot disk first, then in the order the hardware attaches them; disks of the
        DiskSection that no hardware item names belong to a single VM only."""
        order = [a.disk_id for a in vs.attachments if a.disk_id in self.disks]
        if not order and len(self.systems) == 1:
            order = list(self.disks)
        boot = vs.boot_disk_id(self.disks)
        if boot in order:
            order.remove(boot)
            order.insert(0, boot)
        return [self.disks[d] for d in dict.fromkeys(order)]


def parse_descriptor(data: bytes, where: str) -> Descriptor:
    if len(data) > MAX_DESCRIPTOR:
        raise UnsafeImage(f"the OVF descriptor is {len(data)} bytes, more than the {MAX_DESCRIPTOR} limit",
                          path=where, fmt=FMT)
    try:
        root = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DefusedXmlException as e:
        raise UnsafeImage(f"the OVF descriptor uses a forbidden XML construct ({type(e).__name__}: DTDs, "
                          "entities and external references are refused)", path=where, fmt=FMT) from None
    except ET.ParseError as e:
        raise CorruptImage(f"the OVF descriptor is not well-formed XML: {e}", path=where, fmt=FMT) from None
    if _local(root.tag) != "Envelope":
        raise CorruptImage(f"the OVF descriptor's root is <{_local(root.tag)}>, not <Envelope>", path=where, fmt=FMT)
    namespace = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
    version = _attr(root, "version") or ("2.0" if namespace.endswith("/2") else "1.0")
    files: dict[str, FileRef] = {}
    for section in _children(root, "References"):
        for item in _children(section, "File"):
            file_id = _attr(item, "id") or ""
            href = check_href(_attr(item, "href") or "", where)
            compression = _attr(item, "compression")
            if compression in ("", "identity"):
                compression = None
            if compression not in (None, "gzip"):
                raise UnsupportedImage(f"file '{href}' uses compression '{compression}' (OVF allows gzip)",
                                       path=where, fmt=FMT)
            if file_id in files:
                raise CorruptImage(f"two References files have the id '{file_id}'", path=where, fmt=FMT)
            files[file_id] = FileRef(file_id, href, _int(_attr(item, "size"), "file size", where), compression,
                                     _int(_attr(item, "chunkSize"), "chunk size", where))
    disks: dict[str, DiskDef] = {}
    for section in (s for s in root if _local(s.tag) in ("DiskSection", "VirtualDiskSection")):
        for item in _children(section, "Disk"):
            disk_id = _attr(item, "diskId") or ""
            file_ref = _attr(item, "fileRef")
            if file_ref is not None and file_ref not in files:
                raise CorruptImage(f"disk '{disk_id}' names file '{file_ref}', which References does not list",
                                   path=where, fmt=FMT)
            capacity_text = _attr(item, "capacity") or ""
            if capacity_text.startswith("${"):
                raise UnsupportedImage(f"disk '{disk_id}' takes its capacity from property {capacity_text}",
                                       path=where, fmt=FMT)
            capacity = (_int(capacity_text, f"capacity of disk '{disk_id}'", where) or 0) * parse_units(
                _attr(item, "capacityAllocationUnits"), where)
            if capacity > MAX_CAPACITY:
                raise UnsafeImage(f"disk '{disk_id}' claims a capacity of {capacity} bytes, more than the "
                                  f"{MAX_CAPACITY} bytes any disk diskport reads may have", path=where, fmt=FMT)
            disks[disk_id] = DiskDef(disk_id, files.get(file_ref) if file_ref else None, capacity,
                                     _int(_attr(item, "populatedSize"), "populated size", where),
                                     _attr(item, "format"))
    systems: list[VirtualSystem] = []
    for elem in root.iter():
        if _local(elem.tag) == "VirtualSystem":
            systems.append(_parse_system(elem, where))
    return Descriptor(version, files, disks, systems)


def _disk_id_of(host_resource: str | None) -> str | None:
    """``ovf:/disk/vmdisk1`` (also ``/disk/vmdisk1``, ``ovf://disk/vmdisk1``) -> ``vmdisk1``."""
    if not host_resource:
        return None
    m = re.search(r"disk/([^/]+)$", host_resource.strip())
    return m.group(1) if m else None


def _parse_system(elem: ET.Element, where: str) -> VirtualSystem:
    vs = VirtualSystem(_attr(elem, "id") or "", _child_text(elem, "Name"))
    for section in elem:
        tag = _local(section.tag)
        if tag == "OperatingSystemSection":
            vs.os_id = _int(_attr(section, "id"), "OperatingSystemSection id", where)
            vs.os_type = _attr(section, "osType") or _child_text(section, "OSType")
            vs.os_description = _child_text(section, "Description")
        elif tag == "VirtualHardwareSection":
            _parse_hardware(vs, section, where)
        elif tag == "BootOrderSection":  # VMware: vmw:BootOrderSection vmw:instanceId="..." vmw:type="disk"
            instance = _attr(section, "instanceId")
            if instance:
                vs.boot_order.append(instance)
        elif tag == "Machine":  # VirtualBox's own description of the VM
            _parse_vbox(vs, section)
    return vs


def _parse_hardware(vs: VirtualSystem, section: ET.Element, where: str) -> None:
    items = [item for item in section if _local(item.tag) in ("Item", "StorageItem", "EthernetPortItem")]
    fields_of = [{_local(f.tag): (f.text or "").strip() for f in item} for item in items]
    controllers: dict[str, Controller] = {}
    for fields in fields_of:
        rtype = _int(fields.get("ResourceType"), "ResourceType", where)
        instance = fields.get("InstanceID", "")
        subtype = fields.get("ResourceSubType") or None
        if rtype in CONTROLLER_BUS or rtype == RT_OTHER_STORAGE:
            bus = CONTROLLER_BUS.get(rtype or 0) or _other_bus(subtype, fields.get("ElementName"))
            controllers[instance] = Controller(instance, bus, subtype, fields.get("ElementName"))
    vs.controllers = list(controllers.values())
    for item, fields in zip(items, fields_of, strict=True):
        rtype = _int(fields.get("ResourceType"), "ResourceType", where)
        if rtype == RT_CPU:
            vs.cpus = _int(fields.get("VirtualQuantity"), "CPU count", where)
        elif rtype == RT_MEMORY:
            quantity = _int(fields.get("VirtualQuantity"), "memory", where)
            if quantity is not None:
                vs.memory = quantity * parse_units(fields.get("AllocationUnits") or "byte * 2^20", where)
        elif rtype == RT_ETHERNET:
            vs.nics.append({"name": fields.get("ElementName"), "type": fields.get("ResourceSubType"),
                            "network": fields.get("Connection")})
        elif rtype == RT_DISK or (_local(item.tag) == "StorageItem" and fields.get("HostResource")):
            disk_id = _disk_id_of(fields.get("HostResource"))
            if disk_id is not None:
                vs.attachments.append(Attachment(disk_id, fields.get("InstanceID", ""),
                                                 controllers.get(fields.get("Parent", "")),
                                                 _int(fields.get("AddressOnParent"), "AddressOnParent", where)))
    for config in section.iter():
        if _local(config.tag) == "Config" and _attr(config, "key") == "firmware":
            vs.firmware = (_attr(config, "value") or "").lower() or None
            vs.firmware_source = "vmw:Config firmware"


def _other_bus(subtype: str | None, name: str | None) -> str:
    text = f"{subtype or ''} {name or ''}".lower()
    if "nvme" in text:
        return "nvme"
    if "sata" in text or "ahci" in text:
        return "sata"
    return "other"


def _parse_vbox(vs: VirtualSystem, machine: ET.Element) -> None:
    for elem in machine.iter():
        tag = _local(elem.tag)
        if tag == "Firmware" and vs.firmware is None:
            kind = (_attr(elem, "type") or "").lower()
            vs.firmware = "efi" if kind.startswith("efi") else "bios" if kind == "bios" else kind or None
            vs.firmware_source = "vbox:Machine Firmware"
        elif tag == "Machine" and vs.os_type is None and _attr(elem, "OSType"):
            vs.os_type = _attr(elem, "OSType")


def to_facts(desc: Descriptor, vs: VirtualSystem, disks: list[DiskDef]) -> dict[str, Any]:
    """The descriptor's facts for ``inspect --json`` and the summaries."""
    index = {d.id: i for i, d in enumerate(disks)}
    return {
        "ovf-version": desc.version,
        "virtual-systems": [s.name or s.id for s in desc.systems],
        "vm": vs.name or vs.id,
        "cpus": vs.cpus,
        "memory": vs.memory,
        "os": {"cim-id": vs.os_id, "os-type": vs.os_type, "description": vs.os_description},
        "firmware": vs.firmware,
        "firmware-source": vs.firmware_source,
        "controllers": [{"id": c.instance, "bus": c.bus, "type": c.subtype, "name": c.name} for c in vs.controllers],
        "nics": vs.nics,
        "disks": [{
            "index": index[d.id], "id": d.id, "file": d.file.href if d.file else None, "capacity": d.capacity,
            "populated-size": d.populated_size, "format": d.format,
            "compression": d.file.compression if d.file else None,
            "chunked": bool(d.file and d.file.chunk_size),
            "bus": next((a.controller.bus for a in vs.attachments if a.disk_id == d.id and a.controller), None),
            "address": next((a.address for a in vs.attachments if a.disk_id == d.id), None),
            "boot": i == 0,
        } for i, d in enumerate(disks)],
    }
