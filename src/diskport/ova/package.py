"""An OVA package (a tar of an OVF descriptor, a manifest and disk files) turned into a :class:`Source` per disk.

The tar is walked with :mod:`diskport.oci.tarscan`, the scanner the registry layers use. Two ways, by what the
OVA's source allows:

* **random access** (a local file, HTTP with ranges, an uncompressed OVA): every header is read first (members
  in any order), and a disk member is a slice of the OVA read in place, so a qcow2 or sparse VMDK member needs
  no scratch. A member with a manifest digest is read through
  :class:`~diskport.sources.checksum.ChecksumSource`: a streamOptimized, gzip-compressed or chunked disk is read
  front to back anyway and is hashed as it passes; any other member is read through
  :class:`~diskport.ova.members.InPlaceDigest`, hashed by the conversion's own reads as far as they run in order
  (a raw member: all of it, each byte read once), the rest read a second time before the destination is
  committed (a sparse format's skipped clusters; the summary says how many bytes).
* **streaming** (HTTP without ranges, an OVA inside gzip): members are met in tar order, the descriptor first
  as DSP0243 requires. A disk member is handed over as a forward-only source at its first byte (a streamOptimized
  VMDK then converts straight from the stream; other formats are spooled by the opener, as for any stream) and
  hashed as it passes, with the manifest's algorithm when the manifest came first (VMware's order) and with
  SHA-1 and SHA-256 both when it has not been seen yet (VirtualBox writes it last); the check before commit then
  reads on to the manifest.

Member names must be relative and inside the package; links are refused (an OVA holds files, and a link named
by a reference would read something else). A digest mismatch fails before the destination is committed; members
read that the manifest does not list, and entries naming no member, are reported, not fatal. A ``.cert`` is
reported as present: its signature is not checked (yet).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diskport.errors import CorruptImage, SourceError, UnsafeImage, UnsupportedImage
from diskport.oci.tarscan import BLOCK, RandomTarReader, iter_tar
from diskport.ova import is_ovf_descriptor
from diskport.ova.descriptor import (
    FMT,
    MAX_DESCRIPTOR,
    Descriptor,
    DiskDef,
    VirtualSystem,
    to_facts,
)
from diskport.sources.base import Source
from diskport.sources.stream import DecompressingStream

MAX_MEMBERS = 10_000
#: The size of a chunked file in a stream whose descriptor gives none, until its last chunk has passed.
UNKNOWN_SIZE = 1 << 62
_REGULAR = (b"0", b"\0", b"7")
_LINKS = (b"1", b"2")
_SIGNATURE = "present, its signature is not verified (diskport does not check OVA certificates yet)"


def member_name(name: str, where: str) -> str:
    """A tar member's name as the descriptor refers to it; absolute names and '..' are refused."""
    clean = name
    while clean.startswith("./"):
        clean = clean[2:]
    clean = clean.rstrip("/")
    if clean.startswith("/") or any(part == ".." for part in clean.split("/")) or "\\" in clean:
        raise UnsafeImage(f"the member '{name}' points outside the package (absolute or '..')", path=where,
                          fmt="ova")
    return clean


def tar_first_name(head: bytes) -> str | None:
    """The first member's name when ``head`` starts with a valid ustar/GNU/PAX tar header (PAX and GNU long
    names followed as far as ``head`` goes)."""
    if len(head) < BLOCK or head[257:262] != b"ustar":
        return None
    reader = _BytesReader(head)
    try:
        for entry in iter_tar(reader):
            return entry.name
    except (CorruptImage, UnsafeImage):
        return None
    return None


class _BytesReader:
    """A tar reader over bytes already in memory (a stream's head, for the probe)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.name = "head"
        self.position = 0

    def read(self, n: int) -> bytes:
        out = self.data[self.position: self.position + n]
        self.position += len(out)
        return out

    def skip_to(self, position: int) -> None:
        if position > len(self.data):
            raise CorruptImage("past the head", fmt="tar")
        self.position = position


def is_ova_head(head: bytes) -> bool:
    name = tar_first_name(head)
    return name is not None and name.lower().endswith(".ovf")


def refuse_late_descriptor(head: bytes, where: str) -> None:
    """A stream that starts as a tar of an appliance's other files: its descriptor is not first, as DSP0243
    wants, and a stream cannot go back to the disks once the descriptor has named them."""
    name = tar_first_name(head)
    if name is not None and name.lower().endswith((".mf", ".cert", ".vmdk", ".vmdk.000000000")):
        raise UnsupportedImage(f"is a tar that starts with '{name}', an OVA whose .ovf descriptor is not the first "
                               "member; read in order, its disks cannot be found", path=where, fmt="ova",
                               hint="read it from a file or a server with range requests, where any order is read")


def has_ovf_member(source: Source) -> bool:
    """Whether a random-access tar holds an ``.ovf`` member anywhere (DSP0243 wants it first; tolerated)."""
    try:
        for n, entry in enumerate(iter_tar(RandomTarReader(source))):
            if entry.name.lower().endswith(".ovf") and entry.kind in _REGULAR:
                return True
            if n >= MAX_MEMBERS:
                return False
    except (CorruptImage, UnsafeImage):
        return False
    return False


@dataclass
class DiskSource:
    """One disk of the package, ready for the opener: its bytes, the checks to run before commit, and what to
    say about how it was read."""

    disk: DiskDef
    index: int
    source: Source
    checks: list[Callable[[], None]] = field(default_factory=list)
    note: str = ""


class OvaPackage:
    """The descriptor, manifest and members of one OVA; :meth:`disk_source` gives a disk's bytes."""

    def __init__(self, source: Source, descriptor: Descriptor, ovf_name: str, streamed: bool) -> None:
        self.source = source
        self.name = source.name
        self.descriptor = descriptor
        self.ovf_name = ovf_name
        self.streamed = streamed
        self.manifest: dict[str, tuple[str, str]] | None = None
        self.manifest_name: str | None = None
        self.cert: str | None = None
        #: Member name -> {algorithm: hex} of what was hashed as it was read.
        self.digests: dict[str, dict[str, str]] = {}
        self.verified: list[str] = []
        self.unlisted: list[str] = []
        self.unverifiable: list[str] = []
        #: Member -> bytes read a second time for its digest (what the conversion of a member read in place
        #: skipped: a sparse format's unallocated clusters, its metadata read out of order).
        self.reread: dict[str, int] = {}

    # -- the choice ---------------------------------------------------------------------------------------
    def system(self, vm: str | None) -> VirtualSystem:
        return self.descriptor.system(vm, self.name)

    def disks(self, vm: str | None) -> list[DiskDef]:
        disks = self.descriptor.disks_of(self.system(vm))
        if not disks:
            raise UnsupportedImage("the appliance describes no disk", path=self.name, fmt="ova")
        return disks

    def facts(self, vm: str | None) -> dict[str, Any]:
        vs = self.system(vm)
        facts = to_facts(self.descriptor, vs, self.disks(vm))
        facts["access"] = "streamed in tar order" if self.streamed else "random access, members read in place"
        facts["manifest"] = self.manifest_facts()
        return facts

    def manifest_facts(self) -> dict[str, Any]:
        listed = self.manifest or {}
        return {
            "file": self.manifest_name,
            "algorithms": sorted({algo for algo, _ in listed.values()}),
            "entries": len(listed),
            "verified": list(self.verified),
            "not-listed": list(self.unlisted),
            "not-verifiable": list(self.unverifiable),
            "certificate": f"{self.cert}: {_SIGNATURE}" if self.cert else None,
        }

    def files_of(self, disk: DiskDef) -> str:
        if disk.file is None:
            raise UnsupportedImage(f"disk '{disk.id}' has no file (an empty disk to be created); there is nothing "
                                   "to convert", path=self.name, fmt="ova")
        return disk.file.href

    def disk_source(self, disk: DiskDef, index: int) -> DiskSource:
        raise NotImplementedError

    def check_digest(self, member: str, computed: dict[str, str]) -> None:
        """Compare what was hashed with the manifest (which must be known by now)."""
        listed = (self.manifest or {}).get(member)
        if self.manifest is None:
            return
        if listed is None:
            if member not in self.unlisted:
                self.unlisted.append(member)
            return
        algo, expected = listed
        actual = computed.get(algo)
        if actual is None:
            self.unverifiable.append(member)
            return
        if not hmac.compare_digest(actual, expected):
            raise SourceError(f"{algo} of member '{member}' is {actual}, the manifest {self.manifest_name} says "
                              f"{expected}", path=self.name, fmt="ova",
                              hint="the package is damaged or was altered; nothing was written")
        if member not in self.verified:
            self.verified.append(member)

    def summary(self) -> str:
        if self.manifest is None:
            text = "no manifest: the members are not verified"
        else:
            text = f"manifest {self.manifest_name}: {len(self.verified)} member(s) verified"
            if self.unlisted:
                text += f", not listed: {', '.join(self.unlisted)}"
            if self.unverifiable:
                text += f", digest not computed: {', '.join(self.unverifiable)}"
            if self.reread:
                text += ", read again for the digest: " + ", ".join(f"{name} {n} bytes"
                                                                    for name, n in self.reread.items())
        if self.cert:
            text += f"; certificate {self.cert} {_SIGNATURE}"
        return text

    def close(self) -> None:
        self.source.close()


def _all_digests(data: bytes) -> dict[str, str]:
    return {algo: hashlib.new(algo, data).hexdigest() for algo in ("sha1", "sha256", "sha512")}


def _chunk_names(href: str, present: Callable[[str], bool]) -> list[str]:
    names: list[str] = []
    while present(name := f"{href}.{len(names):09d}"):
        names.append(name)
    return names


def read_descriptor(stream: DecompressingStream, head: bytes, where: str) -> bytes:
    """The whole OVF descriptor from a stream whose first bytes are ``head`` (a server without ranges); the
    stream is closed, the descriptor's files are opened beside it."""
    data = bytearray(head)
    buf = bytearray(1 << 16)
    try:
        while len(data) <= MAX_DESCRIPTOR:
            n = stream.readinto(memoryview(buf))
            if not n:
                break
            data += buf[:n]
    finally:
        stream.close()
    if len(data) > MAX_DESCRIPTOR:
        raise UnsafeImage(f"the OVF descriptor is more than the {MAX_DESCRIPTOR} limit", path=where, fmt=FMT)
    return bytes(data)


def open_package(source: Source, stream: DecompressingStream | None = None, head: bytes = b"") -> OvaPackage:
    """The package in ``source``: read in place, or (with ``stream``, its first bytes in ``head``) in order; an
    ``.ovf`` descriptor with its files beside it."""
    from diskport.ova.inplace import FolderOvf, RandomOva  # they build on this module's OvaPackage
    from diskport.ova.streamed import StreamedOva

    if stream is not None and stream.kind is None and is_ovf_descriptor(head):
        return FolderOvf(source, read_descriptor(stream, head, source.name))
    if stream is not None:
        return StreamedOva(source, stream, head)
    if is_ovf_descriptor(source.pread(0, 4096)):
        return FolderOvf(source)
    return RandomOva(source)


__all__ = ["FMT", "DiskSource", "OvaPackage", "is_ova_head", "open_package"]  # readers: ova/inplace.py, ova/streamed.py
