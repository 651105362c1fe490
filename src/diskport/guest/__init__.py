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
from diskport.guest.linux import is_linux_root, linux_facts
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
                boot_part = next(((p, b) for p, b in opened if p is not part and _is_boot_volume(b)), None)
                boot = boot_part[1] if boot_part else None
                report.os, report.drivers, report.agents = linux_facts(root, boot, part.number, report.warnings)
                report.os.root_subvolume = subvolume
                report.os.boot_partition = boot_part[0].number if boot_part else None
                return
        except DiskportError as e:
            report.warnings.append(f"partition {part.number}: {e}")


#: Subvolumes looked into for a Linux root, when the default one is not it.
MAX_SUBVOLUME_PROBES = 32


def _linux_root(fs: Filesystem[Any]) -> tuple[Filesystem[Any] | None, str | None]:
    """The filesystem (for btrfs: the subvolume) holding a Linux root, and the subvolume's path."""
    if not isinstance(fs, BtrfsFilesystem):
        return (fs, None) if is_linux_root(fs) else (None, None)
    subvolumes = fs.subvolumes()
    paths = {s.id: s.path for s in subvolumes}
    if is_linux_root(fs):
        return fs, paths.get(fs.tree) if fs.tree != FS_TREE else None
    # Fedora's root, Ubuntu's and openSUSE's @ first; snapshots last
    ranked = sorted(subvolumes, key=lambda s: (".snapshots" in s.path or "snapshot" in s.path,
                                               s.path not in ("root", "@", "@/root", "@rootfs"), s.id))
    for sub in ranked[:MAX_SUBVOLUME_PROBES]:
        candidate = fs.at(sub.id)
        if is_linux_root(candidate):
            return candidate, sub.path
    return None, None


def _is_boot_volume(fs: Filesystem[Any]) -> bool:
    """A separate /boot: kernels at its top, beside a bootloader folder."""
    return any(n.startswith("vmlinuz-") for n in fs.listdir("/"))


__all__ = ["GuestReport", "inspect_guest", "inspect_image_guest"]
