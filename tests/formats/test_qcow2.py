"""qcow2 reading against qemu-img as the oracle, and every qcow2 variant qemu writes converted back to qcow2.

The writer's own tests (cluster sizes, what it allocates) are in tests/writers/test_qcow2.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diskport import convert
from diskport.formats import open_image
from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io
from tests.support.images import diskport_raw_sha256, make_image, qemu_raw_sha256

# (name, qemu-img convert arguments, -o options)
VARIANTS = [
    ("v2-64k", [], "compat=0.10,cluster_size=65536"),
    ("v3-512", [], "compat=1.1,cluster_size=512"),
    ("v3-64k", [], "compat=1.1,cluster_size=65536"),
    ("v3-2m", [], "compat=1.1,cluster_size=2097152"),
    ("v3-deflate", ["-c"], "compression_type=zlib"),
    ("v3-zstd", ["-c"], "compression_type=zstd"),
    ("v3-extl2-64k", [], "extended_l2=on,cluster_size=65536"),
    ("v3-extl2-2m", [], "extended_l2=on,cluster_size=2097152"),
    ("v2-deflate-4k", ["-c"], "compat=0.10,cluster_size=4096"),
]


def qemu_qcow2(tmp_path: Path, name: str, extra: list[str], options: str, size: int = 24 * MiB) -> Path:
    raw = make_image(tmp_path, "raw", size, name=f"{name}.raw")
    out = tmp_path / f"{name}.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *extra, "-o", options, raw, out)
    raw.unlink()
    return out


def add_zero_and_sparse_regions(image: Path) -> None:
    """Zero clusters (write -z), discarded clusters and partial (subcluster) writes through qemu-io."""
    qemu_io(image, "qcow2",
            "write -z 1M 1M",          # zero clusters over data
            "discard 4M 512k",
            "write -P 0xc3 9M 4k",     # a partial cluster in a hole
            "write -P 0x11 10M 6k",
            "write -z 11M 8k",
            "write -P 0x7e 20M 1536")


@pytest.mark.parametrize(("name", "extra", "options"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_raw_output_matches_qemu(tmp_path: Path, name: str, extra: list[str], options: str) -> None:
    image = qemu_qcow2(tmp_path, name, extra, options)
    add_zero_and_sparse_regions(image)
    assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path)


@pytest.mark.parametrize(("name", "extra", "options"), VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("compression", [None, "zlib", "zstd"])
def test_qcow2_output_checks_and_compares(tmp_path: Path, name: str, extra: list[str], options: str,
                                          compression: str | None) -> None:
    image = qemu_qcow2(tmp_path, name, extra, options)
    add_zero_and_sparse_regions(image)
    out = tmp_path / "out.qcow2"
    convert(image, out, output_format="qcow2", compression=compression)
    check = qemu_img("check", "--output=json", out, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0
    compare = qemu_img("compare", image, out, check=False)
    assert compare.returncode == 0, compare.stdout
    info = json.loads(qemu_img("info", "--output=json", out).stdout)
    assert info["format-specific"]["data"]["compression-type"] == (compression or "zlib")
    if compression:
        assert report["compressed-clusters"] > 0


def test_extents_describe_allocation(tmp_path: Path) -> None:
    image = tmp_path / "map.qcow2"
    qemu_img("create", "-f", "qcow2", image, "8M")
    qemu_io(image, "qcow2", "write -P 1 0 64k", "write -P 2 64k 64k", "write -z 1M 64k", "write -P 3 2M 128k")
    with open_image(image) as img:
        exts = list(img.extents())
    assert sum(e.length for e in exts) == 8 * MiB
    data = [(e.start, e.length) for e in exts if not e.zero]
    assert data == [(0, 128 * 1024), (2 * MiB, 128 * 1024)]
    # qemu-img allocated the first two clusters contiguously: one extent, one host run
    assert exts[0].host is not None


def test_external_images(testdata: Path, tmp_path: Path) -> None:
    expected = {
        "ext2.qcow2": "a6c2f0e39afe6c6ab432ca5465349fcefe8dc944398e97b2d957d3f89dbb5d80",
        "windows_volume.qcow2": "44abe9deca9658f331a2bdba2deb53192d04f35d157a1fb3ba0597b03f0524f2",
        "iso9660.raw": "7b9d0c5fbd5a22458eeb2288f2076d65b3541c6e27df449f96e372270fce7720",
    }
    for name, digest in expected.items():
        assert diskport_raw_sha256(testdata / name, tmp_path) == digest, name
