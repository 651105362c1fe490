"""btrfs: flat images from mkfs.btrfs --rootdir and kernel-written ones (subvolumes, zlib/lzo/zstd extents)
through a loop mount, read back and compared with the mounted tree and btrfs-progs' dump-tree."""

from __future__ import annotations

import os
import random
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from diskport.errors import CorruptImage, DiskportError, UnsupportedImage
from diskport.guest.filesystems import identify, open_filesystem
from diskport.guest.filesystems.btrfs import name_hash
from tests.guest.filesystems.btrfs_images import (
    btrfs,
    dump_tree,
    fs_tree,
    mkfs_btrfs,
    mounted,
    open_btrfs,
    patch_tree_block,
    physical,
    remount,
    reseal_superblock,
)
from tests.guest.filesystems.images import blkid, make_tree, tree_of
from tests.guest.support import patch, view_of

MiB = 1024 * 1024


def small_tree(root: Path) -> Path:
    """Files for every extent kind: inline (small), regular (large, several extents), a sparse one (holes)."""
    rng = random.Random(5)
    make_tree(root, many=600, big=3 * MiB)
    (root / "regular.bin").write_bytes(rng.randbytes(200 * 1024 + 17))
    (root / "inline.txt").write_text("inline data\n" * 10)
    with open(root / "holes.bin", "wb") as f:
        f.truncate(9 * MiB)
        f.seek(4 * MiB + 5)
        f.write(b"island" * 1000)
    return root


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("flat")
    tree = small_tree(base / "tree")
    return mkfs_btrfs(base / "fs.img", 300 * MiB, tree), tree


def test_flat_rootdir_image_matches_its_tree(flat: tuple[Path, Path]) -> None:
    image, tree = flat
    for fs in open_btrfs(image):
        ours = fs_tree(fs)
        want = tree_of(tree)
        assert ours == want
        probe = blkid(image)
        assert fs.info.uuid == probe["UUID"] and fs.info.label == probe["LABEL"] == "fedora"
        assert fs.info.details["superblock"] == "primary" and fs.info.details["superblock_checksum"] == "ok"
        assert fs.profiles() == {"data": "single", "metadata": "dup", "system": "dup"}
        holes = fs.read("/holes.bin", 10 * MiB)
        assert holes == (tree / "holes.bin").read_bytes()
        handle = fs.open("/regular.bin")
        assert handle is not None
        assert handle.pread(100_000, 50) == (tree / "regular.bin").read_bytes()[100_000:100_050]


def test_extent_kinds_are_the_ones_dump_tree_shows(flat: tuple[Path, Path]) -> None:
    """The image really has inline and regular extents (else the comparison above proves less)."""
    dump = dump_tree(flat[0], "-t", "5")
    assert "extent data disk byte" in dump and "inline extent data size" in dump


def test_dir_item_hash_is_btrfs_name_hash(flat: tuple[Path, Path]) -> None:
    """Lookups use DIR_ITEM keys: the hashes computed here are the ones btrfs wrote."""
    dump = dump_tree(flat[0], "-t", "5")
    pairs = re.findall(r"key \(\d+ DIR_ITEM (\d+)\) itemoff \d+ itemsize \d+\n.*?\n\s+transid \d+ data_len \d+ "
                       r"name_len \d+\n\s+name: (\S+)\n", dump)
    assert len(pairs) > 100
    for hashed, name in pairs[:200]:
        assert name_hash(name.encode()) == int(hashed), name


def kernel_image(base: Path) -> tuple[Path, dict[str, tuple[str, str]], dict[str, dict[str, tuple[str, str]]]]:
    """Fedora's layout written by the kernel: top level with subvolumes ``root`` and ``home`` and a snapshot of
    root; files written under compress-force=zlib, then lzo, then zstd. Returns the image, the top level's tree
    and each subvolume's tree as the mounted kernel shows them."""
    image = mkfs_btrfs(base / "k.img", 300 * MiB)
    rng = random.Random(11)
    with mounted(image, base / "mnt", "compress-force=zlib") as mnt:
        btrfs("subvolume", "create", mnt / "root")
        btrfs("subvolume", "create", mnt / "home")
        root = mnt / "root"
        (root / "etc").mkdir()
        (root / "etc/os-release").write_text('NAME="Fedora Linux"\nID=fedora\nVERSION_ID=39\n')
        (root / "etc/fstab").write_text("UUID=x / btrfs subvol=root 0 0\n")
        text = "".join(f"line {i} of a compressible file\n" for i in range(20000)).encode()
        (root / "zlib.txt").write_bytes(text)
        (root / "zlib-inline.txt").write_bytes(b"abc" * 300)
        remount(mnt, "compress-force=lzo")
        (root / "lzo.txt").write_bytes(text[::-1])
        (root / "lzo-inline.txt").write_bytes(b"xyz" * 300)
        (root / "mixed.bin").write_bytes(rng.randbytes(300_000) + text[:300_000])
        remount(mnt, "compress-force=zstd")
        (root / "zstd.txt").write_bytes(text[5:])
        (root / "zstd-inline.txt").write_bytes(b"klm" * 300)
        os.symlink("zstd.txt", root / "link")
        (mnt / "home" / "user").mkdir()
        (mnt / "home" / "user" / "notes").write_text("home\n")
        os.makedirs(mnt / "root/.snapshots")
        btrfs("subvolume", "snapshot", "-r", mnt / "root", mnt / "root/.snapshots/1")
        run_sync = os.sync
        run_sync()
        top = tree_of(mnt)
        subs = {name: tree_of(mnt / name) for name in ("root", "home")}
    return image, top, subs


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    return kernel_image(tmp_path_factory.mktemp("kernel"))


def test_kernel_written_subvolumes_and_compression(kernel: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    image, top, subs = kernel
    dump = dump_tree(image, "-t", "256") + dump_tree(image, "-t", "257")
    for alg in ("zlib", "lzo", "zstd"):
        assert re.search(rf"extent compression \d \({alg}\)", dump), alg
    for fs in open_btrfs(image):
        assert fs.default_subvolume == 5
        assert fs_tree(fs) == top          # the top level, entering each subvolume through its directory entry
        by_path = {s.path: s for s in fs.subvolumes()}
        assert set(by_path) == {"root", "home", "root/.snapshots/1"}
        for name, want in subs.items():
            assert fs_tree(fs.at(by_path[name].id)) == want
        snap = fs.at(by_path["root/.snapshots/1"].id)
        assert snap.read("/etc/os-release", 100) == fs.read("/root/etc/os-release", 100)


def test_set_default_subvolume_is_the_root(tmp_path: Path) -> None:
    """openSUSE's way: the default subvolume (``@/.snapshots/1/snapshot``) is what a plain mount shows."""
    image = mkfs_btrfs(tmp_path / "s.img", 200 * MiB)
    with mounted(image, tmp_path / "mnt") as mnt:
        btrfs("subvolume", "create", mnt / "@")
        os.makedirs(mnt / "@/.snapshots/1")
        btrfs("subvolume", "create", mnt / "@/.snapshots/1/snapshot")
        (mnt / "@/.snapshots/1/snapshot/etc").mkdir()
        (mnt / "@/.snapshots/1/snapshot/etc/os-release").write_text("ID=opensuse-tumbleweed\n")
        btrfs("subvolume", "set-default", mnt / "@/.snapshots/1/snapshot")
        ids = {line.split()[-1]: int(line.split()[1]) for line in btrfs("subvolume", "list", mnt).splitlines()}
    for fs in open_btrfs(image):
        assert fs.default_subvolume == ids["@/.snapshots/1/snapshot"]
        assert fs.read("/etc/os-release", 100) == b"ID=opensuse-tumbleweed\n"
        assert {s.path for s in fs.subvolumes()} == {"@", "@/.snapshots/1/snapshot"}


# ---- hostile ------------------------------------------------------------------------------------------------
def leaf_of(dump: str, pattern: str) -> tuple[int, int]:
    """``(leaf bytenr, item offset)`` of the first item whose key line matches ``pattern`` in a dump."""
    leaf = 0
    for line in dump.splitlines():
        m = re.match(r"leaf (\d+) items", line)
        if m:
            leaf = int(m[1])
        m = re.search(pattern + r".*itemoff (\d+)", line)
        if m:
            return leaf, int(m.group(m.lastindex or 1))
    raise AssertionError(pattern)


def expect_error(image: Path, needle: str, kind: type[DiskportError] = CorruptImage) -> str:
    with pytest.raises(kind) as caught:
        for fs in open_btrfs(image):
            fs_tree(fs)
    message = str(caught.value)
    assert needle in message and "\n" not in message and str(image) in message, message
    return message


def test_tree_loop_is_refused(flat: tuple[Path, Path], tmp_path: Path) -> None:
    image = tmp_path / "loop.img"
    image.write_bytes(flat[0].read_bytes())
    m = re.search(r"node (\d+) level 1 items \d+ .*owner FS_TREE", dump_tree(image, "-t", "5"))
    assert m, "the FS tree should have an interior node"
    node = int(m[1])
    patch_tree_block(image, node, {101 + 33 + 17: struct.pack("<Q", node)})   # second pointer -> itself
    expect_error(image, "is at level 1, its parent wants 0")


def test_keys_out_of_order_are_refused(flat: tuple[Path, Path], tmp_path: Path) -> None:
    image = tmp_path / "order.img"
    image.write_bytes(flat[0].read_bytes())
    leaf, _ = leaf_of(dump_tree(image, "-t", "5"), r"item 1 key \(256 ")
    patch_tree_block(image, leaf, {101 + 25: struct.pack("<Q", 1 << 60)})  # item 1's objectid past item 2's
    expect_error(image, "keys out of order")


def test_chunk_outside_the_device_is_refused(flat: tuple[Path, Path], tmp_path: Path) -> None:
    image = tmp_path / "chunk.img"
    image.write_bytes(flat[0].read_bytes())
    patch(image, 0x10000 + 811 + 17 + 48 + 8, struct.pack("<Q", 1 << 40))   # sys chunk's stripe 0 offset
    reseal_superblock(image)
    expect_error(image, "outside the device")


def test_bad_primary_superblock_uses_the_mirror(flat: tuple[Path, Path], tmp_path: Path) -> None:
    image = tmp_path / "mirror.img"
    image.write_bytes(flat[0].read_bytes())
    patch(image, 0x10000 + 299, b"damaged")           # the label: the checksum no longer matches
    for fs in open_btrfs(image):
        assert fs.info.details["superblock"] == "mirror at 64 MiB"
        assert fs.info.details["primary_superblock"] == "bad checksum"
        assert fs_tree(fs) == tree_of(flat[1])


def test_wiped_primary_uses_the_mirror_other_bytes_do_not(flat: tuple[Path, Path], tmp_path: Path) -> None:
    image = tmp_path / "wiped.img"
    image.write_bytes(flat[0].read_bytes())
    patch(image, 0x10000, bytes(4096))
    for fs in open_btrfs(image):
        assert fs.info.details["superblock"] == "mirror at 64 MiB"
        assert fs.info.details["primary_superblock"] == "no magic"
    patch(image, 0x10000, random.Random(1).randbytes(4096))   # as if another filesystem had been made there
    with view_of(image) as view:
        assert identify(view) is None


def test_compressed_extent_beyond_ram_bytes_is_refused(kernel: tuple[Path, Any, Any], tmp_path: Path) -> None:
    image = tmp_path / "ram.img"
    image.write_bytes(kernel[0].read_bytes())
    dump = dump_tree(image, "-t", "256")
    ino = re.search(r"key \((\d+) INODE_REF \d+\)[^\n]*\n[^\n]*name: zstd\.txt", dump)
    assert ino
    leaf, itemoff = leaf_of(dump, rf"key \({ino[1]} EXTENT_DATA 0\)")
    at = 101 + itemoff
    patch_tree_block(image, leaf, {at + 8: struct.pack("<Q", 4096), at + 45: struct.pack("<Q", 4096)})
    message = expect_error(image, "expands beyond its ram_bytes")
    assert "zstd" not in message or "damaged" not in message


def test_damaged_lzo_data_is_refused(kernel: tuple[Path, Any, Any], tmp_path: Path) -> None:
    """File data has no checksum this reader checks: a damaged lzo segment reaches the decoder, which refuses it."""
    image = tmp_path / "lzo.img"
    image.write_bytes(kernel[0].read_bytes())
    dump = dump_tree(image, "-t", "256")
    ino = re.search(r"key \((\d+) INODE_REF \d+\)[^\n]*\n[^\n]*name: lzo\.txt\n", dump)
    assert ino
    extent = re.search(rf"key \({ino[1]} EXTENT_DATA 0\).*?\n.*?\n\s+extent data disk byte (\d+) nr (\d+)", dump)
    assert extent and "compression 2 (lzo)" in dump[extent.end():extent.end() + 200]
    where = physical(image, int(extent[1]))[0]
    patch(image, where + 8, b"\xff" * 64)          # inside the first segment, after both length words
    for fs in open_btrfs(image):
        with pytest.raises(CorruptImage) as caught:
            fs.read("/root/lzo.txt", 1 << 20)
        assert "lzo" in str(caught.value) and "\n" not in str(caught.value)
        assert fs.read("/root/zstd.txt", 100) is not None    # the rest of the filesystem still reads


def test_multi_device_is_identified_not_read(tmp_path: Path) -> None:
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    with open(second, "wb") as f:
        f.truncate(200 * MiB)
    mkfs_btrfs(first, 200 * MiB, None, "-d", "raid1", "-m", "raid1", str(second))
    with view_of(first) as view:
        info = identify(view)
        assert info is not None and info.type == "btrfs" and not info.readable
        assert info.details["devices"] == 2 and "multi-device" in str(info.details["problem"])
        with pytest.raises(UnsupportedImage, match="multi-device"):
            open_filesystem(view, info)


# id -> mkfs.btrfs options: each checksum this reader verifies, small nodes (deeper trees), DUP data, mixed
# block groups, single metadata, 64 KiB sectors
VARIANTS = {
    "sha256": ("--csum", "sha256"),
    "blake2": ("--csum", "blake2"),
    "xxhash": ("--csum", "xxhash"),
    "nodesize-4k": ("--nodesize", "4096"),
    "data-dup": ("-d", "dup"),
    "mixed": ("--mixed",),
    "metadata-single": ("-m", "single"),
    "sectorsize-64k": ("--sectorsize", "65536", "--nodesize", "65536"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mkfs_variants_match_their_tree(flat: tuple[Path, Path], tmp_path: Path, variant: str) -> None:
    tree = flat[1]
    if variant == "nodesize-4k":   # enough entries for a three-level FS tree at 4 KiB nodes
        tree = make_tree(tmp_path / "tree", many=8000, big=64 * 1024)
    image = mkfs_btrfs(tmp_path / "v.img", 400 * MiB, tree, *VARIANTS[variant])
    for fs in open_btrfs(image):
        assert fs_tree(fs) == tree_of(tree)
        if variant == "nodesize-4k":
            assert re.search(r"node \d+ level 2 ", dump_tree(image, "-t", "5")), "a three-level FS tree"
        if variant == "data-dup":
            assert fs.profiles()["data"] == "dup"


def test_pointer_outside_every_chunk_is_refused(flat: tuple[Path, Path], tmp_path: Path) -> None:
    image = tmp_path / "ptr.img"
    image.write_bytes(flat[0].read_bytes())
    m = re.search(r"node (\d+) level 1 items \d+ .*owner FS_TREE", dump_tree(image, "-t", "5"))
    assert m
    patch_tree_block(image, int(m[1]), {101 + 33 + 17: struct.pack("<Q", 1 << 50)})
    expect_error(image, "lies outside every chunk")


def test_last_mirror_at_256_gib(tmp_path: Path) -> None:
    """A sparse 257 GiB volume holds all three copies; with the first two damaged, the third is used."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("far\n")
    image = mkfs_btrfs(tmp_path / "huge.img", 257 * 1024 * MiB, tree)
    patch(image, 0x10000 + 299, b"x")
    patch(image, 0x4000000 + 299, b"x")
    for fs in open_btrfs(image):
        assert fs.info.details["superblock"] == "mirror at 256 GiB"
        assert fs.read("/etc/hostname", 10) == b"far\n"
    patch(image, 0x4000000000 + 299, b"x")
    with view_of(image) as view:
        info = identify(view)
        assert info is not None and not info.readable and "bad checksum" in str(info.details["problem"])
