"""LVM2 against volumes made by LVM's own tools (pvcreate, vgcreate, lvcreate, lvextend, vgcfgrestore) on loop
devices, with ``lvs``/``pvs``/``vgs --reportformat json`` as the oracle; hostile metadata written by hand."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from diskport.errors import CorruptImage
from diskport.formats import open_image
from diskport.guest import inspect_guest
from diskport.guest.filesystems import identify, open_filesystem
from diskport.guest.view import GuestView
from diskport.guest.volumes.lvm import VolumeGroup, assemble, find_pv, open_lv, parse_vg
from diskport.guest.volumes.lvm_config import MAX_DEPTH, MAX_NODES, parse_config
from tests.guest.filesystems.images import mkfs_ext, tree_of, walk
from tests.guest.support import blank, patch, sgdisk
from tests.guest.volumes.lvm_images import (
    add_lvs,
    bump_seqno,
    current_text,
    extent_size,
    linear_lv,
    lvm,
    lvs_json,
    pe_starts,
    pv_files,
    segments,
    special_lv,
    vg_name,
    write_copy,
    write_linear_lv,
)

MiB = 1024 * 1024


def small_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("appliance\n")
    (root / "data").mkdir()
    (root / "data/big.bin").write_bytes(random.Random(3).randbytes(10 * MiB))   # spans both segments
    (root / "data/small").write_text("small\n")
    return root


def groups_of(*files: Path) -> tuple[list[VolumeGroup], list[str]]:
    notes: list[str] = []
    pvs = []
    for i, path in enumerate(files):
        pv = find_pv(GuestView(open_image(os.fspath(path))), f"file {i}", notes)
        assert pv is not None
        pvs.append(pv)
    return assemble(pvs, notes), notes


SNAP_AND_THIN = (
    linear_lv("snap", "snap00", pe=5, count=1)
    + special_lv("snapshot0", "snapsh", 1, 'type = "snapshot"\nchunk_size = 8\norigin = "other"\n'
                 'cow_store = "snap"')
    + special_lv("pool", "pool00", 2, 'type = "thin-pool"\nmetadata = "pool_tmeta"\npool = "pool_tdata"\n'
                 'transaction_id = 1\nchunk_size = 128\ndiscards = "passdown"\nzero_new_blocks = 0')
    + linear_lv("pool_tdata", "tdata0", pe=6, count=2, visible=False)
    + linear_lv("pool_tmeta", "tmeta0", pe=8, count=1, visible=False)
    + special_lv("thin1", "thin01", 5, 'type = "thin"\nthin_pool = "pool"\ntransaction_id = 0\ndevice_id = 1')
)


def test_two_segments_a_snapshot_and_thin_volumes(tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "tree")
    fs_image = mkfs_ext(tmp_path / "root.img", tree, size="16M")
    vg = vg_name()
    with pv_files(tmp_path, 64 * MiB) as [(pv_file, dev)]:
        lvm("vgcreate", "--driverloaded", "n", vg, dev)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-L", "8M", "-n", "root", vg)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-L", "4M", "-n", "other", vg)
        lvm("lvextend", "--driverloaded", "n", "-L", "16M", f"{vg}/root")
        add_lvs(vg, dev, SNAP_AND_THIN, tmp_path)
        write_linear_lv(vg, "root", fs_image, {dev: pv_file})
        oracle = {row["lv_name"]: row for row in lvs_json(vg)}
        segs = segments(vg)
        extent = extent_size(vg)
        pe_start = pe_starts(vg)[dev]
    (group,), notes = groups_of(pv_file)
    assert notes == []
    assert group.name == vg and group.extent_size == extent and group.pe_start["pv0"] == pe_start
    ours = {lv.name: lv for lv in group.lvs if lv.visible}
    assert set(ours) == {n for n in oracle if not n.startswith("[")}
    for name, lv in ours.items():
        row = oracle[name]
        assert (lv.uuid, lv.size, len(lv.segments)) == (row["lv_uuid"], int(row["lv_size"]), int(row["seg_count"]))
        want = "snapshot" if row["lv_attr"][0] == "s" else row["segtype"]
        assert lv.kind == want, name
        assert (lv.origin or "") == row["origin"] and (lv.pool or "") == row["pool_lv"]
    assert [(s.start_extent, s.extent_count, s.stripes[0].first_pe) for s in ours["root"].segments] == \
        [(s.start // extent, s.size // extent, s.first_pe) for s in segs if s.lv == "root"] == [(0, 2, 0), (2, 2, 3)]
    for name in ("snap", "pool", "thin1"):
        with pytest.raises(CorruptImage, match="not read"):
            open_lv(group, ours[name])
    volume = open_lv(group, ours["root"])
    assert volume.size == 16 * MiB
    info = identify(volume)
    assert info is not None and info.type == "ext4"
    fs = open_filesystem(volume, info)
    assert fs is not None and walk(fs) == tree_of(tree)

    report = inspect_guest(pv_file)
    by_name = {v.name: v for v in report.volumes if v.number is None}
    assert set(by_name) == {f"{vg}/{n}" for n in ours}
    root = by_name[f"{vg}/root"]
    assert (root.filesystem, root.readable, root.lv_segments, root.vg, root.lv) == ("ext4", True, 2, vg, "root")
    assert by_name[f"{vg}/snap"].lv_kind == "snapshot" and "copy-on-write" in (by_name[f"{vg}/snap"].error or "")
    assert by_name[f"{vg}/thin1"].lv_pool == "pool" and by_name[f"{vg}/thin1"].filesystem is None
    assert report.to_json()["partitions"][1]["lv-kind"] is not None


def pattern(size: int, seed: int) -> bytes:
    """Every 4 KiB block begins with its index and the seed, so a misplaced block is named."""
    out = bytearray(size)
    for i in range(size // 4096):
        struct.pack_into("<QQ", out, i * 4096, i, seed)
    return bytes(out)


def test_two_pvs_a_spanning_and_a_striped_lv(tmp_path: Path) -> None:
    vg = vg_name()
    with pv_files(tmp_path, 48 * MiB, 48 * MiB) as pvs:
        (f1, d1), (f2, d2) = pvs
        files = {d1: f1, d2: f2}
        lvm("vgcreate", "--driverloaded", "n", vg, d1, d2)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-i", "2", "-I", "64k", "-L", "16M", "-n",
            "stripe", vg)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-L", "60M", "-n", "span", vg)
        span = tmp_path / "span.bin"
        span.write_bytes(pattern(60 * MiB, 1))
        write_linear_lv(vg, "span", span, files)
        # dm-striped's rule (the kernel's Documentation/admin-guide/device-mapper/striped.rst): chunk k of the
        # LV is chunk k // stripes of stripe k % stripes
        starts, extent = pe_starts(vg), extent_size(vg)
        stripes = [s for s in segments(vg) if s.lv == "stripe"]
        assert len(stripes) == 2 and stripes[0].stripe_size == 64 * 1024
        data = pattern(16 * MiB, 2)
        for k in range(16 * MiB // (64 * 1024)):
            s = stripes[k % 2]
            patch(files[s.pv], starts[s.pv] + s.first_pe * extent + (k // 2) * 64 * 1024,
                  data[k * 65536:(k + 1) * 65536])
        oracle = {row["lv_name"]: row for row in lvs_json(vg)}
        span_segments = [s for s in segments(vg) if s.lv == "span"]
        assert {s.pv for s in span_segments} == {d1, d2}
    (group,), notes = groups_of(f1, f2)
    assert notes == [] and set(group.found) == {"pv0", "pv1"}
    lvs = {lv.name: lv for lv in group.lvs}
    assert (lvs["span"].kind, len(lvs["span"].segments)) == ("linear", len(span_segments))
    assert lvs["stripe"].kind == oracle["stripe"]["segtype"] == "striped"
    for name, want in (("span", span.read_bytes()), ("stripe", data)):
        volume = open_lv(group, lvs[name])
        assert volume.size == int(oracle[name]["lv_size"]) == len(want)
        got = b"".join(volume.pread(at, 4 * MiB) for at in range(0, volume.size, 4 * MiB))
        assert got == want, name
        assert volume.pread(volume.size - 10, 100) == want[-10:]
        for seg in lvs[name].segments[1:]:   # reads across segment boundaries, and across stripe chunks
            at = seg.start_extent * group.extent_size
            assert volume.pread(at - 5000, 10000) == want[at - 5000:at + 5000]
        assert volume.pread(65536 - 7, 65536 * 3) == want[65536 - 7:65536 * 4 - 7]

    # one disk holding both PVs in GPT partitions: the VG is whole
    disk = blank(tmp_path / "disk.raw", 100 * MiB)
    sgdisk(disk, "-n", "1:2048:+48M", "-t", "1:8E00", "-n", "2:0:+48M", "-t", "2:8E00")
    patch(disk, 2048 * 512, f1.read_bytes())
    patch(disk, (2048 + 98304) * 512, f2.read_bytes())
    report = inspect_guest(disk)
    kinds = {v.name: (v.lv_kind, v.lv_segments, v.error) for v in report.volumes if v.number is None}
    assert kinds == {f"{vg}/stripe": ("striped", 1, None), f"{vg}/span": ("linear", len(span_segments), None)}
    # the first PV alone: the VG is incomplete, its LVs reported with the reason
    half = blank(tmp_path / "half.raw", 60 * MiB)
    sgdisk(half, "-n", "1:2048:+48M", "-t", "1:8E00")
    patch(half, 2048 * 512, f1.read_bytes())
    report = inspect_guest(half)
    assert any("is not on this disk" in n for n in report.table_notes)
    errors = [v.error or "" for v in report.volumes if v.number is None]
    assert len(errors) == 2 and all("not on this disk" in e for e in errors)


def test_newest_valid_copy_wins_and_hostile_copies_are_refused(tmp_path: Path) -> None:
    vg = vg_name()
    with pv_files(tmp_path, 32 * MiB, 32 * MiB) as pvs:
        (f1, d1), (f2, d2) = pvs
        lvm("vgcreate", "--driverloaded", "n", vg, d1, d2)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-L", "8M", "-n", "data", vg)
        text = current_text(f1)
        # a newer copy on the first PV only, renaming the LV: LVM itself takes it, as must we
        write_copy(f1, bump_seqno(text).replace("\ndata {", "\nrenamed {"))
        names = [row["lv_name"] for row in lvs_json(vg)]
    assert names == ["renamed"]
    (group,), notes = groups_of(f1, f2)
    assert [lv.name for lv in group.lvs] == ["renamed"]
    assert any("older metadata" in n for n in notes)

    newer = bump_seqno(text, 2)
    write_copy(f1, newer.replace("\ndata {", "\nbadsum {"), good_checksum=False)
    (group,), notes = groups_of(f1, f2)
    assert [lv.name for lv in group.lvs] == ["data"] and any("bad checksum" in n for n in notes)

    write_copy(f1, newer.replace("\ndata {", "\ndeep {" + "x {" * 5000))
    (group,), notes = groups_of(f1, f2)
    assert [lv.name for lv in group.lvs] == ["data"] and any("nested more than" in n for n in notes)

    write_copy(f1, newer.replace("\"pv0\", 0", "\"pv0\", 1000000"))
    (group,), notes = groups_of(f1, f2)
    with pytest.raises(CorruptImage, match="runs to extent 1000002 of PV pv0"):
        open_lv(group, group.lvs[0])
    report = inspect_guest(f1)
    lv = next(v for v in report.volumes if v.number is None)
    assert "runs to extent" in (lv.error or "")

    # 300 seeded mutations of LVM's own text: parsed and mapped, or refused with CorruptImage
    rng = random.Random(23)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(300):
        mutated = bytearray(text.encode())
        for _ in range(rng.randint(1, 6)):
            mutated[rng.randrange(len(mutated))] = rng.choice(b'{}[]=,"#\n 0123456789x-')
        try:
            for name, section in parse_config(mutated.decode(errors="replace"), "meta").items():
                if isinstance(section, dict) and isinstance(section.get("seqno"), int):
                    mapped = parse_vg(name, section, 1, "meta")
                    mapped.found = group.found
                    for item in mapped.lvs:
                        if not item.problem:
                            open_lv(mapped, item)
            outcomes["ok"] += 1
        except CorruptImage:
            outcomes["refused"] += 1
    assert outcomes["ok"] and outcomes["refused"], outcomes


@pytest.mark.parametrize(("text", "match"), [
    ("a {" * (MAX_DEPTH + 2), "nested more than"),
    ("n = 1" + "0" * 30, "more than 20 digits"),
    ("l = [" + "1, " * (MAX_NODES + 1) + "1]", "more than"),
    ('s = "never closed', "not closed"),
    ("a = 1\na = 2", "twice"),
    ("a { b = 1", "not closed"),
    ("a = = 1", "expected a value"),
    ("} a = 1", "without a section"),
])
def test_config_parser_refuses_hostile_text(text: str, match: str) -> None:
    with pytest.raises(CorruptImage, match=match):
        parse_config(text, "meta")


def test_config_parser_reads_what_lvm_writes() -> None:
    got = parse_config('# c\nvg {\n\tid = "a\\"b"\n\tseqno = 7  # seven\n\tlist = ["x", 1, -2]\n'
                       '\tf = 1.5\n\tempty = []\n\tsub { k = "v" }\n}\n', "meta")
    assert got == {"vg": {"id": 'a"b', "seqno": 7, "list": ["x", 1, -2], "f": 1.5, "empty": [],
                          "sub": {"k": "v"}}}


def _on(pv: str, name: str, tail: str, pe: int, count: int) -> str:
    return linear_lv(name, tail, pe=pe, count=count, visible=False).replace('"pv0"', f'"{pv}"')


RAID_AND_CACHE = (
    special_lv("mirror", "mirr00", 2, 'type = "raid1"\ndevice_count = 2\nregion_size = 1024\nraids = '
               '["mirror_rmeta_0", "mirror_rimage_0", "mirror_rmeta_1", "mirror_rimage_1"]')
    + _on("pv0", "mirror_rmeta_0", "rmeta0", 2, 1) + _on("pv0", "mirror_rimage_0", "rimag0", 3, 2)
    + _on("pv1", "mirror_rmeta_1", "rmeta1", 0, 1) + _on("pv1", "mirror_rimage_1", "rimag1", 1, 2)
    + special_lv("cached", "cache0", 2, 'type = "cache"\ncache_pool = "cpool"\norigin = "cached_corig"')
    + _on("pv1", "cached_corig", "corig0", 3, 2)
    + special_lv("cpool", "cpool0", 1, 'type = "cache-pool"\ndata = "cpool_cdata"\nmetadata = "cpool_cmeta"\n'
                 'chunk_size = 128\ncache_mode = "writethrough"\npolicy = "smq"', visible=False)
    + _on("pv1", "cpool_cdata", "cdata0", 5, 1) + _on("pv1", "cpool_cmeta", "cmeta0", 6, 1)
)


def test_raid1_and_cache_are_reported_not_read(tmp_path: Path) -> None:
    """lvcreate cannot make raid1 or cache LVs without device-mapper: they are added through vgcfgrestore, which
    checks them as LVM does; lvs then reports them."""
    vg = vg_name()
    with pv_files(tmp_path, 64 * MiB, 64 * MiB) as pvs:
        (f1, d1), (f2, _d2) = pvs
        lvm("vgcreate", "--driverloaded", "n", vg, d1, _d2)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-L", "8M", "-n", "plain", vg)
        add_lvs(vg, d1, RAID_AND_CACHE, tmp_path)
        oracle = {row["lv_name"]: row for row in lvs_json(vg)}
    (group,), notes = groups_of(f1, f2)
    assert notes == []
    visible = {lv.name: lv for lv in group.lvs if lv.visible}
    assert set(visible) == {n for n in oracle if not n.startswith("[")} == {"plain", "mirror", "cached"}
    for name, lv in visible.items():
        assert lv.kind == oracle[name]["segtype"] and lv.size == int(oracle[name]["lv_size"])
    assert visible["plain"].problem is None
    for name in ("mirror", "cached"):
        assert "reports but does not read" in (visible[name].problem or "")
        with pytest.raises(CorruptImage, match="not read"):
            open_lv(group, visible[name])
