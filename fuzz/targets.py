"""The fuzz targets (see fuzz/harness.py), importable without atheris so findings can be replayed anywhere."""

from __future__ import annotations

import contextlib
from typing import Any

from diskport.errors import DiskportError
from diskport.formats import open_detected
from diskport.guest import inspect_guest
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


def target(name: str) -> Any:
    if name in FORMAT_TARGETS:
        fmt = None if name == "probe" else name
        return lambda data: read_image(data, fmt)
    return {"guest": inspect, "regf": read_hive}[name]


def one_input(run: Any, data: bytes) -> None:
    with contextlib.suppress(DiskportError):
        run(data)
