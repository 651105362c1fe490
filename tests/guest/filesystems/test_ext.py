"""ext2/3/4: images from mkfs -d over a guest-like tree, read back and compared with debugfs and blkid."""

from __future__ import annotations

import random
import re
import struct
from pathlib import Path

import pytest

from diskport.errors import CorruptImage, UnsupportedImage
from diskport.formats import open_image
from diskport.guest.filesystems import FILESYSTEMS, identify, open_filesystem
from diskport.guest.filesystems.base import MAX_DEPTH, Filesystem, FsInfo
from diskport.guest.filesystems.ext import ExtFilesystem
from diskport.guest.filesystems.ext import identify as ext_identify
from diskport.guest.view import GuestView
from tests.guest.filesystems.images import (
    BytesVolume,
    blkid,
    debugfs,
    debugfs_ls,
    debugfs_rdump,
    make_tree,
    mkfs_ext,
    tree_of,
    walk,
)
from tests.support import TESTDATA
from tests.support.clients import qemu_img
from tests.support.images import mutate

# id -> (mkfs tool, options): every layout the reader has a path for
VARIANTS = {
    "ext4-1k": ("mkfs.ext4", ("-b", "1024")),
    "ext4-4k": ("mkfs.ext4", ("-b", "4096")),
    "ext4-64k-blocks": ("mkfs.ext4", ("-b", "65536", "-O", "^has_journal")),
    "ext4-32bit-desc": ("mkfs.ext4", ("-b", "4096", "-O", "^64bit")),
    "ext2-indirect-1k": ("mkfs.ext2", ("-b", "1024")),
    "ext3-128-inodes": ("mkfs.ext3", ("-b", "1024", "-I", "128")),
    "ext4-no-extents": ("mkfs.ext4", ("-b", "1024", "-O", "^extent,^flex_bg,^64bit,^huge_file")),
    "ext4-inline": ("mkfs.ext4", ("-b", "4096", "-O", "inline_data")),
    "ext4-meta-bg": ("mkfs.ext4", ("-b", "1024", "-O", "meta_bg,^resize_inode")),
    "ext4-1k-inodes": ("mkfs.ext4", ("-b", "4096", "-I", "1024")),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree") / "root")


@pytest.fixture(scope="module", params=list(VARIANTS))
def ext_image(request: pytest.FixtureRequest, tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tool, options = VARIANTS[request.param]
    size = "400M" if "65536" in options else "96M"     # 3000 small files take a 64 KiB block each
    return mkfs_ext(tmp_path_factory.mktemp(request.param) / "fs.img", tree, tool, size, options)


def open_fs(image: Path) -> tuple[GuestView, Filesystem[object]]:
    img = open_image(image)
    view = GuestView(img)
    info = identify(view)
    assert info is not None
    fs = open_filesystem(view, info)
    assert fs is not None
    return view, fs


def test_identify_matches_blkid(ext_image: Path) -> None:
    oracle = blkid(ext_image)
    header = debugfs(ext_image, "stats")
    blocks = int(re.search(r"Block count:\s+(\d+)", header).group(1))  # type: ignore[union-attr]
    block_size = int(re.search(r"Block size:\s+(\d+)", header).group(1))  # type: ignore[union-attr]
    view, fs = open_fs(ext_image)
    info = fs.info
    assert (info.type, info.uuid, info.label, info.version) == (oracle["TYPE"], oracle["UUID"], oracle["LABEL"],
                                                                oracle["VERSION"])
    assert info.size == blocks * block_size
    assert info.details["block_size"] == block_size
    assert info.readable
    view.image.close()


def test_tree_matches_debugfs_and_source(ext_image: Path, tree: Path, tmp_path: Path) -> None:
    dump = debugfs_rdump(ext_image, tmp_path / "dump")
    oracle = tree_of(dump)
    view, fs = open_fs(ext_image)
    ours = walk(fs)
    assert set(ours) == set(oracle)
    for path in [p for p in ours if ours[p] != oracle[p]]:
        # debugfs 1.47.0 dumps a few inline files whole 60-byte i_block, NULs past i_size included (its
        # "Size of inline data: 60" for a 5-byte file); the source tree below is the judge of those
        assert "inline" in ext_image.parent.name, path
        data = fs.read(path, 1 << 20)
        assert data is not None and (dump / path.lstrip("/")).read_bytes().rstrip(b"\0") == data.rstrip(b"\0")
    view.image.close()
    assert ours == tree_of(tree)


def test_listings_match_debugfs_in_order(ext_image: Path) -> None:
    view, fs = open_fs(ext_image)
    for path in ("/", "/etc", "/usr/share/many", "/smalldir", "/unicode", "/boot"):
        oracle = debugfs_ls(ext_image, path)
        assert fs.listdir(path) == list(oracle), path          # the same names in the same on-disk order
        for name, (ino, mode) in list(oracle.items())[:50]:
            node = fs.lookup(f"{path.rstrip('/')}/{name}", follow=False)
            assert isinstance(fs, ExtFilesystem) and node is not None and node.ino == ino
            kind = {0o100000: "file", 0o040000: "dir", 0o120000: "symlink"}[mode & 0o170000]
            assert fs.stat_node(node).kind == kind
    view.image.close()


def test_htree_lookups(ext_image: Path) -> None:
    """Every name of the 3000-entry directory is found through its hash index with debugfs' inode number;
    absent names are not; and debugfs' dx_hash agrees with ours for the volume's seed and hash."""
    from diskport.guest.filesystems.ext import dx_hash

    view, fs = open_fs(ext_image)
    assert isinstance(fs, ExtFilesystem)
    oracle = debugfs_ls(ext_image, "/usr/share/many")
    many = fs.lookup("/usr/share/many")
    assert many is not None
    inode = fs._inode(many.ino)
    for name, (ino, _mode) in oracle.items():
        assert fs._htree_find(inode, name.encode()) == ino, name    # the index, not the linear fallback
    for absent in ("entry-99999", "nope", "entry-00001-nn", "ENTRY-00002-nn"):
        assert fs._htree_find(inode, absent.encode()) == 0 and fs.find_entry(many, absent) is None
    assert fs.lookup("/usr/share/many/entry-02999-" + "n" * (2999 % 40)) is not None
    seed = re.search(r"Directory Hash Seed:\s+(\S+)", debugfs(ext_image, "stats"))
    assert seed is not None
    for name in ("entry-00007-nnnnnnn", "os-release", "x" * 70):
        out = debugfs(ext_image, f"dx_hash -h half_md4 -s {seed.group(1)} {name}")
        want = int(re.search(r"is (0x[0-9a-f]+)", out).group(1), 16)  # type: ignore[union-attr]
        assert dx_hash(name.encode(), 1, fs.sb.raw[0xEC:0xFC]) == want & ~1
    view.image.close()


def test_os_release_through_the_symlink(ext_image: Path, tree: Path) -> None:
    view, fs = open_fs(ext_image)
    assert fs.readlink("/etc/os-release") == "../usr/lib/os-release"
    assert fs.read("/etc/os-release", 4096) == (tree / "usr/lib/os-release").read_bytes()
    assert fs.read("/etc/fast-link", 100) == b"guest\n"
    assert fs.stat("/etc/slow-link", follow=False) is not None and fs.stat("/etc/slow-link") is None
    assert fs.read("/level0/level1/../level1/level2/level3/level4/level5/level6/level7/level8/level9/level10/"
                   "level11/bottom.txt", 100) == b"the bottom\n"
    assert fs.listdir("/no/such") == [] and fs.read("/etc", 10) is None
    view.image.close()


def test_the_layout_exercises_what_it_claims(ext_image: Path) -> None:
    """debugfs confirms each image holds the structure its variant is there to test."""
    name = ext_image.parent.name
    many = debugfs(ext_image, "stat /usr/share/many")
    assert re.search(r"Flags: 0x[0-9a-f]*1[0-9a-f]{3}\b", many), "the big directory must be an htree"
    kernel = debugfs(ext_image, "stat /boot/vmlinuz-6.1.0-18-amd64")
    slow = debugfs(ext_image, "stat /etc/slow-link")
    if "indirect" in name or "no-extents" in name or "ext3" in name:
        assert "(DIND)" in kernel and "EXTENTS" not in kernel
        assert "(TIND)" in debugfs(ext_image, "stat /boot/sparse.img")
    else:
        assert "EXTENTS" in kernel
    if "inline" in name:
        assert "Size of inline data" in debugfs(ext_image, "stat /smalldir/s1")
        assert "Size of inline data" in debugfs(ext_image, "stat /smalldir")
    else:
        assert "Fast link dest" not in slow


def test_random_reads_of_sparse_and_big_files(ext_image: Path, tree: Path) -> None:
    view, fs = open_fs(ext_image)
    rng = random.Random(3)
    for path in ("/boot/vmlinuz-6.1.0-18-amd64", "/boot/sparse.img"):
        data = (tree / path.lstrip("/")).read_bytes()
        handle = fs.open(path)
        assert handle is not None and handle.size == len(data)
        for _ in range(150):
            at = rng.randrange(len(data))
            n = rng.randrange(1, 70000)
            assert handle.pread(at, n) == data[at: at + n]
        assert handle.pread(len(data), 10) == b""
    view.image.close()


@pytest.mark.parametrize("name", ["ext2.qcow2", "ext2.vmdk", "ext2.vhd"])
def test_external_images(name: str, tmp_path: Path) -> None:
    """dfvfs' ext2 test image in three formats, through open_image + GuestView; debugfs reads qemu-img's raw."""
    raw = tmp_path / "ext2.raw"
    qemu_img("convert", "-O", "raw", TESTDATA / name, raw)
    oracle_id = blkid(raw)
    oracle = tree_of(debugfs_rdump(raw, tmp_path / "dump"))
    view, fs = open_fs(TESTDATA / name)
    assert (fs.info.type, fs.info.label, fs.info.uuid) == (oracle_id["TYPE"], oracle_id["LABEL"], oracle_id["UUID"])
    assert walk(fs) == oracle
    assert fs.listdir("/a_directory") == list(debugfs_ls(raw, "/a_directory"))
    view.image.close()


def test_os_release_cost_inside_qcow2(tree: Path, tmp_path: Path) -> None:
    """What reading /etc/os-release costs through a qcow2: a handful of 64 KiB fetches."""
    image = mkfs_ext(tmp_path / "root.img", tree, "mkfs.ext4", "512M", ("-b", "4096"))
    qcow2 = tmp_path / "root.qcow2"
    qemu_img("convert", "-O", "qcow2", image, qcow2)
    with open_image(qcow2) as img:
        view = GuestView(img)
        info = identify(view)
        assert info is not None and info.type == "ext4"
        fs = open_filesystem(view, info)
        assert fs is not None
        assert fs.read("/etc/os-release", 65536) == (tree / "usr/lib/os-release").read_bytes()
        stats = view.stats
    print(f"os-release from ext4 in qcow2: {stats.bytes_read} bytes in {stats.reads} fetches")
    assert stats.reads <= 12 and stats.bytes_read <= 12 * 65536


def test_spec_registered() -> None:
    spec = next(s for s in FILESYSTEMS if s.name == "ext4")
    assert spec.reads("ext2") and spec.reads("ext3") and spec.reads("ext4") and not spec.reads("vfat")


# ---- hostile -------------------------------------------------------------------------------------------------
def small_image(tmp_path: Path, tool: str = "mkfs.ext4", options: tuple[str, ...] = ("-b", "1024")) -> Path:
    src = tmp_path / "src"
    if not src.exists():
        (src / "etc").mkdir(parents=True)
        (src / "usr/lib").mkdir(parents=True)
        (src / "usr/lib/os-release").write_text("ID=debian\n")
        (src / "etc/os-release").symlink_to("../usr/lib/os-release")
        (src / "etc/slow").symlink_to("/" + "s" * 100)
        (src / "etc/data.bin").write_bytes(random.Random(1).randbytes(300 * 1024))
        (src / "a/b/c").mkdir(parents=True)
        for i in range(200):    # enough names for two blocks at 1 KiB: e2fsck -D makes /a/b an htree
            (src / "a/b" / f"file{i}").write_text("x" * (i % 50))
    out = tmp_path / f"small-{tool}-{'_'.join(options)}.img"
    return mkfs_ext(out, src, tool, "8M", options)


def inode_offset(image: Path, path: str) -> int:
    """Byte offset of ``path``'s inode, by debugfs' imap."""
    out = debugfs(image, f"imap {path}")
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", out)
    assert m, out
    block_size = int(re.search(r"Block size:\s+(\d+)", debugfs(image, "stats")).group(1))  # type: ignore[union-attr]
    return int(m.group(1)) * block_size + int(m.group(2), 16)


def data_blocks(image: Path, path: str) -> list[int]:
    return [int(b) for b in debugfs(image, f"blocks {path}").split()]


def open_bytes(data: bytes | bytearray | BytesVolume) -> ExtFilesystem:
    volume = data if isinstance(data, BytesVolume) else BytesVolume(data)
    info = ext_identify(volume)
    assert info is not None
    return ExtFilesystem(volume, info)


def test_extent_past_the_volume(tmp_path: Path) -> None:
    image = small_image(tmp_path)
    data = bytearray(image.read_bytes())
    at = inode_offset(image, "/etc/data.bin")
    assert struct.unpack_from("<H", data, at + 0x28)[0] == 0xF30A
    struct.pack_into("<I", data, at + 0x28 + 12 + 8, 0x7FFFFFFF)   # first extent's start, far past 8 MiB
    with pytest.raises(CorruptImage, match="outside the filesystem"):
        open_bytes(data).read("/etc/data.bin", 1 << 20)


def test_depth_bomb_and_huge_size(tmp_path: Path) -> None:
    image = small_image(tmp_path)
    base = image.read_bytes()
    at = inode_offset(image, "/etc/data.bin")
    data = bytearray(base)
    struct.pack_into("<H", data, at + 0x28 + 6, 5)       # say depth 5 over a leaf: data blocks read as nodes
    with pytest.raises(CorruptImage):
        open_bytes(data).read("/etc/data.bin", 1 << 20)
    data = bytearray(base)
    struct.pack_into("<H", data, at + 0x28 + 6, 0xFFFF)
    with pytest.raises(CorruptImage, match="depth"):
        open_bytes(data).read("/etc/data.bin", 1 << 20)
    data = bytearray(base)
    struct.pack_into("<I", data, at + 0x6C, 0xFFFFFFFF)   # i_size_high: an exabyte-sized file
    with pytest.raises(CorruptImage, match="size"):
        open_bytes(data).open("/etc/data.bin")


def test_indirect_pointer_past_the_volume_and_holes(tmp_path: Path) -> None:
    image = small_image(tmp_path, "mkfs.ext2")
    base = image.read_bytes()
    at = inode_offset(image, "/etc/data.bin")
    data = bytearray(base)
    struct.pack_into("<I", data, at + 0x28 + 13 * 4, 0xFFFFFF00)      # the double-indirect pointer
    with pytest.raises(CorruptImage, match="outside the filesystem"):
        open_bytes(data).read("/etc/data.bin", 1 << 20)
    data = bytearray(base)
    struct.pack_into("<I", data, at + 0x28 + 4, 0)                     # direct block 1 becomes a hole
    got = open_bytes(data).read("/etc/data.bin", 1 << 20)
    want = (tmp_path / "src/etc/data.bin").read_bytes()
    assert got is not None and got[1024:2048] == bytes(1024) and got[:1024] == want[:1024]
    assert got[2048:] == want[2048:]


def test_directory_record_length_zero_and_past_block(tmp_path: Path) -> None:
    image = small_image(tmp_path)
    base = image.read_bytes()
    (block,) = data_blocks(image, "/a")
    for rec_len in (0, 4, 2000, 1023):
        data = bytearray(base)
        struct.pack_into("<H", data, block * 1024 + 12 + 4, rec_len)   # the ".." record's length
        volume = BytesVolume(data, budget=16 * 1024)
        with pytest.raises(CorruptImage, match="record"):
            open_bytes(volume).listdir("/a")
        # The superblock, a group descriptor, the inode and the directory's one block: a few 1 KiB reads.
        assert volume.reads <= 16 and volume.bytes_read <= 16 * 1024, (volume.reads, volume.bytes_read)


def test_directory_loop(tmp_path: Path) -> None:
    """debugfs links /a into /a/b/c as "up": a cycle. Paths through it are bounded by MAX_DEPTH."""
    image = small_image(tmp_path)
    debugfs_w = ["debugfs", "-w", "-R", "ln /a /a/b/c/up", str(image)]
    import subprocess
    subprocess.run(debugfs_w, check=True, capture_output=True)
    assert "up" in debugfs_ls(image, "/a/b/c")
    fs = open_bytes(image.read_bytes())
    assert fs.listdir("/a/b/c/up/b/c/up/b/c") == ["up"]
    with pytest.raises(CorruptImage, match="components"):
        fs.lookup("/a" + "/b/c/up" * (MAX_DEPTH // 3 + 1))
    fs = open_bytes(image.read_bytes())
    # a symlink loop is cut too
    subprocess.run(["debugfs", "-w", "-R", "symlink /loop /loop", str(image)], check=True, capture_output=True)
    fs = open_bytes(image.read_bytes())
    with pytest.raises(CorruptImage, match="symbolic links"):
        fs.read("/loop", 10)


def test_bad_superblock_checksum_and_unknown_feature(tmp_path: Path) -> None:
    image = small_image(tmp_path)
    data = bytearray(image.read_bytes())
    data[1024 + 0x78] ^= 1                          # the label: checksum no longer matches
    info = ext_identify(BytesVolume(data))
    assert info is not None and not info.readable and info.details["superblock_checksum"] == "bad"
    with pytest.raises(CorruptImage, match="checksum"):
        ExtFilesystem(BytesVolume(data), info)
    image2 = small_image(tmp_path, "mkfs.ext2")
    data = bytearray(image2.read_bytes())
    struct.pack_into("<I", data, 1024 + 0x60, struct.unpack_from("<I", data, 1024 + 0x60)[0] | 0x1000)  # dirdata
    info = ext_identify(BytesVolume(data))
    assert info is not None and info.type == "ext4" and not info.readable
    with pytest.raises(UnsupportedImage, match="dirdata"):
        ExtFilesystem(BytesVolume(data), info)
    assert ext_identify(BytesVolume(bytes(8192))) is None


def _regions(image: Path) -> list[tuple[int, int]]:
    """Metadata byte ranges of a 1 KiB-block image, by dumpe2fs/debugfs: superblock, descriptors, the first
    inode table's used part, and the directory, extent and indirect blocks of the tree."""
    stats = debugfs(image, "stats")
    m = re.search(r"Inode table at (\d+)-(\d+)", stats)
    regions = [(1024, 2048), (2048, 3072)]
    if m:
        regions.append((int(m.group(1)) * 1024, int(m.group(1)) * 1024 + 64 * 256))
    for path in ("/", "/etc", "/a", "/a/b", "/usr/lib", "/etc/slow"):
        for block in data_blocks(image, path)[:6]:
            regions.append((block * 1024, block * 1024 + 1024))
    out = debugfs(image, "stat /etc/data.bin")
    for m2 in re.finditer(r"\((?:IND|DIND|ETB\d*)\):(\d+)", out):
        block = int(m2.group(1))
        regions.append((block * 1024, block * 1024 + 1024))
    return regions


@pytest.mark.parametrize("tool,options", [("mkfs.ext4", ("-b", "1024")), ("mkfs.ext2", ("-b", "1024")),
                                          ("mkfs.ext4", ("-b", "1024", "-O", "inline_data,^metadata_csum"))],
                         ids=["ext4", "ext2", "inline"])
def test_mutations_fail_cleanly(tmp_path: Path, tool: str, options: tuple[str, ...]) -> None:
    """300 seeded random mutations of the metadata through identify, every listing and every read: success or
    CorruptImage/UnsupportedImage, each within a read budget of an eighth of the image."""
    image = small_image(tmp_path, tool, options)
    assert re.search(r"Flags: 0x[0-9a-f]*1[0-9a-f]{3}\b", debugfs(image, "stat /a/b")), "/a/b must be an htree"
    base = image.read_bytes()
    regions = _regions(image)
    rng = random.Random(11)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(300):
        buf = bytearray(base)
        mutate(buf, regions, rng)
        volume = BytesVolume(buf, budget=len(buf) // 8)   # an eighth of the image at most, whatever the damage
        try:
            info = ext_identify(volume)
            if info is not None and info.readable:
                fs = ExtFilesystem(volume, info)
                walk(fs, limit=1 << 20)   # sizes are hostile too: read what an inspection would
                fs.read("/etc/os-release", 4096)
                fs.read("/a/b/file123", 4096)     # through the htree
                fs.stat("/a/b/absent")
            outcomes["ok"] += 1
        except (CorruptImage, UnsupportedImage):
            outcomes["refused"] += 1
        assert volume.reads <= len(buf) // 8192, volume.reads   # a read per 1 KiB block of that eighth
    assert outcomes["ok"] and outcomes["refused"], outcomes


def test_not_an_inode_table_fsinfo() -> None:
    info = FsInfo(type="ext4")
    with pytest.raises(CorruptImage):
        ExtFilesystem(BytesVolume(bytes(4096)), info)
