"""The fuzz targets (see fuzz/harness.py), importable without atheris so findings can be replayed anywhere."""

from __future__ import annotations

import contextlib
from typing import Any

from diskport.errors import DiskportError
from diskport.formats import open_detected
from diskport.guest import inspect_guest
from diskport.guest.initramfs import list_initramfs
from diskport.guest.windows.regf import Hive
from diskport.sources.base import Source

READ_BUDGET = 64 * 1024 * 1024
FORMAT_TARGETS = ("qcow2", "vmdk", "vhd", "vhdx", "vdi", "probe")


class MemorySource(Source):
    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.name, self.size = data, name, len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


def read_image(data: bytes, fmt: str | None) -> None:
    with open_detected(MemorySource(data, "fuzzed"), fmt) as image:
        done = 0
        for extent in image.extents():
            if not extent.zero:
                length = min(extent.length, READ_BUDGET - done)
                image.read_into(extent.start, memoryview(bytearray(length)))
                done += length
                if done >= READ_BUDGET:
                    return


def inspect(data: bytes) -> None:
    inspect_guest(MemorySource(data, "fuzzed"), "raw")


def read_hive(data: bytes) -> None:
    hive = Hive(MemorySource(data, "fuzzed"))
    stack: list[Any] = [hive.root]
    seen = 0
    while stack and seen < 10000:
        key = stack.pop()
        seen += 1
        for value in key.values():
            value.data  # noqa: B018 - the read is the test
        stack.extend(key.subkeys())


def read_initramfs(data: bytes) -> None:
    listing = list_initramfs(MemorySource(data, "fuzzed"))
    assert listing.complete or listing.problem is not None   # a listing either ends or says why not


class PaddedSource(MemorySource):
    """The input followed by zeros up to ``size``: a volume larger than libFuzzer's inputs (XFS needs 300 MB)."""

    def __init__(self, data: bytes, size: int) -> None:
        super().__init__(data, "fuzzed")
        self.size = max(size, len(data))

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        head = self.data[offset:end]
        return head + bytes(max(0, end - max(offset, len(self.data))))


def read_xfs(data: bytes) -> None:
    """Every directory and file of an XFS volume (the input is its first bytes), bounded."""
    from diskport.guest.filesystems.xfs import XfsFilesystem, identify

    volume = PaddedSource(data, 300 * 1024 * 1024)
    info = identify(volume)
    if info is None or not info.readable:
        return
    fs = XfsFilesystem(volume, info)
    stack: list[Any] = [fs.root()]
    seen = 0
    while stack and seen < 10000:
        node = stack.pop()
        for _name, child in fs.entries(node):
            seen += 1
            if seen >= 10000:
                break
            kind = fs.stat_node(child).kind
            if kind == "dir":
                stack.append(child)
            elif kind == "symlink":
                fs.readlink_node(child)
            elif kind == "file":
                fs.open_node(child).pread(0, 65536)


def target(name: str) -> Any:
    if name in FORMAT_TARGETS:
        fmt = None if name == "probe" else name
        return lambda data: read_image(data, fmt)
    return {"guest": inspect, "lvm": inspect, "regf": read_hive, "initramfs": read_initramfs, "xfs": read_xfs}[name]


def one_input(run: Any, data: bytes) -> None:
    with contextlib.suppress(DiskportError):
        run(data)
