"""An OVA or OVF read with random access: every tar header first, members as slices read in place
(:class:`RandomOva`), and an ``.ovf`` with its files beside it, in a folder or at a URL (:class:`FolderOvf`).
See :mod:`diskport.ova.package` for the whole design."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import partial

from diskport.errors import CorruptImage, SourceError, UnsafeImage
from diskport.oci.tarscan import RandomTarReader, TarEntry, iter_tar
from diskport.ova.descriptor import (
    FMT,
    MAX_DESCRIPTOR,
    DiskDef,
    parse_descriptor,
)
from diskport.ova.manifest import MAX_MANIFEST, parse_manifest
from diskport.ova.members import ConcatSource, InPlaceDigest, _Borrowed
from diskport.ova.package import (
    _LINKS,
    _REGULAR,
    MAX_MEMBERS,
    DiskSource,
    OvaPackage,
    _all_digests,
    _chunk_names,
    member_name,
)
from diskport.sources.base import Source
from diskport.sources.checksum import ChecksumSource


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
