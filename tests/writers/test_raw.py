"""The raw writer: zeros become holes, whatever the source stored them as."""

from __future__ import annotations

from pathlib import Path

from diskport import convert
from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io
from tests.support.images import make_image, sha256_file


def test_raw_output_is_sparse(tmp_path: Path) -> None:
    raw = make_image(tmp_path, "raw", 64 * MiB, layout=[(0, MiB, "random"), (32 * MiB, 4096, "0x01")])
    image = tmp_path / "sparse.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, image)
    # zeros written as data in the qcow2 must still become holes in the raw output
    qemu_io(image, "qcow2", "write -P 0 40M 8M")
    out = tmp_path / "out.raw"
    result = convert(image, out)
    assert out.stat().st_size == 64 * MiB
    assert out.stat().st_blocks * 512 <= MiB + 64 * 1024
    assert result.data_bytes == MiB + 4096
    assert sha256_file(out) == sha256_file(raw)
