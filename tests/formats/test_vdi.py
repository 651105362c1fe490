"""VDI reader: qemu-img is the oracle for static and dynamic images; hand-edited headers and block maps cover
every refusal; a seeded fuzz loop checks that malformed input only ever raises DiskportError."""

from __future__ import annotations

import json
import random
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from diskport import CorruptImage, DiskportError, UnsafeImage, UnsupportedImage, open_image
from diskport.formats import open_detected
from diskport.formats.base import DiskImage, Extent
from diskport.formats.vdi import open_vdi
from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io
from tests.support.images import (
    BytesSource,
    check_extent_contract,
    diskport_raw_sha256,
    exercise,
    full_read,
    make_image,
    mutate,
    qemu_raw_sha256,
)

BLOCK = MiB  # qemu's VDI block size
# Header offsets (pre-header + header 1.1; see the vdi module docstring).
AT_VERSION = 0x44
AT_IMAGE_TYPE = 0x4C
AT_BLOCK_MAP = 0x154
AT_DATA = 0x158
AT_SECTOR_SIZE = 0x168
AT_DISK_SIZE = 0x170
AT_BLOCK_SIZE = 0x178
AT_BLOCK_EXTRA = 0x17C
AT_BLOCKS = 0x180
AT_BLOCKS_ALLOCATED = 0x184
AT_UUID_IMAGE = 0x188
AT_UUID_LINK = 0x1A8
AT_UUID_PARENT_MODIFY = 0x1B8


def qemu_virtual_size(image: Path) -> int:
    return int(json.loads(qemu_img("info", "-f", "vdi", "--output=json", image).stdout)["virtual-size"])


def qemu_raw(image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / f"{image.name}.oracle.raw"
    qemu_img("convert", "-f", "vdi", "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


def edit(path: Path, change: Callable[[bytearray], None]) -> None:
    buf = bytearray(path.read_bytes())
    change(buf)
    path.write_bytes(bytes(buf))


def put32(at: int, value: int) -> Callable[[bytearray], None]:
    return lambda buf: struct.pack_into("<I", buf, at, value)


def block_map(buf: bytes | bytearray) -> tuple[int, list[int]]:
    at, blocks = struct.unpack_from("<I", buf, AT_BLOCK_MAP)[0], struct.unpack_from("<I", buf, AT_BLOCKS)[0]
    return at, list(struct.unpack_from(f"<{blocks}I", buf, at))


def data_offset(buf: bytes | bytearray) -> int:
    return int(struct.unpack_from("<I", buf, AT_DATA)[0])


def sparse_layout(size: int) -> list[tuple[int, int, str]]:
    return [(0, 3 * 4096, "random"), (BLOCK - 3 * 512, 5 * 512, "text"), (5 * BLOCK + 4096, 700_000, "0xab"),
            (size // 2 + 512, 64 * 1024, "random"), (size - 8192, 8192, "text")]


# -- qemu-img oracle -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [10 * MiB, 100 * MiB, 5 * MiB + 3 * 512], ids=["10MiB", "100MiB", "odd"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_matches_qemu(tmp_path: Path, static: bool, size: int) -> None:
    layout = sparse_layout(size) if size > 16 * MiB else ()
    image = make_image(tmp_path, "vdi", size, "static=on" if static else "", layout=layout)
    with open_image(image) as disk:
        assert disk.format == "vdi"
        assert disk.virtual_size == qemu_virtual_size(image) == size
        assert disk.cluster_size == BLOCK
        facts = disk.format_specific()
        assert facts["image-type"] == ("static" if static else "dynamic")
        assert facts["version"] == "1.1"
        assert facts["block-size"] == BLOCK
        image_uuid = uuid.UUID(bytes_le=image.read_bytes()[AT_UUID_IMAGE: AT_UUID_IMAGE + 16])
        assert facts["uuid"] == str(image_uuid) and image_uuid.int != 0
        exts = check_extent_contract(disk)
    if static:
        # Every block mapped in order: the whole disk is one host run.
        assert exts == [Extent(0, size, False, data_offset(image.read_bytes()))]
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path, "vdi")


def test_blocks_allocated_out_of_order(tmp_path: Path) -> None:
    """qemu-io writes blocks 5, 1, 3, 2 in that order: guest neighbours are not file neighbours, except 1/2."""
    image = tmp_path / "scattered.vdi"
    qemu_img("create", "-f", "vdi", image, "8M")
    qemu_io(image, "vdi", f"write -P 0x55 {5 * BLOCK + 512} 4096", f"write -P 0x11 {BLOCK} {BLOCK}",
            f"write -P 0x33 {3 * BLOCK} 512", f"write -P 0x22 {2 * BLOCK - 512} 1024",
            f"write -P 0x77 {8 * MiB - 512} 512")
    raw = qemu_raw(image, tmp_path)
    buf = image.read_bytes()
    _, entries = block_map(buf)
    assert entries[:8] == [0xFFFFFFFF, 1, 3, 2, 0xFFFFFFFF, 0, 0xFFFFFFFF, 4]
    data_at = data_offset(buf)
    with open_image(image) as disk:
        exts = check_extent_contract(disk)
        assert full_read(disk) == raw
        rng = random.Random(3)
        for _ in range(200):
            a = rng.randrange(disk.virtual_size)
            b = min(disk.virtual_size, a + rng.randrange(1, 3 * BLOCK))
            check_extent_contract(disk, a, b)
            assert disk.read(a, b - a) == raw[a:b]
    # Block 1 and 2 are file blocks 1 and 3: not contiguous, so not merged.
    assert exts == [Extent(0, BLOCK, True), Extent(BLOCK, BLOCK, False, data_at + BLOCK),
                    Extent(2 * BLOCK, BLOCK, False, data_at + 3 * BLOCK),
                    Extent(3 * BLOCK, BLOCK, False, data_at + 2 * BLOCK), Extent(4 * BLOCK, BLOCK, True),
                    Extent(5 * BLOCK, BLOCK, False, data_at), Extent(6 * BLOCK, BLOCK, True),
                    Extent(7 * BLOCK, BLOCK, False, data_at + 4 * BLOCK)]
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path, "vdi")


def test_dynamic_in_order_allocation_is_one_host_run(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vdi", 6 * MiB, layout=[(0, 4 * MiB, "random")])
    with open_image(image) as disk:
        exts = list(disk.extents())
    assert exts == [Extent(0, 4 * MiB, False, data_offset(image.read_bytes())), Extent(4 * MiB, 2 * MiB, True)]


def test_discarded_block_reads_as_zeros(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vdi", 4 * MiB, layout=[(0, 4 * MiB, "text")])
    map_at, _ = block_map(image.read_bytes())
    edit(image, put32(map_at + 4, 0xFFFFFFFE))
    with open_image(image) as disk:
        data = full_read(disk)
        assert list(disk.extents(BLOCK, 2 * BLOCK)) == [Extent(BLOCK, BLOCK, True)]
    assert data[BLOCK: 2 * BLOCK] == bytes(BLOCK) and data[:BLOCK] != bytes(BLOCK)
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path, "vdi")


def test_odd_disk_size_rounds_up_to_a_sector(tmp_path: Path) -> None:
    """'VBoxManage convertfromraw' can write sizes that are not whole sectors; qemu rounds them up."""
    image = make_image(tmp_path, "vdi", 3 * MiB, layout=[(0, 3 * MiB, "random")])
    edit(image, lambda b: struct.pack_into("<Q", b, AT_DISK_SIZE, 3 * MiB - 700))
    with open_image(image) as disk:
        assert disk.virtual_size == 3 * MiB - 512 == qemu_virtual_size(image)
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path, "vdi")


def test_empty_disk(tmp_path: Path) -> None:
    image = tmp_path / "empty.vdi"
    qemu_img("create", "-f", "vdi", image, "0")
    with open_image(image) as disk:
        assert disk.virtual_size == 0
        assert list(disk.extents()) == []


# -- refusals ------------------------------------------------------------------------------------------------
PARENT = uuid.UUID("6f1c2a5e-0b7d-4c3e-9a10-1234567890ab")


@pytest.mark.parametrize(("image_type", "kind"), [(4, "differencing"), (3, "undo")])
def test_differencing_and_undo_name_parent_uuid(tmp_path: Path, image_type: int, kind: str) -> None:
    image = make_image(tmp_path, "vdi", 2 * MiB)

    def make_child(buf: bytearray) -> None:
        struct.pack_into("<I", buf, AT_IMAGE_TYPE, image_type)
        buf[AT_UUID_LINK: AT_UUID_LINK + 16] = PARENT.bytes_le
    edit(image, make_child)
    with pytest.raises(UnsafeImage, match=f"{kind} image") as err:
        open_image(image)
    assert str(PARENT) in str(err.value)
    with pytest.raises(UnsafeImage):
        diskport_raw_sha256(image, tmp_path)


def test_normal_image_naming_a_parent_is_refused(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vdi", 2 * MiB)
    edit(image, lambda b: b.__setitem__(slice(AT_UUID_PARENT_MODIFY, AT_UUID_PARENT_MODIFY + 16), PARENT.bytes_le))
    with pytest.raises(UnsafeImage, match="names a parent"):
        open_image(image)


def test_block_map_entry_out_of_range(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vdi", 4 * MiB, layout=[(0, 2 * MiB, "random")])
    map_at, entries = block_map(image.read_bytes())
    assert entries == [0, 1, 0xFFFFFFFF, 0xFFFFFFFF]
    edit(image, put32(map_at + 12, 2))  # only blocks 0 and 1 are allocated
    with pytest.raises(CorruptImage, match="entry 3 points to data block 2, but only 2 blocks") as err:
        open_image(image)
    assert err.value.offset == map_at + 12


def test_block_past_end_of_file(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vdi", 4 * MiB, layout=[(0, 2 * MiB, "random")])
    edit(image, put32(AT_BLOCKS_ALLOCATED, 4))
    map_at, _ = block_map(image.read_bytes())
    edit(image, put32(map_at + 8, 3))
    with pytest.raises(CorruptImage, match=r"block 2 lies at .* past the end of the file"):
        open_image(image)


def test_truncated(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vdi", 4 * MiB, layout=[(0, 4 * MiB, "random")])
    data = image.read_bytes()
    image.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptImage, match="truncated"):
        open_image(image)
    image.write_bytes(data[:0x202])  # header intact, block map cut
    with pytest.raises(CorruptImage, match="block map"):
        open_image(image)
    image.write_bytes(data[:0x100])
    with pytest.raises(CorruptImage, match="too short"):
        open_vdi_path(image)


def open_vdi_path(path: Path) -> DiskImage:
    from diskport.sources.file import FileSource

    return open_vdi(FileSource(path))


@pytest.mark.parametrize(("blocks", "relation"), [(3, "fewer"), (5, "more"), (0xFFFFFFFF, "more")])
def test_block_count_must_match_disk_size(tmp_path: Path, blocks: int, relation: str) -> None:
    image = make_image(tmp_path, "vdi", 4 * MiB)
    edit(image, put32(AT_BLOCKS, blocks))
    with pytest.raises(CorruptImage, match=f"block map has {blocks} entries, {relation} than the 4"):
        open_image(image)


@pytest.mark.parametrize(("at", "value", "error", "message"), [
    (AT_VERSION, 0x00010000, UnsupportedImage, "version 1.0 is not supported"),
    (AT_VERSION, 0x00020001, UnsupportedImage, "version 2.1 is not supported"),
    (AT_IMAGE_TYPE, 7, UnsupportedImage, "image type 7"),
    (AT_SECTOR_SIZE, 4096, UnsupportedImage, "sector size 4096"),
    (AT_BLOCK_SIZE, 3 * MiB, CorruptImage, "block size"),
    (AT_BLOCK_SIZE, 0, CorruptImage, "block size"),
    (AT_BLOCK_EXTRA, 512, UnsupportedImage, "extra data"),
    (AT_BLOCKS_ALLOCATED, 5, CorruptImage, "5 blocks are allocated but the disk has only 4"),
    (AT_BLOCK_MAP, 0x201, CorruptImage, "block map offset"),
    (AT_BLOCK_MAP, 0, CorruptImage, "block map offset"),
    (AT_DATA, 0x200, CorruptImage, "data offset"),
    (0x48, 0x100, CorruptImage, "header size"),
])
def test_bad_header_fields(tmp_path: Path, at: int, value: int, error: type[DiskportError], message: str) -> None:
    image = make_image(tmp_path, "vdi", 4 * MiB)
    edit(image, put32(at, value))
    with pytest.raises(error, match=message) as err:
        open_image(image)
    assert err.value.path == str(image) and err.value.fmt == "vdi"


def test_bad_signature(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vdi", 1 * MiB)
    edit(image, put32(0x40, 0x12345678))
    with pytest.raises(CorruptImage, match="bad signature"):
        open_vdi_path(image)


def test_info(tmp_path: Path) -> None:
    image = make_image(tmp_path, "vdi", 10 * MiB)
    theirs = json.loads(qemu_img("info", "-f", "vdi", "--output=json", image).stdout)
    with open_image(image) as disk:
        ours = disk.info()
    assert ours["virtual-size"] == theirs["virtual-size"]
    assert ours["cluster-size"] == theirs["cluster-size"]
    assert ours["format"] == theirs["format"] == "vdi"


# -- fuzz ----------------------------------------------------------------------------------------------------


def test_fuzz(tmp_path: Path) -> None:
    rng = random.Random(20240612)
    dynamic = make_image(tmp_path, "vdi", 4 * MiB, name="fuzz-d.vdi",
                         layout=[(2 * MiB, 4096, "random"), (0, 512, "text")])
    static = make_image(tmp_path, "vdi", 3 * MiB, "static=on", name="fuzz-s.vdi", layout=[(MiB, 4096, "random")])
    bases = [p.read_bytes() for p in (dynamic, static)]
    outcomes = {"opened": 0, "refused": 0}
    for iteration in range(3000):
        base = rng.choice(bases)
        buf = bytearray(base)
        map_at, entries = block_map(base)
        header_fields = (0x40, 0x1C8)
        regions = [header_fields, header_fields, (map_at, map_at + 4 * len(entries))]
        mutate(buf, regions, rng)
        if rng.random() < 0.05:
            buf = buf[: rng.randrange(len(buf))]
        source = BytesSource(bytes(buf), f"fuzz-{iteration}.vdi")
        try:
            image = open_detected(source) if iteration % 5 == 0 else open_vdi(source)
            exercise(image)
            outcomes["opened"] += 1
        except DiskportError:
            outcomes["refused"] += 1
    assert outcomes["opened"] > 300 and outcomes["refused"] > 300, outcomes
