"""The command line as a user meets it: inspect, convert, --force, interruption, disk full, memory, devices."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io, run, run_cli
from tests.support.images import loop_device, make_image, sha256_file


def test_inspect_json_uses_qemu_field_names(tmp_path: Path, testdata: Path) -> None:
    for image in (testdata / "windows_volume.qcow2", make_image(tmp_path, "qcow2", 8 * MiB, "compat=0.10")):
        ours = json.loads(run_cli("inspect", "--json", image, check=True).stdout)
        theirs = json.loads(qemu_img("info", "--output=json", image).stdout)
        for key in ("format", "virtual-size", "cluster-size", "actual-size"):
            assert ours[key] == theirs[key], key
        assert ours["format-specific"]["type"] == "qcow2"
        assert ours["format-specific"]["data"]["compat"] == theirs["format-specific"]["data"]["compat"]


def test_inspect_text(testdata: Path) -> None:
    out = run_cli("inspect", testdata / "iso9660.raw", check=True).stdout
    assert "format:        iso" in out
    assert "(366592 bytes)" in out


def test_probe_ignores_file_name(tmp_path: Path) -> None:
    image = make_image(tmp_path, "qcow2", 4 * MiB, name="disguised.iso")
    facts = json.loads(run_cli("inspect", "--json", image, check=True).stdout)
    assert facts["format"] == "qcow2"


def test_convert_refuses_existing_destination_without_force(tmp_path: Path) -> None:
    image = make_image(tmp_path, "qcow2", 4 * MiB)
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"precious")
    proc = run_cli("convert", "-q", image, dst)
    assert proc.returncode == 2  # a usage error, like every "DST exists" in diskport
    assert "already exists; pass --force" in proc.stderr
    assert dst.read_bytes() == b"precious"
    assert run_cli("convert", "-q", "--force", image, dst).returncode == 0
    assert dst.stat().st_size == 4 * MiB


def test_convert_output_is_quiet_without_terminal(tmp_path: Path) -> None:
    image = make_image(tmp_path, "qcow2", 4 * MiB)
    proc = run_cli("convert", image, tmp_path / "out.raw")
    assert proc.returncode == 0
    # no progress bar when stderr is not a terminal: only the one summary line
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "->" in proc.stderr and "\r" not in proc.stderr
    assert run_cli("convert", "-q", image, tmp_path / "out2.raw").stderr == ""


def big_random_raw(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
    return path


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_convert_leaves_nothing(tmp_path: Path, sig: int, code: int) -> None:
    src = big_random_raw(tmp_path / "big.raw", 256 * MiB)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "disk.qcow2"
    # compression keeps the job busy long enough to interrupt it mid-way
    proc = subprocess.Popen([sys.executable, "-m", "diskport", "convert", "-q", "-O", "qcow2", "-c",
                             str(src), str(dst)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not os.listdir(out_dir) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.listdir(out_dir), "the conversion never started writing"
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert "nothing was left behind" in err
    assert os.listdir(out_dir) == []


def test_disk_full_leaves_nothing(tmp_path: Path) -> None:
    src = make_image(tmp_path, "qcow2", 32 * MiB)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def limit_file_size() -> None:  # the kernel's file-size limit fails writes as a full disk does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, MiB))

    proc = subprocess.run([sys.executable, "-m", "diskport", "convert", "-q", "-O", "qcow2", str(src),
                           str(out_dir / "disk.qcow2")], capture_output=True, text=True,
                          preexec_fn=limit_file_size, check=False)
    assert proc.returncode == 1
    assert "write at" in proc.stderr and "failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(out_dir) == []


def test_memory_stays_bounded_on_100g_sparse(tmp_path: Path) -> None:
    image = tmp_path / "huge.qcow2"
    qemu_img("create", "-f", "qcow2", image, "100G")
    qemu_io(image, "qcow2", "write -P 0x5a 0 4M", "write -P 0xa5 50G 4M", "write -P 0x11 99G 4M")
    # VmHWM, the peak of this process's own memory: ru_maxrss would also count the pytest worker's pages that
    # the child held between fork and exec (Linux keeps the larger peak across exec).
    script = (
        "import re, sys\n"
        "from diskport import convert\n"
        "convert(sys.argv[1], sys.argv[2], output_format=sys.argv[3])\n"
        "print(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
    )
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"out.{fmt}"
        proc = run(sys.executable, "-c", script, image, out, fmt)
        peak_mib = int(proc.stdout.strip()) / 1024
        assert peak_mib < 150, f"{fmt}: peak RSS {peak_mib:.0f} MiB"
        assert out.stat().st_blocks * 512 < 64 * MiB
        out.unlink()


def test_block_device_destination_zeroes_old_data(tmp_path: Path) -> None:
    """A device may hold old data: zero runs must be zeroed on it, never skipped."""
    with loop_device(tmp_path / "device.img", 16 * MiB) as dev:
        image = tmp_path / "disk.qcow2"
        qemu_img("create", "-f", "qcow2", image, "8M")
        qemu_io(image, "qcow2", "write -P 0x42 1M 1M")
        proc = run_cli("convert", "-q", image, dev)
        assert proc.returncode == 0, proc.stderr
        with open(dev, "rb") as f:
            written = f.read(8 * MiB)
            rest = f.read()
        assert written == bytes(MiB) + b"\x42" * MiB + bytes(6 * MiB)
        assert rest == b"\xff" * (8 * MiB), "bytes past the virtual size are not touched"
        small = tmp_path / "big.qcow2"
        qemu_img("create", "-f", "qcow2", small, "32M")
        proc = run_cli("convert", "-q", small, dev)
        assert proc.returncode == 1
        assert "block device holds 16777216 bytes; the disk needs 33554432" in proc.stderr


def test_convert_raw_to_qcow2_to_raw_round_trip(tmp_path: Path) -> None:
    raw = make_image(tmp_path, "raw", 20 * MiB + 4096)
    q = tmp_path / "a.qcow2"
    back = tmp_path / "b.raw"
    assert run_cli("convert", "-q", "-O", "qcow2", "--compression", "zstd", raw, q).returncode == 0
    assert run_cli("convert", "-q", q, back).returncode == 0
    assert sha256_file(back) == sha256_file(raw)


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal (a real pty), convert draws a bar with bytes, rate and time left."""
    import pty

    image = make_image(tmp_path, "qcow2", 64 * MiB)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "diskport", "convert", str(image), str(tmp_path / "o.raw")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower,
                            env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    proc.wait(timeout=60)
    os.close(leader)
    assert proc.returncode == 0
    text = output.decode(errors="replace")
    assert "converting" in text
    assert "MiB" in text


def test_remote_options_are_one_set_with_one_help() -> None:
    """--ca-bundle, --tls-verify, --creds, --pull-secret, --insecure and --platform mean the same on every command
    that takes them: one definition each (cli.registry_options / remote_options / platform_option), one help text."""
    import click

    from diskport import cli

    shared = ("ca_bundle", "tls_verify", "creds", "pull_secret", "insecure", "platform")
    seen: dict[str, dict[str, str]] = {}
    for name, command in cli.main.commands.items():
        for param in command.params:
            if param.name in shared and isinstance(param, click.Option):
                seen.setdefault(param.name, {})[name] = f"{param.opts} {param.help}"
    assert set(seen) == set(shared)
    for option, by_command in seen.items():
        assert len(set(by_command.values())) == 1, (option, by_command)
    assert set(seen["ca_bundle"]) == {"import", "build", "push", "pull", "manifest", "inspect"}
    assert set(seen["pull_secret"]) == set(seen["creds"]) == set(seen["ca_bundle"])
    assert set(seen["insecure"]) == {"import", "manifest", "inspect"}
    assert set(seen["platform"]) == {"import", "pull", "manifest", "inspect"}
