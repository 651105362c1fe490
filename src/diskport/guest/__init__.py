"""Guest inspection: what is inside a disk image and how it must boot, read without booting it.

Layers, each over the one below: :mod:`~diskport.guest.view` (guest bytes of any DiskImage, through a small
bounded cache), :mod:`~diskport.guest.volumes` (partition tables), :mod:`~diskport.guest.filesystems`
(superblock identification and read-only readers), :mod:`~diskport.guest.windows` (registry hives), then the
facts drawn from them and the advice drawn from the facts alone.
"""

from __future__ import annotations

import os
import time
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
from diskport.guest.view import GuestView
from diskport.guest.volumes import Partition, read_volumes
from diskport.guest.windows.facts import is_windows_volume, windows_facts
from diskport.sources import open_source
from diskport.sources.base import Source

if TYPE_CHECKING:
    from diskport.oci.auth import Credentials
    from diskport.oci.registry import RegistryOptions
    from diskport.sources.http import HttpOptions

#: Volumes looked into at most (a disk with more partitions is reported, the rest not opened).
MAX_VOLUMES = 128


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
        found = f"disk/{pulled.disk_name} in {pulled.access}; "
    elif text is not None and "://" in text:
        source = open_source(text, http)
    try:
        with open_image(source or location, fmt, scratch_dir=scratch_dir, random_access=True) as image:
            report = inspect_image_guest(image)
    finally:
        if source is not None:
            source.close()
    report.access = found + report.access
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
    opened: list[tuple[Partition, Filesystem[Any]]] = []
    for part in parts[:MAX_VOLUMES]:
        facts = VolumeFacts(number=part.number, start=part.start, size=part.size, type=part.type or None,
                            type_name=part.type_name, name=part.name, uuid=part.uuid, active=part.active,
                            logical=part.logical)
        report.volumes.append(facts)
        try:
            info = identify(part.view)
        except DiskportError as e:
            facts.error = str(e)
            continue
        if info is None:
            continue
        facts.filesystem, facts.version, facts.label, facts.fs_uuid = info.type, info.version, info.label, info.uuid
        if info.type == "BitLocker":
            report.warnings.append(f"partition {part.number} is BitLocker-encrypted: suspend or turn off "
                                   "BitLocker before uploading, or the guest cannot be inspected and may ask "
                                   "for its recovery key")
        try:
            fs = open_filesystem(part.view, info)
        except DiskportError as e:
            facts.error = str(e)
            continue
        if fs is not None:
            facts.readable = True
            opened.append((part, fs))
    if len(parts) > MAX_VOLUMES:
        report.warnings.append(f"{len(parts)} partitions: only the first {MAX_VOLUMES} were looked into")

    report.firmware = firmware_facts(table, view, [(p, fs) for p, fs in opened if fs.type == "vfat"])
    _find_os(report, opened)
    report.advice = advise(report)
    report.bytes_read, report.reads = view.stats.bytes_read, view.stats.reads
    report.seconds = time.monotonic() - began
    return report


def _find_os(report: GuestReport, opened: list[tuple[Partition, Filesystem[Any]]]) -> None:
    for part, fs in opened:
        try:
            if fs.type == "ntfs" and is_windows_volume(fs):
                report.os, report.drivers = windows_facts(fs, part.number, report.warnings)
                return
            if fs.type == "ntfs":
                continue
            root, subvolume = _linux_root(fs)
            if root is not None:
                boot_part = _boot_volume(root, part, opened)
                boot = boot_part[1] if boot_part else None
                report.os, report.drivers, report.agents = linux_facts(root, boot, part.number, report.warnings)
                report.os.root_subvolume = subvolume
                report.os.boot_partition = boot_part[0].number if boot_part else None
                _check_root_names(report, part, fs)
                return
        except DiskportError as e:
            report.warnings.append(f"partition {part.number}: {e}")


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


def _names(part: Partition, fs: Filesystem[Any]) -> set[str]:
    """How fstab or a kernel command line may name this volume."""
    names = set()
    if fs.info.uuid:
        names.add(f"UUID={fs.info.uuid.lower()}")
    if fs.info.label:
        names.add(f"LABEL={fs.info.label}")
    if part.uuid:
        names.add(f"PARTUUID={part.uuid.lower()}")
    if part.name:
        names.add(f"PARTLABEL={part.name}")
    return names


def _normal(name: str) -> str:
    key, sep, value = name.partition("=")
    value = value.strip("\"'")
    return f"{key}={value.lower()}" if sep and key in ("UUID", "PARTUUID") else f"{key}={value}" if sep else name


def _boot_volume(root: Filesystem[Any], root_part: Partition, opened: list[tuple[Partition, Filesystem[Any]]]
                 ) -> tuple[Partition, Filesystem[Any]] | None:
    """The separate /boot: the volume fstab's /boot line names, else one with kernels at its top."""
    source = fstab_mounts(root).get("/boot")
    if source is not None:
        want = _normal(source)
        for p, b in opened:
            if p is not root_part and want in _names(p, b):
                return p, b
    return next(((p, b) for p, b in opened if p is not root_part and _is_boot_volume(b)), None)


def _check_root_names(report: GuestReport, part: Partition, fs: Filesystem[Any]) -> None:
    """fstab's / and the command line's root= should name the volume the root was found on: a UUID that
    changed (a cloned or re-made filesystem) leaves the guest at an emergency shell."""
    names = _names(part, fs)
    for what, source in (("/etc/fstab", report.os.root_device), ("the kernel command line", report.os.kernel_root)):
        if source and "=" in source and source.split("=", 1)[0] in ("UUID", "LABEL", "PARTUUID", "PARTLABEL") \
                and _normal(source) not in names:
            report.warnings.append(f"{what} names the root {source}, but the root was found on partition "
                                   f"{part.number} ({', '.join(sorted(names)) or 'no UUID or label'})")


def _is_boot_volume(fs: Filesystem[Any]) -> bool:
    """A separate /boot: kernels at its top, beside a bootloader folder."""
    return any(n.startswith("vmlinuz-") for n in fs.listdir("/"))


__all__ = ["GuestReport", "inspect_guest", "inspect_image_guest"]
