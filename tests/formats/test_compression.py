"""Compressed images: every codec, multi-member files, streaming vs spooling, bombs, damage, scratch hygiene."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from diskport import UnsafeImage, convert
from diskport.errors import CorruptImage
from diskport.inspect import inspect_image
from tests.support import MiB
from tests.support.clients import run_cli
from tests.support.images import make_image, qemu_raw_sha256, sha256_file

CODECS: dict[str, Callable[[bytes], bytes]] = {
    "gz": gzip.compress,
    "xz": lzma.compress,
    "zst": lambda data: zstandard.ZstdCompressor().compress(data),
    "bz2": bz2.compress,
}
NAMES = {"gz": "gzip", "xz": "xz", "zst": "zstd", "bz2": "bzip2"}


def compress_in_parts(path: Path, ext: str, parts: int = 3) -> Path:
    """Compress ``path`` as ``parts`` concatenated members/streams/frames, as parallel compressors write."""
    data = path.read_bytes()
    step = -(-len(data) // parts)
    out = path.with_name(path.name + "." + ext)
    out.write_bytes(b"".join(CODECS[ext](data[i: i + step]) for i in range(0, len(data), step)))
    return out


@pytest.mark.parametrize("ext", list(CODECS))
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_compressed_image_converts_exactly(tmp_path: Path, ext: str, fmt: str) -> None:
    image = make_image(tmp_path, fmt, 6 * MiB + 4096)
    expected = qemu_raw_sha256(image, tmp_path)
    packed = compress_in_parts(image, ext)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out.raw"
    result = convert(packed, out, scratch_dir=str(scratch))
    assert sha256_file(out) == expected
    assert result.compression == [NAMES[ext]]
    assert result.source_format == fmt
    assert result.access.kind == ("stream" if fmt == "raw" else "spooled")
    assert os.listdir(scratch) == []
    assert sorted(os.listdir(tmp_path)) == sorted(["out.raw", "scratch", image.name, packed.name])


def test_streamed_raw_to_qcow2_learns_size_at_the_end(tmp_path: Path) -> None:
    raw = make_image(tmp_path, "raw", 5 * MiB + 512)
    packed = compress_in_parts(raw, "gz")
    out = tmp_path / "out.qcow2"
    convert(packed, out, output_format="qcow2")
    from tests.support.clients import qemu_img

    assert qemu_img("check", out, check=False).returncode == 0
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, out, check=False).returncode == 0


def test_inspect_reports_layers_and_size(tmp_path: Path) -> None:
    raw = make_image(tmp_path, "raw", 3 * MiB)
    facts = inspect_image(compress_in_parts(raw, "bz2"))
    assert facts["format"] == "raw"
    assert facts["virtual-size"] == 3 * MiB
    assert facts["compression"] == ["bzip2"]
    qcow2 = make_image(tmp_path, "qcow2", 3 * MiB)
    packed = compress_in_parts(qcow2, "xz")
    facts = inspect_image(packed)
    assert facts["format"] == "qcow2" and facts["compression"] == ["xz"]
    assert facts["actual-size"] == os.stat(packed).st_blocks * 512


def test_bomb_inside_declared_format_is_refused(tmp_path: Path) -> None:
    """A qcow2 header that declares 1 MiB, followed by a gigabyte of zeros: refused, nothing left behind."""
    header = struct.pack(">4sIQIIQ", b"QFI\xfb", 3, 0, 0, 16, MiB)
    comp = zstandard.ZstdCompressor()
    zeros = bytes(16 * MiB)
    bomb = tmp_path / "bomb.qcow2.zst"
    with open(bomb, "wb") as f, comp.stream_writer(f) as w:
        w.write(header.ljust(65536, b"\0"))
        for _ in range(64):
            w.write(zeros)
    assert bomb.stat().st_size < MiB
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(UnsafeImage, match="decompression bomb"):
        convert(bomb, tmp_path / "out.raw", scratch_dir=str(scratch))
    assert os.listdir(scratch) == []
    assert not (tmp_path / "out.raw").exists()


def test_raw_bomb_is_bounded_by_size_limit(tmp_path: Path) -> None:
    packed = tmp_path / "zeros.raw.gz"
    packed.write_bytes(gzip.compress(bytes(64 * MiB), compresslevel=1))
    with pytest.raises(UnsafeImage, match="more than 16777216 bytes"):
        convert(packed, tmp_path / "out.raw", size_limit=16 * MiB)
    assert os.listdir(tmp_path) == ["zeros.raw.gz"]


@pytest.mark.parametrize("ext", list(CODECS))
def test_damaged_stream_fails_cleanly(tmp_path: Path, ext: str) -> None:
    raw = make_image(tmp_path, "raw", 4 * MiB)
    packed = compress_in_parts(raw, ext, parts=1)
    data = bytearray(packed.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = os.urandom(64)
    packed.write_bytes(bytes(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli("convert", "-q", packed, out_dir / "disk.raw")
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert str(packed) in proc.stderr
    assert os.listdir(out_dir) == []


def test_invalid_deflate_block_is_a_corrupt_image(tmp_path: Path) -> None:
    """isa-l reports a bad deflate block with its own exception class (not OSError or zlib.error): it is a
    CorruptImage like every other damage. This damage (64 random bytes, seed 8) makes isa-l say so."""
    raw = random.Random(1).randbytes(MiB) + b"text line\n" * 300000
    data = bytearray(gzip.compress(raw, mtime=0))
    rng = random.Random(8)
    at = rng.randrange(20, len(data) - 20)
    data[at: at + 64] = rng.randbytes(64)[: len(data) - at]
    packed = tmp_path / "disk.raw.gz"
    packed.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="gzip"):
        convert(packed, tmp_path / "out.raw")
    assert os.listdir(tmp_path) == ["disk.raw.gz"]


def test_truncated_stream_is_an_error(tmp_path: Path) -> None:
    qcow2 = make_image(tmp_path, "qcow2", 4 * MiB)
    packed = compress_in_parts(qcow2, "xz", parts=1)
    os.truncate(packed, packed.stat().st_size // 2)
    with pytest.raises(CorruptImage, match="xz data is damaged"):
        convert(packed, tmp_path / "out.raw")


def test_fixed_vhd_inside_gzip_streams_and_drops_its_footer(tmp_path: Path) -> None:
    """A fixed VHD is a raw disk plus a trailing footer: streamed, recognised at the end, footer not written."""
    from tests.support.clients import qemu_img

    vhd = make_image(tmp_path, "vpc", 10 * MiB, "subformat=fixed")
    expected = qemu_raw_sha256(vhd, tmp_path, fmt="vpc")
    packed = compress_in_parts(vhd, "gz")
    out = tmp_path / "out.raw"
    result = convert(packed, out)
    assert result.source_format == "vpc" and result.access.kind == "stream"
    assert sha256_file(out) == expected
    info = qemu_img("info", "-f", "vpc", "--output=json", vhd).stdout
    assert f'"virtual-size": {out.stat().st_size}' in info


def test_truncated_fixed_vhd_inside_gzip_is_refused(tmp_path: Path) -> None:
    vhd = make_image(tmp_path, "vpc", 10 * MiB, "subformat=fixed")
    data = vhd.read_bytes()
    cut = tmp_path / "cut.vhd"
    cut.write_bytes(data[: 4 * MiB] + data[-512:])
    packed = compress_in_parts(cut, "gz")
    with pytest.raises(CorruptImage, match="truncated"):
        convert(packed, tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize("ext", ["gz", "zst"])
def test_stream_optimized_vmdk_inside_compression_streams(tmp_path: Path, ext: str) -> None:
    vmdk = make_image(tmp_path, "vmdk", 9 * MiB + 65536, "subformat=streamOptimized")
    expected = qemu_raw_sha256(vmdk, tmp_path)
    packed = compress_in_parts(vmdk, ext, parts=1)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out.raw"
    result = convert(packed, out, scratch_dir=str(scratch))
    assert result.access.kind == "stream", str(result.access)
    assert result.access.reason.startswith("streamOptimized"), str(result.access)
    assert sha256_file(out) == expected
    facts = inspect_image(packed)
    assert facts["format"] == "vmdk" and facts["virtual-size"] == 9 * MiB + 65536


def test_truncated_stream_optimized_inside_gzip_fails_cleanly(tmp_path: Path) -> None:
    vmdk = make_image(tmp_path, "vmdk", 8 * MiB, "subformat=streamOptimized", layout=[(0, 8 * MiB, "random")])
    cut = tmp_path / "cut.vmdk"
    data = vmdk.read_bytes()
    for length in (4 * MiB + 1000, len(data) - 3 * 512):  # inside a grain; before the footer and end marker
        cut.write_bytes(data[:length])
        packed = compress_in_parts(cut, "gz", parts=1)
        with pytest.raises(CorruptImage, match="truncated"):
            convert(packed, tmp_path / "out.raw")
        assert not (tmp_path / "out.raw").exists()
        packed.unlink()


# Every single-file variant qemu-img makes, in every codec (descriptor-plus-extent VMDKs are several files and
# cannot be one compressed file).
WRAPPED = [
    ("qcow2", "", "qcow2"),
    ("vmdk", "subformat=monolithicSparse", "vmdk"),
    ("vmdk", "subformat=streamOptimized", "vmdk"),
    ("vpc", "subformat=dynamic", "vpc"),
    ("vpc", "subformat=fixed", "vpc"),
    ("vhdx", "subformat=dynamic", "vhdx"),
    ("vhdx", "subformat=fixed", "vhdx"),
    ("vdi", "static=off", "vdi"),
    ("vdi", "static=on", "vdi"),
]


@pytest.mark.parametrize("ext", list(CODECS))
@pytest.mark.parametrize(("fmt", "options", "expected_format"), WRAPPED, ids=[f"{f}-{o}" for f, o, _ in WRAPPED])
def test_every_variant_in_every_codec(tmp_path: Path, fmt: str, options: str, expected_format: str,
                                      ext: str) -> None:
    image = make_image(tmp_path, fmt, 4 * MiB + 512 * 3, options)
    expected = qemu_raw_sha256(image, tmp_path, fmt=fmt)
    packed = compress_in_parts(image, ext, parts=2)
    out = tmp_path / "out.raw"
    result = convert(packed, out)
    assert result.source_format == expected_format
    assert result.compression == [NAMES[ext]]
    assert sha256_file(out) == expected


def xz_cli(path: Path, *args: str) -> Path:
    from tests.support.clients import require_tool

    out = path.with_name(path.name + ".xz")
    with open(out, "wb") as f:
        import subprocess

        subprocess.run([require_tool("xz"), "-c", *args, str(path)], stdout=f, check=True)
    return out


def test_multi_block_xz_decodes_in_parallel_and_exactly(tmp_path: Path) -> None:
    from diskport.sources.file import FileSource
    from diskport.sources.xz import find_blocks

    qcow2 = make_image(tmp_path, "qcow2", 12 * MiB)
    expected = qemu_raw_sha256(qcow2, tmp_path)
    packed = xz_cli(qcow2, "-T2", "--block-size=1MiB")
    two_streams = tmp_path / "two.raw.xz"
    with FileSource(packed) as source:
        blocks = find_blocks(source)
    assert blocks is not None and len(blocks) > 4
    assert sum(b.uncompressed for b in blocks) == qcow2.stat().st_size
    out = tmp_path / "out.raw"
    convert(packed, out)
    assert sha256_file(out) == expected
    # a raw disk split over two concatenated streams (as parallel compressors write) decodes whole
    raw = make_image(tmp_path, "raw", 6 * MiB, name="disk.raw")
    halves = [tmp_path / "a.raw", tmp_path / "b.raw"]
    data = raw.read_bytes()
    halves[0].write_bytes(data[: 3 * MiB])
    halves[1].write_bytes(data[3 * MiB:])
    two_streams.write_bytes(b"".join(xz_cli(h, "--block-size=512KiB").read_bytes() for h in halves))
    with FileSource(two_streams) as source:
        streams = {b.stream_header for b in find_blocks(source) or []}
    assert len(streams) == 1 and len(find_blocks(FileSource(two_streams)) or []) >= 12
    out.unlink()
    convert(two_streams, out)
    assert sha256_file(out) == sha256_file(raw)


def test_damaged_xz_block_is_reported(tmp_path: Path) -> None:
    raw = make_image(tmp_path, "raw", 8 * MiB, layout=[(0, 8 * MiB, "random")])
    packed = xz_cli(raw, "-0", "--block-size=1MiB")
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="xz"):
        convert(packed, tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").exists()


def test_unrecognised_xz_layout_falls_back_to_sequential(tmp_path: Path) -> None:
    from diskport.sources.file import FileSource
    from diskport.sources.xz import find_blocks

    raw = make_image(tmp_path, "raw", 3 * MiB)
    packed = tmp_path / "disk.raw.xz"
    packed.write_bytes(lzma.compress(raw.read_bytes()) + b"trailing garbage")
    with FileSource(packed) as source:
        assert find_blocks(source) is None  # no footer at the end: the sequential decoder takes over
    convert(packed, tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == sha256_file(raw)


def test_damage_found_by_the_end_check_says_where_it_can(tmp_path: Path) -> None:
    """A flipped byte in compressible text shows only as gzip's CRC at the end: the message must not claim the
    damage lies after the bytes handed out so far, and names the compressed position and the file's size."""
    text = tmp_path / "text.raw"
    text.write_bytes(b"".join(b"line %09d of text\n" % i for i in range(400_000)))
    data = bytearray(gzip.compress(text.read_bytes(), compresslevel=6))
    data[len(data) // 2] ^= 0xFF
    packed = tmp_path / "text.raw.gz"
    packed.write_bytes(bytes(data))
    with pytest.raises(CorruptImage) as caught:
        convert(packed, tmp_path / "out.raw")
    message = str(caught.value)
    assert "end-of-member check" in message and "damaged somewhere before" in message, message
    assert f"compressed byte {len(data)} of {len(data)}" in message
    decompressed = int(message.split("at least ")[1].split(" ")[0])
    assert 0 < decompressed <= text.stat().st_size


def test_inspect_bounds_the_size_scan_of_a_compressed_raw_disk(tmp_path: Path) -> None:
    """A small file that expands a thousandfold: inspect stops at --size-scan-limit and says the size is a
    lower bound, instead of decompressing it all."""
    packed = tmp_path / "big.raw.zst"
    with packed.open("wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as writer:
        for _ in range(256):
            writer.write(bytes(MiB))
    assert packed.stat().st_size < MiB
    out = run_cli("inspect", "--json", "--size-scan-limit", "64M", packed)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["virtual-size-known"] is False
    assert 64 * MiB <= facts["virtual-size"] < 256 * MiB
    assert "stopped after" in facts["access"]
    whole = json.loads(run_cli("inspect", "--json", packed).stdout)
    assert whole["virtual-size"] == 256 * MiB and "virtual-size-known" not in whole
