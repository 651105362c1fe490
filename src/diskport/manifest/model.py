"""What a manifest needs, target by target: where the platform boots from, the guest's facts, and the user's
overrides, each field a :class:`Choice` that remembers why it has its value.

A :class:`Choice` is a value and the sentence that becomes its YAML comment: inferred choices cite the evidence
(the guest-inspection rule and its reason, or the image label they were read from), a flag's choice says "set by
--bus". Targets read choices only, never the guest report, so every field of every target has one reason and the
same reason in every target.

An OVA adds a second witness, its OVF descriptor (:class:`OvfFacts`), weighed against the disk field by field:

* firmware: the disk's verdict when it has one (its boot loaders are what will run); the OVF's ``vmw:Config
  firmware`` or ``vbox:Machine`` Firmware when the disk cannot tell (verdict ``unknown``) or boots both ways; when
  the two disagree the disk wins, and a warning says so;
* CPU count and memory: the VirtualHardwareSection's (the VM as it ran), before the per-guest defaults; the flags
  still override;
* guestOS: the OperatingSystemSection's (``vmw:osType``, VirtualBox's OSType, the description) only when
  inspection found no operating system;
* data disks: one :class:`DataDisk` per disk after the boot disk, its bus mapped from the OVF controller it hangs
  off (:func:`bus_for_controller`) and its size from the DiskSection capacity (the disk itself is not inspected).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from diskport.errors import UsageError
from diskport.guest.facts import LABEL_PREFIX, VIRTIO_DRIVERS, GuestReport

GiB = 1024 ** 3
SourceKind = Literal["docker", "http"]
#: KubeVirt boots a containerDisk holding these formats as they are.
CONTAINERDISK_FORMATS = ("raw", "iso", "qcow2")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class Choice:
    value: str | bool | int
    why: str
    by_flag: bool = False


@dataclass
class BootSource:
    """Where the platform fetches the disk: a containerDisk pinned by digest, or a URL with its checksum."""

    kind: SourceKind
    disk_format: str
    virtual_size: int | None = None
    image: str | None = None        # registry/repository@sha256:... (docker)
    url: str | None = None          # http(s) URL (http)
    checksum: str | None = None     # ALGO:HEX
    checksum_why: str = ""
    pinned_from: str | None = None  # the reference as given, when it was a tag


@dataclass
class Overrides:
    """What the user set on the command line (None: infer it)."""

    name: str | None = None
    size: int | None = None
    bus: str | None = None
    firmware: str | None = None
    secure_boot: bool | None = None
    volume_set: str | None = None
    cpu: int | None = None
    memory: str | None = None


@dataclass
class GuestFacts:
    """The guest as the targets need it, from a :class:`GuestReport` or from the labels ``build`` wrote."""

    os_type: str = "unknown"          # linux, windows, unknown
    distribution: str | None = None   # os-release ID
    version: str | None = None
    pretty_name: str | None = None
    installation_type: str | None = None   # Windows: Client, Server, Server Core
    build: int | None = None
    guest_os: Choice = Choice("linux", "no guest facts; the platform's default")
    bootloader: Choice = Choice("efi", "no guest facts; the platform's default")
    secure_boot_possible: Choice = Choice(False, "no guest facts")
    bus: Choice = Choice("virtio", "no guest facts; the platform's default")
    network: Choice = Choice("virtio", "no guest facts; the platform's default")
    virtio_drivers: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)
    origin: str = "guest inspection"
    #: Guest inspection's firmware verdict (bios, efi, bios+efi, unknown); labels carry a decided bootloader.
    firmware_verdict: str = "unknown"
    #: CPUs and memory an OVA's descriptor gave the VM, as build recorded them in labels (None: not known).
    cpu: Choice | None = None
    memory: Choice | None = None

    @property
    def windows_server(self) -> bool:
        return self.os_type == "windows" and (self.installation_type or "").startswith("Server")


@dataclass
class OvfDisk:
    """One disk of the OVF's virtual system: its DiskSection id, capacity, controller and published URL."""

    disk_id: str
    capacity: int
    controller_bus: str | None       # the descriptor's: scsi, sata, ide, nvme, other...
    controller_type: str | None      # ResourceSubType (lsilogic, VirtualSCSI, AHCI, PIIX4, VirtioSCSI...)
    url: str | None = None


@dataclass
class OvfFacts:
    """What an OVA's descriptor says of the VM the disk comes from; disks[0] is the boot disk."""

    vm: str
    cpus: int | None = None
    memory: int | None = None          # bytes
    firmware: str | None = None        # bios, efi
    firmware_source: str | None = None
    os_id: int | None = None
    os_type: str | None = None
    os_description: str | None = None
    disks: list[OvfDisk] = field(default_factory=list)


@dataclass(frozen=True)
class DataDisk:
    """A disk after the boot disk, as the targets attach it."""

    name: str
    disk_id: str
    url: str
    bus: Choice
    size: Choice


@dataclass
class Plan:
    """Every field a target writes, decided once."""

    name: str
    source: BootSource
    guest: GuestFacts
    guest_os: Choice
    bootloader: Choice
    secure_boot: Choice
    bus: Choice
    network: Choice
    cpu: Choice
    memory: Choice
    size: Choice | None
    volume_set: str | None
    preference: Choice | None
    warnings: list[str]
    data_disks: list[DataDisk] = field(default_factory=list)


def facts_from_report(report: GuestReport) -> GuestFacts:
    def advice(name: str) -> Choice:
        item = next(a for a in report.advice if a.field == name)
        return Choice(item.value, f"{item.rule}: {item.reason}" if item.reason else item.rule)

    fw = report.firmware
    why = fw.secure_boot_reason or ("signed" if fw.secure_boot else "no signed UEFI fallback loader")
    drivers = tuple(sorted(d.name for d in report.drivers
                           if d.state in ("builtin", "module", "installed") and d.name in VIRTIO_DRIVERS))
    return GuestFacts(os_type=report.os.type, distribution=report.os.distribution, version=report.os.version,
                      pretty_name=report.os.pretty_name, installation_type=report.os.installation_type,
                      build=report.os.build, guest_os=advice("guestOS"), bootloader=advice("firmware.bootloader"),
                      secure_boot_possible=Choice(fw.secure_boot, why), bus=advice("bus"),
                      network=advice("network"), virtio_drivers=drivers, warnings=list(report.warnings),
                      firmware_verdict=fw.verdict)


#: The values build writes; labels with others are not trusted as a verdict.
_LABEL_VALUES = {"os": ("linux", "windows", "unknown"), "guest-os": ("linux", "windows"),
                 "bootloader": ("bios", "efi"), "secure-boot": ("true", "false"), "bus": ("virtio", "sata", "scsi"),
                 "network": ("virtio", "e1000e")}


def facts_from_labels(labels: dict[str, str], where: str) -> GuestFacts | None:
    """The verdict ``build`` recorded in the image config; None when the image carries none."""
    def label(name: str) -> str | None:
        value = labels.get(LABEL_PREFIX + name)
        return value if value else None

    if label("os") is None or label("bootloader") is None:
        return None
    for name, allowed in _LABEL_VALUES.items():
        if label(name) is not None and label(name) not in allowed:
            return None  # not a verdict diskport wrote: the disk is inspected instead
    verdict = label("verdict") or ""

    def chosen(name: str, default: str) -> Choice:
        value = label(name) or default
        return Choice(value, f"label {LABEL_PREFIX}{name} of {where}")

    build = label("os-build")
    cpus, memory = label("cpus"), label("memory")
    return GuestFacts(
        os_type=label("os") or "unknown", distribution=label("os-id"), version=label("os-version"),
        pretty_name=label("os-name"), installation_type=label("installation-type"),
        build=int(build) if build and build.isdigit() else None,
        guest_os=chosen("guest-os", "linux"), bootloader=chosen("bootloader", "efi"),
        secure_boot_possible=Choice(label("secure-boot") == "true",
                                    f"label {LABEL_PREFIX}secure-boot of {where}"),
        bus=chosen("bus", "virtio"), network=chosen("network", "virtio"),
        virtio_drivers=tuple(n for n in (label("virtio-drivers") or "").split(",") if n),
        warnings=[m.group(1)] if (m := re.search(r"\(\d+ warnings?: (.*)\)$", verdict)) else [],
        firmware_verdict=label("bootloader") or "unknown",
        cpu=Choice(int(cpus), f"label {LABEL_PREFIX}cpus of {where}") if cpus and cpus.isdigit() else None,
        memory=(Choice(memory, f"label {LABEL_PREFIX}memory of {where}")
                if memory and re.fullmatch(r"\d+(Mi|Gi)", memory) else None),
        origin=f"the labels of {where} (build's inspection: {verdict})" if verdict else f"the labels of {where}")


def default_name(text: str) -> str:
    """A Kubernetes/platform name (DNS label) from a reference, URL or file name."""
    base = text.rstrip("/").rsplit("/", 1)[-1]
    base = base.split("@", 1)[0].split(":", 1)[0].split("?", 1)[0]
    for suffix in (".gz", ".xz", ".zst", ".bz2"):
        base = base.removesuffix(suffix)
    base = re.sub(r"\.(qcow2|raw|img|vmdk|vhdx|vhd|vdi|iso|ova|ovf)$", "", base, flags=re.IGNORECASE)
    name = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")[:53].strip("-")
    return name or "vm"


def check_name(name: str) -> str:
    if len(name) > 63 or not _NAME.fullmatch(name):
        raise UsageError(f"--name '{name}' is not a valid name (lower-case letters, digits and '-', starting and "
                         "ending with a letter or digit, at most 63 characters)")
    return name


def gi_ceiling(size: int) -> int:
    return max(1, math.ceil(size / GiB))


def preference_for(guest: GuestFacts, bus: str) -> str | None:
    """The common-instancetypes cluster preference that fits the guest, or None."""
    if guest.os_type == "windows":
        build = guest.build or 0
        if guest.windows_server:
            name = next((n for b, n in ((26100, "2k25"), (20348, "2k22"), (17763, "2k19"), (14393, "2k16"),
                                        (9200, "2k12")) if build >= b), None)
        else:
            name = next((n for b, n in ((22000, "11"), (10240, "10"), (7600, "7")) if build >= b), None)
        if name is None:
            return None
        return f"windows.{name}" + (".virtio" if bus == "virtio" else "")
    if guest.os_type != "linux" or not guest.distribution:
        return None
    dist, major = guest.distribution.lower(), (guest.version or "").split(".", 1)[0]
    simple = {"fedora": "fedora", "ubuntu": "ubuntu", "debian": "debian", "alpine": "alpine", "cirros": "cirros",
              "ol": "oraclelinux", "sles": "sles", "opensuse-leap": "opensuse.leap",
              "opensuse-tumbleweed": "opensuse.tumbleweed"}
    if dist in simple:
        return simple[dist]
    if dist == "rhel" and major in ("7", "8", "9", "10"):
        return f"rhel.{major}"
    if dist == "centos" and major in ("9", "10"):
        return f"centos.stream{major}"
    return None


#: common-instancetypes' Windows preferences with its ``tpm`` component (persistent TPM).
_TPM_WINDOWS = ("10", "11", "2k16", "2k19", "2k22", "2k25")


def resources_for(guest: GuestFacts) -> tuple[int, str, str]:
    """Default CPUs, memory and why: what a user expects for the guest (and what its preference requires)."""
    if guest.os_type == "windows" and guest.windows_server:
        return 4, "8Gi", "default for Windows Server (4 CPUs, 8Gi: a server's roles need more than a desktop's)"
    if guest.os_type == "windows":
        return 2, "4Gi", "default for Windows (2 CPUs, 4Gi: Windows 11's minimum)"
    return 1, "2Gi", "default for a Linux guest (1 CPU, 2Gi)"


#: The OVF controller buses the platforms have, by name; the rest (nvme, fc, other) get the boot disk's bus.
_BUS_OF_CONTROLLER = {"scsi": "scsi", "sata": "sata", "ide": "sata", "virtio": "virtio"}


def bus_for_controller(disk: OvfDisk, boot_bus: Choice) -> Choice:
    """The platform bus for a data disk on the OVF controller it hangs off.

    SCSI (LSI Logic, BusLogic, VMware's pvscsi, VirtualBox's virtio-scsi) becomes ``scsi`` (both platforms'
    scsi is a virtio-scsi controller), SATA/AHCI ``sata``, IDE ``sata`` (neither platform has IDE; AHCI is the
    emulated bus every guest that had IDE also reaches), a virtio controller ``virtio``; NVMe and other
    controllers, which neither platform has, take the boot disk's bus, the one the guest is known to reach."""
    kind = disk.controller_bus or ""
    text = f"{kind} {disk.controller_type or ''}".lower()
    if kind not in ("scsi",) and "virtio" in text:
        kind = "virtio"
    named = f"{disk.controller_bus} controller" + (f" ({disk.controller_type})" if disk.controller_type else "")
    bus = _BUS_OF_CONTROLLER.get(kind)
    if bus is not None:
        return Choice(bus, f"the OVF puts {disk.disk_id} on a {named}"
                      + ("; the platform has no IDE, sata is its nearest bus" if kind == "ide" else ""))
    if disk.controller_bus is None:
        return Choice(boot_bus.value, f"the OVF attaches {disk.disk_id} to no controller; the boot disk's bus")
    return Choice(boot_bus.value, f"the OVF puts {disk.disk_id} on a {named}, which the platform does not have; "
                                  "the boot disk's bus")


_LINUX_NAMES = ("linux", "ubuntu", "debian", "rhel", "redhat", "centos", "sles", "suse", "fedora", "oracle",
                "rocky", "alma", "arch", "gentoo", "mandriva", "mandrake", "asianux", "photon", "coreos", "mint",
                "turbolinux", "amazonlinux", "amazon linux", "alpine")


#: Checked first: "Oracle Solaris" is not Oracle Linux, "darwin" not Windows.
_NEITHER = ("solaris", "bsd", "darwin", "macos", "mac os", "netware", "os2", "os/2", "dos", "illumos", "haiku")


def guest_os_from_ovf(ovf: OvfFacts) -> Choice | None:
    """linux or windows from the OperatingSystemSection's names (VMware's ``vmw:osType``, VirtualBox's OSType,
    the description), None when they name neither (BSDs, Solaris, "other")."""
    names = [n for n in (ovf.os_type, ovf.os_description) if n]
    where = ", ".join([f"ovf:id={ovf.os_id}"] * (ovf.os_id is not None) + [f"osType={ovf.os_type}"] * bool(
        ovf.os_type) + [f"description '{ovf.os_description}'"] * bool(
        ovf.os_description and ovf.os_description != ovf.os_type))
    for name in names:
        low = name.lower()
        if any(n in low for n in _NEITHER):
            return None
        if low.startswith("win") or "windows" in low:
            return Choice("windows", f"the OVF's OperatingSystemSection ({where}); inspection found no OS")
        if any(n in low for n in _LINUX_NAMES):
            return Choice("linux", f"the OVF's OperatingSystemSection ({where}); inspection found no OS")
    return None


def memory_quantity(size: int) -> str:
    """Bytes as Kubernetes writes memory: whole Gi when it is, else Mi rounded up."""
    if size % GiB == 0:
        return f"{size // GiB}Gi"
    return f"{max(1, math.ceil(size / (1024 * 1024)))}Mi"


def _firmware_with_ovf(guest: GuestFacts, ovf: OvfFacts | None, warnings: list[str]) -> Choice:
    """The disk's firmware verdict, or the OVF's when the disk cannot tell or boots both ways."""
    if ovf is None or ovf.firmware not in ("bios", "efi"):
        return guest.bootloader
    stated = f"{ovf.firmware_source or 'the OVF'}={ovf.firmware}"
    if guest.firmware_verdict == "unknown":
        return Choice(ovf.firmware, f"from the OVF, {stated}; the disk cannot tell: {guest.bootloader.why}")
    if guest.firmware_verdict == "bios+efi":
        return Choice(ovf.firmware, f"from the OVF, {stated}; the disk boots both ways: {guest.bootloader.why}")
    if guest.bootloader.value != ovf.firmware:
        warnings.append(f"the OVF says {stated}, but the disk boots with {guest.bootloader.value} only: the disk "
                        "wins")
        return Choice(guest.bootloader.value, f"{guest.bootloader.why}; the OVF's {stated} is overruled by the "
                                              "disk")
    return Choice(guest.bootloader.value, f"{guest.bootloader.why}; the OVF agrees ({stated})")


@dataclass(frozen=True)
class OvfJoin:
    """The fields an OVA's descriptor decides, weighed against the disk's (see the module docstring): the one
    place both ``manifest`` and ``build`` (its ``io.diskport.guest.*`` labels) take them from."""

    guest_os: Choice
    bootloader: Choice
    cpu: Choice | None
    memory: Choice | None
    warnings: list[str]


def join_ovf(guest: GuestFacts, ovf: OvfFacts | None) -> OvfJoin:
    """guestOS, firmware, CPUs and memory from the guest's facts and, where it has them, the OVF's."""
    warnings: list[str] = []
    guest_os = guest.guest_os
    if ovf is not None and guest.os_type == "unknown":
        guest_os = guest_os_from_ovf(ovf) or guest_os
    bootloader = _firmware_with_ovf(guest, ovf, warnings)
    cpu, memory = guest.cpu, guest.memory
    if ovf is not None and ovf.cpus:
        cpu = Choice(ovf.cpus, f"the OVF's VirtualHardwareSection: {ovf.cpus} virtual CPU(s)")
    if ovf is not None and ovf.memory:
        memory = Choice(memory_quantity(ovf.memory),
                        f"the OVF's VirtualHardwareSection: {ovf.memory // (1024 * 1024)} MiB of memory")
    return OvfJoin(guest_os, bootloader, cpu, memory, warnings)


def ovf_labels(guest: GuestFacts, ovf: OvfFacts) -> dict[str, str]:
    """The ``io.diskport.guest.*`` labels :func:`join_ovf` changes or adds for an image built from an OVA, so
    ``manifest docker://REF`` reads the same decision ``manifest X.ova`` makes."""
    joined = join_ovf(guest, ovf)
    labels = {LABEL_PREFIX + "guest-os": str(joined.guest_os.value),
              LABEL_PREFIX + "bootloader": str(joined.bootloader.value),
              LABEL_PREFIX + "ovf-vm": ovf.vm[:256]}
    if joined.cpu is not None:
        labels[LABEL_PREFIX + "cpus"] = str(joined.cpu.value)
    if joined.memory is not None:
        labels[LABEL_PREFIX + "memory"] = str(joined.memory.value)
    if ovf.firmware in ("bios", "efi"):
        labels[LABEL_PREFIX + "ovf-firmware"] = ovf.firmware
    if ovf.os_type:
        labels[LABEL_PREFIX + "ovf-os-type"] = ovf.os_type[:256]
    return labels


def make_plan(source: BootSource, guest: GuestFacts, overrides: Overrides, *, target: str,
              ovf: OvfFacts | None = None) -> Plan:
    """Decide every field: the flags first, then what the guest says, then what an OVA's descriptor says."""
    name = check_name(overrides.name) if overrides.name else default_name(
        (ovf.vm if ovf is not None else None) or source.pinned_from or source.image or source.url or "vm")
    warnings = list(guest.warnings)

    def pick(flag: str, given: str | bool | None, inferred: Choice) -> Choice:
        if given is None:
            return inferred
        return Choice(given, f"set by {flag}" + (f" (inferred: {_text(inferred.value)})"
                                                 if given != inferred.value else ""), True)

    joined = join_ovf(guest, ovf)
    warnings.extend(joined.warnings)
    guest_os = joined.guest_os
    ovf_os = guest_os if guest_os is not guest.guest_os else None
    bootloader = pick("--firmware", overrides.firmware, joined.bootloader)
    bus = pick("--bus", overrides.bus, guest.bus)
    if overrides.secure_boot is not None:
        secure = Choice(overrides.secure_boot, "set by " + ("--secure-boot" if overrides.secure_boot
                                                            else "--no-secure-boot"), True)
        if overrides.secure_boot and bootloader.value != "efi":
            raise UsageError("--secure-boot needs UEFI firmware: the image boots with BIOS (pass --firmware efi "
                             "if it also boots with UEFI)")
        if overrides.secure_boot and not guest.secure_boot_possible.value:
            warnings.append(f"--secure-boot asked, but {guest.secure_boot_possible.why}: the firmware may refuse "
                            "to start the loader")
    elif bootloader.value != "efi":
        secure = Choice(False, "BIOS boot")
    else:
        secure = Choice(bool(guest.secure_boot_possible.value), guest.secure_boot_possible.why)
    if guest.os_type == "windows" and bus.value == "virtio" and "viostor" not in guest.virtio_drivers \
            and bus.by_flag:
        warnings.append("--bus virtio for a Windows guest without viostor: Windows stops with "
                        "INACCESSIBLE_BOOT_DEVICE")
    if target == "cpln" and overrides.size is not None:
        warnings.append("--size is for KubeVirt's DataVolume: the platform sizes the boot volume from its volume "
                        "set")
    if guest.os_type == "unknown" and ovf_os is not None:
        warnings.append(f"no operating system found in the image: guestOS {ovf_os.value} is the OVF's, bus and "
                        "network are the platform's defaults; check them or pass --bus/--firmware")
    elif guest.os_type == "unknown":
        warnings.append("no operating system found in the image: guestOS, bus and network are the platform's "
                        "defaults; check them or pass --bus/--firmware")
    if guest.os_type == "windows" and not bus.by_flag and bus.value == "sata":
        warnings.append("Windows without a boot-start viostor: the disk is on sata (slower than virtio); "
                        "install the virtio-win drivers before upload to use virtio")
    if guest.os_type == "windows" and guest.network.value == "e1000e":
        warnings.append("Windows without netkvm: the network card is an emulated e1000e")
    cpus, memory, why = resources_for(guest)
    cpu_default = joined.cpu or Choice(cpus, why)
    mem_default = joined.memory or Choice(memory, why)
    cpu = Choice(overrides.cpu, "set by --cpu", True) if overrides.cpu is not None else cpu_default
    mem = Choice(overrides.memory, "set by --memory", True) if overrides.memory else mem_default
    size: Choice | None = None
    if overrides.size is not None:
        if source.virtual_size is not None and overrides.size < source.virtual_size:
            raise UsageError(f"--size {overrides.size} is smaller than the disk's virtual size "
                             f"{source.virtual_size} bytes: the import would fail ('A larger PVC is required')")
        size = Choice(f"{gi_ceiling(overrides.size)}Gi", "set by --size", True)
    elif source.virtual_size is not None:
        size = Choice(f"{gi_ceiling(source.virtual_size)}Gi",
                      f"the disk's virtual size, {source.virtual_size} bytes, rounded up to a whole Gi")
    preference_name = preference_for(guest, str(bus.value))
    preference = None if preference_name is None else Choice(
        preference_name, f"common-instancetypes preference for {guest.pretty_name or guest.os_type}"
        + (" with VirtIO drivers" if preference_name.endswith(".virtio") else "")
        + "; the fields below override what it prefers"
        + ("; it also prefers a persistent TPM, which needs KubeVirt's vmStateStorageClass"
           if preference_name.startswith("windows.") and preference_name.split(".")[1] in _TPM_WINDOWS else ""))
    volume_set = overrides.volume_set
    if volume_set is not None and not volume_set.startswith("cpln://"):
        volume_set = f"cpln://volumeset/{volume_set}"
    data_disks: list[DataDisk] = []
    for i, disk in enumerate(ovf.disks[1:] if ovf is not None else [], 1):
        if disk.url is None:
            warnings.append(f"disk {i} ({disk.disk_id}) has no file in the OVA (an empty disk): not attached")
            continue
        data_disks.append(DataDisk(
            name=f"datadisk{i}", disk_id=disk.disk_id, url=disk.url, bus=bus_for_controller(disk, bus),
            size=Choice(f"{gi_ceiling(disk.capacity)}Gi", f"the OVF's capacity of {disk.disk_id}, {disk.capacity} "
                                                          "bytes, rounded up to a whole Gi")))
    if target == "cpln" and data_disks:
        listed = "; ".join(f"disk {d.name.removeprefix('datadisk')} {d.disk_id} ({d.size.value}, {d.bus.value}) "
                           f"at {d.url}" for d in data_disks)
        warnings.append("the platform's vm workload has one disk, spec.vm.bootDisk (its WorkloadVm has no data-"
                        f"disk field): only the boot disk is written; not attached: {listed}")
    return Plan(name=name, source=source, guest=guest, guest_os=guest_os, bootloader=bootloader,
                secure_boot=secure, bus=bus, network=guest.network, cpu=cpu, memory=mem, size=size,
                volume_set=volume_set, preference=preference, warnings=warnings, data_disks=data_disks)


def _text(value: str | bool | int) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
