"""Format readers, and the choice between them.

Every format module offers ``probe(head, source) -> confidence`` (0 = not this format, 100 = its magic and
version) and an opener. :func:`open_detected` runs all probes on the content (never the file name). When more
than one format claims the bytes, whatever their confidence, each is opened and only a format whose structure
validates is chosen; two that both validate are refused as ambiguous rather than guessed. Confidence only orders
the claims: a polyglot (an ISO 9660 image whose system area, its first 32 KiB, free for any use, holds a qcow2
header) is two disks, and taking the higher score would silently lose one. Raw claims everything and is chosen
only when nothing else does. Formats diskport recognises but does not read (:mod:`diskport.formats.foreign`) are
refused before any probe.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from diskport.errors import DiskportError, UnsupportedImage, UsageError, located
from diskport.formats import foreign, iso, qcow2, raw, vdi, vhd, vhdx, vmdk
from diskport.formats.base import Access, DiskImage, Extent
from diskport.formats.stream import StreamedRawImage
from diskport.names import FORMAT_ALIASES, INPUT_FORMATS, format_names
from diskport.ova import DEFAULT, OvaChoice, is_ovf_descriptor, is_tar
from diskport.sources import Source, open_source
from diskport.sources.base import HeadSource
from diskport.sources.compression import detect_compression
from diskport.sources.spool import spool
from diskport.sources.stream import DecompressingStream

if TYPE_CHECKING:
    from diskport.ova import package

HEAD_SIZE = 64 * 1024


@dataclass(frozen=True)
class FormatSpec:
    name: str
    probe: Callable[[bytes, Source], int]
    open: Callable[[Source], DiskImage]


def _opener(module: ModuleType, name: str) -> Callable[[Source], DiskImage]:
    """``module.name``, looked up when first called: a package face (vmdk, vhdx) offers its cheap ``probe`` at
    once and imports its reader only when an image of its format is opened."""
    return lambda source: getattr(module, name)(source)


_READERS: dict[str, tuple[Callable[[bytes, Source], int], Callable[[Source], DiskImage]]] = {
    "qcow2": (qcow2.probe, _opener(qcow2, "open_qcow2")),
    "vmdk": (vmdk.probe, _opener(vmdk, "open_vmdk")),
    "vpc": (vhd.probe, _opener(vhd, "open_vhd")),
    "vhdx": (vhdx.probe, _opener(vhdx, "open_vhdx")),
    "vdi": (vdi.probe, _opener(vdi, "open_vdi")),
    "iso": (iso.probe, _opener(iso, "open_iso")),
    "raw": (raw.probe, _opener(raw, "open_raw")),
}
# Registered under the names the command line offers without importing this package (diskport.names): a name
# there without a reader here fails at import, a reader here without a name there is never chosen.
FORMATS: dict[str, FormatSpec] = {name: FormatSpec(name, *_READERS[name]) for name in INPUT_FORMATS}
ALIASES = FORMAT_ALIASES


def read_head(source: Source) -> bytes:
    return source.pread(0, min(HEAD_SIZE, source.size))


def probe_scores(source: Source, head: bytes | None = None) -> dict[str, int]:
    head = read_head(source) if head is None else head
    return {name: score for name, spec in FORMATS.items() if (score := spec.probe(head, source)) > 0}


#: Ceiling for a raw disk inside a compressed file, which declares no size of its own.
MAX_STREAM_SIZE = 64 * 1024**4
#: Formats that read straight from a decompressing stream; the others need random access and are spooled.
STREAMABLE = ("raw", "iso")


def declared_size(name: str, head: bytes) -> int | None:
    """The virtual size a format's first bytes declare, where they do (bounds a spool against bombs)."""
    try:
        if name == "qcow2":
            return int(struct.unpack_from(">Q", head, 24)[0])
        if name == "vmdk" and head[:4] == b"KDMV":
            return int(struct.unpack_from("<Q", head, 12)[0]) * 512
        if name == "vdi":
            return int(struct.unpack_from("<Q", head, 0x170)[0])
        if name == "vpc":
            return int(struct.unpack_from(">Q", head, 48)[0])
    except struct.error:
        return None
    return None


def open_stream(source: Source, kind: str | None, fmt: str | None, scratch_dir: str | None,
                size_limit: int | None, random_access: bool = False, ova: OvaChoice | None = DEFAULT) -> DiskImage:
    """Open an image that can only be read in order (inside a compressed file, or a ``sequential`` source):
    straight from the stream when its format allows and ``random_access`` is not asked for, else spooled to
    scratch first."""
    stream = DecompressingStream(source, kind)
    try:
        head_buf = bytearray(HEAD_SIZE)
        head = bytes(head_buf[: stream.readinto(memoryview(head_buf))])
        inner = detect_compression(head)
        if inner:
            raise UnsupportedImage(f"is {kind}-compressed {inner} data; decompress the outer layer first",
                                   path=source.name, fmt=kind)
        view = HeadSource(source.name, head)
        descriptor = kind is None and is_ovf_descriptor(head)  # an .ovf read in order, from a server without ranges
        if not fmt and (descriptor or is_tar(head)):  # only these can be an appliance: import its reader for them
            from diskport.ova import package

            if ova is not None and (descriptor or package.is_ova_head(head)):
                return _open_ova(package.open_package(source, stream, head), ova, scratch_dir, size_limit,
                                 random_access)
            package.refuse_late_descriptor(head, source.name)
        if not fmt:
            foreign.refuse_foreign(head, view)
        name = ALIASES.get(fmt, fmt) if fmt else _choose(probe_scores(view, head), view, probe_only=True)
        limit = size_limit if size_limit is not None else MAX_STREAM_SIZE
        image: DiskImage
        if name in STREAMABLE and not random_access:
            image = StreamedRawImage(stream, head, name, limit=limit, fixed_vhd_footer=vhd.fixed_footer_size)
            image.access = Access("stream", f"{name} is read straight from {stream.label}")
            return image
        if name == "vmdk" and vmdk.is_stream_optimized(head) and not random_access:
            image = vmdk.StreamedVmdkImage(stream, head)
            image.access = Access("stream", f"streamOptimized VMDK is read straight from {stream.label}")
            return image
        declared = declared_size(name, head)
        if declared is not None:
            limit = min(limit, declared + declared // 8 + 256 * 1024 * 1024)
        what = f"its declared virtual size ({declared} bytes)" if declared is not None else "the size limit"
        import tempfile

        spooled = spool(stream, head, scratch_dir or tempfile.gettempdir(), limit, what)
        stream.close()
        try:
            with located(source.name, name):
                image = FORMATS[name].open(spooled)
        except BaseException:
            spooled.close()
            raise
        image.close_with(source.close)
        image.outer = source
        image.compression = [kind] if kind else []
        streamable = name in STREAMABLE or (name == "vmdk" and vmdk.is_stream_optimized(head))
        needs = "random access was asked for" if streamable else f"{name} needs random access"
        image.access = Access("spooled", f"{needs}, so {stream.label} was copied to scratch first")
        return image
    except BaseException:
        stream.close()
        raise


def _choose(scores: dict[str, int], source: Source, probe_only: bool = False) -> str:
    """The one format whose structure validates among those that claim the bytes (raw when none other does)."""
    claims = sorted((name for name in scores if name != "raw"), key=lambda name: -scores[name])
    if not claims:
        return "raw"
    if len(claims) == 1:
        return claims[0]
    if probe_only:  # only the first bytes of a stream: nothing to validate, so no guessing either
        raise UnsupportedImage(f"content matches more than one format ({', '.join(claims)}); refusing to guess",
                               path=source.name, hint="name the format with --format")
    valid = []
    errors: list[DiskportError] = []
    for name in claims:
        try:
            FORMATS[name].open(source)  # validation only; the source stays open for the chosen reader
            valid.append(name)
        except DiskportError as e:
            errors.append(e)
    if len(valid) == 1:
        return valid[0]
    if not valid:
        raise errors[0]
    raise UnsupportedImage(f"content is valid as more than one format ({', '.join(valid)}), two different disks; "
                           "refusing to guess", path=source.name, hint="name the format with --format")


def _open_ova(pkg: package.OvaPackage, choice: OvaChoice, scratch_dir: str | None, size_limit: int | None,
              random_access: bool) -> DiskImage:
    """The chosen disk of an OVA; the image owns the package."""
    try:
        image = open_ova_disk(pkg, choice.disk, choice.vm, scratch_dir=scratch_dir, size_limit=size_limit,
                              random_access=random_access)
    except BaseException:
        pkg.close()
        raise
    image.close_with(pkg.close)
    return image


def open_ova_disk(pkg: package.OvaPackage, index: int, vm: str | None = None, *, scratch_dir: str | None = None,
                  size_limit: int | None = None, random_access: bool = False) -> DiskImage:
    """Disk ``index`` (0: the boot disk) of ``vm`` in an opened OVA, read as the file it is. The image runs the
    package's checks for it (manifest digests) before its destination is committed; it does not close ``pkg``."""
    disks = pkg.disks(vm)
    if not 0 <= index < len(disks):
        raise UsageError(f"the appliance has {len(disks)} disk(s), numbered 0 to {len(disks) - 1}; there is no "
                         f"disk {index}", path=pkg.name)
    found = pkg.disk_source(disks[index], index)
    with located(found.source.name, None):
        image = open_detected(found.source, None, scratch_dir=scratch_dir, size_limit=size_limit,
                              random_access=random_access, ova=None)
    from diskport.ova.streamed import StreamedOva

    if isinstance(pkg, StreamedOva) and pkg.stream.kind:
        image.compression.insert(0, pkg.stream.kind)
    image.appliance = pkg
    image.appliance_vm = vm
    image.checks.extend(found.checks)

    def report() -> None:
        image.access.notes.append(pkg.summary())

    image.checks.append(report)
    image.access.notes.append(f"OVA: {found.note}")
    return image


def open_appliance(source: Source, *, scratch_dir: str | None = None) -> package.OvaPackage:
    """``source`` as an OVA package (for writing several of its disks), or a UsageError when it is not one."""
    from diskport.ova import package

    head = read_head(source)
    compression = detect_compression(head)
    if compression or source.sequential:
        stream = DecompressingStream(source, compression)
        try:
            buf = bytearray(HEAD_SIZE)
            inner = bytes(buf[: stream.readinto(memoryview(buf))])
            if package.is_ova_head(inner) or (compression is None and is_ovf_descriptor(inner)):
                return package.open_package(source, stream, inner)
        except BaseException:
            stream.close()
            raise
        stream.close()
    elif is_ovf_descriptor(head) or (
            is_tar(head) and (package.is_ova_head(head) or package.has_ovf_member(source))):
        return package.open_package(source)
    raise UsageError("is not an OVA appliance; choosing among several disks is for OVAs", path=source.name)


def open_detected(source: Source, fmt: str | None = None, *, scratch_dir: str | None = None,
                  size_limit: int | None = None, random_access: bool = False,
                  ova: OvaChoice | None = DEFAULT) -> DiskImage:
    """Open ``source`` as ``fmt``, or as the format its content shows.

    A compressed file, or a source that can only be read in order, is opened through :func:`open_stream`;
    ``scratch_dir`` is where a random-access format
    inside one is spooled (any format, with ``random_access``), and ``size_limit`` bounds a raw disk inside one.
    """
    head = read_head(source)
    compression = detect_compression(head)
    if compression or source.sequential:
        return open_stream(source, compression, fmt, scratch_dir, size_limit, random_access, ova)
    if fmt is None and ova is not None and (is_ovf_descriptor(head) or is_tar(head)):
        from diskport.ova import package  # only a tar or a descriptor can be an appliance

        if is_ovf_descriptor(head) or package.is_ova_head(head) or package.has_ovf_member(source):
            return _open_ova(package.open_package(source), ova, scratch_dir, size_limit, random_access)
    if fmt is not None:
        name = ALIASES.get(fmt, fmt)
        if name not in FORMATS:
            raise UnsupportedImage(f"unknown format '{fmt}' (known: {', '.join(format_names())})",
                                   path=source.name)
        return FORMATS[name].open(source)
    foreign.refuse_foreign(head, source)
    return FORMATS[_choose(probe_scores(source, head), source)].open(source)


def open_image(location: str | os.PathLike[str] | Source, fmt: str | None = None, *,
               scratch_dir: str | None = None, size_limit: int | None = None,
               random_access: bool = False, ova: OvaChoice = DEFAULT) -> DiskImage:
    """Open a disk image from a path or a :class:`Source`; the caller closes it (it is a context manager).

    An OVA opens as the disk ``ova`` chooses (the boot disk of its only VM by default)."""
    source = location if isinstance(location, Source) else open_source(location)
    try:
        return open_detected(source, fmt, scratch_dir=scratch_dir, size_limit=size_limit,
                             random_access=random_access, ova=ova)
    except BaseException:
        if not isinstance(location, Source):
            source.close()
        raise


__all__ = ["FORMATS", "Access", "DiskImage", "Extent", "FormatSpec", "open_appliance", "open_detected", "open_image",
           "open_ova_disk", "probe_scores"]
