"""The facts guest inspection reports, as plain dataclasses with one JSON form.

Facts are what the image says, each with its evidence (which file, which key, which sector); the advice in
:mod:`diskport.guest.advice` is derived from these alone. The JSON field names (kebab-case, like ``inspect``'s
qemu-img-style names) are a stable interface documented in the README: add fields, never rename them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from diskport.formats.base import Access

FirmwareVerdict = Literal["bios", "efi", "bios+efi", "unknown"]
DriverState = Literal["builtin", "module", "installed", "disabled", "missing", "unknown"]


@dataclass
class VolumeFacts:
    """One partition (or the whole disk, number 0, when it has no partition table), or one LVM logical volume
    (number None, ``name`` "vg/lv", ``start`` where its first extent lies on the disk)."""

    number: int | None
    start: int
    size: int
    type: str | None = None
    type_name: str | None = None
    name: str | None = None
    uuid: str | None = None
    active: bool = False
    logical: bool = False
    filesystem: str | None = None
    version: str | None = None
    label: str | None = None
    fs_uuid: str | None = None
    readable: bool = False
    #: Why the filesystem could not be read, when it was meant to be.
    error: str | None = None
    lv: str | None = None          # LVM: the LV's and its VG's names
    vg: str | None = None
    lv_kind: str | None = None     # "linear", "striped", "thin", "thin-pool", "snapshot", "raid1", "cache", ...
    lv_segments: int | None = None
    lv_origin: str | None = None   # a snapshot's origin LV
    lv_pool: str | None = None     # a thin LV's pool

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number, "start": self.start, "size": self.size, "type": self.type,
            "type-name": self.type_name, "name": self.name, "uuid": self.uuid, "active": self.active,
            "logical": self.logical, "filesystem": self.filesystem, "fs-version": self.version,
            "label": self.label, "fs-uuid": self.fs_uuid, "readable": self.readable, "error": self.error,
            "lv": self.lv, "vg": self.vg, "lv-kind": self.lv_kind, "lv-segments": self.lv_segments,
            "lv-origin": self.lv_origin, "lv-pool": self.lv_pool,
        }


@dataclass
class LoaderFacts:
    """An EFI loader found on an ESP, and its Authenticode signature."""

    partition: int
    path: str
    role: str                    # "fallback" (\EFI\BOOT\BOOTX64.EFI), "windows", "shim", "grub", "systemd-boot"
    machine: str | None = None   # "x86-64", "aarch64", ...
    signed: bool = False
    signer: str | None = None    # "Microsoft UEFI CA 2011", "Microsoft Windows Production PCA 2011", CN of another
    digest_ok: bool | None = None
    #: Why a signature that is there could not be read, or why the loader could not be looked into.
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"partition": self.partition, "path": self.path, "role": self.role, "machine": self.machine,
                "signed": self.signed, "signer": self.signer, "digest-ok": self.digest_ok,
                "problem": self.problem}


@dataclass
class FirmwareFacts:
    verdict: FirmwareVerdict = "unknown"
    bios: bool = False
    efi: bool = False
    boot_code: str | None = None   # "zero", "grub", "windows", "syslinux", "unknown"
    reasons: list[str] = field(default_factory=list)
    loaders: list[LoaderFacts] = field(default_factory=list)
    secure_boot: bool = False      # the UEFI fallback loader is signed by a CA in the platform's Secure Boot db
    secure_boot_reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "bios": self.bios, "efi": self.efi, "boot-code": self.boot_code,
                "reasons": list(self.reasons), "loaders": [x.to_json() for x in self.loaders],
                "secure-boot": {"possible": self.secure_boot, "reason": self.secure_boot_reason}}


@dataclass
class DriverFacts:
    """A driver the platform's buses need, and where it was found."""

    name: str                      # "virtio_blk", "viostor", "ahci", ...
    state: DriverState
    evidence: str = ""
    #: For a Linux module: whether the kernel's initramfs holds it (None: not known, or not a module).
    initramfs: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "evidence": self.evidence, "in-initramfs": self.initramfs}


@dataclass
class InitramfsFacts:
    """A kernel's initramfs and what was found in it."""

    path: str
    archives: list[str] = field(default_factory=list)  # "cpio", "cpio+zstd", ... in file order
    entries: int = 0
    modules: list[str] = field(default_factory=list)   # the bus drivers it holds
    complete: bool = False                             # listed to its end (else stopped once all were found)
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "archives": list(self.archives), "entries": self.entries,
                "modules": list(self.modules), "complete": self.complete, "problem": self.problem}


@dataclass
class KernelFacts:
    """One installed kernel: its image, its bus drivers and its initramfs."""

    version: str
    image: str | None = None
    initramfs: InitramfsFacts | None = None
    drivers: list[DriverFacts] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "image": self.image,
                "initramfs": None if self.initramfs is None else self.initramfs.to_json(),
                "drivers": [d.to_json() for d in self.drivers]}


@dataclass
class BootEntry:
    """A boot menu entry: a grub.cfg ``linux`` line or a Boot Loader Specification entry."""

    source: str                    # the file it is in
    kernel: str                    # the kernel image path as written
    options: str = ""              # the kernel command line
    initrd: list[str] = field(default_factory=list)
    title: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "title": self.title, "kernel": self.kernel, "options": self.options,
                "initrd": list(self.initrd)}


@dataclass
class OsFacts:
    type: Literal["linux", "windows", "unknown"] = "unknown"
    partition: int | None = None   # where the OS's root (or Windows) volume is
    lv: str | None = None          # or the logical volume ("vg/lv") it is on
    distribution: str | None = None  # os-release ID
    version: str | None = None       # os-release VERSION_ID, or Windows DisplayVersion/CurrentVersion
    pretty_name: str | None = None   # os-release PRETTY_NAME, or Windows' product name as corrected by build
    product_name: str | None = None  # Windows ProductName as written in the hive
    edition: str | None = None       # Windows EditionID
    installation_type: str | None = None  # Windows InstallationType: Client, Server, Server Core
    build: int | None = None
    architecture: str | None = None  # "x86_64", "aarch64", ...
    kernels: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    root_device: str | None = None     # the source of / in /etc/fstab ("UUID=...", "/dev/mapper/...")
    kernel_root: str | None = None     # root= on the default boot entry's command line
    root_subvolume: str | None = None  # btrfs: the subvolume holding the root (its path from the top level)
    boot_partition: int | None = None  # a separate /boot volume
    selinux_relabel: bool = False      # /.autorelabel: the first boot relabels the filesystem, then reboots
    boot_entries: list[BootEntry] = field(default_factory=list)
    kernel_details: list[KernelFacts] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "partition": self.partition, "lv": self.lv, "distribution": self.distribution,
                "version": self.version, "pretty-name": self.pretty_name, "product-name": self.product_name,
                "edition": self.edition, "installation-type": self.installation_type, "build": self.build,
                "architecture": self.architecture, "kernels": list(self.kernels), "evidence": list(self.evidence),
                "root-device": self.root_device, "kernel-root": self.kernel_root,
                "root-subvolume": self.root_subvolume, "boot-partition": self.boot_partition,
                "selinux-relabel": self.selinux_relabel, "boot-entries": [b.to_json() for b in self.boot_entries],
                "kernel-details": [k.to_json() for k in self.kernel_details]}


@dataclass
class AdviceItem:
    """One field of the platform's workload, the value chosen, and the named rule that chose it."""

    field: str                     # "guestOS", "firmware.bootloader", "firmware.secureBoot", "bus", "network"
    value: str | bool
    rule: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"field": self.field, "value": self.value, "rule": self.rule, "reason": self.reason}


#: Prefix of the labels ``build`` writes into a containerDisk's config and manifest annotations.
LABEL_PREFIX = "io.diskport.guest."
ADVICE_LABELS = {"guestOS": "guest-os", "firmware.bootloader": "bootloader", "firmware.secureBoot": "secure-boot",
                 "bus": "bus", "network": "network"}
VIRTIO_DRIVERS = ("viostor", "vioscsi", "netkvm", "virtio_blk", "virtio_scsi", "virtio_net")


@dataclass
class GuestReport:
    filename: str
    format: str
    virtual_size: int
    access: Access
    scheme: str = "none"
    sector_size: int = 512
    protective_mbr: bool = False
    hybrid_mbr: bool = False
    table_notes: list[str] = field(default_factory=list)
    volumes: list[VolumeFacts] = field(default_factory=list)
    firmware: FirmwareFacts = field(default_factory=FirmwareFacts)
    os: OsFacts = field(default_factory=OsFacts)
    drivers: list[DriverFacts] = field(default_factory=list)
    agents: dict[str, bool] = field(default_factory=dict)  # "cloud-init", "qemu-guest-agent"
    warnings: list[str] = field(default_factory=list)
    advice: list[AdviceItem] = field(default_factory=list)
    bytes_read: int = 0
    reads: int = 0
    seconds: float = 0.0

    def driver(self, name: str) -> DriverFacts | None:
        return next((d for d in self.drivers if d.name == name), None)

    def advised(self, name: str) -> str | bool | None:
        item = next((a for a in self.advice if a.field == name), None)
        return None if item is None else item.value

    def labels(self) -> dict[str, str]:
        """The verdict as OCI labels/annotations (``build`` records them in the image; see the README)."""
        def text(value: str | bool | None) -> str:
            return str(value).lower() if isinstance(value, bool) else str(value or "")

        labels = {
            LABEL_PREFIX + "os": self.os.type or "unknown",
            LABEL_PREFIX + "firmware": self.firmware.verdict,
            LABEL_PREFIX + "verdict": self.verdict_line()[:1024],
        }
        if self.os.pretty_name:
            labels[LABEL_PREFIX + "os-name"] = self.os.pretty_name[:256]
        # What `diskport manifest docker://REF` needs besides the advice, so it reads the config, not the disk.
        for name, value in (("os-id", self.os.distribution), ("os-version", self.os.version),
                            ("os-build", self.os.build), ("installation-type", self.os.installation_type)):
            if value is not None and value != "":
                labels[LABEL_PREFIX + name] = str(value)[:256]
        labels[LABEL_PREFIX + "disk-format"] = self.format
        labels[LABEL_PREFIX + "virtual-size"] = str(self.virtual_size)
        for item in self.advice:
            labels[LABEL_PREFIX + ADVICE_LABELS[item.field]] = text(item.value)
        drivers = sorted(d.name for d in self.drivers if d.state in ("builtin", "module", "installed"))
        labels[LABEL_PREFIX + "virtio-drivers"] = ",".join(n for n in drivers if n in VIRTIO_DRIVERS)
        return labels

    def verdict_line(self) -> str:
        """One line for ``import --inspect``: the OS, then the platform fields that matter."""
        os_name = self.os.pretty_name or self.os.type
        parts = [f"{a.field}: {str(a.value).lower() if isinstance(a.value, bool) else a.value}"
                 for a in self.advice]
        line = f"{os_name}; " + ", ".join(parts)
        if self.warnings:
            line += f" ({len(self.warnings)} warning{'s' if len(self.warnings) > 1 else ''}: {self.warnings[0]})"
        return line

    def to_json(self) -> dict[str, Any]:
        return {
            "filename": self.filename, "format": self.format, "virtual-size": self.virtual_size,
            "access": str(self.access),
            "partition-table": {"scheme": self.scheme, "sector-size": self.sector_size,
                                "protective-mbr": self.protective_mbr, "hybrid-mbr": self.hybrid_mbr,
                                "notes": list(self.table_notes)},
            "partitions": [v.to_json() for v in self.volumes],
            "firmware": self.firmware.to_json(),
            "os": self.os.to_json(),
            "drivers": [d.to_json() for d in self.drivers],
            "agents": dict(self.agents),
            "warnings": list(self.warnings),
            "advice": {a.field: a.value for a in self.advice},
            "rules": [a.to_json() for a in self.advice],
            "read": {"bytes": self.bytes_read, "requests": self.reads, "seconds": round(self.seconds, 3)},
        }
