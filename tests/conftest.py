"""Shared fixtures: qemu-img/qemu-io as the oracle, image builders, and the CLI runner.

A missing oracle tool is a test failure, never a skip: ``make test`` installs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.support.servers",   # real servers on loopback: nginx, plain http, TLS, fault injection, proxy
    "tests.support.registry",  # docker-registry (plain, TLS + htpasswd, token auth), token server, fault proxy
    "tests.guest.boot.fixtures",  # bootable disks (Debian's shim, GRUB, kernel) for the qemu boot tests
]

REPO = Path(__file__).resolve().parent.parent
TESTDATA = REPO.parent / "shared" / "testdata"
MiB = 1024 * 1024


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; 'make test' installs it (it is the test oracle)", pytrace=False)
    return path


def run(*args: str | os.PathLike[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(a) for a in args], check=check, capture_output=True, text=True,
                          **kw)  # type: ignore[call-overload, no-any-return]


def qemu_img(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(require_tool("qemu-img"), *args, check=check)


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    args: list[str] = [require_tool("qemu-io"), "-f", fmt]
    for c in commands:
        args += ["-c", c]
    out = run(*args, image)
    if "failed" in out.stdout.lower() or "error" in out.stderr.lower():
        raise AssertionError(f"qemu-io failed: {out.stdout} {out.stderr}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def qemu_raw_sha256(image: Path, tmp_path: Path, fmt: str | None = None) -> str:
    """sha256 of ``qemu-img convert -O raw`` of the image: the oracle's answer."""
    out = tmp_path / f"oracle-{image.name}.raw"
    args = ["convert"] + (["-f", fmt] if fmt else []) + ["-O", "raw", str(image), str(out)]
    qemu_img(*args)
    digest = sha256_file(out)
    out.unlink()
    return digest


def diskport_raw_sha256(image: Path, tmp_path: Path) -> str:
    from diskport import convert

    out = tmp_path / f"diskport-{image.name}.raw"
    convert(image, out, output_format="raw")
    digest = sha256_file(out)
    out.unlink()
    return digest


def write_pattern_raw(path: Path, size: int, seed: int = 1, layout: Sequence[tuple[int, int, str]] = ()) -> Path:
    """A raw file of ``size`` bytes: zeros except the ``(offset, length, kind)`` runs in ``layout``.

    kind is ``random`` (incompressible), ``text`` (compressible) or a single byte value like ``0xab``.
    Without a layout, a default mix of all three with zero gaps is written.
    """
    rng = random.Random(seed)
    if not layout:
        step = max(size // 16, 4096)
        layout = [(o, min(step // 2, size - o), ("random", "text", "0x5a")[i % 3])
                  for i, o in enumerate(range(0, size, step))]
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length, kind in layout:
            if kind == "random":
                data = rng.randbytes(length)
            elif kind == "text":
                line = b"diskport test data line %d\n" % rng.randrange(1000)
                data = (line * (length // len(line) + 1))[:length]
            else:
                data = bytes([int(kind, 16)]) * length
            f.seek(offset)
            f.write(data)
    return path


def make_image(tmp_path: Path, fmt: str, size: int = 8 * MiB, options: str = "", name: str | None = None,
               seed: int = 1, layout: Sequence[tuple[int, int, str]] = ()) -> Path:
    """A ``fmt`` image made by ``qemu-img convert`` from a patterned raw file."""
    raw = write_pattern_raw(tmp_path / f"pattern-{seed}.raw", size, seed, layout)
    out = tmp_path / (name or f"image-{fmt}-{seed}.{fmt}")
    args = ["convert", "-f", "raw", "-O", fmt] + (["-o", options] if options else []) + [str(raw), str(out)]
    qemu_img(*args)
    raw.unlink()
    return out


def run_cli(*args: str | os.PathLike[str], check: bool = False, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the ``diskport`` command line in a subprocess, as a user would."""
    return run(sys.executable, "-m", "diskport", *args, check=check, **kw)


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not TESTDATA.is_dir():
        pytest.fail(f"{TESTDATA} is missing: the external test images live beside the repo", pytrace=False)
    return TESTDATA


@contextlib.contextmanager
def loop_device(backing: Path, size: int, fill: int = 0xFF) -> Iterator[str]:
    """A real block device (a loop device over ``backing``, filled with ``fill``), detached afterwards."""
    require_tool("losetup")
    with open(backing, "wb") as f:
        for _ in range(0, size, MiB):
            f.write(bytes([fill]) * MiB)
    dev = run("losetup", "--find", "--show", backing).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev, check=False)


def pvc_dir(tmp_path: Path) -> Path:
    """A folder standing for a persistent volume: after an import it must hold the disk and nothing else."""
    folder = tmp_path / "pvc"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The retry policy's waits, recorded instead of slept (a cancel still ends one, as a real wait would)."""
    import threading

    from diskport.net import Cancelled

    slept: list[float] = []

    def record(seconds: float, cancel: threading.Event | None) -> None:
        slept.append(seconds)
        if cancel is not None and cancel.is_set():
            raise Cancelled()

    monkeypatch.setattr("diskport.net.retry._sleep", record)
    return slept
