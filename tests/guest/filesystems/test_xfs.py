"""The XFS reader against images made by ``mkfs.xfs -p`` (v5 and v4, 4 KiB and 1 KiB blocks, 8 KiB directory
blocks), with ``xfs_db -r`` and the source tree as oracles; a B-tree file fork made through a loop mount;
hostile mutations refused in bounded time."""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import google_crc32c
import pytest

from diskport.errors import CorruptImage
from diskport.formats import open_image
from diskport.guest.filesystems import FILESYSTEMS, Filesystem, identify, open_filesystem
from diskport.guest.filesystems.base import MAX_DEPTH
from diskport.guest.filesystems.xfs import XfsFilesystem
from diskport.guest.view import GuestView
from tests.guest.filesystems.images import blkid, sha256, tree_of, walk
from tests.guest.filesystems.xfs_images import (
    bmap_offsets,
    fork_format,
    fsblock_byte,
    inode_byte,
    inode_number,
    mkfs_xfs,
    xfs_db,
    xfs_ls,
)
from tests.guest.support import patch, read
from tests.support.clients import require_tool, run

MiB = 1024 * 1024
VARIANTS = {
    "v5": (),
    "v4": ("-m", "crc=0"),
    "v4-no-ftype": ("-m", "crc=0", "-n", "ftype=0"),
    "v5-1k-blocks": ("-b", "size=1024"),
    "v5-8k-dirblocks": ("-n", "size=8192"),
}
#: Directories made to take each form at 4 KiB blocks: entries in the inode, one block, leaf, node.
FORMS = {"/d/sf": 3, "/d/block": 30, "/d/leaf": 200, "/d/node": 3000}


def make_tree(root: Path) -> Path:
    rng = random.Random(11)
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/os-release").write_text('NAME="Rocky Linux"\nVERSION_ID="9.3"\nID="rocky"\n'
                                             'PRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"\n')
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "etc/hostname").write_text("rocky\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "boot").mkdir()
    (root / "boot/vmlinuz-5.14.0-362.el9.x86_64").write_bytes(rng.randbytes(3 * MiB + 123))
    for path, count in FORMS.items():
        folder = root / path.lstrip("/")
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"entry-{i:05d}-{'n' * (i % 30)}").write_text(f"{i}\n")
    deep = root
    for level in range(10):
        deep = deep / f"level{level}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("deep\n")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("xfstree") / "root")


@pytest.fixture(scope="module", params=list(VARIANTS))
def xfs_image(request: pytest.FixtureRequest, tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mkfs_xfs(tmp_path_factory.mktemp(request.param) / "fs.img", tree, VARIANTS[request.param])


def open_fs(image: Path) -> tuple[GuestView, Filesystem[object]]:
    view = GuestView(open_image(os.fspath(image)))
    info = identify(view)
    assert info is not None and info.type == "xfs"
    fs = open_filesystem(view, info)
    assert isinstance(fs, XfsFilesystem)
    return view, fs


def dir_form(image: Path, path: str) -> str:
    if fork_format(image, path) == "local":
        return "sf"
    block = int(xfs_db(image, "sb 0", "p blocksize").split("=")[1])
    offsets = bmap_offsets(image, path)
    if any(o >= (64 << 30) // block for o in offsets):
        return "node"
    return "leaf" if any(o >= (32 << 30) // block for o in offsets) else "block"


def test_identify_matches_blkid_and_xfs_db(xfs_image: Path) -> None:
    oracle = blkid(xfs_image)
    view, fs = open_fs(xfs_image)
    assert (fs.info.type, fs.info.uuid) == (oracle["TYPE"], oracle["UUID"])
    dblocks = int(xfs_db(xfs_image, "sb 0", "p dblocks").split("=")[1])
    block = int(xfs_db(xfs_image, "sb 0", "p blocksize").split("=")[1])
    assert fs.info.size == dblocks * block and fs.info.details["block_size"] == block
    assert fs.info.version == ("v4" if "crc=0" in VARIANTS[xfs_image.parent.name[:-1]] else "v5")
    assert fs.info.details["ftype"] == ("ftype=0" not in VARIANTS[xfs_image.parent.name[:-1]])
    assert fs.info.readable
    view.image.close()


def test_tree_matches_the_source(xfs_image: Path, tree: Path) -> None:
    view, fs = open_fs(xfs_image)
    assert walk(fs) == tree_of(tree)
    view.image.close()


def test_listings_match_xfs_db_in_order(xfs_image: Path) -> None:
    view, fs = open_fs(xfs_image)
    for path in ("/", "/etc", *FORMS):
        oracle = xfs_ls(xfs_image, path)
        assert [(n.ino, name) for name, n in fs.entries(fs.lookup(path))] == oracle, path  # type: ignore[arg-type, attr-defined]
    view.image.close()


def test_every_directory_form_is_exercised(xfs_image: Path) -> None:
    forms = {path: dir_form(xfs_image, path) for path in FORMS}
    if "1k" in xfs_image.parent.name or "8k" in xfs_image.parent.name:
        assert forms["/d/sf"] == "sf" and "node" in forms.values(), forms
    else:
        assert forms == {"/d/sf": "sf", "/d/block": "block", "/d/leaf": "leaf", "/d/node": "node"}
        assert fork_format(xfs_image, "/d/node") == "btree"      # the node directory's own fork is a B-tree
    view, fs = open_fs(xfs_image)
    assert fork_format(xfs_image, "/etc/os-release") == "local"
    for path, count in FORMS.items():
        assert fs.read(f"{path}/entry-{count - 1:05d}-{'n' * ((count - 1) % 30)}", 100) == f"{count - 1}\n".encode()
    view.image.close()


def test_os_release_through_the_symlink_reads_little(xfs_image: Path) -> None:
    view, fs = open_fs(xfs_image)
    data = fs.read("/etc/os-release", 4096)
    assert data is not None and b'ID="rocky"' in data
    assert view.stats.reads <= 12, view.stats
    view.image.close()


def test_btree_file_fork_through_a_loop_mount(tree: Path, tmp_path: Path) -> None:
    """mkfs copies files contiguously; a sparse file written through the kernel (every other block) has
    hundreds of extents, more than the inode holds, so its fork becomes a B-tree."""
    image = mkfs_xfs(tmp_path / "fs.img", tree)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run(require_tool("mount"), "-o", "loop", image, mnt)
    long_target = "/usr/lib/" + "/".join(["x" * 60] * 8) + "/target"   # 500 bytes: remote blocks
    rng = random.Random(5)
    chunks = {i: rng.randbytes(4096) for i in range(0, 1600, 2)}
    try:
        with open(mnt / "frag.bin", "wb") as f:
            for i, data in chunks.items():
                f.seek(i * 4096)
                f.write(data)
            f.truncate(1601 * 4096)
        os.symlink(long_target, mnt / "remote-link")
    finally:
        run("umount", mnt)
    assert fork_format(image, "/frag.bin") == "btree"
    assert len(bmap_offsets(image, "/frag.bin", written=True)) == len(chunks)
    view, fs = open_fs(image)
    handle = fs.open("/frag.bin")
    assert handle is not None and handle.size == 1601 * 4096
    want = b"".join(chunks.get(i, bytes(4096)) for i in range(1601))
    assert sha256(handle.pread(0, handle.size)) == sha256(want)
    assert handle.pread(8191, 2) == want[8191:8193]
    assert fork_format(image, "/remote-link") == "extents"
    assert fs.readlink("/remote-link") == long_target
    assert fs.read("/etc/hostname", 100) == b"rocky\n"
    view.image.close()


@pytest.mark.parametrize("options", [(), ("-m", "crc=0")], ids=["v5", "v4"])
def test_remote_symlink_written_by_mkfs(tmp_path: Path, options: tuple[str, ...]) -> None:
    """mkfs.xfs 6.1's protofile code writes a remote symlink's target without the v5 block header (xfs_repair
    then junks the entry): on v5 the reader refuses that block, as the kernel's verifier does; v4 has no
    header and reads."""
    tree = tmp_path / "tree"
    tree.mkdir()
    target = "/usr/lib/" + "/".join(["y" * 60] * 8) + "/target"
    (tree / "link").symlink_to(target)
    image = mkfs_xfs(tmp_path / "fs.img", tree, options)
    assert fork_format(image, "/link") == "extents"
    repair = run(require_tool("xfs_repair"), "-n", image, check=False)
    _, fs = open_fs(image)
    if options:
        assert repair.returncode == 0 and fs.readlink("/link") == target
    else:
        assert "would junk entry" in repair.stdout + repair.stderr
        with pytest.raises(CorruptImage, match="symbolic link"):
            fs.readlink("/link")


def test_spec_registered() -> None:
    spec = next(s for s in FILESYSTEMS if s.name == "xfs")
    assert spec.open is not None and spec.reads("xfs")


# ---- hostile images ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mkfs_xfs(tmp_path_factory.mktemp("small") / "fs.img", tree)


def copy(image: Path, tmp: Path) -> Path:
    out = tmp / "hostile.img"
    subprocess.run(["cp", "--sparse=always", image, out], check=True)
    return out


def reseal_inode(image: Path, ino: int) -> None:
    at = inode_byte(image, ino)
    raw = bytearray(read(image, at, 512))
    struct.pack_into("<I", raw, 100, 0)
    struct.pack_into("<I", raw, 100, google_crc32c.value(bytes(raw)))
    patch(image, at, bytes(raw))


def test_extent_beyond_the_filesystem(small: Path, tmp_path: Path) -> None:
    image = copy(small, tmp_path)
    ino = inode_number(image, "/etc/hostname")
    at = inode_byte(image, ino) + 176
    hi, lo = struct.unpack(">QQ", read(image, at, 16))
    patch(image, at, struct.pack(">QQ", hi | 0x1FF, lo))   # the start block's top bits: AG 2^20 and more
    reseal_inode(image, ino)
    _, fs = open_fs(image)
    with pytest.raises(CorruptImage, match="outside the filesystem"):
        fs.read("/etc/hostname", 100)


def test_huge_extent_count(small: Path, tmp_path: Path) -> None:
    image = copy(small, tmp_path)
    for path, match in (("/etc/hostname", "more than its fork holds"), ("/d/node", "extents")):
        ino = inode_number(image, path)
        patch(image, inode_byte(image, ino) + 76, struct.pack(">I", 0xFFFFFFFF))
        reseal_inode(image, ino)
        _, fs = open_fs(image)
        with pytest.raises(CorruptImage, match=match):
            fs.read(path, 100) if path == "/etc/hostname" else fs.listdir(path)


def test_bad_checksums_are_refused(small: Path, tmp_path: Path) -> None:
    image = copy(small, tmp_path)
    ino = inode_number(image, "/d/block")
    patch(image, inode_byte(image, ino) + 60, b"\x7f")     # di_size changed, CRC left as it was
    _, fs = open_fs(image)
    with pytest.raises(CorruptImage, match=f"inode {ino}'s checksum"):
        fs.listdir("/d/block")
    image = copy(small, tmp_path)
    out = xfs_db(image, "path /d/block", "bmap")
    fsblock = int(out.split("startblock ")[1].split()[0])
    patch(image, fsblock_byte(image, fsblock) + 200, b"\xee")
    _, fs = open_fs(image)
    with pytest.raises(CorruptImage, match="checksum"):
        fs.listdir("/d/block")


def test_directory_loop_is_bounded(small: Path, tmp_path: Path) -> None:
    """The short-form /d/sf's last entry is pointed at /d itself: a cycle; walks and lookups stay bounded."""
    image = copy(small, tmp_path)
    ino = inode_number(image, "/d/sf")
    parent = inode_number(image, "/d")
    assert parent < 1 << 32
    at = inode_byte(image, ino) + 176
    fork = bytearray(read(image, at, 336))
    count, i8 = fork[0], fork[1]
    assert i8 == 0
    pos = 6
    for _ in range(count):
        pos += 3 + fork[pos] + 1 + 4
    struct.pack_into(">I", fork, pos - 4, parent)
    patch(image, at, bytes(fork))
    reseal_inode(image, ino)
    _, fs = open_fs(image)
    last = f"entry-00002-{'n' * 2}"
    assert fs.listdir(f"/d/sf/{last}/sf/{last}") == [name for _, name in xfs_ls(image, "/d")]
    with pytest.raises(CorruptImage, match="components"):
        fs.lookup("/d" + f"/sf/{last}" * (MAX_DEPTH // 2 + 1))
    assert "/d/sf" in walk(fs, "/d")


def test_garbage_superblock_fields_are_not_read(small: Path, tmp_path: Path) -> None:
    image = copy(small, tmp_path)
    patch(image, 104, struct.pack(">H", 4096))   # inode size: CRC is now wrong too
    view = GuestView(open_image(os.fspath(image)))
    info = identify(view)
    assert info is not None and not info.readable and info.details["superblock_checksum"] == "bad"
    shutil.rmtree(tmp_path, ignore_errors=True)


class Overlay:
    """A Readable: ``base`` with a few bytes replaced (mutating a 300 MB image without copying it)."""

    def __init__(self, base: GuestView, patches: dict[int, int]) -> None:
        self.base, self.patches = base, patches
        self.name, self.size = "mutated", base.size

    def pread(self, offset: int, length: int) -> bytes:
        data = bytearray(self.base.pread(offset, length))
        for at, value in self.patches.items():
            if offset <= at < offset + len(data):
                data[at - offset] = value
        return bytes(data)


@pytest.mark.parametrize("options", [("-m", "crc=0"), ()], ids=["v4", "v5"])
def test_mutations_fail_cleanly(tmp_path: Path, options: tuple[str, ...]) -> None:
    """150 seeded random byte mutations of inodes and directory blocks, through identify, a walk of every file
    and lookups: each ends in success or CorruptImage/UnsupportedImage (never another exception)."""
    tree = tmp_path / "tree"
    for path, count in {"sf": 3, "block": 30, "leaf": 200, "node": 600}.items():
        (tree / path).mkdir(parents=True)
        for i in range(count):
            (tree / path / f"f{i}-{'n' * (i % 20)}").write_text(str(i))
    (tree / "link").symlink_to("sf/f0-")
    image = mkfs_xfs(tmp_path / "fs.img", tree, options)
    regions = []
    root_ino = int(xfs_db(image, "sb 0", "p rootino").split("=")[1])
    inode_size = 256 if options else 512
    for path in ("/", "/sf", "/block", "/leaf", "/node", "/link", "/sf/f0-"):
        ino = root_ino if path == "/" else inode_number(image, path)
        regions.append((inode_byte(image, ino), inode_size))
    for path in ("/block", "/leaf", "/node"):
        out = xfs_db(image, f"path {path}", "bmap")
        for fsblock in [int(x) for x in re.findall(r"startblock (\d+)", out)][:4]:
            regions.append((fsblock_byte(image, fsblock), 4096))
    base = GuestView(open_image(os.fspath(image)))
    rng = random.Random(17)
    outcomes = {"ok": 0, "refused": 0}
    from diskport.errors import UnsupportedImage
    from diskport.guest.filesystems.xfs import identify as xfs_identify

    for _ in range(150):
        patches = {}
        for _ in range(rng.randint(1, 4)):
            start, length = rng.choice(regions)
            patches[start + rng.randrange(length)] = rng.randrange(256)
        volume = Overlay(base, patches)
        try:
            info = xfs_identify(volume)
            if info is not None and info.readable:
                fs = XfsFilesystem(volume, info)
                walk(fs, limit=1 << 16)
                fs.read("/link", 100)
                fs.stat("/node/absent")
            outcomes["ok"] += 1
        except (CorruptImage, UnsupportedImage):
            outcomes["refused"] += 1
    assert outcomes["ok"] and outcomes["refused"], outcomes
