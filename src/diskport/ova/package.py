"""An OVA package (a tar of an OVF descriptor, a manifest and disk files) turned into a :class:`Source` per disk.

The tar is walked with :mod:`diskport.oci.tarscan`, the scanner the registry layers use. Two ways, by what the
OVA's source allows:

* **random access** (a local file, HTTP with ranges, an uncompressed OVA): every header is read first (members
  in any order), and a disk member is a slice of the OVA read in place, so a qcow2 or sparse VMDK member needs
  no scratch. A member with a manifest digest is read through
  :class:`~diskport.sources.checksum.ChecksumSource`: a streamOptimized, gzip-compressed or chunked disk is read
  front to back anyway and is hashed as it passes; any other member is read through :class:`InPlaceDigest`,
  hashed by the conversion's own reads as far as they run in order (a raw member: all of it, each byte read
  once), the rest read a second time before the destination is committed (a sparse format's skipped clusters;
  the summary says how many bytes).
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
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from diskport.errors import CorruptImage, SourceError, UnsafeImage, UnsupportedImage
from diskport.oci.tarscan import BLOCK, RandomTarReader, StreamTarReader, TarEntry, iter_tar
from diskport.ova import is_ovf_descriptor
from diskport.ova.descriptor import (
    FMT,
    MAX_DESCRIPTOR,
    Descriptor,
    DiskDef,
    VirtualSystem,
    parse_descriptor,
    to_facts,
)
from diskport.ova.manifest import MAX_MANIFEST, parse_manifest
from diskport.sources.base import ReadintoSource, SliceSource, Source
from diskport.sources.checksum import ChecksumSource
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


class _Borrowed(SliceSource):
    """A member read in place; the package owns (and closes) the OVA's source."""

    def close(self) -> None:
        pass


class ConcatSource(ReadintoSource):
    """The parts of a chunked OVF file (``disk.vmdk.000000000``, ``.000000001``, ...) as one file."""

    def __init__(self, parts: list[Source], name: str) -> None:
        self.parts = parts
        self.name = name
        self.starts: list[int] = []
        total = 0
        for part in parts:
            self.starts.append(total)
            total += part.size
        self.size = total
        self.sequential = any(p.sequential for p in parts)
        self.sequential_reason = next((p.sequential_reason for p in parts if p.sequential), "")

    def readinto(self, offset: int, buf: memoryview) -> int:
        done = 0
        for part, start in zip(self.parts, self.starts, strict=True):
            if done == len(buf):
                break
            pos = offset + done
            if pos >= start + part.size or pos < start:
                continue
            n = min(len(buf) - done, start + part.size - pos)
            got = part.readinto(pos - start, buf[done: done + n])
            done += got
            if got < n:
                break
        return done

    def close(self) -> None:
        for part in self.parts:
            part.close()


class InPlaceDigest(ReadintoSource):
    """A member read in place (random access), hashed by the very reads that convert it, where they run on in
    order from the member's start; :meth:`finish` reads only what they did not cover.

    For a raw member (and any format the engine reads front to back) that is nothing: every byte is read once.
    For a sparse format (qcow2, monolithicSparse VMDK, VHDX, VDI) the conversion reads metadata out of order and
    skips unallocated clusters, so the digest stops at the first jump and the rest of the member is read a
    second time before commit; the package's summary says how many bytes (``reread``). Unlike
    :class:`~diskport.sources.checksum.ChecksumSource` it never reads ahead to fill a gap (that would read a
    sparse member's clusters twice, out of order) and it keeps the member's random access."""

    def __init__(self, inner: Source, algo: str, expected: str) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.sequential = inner.sequential
        self.sequential_reason = inner.sequential_reason
        self.algo = algo
        self.expected = expected
        self.hash = hashlib.new(algo)
        self.hashed = 0
        self.reread = 0
        self._lock = threading.Lock()

    def readinto(self, offset: int, buf: memoryview) -> int:
        n = self.inner.readinto(offset, buf)
        with self._lock:
            if offset <= self.hashed < offset + n:
                self.hash.update(buf[self.hashed - offset: n])
                self.hashed = offset + n
        return n

    def allocated_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        return self.inner.allocated_extents(offset, length)

    def prefer_exact_reads(self) -> None:
        self.inner.prefer_exact_reads()

    def finish(self) -> str:
        """The digest of the whole member: what the conversion left unread is read now."""
        buf = memoryview(bytearray(1 << 20))
        with self._lock:
            while self.hashed < self.size:
                n = self.inner.readinto(self.hashed, buf[: min(len(buf), self.size - self.hashed)])
                if n == 0:
                    raise CorruptImage(f"the member ends after {self.hashed} bytes", path=self.name, fmt="ova")
                self.hash.update(buf[:n])
                self.hashed += n
                self.reread += n
            return self.hash.hexdigest()

    def close(self) -> None:
        self.inner.close()


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


# -- random access -----------------------------------------------------------------------------------------
class RandomOva(OvaPackage):
    def __init__(self, source: Source) -> None:
        members: dict[str, TarEntry] = {}
        for n, entry in enumerate(iter_tar(RandomTarReader(source))):
            if n >= MAX_MEMBERS:
                raise UnsafeImage(f"the package has more than {MAX_MEMBERS} members", path=source.name, fmt="ova")
            name = member_name(entry.name, source.name)
            if entry.kind in _LINKS:
                raise UnsafeImage(f"the member '{name}' is a link; an OVA holds its files themselves",
                                  path=source.name, fmt="ova")
            if entry.kind not in _REGULAR:
                continue
            if name in members:
                raise CorruptImage(f"the package holds two members named '{name}'", path=source.name, fmt="ova")
            members[name] = entry
        ovfs = [name for name in members if name.lower().endswith(".ovf")]
        if len(ovfs) != 1:
            raise CorruptImage(f"the package holds {len(ovfs)} .ovf descriptors, not one", path=source.name,
                               fmt="ova")
        self.members = members
        ovf = members[ovfs[0]]
        data = self._small(ovf, "OVF descriptor", 4 * 1024 * 1024, source)
        super().__init__(source, parse_descriptor(data, f"{source.name}: {ovfs[0]}"), ovfs[0], streamed=False)
        self.digests[ovfs[0]] = _all_digests(data)
        for name, entry in members.items():
            if name.lower().endswith(".mf"):
                if self.manifest is not None:
                    raise CorruptImage("the package holds two manifests", path=source.name, fmt="ova")
                self.manifest = parse_manifest(self._small(entry, "manifest", MAX_MANIFEST, source),
                                               f"{source.name}: {name}")
                self.manifest_name = name
            elif name.lower().endswith(".cert"):
                self.cert = name
        self.check_digest(ovfs[0], self.digests[ovfs[0]])
        if self.manifest is not None:
            missing = [name for name in self.manifest if name not in members]
            if missing:
                self.unlisted.extend(f"{name} (listed, not in the package)" for name in missing)

    def _has(self, name: str) -> bool:
        return name in self.members

    def _open_member(self, name: str) -> Source:
        entry = self.members[name]
        return _Borrowed(self.source, entry.data_offset, entry.size, f"{self.name}: {name}")

    @staticmethod
    def _small(entry: TarEntry, what: str, limit: int, source: Source) -> bytes:
        if entry.size > limit:
            raise UnsafeImage(f"the {what} '{entry.name}' is {entry.size} bytes, more than the {limit} limit",
                              path=source.name, fmt="ova")
        return source.read_exact(entry.data_offset, entry.size, what, "ova")

    def disk_source(self, disk: DiskDef, index: int) -> DiskSource:
        href = self.files_of(disk)
        assert disk.file is not None
        names = [href] if self._has(href) else _chunk_names(href, self._has)
        if not names:
            raise CorruptImage(f"disk '{disk.id}' refers to '{href}', which the package does not hold",
                               path=self.name, fmt="ova")
        chunked = names != [href]
        parts: list[Source] = []
        checks: list[Callable[[], None]] = []
        slices = [self._open_member(n) for n in names]
        whole = sum(part.size for part in slices)
        if disk.file.size is not None and disk.file.size != whole:
            raise CorruptImage(f"'{href}' is {whole} bytes in the package, the descriptor says {disk.file.size}",
                               path=self.name, fmt="ova")
        head = slices[0].pread(0, 512)
        # A file from a server without ranges is read once, in order: hashed as it passes, never read twice.
        in_order = (chunked or disk.file.compression == "gzip" or head[:2] == b"\x1f\x8b" or _stream_vmdk(head)
                    or any(part.sequential for part in slices))
        note = ""
        for name, part in zip(names, slices, strict=True):
            listed = (self.manifest or {}).get(name)
            if listed is None:
                parts.append(part)
                if self.manifest is not None:
                    checks.append(partial(self._unlisted, name))
                continue
            if in_order:
                hashed = ChecksumSource(part, *listed)
                hashed.sequential_reason = f"the member {name} (hashed as it is read)"
                parts.append(hashed)
                checks.append(partial(self._verified, hashed, name))
            else:
                digest = InPlaceDigest(part, *listed)
                parts.append(digest)
                checks.append(partial(self._verified_in_place, digest, name))
                note = (f"{name} is read in place and hashed by the reads that convert it; what they skip is read a "
                        "second time before the destination is committed")
        source = ConcatSource(parts, f"{self.name}: {href}") if chunked else parts[0]
        if not in_order and not note:
            note = f"{href} is read in place"
        elif in_order:
            note = f"{href} is read in order" + (f" from {len(names)} chunks" if chunked else "")
        return DiskSource(disk, index, source, checks, note)

    def _verified(self, hashed: ChecksumSource, name: str) -> None:
        try:
            hashed.verify()
        except SourceError:
            hashed._hash_up_to(hashed.size)
            raise SourceError(f"{hashed.algo} of member '{name}' is {hashed.hash.hexdigest()}, the manifest "
                              f"{self.manifest_name} says {hashed.expected}", path=self.name, fmt="ova",
                              hint="the package is damaged or was altered; nothing was written") from None
        if name not in self.verified:
            self.verified.append(name)

    def _verified_in_place(self, digest: InPlaceDigest, name: str) -> None:
        actual = digest.finish()
        if digest.reread:
            self.reread[name] = digest.reread
        if not hmac.compare_digest(actual, digest.expected):
            raise SourceError(f"{digest.algo} of member '{name}' is {actual}, the manifest {self.manifest_name} says "
                              f"{digest.expected}", path=self.name, fmt="ova",
                              hint="the package is damaged or was altered; nothing was written")
        if name not in self.verified:
            self.verified.append(name)

    def _unlisted(self, name: str) -> None:
        if name not in self.unlisted:
            self.unlisted.append(name)


class FolderOvf(RandomOva):
    """An ``.ovf`` descriptor with its files beside it (an OVF "package" unpacked in a folder). The files are
    opened through :meth:`Source.open_relative`, which confines them to the descriptor's folder (no ``..``, no
    links out of it, regular files only); the manifest is the ``.mf`` of the same name, when there is one."""

    def __init__(self, source: Source, data: bytes | None = None) -> None:
        if data is None:
            if source.size > MAX_DESCRIPTOR:
                raise UnsafeImage(f"the OVF descriptor is {source.size} bytes, more than the {MAX_DESCRIPTOR} "
                                  "limit", path=source.name, fmt=FMT)
            data = source.read_exact(0, source.size, "OVF descriptor", FMT)
        self._opened: dict[str, Source] = {}
        self.members = {}
        ovf_name = source.name.replace("\\", "/").rsplit("/", 1)[-1]
        OvaPackage.__init__(self, source, parse_descriptor(data, source.name), ovf_name, streamed=False)
        self.digests[ovf_name] = _all_digests(data)
        stem = ovf_name[:-4] if ovf_name.lower().endswith(".ovf") else ovf_name
        for suffix, what in ((".mf", "manifest"), (".cert", "certificate")):
            if not self._has(stem + suffix):
                continue
            if suffix == ".cert":
                self.cert = stem + suffix
                continue
            mf = self._open_member(stem + suffix)
            if mf.size > MAX_MANIFEST:
                raise UnsafeImage(f"the manifest is {mf.size} bytes, more than the {MAX_MANIFEST} limit",
                                  path=mf.name, fmt="mf")
            self.manifest = parse_manifest(mf.read_exact(0, mf.size, what, "mf"), mf.name)
            self.manifest_name = stem + suffix
        self.check_digest(ovf_name, self.digests[ovf_name])

    def _has(self, name: str) -> bool:
        if name in self._opened:
            return True
        try:
            self._opened[name] = self.source.open_relative(name, "the OVF file")
        except SourceError:
            return False
        return True

    def _open_member(self, name: str) -> Source:
        if not self._has(name):
            raise SourceError(f"the OVF file '{name}' is missing beside the descriptor", path=self.name, fmt=FMT)
        opened = self._opened[name]
        return _Borrowed(opened, 0, opened.size, opened.name)

    def close(self) -> None:
        for opened in self._opened.values():
            opened.close()
        self._opened.clear()
        super().close()


def _stream_vmdk(head: bytes) -> bool:
    if head[:4] != b"KDMV" or len(head) < 12:
        return False
    flags = int.from_bytes(head[8:12], "little")
    return bool(flags & (1 << 16)) and bool(flags & (1 << 17))


# -- streaming ---------------------------------------------------------------------------------------------
class StreamedOva(OvaPackage):
    """An OVA read once, in tar order."""

    def __init__(self, source: Source, stream: DecompressingStream, head: bytes) -> None:
        self.stream = stream
        self.reader = StreamTarReader(stream, source.name, prefix=head)
        self.label = stream.label
        self._entries = iter_tar(self.reader)
        self._pending: TarEntry | None = None
        self._finished = False
        self._current: StreamedMember | None = None
        first = self._next()
        if first is None or not first.name.lower().endswith(".ovf"):
            raise CorruptImage("the package does not start with its .ovf descriptor", path=source.name, fmt="ova")
        name = member_name(first.name, source.name)
        data = self._read_small(first, "OVF descriptor", 4 * 1024 * 1024)
        super().__init__(source, parse_descriptor(data, f"{source.name}: {name}"), name, streamed=True)
        self.digests[name] = _all_digests(data)
        self.seen: list[str] = [name]

    def _next(self) -> TarEntry | None:
        """The next regular member (links refused, folders skipped), or None at the end of the tar."""
        if self._pending is not None:
            entry, self._pending = self._pending, None
            return entry
        for entry in self._entries:
            name = member_name(entry.name, self.reader.name)
            if entry.kind in _LINKS:
                raise UnsafeImage(f"the member '{name}' is a link; an OVA holds its files themselves",
                                  path=self.reader.name, fmt="ova")
            if entry.kind in _REGULAR:
                return entry
        self._finished = True
        return None

    def _read_small(self, entry: TarEntry, what: str, limit: int) -> bytes:
        if entry.size > limit:
            raise UnsafeImage(f"the {what} '{entry.name}' is {entry.size} bytes, more than the {limit} limit",
                              path=self.reader.name, fmt="ova")
        data = self.reader.read(entry.size)
        if len(data) != entry.size:
            raise CorruptImage(f"the package ends inside '{entry.name}'", path=self.reader.name, fmt="ova",
                               hint="the file is truncated")
        return data

    def _take_small(self, entry: TarEntry, name: str) -> bool:
        """Read a manifest or note a certificate met on the way; True when ``entry`` was one."""
        if name.lower().endswith(".mf"):
            if self.manifest is not None:
                raise CorruptImage("the package holds two manifests", path=self.name, fmt="ova")
            data = self._read_small(entry, "manifest", MAX_MANIFEST)
            self.manifest = parse_manifest(data, f"{self.name}: {name}")
            self.manifest_name = name
            self.check_digest(self.ovf_name, self.digests[self.ovf_name])
            for member, computed in self.digests.items():
                if member != self.ovf_name:
                    self.check_digest(member, computed)
            return True
        if name.lower().endswith(".cert"):
            self.cert = name
            return True
        return False

    def disk_source(self, disk: DiskDef, index: int) -> DiskSource:
        href = self.files_of(disk)
        assert disk.file is not None
        if self._current is not None:
            self._current.drain()
        while True:
            entry = self._next()
            if entry is None:
                raise CorruptImage(f"the stream ended before '{href}' (disk '{disk.id}'); members are read in "
                                   "tar order, so a disk must come after the ones before it in the descriptor",
                                   path=self.name, fmt="ova")
            name = member_name(entry.name, self.name)
            self.seen.append(name)
            if name == href or name == f"{href}.{0:09d}":
                break
            if not self._take_small(entry, name):
                continue  # another member: read through unhashed, it is not converted
        chunked = name != href
        # A chunked file without ovf:size has no known length until its last chunk: read to its end.
        size = (disk.file.size if disk.file.size is not None else UNKNOWN_SIZE) if chunked else entry.size
        if disk.file.size is not None and disk.file.size != size:
            raise CorruptImage(f"'{href}' is {size} bytes in the package, the descriptor says {disk.file.size}",
                               path=self.name, fmt="ova")
        member = self._current = StreamedMember(self, entry, name, href, size, chunked)
        note = (f"{href} is read from the stream in tar order"
                + (", in chunks" if chunked else ""))
        return DiskSource(disk, index, member, [member.verify], note)

    def read_to_end(self) -> None:
        """Read on to the end of the tar, taking the manifest and certificate met on the way; manifest entries
        that name no member are then known, and reported."""
        while not self._finished:
            entry = self._next()
            if entry is None:
                break
            name = member_name(entry.name, self.name)
            self.seen.append(name)
            self._take_small(entry, name)
        if self.manifest is not None:
            self.unlisted.extend(f"{name} (listed, not in the package)" for name in self.manifest
                                 if name not in self.seen)

    def close(self) -> None:
        self.stream.close()
        super().close()


class StreamedMember(ReadintoSource):
    """A disk file's bytes, forward only, from the tar stream: one member or its chunks in a row, hashed per
    member as they pass. The first 64 KiB are kept so the format probe can read them again."""

    sequential = True
    HEAD = 64 * 1024

    def __init__(self, package: StreamedOva, first: TarEntry, name: str, href: str, size: int,
                 chunked: bool) -> None:
        self.package = package
        self.reader = package.reader
        self.name = f"{package.name}: {href}"
        self.href = href
        self.size = size
        self.chunked = chunked
        self.sequential_reason = f"the member {href} of {package.label}"
        self._pos = 0           # bytes of the file handed out or hashed
        self._member = name
        self._member_left = first.size
        self._chunk = 0
        self._hashers = self._hashers_for(name)
        self._head = bytearray()
        self._done = False

    def _hashers_for(self, name: str) -> dict[str, Any]:
        manifest = self.package.manifest
        if manifest is not None:
            listed = manifest.get(name)
            return {listed[0]: hashlib.new(listed[0])} if listed else {}
        return {"sha1": hashlib.sha1(), "sha256": hashlib.sha256()}

    def _close_member(self) -> None:
        self.package.digests[self._member] = {algo: h.hexdigest() for algo, h in self._hashers.items()}
        if self.package.manifest is not None:
            self.package.check_digest(self._member, self.package.digests[self._member])

    def _advance(self) -> bool:
        """The current member is exhausted: move to the next chunk, if this file has one."""
        self._close_member()
        if not self.chunked:
            return False
        entry = self.package._next()
        self._chunk += 1
        expected = f"{self.href}.{self._chunk:09d}"
        if entry is None or member_name(entry.name, self.package.name) != expected:
            if entry is not None:
                self.package._pending = entry
            return False
        self.package.seen.append(expected)
        self._member = expected
        self._member_left = entry.size
        self._hashers = self._hashers_for(expected)
        return True

    def _pull(self, buf: memoryview) -> int:
        """Next bytes of the file from the tar, hashed."""
        done = 0
        while done < len(buf) and self._pos < self.size:
            if self._member_left == 0:
                if not self._advance():
                    if self.size == UNKNOWN_SIZE:
                        self.size = self._pos  # the last chunk was the end of the file
                        break
                    raise CorruptImage(f"'{self.href}' ends after {self._pos} bytes; the descriptor says "
                                       f"{self.size}", path=self.package.name, fmt="ova",
                                       hint="the file is truncated")
                continue
            n = min(len(buf) - done, self._member_left, self.size - self._pos)
            got = self.reader.readinto(buf[done: done + n])
            if not got:
                raise CorruptImage(f"the package ends {self._pos} bytes into '{self.href}'",
                                   path=self.package.name, fmt="ova", hint="the file is truncated")
            for h in self._hashers.values():
                h.update(buf[done: done + got])
            if self._pos < self.HEAD:
                self._head += buf[done: done + min(got, self.HEAD - self._pos)]
            done += got
            self._pos += got
            self._member_left -= got
        return done

    def readinto(self, offset: int, buf: memoryview) -> int:
        n = min(len(buf), self.size - offset)
        if n <= 0:
            return 0
        if offset < self._pos and offset < len(self._head):
            k = min(n, len(self._head) - offset)
            buf[:k] = self._head[offset: offset + k]
            return k + (self.readinto(offset + k, buf[k:n]) if k < n else 0)
        if offset != self._pos:
            raise CorruptImage(f"an OVA member in a stream can only be read in order (asked for {offset:#x})",
                               path=self.name)
        return self._pull(buf[:n])

    def drain(self) -> None:
        """Read and hash what the reader left of the file (trailing metadata), so the tar goes on after it."""
        if self._done:
            return
        scratch = memoryview(bytearray(1 << 20))
        while self._pos < self.size:
            if not self._pull(scratch[: min(len(scratch), self.size - self._pos)]):
                break
        if self._member_left:
            raise CorruptImage(f"'{self._member}' is longer than the descriptor's size for '{self.href}'",
                               path=self.package.name, fmt="ova")
        self._close_member()
        self._done = True

    def verify(self) -> None:
        """Before commit: the rest of the file read and hashed, then the digests compared with the manifest,
        reading on to the manifest when it comes after the disk."""
        self.drain()
        if self.package.manifest is None:
            self.package.read_to_end()
        if self.package.manifest is None:
            return
        for member, computed in self.package.digests.items():
            self.package.check_digest(member, computed)

    def close(self) -> None:
        pass  # the package owns the stream


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
    if stream is not None and stream.kind is None and is_ovf_descriptor(head):
        return FolderOvf(source, read_descriptor(stream, head, source.name))
    if stream is not None:
        return StreamedOva(source, stream, head)
    if is_ovf_descriptor(source.pread(0, 4096)):
        return FolderOvf(source)
    return RandomOva(source)


__all__ = ["FMT", "DiskSource", "OvaPackage", "is_ova_head", "open_package"]
