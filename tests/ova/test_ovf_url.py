"""An ``.ovf`` descriptor at a URL with its files beside it (an OVA unpacked on a web server), read over nginx with
and without range requests: every command takes it, the files are opened relative to the descriptor's URL and
never outside its folder, the ``.mf`` of the same name is verified; and a folder with disks but no ``.ovf``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from diskport.errors import UnsafeImage
from diskport.importer import import_image
from diskport.net import RetryPolicy
from diskport.oci.build import build_image
from diskport.sources.http import HttpOptions, HttpSource
from tests.ova.build import Disk, Vm, make_ova, tar_members
from tests.support import MiB
from tests.support.clients import run, run_cli
from tests.support.images import make_image, pvc_dir, qemu_raw_sha256, sha256_file
from tests.support.servers import NginxServer

FAST = HttpOptions(retry=RetryPolicy(attempts=2, backoff=0.05, max_backoff=0.2), stall_timeout=1.0, connect_timeout=2.0)


def unpack(ova: Path, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, data in tar_members(ova):
        (folder / name).write_bytes(data)


@pytest.fixture(params=["ranges", "no-ranges"])
def server(request: pytest.FixtureRequest) -> NginxServer:
    """nginx as it is, and with ``max_ranges 0`` (each file then comes as one 200 body, read in order)."""
    name = "nginx" if request.param == "ranges" else "nginx_no_ranges"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def test_ovf_url_with_sibling_files_in_every_command(server: NginxServer, serve_dir: Path, tmp_path: Path,
                                                     disks: list[tuple[Disk, str]]) -> None:
    (a, ea), (b, eb), _ = disks
    unpack(make_ova(tmp_path / "app.ova", [Vm("app", [a, b], firmware="efi")]), serve_dir / "vms" / "app")
    url = server.url("vms/app/app.ovf")
    ranged = server.ranges

    proc = run_cli("inspect", url, "--json")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)["ova"]
    assert facts["firmware"] == "efi" and [d["file"] for d in facts["disks"]] == ["app-disk1.vmdk", "app-disk2.vmdk"]
    assert facts["manifest"]["file"] == "app.mf" and facts["manifest"]["entries"] == 3

    dest = pvc_dir(tmp_path) / "disk.img"
    proc = run_cli("import", url, dest, "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(dest) == ea
    assert "manifest app.mf: 2 member(s) verified" in proc.stderr, proc.stderr
    assert os.listdir(dest.parent) == ["disk.img"]
    again = import_image(url, dest, http=FAST, force=True)
    # the disk file's bytes count as the download's (one appliance, one progress)
    assert again.downloaded_bytes >= (serve_dir / "vms" / "app" / "app-disk1.vmdk").stat().st_size

    folder = tmp_path / "all"
    proc = run_cli("convert", url, folder, "--all-disks", "-O", "qcow2")
    assert proc.returncode == 0, proc.stderr
    assert [qemu_raw_sha256(p, tmp_path) for p in sorted(folder.iterdir())] == [ea, eb]
    assert "manifest app.mf: 3 member(s) verified" in proc.stderr, proc.stderr

    out = tmp_path / "app.oci"
    result = build_image(url, output=str(out), convert_to="qcow2", compression="none")
    image = next(iter(result.images.values()))
    assert image.disk_format == "qcow2" and image.source_format == "ova"

    proc = run_cli("manifest", url, "--url", "https://disks.example.com/app/", "--target", "kubevirt")
    assert proc.returncode == 0, proc.stderr
    assert "app-disk2" in proc.stdout and "efi" in proc.stdout

    # every file was fetched from the descriptor's folder, with ranges only where the server gives them
    entries = server.access_entries()
    assert {e["uri"].rsplit("/", 1)[0] for e in entries} == {"/vms/app"}
    statuses = {e["status"] for e in entries if e["uri"].endswith(".vmdk")}
    assert statuses == ({206} if ranged else {200}), statuses


def test_ovf_url_with_a_changed_disk_fails_and_leaves_nothing(server: NginxServer, serve_dir: Path,
                                                              tmp_path: Path,
                                                              disks: list[tuple[Disk, str]]) -> None:
    (a, _), (b, _), _ = disks
    folder = serve_dir / "app"
    unpack(make_ova(tmp_path / "app.ova", [Vm("app", [a, b])]), folder)
    data = bytearray((folder / "app-disk2.vmdk").read_bytes())
    data[-1] ^= 1
    (folder / "app-disk2.vmdk").write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = run_cli("import", server.url("app/app.ovf"), out, "--all-disks", "--progress", "none")
    assert proc.returncode == 1 and "the manifest app.mf says" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists() or os.listdir(out) == []
    # without its .mf the disks are converted, and the summary says they were not verified
    (folder / "app.mf").unlink()
    proc = run_cli("convert", server.url("app/app.ovf"), tmp_path / "boot.raw")
    assert proc.returncode == 0 and "no manifest: the members are not verified" in proc.stderr, proc.stderr


def test_ovf_url_references_outside_its_folder_refused(nginx: NginxServer, serve_dir: Path,
                                                       tmp_path: Path) -> None:
    (serve_dir / "app").mkdir()
    (serve_dir / "app" / "app.ovf").write_bytes(b"x")
    (serve_dir / "secret.vmdk").write_bytes(b"y")
    with HttpSource(nginx.url("app/app.ovf"), FAST) as source:
        assert isinstance(source, HttpSource)
        assert source.relative_url("d i%sk.vmdk", "the OVF file") == nginx.url("app/d i%sk.vmdk")
        assert source.relative_url("sub/disk.vmdk", "the OVF file") == nginx.url("app/sub/disk.vmdk")
        for href in ("../secret.vmdk", "%2e%2e/secret.vmdk", "/secret.vmdk", "%2Fsecret.vmdk",
                     "http://127.0.0.2/secret.vmdk", "//127.0.0.2/secret.vmdk", "a/./../../secret.vmdk",
                     "disk.vmdk?x=1", "c:secret.vmdk", "a\\..\\secret.vmdk"):
            with pytest.raises(UnsafeImage, match="outside its own folder"):
                source.open_relative(href, "the OVF file")
    assert all("secret" not in e["uri"] for e in nginx.access_entries())


def test_ovf_url_with_a_missing_disk_file(nginx: NginxServer, serve_dir: Path, tmp_path: Path,
                                          disks: list[tuple[Disk, str]]) -> None:
    unpack(make_ova(tmp_path / "app.ova", [Vm("app", [disks[0][0]])]), serve_dir / "app")
    (serve_dir / "app" / "app-disk1.vmdk").unlink()
    proc = run_cli("convert", nginx.url("app/app.ovf"), tmp_path / "out.raw")
    assert proc.returncode == 1 and "app-disk1.vmdk" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out.raw").exists()


def test_folder_or_folder_url_without_an_ovf_says_so(nginx: NginxServer, serve_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    make_image(folder, "vmdk", 1 * MiB, name="vm-disk1.vmdk")
    proc = run_cli("inspect", folder)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "holds no .ovf descriptor" in proc.stderr and "vm-disk1.vmdk" in proc.stderr, proc.stderr
    run("cp", folder / "vm-disk1.vmdk", serve_dir / "vm-disk1.vmdk")
    (folder / "vm.ovf").write_text("<Envelope/>")
    proc = run_cli("import", folder, tmp_path / "out.raw", "--progress", "none")
    assert proc.returncode == 1 and f"name its descriptor: {folder / 'vm.ovf'}" in proc.stderr, proc.stderr
    proc = run_cli("inspect", nginx.url(""))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "is a folder URL" in proc.stderr and ".ovf" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.raw").exists()
