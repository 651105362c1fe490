"""The VMDK disk as one :class:`~diskport.formats.base.DiskImage`: the descriptor's (or the one sparse file's)
extents laid end to end in guest order, and the probe that recognises a VMDK file."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from diskport.formats.base import DiskImage, Extent
from diskport.formats.vmdk.descriptor import (
    Descriptor,
    ExtentLine,
    file_corrupt,
    parse_descriptor,
    read_embedded_descriptor,
    read_identity,
)
from diskport.formats.vmdk.extents import (
    ExtentReader,
    FlatExtent,
    SparseExtent,
    ZeroExtent,
    read_sparse_header,
)
from diskport.formats.vmdk.spec import (
    COWD_MAGIC,
    DEVICE_CREATE_TYPES,
    ESX_EXTENT_TYPES,
    FLAT_EXTENT_TYPES,
    FMT,
    MAX_DESCRIPTOR_BYTES,
    MAX_EXTENTS,
    MAX_VIRTUAL_SIZE,
    SECTOR,
    SPARSE_MAGIC,
)
from diskport.runs import RunKind
from diskport.sources.base import Source


class VmdkImage(DiskImage):
    format = FMT

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.layout: list[ExtentReader] = []
        self._starts: list[int] = []
        self._extent_sources: dict[str, Source] = {}
        self.create_type = ""
        self.version: int | None = None
        self.cid: int | None = None
        self.parent_cid: int | None = None
        try:
            self._open()
        except BaseException:
            self._close_extent_sources()
            raise

    # -- opening ------------------------------------------------------------------------------------------
    def _open(self) -> None:
        src = self.source
        if src.size < 4:
            raise self.corrupt(f"file is {src.size} bytes, too short for a VMDK image")
        magic = src.read_exact(0, 4, "magic", FMT)
        if magic in (SPARSE_MAGIC, COWD_MAGIC):
            header = read_sparse_header(src)
            if header.capacity == 0 and header.descriptor_offset:
                # A sparse header that holds only a descriptor: the descriptor names the extents.
                self._open_descriptor(parse_descriptor(read_embedded_descriptor(src, header), src))
                return
            desc = parse_descriptor(read_embedded_descriptor(src, header), src, with_extents=False)
            self._read_identity(desc)
            sparse = SparseExtent(src, src.name, header)
            self.create_type = "streamOptimized" if sparse.compressed else "monolithicSparse"
            self.version = sparse.header.version
            self._append(sparse)
            return
        if src.size > MAX_DESCRIPTOR_BYTES:
            raise self.corrupt(f"is {src.size} bytes and has no sparse extent header; a VMDK descriptor file is "
                               f"at most {MAX_DESCRIPTOR_BYTES // 1024} KiB")
        self._open_descriptor(parse_descriptor(src.read_exact(0, src.size, "descriptor", FMT), src))

    def _read_identity(self, desc: Descriptor) -> None:
        """CID and parentCID; a delta disk (one with a parent) is refused before any extent is opened."""
        self.cid, self.parent_cid = read_identity(desc, self.source)

    def _open_descriptor(self, desc: Descriptor) -> None:
        self._read_identity(desc)
        create_type = desc.get("createType")
        if create_type is None:
            raise self.corrupt("descriptor has no createType")
        if create_type in DEVICE_CREATE_TYPES:
            raise self.unsupported(f"createType '{create_type}' describes ESX or raw device storage, which is not "
                                   "supported")
        self.create_type = create_type
        version = desc.get("version")
        self.version = int(version) if version and version.isascii() and version.isdigit() and len(version) < 6 \
            else None
        if len(desc.extents) > MAX_EXTENTS:
            raise self.unsupported(f"descriptor lists {len(desc.extents)} extents, more than the {MAX_EXTENTS} "
                                   "supported")
        for line in desc.extents:
            self._open_extent(line)
        if not self.layout:
            raise self.corrupt("descriptor lists no extents")

    def _open_extent(self, line: ExtentLine) -> None:
        where = f"extent on descriptor line {line.line_number}"
        if line.access == "NOACCESS":
            raise self.unsupported(f"{where} is NOACCESS; its data cannot be read")
        if line.sectors == 0:
            return  # an empty extent adds nothing (qemu skips it too)
        size = line.sectors * SECTOR
        if line.kind in ESX_EXTENT_TYPES:
            raise self.unsupported(f"{where} has type {line.kind}, which only ESX hosts read",
                                   hint="convert it on the ESX host (vmkfstools -i) first")
        if line.kind == "ZERO":
            if line.filename is not None:
                raise self.corrupt(f"ZERO {where} names a file")
            self._append(ZeroExtent(size))
            return
        if line.kind not in FLAT_EXTENT_TYPES and line.kind != "SPARSE":
            raise self.unsupported(f"{where} has unknown type '{line.kind}'")
        if line.filename is None:
            raise self.corrupt(f"{line.kind} {where} names no file")
        extent_source = self._extent_source(line.filename)
        if line.kind in FLAT_EXTENT_TYPES:
            self._append(FlatExtent(extent_source, line.filename, (line.offset_sectors or 0) * SECTOR, size))
            return
        if line.offset_sectors is not None:
            raise self.corrupt(f"SPARSE {where} has an offset")
        header = read_sparse_header(extent_source)
        if header.capacity == 0 and header.descriptor_offset:
            raise file_corrupt(extent_source, "sparse extent holds only a descriptor; descriptors are not nested")
        sparse = SparseExtent(extent_source, line.filename, header)
        if sparse.size != size:
            raise file_corrupt(extent_source, f"sparse extent has a capacity of {sparse.header.capacity} sectors, but "
                           f"the descriptor gives it {line.sectors}")
        self._append(sparse)

    def _extent_source(self, filename: str) -> Source:
        opened = self._extent_sources.get(filename)
        if opened is None:
            opened = self.source.open_relative(filename, "extent file")
            self._extent_sources[filename] = opened
        return opened

    def _append(self, extent: ExtentReader) -> None:
        start = self.virtual_size
        if start + extent.size > MAX_VIRTUAL_SIZE:
            raise self.corrupt("the extents add up to an implausibly large disk")
        self.layout.append(extent)
        self._starts.append(start)
        self.virtual_size = start + extent.size
        if self.cluster_size is None and isinstance(extent, SparseExtent):
            self.cluster_size = extent.grain_size

    # -- mapping ------------------------------------------------------------------------------------------
    def _guest_runs(self, start: int, stop: int) -> Iterator[Extent]:
        """Each extent's runs in guest order; DATA runs keep their host only when they lie in this file (the
        others are read through :meth:`read_mapped`)."""
        index = bisect.bisect_right(self._starts, start) - 1
        while index < len(self.layout) and self._starts[index] < stop:
            extent = self.layout[index]
            base = self._starts[index]
            mapped = extent.source is self.source
            for kind, rel, length, host in extent.runs(max(start, base) - base,
                                                       min(stop, base + extent.size) - base):
                if kind == RunKind.ZERO:
                    yield Extent(base + rel, length, True, None)
                else:
                    yield Extent(base + rel, length, False, host if kind == RunKind.DATA and mapped else None)
            index += 1

    def read_mapped(self, ext: Extent, buf: memoryview) -> None:
        pos = ext.start
        index = bisect.bisect_right(self._starts, pos) - 1
        while pos < ext.end:
            extent = self.layout[index]
            base = self._starts[index]
            take = min(ext.end, base + extent.size) - pos
            extent.read(pos - base, buf[pos - ext.start: pos - ext.start + take])
            pos += take
            index += 1

    # -- facts and lifetime -------------------------------------------------------------------------------
    def allocated_size(self) -> int | None:
        total = 0
        for src in [self.source, *self._extent_sources.values()]:
            used = src.allocated_bytes()
            if used is None:
                return None
            total += used
        return total

    def data_in_other_files(self) -> bool:
        return any(getattr(extent, "source", self.source) is not self.source for extent in self.layout)

    def format_specific(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"create-type": self.create_type}
        if self.version is not None:
            facts["version"] = self.version
        if self.cid is not None:
            facts["cid"] = self.cid
        if self.parent_cid is not None:
            facts["parent-cid"] = self.parent_cid
        facts["compressed"] = any(isinstance(e, SparseExtent) and e.compressed for e in self.layout)
        if self.cluster_size:
            facts["cluster-size"] = self.cluster_size
        facts["extents"] = [e.facts() for e in self.layout]
        return facts

    def _close_extent_sources(self) -> None:
        sources = list(self._extent_sources.values())
        self._extent_sources.clear()
        for src in sources:
            if src is not self.source:
                src.close()

    def close(self) -> None:
        try:
            self._close_extent_sources()
        finally:
            super().close()


def open_vmdk(source: Source) -> VmdkImage:
    return VmdkImage(source)
