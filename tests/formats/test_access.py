"""``DiskImage.access`` is a value (kind, reason, notes, origin) whose text is the sentence users see."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from diskport.cli import main
from diskport.engine import convert
from diskport.formats import Access, open_image
from diskport.inspect import inspect_image


def test_text_is_kind_reason_then_notes_with_origin_first() -> None:
    assert str(Access()) == "direct"
    assert Access().plain()
    spooled = Access("spooled", "vdi needs random access, so gzip was copied to scratch first", ["OVA: disk.vdi"])
    assert str(spooled) == "spooled: vdi needs random access, so gzip was copied to scratch first; OVA: disk.vdi"
    found = Access("direct", notes=["OVA: m.vmdk"], origin="disk/disk.img in the uncompressed layer")
    assert str(found) == "disk/disk.img in the uncompressed layer; direct; OVA: m.vmdk"
    assert not found.plain() and not Access(notes=["x"]).plain()
    noted = spooled.with_note("stopped")
    assert noted.notes[-1] == "stopped" and spooled.notes == ["OVA: disk.vdi"], "with_note leaves the original"


def _gzip(src: Path, dst: Path) -> Path:
    with open(src, "rb") as f, gzip.open(dst, "wb") as g:
        shutil.copyfileobj(f, g)
    return dst


def test_a_plain_file_is_direct_and_the_cli_says_nothing_of_it(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x5a" * 65536)
    with open_image(disk) as image:
        assert image.access == Access("direct")
    result = CliRunner().invoke(main, ["convert", str(disk), str(tmp_path / "out.img")])
    assert result.exit_code == 0, result.output
    assert f"{disk}: direct" not in result.output and result.output.startswith(f"{disk} (raw, 64 KiB) -> ")


def test_a_gzipped_raw_streams_and_every_face_shows_the_same_sentence(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x5a" * 65536 + bytes(65536))
    packed = _gzip(disk, tmp_path / "disk.img.gz")
    converted = convert(packed, tmp_path / "out.img")
    assert converted.access.kind == "stream"
    assert str(converted.access) == f"stream: {converted.access.reason}"
    assert converted.access.reason.startswith("raw is read straight from")
    facts = inspect_image(packed)
    assert facts["access"] == str(converted.access)
    cli = CliRunner().invoke(main, ["inspect", "--json", str(packed)])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["access"] == str(converted.access)
    cli = CliRunner().invoke(main, ["convert", str(packed), str(tmp_path / "again.img")])
    assert cli.exit_code == 0, cli.output
    assert f"{packed}: {converted.access}" in cli.output


def test_a_gzipped_qcow2_is_spooled_and_says_why(tmp_path: Path) -> None:
    import subprocess

    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x33" * 65536)
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(qcow)], check=True)
    packed = _gzip(qcow, tmp_path / "disk.qcow2.gz")
    result = convert(packed, tmp_path / "out.img")
    assert result.access.kind == "spooled"
    assert result.access.reason.startswith("qcow2 needs random access")
    assert (tmp_path / "out.img").read_bytes() == disk.read_bytes()
