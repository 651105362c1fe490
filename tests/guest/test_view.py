"""The guest view: byte-exact reads across cache blocks, slices, read statistics, and a bounded read over HTTP."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from diskport.errors import CorruptImage
from diskport.guest.filesystems import identify
from diskport.guest.view import BLOCK, CACHE_BLOCKS, Readable, read_exact
from diskport.guest.volumes import read_volumes
from tests.guest.support import MiB, blank, convert, sfdisk, sgdisk, view_of
from tests.support.clients import require_tool, run
from tests.support.servers import NginxServer

SIZE = 5 * BLOCK + 25 * 512  # not a multiple of the block (qcow2 sizes are multiples of 512)


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(7).randbytes(SIZE)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_reads_across_block_boundaries(raw: tuple[Path, bytes], fmt: str) -> None:
    path, data = raw
    image = path if fmt == "raw" else convert(path, "qcow2", "cluster_size=4096")
    with view_of(image, fmt) as view:
        assert view.size == SIZE and isinstance(view, Readable)
        for offset, length in [(0, 1), (BLOCK - 1, 2), (BLOCK - 100, BLOCK + 200), (3 * BLOCK - 5, 2 * BLOCK + 10),
                               (0, SIZE), (SIZE - 10, 10), (12345, 3 * BLOCK)]:
            assert view.pread(offset, length) == data[offset:offset + length], (offset, length)
        assert view.pread(SIZE - 10, 100) == data[-10:]      # short only at the end
        assert view.pread(SIZE, 10) == b"" and view.pread(SIZE + 1000, 10) == b""
        assert view.pread(5, 0) == b""
        with pytest.raises(ValueError):
            view.pread(-1, 10)
        assert view.read_exact(100, 50, "a thing") == data[100:150]
        with pytest.raises(CorruptImage, match="a thing") as err:
            view.read_exact(SIZE - 10, 11, "a thing", "test")
        assert err.value.path and err.value.fmt == "test"
        with pytest.raises(CorruptImage, match="beyond the end"):
            read_exact(view, -1, 1, "negative")


def test_slices(raw: tuple[Path, bytes]) -> None:
    path, data = raw
    with view_of(path) as view:
        part = view.slice(BLOCK - 7, 2 * BLOCK, name="part")
        assert part.name == "part" and part.size == 2 * BLOCK
        assert part.pread(0, 20) == data[BLOCK - 7:BLOCK + 13]
        assert part.pread(2 * BLOCK - 3, 100) == data[3 * BLOCK - 10:3 * BLOCK - 7]  # clamped to the slice
        inner = part.slice(10, 30)
        assert inner.pread(0, 100) == data[BLOCK + 3:BLOCK + 33]
        tail = view.slice(SIZE - 100, 10_000)      # a slice is clamped to the disk
        assert tail.size == 100 and tail.pread(0, 1000) == data[-100:]
        assert view.slice(SIZE, 5).size == 0
        with pytest.raises(CorruptImage):
            view.slice(SIZE + 1, 1)
        with pytest.raises(CorruptImage):
            part.slice(-1, 1)
        assert part.stats is view.stats              # one cache for the disk and all its slices


def test_stats_count_block_fetches(tmp_path: Path) -> None:
    path = blank(tmp_path / "big.raw", (CACHE_BLOCKS + 8) * BLOCK)
    with view_of(path) as view:
        view.pread(10, 10)
        assert (view.stats.reads, view.stats.bytes_read) == (1, BLOCK)
        view.pread(100, 1000)                         # same block: cached
        view.slice(BLOCK // 2, 100).pread(0, 100)
        assert view.stats.reads == 1
        view.pread(BLOCK - 1, 2)                      # one new block
        assert (view.stats.reads, view.stats.bytes_read) == (2, 2 * BLOCK)
        for index in range(2, CACHE_BLOCKS + 2):      # 128 more blocks push blocks 0 and 1 out of the LRU
            view.pread(index * BLOCK, 1)
        assert view.stats.reads == CACHE_BLOCKS + 2
        view.pread(CACHE_BLOCKS * BLOCK, 1)           # still cached
        assert view.stats.reads == CACHE_BLOCKS + 2
        view.pread(0, 1)                              # evicted: fetched again
        assert view.stats.reads == CACHE_BLOCKS + 3
        view.pread((CACHE_BLOCKS + 8) * BLOCK - 1, 1)  # the last block
        assert view.stats.bytes_read == (CACHE_BLOCKS + 4) * BLOCK


@pytest.mark.parametrize("scheme", ["gpt", "mbr"])
def test_inspection_over_http_reads_a_bounded_number_of_bytes(tmp_path: Path, nginx: NginxServer,
                                                              scheme: str) -> None:
    """A 4 GiB disk as qcow2 over nginx: the table (for GPT both copies) and every partition identified."""
    disk = blank(tmp_path / "disk.raw", 4096 * MiB)
    if scheme == "gpt":
        sgdisk(disk, "-n", "1:2048:+100M", "-t", "1:ef00", "-n", "2:0:+1M", "-t", "2:ef02",
               "-n", "3:0:+512M", "-t", "3:8200", "-n", "4:0:0", "-t", "4:8300")
        expected = 4
    else:
        sfdisk(disk, "label: dos\n2048,100M,ef,*\n,512M,82\n,,5\n,1G,83\n,1G,83\n,,83\n")
        expected = 6
    run(require_tool("mkfs.vfat"), "-F", "32", "--offset=2048", disk, str(100 * 1024))
    rng = random.Random(2)
    with open(disk, "r+b") as f:  # data around what inspection reads, so the image is not all metadata
        for offset in (4 * MiB, 110 * MiB, 700 * MiB, 4000 * MiB):
            f.seek(offset)
            f.write(rng.randbytes(16 * MiB))
    image = convert(disk, "qcow2")
    disk.unlink()
    shutil.copyfile(image, nginx.root / "disk.qcow2")
    url = nginx.url("disk.qcow2")
    started = time.monotonic()
    with view_of(url) as view:
        table = read_volumes(view)
        types = [identify(p.view) for p in table.partitions]
        view_stats = view.stats
    elapsed = time.monotonic() - started
    entries = nginx.access_entries()
    sent = sum(int(e["body_bytes_sent"]) for e in entries)
    assert table.scheme == scheme and table.notes == [] and len(table.partitions) == expected
    assert all(t is None or t.type == "vfat" for t in types)  # vfat's identify is g-extfat's; the rest is empty
    print(f"\n{scheme} over HTTP: {len(entries)} requests, {sent} body bytes, {elapsed:.2f} s; view: "
          f"{view_stats.reads} block fetches, {view_stats.bytes_read} guest bytes; qcow2 {image.stat().st_size} bytes")
    assert image.stat().st_size > 60 * MiB
    assert len(entries) <= 30
    assert sent <= 4 * MiB
