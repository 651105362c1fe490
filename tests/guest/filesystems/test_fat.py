"""FAT12/16/32: images from mkfs.vfat and mtools, read back and compared with mtools and blkid."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from diskport.errors import CorruptImage, UnsupportedImage
from diskport.formats import open_image
from diskport.guest.filesystems import FILESYSTEMS, identify, open_filesystem
from diskport.guest.filesystems.base import Filesystem, FsInfo
from diskport.guest.filesystems.fat import FatFilesystem, lfn_checksum
from diskport.guest.filesystems.fat import identify as fat_identify
from diskport.guest.view import GuestView
from tests.guest.filesystems.images import BytesVolume, blkid, fat_tree, mdir_paths, mkfs_fat, mtools, run, sha256
from tests.support.images import mutate

# (bits, size in KiB, sectors per cluster): FAT12 floppy-like, FAT16 with 2 KiB clusters, FAT32 at its minimum
LAYOUTS = [(12, 4000, 4), (16, 40000, 4), (32, 70000, 1)]


def walk(fs: Filesystem[object], path: str = "/", out: dict[str, str] | None = None) -> dict[str, str]:
    """``path -> "dir" or sha256`` of everything under ``path``."""
    out = {} if out is None else out
    for name in fs.listdir(path):
        child = path.rstrip("/") + "/" + name
        st = fs.stat(child)
        assert st is not None, child
        if st.kind == "dir":
            out[child] = "dir"
            walk(fs, child, out)
        else:
            data = fs.read(child, 1 << 30)
            assert data is not None and len(data) == st.size
            out[child] = sha256(data)
    return out


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"FAT{p[0]}")
def fat_image(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    bits, size, spc = request.param
    tmp = tmp_path_factory.mktemp(f"fat{bits}")
    image = mkfs_fat(tmp / f"fat{bits}.img", bits, size, label=f"ESP{bits}", sectors_per_cluster=spc)
    files = fat_tree(image, tmp / "work", seed=bits)
    return image, files


def test_identify_matches_blkid(fat_image: tuple[Path, dict[str, bytes]]) -> None:
    image, _ = fat_image
    oracle = blkid(image)
    with open_image(image) as img:
        info = identify(GuestView(img))
    assert info is not None
    assert (info.type, info.version, info.uuid, info.label) == (oracle["TYPE"], oracle["VERSION"], oracle["UUID"],
                                                                oracle["LABEL"])
    assert info.size == image.stat().st_size
    assert info.readable


def test_tree_and_bytes_match_mtools(fat_image: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    image, written = fat_image
    dump = tmp_path / "dump"
    dump.mkdir()
    run("mcopy", "-s", "-n", "-i", image, "::/", dump, env={"LC_ALL": "C.UTF-8", "MTOOLS_SKIP_CHECK": "1"})
    oracle = {}
    for path in sorted(dump.rglob("*")):
        rel = "/" + str(path.relative_to(dump))
        oracle[rel] = "dir" if path.is_dir() else sha256(path.read_bytes())
    with open_image(image) as img:
        view = GuestView(img)
        fs = open_filesystem(view, identify(view))  # type: ignore[arg-type]
        assert isinstance(fs, FatFilesystem)
        ours = walk(fs)
    assert set(ours) == mdir_paths(image)
    assert ours == oracle
    for path, data in written.items():   # and what was written, byte for byte
        assert ours[path] == sha256(data)


def test_fragmented_file_and_many_clusters(fat_image: tuple[Path, dict[str, bytes]]) -> None:
    image, written = fat_image
    runs = mtools("mshowfat", image, "::/fragmented.bin").count("<")
    assert runs > 1, "the test image must hold a fragmented file"
    with open_image(image) as img:
        view = GuestView(img)
        fs = open_filesystem(view, identify(view))  # type: ignore[arg-type]
        assert fs is not None
        handle = fs.open("/big.bin")
        assert handle is not None
        data = written["/big.bin"]
        rng = random.Random(5)
        for _ in range(200):   # random reads, backwards and forwards, across cluster boundaries
            at = rng.randrange(len(data))
            n = rng.randrange(1, 9000)
            assert handle.pread(at, n) == data[at: at + n]
        frag = fs.open("/fragmented.bin")
        assert frag is not None and frag.pread(0, 1 << 20) == written["/fragmented.bin"]


def test_case_insensitive_and_short_names(fat_image: tuple[Path, dict[str, bytes]]) -> None:
    image, written = fat_image
    with open_image(image) as img:
        view = GuestView(img)
        fs = open_filesystem(view, identify(view))  # type: ignore[arg-type]
        assert fs is not None and fs.case_insensitive
        assert fs.read("/efi/boot/bootx64.efi", 1 << 20) == written["/EFI/BOOT/BOOTX64.EFI"]
        assert fs.read("\\EFI\\BOOT\\BOOTX64.EFI".replace("\\", "/"), 2) == b"MZ"
        # mdir's short name for the long folder name reaches it too
        short = next(line.split()[0] for line in mtools("mdir", image, "::/").splitlines()
                     if line.endswith("Mixed Case Folder"))
        assert fs.listdir("/" + short) == ["A Long File Name With Spaces.TxT"]
        names = fs.listdir("/")
        assert "lower.txt" in names and "UPPER.TXT" in names and "MiXeD.tXt" in names
        assert fs.stat("/no such file") is None


def test_external_label_only_in_root(tmp_path: Path) -> None:
    """A label written only as the root directory's entry (mlabel keeps both in step, so patch the boot
    sector's back to NO NAME): blkid and diskport both take the root entry."""
    image = mkfs_fat(tmp_path / "l.img", 16, 20000, label="ROOTLBL")
    data = bytearray(image.read_bytes())
    data[0x2B:0x36] = b"NO NAME    "
    image.write_bytes(data)
    assert blkid(image)["LABEL"] == "ROOTLBL"
    info = fat_identify(BytesVolume(data))
    assert info is not None and info.label == "ROOTLBL"


def test_lfn_checksum_against_mtools(tmp_path: Path) -> None:
    """An LFN whose checksum no longer matches its short entry is ignored: the 8.3 name is listed."""
    image = mkfs_fat(tmp_path / "c.img", 12, 2000)
    src = tmp_path / "x"
    src.write_bytes(b"x")
    mtools("mcopy", image, str(src), "::/A rather long name.txt")
    data = bytearray(image.read_bytes())
    fs = FatFilesystem(BytesVolume(data), FsInfo(type="vfat"))
    assert fs.listdir("/") == ["A rather long name.txt"]
    root = fs.bpb.root_offset
    slots = [bytes(data[root + at: root + at + 32]) for at in range(0, 32 * 8, 32)]
    short = next(s for s in slots if s[0] not in (0, 0xE5) and s[11] not in (0x0F, 0x08))
    assert {s[13] for s in slots if s[11] == 0x0F} == {lfn_checksum(short[:11])}   # mtools' checksum is ours
    for slot in range(0, fs.bpb.root_size, 32):
        entry = data[root + slot: root + slot + 32]
        if entry[11] == 0x0F:
            data[root + slot + 13] ^= 0xFF
    fs = FatFilesystem(BytesVolume(data), FsInfo(type="vfat"))
    (name,) = fs.listdir("/")
    assert name.upper() == name and name.startswith("ARATHE")   # the 8.3 alias mtools made


def _chain_start(fs: FatFilesystem, name: str) -> int:
    node = fs.lookup(name)
    assert node is not None
    return node.cluster


def test_chain_loop_refused(tmp_path: Path) -> None:
    image = mkfs_fat(tmp_path / "loop.img", 16, 20000, sectors_per_cluster=1)
    src = tmp_path / "f"
    src.write_bytes(bytes(range(256)) * 40)    # 20 clusters
    mtools("mcopy", image, str(src), "::/file.bin")
    data = bytearray(image.read_bytes())
    fs = FatFilesystem(BytesVolume(data), FsInfo(type="vfat"))
    first = _chain_start(fs, "/file.bin")
    fat = fs.fat_offset
    struct.pack_into("<H", data, fat + (first + 3) * 2, first + 1)   # cluster first+3 -> first+1: a loop
    fs = FatFilesystem(BytesVolume(data), FsInfo(type="vfat"))
    with pytest.raises(CorruptImage, match="loop"):
        fs.read("/file.bin", 1 << 20)
    struct.pack_into("<H", data, fat + (first + 3) * 2, 0)            # a free cluster inside the chain
    fs = FatFilesystem(BytesVolume(data), FsInfo(type="vfat"))
    with pytest.raises(CorruptImage, match="free cluster"):
        fs.read("/file.bin", 1 << 20)
    struct.pack_into("<H", data, fat + (first + 3) * 2, 0xFFF0)       # a cluster number past the volume
    fs = FatFilesystem(BytesVolume(data), FsInfo(type="vfat"))
    with pytest.raises(CorruptImage):
        fs.read("/file.bin", 1 << 20)


def test_directory_chain_loop_refused(tmp_path: Path) -> None:
    """A directory whose last cluster points back at its first: cut at the spec's 65,536 entries at most."""
    image = mkfs_fat(tmp_path / "dloop.img", 32, 70000, sectors_per_cluster=1)
    mtools("mmd", image, "::/d")
    data = bytearray(image.read_bytes())
    fs = FatFilesystem(BytesVolume(data), FsInfo(type="vfat"))
    first = _chain_start(fs, "/d")
    # fill the cluster after . and .. with deleted entries (no end mark) and point the cluster at itself
    at = fs._cluster_offset(first)
    data[at + 64: at + fs.bpb.cluster_size] = b"\xe5" * (fs.bpb.cluster_size - 64)
    struct.pack_into("<I", data, fs.fat_offset + first * 4, first)
    volume = BytesVolume(data)
    fs = FatFilesystem(volume, FsInfo(type="vfat"))
    with pytest.raises(CorruptImage, match="loop"):
        fs.listdir("/d")
    # The boot sector, a FAT chunk and the directory's one cluster: not the 4096 clusters of the spec's limit.
    assert volume.reads <= 8, volume.reads


def test_not_fat(tmp_path: Path) -> None:
    assert fat_identify(BytesVolume(bytes(4096))) is None
    ntfs = bytearray(512)
    ntfs[0:11] = b"\xebR\x90NTFS    "
    struct.pack_into("<HB", ntfs, 0x0B, 512, 8)
    assert fat_identify(BytesVolume(ntfs)) is None


def test_spec_registered() -> None:
    assert any(spec.name == "vfat" and spec.open is not None for spec in FILESYSTEMS)


def test_mutations_fail_cleanly(tmp_path: Path) -> None:
    """300 seeded random mutations of each FAT type's metadata (boot sector, FATs, root, directories) through
    identify, listing and reading: success or CorruptImage/UnsupportedImage, in bounded reads."""
    for bits, size, spc in LAYOUTS:
        image = mkfs_fat(tmp_path / f"m{bits}.img", bits, size, sectors_per_cluster=spc)
        small = tmp_path / "s.bin"
        small.write_bytes(bytes(range(256)) * 30)
        mtools("mmd", image, "::/Sub Dir", "::/Sub Dir/Deeper")
        mtools("mcopy", image, str(small), "::/Sub Dir/Deeper/A file.bin")
        mtools("mcopy", image, str(small), "::/second.bin")
        base = image.read_bytes()
        fs = FatFilesystem(BytesVolume(base), FsInfo(type="vfat"))
        data_end = fs.bpb.data_offset + 64 * fs.bpb.cluster_size    # the first clusters hold the directories
        regions = [(0, 512), (fs.bpb.reserved * fs.bpb.bytes_per_sector, fs.bpb.data_offset), (fs.bpb.data_offset,
                                                                                              data_end)]
        rng = random.Random(bits)
        outcomes = {"ok": 0, "refused": 0}
        for _ in range(300):
            buf = bytearray(base[:data_end])
            mutate(buf, regions, rng)
            volume = BytesVolume(buf, base, budget=data_end)   # one pass over the metadata and directories at most
            try:
                info = fat_identify(volume)
                if info is not None:
                    walk(FatFilesystem(volume, info))
                outcomes["ok"] += 1
            except (CorruptImage, UnsupportedImage):
                outcomes["refused"] += 1
            assert volume.reads <= data_end // 512, volume.reads   # a read per sector of them at most
        assert outcomes["ok"] and outcomes["refused"], outcomes
