"""VMDK test helpers: the sparse header's layout, descriptors and qemu-made images to patch, the sparse-file
comparison and the engine-like full read (for tests/formats/test_vmdk*.py)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diskport.formats.base import DiskImage
from diskport.formats.vmdk import GD_AT_END
from tests.support import MiB
from tests.support.images import make_image

EXT2_SHA256 = "a6c2f0e39afe6c6ab432ca5465349fcefe8dc944398e97b2d957d3f89dbb5d80"
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")

# A layout with unaligned runs, a run crossing grain and grain-table (32 MiB) boundaries, and zero gaps.
LAYOUT = [
    (0, 3 * MiB + 1536, "random"),
    (5 * MiB + 512, 700 * 1024, "text"),
    (8 * MiB - 4096, 12 * 1024, "0xa5"),
    (31 * MiB, 2 * MiB + 4608, "random"),
    (40 * MiB - 512, 512, "0x01"),
]
SIZE = 40 * MiB


def header_of(path: Path) -> tuple[Any, ...]:
    with open(path, "rb") as f:
        return HEADER.unpack(f.read(HEADER.size))


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def qemu_vmdk(tmp_path: Path, subformat: str, extra: str = "", size: int = SIZE, seed: int = 1,
              name: str | None = None) -> Path:
    options = f"subformat={subformat}" + (f",{extra}" if extra else "")
    return make_image(tmp_path, "vmdk", size, options, name=name or f"{subformat}.vmdk", seed=seed,
                      layout=LAYOUT if size == SIZE else ())


def descriptor_text(extent_lines: list[str], create_type: str = "monolithicFlat", extra: str = "") -> str:
    return ("# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\n"
            f'createType="{create_type}"\n{extra}\n# Extent description\n' + "\n".join(extent_lines)
            + '\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "ide"\n')


def write_descriptor(path: Path, extent_lines: list[str], create_type: str = "monolithicFlat",
                     extra: str = "") -> Path:
    path.write_text(descriptor_text(extent_lines, create_type, extra))
    return path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def data_segments(path: Path) -> Iterator[tuple[int, int]]:
    """The (start, end) runs of a sparse file that are not holes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, end
            pos = end
    finally:
        os.close(fd)


def assert_same_sparse_files(a: Path, b: Path) -> None:
    """Byte equality of two large sparse files, reading only where either has data."""
    assert a.stat().st_size == b.stat().st_size
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in sorted([*data_segments(a), *data_segments(b)]):
            fa.seek(start)
            fb.seek(start)
            pos = start
            while pos < end:
                n = min(4 * MiB, end - pos)
                assert fa.read(n) == fb.read(n), f"outputs differ in {pos:#x}+{n:#x}"
                pos += n


def read_all(image: DiskImage, data_budget: int = 32 * MiB) -> int:
    """Read every extent of ``image`` as the engine would (zero extents skipped); returns data bytes read."""
    done = 0
    pos = 0
    for ext in image.extents():
        assert ext.start == pos and ext.length > 0
        pos = ext.end
        if ext.zero:
            continue
        take = min(ext.length, data_budget - done)
        if take <= 0:
            break
        buf = bytearray(take)
        image.read_extent(ext._replace(length=take), memoryview(buf))
        done += take
    else:
        assert pos == image.virtual_size
    return done


def with_footer(image: Path) -> None:
    """Rewrite a qemu streamOptimized image the way VMware writes them: header gdOffset = GD_AT_END, and the
    real header as a footer between a footer marker and the end-of-stream marker."""
    data = bytearray(image.read_bytes())
    assert len(data) % 512 == 0
    footer = bytes(data[:512])
    struct.pack_into("<Q", data, 56, GD_AT_END)
    footer_marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    image.write_bytes(bytes(data) + footer_marker + footer + bytes(512))
