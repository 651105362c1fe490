"""Filesystems found on guest volumes: identified by their superblocks, and read where a reader exists.

One table, :data:`FILESYSTEMS`: each entry names a type, how to recognise it (``identify(volume) -> FsInfo |
None``, reading a few KiB at most) and, for the readable ones, how to open it. Adding a filesystem is one module
plus one line here. :func:`identify` tries them in table order (more specific signatures first) and
:func:`open_filesystem` opens what it found.
"""

from __future__ import annotations

from typing import Any

from diskport.guest.filesystems import ntfs
from diskport.guest.filesystems.base import Filesystem, FilesystemSpec, FsInfo, Stat
from diskport.guest.view import Readable

#: Every known type, most specific signature first (an encrypted or RAID member before the filesystems whose
#: signatures could show through it). Each module offers ``SPEC``.
FILESYSTEMS: list[FilesystemSpec] = [
    ntfs.SPEC,
]


def identify(volume: Readable) -> FsInfo | None:
    """What the volume holds, by its superblock, or None when no known signature is there."""
    for spec in FILESYSTEMS:
        info = spec.identify(volume)
        if info is not None:
            return info
    return None


def open_filesystem(volume: Readable, info: FsInfo) -> Filesystem[Any] | None:
    """A reader for an identified volume, or None when diskport reads no files of that type."""
    for spec in FILESYSTEMS:
        if spec.name == info.type and spec.open is not None:
            return spec.open(volume, info)
    return None


__all__ = ["FILESYSTEMS", "Filesystem", "FilesystemSpec", "FsInfo", "Stat", "identify", "open_filesystem"]
