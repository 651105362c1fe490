"""Debian's own boot parts (the signed shim, the signed GRUB, the signed kernel and its modules), fetched with
``apt-get download`` and unpacked with ``dpkg -x``, once per version into a cache shared by pytest workers.

The cache lives in /tmp keyed by package and version, so a new kernel in the archive is fetched afresh and an
old one is never mixed in; an ``fcntl`` lock on the entry makes concurrent xdist workers wait for the first one
instead of fetching twice (filelock is not a dependency of the project). A failed download fails the test with
apt's message: without network these tests cannot prove anything, and skipping would hide that.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.clients import require_tool, run

CACHE = Path(os.environ.get("DISKPORT_BOOT_CACHE", "/tmp/diskport-boot-cache"))


@dataclass(frozen=True)
class BootParts:
    """Paths into the unpacked packages."""

    kernel_release: str      # "6.1.0-57-amd64"
    kernel_package: str      # "linux-image-6.1.0-57-amd64=6.1.192-3"
    vmlinuz: Path            # signed by Debian (shim trusts Debian's CA)
    config: Path             # /boot/config-<release>
    modules: Path            # /lib/modules/<release>
    shim: Path               # shimx64.efi.signed (signed by Microsoft's UEFI CA)
    grub_signed: Path        # grubx64.efi.signed (signed by Debian)


def _candidate(package: str) -> str:
    out = run(require_tool("apt-cache"), "policy", package).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    if not m or m[1] == "(none)":
        pytest.fail(f"apt-cache policy {package}: no candidate version (is the apt cache updated?)\n{out}",
                    pytrace=False)
    return m[1]


def kernel_package() -> str:
    """The exact image package the ``linux-image-amd64`` metapackage's candidate depends on."""
    out = run(require_tool("apt-cache"), "depends", "linux-image-amd64").stdout
    names = re.findall(r"Depends:\s*(linux-image-\d\S*-amd64)\b", out)
    if not names:
        pytest.fail(f"apt-cache depends linux-image-amd64 names no kernel image package:\n{out}", pytrace=False)
    return str(names[0])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def unpacked(package: str) -> Path:
    """``package`` at its candidate version, downloaded and ``dpkg -x``-ed into the cache (once)."""
    version = _candidate(package)
    key = re.sub(r"[^A-Za-z0-9.+_-]", "_", f"{package}_{version}")
    target = CACHE / key
    with _locked(CACHE / f"{key}.lock"):
        if (target / ".complete").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=f".{key}.") as work:
            out = run(require_tool("apt-get"), "download", f"{package}={version}", cwd=work, check=False)
            debs = list(Path(work).glob("*.deb"))
            if out.returncode != 0 or len(debs) != 1:
                pytest.fail(f"apt-get download {package}={version} failed (these boot tests need the Debian "
                            f"archive): {out.stderr.strip() or out.stdout.strip()}", pytrace=False)
            tree = Path(work) / "tree"
            run(require_tool("dpkg"), "-x", debs[0], tree)
            (tree / ".complete").write_text(f"{package}={version}\n")
            tree.rename(target)
    return target


def boot_parts() -> BootParts:
    image = kernel_package()
    release = image.removeprefix("linux-image-")
    kernel = unpacked(image)
    shim = unpacked("shim-signed")
    grub = unpacked("grub-efi-amd64-signed")
    parts = BootParts(
        kernel_release=release, kernel_package=f"{image}={_candidate(image)}",
        vmlinuz=kernel / "boot" / f"vmlinuz-{release}", config=kernel / "boot" / f"config-{release}",
        modules=kernel / "lib" / "modules" / release,
        shim=shim / "usr/lib/shim/shimx64.efi.signed",
        grub_signed=grub / "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed")
    for path in (parts.vmlinuz, parts.config, parts.modules, parts.shim, parts.grub_signed):
        if not path.exists():
            pytest.fail(f"{path} is not in the unpacked package: the package's layout changed", pytrace=False)
    return parts
