"""Disk formats diskport recognises but does not read, refused by their magic with what to do instead.

Without this, such a file has no structure any reader claims, so it would be converted as raw: its header and
tables would become the guest's first sectors and the disk would be garbage, exit 0. Each format here is named by
the bytes its own tools write (the facts also used by qemu's block drivers, which read most of them):

* Parallels (``.hdd``/``.hds``): ``WithoutFreeSpace`` or ``WithouFreSpacExt`` at offset 0;
* QED: ``QED\\0`` at offset 0;
* ESXi seSparse: the little-endian 64-bit constant-header magic ``0xcafebabe`` at offset 0 (a seSparse extent;
  a descriptor naming ``SESPARSE`` extents is refused by :mod:`diskport.formats.vmdk`);
* VMware COWD (``vmfsSparse``, ESX Server sparse extents): ``COWD`` at offset 0;
* Apple ASIF: ``shdw`` at offset 0;
* Apple DMG/UDIF: the ``koly`` trailer in the last 512 bytes;
* cloop: a ``#!/bin/sh`` script at offset 0 that mounts ``/dev/cloop``;
* Bochs: ``Bochs Virtual HD Image`` at offset 0;
* OVA: a tar whose first member is an ``.ovf`` descriptor, met only as a member of another OVA (an OVA itself is
  read by :mod:`diskport.ova`, which opens its disks; an appliance nested in one is not).

A format named with ``--format`` is read as asked, so a raw disk that happens to begin with one of these strings
can still be converted with ``-f raw``.
"""

from __future__ import annotations

import struct

from diskport.errors import UnsupportedImage
from diskport.sources.base import HeadSource, Source

_QEMU = "convert it with 'qemu-img convert -O qcow2' first"


def _tar_first_member(head: bytes) -> str | None:
    """The name of a tar's first member when ``head`` starts with a valid ustar/GNU header."""
    if len(head) < 512 or head[257:262] != b"ustar":
        return None
    try:
        stored = int(head[148:156].split(b"\0", 1)[0].strip(b" ") or b"-1", 8)
    except ValueError:
        return None
    if stored != sum(head[:148]) + 256 + sum(head[156:512]):
        return None
    return head[:100].split(b"\0", 1)[0].decode("utf-8", "replace")


def identify(head: bytes, source: Source) -> tuple[str, str] | None:
    """``(format name, what to do)`` for a format diskport does not read, or None."""
    if head[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"):
        return "a Parallels disk (.hdd/.hds)", _QEMU
    if head[:4] == b"QED\0":
        return "a QED image", _QEMU
    if len(head) >= 8 and struct.unpack_from("<Q", head, 0)[0] == 0xCAFEBABE:
        return "an ESXi seSparse extent", "convert it on the ESXi host (vmkfstools -i ... -d thin) first"
    if head[:4] == b"COWD":
        return ("a VMware ESX Server sparse extent (COWD, vmfsSparse)",
                "convert it on the ESX host (vmkfstools -i) first")
    if head[:4] == b"shdw":
        return "an Apple ASIF disk image", "convert it to raw on a Mac (diskutil image convert) first"
    if head[:22] == b"Bochs Virtual HD Image":
        return "a Bochs disk image", _QEMU
    if head[:9] == b"#!/bin/sh" and b"cloop" in head[:512]:
        return "a cloop compressed image", _QEMU
    member = _tar_first_member(head)
    if member is not None and member.lower().endswith(".ovf"):
        return ("an OVA appliance inside an OVA", "unpack the outer OVA (tar -xf) and convert the inner one")
    # The trailer is at the end: a stream's end is not known, so a DMG inside gzip is not recognised.
    if (not isinstance(source, HeadSource) and source.size >= 1024
            and source.pread(source.size - 512, 4) == b"koly"):
        return "an Apple DMG/UDIF disk image", "convert it on a Mac (hdiutil convert -format UDTO) first"
    return None


def refuse_foreign(head: bytes, source: Source) -> None:
    """Raise :class:`UnsupportedImage` if ``head`` (and the file's end) show a format diskport does not read."""
    found = identify(head, source)
    if found is not None:
        what, todo = found
        raise UnsupportedImage(f"is {what}, a format diskport does not read", path=source.name, hint=todo)
