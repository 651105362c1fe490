"""GPT tables read by diskport against sgdisk's reading of disks sgdisk wrote; damaged and hostile GPTs."""

from __future__ import annotations

from pathlib import Path

import pytest

from diskport.errors import CorruptImage
from diskport.guest.volumes import PartitionTable, read_volumes
from tests.guest.support import (
    MiB,
    blank,
    convert,
    count_preads,
    gpt_header_fields,
    loop_device,
    patch,
    read,
    rewrite_gpt_entry,
    rewrite_gpt_header,
    sfdisk_json,
    sgdisk,
    sgdisk_info,
    sgdisk_print,
    view_of,
)

# sgdisk type code -> the name diskport must give the GUID sgdisk writes for it.
TYPE_NAMES = {
    "ef00": "EFI System", "ef02": "BIOS boot", "0700": "Microsoft basic data", "0c01": "Microsoft reserved",
    "2700": "Windows recovery environment", "8300": "Linux filesystem", "8200": "Linux swap", "8e00": "Linux LVM",
    "fd00": "Linux RAID", "8304": "Linux root (x86-64)", "ea00": "Linux extended boot (XBOOTLDR)",
    "8302": "Linux home", "8309": "Linux LUKS", "8305": "Linux root (ARM64)", "8310": "Linux variable data",
}


def table_of(path: Path | str, fmt: str | None = None) -> PartitionTable:
    with view_of(path, fmt) as view:
        return read_volumes(view)


def assert_matches_sgdisk(table: PartitionTable, target: Path | str) -> None:
    sector_size, disk_guid, rows = sgdisk_print(target)
    assert table.scheme == "gpt"
    assert table.sector_size == sector_size
    assert table.disk_guid == disk_guid
    assert [p.number for p in table.partitions] == [r["number"] for r in rows]
    for part, row in zip(table.partitions, rows, strict=True):
        info = sgdisk_info(target, row["number"])
        assert (info["first"], info["last"]) == (row["first"], row["last"])
        assert part.start == info["first"] * sector_size, part
        assert part.size == (info["last"] - info["first"] + 1) * sector_size, part  # inclusive end
        assert part.type == info["type"]
        assert part.uuid == info["uuid"]
        assert part.attributes == info["attributes"]
        assert (part.name or "") == info["name"]


@pytest.fixture
def gpt_disk(tmp_path: Path) -> Path:
    disk = blank(tmp_path / "gpt.raw", 64 * MiB)
    sgdisk(disk, "-U", "11111111-2222-3333-4444-555555555555",
           "-n", "1:2048:+16M", "-t", "1:ef00", "-c", "1:EFI System Partition",
           "-n", "2:0:+1M", "-t", "2:ef02", "-c", "2:BIOS boot",
           "-n", "3:0:+8M", "-t", "3:8200", "-c", "3:swap",
           "-n", "4:0:0", "-t", "4:8304", "-c", "4:root fs", "-A", "4:set:2")
    return disk


def test_gpt_matches_sgdisk(gpt_disk: Path) -> None:
    table = table_of(gpt_disk)
    assert_matches_sgdisk(table, gpt_disk)
    assert table.disk_guid == "11111111-2222-3333-4444-555555555555"
    assert table.protective_mbr and not table.hybrid_mbr
    assert table.gpt_header == "primary"
    assert table.notes == []
    assert [p.type_name for p in table.partitions] == ["EFI System", "BIOS boot", "Linux swap",
                                                       "Linux root (x86-64)"]
    assert table.partitions[3].attributes == 1 << 2  # legacy BIOS bootable
    assert table.partitions[3].name == "root fs"
    # The last partition ends on the last usable LBA (the disk minus the 33-sector backup): not a sector short.
    assert table.partitions[3].start + table.partitions[3].size == (64 * MiB // 512 - 33) * 512


def test_type_names_for_the_guids_sgdisk_writes(tmp_path: Path) -> None:
    disk = blank(tmp_path / "types.raw", 64 * MiB)
    args: list[str] = []
    for number, code in enumerate(TYPE_NAMES, start=1):
        args += ["-n", f"{number}:0:+1M", "-t", f"{number}:{code}"]
    sgdisk(disk, *args)
    table = table_of(disk)
    assert_matches_sgdisk(table, disk)
    assert [p.type_name for p in table.partitions] == list(TYPE_NAMES.values())


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx"])
def test_same_table_through_image_formats(gpt_disk: Path, fmt: str) -> None:
    image = convert(gpt_disk, fmt)
    assert table_of(image, fmt).as_dict() == table_of(gpt_disk).as_dict()


def test_hybrid_mbr_is_flagged(gpt_disk: Path) -> None:
    sgdisk(gpt_disk, "-h", "1:4")
    table = table_of(gpt_disk)
    assert table.hybrid_mbr and not table.protective_mbr
    assert_matches_sgdisk(table, gpt_disk)
    oracle = sfdisk_json(gpt_disk, nested_dos=True)  # the MBR as sfdisk reads it
    real = [r for r in oracle["partitions"] if r["type"] != "ee"]
    assert [(p.start, p.size, int(p.type, 16)) for p in table.mbr_partitions] == \
        [(r["start"] * 512, r["size"] * 512, int(r["type"], 16)) for r in real]
    assert len(table.mbr_partitions) == 2
    assert any(n.startswith("hybrid MBR") for n in table.notes)


def test_4096_byte_sectors_built_on_a_loop_device(tmp_path: Path) -> None:
    """sgdisk honours the logical sector size of the device: a 4 KiB-sector loop device over the file."""
    disk = blank(tmp_path / "4k.raw", 64 * MiB)
    with loop_device(disk, 4096) as dev:
        sgdisk(dev, "-n", "1:256:+16M", "-t", "1:ef00", "-c", "1:esp", "-n", "2:0:0", "-t", "2:8300")
        sector_size, _, _ = sgdisk_print(dev)
        table = table_of(disk)
        assert sector_size == 4096
        assert_matches_sgdisk(table, dev)
    assert read(disk, 4096, 8) == b"EFI PART"
    assert table.sector_size == 4096 and table.protective_mbr
    assert table.partitions[0].start == 256 * 4096 and table.partitions[0].size == 16 * MiB
    assert table.notes == []


@pytest.mark.parametrize("damage", ["header", "entries"])
def test_damaged_primary_is_read_from_the_backup(gpt_disk: Path, damage: str) -> None:
    good = table_of(gpt_disk)
    if damage == "header":
        patch(gpt_disk, 512 + 40, b"\xff")  # inside the usable-range fields: header CRC mismatch
    else:
        patch(gpt_disk, 1024 + 56, b"X")    # inside entry 1's name: entry array CRC mismatch
    table = table_of(gpt_disk)
    assert table.gpt_header == "backup"
    assert any("backup GPT" in n for n in table.notes)
    assert any(("header CRC32 mismatch" if damage == "header" else "entry array CRC32 mismatch") in n
               for n in table.notes)
    assert [p.as_dict(512) for p in table.partitions] == [p.as_dict(512) for p in good.partitions]
    assert_matches_sgdisk(table, gpt_disk)  # sgdisk too falls back to the backup


def test_damaged_backup_is_noted(gpt_disk: Path) -> None:
    patch(gpt_disk, 64 * MiB - 512 + 40, b"\xff")
    table = table_of(gpt_disk)
    assert table.gpt_header == "primary"
    assert any("backup GPT header" in n and "CRC32" in n for n in table.notes)


def test_both_headers_damaged_is_refused(gpt_disk: Path) -> None:
    patch(gpt_disk, 512 + 40, b"\xff")
    patch(gpt_disk, 64 * MiB - 512 + 40, b"\xff")
    with pytest.raises(CorruptImage, match="no valid GPT header") as err:
        table_of(gpt_disk)
    assert err.value.path and err.value.fmt == "gpt"


def test_huge_entry_count_is_refused_in_bounded_time(gpt_disk: Path) -> None:
    rewrite_gpt_header(gpt_disk, 1, count=2**31)
    with view_of(gpt_disk) as view:
        steps = count_preads(view)
        table = read_volumes(view)
        fetched = view.stats.bytes_read
    # Both headers, the backup's 128 entries and the MBR: a few reads, never one per claimed entry.
    assert steps.reads <= 8, steps.reads
    assert table.gpt_header == "backup"
    assert any("2147483648 entries" in n and "limit" in n for n in table.notes)
    assert fetched <= 256 * 1024
    rewrite_gpt_header(gpt_disk, 64 * MiB // 512 - 1, count=2**31)
    with pytest.raises(CorruptImage, match="exceed the limit"):
        table_of(gpt_disk)


def test_entry_size_and_my_lba_checks(gpt_disk: Path) -> None:
    rewrite_gpt_header(gpt_disk, 1, entry_size=100)
    assert any("entry size 100" in n for n in table_of(gpt_disk).notes)
    rewrite_gpt_header(gpt_disk, 1, entry_size=128, my_lba=7)
    table = table_of(gpt_disk)
    assert table.gpt_header == "backup" and any("MyLBA is 7" in n for n in table.notes)


def test_partition_past_the_disk_and_overlap_are_noted(gpt_disk: Path) -> None:
    last_lba = 64 * MiB // 512 - 1
    for header in (1, last_lba):
        rewrite_gpt_entry(gpt_disk, header, 3, last=last_lba + 1000)     # partition 4 runs past the disk
        rewrite_gpt_entry(gpt_disk, header, 2, first=2048 + 100)        # partition 3 starts inside 1
    table = table_of(gpt_disk)
    assert table.gpt_header == "primary"
    p3, p4 = table.partitions[2], table.partitions[3]
    assert p4.size == (last_lba + 1000 - p4.start // 512 + 1) * 512  # kept as written
    assert p4.view.size == 64 * MiB - p4.start                        # the view stops at the disk's end
    assert any("partition 4" in n and "past the end" in n for n in table.notes)
    assert any("partition 4" in n and "usable range" in n for n in table.notes)
    assert p3.start == (2048 + 100) * 512
    assert "partitions 1 and 3" in " ".join(table.notes) and "overlap" in " ".join(table.notes)


def test_gpt_without_protective_mbr(gpt_disk: Path) -> None:
    patch(gpt_disk, 510, b"\0\0")
    table = table_of(gpt_disk)
    assert table.scheme == "gpt" and not table.protective_mbr
    assert any("no protective MBR" in n for n in table.notes)


def test_gpt_header_with_mbr_lacking_0xee_uses_the_mbr(gpt_disk: Path) -> None:
    patch(gpt_disk, 446 + 4, b"\x83")  # the 0xEE entry becomes a Linux partition
    table = table_of(gpt_disk)
    assert table.scheme == "mbr"
    assert any("MBR has no 0xEE" in n for n in table.notes)


def test_entry_array_location_bounds(gpt_disk: Path) -> None:
    h = gpt_header_fields(gpt_disk, 1)
    assert h["entries_lba"] == 2 and h["count"] == 128
    rewrite_gpt_header(gpt_disk, 1, entries_lba=2**60)
    table = table_of(gpt_disk)
    assert table.gpt_header == "backup" and any("outside the disk" in n for n in table.notes)
