"""Bad input that is not about one format: a missing source is one line and exit 1, usage errors exit 2, and
neither leaves anything at the destination. Each format's own bad input is in tests/formats/test_<format>_bad.py
or beside that format's tests."""

from __future__ import annotations

from pathlib import Path

from tests.support import MiB
from tests.support.clients import run_cli
from tests.support.images import make_image


def test_missing_source() -> None:
    proc = run_cli("convert", "/nonexistent/disk.qcow2", "/tmp/never.raw")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "diskport: /nonexistent/disk.qcow2: no such file"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_cli("convert").returncode == 2
    assert run_cli("convert", "a", "b", "-O", "vmdk").returncode == 2
    raw = make_image(tmp_path, "raw", MiB)
    proc = run_cli("convert", "-q", "-c", raw, tmp_path / "x.raw")
    assert proc.returncode == 2
    assert "compression needs -O qcow2" in proc.stderr
    assert not (tmp_path / "x.raw").exists()
