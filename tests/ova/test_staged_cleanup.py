"""A multi-disk job (``import --all-disks``) SIGKILLed mid-way leaves only part files, and the next job for the same
destinations removes them (they are named and locked as ``destination.py``'s part files) and writes every disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.ova.build import Disk, Vm, make_ova
from tests.support import MiB
from tests.support.clients import run_cli
from tests.support.images import make_image, qemu_raw_sha256, sha256_file
from tests.support.servers import NginxServer

PART = ".diskport-part"


def test_killed_multi_disk_job_leaves_part_files_the_next_run_removes(serve_dir: Path, tmp_path: Path) -> None:
    images = [make_image(tmp_path, "qcow2", 16 * MiB, name=f"d{i}.qcow2", seed=i + 1) for i in range(3)]
    ova = make_ova(serve_dir / "three.ova", [Vm("three", [Disk(p, 16 * MiB) for p in images])])
    expected = [qemu_raw_sha256(p, tmp_path) for p in images]
    folder = tmp_path / "out"
    # a slow server (nginx's limit_rate), so the job is still writing when it is killed
    with NginxServer(serve_dir, tmp_path / "nginx", rate_per_connection="2m") as slow:
        proc = subprocess.Popen([sys.executable, "-m", "diskport", "import", slow.url(ova.name), str(folder),
                                 "--all-disks", "--progress", "none"], stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            # killed once the first disk is staged and the second one is being written
            while not (folder.is_dir() and any(n.startswith(".three-disk2.raw.") for n in os.listdir(folder))):
                assert proc.poll() is None, f"the job ended before it was killed: {proc.stderr.read()}"  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the second disk was never staged"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
            proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL
    left = sorted(os.listdir(folder))
    assert any(n.startswith(".three-disk1.raw.") for n in left), left
    assert left and all(n.endswith(PART) for n in left), left
    assert not any(n in left for n in ("three-disk1.raw", "three-disk2.raw", "three-disk3.raw"))

    done = run_cli("convert", ova, folder, "--all-disks")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(folder)) == ["three-disk1.raw", "three-disk2.raw", "three-disk3.raw"]
    assert [sha256_file(folder / f"three-disk{k}.raw") for k in (1, 2, 3)] == expected
    # a destination whose folder is missing: one line, nothing staged
    missing = run_cli("convert", ova, "--disk", f"0={folder / 'a.raw'}", "--disk", f"1={tmp_path / 'no' / 'b.raw'}")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
    assert "does not exist" in missing.stderr and sorted(os.listdir(folder))[0] == "three-disk1.raw"
    assert not (folder / "a.raw").exists() and not any(n.endswith(PART) for n in os.listdir(folder))


def test_a_live_jobs_staged_file_is_not_removed(tmp_path: Path) -> None:
    """A part file whose job is alive (its process exists and holds the lock) stays; only dead ones go."""
    from diskport.destination import make_part_file, remove_stale_parts

    dest = tmp_path / "disk.raw"
    name, fd = make_part_file(str(dest))
    inner = tmp_path / f".{os.path.basename(name)}.{os.getpid()}.zyxwvuts{PART}"  # its writer's part file
    inner.write_bytes(b"y")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        alive = tmp_path / f".disk.raw.{sleeper.pid}.abcdefgh{PART}"
        alive.write_bytes(b"x")
        assert remove_stale_parts(str(dest)) == []  # ours (locked) and the sleeper's (alive)
        assert os.path.exists(name) and alive.exists() and inner.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    os.close(fd)
    removed = remove_stale_parts(str(dest))
    # ours, unlocked now, goes with its writer's part file; the sleeper's is dead
    assert sorted(removed) == sorted([os.path.basename(name), alive.name, inner.name])
    assert os.listdir(tmp_path) == []
