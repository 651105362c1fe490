"""Format detection from content, never from the name; the choice between formats that both claim the bytes."""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

import pytest
import zstandard

from diskport.formats import open_image, probe_scores, read_head
from diskport.sources import FileSource
from diskport.sources.compression import detect_compression
from tests.support import MiB
from tests.support.clients import qemu_img
from tests.support.images import make_image

QEMU_FORMATS = [
    ("qcow2", "", "qcow2"),
    ("vmdk", "subformat=monolithicSparse", "vmdk"),
    ("vmdk", "subformat=streamOptimized", "vmdk"),
    ("vpc", "subformat=dynamic", "vpc"),
    ("vpc", "subformat=fixed", "vpc"),
    ("vhdx", "", "vhdx"),
    ("vdi", "", "vdi"),
    ("raw", "", "raw"),
]


@pytest.mark.parametrize(("fmt", "options", "expected"), QEMU_FORMATS,
                         ids=[f"{f}-{o}" for f, o, _ in QEMU_FORMATS])
def test_probe_finds_format_whatever_the_name(tmp_path: Path, fmt: str, options: str, expected: str) -> None:
    image = make_image(tmp_path, fmt, 4 * MiB, options, name="disk.img")  # the name says nothing
    with FileSource(image) as source:
        scores = probe_scores(source)
    assert max(scores, key=lambda name: scores[name]) == expected
    with open_image(image) as opened:
        assert opened.format == expected


def test_iso_is_recognised(testdata: Path) -> None:
    with open_image(testdata / "iso9660.raw") as image:
        assert image.format == "iso"


@pytest.mark.parametrize(("compress", "name"), [
    (gzip.compress, "gzip"), (lzma.compress, "xz"), (bz2.compress, "bzip2"),
    (lambda d: zstandard.ZstdCompressor().compress(d), "zstd"),
])
def test_compression_layers_detected(compress: object, name: str) -> None:
    assert callable(compress)
    assert detect_compression(compress(b"\0" * 4096)) == name


def test_plain_images_have_no_compression(testdata: Path) -> None:
    for image in testdata.iterdir():
        if image.suffix != ".md":
            with FileSource(image) as source:
                assert detect_compression(read_head(source)) is None, image.name


def test_tie_is_resolved_by_validation(tmp_path: Path) -> None:
    """A VMDK descriptor's text and a fixed VHD footer both claim this file; only the VHD validates."""
    vhd = make_image(tmp_path, "vpc", 2 * MiB, "subformat=fixed", layout=[(0, 4096, "0x20")])
    data = bytearray(vhd.read_bytes())
    text = b'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
    data[: len(text)] = text
    tricky = tmp_path / "tricky.bin"
    tricky.write_bytes(bytes(data))
    with FileSource(tricky) as source:
        scores = probe_scores(source)
    assert scores["vmdk"] == scores["vpc"]
    with open_image(tricky) as image:
        assert image.format == "vpc"
    assert qemu_img("info", "-f", "vpc", tricky).returncode == 0
