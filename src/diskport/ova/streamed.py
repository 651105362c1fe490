"""An OVA read in tar order (HTTP without ranges, inside gzip): :class:`StreamedOva` and the forward-only
:class:`StreamedMember` each disk is handed over as, hashed as it passes. See :mod:`diskport.ova.package`."""

from __future__ import annotations

import hashlib
from typing import Any

from diskport.errors import CorruptImage, UnsafeImage
from diskport.oci.tarscan import StreamTarReader, TarEntry, iter_tar
from diskport.ova.descriptor import (
    DiskDef,
    parse_descriptor,
)
from diskport.ova.manifest import MAX_MANIFEST, parse_manifest
from diskport.ova.package import (
    _LINKS,
    _REGULAR,
    UNKNOWN_SIZE,
    DiskSource,
    OvaPackage,
    _all_digests,
    member_name,
)
from diskport.sources.base import ReadintoSource, Source
from diskport.sources.stream import DecompressingStream


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
