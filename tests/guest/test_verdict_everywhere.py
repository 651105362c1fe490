"""The guest verdict where users meet it: ``import --inspect``, ``pull --inspect``, and the labels ``build``
writes into a containerDisk (read back by skopeo, an independent client)."""

from __future__ import annotations

import json
from pathlib import Path

from diskport.guest import inspect_guest
from diskport.guest.facts import LABEL_PREFIX
from tests.guest.linux_disks import gpt_linux_disk, mbr_linux_disk
from tests.guest.support import convert
from tests.support.clients import require_tool, run, run_cli, skopeo_json
from tests.support.registry import RegistryServer


def test_import_inspect_prints_the_verdict_of_the_disk_written(tmp_path: Path, nginx: object) -> None:
    raw = mbr_linux_disk(tmp_path)
    expected = inspect_guest(raw)
    assert expected.advised("firmware.bootloader") == "bios"
    url = nginx.put("mbr.vmdk", convert(raw, "vmdk").read_bytes())  # type: ignore[attr-defined]
    dest = tmp_path / "out" / "disk.qcow2"
    dest.parent.mkdir()
    done = run_cli("import", url, dest, "-O", "qcow2", "--inspect", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{dest}: guest: {expected.verdict_line()}"
    assert "firmware.bootloader: bios" in done.stdout and "Debian GNU/Linux 12" in done.stdout
    plain = run_cli("import", url, tmp_path / "out" / "plain.raw", "-q")
    assert plain.returncode == 0 and plain.stdout == "", "no verdict unless asked"


def test_a_disk_without_a_guest_is_imported_with_a_warning(tmp_path: Path) -> None:
    junk = tmp_path / "junk.raw"
    junk.write_bytes(b"\xa5" * (1 << 20))
    done = run_cli("import", junk, tmp_path / "copy.raw", "--inspect", "-q")
    assert done.returncode == 0, done.stderr
    assert "guest: unknown;" in done.stdout and "firmware.bootloader: efi" in done.stdout
    assert (tmp_path / "copy.raw").read_bytes() == junk.read_bytes()


def test_build_records_the_verdict_and_pull_prints_it(registry: RegistryServer, tmp_path: Path) -> None:
    raw = gpt_linux_disk(tmp_path)
    image = convert(raw, "qcow2")
    expected = inspect_guest(image)
    ref = f"{registry.name}/cd/guest:v1"
    built = run_cli("build", image, "-t", ref, "--push", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert f"guest: {expected.verdict_line()}" in built.stderr

    config = skopeo_json(tmp_path, "inspect", "--config", "--tls-verify=false", f"docker://{ref}")
    labels = config["config"]["Labels"]
    assert labels == expected.labels()
    assert labels[LABEL_PREFIX + "firmware"] == "bios+efi" and labels[LABEL_PREFIX + "bootloader"] == "efi"
    assert labels[LABEL_PREFIX + "os"] == "linux" and labels[LABEL_PREFIX + "bus"] == "virtio"
    assert labels[LABEL_PREFIX + "virtio-drivers"] == "virtio_blk,virtio_net"
    raw_manifest = skopeo_json(tmp_path, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}")
    assert {k: v for k, v in raw_manifest["annotations"].items() if k.startswith(LABEL_PREFIX)} == labels

    dest = tmp_path / "pulled.raw"
    pulled = run_cli("pull", ref, dest, "--inspect", "-q")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == f"{dest}: guest: {expected.verdict_line()}"


def test_build_of_a_disk_it_cannot_look_into_still_builds(tmp_path: Path) -> None:
    junk = tmp_path / "blank.raw"
    junk.write_bytes(bytes(1 << 20))
    built = run_cli("build", junk, "--output", tmp_path / "blank.oci")
    assert built.returncode == 0, built.stderr
    index = json.loads((tmp_path / "blank.oci" / "index.json").read_text())
    digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((tmp_path / "blank.oci/blobs/sha256" / digest).read_text())
    assert manifest["annotations"][LABEL_PREFIX + "os"] == "unknown"
    assert manifest["annotations"][LABEL_PREFIX + "firmware"] == "unknown"


def test_inspect_guest_over_a_registry_in_place_and_spooled(registry: RegistryServer, tmp_path: Path) -> None:
    raw = mbr_linux_disk(tmp_path)
    expected = inspect_guest(raw)
    for compression, how in (("none", "in place"), ("gzip", "spooled")):
        ref = f"{registry.name}/cd/inspect-{compression}:v1"
        built = run_cli("build", raw, "-t", ref, "--push", "--compression", compression, "-q", cwd=tmp_path)
        assert built.returncode == 0, built.stderr
        out = run_cli("inspect", f"docker://{ref}", "--guest", "--json", "--tls-verify=false",
                      "--scratch", tmp_path)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got["advice"] == {a.field: a.value for a in expected.advice}
        assert got["os"]["pretty-name"] == "Debian GNU/Linux 12 (bookworm)"
        assert got["filename"] == f"docker://{ref}"
        assert how in got["access"], got["access"]
        if compression == "none":
            assert got["read"]["bytes"] < 4 * 1024 * 1024, got["read"]


def test_compressed_files_are_spooled_and_say_so(tmp_path: Path) -> None:
    raw = mbr_linux_disk(tmp_path)
    expected = inspect_guest(raw)
    qcow2 = convert(raw, "qcow2")
    for path, tool in ((raw, "gzip"), (qcow2, "xz")):
        run(require_tool(tool), "-k", "-1", path)
        packed = path.with_name(path.name + (".gz" if tool == "gzip" else ".xz"))
        report = inspect_guest(packed, scratch_dir=str(tmp_path))
        assert report.access.kind == "spooled", str(report.access)
        assert [(a.field, a.value) for a in report.advice] == [(a.field, a.value) for a in expected.advice]
        assert report.os.pretty_name == expected.os.pretty_name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".diskport")) == [], "spools removed"
