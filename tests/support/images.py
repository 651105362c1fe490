"""Images for the tests: builders (qemu-img from a patterned raw file), the oracle's answer, an in-memory
source, and the checks and fuzzing helpers that every reader's tests share."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from diskport.formats.base import DiskImage, Extent
from diskport.sources.base import Source
from tests.support import MiB
from tests.support.clients import qemu_img, require_tool, run


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def qemu_raw_sha256(image: Path, tmp_path: Path, fmt: str | None = None) -> str:
    """sha256 of ``qemu-img convert -O raw`` of the image: the oracle's answer."""
    out = tmp_path / f"oracle-{image.name}.raw"
    args = ["convert"] + (["-f", fmt] if fmt else []) + ["-O", "raw", str(image), str(out)]
    qemu_img(*args)
    digest = sha256_file(out)
    out.unlink()
    return digest


def diskport_raw_sha256(image: Path, tmp_path: Path) -> str:
    from diskport import convert

    out = tmp_path / f"diskport-{image.name}.raw"
    convert(image, out, output_format="raw")
    digest = sha256_file(out)
    out.unlink()
    return digest


def write_pattern_raw(path: Path, size: int, seed: int = 1, layout: Sequence[tuple[int, int, str]] = ()) -> Path:
    """A raw file of ``size`` bytes: zeros except the ``(offset, length, kind)`` runs in ``layout``.

    kind is ``random`` (incompressible), ``text`` (compressible) or a single byte value like ``0xab``.
    Without a layout, a default mix of all three with zero gaps is written.
    """
    rng = random.Random(seed)
    if not layout:
        step = max(size // 16, 4096)
        layout = [(o, min(step // 2, size - o), ("random", "text", "0x5a")[i % 3])
                  for i, o in enumerate(range(0, size, step))]
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length, kind in layout:
            if kind == "random":
                data = rng.randbytes(length)
            elif kind == "text":
                line = b"diskport test data line %d\n" % rng.randrange(1000)
                data = (line * (length // len(line) + 1))[:length]
            else:
                data = bytes([int(kind, 16)]) * length
            f.seek(offset)
            f.write(data)
    return path


def make_image(tmp_path: Path, fmt: str, size: int = 8 * MiB, options: str = "", name: str | None = None,
               seed: int = 1, layout: Sequence[tuple[int, int, str]] = ()) -> Path:
    """A ``fmt`` image made by ``qemu-img convert`` from a patterned raw file."""
    raw = write_pattern_raw(tmp_path / f"pattern-{seed}.raw", size, seed, layout)
    out = tmp_path / (name or f"image-{fmt}-{seed}.{fmt}")
    args = ["convert", "-f", "raw", "-O", fmt] + (["-o", options] if options else []) + [str(raw), str(out)]
    qemu_img(*args)
    raw.unlink()
    return out


@contextlib.contextmanager
def loop_device(backing: Path, size: int, fill: int = 0xFF) -> Iterator[str]:
    """A real block device (a loop device over ``backing``, filled with ``fill``), detached afterwards."""
    require_tool("losetup")
    with open(backing, "wb") as f:
        for _ in range(0, size, MiB):
            f.write(bytes([fill]) * MiB)
    dev = run("losetup", "--find", "--show", backing).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev, check=False)


def pvc_dir(tmp_path: Path) -> Path:
    """A folder standing for a persistent volume: after an import it must hold the disk and nothing else."""
    folder = tmp_path / "pvc"
    folder.mkdir(exist_ok=True)
    return folder


INTERESTING_32 = [0, 1, 0x7F, 0x80, 0x1FF, 0x200, 0x400, 0xFFFF, 0x10000, 0x100000, 0x7FFFFFFF, 0x80000000,
                  0xFFFFFFFE, 0xFFFFFFFF]
INTERESTING_64 = [0, 0x200, 0x600, 1 << 20, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


class BytesSource(Source):
    """An in-memory source, so a fuzz loop or a hand-built image never touches the disk.

    ``data`` is not copied: a ``bytearray`` may be mutated between opens (not while an image is open).
    """

    def __init__(self, data: bytes | bytearray, name: str = "memory.img") -> None:
        self.data = data
        self.name = name
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset: offset + length])


class ReadBudgetExceeded(AssertionError):
    """A reader read more than a test allowed: not a DiskportError, so no ``except DiskportError`` hides it."""


class ReadCount:
    """What the sources sharing this count have returned: ``reads`` calls and ``bytes`` in all. With a
    ``budget``, the read that takes ``bytes`` past it raises :class:`ReadBudgetExceeded`, so a reader that would
    loop forever fails the test at once instead of hanging it."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self.reads = 0
        self.bytes = 0

    def add(self, n: int) -> None:
        self.reads += 1
        self.bytes += n
        if self.budget is not None and self.bytes > self.budget:
            raise ReadBudgetExceeded(f"{self.bytes} bytes read in {self.reads} reads, over the budget of "
                                     f"{self.budget}")


class CountingSource(Source):
    """``inner`` with every byte it returns counted in ``count`` (shared with the files it opens beside itself,
    such as a VMDK's extents): a machine-independent measure of the work a reader does."""

    def __init__(self, inner: Source, count: ReadCount | None = None) -> None:
        self.inner = inner
        self.count = count or ReadCount()
        self.name = inner.name
        self.size = inner.size
        self.size_known = inner.size_known
        self.sequential = inner.sequential
        self.sequential_reason = inner.sequential_reason

    def pread(self, offset: int, length: int) -> bytes:
        data = self.inner.pread(offset, length)
        self.count.add(len(data))
        return data

    def readinto(self, offset: int, buf: memoryview) -> int:
        n = self.inner.readinto(offset, buf)
        self.count.add(n)
        return n

    def allocated_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        return self.inner.allocated_extents(offset, length)

    @property
    def is_block_device(self) -> bool:
        return self.inner.is_block_device

    def open_relative(self, name: str, what: str) -> Source:
        return CountingSource(self.inner.open_relative(name, what), self.count)

    def allocated_bytes(self) -> int | None:
        return self.inner.allocated_bytes()

    def prefer_exact_reads(self) -> None:
        self.inner.prefer_exact_reads()

    def close(self) -> None:
        self.inner.close()


@contextlib.contextmanager
def counting_opens(monkeypatch: pytest.MonkeyPatch, budget: int | None = None) -> Iterator[ReadCount]:
    """Every image opened by path inside the block (``convert``, ``open_image``) reads through one
    :class:`CountingSource` count (``diskport.formats`` opens paths with ``open_source``)."""
    import diskport.formats
    from diskport.sources import open_source as real

    count = ReadCount(budget)

    def counted(location: str | os.PathLike[str]) -> Source:
        return CountingSource(real(location), count)

    with monkeypatch.context() as patched:
        patched.setattr(diskport.formats, "open_source", counted)
        yield count


def full_read(image: DiskImage) -> bytes:
    out = bytearray(image.virtual_size)
    image.read_into(0, memoryview(out))
    return bytes(out)


def check_extent_contract(image: DiskImage, start: int = 0, end: int | None = None) -> list[Extent]:
    """Extents cover [start, end) in order with no gap or overlap, and neighbours never merge further."""
    stop = image.virtual_size if end is None else min(end, image.virtual_size)
    exts = list(image.extents(start, end))
    pos = start
    for e in exts:
        assert e.start == pos and e.length > 0, (e, pos)
        assert not (e.zero and e.host is not None)
        pos = e.end
    assert pos == max(stop, start)
    for a, b in itertools.pairwise(exts):
        assert not (a.zero and b.zero)
        assert a.zero or b.zero or a.host is None or b.host is None or a.host + a.length != b.host
    return exts


def mutate(buf: bytearray, regions: Sequence[tuple[int, int]], rng: random.Random, byteorder: str = "<", *,
           interesting: Sequence[int] | None = None, truncate: bool = False) -> bytearray:
    """A few random edits inside ``regions`` (``[start, end)`` byte ranges): bit flips, random bytes, boundary
    values in aligned 32/64-bit fields and random 32-bit words; with ``truncate``, now and then a cut tail.

    ``interesting`` replaces the default boundary values with a format's own (each is masked to the field's
    width). Edits that fall past the end of ``buf`` (after a cut, or a region read from a damaged header) are
    skipped. Returns ``buf``, edited in place.
    """
    for _ in range(rng.randint(1, 4)):
        lo, hi = rng.choice(regions)
        at = rng.randrange(lo, max(lo + 1, hi))
        kind = rng.randrange(6 if truncate else 5)
        if at >= len(buf) and kind != 5:
            continue
        if kind == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[at] = rng.randrange(256)
        elif kind == 2 and at - at % 4 + 4 <= len(buf):
            value = rng.choice(INTERESTING_32 if interesting is None else interesting) & 0xFFFFFFFF
            struct.pack_into(byteorder + "I", buf, at - at % 4, value)
        elif kind == 3 and at - at % 8 + 8 <= len(buf):
            value = rng.choice(INTERESTING_64 if interesting is None else interesting) & ((1 << 64) - 1)
            struct.pack_into(byteorder + "Q", buf, at - at % 8, value)
        elif kind == 4 and at + 4 <= len(buf):
            struct.pack_into(byteorder + "I", buf, at, rng.randrange(1 << 32))
        elif kind == 5 and len(buf) > 1:
            del buf[rng.randrange(len(buf) // 2, len(buf)):]
    return buf


def exercise(image: DiskImage) -> None:
    """Everything a conversion does: every extent, every data byte (in bounded chunks)."""
    pos = 0
    chunk = bytearray(MiB)
    for ext in image.extents():
        assert ext.start == pos and ext.length > 0
        pos = ext.end
        if ext.zero:
            continue
        at = ext.start
        while at < ext.end:
            n = min(len(chunk), ext.end - at)
            host = None if ext.host is None else ext.host + (at - ext.start)
            image.read_extent(Extent(at, n, False, host), memoryview(chunk)[:n])
            at += n
    assert pos == image.virtual_size
