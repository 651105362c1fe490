"""Superblock identification against ``blkid -p`` on volumes the real tools made.

MD RAID superblocks are crafted here because this kernel has no md driver (``/proc/mdstat`` is absent and
``mdadm --create`` fails opening /dev/md127); ``mdadm --examine`` (which reads files) and blkid are the
oracles for them. BitLocker volumes are crafted from libbde's documented layout because no tool on Linux
creates one; blkid is their oracle.
"""

from __future__ import annotations

import random
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from diskport.guest.filesystems import FILESYSTEMS, FsInfo, identify
from tests.guest.support import MiB, blank, blkid, loop_device, patch, view_of
from tests.support.clients import require_tool, run


def probe(path: Path) -> FsInfo | None:
    with view_of(path) as view:
        info = identify(view)
        assert view.stats.bytes_read <= 6 * 64 * 1024, view.stats  # a few blocks per volume, whatever the type
        return info


def assert_like_blkid(info: FsInfo | None, path: Path, *, version: bool = True) -> dict[str, str]:
    oracle = blkid(path)
    assert info is not None, oracle
    assert info.type == oracle["TYPE"]
    assert info.label == oracle.get("LABEL")
    assert info.uuid == oracle.get("UUID")
    if version:
        assert info.version == oracle.get("VERSION")
    return oracle


def test_table_order() -> None:
    names = [spec.name for spec in FILESYSTEMS]
    first = ["crypto_LUKS", "BitLocker", "linux_raid_member", "LVM2_member", "swap"]
    assert names[:5] == first
    assert {"xfs", "btrfs", "exfat", "iso9660"} <= set(names[5:])


def test_xfs(tmp_path: Path) -> None:
    volume = blank(tmp_path / "xfs.raw", 320 * MiB)
    run(require_tool("mkfs.xfs"), "-q", "-L", "xfs-label", volume)
    info = probe(volume)
    assert_like_blkid(info, volume, version=False)
    assert info is not None and info.version == "v5" and info.size == 320 * MiB
    assert info.details["block_size"] == int(run("xfs_db", "-r", "-c", "sb 0", "-c", "p blocksize", volume)
                                              .stdout.split("=")[1])


def test_btrfs(tmp_path: Path) -> None:
    volume = blank(tmp_path / "btrfs.raw", 128 * MiB)
    run(require_tool("mkfs.btrfs"), "-q", "-L", "btrfs label", volume)
    info = probe(volume)
    oracle = assert_like_blkid(info, volume)
    assert info is not None and info.details["uuid_sub"] == oracle["UUID_SUB"] and info.size == 128 * MiB


def test_exfat(tmp_path: Path) -> None:
    volume = blank(tmp_path / "exfat.raw", 64 * MiB)
    run(require_tool("mkfs.exfat"), "-L", "Exfat Lbl", volume)
    info = probe(volume)
    assert_like_blkid(info, volume)
    assert info is not None and info.size == 64 * MiB


def test_exfat_without_label(tmp_path: Path) -> None:
    volume = blank(tmp_path / "exfat.raw", 16 * MiB)
    run(require_tool("mkfs.exfat"), volume)
    assert_like_blkid(probe(volume), volume)


@pytest.mark.parametrize("joliet", [True, False])
def test_iso9660(tmp_path: Path, joliet: bool) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello\n")
    iso = tmp_path / "x.iso"
    run(require_tool("xorriso"), "-as", "mkisofs", "-quiet", *(["-J"] if joliet else []), "-V", "Install Disc 1",
        "-o", iso, tree)
    info = probe(iso)
    assert_like_blkid(info, iso)
    assert info is not None and info.size == iso.stat().st_size


def test_udf(tmp_path: Path) -> None:
    volume = blank(tmp_path / "udf.raw", 32 * MiB)
    run(require_tool("mkudffs"), "--label=udf-label", volume)
    info = probe(volume)
    oracle = assert_like_blkid(info, volume)
    assert info is not None and info.details["volume_id"] == oracle["VOLUME_ID"]


def test_swap(tmp_path: Path) -> None:
    volume = blank(tmp_path / "swap.raw", 16 * MiB)
    run(require_tool("mkswap"), "-L", "swap-label", volume)
    info = probe(volume)
    assert_like_blkid(info, volume)
    assert info is not None and info.size == 16 * MiB


def test_swap_without_label_or_uuid_field(tmp_path: Path) -> None:
    volume = blank(tmp_path / "swap.raw", 8 * MiB)
    run(require_tool("mkswap"), "-U", "clear", volume)
    info = probe(volume)
    assert_like_blkid(info, volume)


def test_hibernation_signature(tmp_path: Path) -> None:
    volume = blank(tmp_path / "swap.raw", 8 * MiB)
    run(require_tool("mkswap"), volume)
    patch(volume, 4096 - 10, b"S1SUSPEND\0")
    info = probe(volume)
    assert info is not None and info.type == blkid(volume)["TYPE"] == "swsuspend"


def test_lvm2_pv(tmp_path: Path) -> None:
    volume = blank(tmp_path / "pv.raw", 32 * MiB)
    require_tool("pvcreate")
    with loop_device(volume) as dev:  # pvcreate wants a block device
        run("pvcreate", "-ff", "-y", dev)
    info = probe(volume)
    assert_like_blkid(info, volume)
    assert info is not None and info.size == 32 * MiB
    # Any change to the label sector breaks LVM's CRC: no longer a PV.
    sector = info.details["label_sector"]
    assert isinstance(sector, int)
    patch(volume, sector * 512 + 100, b"\x01")
    assert probe(volume) is None


@pytest.mark.parametrize("luks", ["luks1", "luks2"])
def test_luks(tmp_path: Path, luks: str) -> None:
    volume = blank(tmp_path / f"{luks}.raw", 32 * MiB)
    key = tmp_path / "key"
    key.write_bytes(random.Random(1).randbytes(32))
    extra = ["--pbkdf", "pbkdf2"] if luks == "luks2" else []
    extra += ["--label", "secret", "--subsystem", "diskport-test"] if luks == "luks2" else []
    run(require_tool("cryptsetup"), "luksFormat", "--type", luks, "--batch-mode", *extra,
        "--pbkdf-force-iterations", "1000", "--key-file", key, volume)
    info = probe(volume)
    oracle = assert_like_blkid(info, volume)
    assert info is not None
    if luks == "luks2":
        assert info.details["subsystem"] == oracle["SUBSYSTEM"] == "diskport-test"
        # The primary header wiped: blkid and diskport both find the secondary at 16 KiB.
        patch(volume, 0, bytes(4096))
        info = probe(volume)
        assert_like_blkid(info, volume)
        assert info is not None and info.details["header"] == "secondary"
    else:
        dump = run("cryptsetup", "luksDump", volume).stdout
        assert f"Cipher name:   \t{info.details['cipher']}" in dump


# ---- MD RAID: crafted superblocks (no md driver in this kernel), mdadm --examine and blkid as oracles -------

MD_MAGIC = 0xA92B4EFC


def _fold(total: int) -> int:
    return ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


@dataclass
class MdArray:
    set_uuid: bytes
    dev_uuid: bytes
    name: str


def md_superblock_1(offset: int, data_offset: int, data_size: int, array: MdArray) -> bytes:
    """An ``mdp_superblock_1`` for member 0 of a two-disk RAID1, with its checksum."""
    sb = bytearray(256 + 2 * 2)
    struct.pack_into("<IIII", sb, 0, MD_MAGIC, 1, 0, 0)
    sb[16:32] = array.set_uuid
    sb[32:64] = array.name.encode().ljust(32, b"\0")
    struct.pack_into("<QiIQIII", sb, 64, 1_700_000_000, 1, 0, data_size, 0, 2, 0)
    struct.pack_into("<QQQQII", sb, 128, data_offset // 512, data_size, offset // 512, 0, 0, 0)
    sb[168:184] = array.dev_uuid
    struct.pack_into("<QQQ", sb, 192, 1_700_000_001, 1, 2**64 - 1)
    struct.pack_into("<I", sb, 220, 2)                 # max_dev
    struct.pack_into("<HH", sb, 256, 0, 1)             # dev_roles
    total = sum(struct.unpack_from(f"<{len(sb) // 4}I", sb))
    struct.pack_into("<I", sb, 216, _fold(total))
    return bytes(sb)


def md_superblock_090(size: int, set_uuid: bytes) -> bytes:
    words = [0] * 1024
    words[0:5] = [MD_MAGIC, 0, 90, 0, 0]
    words[5] = int.from_bytes(set_uuid[0:4], "little")
    words[6], words[7], words[8], words[9], words[10] = 1_700_000_000, 1, size // 1024 - 64, 2, 2
    for i, at in enumerate((4, 8, 12)):
        words[13 + i] = int.from_bytes(set_uuid[at:at + 4], "little")
    words[32], words[33], words[34], words[35] = 1_700_000_001, 1, 2, 2
    words[40] = 1      # events
    words[38] = _fold(sum(words))
    return struct.pack("<1024I", *words)


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2", "0.90"])
def test_md_raid_member(tmp_path: Path, version: str) -> None:
    size = 32 * MiB
    volume = blank(tmp_path / f"md{version}.raw", size)
    rng = random.Random(version)
    array = MdArray(rng.randbytes(16), rng.randbytes(16), "gvhost:7")
    run(require_tool("mkfs.ext4"), "-q", "-F", volume)  # what a RAID1 member's data looks like
    if version == "0.90":
        patch(volume, (size & ~0xFFFF) - 0x10000, md_superblock_090(size, array.set_uuid))
    else:
        offset = {"1.0": ((size // 512 - 16) & ~7) * 512, "1.1": 0, "1.2": 4096}[version]
        data_offset = 0 if version == "1.0" else 2 * MiB
        patch(volume, offset, md_superblock_1(offset, data_offset, (size - 2 * MiB) // 512, array))
    info = probe(volume)
    oracle = blkid(volume)
    assert info is not None and info.type == oracle["TYPE"] == "linux_raid_member"
    if version == "0.90":  # four little-endian 32-bit words, printed as numbers
        words = struct.unpack("<4I", array.set_uuid)
        assert info.uuid == oracle["UUID"] == str(uuid.UUID("".join(f"{w:08x}" for w in words)))
    else:
        assert info.uuid == oracle["UUID"] == str(uuid.UUID(bytes=array.set_uuid))
    assert info.label == oracle.get("LABEL")
    assert info.version is not None and info.version.startswith(oracle["VERSION"])
    examine = run(require_tool("mdadm"), "--examine", volume).stdout
    assert "Raid Level : raid1" in examine and info.details["level"] == "raid1"
    if version != "0.90":
        assert f"Version : {version}" in examine
        assert info.details["uuid_sub"] == oracle["UUID_SUB"]
        # mdadm prints the array UUID as four 32-bit words, in on-disk byte order.
        assert f"Array UUID : {':'.join(array.set_uuid[i:i + 4].hex() for i in range(0, 16, 4))}" in examine
        patch(volume, offset + 100, b"\x55")             # a changed byte breaks the checksum: not a member
        assert probe(volume) is None or probe(volume).type == "ext4"  # type: ignore[union-attr]
    else:
        assert "Version : 0.90.00" in examine and info.details["checksum_ok"] is True


# ---- BitLocker: crafted from the documented header (no Linux tool writes one), blkid as the oracle ---------------

def bitlocker_volume(path: Path, to_go: bool, description: str, volume_guid: uuid.UUID) -> int:
    fve_offset = 0x21000
    boot = bytearray(512)
    if to_go:
        boot[0:11] = b"\xeb\x58\x90MSWIN4.1"
        struct.pack_into("<Q", boot, 440, fve_offset)
    else:
        boot[0:11] = b"\xeb\x58\x90-FVE-FS-"
        struct.pack_into("<HBH", boot, 11, 512, 8, 0)
        struct.pack_into("<Q", boot, 176, fve_offset)
    boot[510:512] = b"\x55\xaa"
    text = description.encode("utf-16-le") + b"\0\0"
    entry = struct.pack("<HHHH", 8 + len(text), 0x0007, 0x0002, 1) + text
    meta_size = 48 + len(entry)
    block = bytearray(64)
    block[0:8] = b"-FVE-FS-"
    struct.pack_into("<HH", block, 8, 64, 2)
    struct.pack_into("<Q", block, 16, 64 * MiB)
    header = struct.pack("<IIII16sIIQ", meta_size, 1, 48, meta_size, volume_guid.bytes_le, 0, 0x8004, 0)
    patch(path, 0, bytes(boot))
    patch(path, fve_offset, bytes(block) + header + entry)
    return fve_offset


@pytest.mark.parametrize("to_go", [False, True])
def test_bitlocker(tmp_path: Path, to_go: bool) -> None:
    volume = blank(tmp_path / "bde.raw", 64 * MiB)
    guid = uuid.UUID("3e6f7a1c-2b4d-4c5e-9f80-1a2b3c4d5e6f")
    bitlocker_volume(volume, to_go, "DESKTOP-1 C: 12/2/2026", guid)
    info = probe(volume)
    oracle = blkid(volume)
    assert info is not None and info.type == oracle["TYPE"] == "BitLocker"
    assert info.version == oracle["VERSION"] == "2"
    assert info.uuid == str(guid) and info.label == "DESKTOP-1 C: 12/2/2026"
    for key, value in (("UUID", info.uuid), ("LABEL", info.label)):  # blkid 2.39+ reports these too
        assert oracle.get(key, value) == value
    assert info.details["variant"] == ("to-go" if to_go else "bitlocker")
    assert info.details["encryption"] == "AES-XTS-128" and info.size == 64 * MiB


def test_plain_fat_with_mswin_oem_is_not_bitlocker(tmp_path: Path) -> None:
    volume = blank(tmp_path / "fat32.raw", 64 * MiB)
    run(require_tool("mkfs.vfat"), "-F", "32", volume)
    patch(volume, 3, b"MSWIN4.1")
    assert blkid(volume)["TYPE"] == "vfat"
    info = probe(volume)
    assert info is None or info.type == "vfat"


# ---- hostile and tiny volumes ---------------------------------------------------------------------------------

class Memory:
    """A Readable over bytes, counting what is read."""

    def __init__(self, data: bytes) -> None:
        self.name, self.size, self.data, self.read = "memory", len(data), data, 0

    def pread(self, offset: int, length: int) -> bytes:
        chunk = self.data[offset:offset + length]
        self.read += len(chunk)
        return chunk


def test_tiny_and_random_volumes_identify_as_nothing() -> None:
    rng = random.Random(11)
    for size in (0, 1, 511, 512, 1023, 4095, 4096, 65535, 65536, 65536 + 4095, 70000, 300_000):
        for data in (bytes(size), rng.randbytes(size)):
            volume = Memory(data)
            assert identify(volume) is None, size
            assert volume.read <= 64 * 1024, (size, volume.read)   # the bound on the work, not a time


def test_hostile_fields_do_not_escape() -> None:
    """Magic numbers in place with every other field garbage: None or an FsInfo, never an exception."""
    rng = random.Random(3)
    magics = [(0, b"XFSB"), (0x10040, b"_BHRfS_M"), (3, b"EXFAT   "), (0x8001, b"CD001"), (4086, b"SWAPSPACE2"),
              (512, b"LABELONE"), (0, b"LUKS\xba\xbe"), (0, b"\xeb\x58\x90-FVE-FS-"), (4096, b"\xfc\x4e\x2b\xa9")]
    for _ in range(40):
        for at, magic in magics:
            data = bytearray(rng.randbytes(0x12000))
            data[at:at + len(magic)] = magic
            data[0x9001:0x9006] = b"NSR02"
            identify(Memory(bytes(data)))


def test_external_iso9660(testdata: Path) -> None:
    """An ISO 9660 image another tool made (dfvfs's test data)."""
    iso = testdata / "iso9660.raw"
    info = probe(iso)
    assert_like_blkid(info, iso)
