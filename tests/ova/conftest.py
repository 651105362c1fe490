"""The disks most OVA tests pack: three streamOptimized VMDKs of different sizes, with qemu-img's raw digests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ova.build import Disk, stream_vmdk
from tests.support import MiB


@pytest.fixture
def disks(tmp_path: Path) -> list[tuple[Disk, str]]:
    return [stream_vmdk(tmp_path, 6 * MiB + 64 * 1024 * (i + 1), seed=i + 1) for i in range(3)]
