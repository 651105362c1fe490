"""The readers under a coverage-guided fuzzer (atheris, libFuzzer) for a bounded time, and every finding kept in
fuzz/findings/ replayed as an ordinary test.

Each target starts from seeds made here by the real tools (qemu-img for the formats; sgdisk, mkfs.vfat and
mtools for a guest disk; hivexregedit for a hive) and runs for FUZZ_SECONDS in its own process with libFuzzer's
limits: a hang past 10 s or memory past 1 GiB is a finding like a crash. A run that finds anything fails with
the input's path, and the input joins fuzz/findings/TARGET/ with its fix.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.guest.filesystems.images import mkfs_fat, mtools
from tests.guest.filesystems.xfs_images import mkfs_xfs
from tests.guest.initramfs_images import initramfs
from tests.guest.support import blank, sgdisk
from tests.guest.volumes.lvm_images import lvm, pv_files, vg_name, write_linear_lv
from tests.guest.windows.hives import build_hive, dword, sz
from tests.support import REPO
from tests.support.clients import require_tool, run
from tests.support.images import make_image

HARNESS = REPO / "fuzz" / "harness.py"
FINDINGS = REPO / "fuzz" / "findings"
FUZZ_SECONDS = int(os.environ.get("DISKPORT_FUZZ_SECONDS", "20"))
MiB = 1024 * 1024
FORMAT_SEEDS = {
    "qcow2": [("qcow2", ""), ("qcow2", "cluster_size=4096"), ("qcow2", "compression_type=zlib")],
    "vmdk": [("vmdk", ""), ("vmdk", "subformat=streamOptimized")],
    "vhd": [("vpc", ""), ("vpc", "subformat=fixed")],
    "vhdx": [("vhdx", "")],
    "vdi": [("vdi", ""), ("vdi", "static=on")],
}
TARGETS = [*FORMAT_SEEDS, "probe", "guest", "regf", "initramfs", "lvm", "xfs"]


def seeds(target: str, folder: Path) -> Path:
    corpus = folder / "corpus"
    corpus.mkdir()
    work = folder / "work"
    work.mkdir()
    if target in FORMAT_SEEDS or target == "probe":
        pairs = FORMAT_SEEDS.get(target) or [pair for pairs in FORMAT_SEEDS.values() for pair in pairs[:1]]
        for n, (fmt, options) in enumerate(pairs):
            image = make_image(work, fmt, 256 * 1024, options, name=f"seed{n}", seed=n + 1,
                               layout=[(0, 64 * 1024, "random"), (128 * 1024, 4096, "text")])
            (corpus / f"seed{n}").write_bytes(image.read_bytes())
    elif target == "guest":
        disk = blank(work / "gpt.raw", 4 * MiB)
        sgdisk(disk, "-n", "1:2048:+2M", "-t", "1:EF00")
        esp = mkfs_fat(work / "esp.img", 12, 2 * 1024)
        mtools("mmd", esp, "::EFI", "::EFI/BOOT")
        mtools("mcopy", esp, str(HARNESS), "::EFI/BOOT/BOOTX64.EFI")
        data = bytearray(disk.read_bytes())
        data[2048 * 512:2048 * 512 + esp.stat().st_size] = esp.read_bytes()
        (corpus / "gpt").write_bytes(bytes(data))
    elif target == "initramfs":
        for method in ("none", "gzip", "zstd", "xz", "lz4"):
            data = initramfs(work / method, "6.1.0-99-amd64", {"virtio_blk": "drivers/block"}, method)
            (corpus / method).write_bytes(data)
    elif target == "lvm":
        (corpus / "pv").write_bytes(lvm_seed(work))
    elif target == "xfs":
        tree = work / "tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc/os-release").write_text("ID=rocky\n")
        (tree / "link").symlink_to("etc/os-release")
        for i in range(40):
            (tree / f"f{i}").write_text(f"{i}\n")
        image = mkfs_xfs(work / "xfs.img", tree)
        with open(image, "rb") as f:
            (corpus / "xfs").write_bytes(f.read(4 * MiB))   # the superblock, AG 0's headers, root's inodes, data
    else:
        hive = build_hive(work / "SOFTWARE", "HKEY_LOCAL_MACHINE\\SOFTWARE", {
            "Microsoft": {}, "Microsoft\\Windows NT": {},
            "Microsoft\\Windows NT\\CurrentVersion": {"ProductName": sz("Windows 10 Pro"),
                                                      "CurrentBuildNumber": sz("22631"), "UBR": dword(2861)},
        })
        (corpus / "hive").write_bytes(hive.read_bytes())
    return corpus


def lvm_seed(work: Path) -> bytes:
    """A 4 MiB PV made by LVM's tools holding a VG of 1 MiB extents and a two-segment LV with ext2 in it."""
    vg = vg_name()
    with pv_files(work, 4 * MiB) as [(pv_file, dev)]:
        lvm("vgcreate", "--driverloaded", "n", "-s", "1M", vg, dev)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-L", "1M", "-n", "a", vg)
        lvm("lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y", "-L", "1M", "-n", "b", vg)
        lvm("lvextend", "--driverloaded", "n", "-L", "2M", f"{vg}/a")
        fs = work / "a.img"
        blank(fs, 2 * MiB)
        run(require_tool("mkfs.ext2"), "-q", "-F", fs)
        write_linear_lv(vg, "a", fs, {dev: pv_file})
    return pv_file.read_bytes()


def _targets_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("diskport_fuzz_targets", REPO / "fuzz" / "targets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def replay_findings(target: str) -> int:
    """Every kept finding of ``target`` must now be an ordinary answer (a DiskportError at most)."""
    targets = _targets_module()
    run_one = targets.target(target)
    found = sorted((FINDINGS / target).glob("*")) if (FINDINGS / target).is_dir() else []
    for path in found:
        targets.one_input(run_one, path.read_bytes())
    return len(found)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_for_a_bounded_time(target: str, tmp_path: Path) -> None:
    replay_findings(target)
    require_tool("qemu-img")
    corpus = seeds(target, tmp_path)
    assert any(corpus.iterdir())
    done = subprocess.run(
        [sys.executable, HARNESS, target, corpus, f"-max_total_time={FUZZ_SECONDS}", "-timeout=10",
         "-rss_limit_mb=1024", "-max_len=4194304", "-print_final_stats=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120)
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    tail = "\n".join(done.stderr.splitlines()[-40:])
    assert done.returncode == 0 and not found, f"{target}: findings {found} in {tmp_path}\n{tail}"
    runs = [line for line in done.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[0].split(":")[-1]) > 100, f"{target}: the fuzzer barely ran\n{tail}"
