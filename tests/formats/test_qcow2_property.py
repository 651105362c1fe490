"""Property: random writes, zero writes and discards made by qemu-io convert exactly as qemu-img converts them."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskport import convert
from tests.support.clients import qemu_img, qemu_io
from tests.support.images import diskport_raw_sha256, qemu_raw_sha256

SIZE = 4 * 1024 * 1024
SECTOR = 512

operation = st.tuples(
    st.sampled_from(["write -P", "write -z", "discard"]),
    st.integers(0, SIZE // SECTOR - 1),
    st.integers(1, 512),
    st.integers(1, 255),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cluster_bits=st.sampled_from([9, 12, 16, 21]),
    extended_l2=st.booleans(),
    compat=st.sampled_from(["0.10", "1.1"]),
    ops=st.lists(operation, min_size=1, max_size=12),
)
def test_random_extents_convert_like_qemu(cluster_bits: int, extended_l2: bool, compat: str,
                                          ops: list[tuple[str, int, int, int]]) -> None:
    if cluster_bits < 14 or compat == "0.10":
        extended_l2 = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        image = tmp_path / "random.qcow2"
        options = f"cluster_size={1 << cluster_bits},compat={compat}"
        if extended_l2:
            options += ",extended_l2=on"
        qemu_img("create", "-f", "qcow2", "-o", options, image, str(SIZE))
        commands = []
        for op, sector, count, pattern in ops:
            start = sector * SECTOR
            length = min(count * SECTOR, SIZE - start)
            commands.append(f"{op} {pattern} {start} {length}" if op == "write -P" else f"{op} {start} {length}")
        qemu_io(image, "qcow2", *commands)
        assert diskport_raw_sha256(image, tmp_path) == qemu_raw_sha256(image, tmp_path)
        out = tmp_path / "copy.qcow2"
        convert(image, out, output_format="qcow2")
        assert qemu_img("compare", image, out, check=False).returncode == 0
