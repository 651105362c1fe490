"""streamOptimized VMDKs as qemu-img writes them (directory and tables before the grains, no footer, no
end-of-stream marker) read from a stream: inside gzip/xz/zstd and over HTTP without ranges."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest
import zstandard

from diskport import convert
from diskport.errors import CorruptImage
from diskport.importer import import_image
from diskport.net import RetryPolicy
from diskport.sources.http import HttpOptions
from tests.support import MiB
from tests.support.images import make_image, pvc_dir, qemu_raw_sha256, sha256_file
from tests.support.servers import PlainHTTPServer

FAST = HttpOptions(retry=RetryPolicy(attempts=2, backoff=0.05, max_backoff=0.2), stall_timeout=1.0,
                   connect_timeout=2.0)
CODECS = {"gz": gzip.compress, "xz": lzma.compress, "zst": lambda d: zstandard.ZstdCompressor().compress(d)}
# Incompressible data up to the last grain: the file ends right after that grain, no zero sector follows.
LAYOUT = [(1 * MiB, 2 * MiB, "random"), (5 * MiB, 64 * 1024, "text"), (8 * MiB - 128 * 1024, 128 * 1024, "random")]


def markers(data: bytes) -> tuple[list[int], list[int]]:
    """(file offsets of the grain markers, types of the metadata markers) after the header area."""
    overhead = struct.unpack_from("<Q", data, 64)[0] * 512  # header: overhead, sectors
    grains: list[int] = []
    meta: list[int] = []
    pos = overhead
    while pos + 16 <= len(data):
        value, size = struct.unpack_from("<QI", data, pos)
        if size == 0:
            meta.append(struct.unpack_from("<I", data, pos + 12)[0])
            pos += 512 * (1 + value)
            continue
        grains.append(pos)
        pos += -(-(12 + size) // 512) * 512
    return grains, meta


@pytest.fixture
def qemu_stream(tmp_path: Path) -> tuple[Path, str]:
    vmdk = make_image(tmp_path, "vmdk", 8 * MiB, "subformat=streamOptimized", name="disk.vmdk", layout=LAYOUT)
    data = vmdk.read_bytes()
    # the header claims its directory up front (not GD_AT_END), and nothing follows the last grain
    assert struct.unpack_from("<Q", data, 56)[0] != 0xFFFF_FFFF_FFFF_FFFF  # gd_offset
    grains, meta = markers(data)
    assert meta == [] and len(grains) > 10, (meta, len(grains))
    return vmdk, qemu_raw_sha256(vmdk, tmp_path)


@pytest.mark.parametrize("ext", list(CODECS))
def test_qemu_stream_optimized_converts_from_compression(tmp_path: Path, qemu_stream: tuple[Path, str],
                                                         ext: str) -> None:
    vmdk, expected = qemu_stream
    packed = tmp_path / f"disk.vmdk.{ext}"
    packed.write_bytes(CODECS[ext](vmdk.read_bytes()))
    out = tmp_path / "out.raw"
    result = convert(packed, out)
    assert result.access.kind == "stream", str(result.access)
    assert result.access.reason.startswith("streamOptimized"), str(result.access)
    assert sha256_file(out) == expected


def test_qemu_stream_optimized_cut_at_a_grain_is_truncated(tmp_path: Path, qemu_stream: tuple[Path, str]) -> None:
    vmdk, _ = qemu_stream
    data = vmdk.read_bytes()
    grains, _ = markers(data)
    for cut in (grains[len(grains) // 2], grains[-1]):  # whole grains missing, the stream ends between markers
        packed = tmp_path / "cut.vmdk.gz"
        packed.write_bytes(gzip.compress(data[:cut]))
        with pytest.raises(CorruptImage, match=r"before all the grains its grain tables name.*truncated"):
            convert(packed, tmp_path / "out.raw")
        assert not (tmp_path / "out.raw").exists()


def test_qemu_stream_optimized_over_http_without_ranges(plain_http: PlainHTTPServer, serve_dir: Path,
                                                        tmp_path: Path, qemu_stream: tuple[Path, str]) -> None:
    vmdk, expected = qemu_stream
    plain_http.put("disk.vmdk", vmdk.read_bytes())
    dest = pvc_dir(tmp_path) / "disk.img"
    result = import_image(plain_http.url("disk.vmdk"), dest, http=FAST)
    assert sha256_file(dest) == expected
    assert result.access.kind == "stream", str(result.access)
    assert result.access.reason.startswith("streamOptimized"), str(result.access)
