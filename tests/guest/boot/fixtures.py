"""Session fixtures for the boot tests: Debian's packages (shared cache), then each disk built once per pytest
worker, lazily, in that worker's own temporary folder (so xdist workers never share a file being written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guest.boot import debs, disks, layouts


@pytest.fixture(scope="session")
def boot_kit(tmp_path_factory: pytest.TempPathFactory) -> disks.Kit:
    return disks.Kit(debs.boot_parts(), tmp_path_factory.mktemp("boot-kit"))


@pytest.fixture(scope="session")
def gpt_both_disk(boot_kit: disks.Kit) -> Path:
    return disks.gpt_both(boot_kit, boot_kit.work / "gpt-both.raw")


@pytest.fixture(scope="session")
def mbr_gap_disk(boot_kit: disks.Kit) -> Path:
    return disks.mbr_gap(boot_kit, boot_kit.work / "mbr-gap.raw")


@pytest.fixture(scope="session")
def gpt_signed_disk(boot_kit: disks.Kit) -> Path:
    return disks.gpt_signed(boot_kit, boot_kit.work / "gpt-signed.raw")


@pytest.fixture(scope="session")
def gpt_novirtio_disk(boot_kit: disks.Kit) -> Path:
    return disks.gpt_both(boot_kit, boot_kit.work / "gpt-novirtio.raw", virtio=False)


@pytest.fixture(scope="session")
def gpt_initramfs_novirtio_disk(boot_kit: disks.Kit) -> Path:
    """virtio_blk under /lib/modules, but not in the initramfs."""
    return disks.gpt_both(boot_kit, boot_kit.work / "gpt-initramfs-novirtio.raw", initramfs_virtio=False)


@pytest.fixture(scope="session")
def hybrid_zeroed_disk(boot_kit: disks.Kit, gpt_both_disk: Path) -> Path:
    return disks.hybrid_zeroed(gpt_both_disk, boot_kit.work / "hybrid-zeroed.raw")


@pytest.fixture(scope="session")
def rocky_boot_disk(boot_kit: disks.Kit) -> layouts.Layout:
    return layouts.rocky(boot_kit, boot_kit.work / "rocky.raw")


@pytest.fixture(scope="session")
def fedora_boot_disk(boot_kit: disks.Kit) -> layouts.Layout:
    return layouts.fedora(boot_kit, boot_kit.work / "fedora.raw")
