"""The NTFS reader against ntfs-3g's own tools (ntfsls, ntfscat, ntfsinfo) and blkid, on volumes mkntfs and
wimlib build in the test, on a volume Windows made, and on hostile mutations of a real volume."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from diskport.errors import CorruptImage, UnsupportedImage
from diskport.formats import open_image
from diskport.guest.filesystems import FILESYSTEMS, identify, open_filesystem
from diskport.guest.filesystems.ntfs import NtfsFilesystem
from diskport.guest.filesystems.ntfs import identify as ntfs_identify
from diskport.guest.view import GuestView
from diskport.sources import open_source
from tests.guest.filesystems.ntfs_images import (
    build_ntfs_volume,
    data_runs,
    ntfscat,
    ntfsls_long,
    ntfsls_names,
    write_fragmented,
)
from tests.support import TESTDATA
from tests.support.clients import require_tool
from tests.support.images import CountingSource, ReadCount

MiB = 1024 * 1024
BIG_DIR_ENTRIES = 3000


def pattern(size: int, seed: int) -> bytes:
    """Patterned bytes that differ at every 4 KiB (so a misplaced run shows)."""
    return b"".join(struct.pack("<QQ", seed, i) * 256 for i in range(-(-size // 4096)))[:size]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ntfs-tree")
    config = root / "Windows" / "System32" / "config"
    config.mkdir(parents=True)
    (config / "SOFTWARE").write_bytes(pattern(24 * MiB, 1))
    (config / "DEFAULT").write_bytes(pattern(5000, 2))
    drivers = root / "Windows" / "System32" / "drivers"
    drivers.mkdir()
    (drivers / "viostor.sys").write_bytes(pattern(150_000, 3))
    (root / "tiny.txt").write_bytes(b"tiny resident file\n")
    (root / "empty").write_bytes(b"")
    (root / "Case").write_bytes(b"upper")
    (root / "case").write_bytes(b"lower")
    (root / "ünïcødé-名前-Ωmega.txt").write_bytes(b"unicode\n")
    with open(root / "sparse.bin", "wb") as f:
        f.write(b"head")
        f.seek(12 * MiB)
        f.write(b"tail")
    many = root / "Many"
    many.mkdir()
    for i in range(BIG_DIR_ENTRIES):
        (many / f"entry-with-a-longish-name-{i:05d}.dat").write_bytes(str(i).encode())
    links = root / "links"
    links.mkdir()
    (links / "target").write_bytes(pattern(9000, 4))
    for i in range(30):  # 30 names of 200 characters do not fit one record: an $ATTRIBUTE_LIST
        os.link(links / "target", links / (f"L{i:02d}-" + "n" * 200))
    return root


@pytest.fixture(scope="module")
def volume(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("ntfs-vol")
    system = work / "SYSTEM"
    system.write_bytes(pattern(12 * MiB, 5))
    return build_ntfs_volume(work / "vol.img", tree, 400 * MiB, label="DiskportTest",
                             fragmented={"/Windows/System32/config/SYSTEM": system})


def open_fs(path: Path) -> Iterator[tuple[NtfsFilesystem, GuestView]]:
    with open_image(path) as img:
        view = GuestView(img)
        info = identify(view)
        assert info is not None and info.type == "ntfs"
        fs = open_filesystem(view, info)
        assert isinstance(fs, NtfsFilesystem)
        yield fs, view


def walk(fs: NtfsFilesystem, path: str = "/", depth: int = 0) -> Iterator[str]:
    for name in fs.listdir(path):
        child = path.rstrip("/") + "/" + name
        yield child
        st = fs.stat(child, follow=False)
        if st is not None and st.kind == "dir" and depth < 8:  # a hostile entry may name an ancestor
            yield from walk(fs, child, depth + 1)


def blkid(path: Path) -> dict[str, str]:
    require_tool("blkid")
    out = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_registered() -> None:
    assert any(spec.name == "ntfs" and spec.open is not None for spec in FILESYSTEMS)


@pytest.mark.parametrize(("cluster", "sector"), [(512, 512), (4096, 512), (65536, 512), (4096, 4096),
                                                 (131072, 512)])
def test_identify_matches_blkid(tmp_path: Path, cluster: int, sector: int) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(pattern(70_000, 9))
    for i in range(400):  # an index in INDX blocks: VCNs count clusters, or 512-byte units when clusters are larger
        (src / "d" / f"name-{i:04d}").write_bytes(b"")
    vol = build_ntfs_volume(tmp_path / "v.img", src, 48 * MiB, cluster_size=cluster, sector_size=sector,
                            label=f"L{cluster}")
    expect = blkid(vol)
    for fs, view in open_fs(vol):
        assert fs.info.uuid == expect["UUID"]
        assert fs.info.label == expect["LABEL"]
        assert fs.info.details["cluster_size"] == cluster
        assert fs.info.details["sector_size"] == sector
        assert fs.info.size is not None and fs.info.size <= view.size and fs.info.size > view.size - 2 * sector
        assert sha(fs.read("/D/F", 1 << 20) or b"") == sha(ntfscat(vol, "/d/f"))
        assert sorted(fs.listdir("/d")) == sorted(ntfsls_names(vol, "/d")) and len(fs.listdir("/d")) == 401
        assert fs.lookup("/d/NAME-0399") is not None and fs.lookup("/d/name-0400") is None


@pytest.mark.slow
def test_listings_sizes_and_contents_match_ntfs3g(volume: Path) -> None:
    require_tool("ntfsls")
    for fs, _ in open_fs(volume):
        assert fs.info.label == "DiskportTest"
        folders = ["/"] + [p for p in walk(fs) if fs.stat(p, follow=False).kind == "dir"]  # type: ignore[union-attr]
        assert "/Many" in folders and "/Windows/System32/config" in folders
        checked = 0
        for folder in folders:
            assert sorted(fs.listdir(folder)) == sorted(ntfsls_names(volume, folder)), folder
            sizes = ntfsls_long(volume, folder)
            for name, size in sizes.items():
                path = folder.rstrip("/") + "/" + name
                st = fs.stat(path, follow=False)
                assert st is not None
                assert st.size == size or st.kind == "dir", path
                if st.kind == "file" and (folder != "/Many" or name.endswith("7.dat")):
                    handle = fs.open(path)
                    assert handle is not None
                    assert sha(handle.pread(0, handle.size)) == sha(ntfscat(volume, path)), path
                    checked += 1
        assert checked > 300


def test_structures_the_tree_exercises(volume: Path) -> None:
    """The volume really has what the other tests rely on: fragments, a deep index, an attribute list."""
    assert data_runs(volume, "/Windows/System32/config/SYSTEM") >= 10
    info = subprocess.run(["ntfsinfo", "-F", "/links/target", str(volume)], capture_output=True, text=True).stdout
    assert "$ATTRIBUTE_LIST" in info
    for fs, _ in open_fs(volume):
        node = fs.lookup("/Many")
        assert node is not None
        inode, root, alloc, block = fs._index(node)
        assert alloc is not None and alloc.size >= 8 * block
        items, depth = fs._root_node(inode, root, "test"), 1
        while children := [e.child for e in items if e.child is not None]:
            items, depth = fs._block(inode, alloc, block, children[0], "test"), depth + 1
        assert depth >= 2


def test_lookups_fold_case_through_upcase(volume: Path) -> None:
    for fs, _ in open_fs(volume):
        assert fs.read("/case", 100) == b"lower" and fs.read("/Case", 100) == b"upper"
        assert fs.read("/CASE", 100) in (b"upper", b"lower")
        assert fs.upcase_source == "$UpCase"
        assert fs.read("/WINDOWS/system32/CONFIG/default", 10) == pattern(10, 2)
        assert fs.read("/ÜNÏCØDÉ-名前-ωMEGA.TXT", 100) == b"unicode\n"
        assert fs.read("/many/ENTRY-WITH-A-LONGISH-NAME-02999.DAT", 100) == b"2999"
        assert fs.lookup("/Many/entry-with-a-longish-name-03000.dat") is None
        assert fs.lookup("/Many/entry-with-a-longish-name-0299") is None
        assert fs.lookup("/$MFT") is not None and "$MFT" not in fs.listdir("/")
        assert fs.read("/tiny.txt", 100) == b"tiny resident file\n"
        assert fs.read("/empty", 100) == b""


def test_sparse_and_hard_links(volume: Path) -> None:
    for fs, _ in open_fs(volume):
        handle = fs.open("/sparse.bin")
        assert handle is not None and handle.size == 12 * MiB + 4
        assert handle.pread(0, 4) == b"head" and handle.pread(12 * MiB, 10) == b"tail"
        assert handle.pread(6 * MiB, 8) == bytes(8)
        names = fs.listdir("/links")
        assert len(names) == 31
        nodes = {fs.lookup("/links/" + n) for n in names}
        assert len({n & 0xFFFFFFFFFFFF for n in nodes if n is not None}) == 1
        assert fs.read("/links/" + names[5], 1 << 20) == pattern(9000, 4)


def test_fragmented_file_read_at_random(volume: Path) -> None:
    want = pattern(12 * MiB, 5)
    for fs, _ in open_fs(volume):
        handle = fs.open("/Windows/System32/config/SYSTEM")
        assert handle is not None and handle.size == len(want)
        rng = random.Random(3)
        for _ in range(200):
            off = rng.randrange(len(want))
            n = rng.randrange(1, 300_000)
            assert handle.pread(off, n) == want[off: off + n]


@pytest.mark.slow
def test_very_fragmented_file_spreads_over_extension_records(tmp_path: Path) -> None:
    """600 runs do not fit one 1 KiB record: ntfs-3g splits $DATA into extents in extension records, listed
    by an $ATTRIBUTE_LIST that is itself non-resident."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    data = tmp_path / "frag"
    data.write_bytes(pattern(600 * 4096 * 2, 7))
    vol = build_ntfs_volume(tmp_path / "v.img", src, 256 * MiB)
    write_fragmented(vol, "/d/frag", data, pieces=600)
    assert data_runs(vol, "/d/frag") >= 300
    info = subprocess.run(["ntfsinfo", "-v", "-F", "/d/frag", str(vol)], capture_output=True, text=True).stdout
    assert "$ATTRIBUTE_LIST" in info
    for fs, _ in open_fs(vol):
        assert sha(fs.read("/d/frag", 1 << 30) or b"") == sha(ntfscat(vol, "/d/frag"))
        node = fs.lookup("/d/frag") or 0
        number = node & 0xFFFFFFFFFFFF
        alist = [a for a in fs._read_record(number).attributes if a.type == 0x20]
        assert len(alist) == 1 and not alist[0].resident  # a non-resident attribute list
        extents = fs._inode(node).find(0x80)
        assert len(extents) >= 2 and any(a.record != number for a in extents)  # $DATA over extension records


def test_symlinks_as_reparse_points(tmp_path: Path) -> None:
    """wimlib stores the tree's symlinks as NTFS symbolic-link reparse points (relative, and absolute as C:)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hi\n")
    (src / "rel").symlink_to("d/f")
    (src / "abs").symlink_to("/d")
    vol = build_ntfs_volume(tmp_path / "v.img", src, 8 * MiB)
    info = subprocess.run(["ntfsinfo", "-F", "/abs", str(vol)], capture_output=True, text=True).stdout
    assert "$REPARSE_POINT" in info
    for fs, _ in open_fs(vol):
        assert fs.stat("/rel", follow=False) is not None and fs.stat("/rel", follow=False).kind == "symlink"  # type: ignore[union-attr]
        assert fs.readlink("/rel") == "d/f" and fs.readlink("/abs") == "/d"
        assert fs.read("/rel", 10) == b"hi\n" and fs.read("/ABS/F", 10) == b"hi\n"


def test_windows_made_volume(tmp_path: Path) -> None:
    require_tool("qemu-img")
    raw = tmp_path / "wv.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(TESTDATA / "windows_volume.qcow2"), str(raw)],
                   check=True)
    expect = blkid(raw)
    for fs, view in open_fs(TESTDATA / "windows_volume.qcow2"):
        assert fs.info.uuid == expect["UUID"] and fs.info.label == expect.get("LABEL")
        paths = list(walk(fs))
        assert "/Windows/System32/config/syslog" in paths
        for path in paths:
            folder, _, name = path.rpartition("/")
            assert name in ntfsls_names(raw, folder or "/")
            if fs.stat(path).kind == "file":  # type: ignore[union-attr]
                assert sha(fs.read(path, 1 << 30) or b"") == sha(ntfscat(raw, path))
        assert view.stats.reads < 20


def test_cost_of_reading_a_deep_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    deep = src / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "big").write_bytes(pattern(50 * MiB, 11))
    vol = build_ntfs_volume(tmp_path / "v.img", src, 80 * MiB)
    for fs, view in open_fs(vol):
        before = (view.stats.bytes_read, view.stats.reads)
        assert fs.read("/a/b/c/big", 4096) == pattern(4096, 11)
        with capsys.disabled():
            print(f"\nopen+identify: {before[0]} bytes in {before[1]} reads; then /a/b/c/big first 4 KiB: "
                  f"{view.stats.bytes_read - before[0]} bytes in {view.stats.reads - before[1]} reads, "
                  f"{fs.records_read} MFT records")
        assert view.stats.bytes_read < 2 * MiB and view.stats.reads < 30


# ---- hostile volumes ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_volume(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    work = tmp_path_factory.mktemp("ntfs-small")
    src = work / "src"
    (src / "dir" / "sub").mkdir(parents=True)
    for i in range(120):
        (src / "dir" / f"file-{i:03d}.txt").write_bytes(pattern(100 + i * 37, i))
    (src / "dir" / "sub" / "big").write_bytes(pattern(300_000, 99))
    vol = build_ntfs_volume(work / "v.img", src, 4 * MiB, cluster_size=1024)
    return vol.read_bytes()


def exercise(path: Path, count: ReadCount | None = None) -> None:
    """Everything inspection does, on a volume that may be hostile (its reads counted in ``count``)."""
    with CountingSource(open_source(path), count) as source, open_image(source) as img:
        view = GuestView(img)
        info = ntfs_identify(view)
        if info is None:
            return
        fs = NtfsFilesystem(view, info)
        for p in walk(fs):
            st = fs.stat(p, follow=False)
            if st is not None and st.kind == "file":
                handle = fs.open(p)
                if handle is not None:
                    handle.pread(0, min(handle.size, 1 << 20))
        fs.lookup("/dir/FILE-077.TXT")
        fs.read("/dir/sub/big", 1 << 20)


def record_offset(image: bytes, number: int) -> int:
    cluster = struct.unpack_from("<H", image, 0x0B)[0] * image[0x0D]
    return struct.unpack_from("<Q", image, 0x30)[0] * cluster + number * 1024


def write(tmp_path: Path, data: bytes | bytearray) -> Path:
    path = tmp_path / "bad.img"
    path.write_bytes(bytes(data))
    return path


def mutate_record(image: bytes, number: int, edit: object) -> bytearray:
    """Undo the fixups of record ``number``, edit it (``edit(buf)``), redo the fixups."""
    out = bytearray(image)
    at = record_offset(image, number)
    rec = out[at: at + 1024]
    usa_off = struct.unpack_from("<H", rec, 4)[0]
    usn = rec[usa_off: usa_off + 2]
    for i in range(2):
        rec[i * 512 + 510: i * 512 + 512] = rec[usa_off + 2 + 2 * i: usa_off + 4 + 2 * i]
    edit(rec)  # type: ignore[operator]
    for i in range(2):
        rec[usa_off + 2 + 2 * i: usa_off + 4 + 2 * i] = rec[i * 512 + 510: i * 512 + 512]
        rec[i * 512 + 510: i * 512 + 512] = usn
    out[at: at + 1024] = rec
    return out


def find_attr(rec: bytearray, atype: int) -> int:
    pos = struct.unpack_from("<H", rec, 0x14)[0]
    while struct.unpack_from("<I", rec, pos)[0] != 0xFFFFFFFF:
        if struct.unpack_from("<I", rec, pos)[0] == atype:
            return pos
        pos += struct.unpack_from("<I", rec, pos + 4)[0]
    raise AssertionError(f"no attribute {atype:#x}")


def record_of(image: bytes, path: Path, name: str) -> int:
    with open_image(path) as img:
        view = GuestView(img)
        info = ntfs_identify(view)
        assert info is not None
        node = NtfsFilesystem(view, info).lookup(name)
        assert node is not None
        return node & 0xFFFFFFFFFFFF


def test_fixup_mismatch_is_corruption(small_volume: bytes, tmp_path: Path) -> None:
    bad = bytearray(small_volume)
    at = record_offset(small_volume, 5)  # the root directory
    bad[at + 510] ^= 0xFF
    with pytest.raises(CorruptImage, match="update-sequence"):
        exercise(write(tmp_path, bad))


def test_attribute_length_past_the_record(small_volume: bytes, tmp_path: Path) -> None:
    def edit(rec: bytearray) -> None:
        struct.pack_into("<I", rec, find_attr(rec, 0x90) + 4, 0x2000)
    with pytest.raises(CorruptImage, match="past the record"):
        exercise(write(tmp_path, mutate_record(small_volume, 5, edit)))


def test_runlist_past_the_volume(small_volume: bytes, tmp_path: Path) -> None:
    good = write(tmp_path, small_volume)
    number = record_of(small_volume, good, "/dir/sub/big")

    def edit(rec: bytearray) -> None:
        pos = find_attr(rec, 0x80)
        runs = pos + struct.unpack_from("<H", rec, pos + 0x20)[0]
        header = rec[runs]
        off_at = runs + 1 + (header & 0x0F)
        size = header >> 4
        rec[off_at: off_at + size] = (1 << (8 * size - 2)).to_bytes(size, "little")  # a far, positive LCN
    with pytest.raises(CorruptImage, match="outside the volume"):
        exercise(write(tmp_path, mutate_record(small_volume, number, edit)))


def test_index_loop(small_volume: bytes, tmp_path: Path) -> None:
    """A sub-node pointer of an INDX block rewritten to the block's own VCN."""
    good = write(tmp_path, small_volume)
    bad = bytearray(small_volume)
    with open_image(good) as img:
        view = GuestView(img)
        info = ntfs_identify(view)
        assert info is not None
        fs = NtfsFilesystem(view, info)
        _, _, alloc, block = fs._index(fs.lookup("/dir") or 0)
        assert alloc is not None
        start = alloc.runs[0].lcn * fs.boot.cluster_size  # type: ignore[attr-defined]
    assert bad[start: start + 4] == b"INDX"  # the INDX block at VCN 0
    blk = bytearray(bad[start: start + block])
    usa_off, usa_count = struct.unpack_from("<HH", blk, 4)
    usn = blk[usa_off: usa_off + 2]
    for i in range(usa_count - 1):
        blk[i * 512 + 510: i * 512 + 512] = blk[usa_off + 2 + 2 * i: usa_off + 4 + 2 * i]
    first, used = struct.unpack_from("<II", blk, 0x18)
    pos = 0x18 + first
    # Turn the node's last entry into one with a sub-node pointing at this very block (VCN of block 0).
    while True:
        length, _, flags = struct.unpack_from("<HHH", blk, pos + 8)
        if flags & 2:
            break
        pos += length
    if not flags & 1:
        # Room for the 8-byte VCN: the last entry grows from 16 to 24 bytes (index_length grows too).
        struct.pack_into("<HHH", blk, pos + 8, 24, 0, 3)
        struct.pack_into("<I", blk, 0x18 + 4, used + 8)
        length = 24
    struct.pack_into("<q", blk, pos + length - 8, struct.unpack_from("<q", blk, 0x10)[0])
    for i in range(usa_count - 1):
        blk[usa_off + 2 + 2 * i: usa_off + 4 + 2 * i] = blk[i * 512 + 510: i * 512 + 512]
        blk[i * 512 + 510: i * 512 + 512] = usn
    bad[start: start + block] = blk
    with pytest.raises(CorruptImage, match=r"loop|reached twice"):
        exercise(write(tmp_path, bad))


def test_attribute_list_naming_an_attribute_list(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "t").write_bytes(b"x" * 3000)
    for i in range(12):
        os.link(src / "t", src / (f"L{i:02d}-" + "n" * 200))
    vol = build_ntfs_volume(tmp_path / "v.img", src, 8 * MiB)
    image = vol.read_bytes()
    number = record_of(image, vol, "/t")

    def edit(rec: bytearray) -> None:
        pos = find_attr(rec, 0x20)
        value = pos + struct.unpack_from("<H", rec, pos + 0x14)[0]
        # the second entry (the first names $STANDARD_INFORMATION in the base record): make it an attribute
        # list held in another record
        second = value + struct.unpack_from("<H", rec, value + 4)[0]
        struct.pack_into("<I", rec, second, 0x20)
        struct.pack_into("<Q", rec, second + 0x10, (number + 1) | (1 << 48))
    with pytest.raises(CorruptImage, match="attribute list"):
        exercise(write(tmp_path, mutate_record(image, number, edit)))


@pytest.mark.slow
def test_random_mutations_fail_cleanly(small_volume: bytes, tmp_path: Path) -> None:
    """Seeded byte mutations of the MFT, the index blocks and the boot sector: success or a diskport error,
    never another exception, and in bounded reads."""
    rng = random.Random(11)
    mft = record_offset(small_volume, 0)
    hot = [(0, 512), (mft, 64 * 1024)]
    indx = [i for i in range(0, len(small_volume), 1024) if small_volume[i: i + 4] == b"INDX"]
    hot += [(i, 4096) for i in indx]
    outcomes = {"ok": 0, "corrupt": 0, "unsupported": 0}
    for _ in range(300):
        bad = bytearray(small_volume)
        for _ in range(rng.randint(1, 8)):
            start, span = rng.choice(hot)
            at = start + rng.randrange(span)
            bad[at] = rng.choice([0, 0xFF, rng.randrange(256), bad[at] ^ (1 << rng.randrange(8))])
        path = write(tmp_path, bad)
        count = ReadCount(budget=len(bad))   # one pass over the volume at most, whatever the damage
        try:
            exercise(path, count)
            outcomes["ok"] += 1
        except CorruptImage:
            outcomes["corrupt"] += 1
        except UnsupportedImage:
            outcomes["unsupported"] += 1
        assert count.reads <= len(bad) // (64 * 1024), count.reads   # the view reads 64 KiB blocks
    assert outcomes["corrupt"] > 50 and outcomes["ok"] > 10, outcomes


def test_runlist_with_an_absurd_length(small_volume: bytes, tmp_path: Path) -> None:
    good = write(tmp_path, small_volume)
    number = record_of(small_volume, good, "/dir/sub/big")

    def edit(rec: bytearray) -> None:
        pos = find_attr(rec, 0x80)
        runs = pos + struct.unpack_from("<H", rec, pos + 0x20)[0]
        size = rec[runs] & 0x0F
        rec[runs + 1: runs + 1 + size] = ((1 << (8 * size - 1)) - 1).to_bytes(size, "little")
    with pytest.raises(CorruptImage, match="exceeds the attribute"):
        exercise(write(tmp_path, mutate_record(small_volume, number, edit)))


@pytest.mark.parametrize(("flag", "word"), [(0x0001, "compressed"), (0x4000, "encrypted")])
def test_compressed_and_encrypted_files_are_named(small_volume: bytes, tmp_path: Path, flag: int,
                                                  word: str) -> None:
    """LZNT1 is not decompressed and EFS not decrypted: opening such a file says so, naming it."""
    good = write(tmp_path, small_volume)
    number = record_of(small_volume, good, "/dir/sub/big")

    def edit(rec: bytearray) -> None:
        pos = find_attr(rec, 0x80)
        struct.pack_into("<H", rec, pos + 0x0C, flag)
    bad = write(tmp_path, mutate_record(small_volume, number, edit))
    with open_image(bad) as img:
        view = GuestView(img)
        info = ntfs_identify(view)
        assert info is not None
        fs = NtfsFilesystem(view, info)
        assert fs.read("/dir/file-001.txt", 1000) == pattern(137, 1)
        with pytest.raises(UnsupportedImage, match=f"big is .*{word}"):
            fs.open("/dir/sub/big")


def test_other_reparse_points_are_not_read(tmp_path: Path) -> None:
    """A reparse point other than a link (here a symlink's tag rewritten to WOF's, as compact-OS files carry):
    kind "other", and its unnamed $DATA is not served as the file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    (src / "wof").symlink_to("f")
    vol = build_ntfs_volume(tmp_path / "v.img", src, 8 * MiB)
    image = vol.read_bytes()
    number = _record_nofollow(vol, "/wof")

    def edit(rec: bytearray) -> None:
        pos = find_attr(rec, 0xC0)
        value = pos + struct.unpack_from("<H", rec, pos + 0x14)[0]
        struct.pack_into("<I", rec, value, 0x80000017)  # IO_REPARSE_TAG_WOF
    bad = write(tmp_path, mutate_record(image, number, edit))
    with open_image(bad) as img:
        view = GuestView(img)
        info = ntfs_identify(view)
        assert info is not None
        fs = NtfsFilesystem(view, info)
        assert fs.stat("/wof") == fs.stat("/wof", follow=False) and fs.stat("/wof").kind == "other"  # type: ignore[union-attr]
        assert fs.open("/wof") is None and fs.read("/f", 10) == b"data"


def _record_nofollow(vol: Path, path: str) -> int:
    with open_image(vol) as img:
        view = GuestView(img)
        info = ntfs_identify(view)
        assert info is not None
        node = NtfsFilesystem(view, info).lookup(path, follow=False)
        assert node is not None
        return node & 0xFFFFFFFFFFFF


def test_missing_upcase_falls_back_to_casefold(small_volume: bytes, tmp_path: Path) -> None:
    def edit(rec: bytearray) -> None:
        struct.pack_into("<H", rec, 0x16, 0)  # $UpCase's record no longer in use
    bad = write(tmp_path, mutate_record(small_volume, 10, edit))
    with open_image(bad) as img:
        view = GuestView(img)
        info = ntfs_identify(view)
        assert info is not None
        fs = NtfsFilesystem(view, info)
        assert fs.read("/DIR/File-005.TXT", 1000) == pattern(100 + 5 * 37, 5)
        assert fs.upcase_source.startswith("casefold") and fs.info.details["upcase"] == fs.upcase_source


def test_dos_names_are_not_listed(small_volume: bytes, tmp_path: Path) -> None:
    """An index entry in the DOS namespace (here an entry's namespace byte set to 2) is left out of listings, as
    ntfsls leaves it out, and is still found by a lookup, as Windows finds 8.3 names."""
    bad = bytearray(small_volume)
    needle = "file-010.txt".encode("utf-16-le")
    hits = []
    start = 0
    while (at := bytes(bad).find(needle, start)) >= 0:
        base = at - at % 1024
        if any(bad[base - k * 1024: base - k * 1024 + 4] == b"INDX" for k in range(4)):  # 4 KiB INDX blocks
            hits.append(at)
        start = at + 1
    assert hits, "the INDX entry of file-010.txt"
    at = hits[0]
    assert bad[at - 2] == len("file-010.txt")
    bad[at - 1] = 2
    path = write(tmp_path, bad)
    names = ntfsls_names(path, "/dir")
    assert "file-010.txt" not in names and "file-011.txt" in names
    with open_image(path) as img:
        view = GuestView(img)
        info = ntfs_identify(view)
        assert info is not None
        fs = NtfsFilesystem(view, info)
        assert sorted(fs.listdir("/dir")) == sorted(names)
        assert fs.read("/dir/FILE-010.TXT", 1000) == pattern(100 + 10 * 37, 10)
