"""Guest inspection: what is inside a disk image and how it must boot, read without booting it.

Layers, each over the one below: :mod:`~diskport.guest.view` (guest bytes of any DiskImage, through a small
bounded cache), :mod:`~diskport.guest.volumes` (partition tables), :mod:`~diskport.guest.filesystems`
(superblock identification and read-only readers), :mod:`~diskport.guest.windows` (registry hives), then the
facts drawn from them and the advice drawn from the facts alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from diskport.errors import DiskportError
from diskport.formats import open_image
from diskport.formats.base import DiskImage
from diskport.guest.advice import advise
from diskport.guest.facts import GuestReport, VolumeFacts
from diskport.guest.filesystems import Filesystem, identify, open_filesystem
from diskport.guest.filesystems.btrfs import FS_TREE, BtrfsFilesystem
from diskport.guest.firmware import firmware_facts
from diskport.guest.linux import fstab_mounts, is_linux_root, linux_facts
from diskport.guest.view import GuestView, Readable
from diskport.guest.volumes import Partition, read_volumes
from diskport.guest.volumes.lvm import PhysicalVolume, assemble, find_pv, open_lv
from diskport.guest.windows.facts import is_windows_volume, windows_facts
from diskport.sources import open_source
from diskport.sources.base import Source

if TYPE_CHECKING:
    from diskport.oci.auth import Credentials
    from diskport.oci.registry import RegistryOptions
    from diskport.sources.http import HttpOptions

#: Volumes looked into at most (a disk with more partitions is reported, the rest not opened).
MAX_VOLUMES = 128
#: Logical volumes looked into at most, over every VG of the disk.
MAX_LVS = 128


def inspect_guest(location: str | os.PathLike[str] | Source | DiskImage, fmt: str | None = None, *,
                  scratch_dir: str | None = None, http: HttpOptions | None = None, platform: str | None = None,
                  registry: RegistryOptions | None = None,
                  credentials: Credentials | Literal["auto"] | None = "auto") -> GuestReport:
    """What is inside the disk and how it must boot, read without booting or converting it.

    ``location`` is a path, an ``http(s)://`` URL (read with range requests), ``docker://REF`` (the disk inside a
    containerDisk image: an uncompressed layer is read in place, a compressed one spooled to ``scratch_dir``),
    an open :class:`Source` or :class:`DiskImage`. ``http``, ``platform``, ``registry`` and ``credentials`` are
    as for :func:`diskport.import_image`.
    """
    if isinstance(location, DiskImage):
        return inspect_image_guest(location)
    text = None if isinstance(location, Source) else os.fspath(location)
    found = ""
    source: Source | None = None
    if text is not None and text.startswith("docker://"):
        from diskport.oci.pull import open_registry_disk  # the registry client only for registry images

        source, pulled = open_registry_disk(text, platform=platform, registry=registry, credentials=credentials,
                                            http=http)
        found = f"disk/{pulled.disk_name} in {pulled.access}"
    elif text is not None and "://" in text:
        source = open_source(text, http)
    try:
        with open_image(source or location, fmt, scratch_dir=scratch_dir, random_access=True) as image:
            report = inspect_image_guest(image)
    finally:
        if source is not None:
            source.close()
    report.access.origin = found
    if text is not None:
        report.filename = text
    return report


def inspect_image_guest(image: DiskImage) -> GuestReport:
    began = time.monotonic()
    if not image.size_known:
        from diskport.errors import UnsupportedImage

        raise UnsupportedImage("the disk's size is learnt only by reading it all; guest inspection needs "
                               "random access", path=image.source.name, fmt=image.format,
                               hint="decompress it first, or inspect the converted disk")
    image.source.prefer_exact_reads()  # metadata here and there: no bulk read-ahead over HTTP
    view = GuestView(image)
    report = GuestReport(filename=image.source.name, format=image.format, virtual_size=image.virtual_size,
                         access=image.access)
    table = read_volumes(view)
    report.scheme, report.sector_size = table.scheme, table.sector_size
    report.protective_mbr, report.hybrid_mbr = table.protective_mbr, table.hybrid_mbr
    report.table_notes = list(table.notes)
    parts = [p for p in table.partitions if not p.extended]
    if table.scheme == "none":
        parts = [Partition(number=0, start=0, size=view.size, type="", type_name=None, view=view)]
    opened: list[_Opened] = []
    pvs: list[PhysicalVolume] = []
    for part in parts[:MAX_VOLUMES]:
        facts = VolumeFacts(number=part.number, start=part.start, size=part.size, type=part.type or None,
                            type_name=part.type_name, name=part.name, uuid=part.uuid, active=part.active,
                            logical=part.logical)
        report.volumes.append(facts)
        fs = _open_volume(report, facts, part.view, f"partition {part.number}")
        if fs is not None:
            opened.append(_Opened(part, None, fs))
        if facts.filesystem == "LVM2_member":
            try:
                pv = find_pv(part.view, f"partition {part.number}", report.table_notes)
            except DiskportError as e:
                facts.error = str(e)
                continue
            if pv is not None:
                pvs.append(pv)
    if len(parts) > MAX_VOLUMES:
        report.warnings.append(f"{len(parts)} partitions: only the first {MAX_VOLUMES} were looked into")
    _open_lvs(report, pvs, opened)

    report.firmware = firmware_facts(table, view, [(o.part, o.fs) for o in opened
                                                   if o.part is not None and o.fs.type == "vfat"])
    _find_os(report, opened)
    report.advice = advise(report)
    report.bytes_read, report.reads = view.stats.bytes_read, view.stats.reads
    report.seconds = time.monotonic() - began
    return report


@dataclass(frozen=True)
class _Opened:
    """A readable filesystem of the disk: on a partition, or on the logical volume ``lv`` ("vg/lv")."""

    part: Partition | None
    lv: str | None
    fs: Filesystem[Any]

    @property
    def where(self) -> str:
        return f"logical volume {self.lv}" if self.part is None else f"partition {self.part.number}"


def _open_volume(report: GuestReport, facts: VolumeFacts, volume: Readable, where: str) -> Filesystem[Any] | None:
    """Identify what ``volume`` holds into ``facts`` and open its filesystem when diskport reads that type."""
    try:
        info = identify(volume)
    except DiskportError as e:
        facts.error = str(e)
        return None
    if info is None:
        return None
    facts.filesystem, facts.version, facts.label, facts.fs_uuid = info.type, info.version, info.label, info.uuid
    if info.type == "BitLocker":
        report.warnings.append(f"{where} is BitLocker-encrypted: suspend or turn off "
                               "BitLocker before uploading, or the guest cannot be inspected and may ask "
                               "for its recovery key")
    try:
        fs = open_filesystem(volume, info)
    except DiskportError as e:
        facts.error = str(e)
        return None
    if fs is not None:
        facts.readable = True
    return fs


def _open_lvs(report: GuestReport, pvs: list[PhysicalVolume], opened: list[_Opened]) -> None:
    """Each visible LV of the disk's VGs as a volume of the report, its filesystem opened like a partition's."""
    count = 0
    for group in assemble(pvs, report.table_notes):
        for lv in group.lvs:
            if not lv.visible:
                continue
            count += 1
            if count > MAX_LVS:
                report.warnings.append(f"more than {MAX_LVS} logical volumes: the rest were not looked into")
                return
            facts = VolumeFacts(number=None, start=0, size=lv.size, type=lv.kind, type_name="LVM2 logical volume",
                                name=lv.full_name, uuid=lv.uuid, lv=lv.name, vg=group.name, lv_kind=lv.kind,
                                lv_segments=len(lv.segments), lv_origin=lv.origin, lv_pool=lv.pool)
            report.volumes.append(facts)
            if lv.problem:
                facts.error = f"LV {lv.full_name} is not read: {lv.problem}"
                continue
            try:
                volume = open_lv(group, lv)
            except DiskportError as e:
                facts.error = str(e)
                continue
            first = lv.segments[0].stripes[0]
            pv = group.found[first.pv]
            facts.start = pv.volume.offset + group.pe_start[first.pv] + first.first_pe * group.extent_size
            fs = _open_volume(report, facts, volume, f"logical volume {lv.full_name}")
            if fs is not None:
                opened.append(_Opened(None, lv.full_name, fs))


def _find_os(report: GuestReport, opened: list[_Opened]) -> None:
    for item in opened:
        fs, number = item.fs, (item.part.number if item.part is not None else None)
        try:
            if fs.type == "ntfs" and is_windows_volume(fs):
                report.os, report.drivers = windows_facts(fs, number, report.warnings)
                report.os.lv = item.lv
                return
            if fs.type == "ntfs":
                continue
            root, subvolume = _linux_root(fs)
            if root is not None:
                boot = _boot_volume(root, item, opened)
                report.os, report.drivers, report.agents = linux_facts(root, boot.fs if boot else None, number,
                                                                       report.warnings)
                report.os.lv = item.lv
                report.os.root_subvolume = subvolume
                report.os.boot_partition = boot.part.number if boot is not None and boot.part is not None else None
                _check_root_names(report, item)
                return
        except DiskportError as e:
            report.warnings.append(f"{item.where}: {e}")


#: Subvolumes looked into for a Linux root, when the default one is not it.
MAX_SUBVOLUME_PROBES = 32


def _linux_root(fs: Filesystem[Any]) -> tuple[Filesystem[Any] | None, str | None]:
    """The filesystem (for btrfs: the subvolume) holding a Linux root, and the subvolume's path."""
    if not isinstance(fs, BtrfsFilesystem):
        return (fs, None) if is_linux_root(fs) else (None, None)
    if is_linux_root(fs):
        if fs.tree == FS_TREE:
            return fs, None
        try:
            return fs, next((s.path for s in fs.subvolumes() if s.id == fs.tree), None)
        except DiskportError:
            return fs, None
    subvolumes = fs.subvolumes()
    # Fedora's root, Ubuntu's and openSUSE's @ first; snapshots last
    ranked = sorted(subvolumes, key=lambda s: (".snapshots" in s.path or "snapshot" in s.path,
                                               s.path not in ("root", "@", "@/root", "@rootfs"), s.id))
    for sub in ranked[:MAX_SUBVOLUME_PROBES]:
        candidate = fs.at(sub.id)
        if is_linux_root(candidate):
            return candidate, sub.path
    return None, None


def _names(item: _Opened) -> set[str]:
    """How fstab or a kernel command line may name this volume."""
    names = set()
    info, part = item.fs.info, item.part
    if info.uuid:
        names.add(f"UUID={info.uuid.lower()}")
    if info.label:
        names.add(f"LABEL={info.label}")
    if part is not None and part.uuid:
        names.add(f"PARTUUID={part.uuid.lower()}")
    if part is not None and part.name:
        names.add(f"PARTLABEL={part.name}")
    if item.lv:
        vg, _, lv = item.lv.partition("/")
        names.update({f"/dev/{vg}/{lv}", f"/dev/mapper/{vg.replace('-', '--')}-{lv.replace('-', '--')}"})
    return names


def _normal(name: str) -> str:
    key, sep, value = name.partition("=")
    value = value.strip("\"'")
    return f"{key}={value.lower()}" if sep and key in ("UUID", "PARTUUID") else f"{key}={value}" if sep else name


def _boot_volume(root: Filesystem[Any], root_item: _Opened, opened: list[_Opened]) -> _Opened | None:
    """The separate /boot: the volume fstab's /boot line names, else one with kernels at its top."""
    source = fstab_mounts(root).get("/boot")
    if source is not None:
        want = _normal(source)
        for item in opened:
            if item is not root_item and want in _names(item):
                return item
    return next((item for item in opened if item is not root_item and _is_boot_volume(item.fs)), None)


def _check_root_names(report: GuestReport, item: _Opened) -> None:
    """fstab's / and the command line's root= should name the volume the root was found on: a UUID that
    changed (a cloned or re-made filesystem) leaves the guest at an emergency shell."""
    names = _names(item)
    for what, source in (("/etc/fstab", report.os.root_device), ("the kernel command line", report.os.kernel_root)):
        if source and "=" in source and source.split("=", 1)[0] in ("UUID", "LABEL", "PARTUUID", "PARTLABEL") \
                and _normal(source) not in names:
            report.warnings.append(f"{what} names the root {source}, but the root was found on {item.where} "
                                   f"({', '.join(sorted(names)) or 'no UUID or label'})")


def _is_boot_volume(fs: Filesystem[Any]) -> bool:
    """A separate /boot: kernels at its top, beside a bootloader folder."""
    return any(n.startswith("vmlinuz-") for n in fs.listdir("/"))


__all__ = ["GuestReport", "inspect_guest", "inspect_image_guest"]
