"""The page-cache policy (``--cache``): the decision over fake /proc and /sys trees (real file parsing), the
write-behind bound measured with fincore, byte-identical output in every mode, what -v and JSON say, and a
convert inside a real cgroup v1 memory limit."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from diskport.cache import (
    KICK_BYTES,
    MODES,
    BackgroundWriteback,
    WriteBehind,
    cgroup_memory_limit,
    decide,
    mem_available,
)
from diskport.engine import convert
from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io, run_cli
from tests.support.host import dirty_bytes, fake_host, resident, run_in
from tests.support.images import loop_device, qemu_raw_sha256, sha256_file
from tests.support.registry import RegistryServer

GiB = 1024 * MiB
V1_UNLIMITED = "9223372036854771712"


def test_v2_without_a_limit_writes_back(tmp_path: Path) -> None:
    proc, sysfs = fake_host(tmp_path, "0::/user.slice/session-1.scope\n", {
        "fs/cgroup/cgroup.controllers": "cpu memory io",
        "fs/cgroup/user.slice/memory.max": "max",
        "fs/cgroup/user.slice/session-1.scope/memory.max": "max",
    })
    assert cgroup_memory_limit(proc, sysfs) == (None, None, "")
    assert mem_available(proc) == 16 * GiB
    policy = decide("auto", block_device=False, size=2 * GiB, proc=proc, sys=sysfs)
    assert policy.mode == "writeback"
    assert policy.reason == "no cgroup memory limit; 2 GiB output <= half of 16 GiB available"
    assert policy.window == 0, "auto with no limit leaves the output to the kernel's dirty limits"
    assert policy.line() == f"cache: writeback ({policy.reason})"


def test_v2_limit_anywhere_up_the_tree_counts(tmp_path: Path) -> None:
    proc, sysfs = fake_host(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "fs/cgroup/cgroup.controllers": "memory",
        "fs/cgroup/kubepods/memory.max": "max",
        "fs/cgroup/kubepods/pod1/memory.max": str(600 * MiB),
        "fs/cgroup/kubepods/pod1/ctr/memory.max": "max",
        "fs/cgroup/kubepods/pod1/ctr/memory.current": str(100 * MiB),
    })
    assert cgroup_memory_limit(proc, sysfs) == (600 * MiB, 100 * MiB, "v2")
    policy = decide("auto", block_device=False, size=4 * GiB, proc=proc, sys=sysfs)
    assert policy.mode == "none"
    assert policy.reason == "4 GiB output > half of the 600 MiB cgroup memory limit"
    small = decide("auto", block_device=False, size=200 * MiB, proc=proc, sys=sysfs)
    assert small.mode == "writeback"
    assert small.reason.startswith("200 MiB output <= half of the 600 MiB cgroup v2 memory limit; ")
    assert small.window == 150 * MiB, "a quarter of the limit (headroom 500 MiB, half of it is more)"
    forced = decide("writeback", block_device=False, size=4 * GiB, proc=proc, sys=sysfs)
    assert forced.mode == "writeback" and forced.window == 150 * MiB
    assert "at most 150 MiB of the output in memory" in forced.reason


def test_v2_on_a_hybrid_host_is_under_unified(tmp_path: Path) -> None:
    proc, sysfs = fake_host(tmp_path, "1:name=systemd:/\n0::/job\n", {
        "fs/cgroup/unified/cgroup.controllers": "memory",
        "fs/cgroup/unified/job/memory.max": str(GiB),
    })
    assert cgroup_memory_limit(proc, sysfs)[::2] == (GiB, "v2")


def test_v1_memory_controller_and_its_parents(tmp_path: Path) -> None:
    proc, sysfs = fake_host(tmp_path, "5:devices:/\n4:cpuacct,memory:/batch/job7\n0::/\n", {
        "fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        "fs/cgroup/memory/batch/memory.limit_in_bytes": str(2 * GiB),
        "fs/cgroup/memory/batch/job7/memory.limit_in_bytes": V1_UNLIMITED,
        "fs/cgroup/memory/batch/job7/memory.usage_in_bytes": str(1536 * MiB),
        "fs/cgroup/unified/cgroup.controllers": "",
    })
    assert cgroup_memory_limit(proc, sysfs) == (2 * GiB, 1536 * MiB, "v1")
    policy = decide("auto", block_device=False, size=GiB, proc=proc, sys=sysfs)
    assert policy.mode == "writeback"
    assert policy.window == 256 * MiB, "half of the 512 MiB headroom"
    assert decide("auto", block_device=False, size=GiB + 1, proc=proc, sys=sysfs).mode == "none"


def test_v1_unlimited_is_no_limit(tmp_path: Path) -> None:
    proc, sysfs = fake_host(tmp_path, "4:memory:/process_api/abc\n", {
        "fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        "fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": V1_UNLIMITED,
    })
    assert cgroup_memory_limit(proc, sysfs)[0] is None


def test_v1_container_sees_its_own_cgroup_at_the_mount_root(tmp_path: Path) -> None:
    """/proc/self/cgroup names the host's path; inside the container only the tail (or the root) exists."""
    proc, sysfs = fake_host(tmp_path, "4:memory:/kubepods/burstable/pod9/ctr1\n", {
        "fs/cgroup/memory/memory.limit_in_bytes": str(768 * MiB),
    })
    assert cgroup_memory_limit(proc, sysfs)[0] == 768 * MiB
    assert decide("auto", block_device=False, size=GiB, proc=proc, sys=sysfs).mode == "none"


def test_output_near_available_memory_goes_direct(tmp_path: Path) -> None:
    proc, sysfs = fake_host(tmp_path, "0::/\n", {"fs/cgroup/cgroup.controllers": "memory"},
                            available_kib=3 * 1024 * 1024)
    policy = decide("auto", block_device=False, size=2 * GiB, proc=proc, sys=sysfs)
    assert (policy.mode, policy.reason) == ("none", "2 GiB output > half of 3 GiB available")
    assert decide("auto", block_device=False, size=1536 * MiB, proc=proc, sys=sysfs).mode == "writeback"


def test_block_device_unknown_size_and_missing_facts_go_direct(tmp_path: Path) -> None:
    proc, sysfs = fake_host(tmp_path, "0::/\n", {"fs/cgroup/cgroup.controllers": "memory"})
    assert decide("auto", block_device=True, size=MiB, proc=proc, sys=sysfs).reason == "the target is a block device"
    assert decide("auto", block_device=False, size=None, proc=proc,
                  sys=sysfs).reason == "the output's size is not known until the end"
    bare, _ = fake_host(tmp_path / "bare", "0::/\n", {}, available_kib=None)
    assert mem_available(bare) is None
    assert decide("auto", block_device=False, size=MiB, proc=bare, sys=sysfs).mode == "none"
    assert decide("none", block_device=False, size=MiB, proc=proc, sys=sysfs).mode == "none"
    assert decide("writeback", block_device=True, size=MiB, proc=proc, sys=sysfs).mode == "writeback"
    assert cgroup_memory_limit(tmp_path / "nowhere", sysfs) == (None, None, "")
    with pytest.raises(ValueError, match="unknown cache mode 'fast'"):
        decide("fast", block_device=False, size=MiB, proc=proc, sys=sysfs)


def _write_64m(path: Path, behind: bool) -> int:
    """Write 64 MiB through the page cache, with or without a 16 MiB write-behind; bytes left in the cache."""
    chunk = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        wb = WriteBehind(fd, 16 * MiB, kick=4 * MiB) if behind else None
        for i in range(64):
            os.pwrite(fd, chunk, i * MiB)
            if wb is not None:
                wb.wrote(i * MiB, MiB)
        assert wb is None or wb.enabled
        return resident(path)
    finally:
        os.close(fd)


def test_write_behind_keeps_the_output_within_its_window(tmp_path: Path) -> None:
    unbounded = _write_64m(tmp_path / "plain", behind=False)
    assert unbounded >= 48 * MiB, "without write-behind the page cache keeps what was written"
    bounded = _write_64m(tmp_path / "behind", behind=True)
    assert bounded <= 16 * MiB + 2 * 4 * MiB, f"{bounded / MiB:.0f} MiB of the output still cached"


def test_background_writeback_leaves_the_final_flush_little(tmp_path: Path) -> None:
    """A job that flushes at its end has its writeback started as it writes: after 64 MiB, at most the last
    unkicked span is still dirty, where plain writes leave all of it dirty (the kernel's flusher waits 30 s)."""
    chunk = os.urandom(MiB)
    for name, background in [("plain", False), ("background", True)]:
        fd = os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            wb = BackgroundWriteback(fd, kick=4 * MiB) if background else None
            for i in range(64):
                os.pwrite(fd, chunk, i * MiB)
                if wb is not None:
                    wb.wrote(i * MiB, MiB)
            if wb is not None:
                wb.close()
                wb.thread.join(30)
                assert not wb.thread.is_alive() and wb.enabled
                with pytest.raises(OSError):
                    os.fstat(wb.fd)  # the thread closed its own descriptor
            dirty = dirty_bytes(fd)
        finally:
            os.close(fd)
        if background:
            assert dirty < 4 * MiB, f"{dirty / MiB:.0f} MiB still dirty"
        else:
            assert dirty >= 48 * MiB, f"only {dirty / MiB:.0f} MiB dirty without background writeback"


def test_sync_convert_starts_writeback_as_it_goes(tmp_path: Path) -> None:
    raw = _disk(tmp_path)
    proc = run_cli("convert", "-q", "-v", "--sync", "-O", "qcow2", raw, tmp_path / "s.qcow2")
    assert proc.returncode == 0, proc.stderr
    if proc.stderr.startswith("cache: writeback ") and "no cgroup memory limit" in proc.stderr:
        assert "writeback started as data is written, since the job flushes at its end" in proc.stderr
    else:
        assert "writeback started" not in proc.stderr, proc.stderr
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, tmp_path / "s.qcow2").returncode == 0
    plain = run_cli("convert", "-q", "-v", "-O", "qcow2", raw, tmp_path / "p.qcow2")
    assert plain.returncode == 0 and "writeback started" not in plain.stderr, plain.stderr


def _disk(tmp_path: Path, size_mib: int = 96) -> Path:
    """A raw disk with data, a hole and an unaligned tail of data, so every writer path is taken."""
    raw = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", raw, f"{size_mib}M")
    qemu_io(raw, "raw", "write -P 0x5a 1M 20M", "write -P 0x33 40M 7M", "write -P 0x71 90M 4096")
    with open(raw, "r+b") as f:
        f.seek(60 * MiB + 512)
        f.write(os.urandom(3 * MiB + 1000))
    return raw


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_every_mode_writes_the_same_bytes(tmp_path: Path, fmt: str) -> None:
    raw = _disk(tmp_path)
    source = raw
    if fmt == "raw":  # qcow2 -> raw
        source = tmp_path / "disk.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, source)
    outputs = {}
    for mode in MODES:
        out = tmp_path / f"out-{mode}.{fmt}"
        proc = run_cli("convert", "-v", "--cache", mode, "-O", fmt, source, out)
        assert proc.returncode == 0, proc.stderr
        line = next(x for x in proc.stderr.splitlines() if x.startswith("cache: "))
        if mode == "auto":
            assert re.fullmatch(r"cache: (writeback|none) \(.+\)", line), line
        else:
            assert line.startswith(f"cache: {mode} ("), line
        assert qemu_img("compare", "-f", "raw", "-F", fmt, raw, out).returncode == 0
        outputs[mode] = out.read_bytes()
    assert outputs["writeback"] == outputs["none"] == outputs["auto"]


def test_quiet_convert_says_nothing_without_v(tmp_path: Path) -> None:
    raw = _disk(tmp_path)
    proc = run_cli("convert", "-q", "--cache", "writeback", raw, tmp_path / "o.raw")
    assert proc.returncode == 0 and proc.stderr == ""
    proc = run_cli("convert", "-q", "-v", "--cache", "none", raw, tmp_path / "p.raw")
    assert proc.returncode == 0 and proc.stderr == "cache: none (asked for: O_DIRECT)\n"
    bad = run_cli("convert", "--cache", "fast", raw, tmp_path / "q.raw")
    assert bad.returncode == 2 and "'fast' is not one of" in bad.stderr


def test_import_reports_the_mode_in_json_and_v(tmp_path: Path) -> None:
    raw = _disk(tmp_path)
    proc = run_cli("import", "--progress", "json", "--cache", "writeback", "-O", "qcow2", raw, tmp_path / "i.qcow2")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")]
    assert lines[-1]["phase"] == "done" and lines[-1]["converted"] == 96 * MiB
    assert lines[-1]["cache"]["mode"] == "writeback" and "asked for" in lines[-1]["cache"]["reason"]
    assert all("cache" not in x for x in lines[:-1]), "known once the job is done"
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, tmp_path / "i.qcow2").returncode == 0
    proc = run_cli("import", "-q", "-v", raw, tmp_path / "i.raw")
    assert proc.returncode == 0 and re.fullmatch(r"cache: (writeback|none) \(.+\)\n", proc.stderr), proc.stderr


def test_pull_takes_the_modes(registry: RegistryServer, tmp_path: Path) -> None:
    raw = _disk(tmp_path)
    ref = f"{registry.name}/containerdisks/cache:v1"
    built = run_cli("build", raw, "-t", ref, "--push", "--compression", "none", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    expected = qemu_raw_sha256(raw, tmp_path)
    for mode in ("writeback", "none"):
        dest = tmp_path / f"pulled-{mode}.raw"
        proc = run_cli("pull", "-q", "-v", "--cache", mode, ref, dest)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.startswith(f"cache: {mode} ("), proc.stderr
        assert sha256_file(dest) == expected


def test_library_reports_the_policy(tmp_path: Path) -> None:
    raw = _disk(tmp_path)
    result = convert(raw, tmp_path / "o.qcow2", output_format="qcow2", cache="none")
    assert result.cache.to_json() == {"mode": "none", "reason": "asked for: O_DIRECT"}
    default = convert(raw, tmp_path / "d.raw")  # no cache= given: auto, as before the option existed
    assert default.cache.mode in ("writeback", "none") and default.cache.reason


def test_block_device_gets_o_direct_in_auto(tmp_path: Path) -> None:
    raw = _disk(tmp_path)
    with loop_device(tmp_path / "device.img", 96 * MiB) as dev:
        proc = run_cli("convert", "-q", "-v", raw, dev)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "cache: none (the target is a block device)\n"
        with open(dev, "rb") as f, open(raw, "rb") as g:
            assert f.read() == g.read()


@pytest.mark.slow
def test_auto_inside_a_memory_limit_goes_direct_and_finishes(tmp_path: Path, memory_cgroup: Path) -> None:
    raw = _disk(tmp_path, 512)
    qemu_io(raw, "raw", "write -P 0x44 100M 300M")
    out = tmp_path / "out.qcow2"
    proc = run_in(memory_cgroup, 256 * MiB, "convert", "-v", "-O", "qcow2", raw, out)
    assert proc.returncode == 0, proc.stderr
    assert "cache: none (512 MiB output > half of the 256 MiB cgroup memory limit)" in proc.stderr
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, out).returncode == 0


@pytest.mark.slow
def test_writeback_inside_a_memory_limit_stays_bounded(tmp_path: Path, memory_cgroup: Path) -> None:
    """Forced writeback of 5x the limit's worth of data: the write-behind window keeps the job alive."""
    raw = _disk(tmp_path, 512)
    qemu_io(raw, "raw", "write -P 0x44 100M 300M")
    out = tmp_path / "out.raw"
    proc = run_in(memory_cgroup, 160 * MiB, "convert", "-v", "--cache", "writeback", "--sync", raw, out)
    assert proc.returncode == 0, proc.stderr
    window = int(re.search(r"at most (\d+) MiB of the output", proc.stderr).group(1))  # type: ignore[union-attr]
    assert KICK_BYTES // MiB <= window <= 40, proc.stderr
    assert qemu_img("compare", "-f", "raw", "-F", "raw", raw, out).returncode == 0
