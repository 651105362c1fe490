"""The fixtures every test can use; the helpers themselves live in tests/support/ (import them from there).

The names below are re-exported so that a test written against the old layout (``from tests.conftest import
make_image``) still runs; new tests import from ``tests.support.clients`` / ``tests.support.images``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO, TESTDATA, MiB
from tests.support.clients import qemu_img, qemu_io, require_tool, run, run_cli
from tests.support.images import (
    diskport_raw_sha256,
    loop_device,
    make_image,
    pvc_dir,
    qemu_raw_sha256,
    sha256_file,
    write_pattern_raw,
)

pytest_plugins = [
    "tests.support.servers",   # real servers on loopback: nginx, plain http, TLS, fault injection, proxy
    "tests.support.registry",  # docker-registry (plain, TLS + htpasswd, token auth), token server, fault proxy
    "tests.guest.boot.fixtures",  # bootable disks (Debian's shim, GRUB, kernel) for the qemu boot tests
]

__all__ = [
    "REPO", "TESTDATA", "MiB", "diskport_raw_sha256", "loop_device", "make_image", "pvc_dir", "qemu_img", "qemu_io",
    "qemu_raw_sha256", "require_tool", "run", "run_cli", "sha256_file", "write_pattern_raw",
]


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not TESTDATA.is_dir():
        pytest.fail(f"{TESTDATA} is missing: the external test images live beside the repo", pytrace=False)
    return TESTDATA


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


@pytest.fixture
def memory_cgroup(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A real cgroup v1 memory group named after the test, removed afterwards (tests/test_cache.py, tests/oci)."""
    from tests.support.host import memory_group

    with memory_group(request.node.name.split("[")[0]) as group:
        yield group
