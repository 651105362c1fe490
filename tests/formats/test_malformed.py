"""Malformed input is a CorruptImage for every reader (the guard in formats/base.py), never a Python error."""

from __future__ import annotations

import random
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from diskport.errors import CorruptImage, DiskportError, UnsupportedImage
from diskport.formats import FORMATS, open_detected
from diskport.formats.base import DiskImage, Extent
from diskport.formats.raw import RawImage
from diskport.sources.base import Source

MiB = 1024 * 1024


class MemorySource(Source):
    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.name, self.size = data, name, len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


# -- the guard itself, on a reader that lets a Python error through ----------------------------------------
class Leaky(RawImage):
    """A reader with the kind of missing check the guard is for."""

    def __init__(self, source: Source, fail: str = "") -> None:
        if fail == "init":
            struct.unpack_from("<Q", b"\0\0")  # before super().__init__: the source is not kept yet
        super().__init__(source)
        self.fail = fail

    def _guest_runs(self, start: int, stop: int) -> Iterator[Extent]:
        yield Extent(start, 4096, False, None)
        if self.fail == "runs":
            raise IndexError("table index out of range")
        if self.fail == "diskport":
            raise UnsupportedImage("a feature", path="elsewhere", fmt="other")
        yield Extent(start + 4096, stop - start - 4096, True, None)

    def read_mapped(self, ext: Extent, buf: memoryview) -> None:
        if self.fail == "read":
            raise OverflowError("int too large to convert")
        buf[:] = b"\1" * len(buf)


def test_an_error_while_opening_names_the_file_and_format() -> None:
    with pytest.raises(CorruptImage) as caught:
        Leaky(MemorySource(bytes(MiB), "leaky.img"), fail="init")
    text = str(caught.value)
    assert text.startswith("leaky.img: raw: malformed structure found while opening it (error: "), text


def test_an_error_while_mapping_is_corrupt_and_keeps_the_python_error() -> None:
    image = Leaky(MemorySource(bytes(MiB), "leaky.img"), fail="runs")
    with pytest.raises(CorruptImage) as caught:
        list(image.extents())
    assert str(caught.value) == ("leaky.img: raw: malformed structure found while mapping its guest extents "
                                 "(IndexError: table index out of range)")


def test_an_error_while_reading_says_where() -> None:
    image = Leaky(MemorySource(bytes(MiB), "leaky.img"), fail="read")
    with pytest.raises(CorruptImage, match=r"reading guest data at 0x0\+0x1000 \(OverflowError: int too large"):
        image.read(0, 4096)


def test_a_diskport_error_passes_unchanged() -> None:
    image = Leaky(MemorySource(bytes(MiB), "leaky.img"), fail="diskport")
    with pytest.raises(UnsupportedImage) as caught:
        list(image.extents())
    assert str(caught.value) == "elsewhere: other: a feature"


def test_a_caller_s_bad_extent_stays_a_value_error() -> None:
    image = Leaky(MemorySource(bytes(MiB), "leaky.img"))
    assert image.read(0, 4096) == b"\1" * 4096
    with pytest.raises(ValueError, match="does not fit"):
        image.read_extent(Extent(MiB - 4096, 8192, False, None), memoryview(bytearray(8192)))


def test_every_registered_reader_is_guarded(images: dict[str, Path]) -> None:
    for name, path in images.items():
        with open_detected(MemorySource(path.read_bytes(), path.name), name) as image:
            for method in ("__init__", "_guest_runs", "read_mapped"):
                owner = next(k for k in type(image).__mro__ if method in k.__dict__)
                if owner is not DiskImage:
                    assert getattr(type(image), method).__dict__.get("malformed_is_corrupt"), (name, method)
    assert set(images) == set(FORMATS) - {"raw", "iso"}


# -- truncated and garbled headers of real images, per format ---------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("malformed")
    raw = folder / "disk.raw"
    rng = random.Random(9)
    with open(raw, "wb") as f:
        f.write(rng.randbytes(MiB))
        f.seek(3 * MiB)
        f.write(rng.randbytes(MiB))
    made = {}
    for fmt in ("qcow2", "vmdk", "vpc", "vhdx", "vdi"):
        made[fmt] = folder / f"disk.{fmt}"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(made[fmt])], check=True)
    return made


#: Where each format keeps the structures a reader parses first.
HEADER_ZONES = {"qcow2": [(0, 112)], "vmdk": [(0, 80)], "vpc": [(0, 512), (-512, None)],
                "vhdx": [(0x10000, 0x10050), (0x30000, 0x30040), (0x200000, 0x200060)], "vdi": [(0, 0x190)]}


def _read_all(data: bytes, fmt: str) -> None:
    with open_detected(MemorySource(data, f"mutated.{fmt}"), fmt) as image:
        for ext in image.extents():
            if not ext.zero:
                image.read_into(ext.start, memoryview(bytearray(ext.length)))


#: Lengths too short for any of the formats' headers: each of these must be refused.
SHORT_CUTS = (0, 3, 100, 511, 4096)


def _mutants(data: bytes, fmt: str, rng: random.Random) -> Iterator[bytes]:
    for cut in SHORT_CUTS:
        yield data[:cut]
    for cut in (len(data) // 2, len(data) - 1):
        yield data[:cut]
    for _ in range(60):
        out = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            lo, hi = rng.choice(HEADER_ZONES[fmt])
            lo, hi = (lo % len(data), len(data) if hi is None else hi)
            at = rng.randrange(lo, hi - 8) & ~3
            value = rng.choice([0, 1, 0xFFFFFFFF, 0x80000000, rng.randrange(1 << 32)])
            out[at:at + 4] = struct.pack(rng.choice("<>") + "I", value)
        yield bytes(out)


@pytest.mark.parametrize("fmt", sorted(HEADER_ZONES))
def test_garbled_and_truncated_headers_are_diskport_errors(images: dict[str, Path], fmt: str) -> None:
    data = images[fmt].read_bytes()
    rng = random.Random(fmt)
    outcomes = []
    for mutant in _mutants(data, fmt, rng):
        try:
            _read_all(mutant, fmt)
            outcomes.append(False)
        except DiskportError as e:
            outcomes.append(True)
            assert f"mutated.{fmt}" in str(e), str(e)  # names the file
    assert all(outcomes[:len(SHORT_CUTS)]), "a file shorter than the header is refused"
    assert sum(outcomes) > len(SHORT_CUTS), "some garbled headers are refused too"
