"""VMDK descriptor text (spec "The Descriptor File"): its ``key=value`` fields, extent lines and the identity
(CID, parentCID) that refuses delta disks; also the embedded descriptor of a sparse extent.

Descriptors are parsed before any :class:`~diskport.formats.base.DiskImage` exists (and again from a stream's
head), so errors here name the file through :func:`file_corrupt`, the reader's one error function outside
an image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from diskport.errors import CorruptImage, UnsafeImage
from diskport.formats.vmdk.spec import (
    FMT,
    MAX_DESCRIPTOR_BYTES,
    NO_PARENT_CID,
    SECTOR,
    SparseHeader,
)
from diskport.sources.base import Source


def file_corrupt(source: Source, message: str, offset: int | None = None, hint: str | None = None) -> CorruptImage:
    """The error for bad structure in a file that is not (yet) a :class:`DiskImage`, naming that file.

    The image's own checks use :meth:`DiskImage.corrupt`. This one is for the two places where that would name
    the wrong file or none: the descriptor and sparse headers, parsed before the image exists (and parsed the same
    way from a stream's head), and the extent readers, whose file is an extent beside the descriptor, not the image.
    """
    return CorruptImage(message, path=source.name, fmt=FMT, offset=offset, hint=hint)


@dataclass(frozen=True)
class ExtentLine:
    """One line of the descriptor's "Extent Descriptions" section."""

    access: str
    sectors: int
    kind: str
    filename: str | None
    offset_sectors: int | None
    line_number: int


@dataclass
class Descriptor:
    """The parsed descriptor: ``key=value`` fields (keys lowercased, first occurrence wins) and extent lines."""

    fields: dict[str, str] = field(default_factory=dict)
    extents: list[ExtentLine] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        return self.fields.get(key.lower())


_EXTENT_ACCESS = ("RW", "RDONLY", "NOACCESS")
_EXTENT_LINE = re.compile(
    r'(RW|RDONLY|NOACCESS)\s+(\d{1,20})\s+([A-Za-z]{1,20})(?:\s+"([^"\r\n]*)"(?:\s+(\d{1,20}))?)?')
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,127}")
_CID = re.compile(r"[0-9A-Fa-f]{1,8}")


def decode_descriptor_text(raw: bytes) -> str:
    """Descriptor bytes as text: up to the first NUL (embedded descriptors are zero padded), UTF-8 or else
    Latin-1 (older descriptors use the host's code page; file names then fail to open rather than decode)."""
    raw = raw.split(b"\0", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_descriptor(raw: bytes, source: Source, *, with_extents: bool = True) -> Descriptor:
    """Parse descriptor text (spec "The Descriptor File"). Lines that are neither comments, extent lines nor
    ``key=value`` are ignored, as VMware and qemu do; a malformed extent line is an error."""
    desc = Descriptor()
    for number, line in enumerate(decode_descriptor_text(raw).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split(None, 1)[0]
        if first in _EXTENT_ACCESS:
            if not with_extents:
                continue
            m = _EXTENT_LINE.fullmatch(line)
            if m is None:
                raise file_corrupt(source, f"descriptor line {number} is not a valid extent line: {line[:120]!r}")
            access, sectors, kind, filename, offset = m.groups()
            desc.extents.append(ExtentLine(access, int(sectors), kind, filename,
                                           None if offset is None else int(offset), number))
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not _KEY.fullmatch(key):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        desc.fields.setdefault(key.lower(), value)
    return desc


def _parse_cid(desc: Descriptor, key: str, source: Source) -> int | None:
    text = desc.get(key)
    if text is None:
        return None
    if not _CID.fullmatch(text):
        raise file_corrupt(source, f"descriptor {key} {text[:40]!r} is not a 32-bit hexadecimal number")
    return int(text, 16)


def read_identity(desc: Descriptor, source: Source) -> tuple[int | None, int | None]:
    """CID and parentCID of a descriptor; a delta disk (one with a parent) is refused with the parent named."""
    cid = _parse_cid(desc, "CID", source)
    parent_cid = _parse_cid(desc, "parentCID", source)
    parent = desc.get("parentFileNameHint")
    if parent or (parent_cid is not None and parent_cid != NO_PARENT_CID):
        named = f"'{parent}'" if parent else f"with CID {parent_cid:08x} (no parentFileNameHint)"
        raise UnsafeImage(f"is a delta disk of the parent disk {named}; diskport does not follow external "
                          "references", path=source.name, fmt=FMT,
                          hint="consolidate the snapshot chain into one disk (VMware, or qemu-img convert) first")
    return cid, parent_cid


def read_embedded_descriptor(source: Source, header: SparseHeader) -> bytes:
    if header.descriptor_offset == 0 or header.descriptor_size == 0:
        return b""
    if header.descriptor_size * SECTOR > MAX_DESCRIPTOR_BYTES:
        raise file_corrupt(source, f"embedded descriptor of {header.descriptor_size} sectors exceeds the "
                       f"{MAX_DESCRIPTOR_BYTES // 1024} KiB limit", 36)
    return source.read_exact(header.descriptor_offset * SECTOR, header.descriptor_size * SECTOR,
                             "embedded descriptor", FMT)
