"""The qcow2 writer, checked by qemu-img: every cluster size, an odd virtual size, and zero clusters left
unallocated. Round trips from every qcow2 variant qemu writes are in tests/formats/test_qcow2.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diskport import convert
from tests.support import MiB
from tests.support.clients import qemu_img
from tests.support.images import make_image


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
def test_qcow2_writer_cluster_sizes(tmp_path: Path, cluster_size: int) -> None:
    raw = make_image(tmp_path, "raw", 9 * MiB + 512, name="odd.raw")  # size not a cluster multiple
    out = tmp_path / "out.qcow2"
    convert(raw, out, output_format="qcow2", cluster_size=cluster_size)
    assert qemu_img("check", out, check=False).returncode == 0
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, out, check=False).returncode == 0
    info = json.loads(qemu_img("info", "--output=json", out).stdout)
    assert info["cluster-size"] == cluster_size
    assert info["virtual-size"] == 9 * MiB + 512


def test_zero_clusters_are_not_allocated_in_output(tmp_path: Path) -> None:
    raw = make_image(tmp_path, "raw", 16 * MiB, layout=[(0, 64 * 1024, "random"), (8 * MiB, 4096, "0x01")])
    out = tmp_path / "out.qcow2"
    convert(raw, out, output_format="qcow2")
    check = json.loads(qemu_img("check", "--output=json", out).stdout)
    assert check["allocated-clusters"] == 2
