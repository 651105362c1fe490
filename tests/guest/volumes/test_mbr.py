"""MBR tables read by diskport against sfdisk's own reading of disks sfdisk wrote, plus hostile EBR chains."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from diskport.guest.volumes import PartitionTable, read_volumes
from diskport.guest.volumes.mbr import boot_code_kind
from tests.guest.support import (
    MiB,
    blank,
    convert,
    count_preads,
    loop_device,
    mbr_entry,
    mbr_sector,
    patch,
    sfdisk,
    sfdisk_json,
    view_of,
)
from tests.support.clients import require_tool, run

# Three primaries (the first active), an extended partition in slot 4, three logical partitions in it.
SCRIPT = """label: dos
label-id: 0x1234abcd
2048,8M,83,*
,8M,7
,4M,c
,40M,5
,4M,83
,4M,82
,4M,8e
"""


def table_of(path: Path, fmt: str | None = None) -> PartitionTable:
    with view_of(path, fmt) as view:
        return read_volumes(view)


@pytest.fixture
def mbr_disk(tmp_path: Path) -> Path:
    disk = blank(tmp_path / "mbr.raw", 64 * MiB)
    sfdisk(disk, SCRIPT)
    return disk


def assert_matches_sfdisk(table: PartitionTable, oracle: dict[str, object]) -> None:
    rows = oracle["partitions"]
    assert isinstance(rows, list)
    assert [p.number for p in table.partitions] == [int(re.search(r"(\d+)$", r["node"])[1]) for r in rows]
    for part, row in zip(table.partitions, rows, strict=True):
        assert part.start == row["start"] * 512, part
        assert part.size == row["size"] * 512, part
        assert int(part.type, 16) == int(row["type"], 16)
        assert part.active == bool(row.get("bootable", False))


def test_primaries_extended_and_logicals_match_sfdisk(mbr_disk: Path) -> None:
    table = table_of(mbr_disk)
    oracle = sfdisk_json(mbr_disk)
    assert table.scheme == "mbr" and oracle["label"] == "dos"
    assert table.sector_size == 512 == oracle["sectorsize"]
    assert_matches_sfdisk(table, oracle)
    assert [p.number for p in table.partitions if p.logical] == [5, 6, 7]
    assert [p.number for p in table.partitions if p.extended] == [4]
    assert [p.number for p in table.partitions if p.active] == [1]
    assert table.disk_signature == "1234abcd" == str(oracle["id"])[2:]
    assert table.notes == []
    assert table.boot_code_kind() == "zero"
    assert table.partitions[4].type_name == "Linux" and table.partitions[5].type_name == "Linux swap / Solaris"
    # The partition views are the partitions' bytes.
    patch(mbr_disk, table.partitions[5].start, b"inside-6")
    with view_of(mbr_disk) as view:
        again = read_volumes(view)
        assert again.partitions[5].view.pread(0, 8) == b"inside-6"
        assert again.partitions[5].view.size == again.partitions[5].size


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx"])
def test_same_table_through_image_formats(mbr_disk: Path, fmt: str) -> None:
    image = convert(mbr_disk, fmt)
    assert table_of(image, fmt).as_dict() == table_of(mbr_disk).as_dict()


def test_boot_code_kinds_of_real_loaders(mbr_disk: Path) -> None:
    grub = Path("/usr/lib/grub/i386-pc/boot.img")
    syslinux = sorted(Path("/usr/lib/syslinux/mbr").glob("*.bin"))
    assert grub.is_file() and syslinux, "grub-pc-bin and syslinux-common provide the boot code"
    patch(mbr_disk, 0, grub.read_bytes()[:440])
    table = table_of(mbr_disk)
    assert table.boot_code_kind() == "grub"
    assert table.scheme == "mbr" and len(table.partitions) == 7  # the table survives the boot code
    for path in syslinux:
        assert boot_code_kind(path.read_bytes()[:440]) == "syslinux", path
    assert boot_code_kind(grub.read_bytes()) == "grub"
    assert boot_code_kind(bytes(440)) == "zero"
    assert boot_code_kind(random.Random(5).randbytes(440)) == "other"


@pytest.mark.parametrize("kind", ["vfat", "ntfs", "ext4", "exfat"])
def test_bare_filesystem_is_no_table(tmp_path: Path, kind: str) -> None:
    volume = blank(tmp_path / f"{kind}.raw", 32 * MiB)
    if kind == "vfat":
        run(require_tool("mkfs.vfat"), volume)
    elif kind == "ntfs":
        run(require_tool("mkntfs"), "-F", "-Q", volume)
    elif kind == "ext4":
        run(require_tool("mkfs.ext4"), "-q", "-F", volume)
    else:
        run(require_tool("mkfs.exfat"), volume)
    table = table_of(volume)
    assert table.scheme == "none"
    assert table.partitions == []
    # The oracle: sfdisk finds no table on the same bytes either (it exits non-zero or reports none).
    out = run(require_tool("sfdisk"), "--json", volume, check=False)
    assert out.returncode != 0 or '"partitions"' not in out.stdout


def test_fat_boot_sector_with_sane_looking_entries_is_not_a_table(tmp_path: Path) -> None:
    """A FAT boot sector whose entry area holds status-0 entries running past the disk: no table."""
    volume = blank(tmp_path / "fat.raw", 16 * MiB)
    run(require_tool("mkfs.vfat"), volume)
    patch(volume, 446, mbr_entry(0, 0x07, 63, 0x7FFFFFFF) + mbr_entry(0, 0x83, 100, 0x7FFFFFFF))
    table = table_of(volume)
    assert table.scheme == "none" and table.partitions == []


def test_garbage_status_is_not_a_table(tmp_path: Path) -> None:
    disk = blank(tmp_path / "garbage.raw", 4 * MiB)
    patch(disk, 0, mbr_sector([mbr_entry(0x41, 0x83, 2048, 100), mbr_entry(0x20, 0x07, 4096, 100)]))
    table = table_of(disk)
    assert table.scheme == "none" and table.partitions == []
    assert any("status 0x41" in n for n in table.notes)


def test_partitions_past_the_disk_and_overlapping_are_kept_and_noted(tmp_path: Path) -> None:
    disk = blank(tmp_path / "past.raw", 4 * MiB)  # 8192 sectors
    patch(disk, 0, mbr_sector([mbr_entry(0x80, 0x83, 2048, 4096), mbr_entry(0, 0x83, 4096, 100000)]))
    table = table_of(disk)
    assert table.scheme == "mbr"
    assert [(p.number, p.start, p.size) for p in table.partitions] == [(1, 2048 * 512, 4096 * 512),
                                                                       (2, 4096 * 512, 100000 * 512)]
    assert any("partition 2" in n and "past the end" in n for n in table.notes)
    assert "partitions 1 and 2 overlap" in table.notes
    assert table.partitions[1].view.size == 4 * MiB - 4096 * 512  # the view is clamped to the disk


def write_ebr_chain(disk: Path, ext_start: int, links: int, loop_to: int | None = None) -> None:
    """EBR k at ext_start + 2k with a one-sector logical after it, linked to EBR k+1 (or back to ``loop_to``)."""
    with open(disk, "r+b") as f:
        for k in range(links):
            entries = [mbr_entry(0, 0x83, 1, 1)]
            if k + 1 < links:
                entries.append(mbr_entry(0, 0x05, 2 * (k + 1), 2))
            elif loop_to is not None:
                entries.append(mbr_entry(0, 0x05, 2 * loop_to, 2))
            f.seek((ext_start + 2 * k) * 512)
            f.write(mbr_sector(entries))


def test_looping_ebr_chain_is_cut(tmp_path: Path) -> None:
    disk = blank(tmp_path / "loop.raw", 8 * MiB)
    patch(disk, 0, mbr_sector([mbr_entry(0, 0x83, 2048, 2048), mbr_entry(0, 0x05, 4096, 8192)]))
    write_ebr_chain(disk, 4096, 3, loop_to=0)
    with view_of(disk) as view:
        steps = count_preads(view)
        table = read_volumes(view)
    assert steps.reads <= 8, steps.reads   # the MBR, the three EBRs and the one that loops back: not 256 links
    assert [p.number for p in table.partitions] == [1, 2, 5, 6, 7]
    assert [p.start // 512 for p in table.partitions if p.logical] == [4097, 4099, 4101]
    assert any("loops back" in n for n in table.notes)
    assert not any("overlap" in n for n in table.notes)


def test_ebr_chain_of_100000_links_is_cut_in_bounded_time(tmp_path: Path) -> None:
    links = 100_000
    disk = blank(tmp_path / "long.raw", (4096 + 2 * links + 2048) * 512)
    patch(disk, 0, mbr_sector([mbr_entry(0, 0x05, 2048, 2 * links + 10)]))
    write_ebr_chain(disk, 2048, links)
    with view_of(disk) as view:
        steps = count_preads(view)
        table = read_volumes(view)
        fetched = view.stats.bytes_read
    assert steps.reads <= 256 + 8, steps.reads   # a read per link followed, and no more after the cut
    assert len([p for p in table.partitions if p.logical]) == 256
    assert any("longer than 256 links" in n for n in table.notes)
    assert fetched <= 2 * MiB  # 256 EBRs, 2 sectors apart, in 64 KiB blocks


def test_tiny_and_empty_disks(tmp_path: Path) -> None:
    for size in (512, 1024, 4096):
        disk = blank(tmp_path / f"tiny{size}.raw", size)
        table = table_of(disk)
        assert table.scheme == "none" and table.partitions == []
    disk = blank(tmp_path / "label-only.raw", 4 * MiB)
    sfdisk(disk, "label: dos\n")
    table = table_of(disk)
    assert table.scheme == "mbr" and table.partitions == []


@pytest.mark.parametrize("name", ["windows_volume.qcow2", "ext2.qcow2", "ext2.vmdk", "iso9660.raw"])
def test_external_bare_volumes_have_no_table(testdata: Path, name: str) -> None:
    """Volumes other tools made (dfvfs's test data: an NTFS volume, ext2, ISO 9660): no table is invented."""
    table = table_of(testdata / name)
    assert table.scheme == "none" and table.partitions == []


def test_xorriso_appended_partition_layout(tmp_path: Path) -> None:
    """xorriso's MBR over an ISO (partition 1 from sector 0 covering the ISO, an appended ESP): as sfdisk reads it."""
    esp = tmp_path / "esp.img"
    run(require_tool("mkfs.vfat"), "-C", esp, "2048")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x\n")
    iso = tmp_path / "hybrid.iso"
    run(require_tool("xorriso"), "-as", "mkisofs", "-quiet", "-V", "HYB", "-o", iso, "-append_partition", "2",
        "0xef", esp, tree)
    table = table_of(iso)
    assert table.scheme == "mbr"
    assert_matches_sfdisk(table, sfdisk_json(iso))
    assert table.partitions[1].type_name == "EFI (FAT-12/16/32)"
    assert any("starts at sector 0" in n for n in table.notes)


@pytest.mark.parametrize("ext_type", ["f", "85"])
def test_other_extended_types(tmp_path: Path, ext_type: str) -> None:
    disk = blank(tmp_path / "ext.raw", 64 * MiB)
    sfdisk(disk, SCRIPT.replace(",40M,5", f",40M,{ext_type}"))
    table = table_of(disk)
    assert_matches_sfdisk(table, sfdisk_json(disk))
    assert [p.number for p in table.partitions if p.logical] == [5, 6, 7]
    assert table.partitions[3].extended and table.partitions[3].type == f"0x{int(ext_type, 16):02x}"


def test_mbr_with_4096_byte_sectors_when_told(tmp_path: Path) -> None:
    """An MBR written by sfdisk on a 4 KiB-sector loop device counts in 4 KiB sectors: read with sector_size."""
    disk = blank(tmp_path / "4k-mbr.raw", 64 * MiB)
    with loop_device(disk, 4096) as dev:
        sfdisk(Path(dev), "label: dos\n256,4M,83\n,1M,83\n,1M,83\n,8M,5\n,2M,83\n,2M,82\n")
        oracle = sfdisk_json(Path(dev))
    assert oracle["sectorsize"] == 4096
    with view_of(disk) as view:
        table = read_volumes(view, sector_size=4096)
    assert table.sector_size == 4096
    rows = oracle["partitions"]
    assert [(p.start, p.size) for p in table.partitions] == [(r["start"] * 4096, r["size"] * 4096) for r in rows]
    assert [p.number for p in table.partitions if p.logical] == [5, 6]
