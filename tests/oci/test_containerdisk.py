"""containerDisk end to end through the command line, against Debian's docker-registry on loopback: build ->
push -> pull gives the same disk bytes (qemu-img is the oracle), skopeo reads what was pushed, and the pull walks
layers as a platform importer does (uncompressed layers in place, compressed ones streamed and digest-checked,
whiteouts, platforms), failing cleanly on anything else."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from diskport.net import RetryPolicy
from diskport.oci.auth import Credentials
from diskport.oci.media import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, canonical_json, sha256_digest
from diskport.oci.pull import open_registry_disk
from diskport.oci.registry import RegistryClient, RegistryOptions
from diskport.sources.http import HttpOptions
from tests.support import MiB
from tests.support.clients import run_cli, skopeo, skopeo_json
from tests.support.images import make_image, pvc_dir, qemu_raw_sha256, sha256_file
from tests.support.registry import TOKEN_PASSWORD, TOKEN_USER, RegistryFaultProxy, RegistryServer, Rule


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, str]:
    image = make_image(tmp_path, "qcow2", 10 * MiB + 4096, name="vm.qcow2")
    return image, qemu_raw_sha256(image, tmp_path)


def test_build_push_pull_round_trip(registry: RegistryServer, disk: tuple[Path, str], tmp_path: Path) -> None:
    image, expected = disk
    ref = f"{registry.name}/containerdisks/vm:v1"
    built = run_cli("build", image, "-t", ref, "--push", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert "pushed" in built.stderr
    assert list(tmp_path.glob(".diskport-*")) == [] and not (tmp_path / "vm.oci").exists(), "temp layout removed"

    # an independent client reads it: one layer holding disk/ and disk/vm.qcow2, 107:107, 0555/0444
    inspected = skopeo_json(tmp_path, "inspect", "--tls-verify=false", f"docker://{ref}")
    assert len(inspected["Layers"]) == 1 and inspected["Os"] == "linux"
    copied = tmp_path / "copied"
    skopeo(tmp_path, "copy", "--src-tls-verify=false", f"docker://{ref}", f"dir:{copied}")
    layer = copied / inspected["Layers"][0].removeprefix("sha256:")
    with tarfile.open(layer, "r:*") as tar:
        members = tar.getmembers()
        assert [(m.name.rstrip("/"), m.uid, m.gid, m.mode) for m in members] == [
            ("disk", 107, 107, 0o555), ("disk/vm.qcow2", 107, 107, 0o444)]
        inner = tar.extractfile(members[1])
        assert inner is not None and inner.read() == image.read_bytes()

    dest = pvc_dir(tmp_path) / "disk.raw"
    pulled = run_cli("pull", ref, dest)
    assert pulled.returncode == 0, pulled.stderr
    assert sha256_file(dest) == expected
    assert "disk/vm.qcow2 in the gzip layer" in pulled.stderr and "spooled" in pulled.stderr
    assert os.listdir(dest.parent) == ["disk.raw"], "the spool is gone"

    again = run_cli("build", image, "-t", ref, "--push", cwd=tmp_path)  # same disk, same digests: nothing sent
    assert again.returncode == 0 and "0 B sent" in again.stderr, again.stderr


def test_uncompressed_layer_is_read_in_place(registry: RegistryServer, disk: tuple[Path, str],
                                             tmp_path: Path) -> None:
    image, expected = disk
    ref = f"{registry.name}/cd/plain:v1"
    layout = tmp_path / "vm.oci"
    assert run_cli("build", image, "--compression", "none", "--output", layout, "-t", "v1").returncode == 0
    pushed = run_cli("push", layout, f"docker://{ref}")
    assert pushed.returncode == 0, pushed.stderr
    dest = pvc_dir(tmp_path) / "disk.img"
    proc = run_cli("import", f"docker://{ref}", dest)
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(dest) == expected
    assert "the uncompressed layer, read in place; direct: read over HTTP range requests" in proc.stderr
    assert os.listdir(dest.parent) == ["disk.img"]


def test_platforms_of_an_index(registry: RegistryServer, tmp_path: Path) -> None:
    amd = make_image(tmp_path, "raw", 4 * MiB, name="amd.img", seed=1)
    arm = make_image(tmp_path, "qcow2", 6 * MiB, name="arm.qcow2", seed=2)
    ref = f"{registry.name}/cd/multi:v2"
    proc = run_cli("build", "--disk", f"amd64={amd}", "--disk", f"arm64={arm}", "-t", ref, "--push",
                   "--compression", "zstd")
    assert proc.returncode == 0, proc.stderr
    raw = skopeo_json(tmp_path, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}")
    assert sorted(m["platform"]["architecture"] for m in raw["manifests"]) == ["amd64", "arm64"]
    out = pvc_dir(tmp_path) / "arm.raw"
    assert run_cli("pull", "--platform", "linux/arm64", ref, out).returncode == 0
    assert sha256_file(out) == qemu_raw_sha256(arm, tmp_path)
    out2 = pvc_dir(tmp_path) / "amd.raw"
    proc = run_cli("pull", "--platform", "amd64", ref, out2)
    assert proc.returncode == 0 and sha256_file(out2) == sha256_file(amd)
    assert "zstd layer" in proc.stderr and "stream: raw" in proc.stderr, proc.stderr
    missing = run_cli("pull", "--platform", "linux/s390x", ref, pvc_dir(tmp_path) / "none.raw")
    assert missing.returncode == 1
    assert "no image for linux/s390x (the index offers linux/amd64, linux/arm64)" in missing.stderr
    assert not (pvc_dir(tmp_path) / "none.raw").exists()


def test_tls_registry_with_credentials(tls_registry: RegistryServer, disk: tuple[Path, str],
                                       tmp_path: Path) -> None:
    image, expected = disk
    ref = f"{tls_registry.name}/secure/vm:1"
    creds = f"{tls_registry.username}:{tls_registry.password}"
    ca = str(tls_registry.ca_bundle)
    assert run_cli("build", image, "-t", ref, "--push", "--creds", creds, "--ca-bundle", ca).returncode == 0
    dest = pvc_dir(tmp_path) / "disk.raw"
    wrong = run_cli("pull", ref, dest, "--creds", "nobody:nothing", "--ca-bundle", ca)
    assert wrong.returncode == 1 and "authentication failed" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr and not dest.exists()
    no_ca = run_cli("pull", ref, dest, "--creds", creds)
    assert no_ca.returncode == 1 and "--ca-bundle" in no_ca.stderr
    proc = run_cli("pull", ref, dest, "--creds", creds, "--tls-verify=false")
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(dest) == expected


def _push_layers(registry: RegistryServer, tmp_path: Path, repo: str,
                 layers: list[list[tuple[str, bytes]]]) -> str:
    """An image of uncompressed tar layers made with Python's tarfile, pushed with the client."""
    ref = f"{registry.name}/{repo}:t"
    client = RegistryClient(ref, RegistryOptions(retry=RetryPolicy(attempts=1)), credentials=None)
    descriptors = []
    diff_ids = []
    for n, members in enumerate(layers):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        blob = tmp_path / f"layer{n}.tar"
        blob.write_bytes(buf.getvalue())
        digest = sha256_digest(buf.getvalue())
        client.upload_blob(digest, len(buf.getvalue()), blob)
        descriptors.append({"mediaType": OCI_LAYER, "digest": digest, "size": len(buf.getvalue())})
        diff_ids.append(digest)
    config = canonical_json({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    (tmp_path / "config.json").write_bytes(config)
    client.upload_blob(sha256_digest(config), len(config), tmp_path / "config.json")
    manifest = canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                                          "size": len(config)}, "layers": descriptors})
    client.put_manifest("t", manifest, OCI_MANIFEST)
    client.close()
    return ref


def test_layers_walk_with_whiteouts(registry: RegistryServer, tmp_path: Path) -> None:
    old, new = b"\x11" * (2 * MiB), b"\x22" * (3 * MiB)
    ref = _push_layers(registry, tmp_path, "cd/layers", [
        [("disk/old.img", old)],
        [("disk/.wh.old.img", b""), ("etc/motd", b"hello")],
        [("usr/share/doc", b"x"), ("disk/new.img", new)],
    ])
    dest = pvc_dir(tmp_path) / "disk.raw"
    proc = run_cli("pull", ref, dest)
    assert proc.returncode == 0, proc.stderr
    assert dest.read_bytes() == new and "disk/new.img" in proc.stderr
    hidden = _push_layers(registry, tmp_path, "cd/hidden", [[("disk/old.img", old)], [("disk/.wh.old.img", b"")]])
    gone = run_cli("pull", hidden, pvc_dir(tmp_path) / "gone.raw")
    assert gone.returncode == 1 and "no file under disk/" in gone.stderr
    other = _push_layers(registry, tmp_path, "cd/app", [[("bin/sh", b"#!")]])
    proc = run_cli("pull", other, pvc_dir(tmp_path) / "app.raw")
    assert proc.returncode == 1 and "not a containerDisk image" in proc.stderr
    assert sorted(os.listdir(pvc_dir(tmp_path))) == ["disk.raw"]


def test_corrupted_layer_in_the_registry_leaves_nothing(registry: RegistryServer, tmp_path: Path) -> None:
    raw = make_image(tmp_path, "raw", 6 * MiB, name="vm.img")
    ref = f"{registry.name}/cd/rot:v1"
    assert run_cli("build", raw, "-t", ref, "--push", "--compression", "zstd").returncode == 0
    inspected = skopeo_json(tmp_path, "inspect", "--tls-verify=false", f"docker://{ref}")
    hexdigest = inspected["Layers"][0].removeprefix("sha256:")
    data = registry.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"
    blob = bytearray(data.read_bytes())
    blob[-20] ^= 0xFF  # the end of the last zstd block: the layer no longer matches its digest
    data.write_bytes(bytes(blob))
    dest = pvc_dir(tmp_path) / "disk.raw"
    proc = run_cli("pull", ref, dest)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and ("digest" in proc.stderr or "damaged" in proc.stderr), proc.stderr
    assert os.listdir(dest.parent) == []


def test_cli_outputs_name_the_image(disk: tuple[Path, str], tmp_path: Path) -> None:
    """-t is the tag in a layout, the reference in a docker-archive; the default layout is ./NAME.oci."""
    image, _ = disk
    assert run_cli("build", "-q", image, cwd=tmp_path).returncode == 0
    assert (tmp_path / "vm.oci" / "index.json").is_file()
    again = run_cli("build", "-q", image, cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert run_cli("build", "-q", image, "-t", "reg.example/vms/vm:1", "--output", tmp_path / "t.oci").returncode == 0
    index = json.loads((tmp_path / "t.oci" / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "1"
    archive = tmp_path / "vm.tar"
    assert run_cli("build", "-q", image, "-t", "vms/vm:1", "--docker-archive", archive).returncode == 0
    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        assert json.loads(member.read())[0]["RepoTags"] == ["vms/vm:1"]
    assert skopeo_json(tmp_path, "inspect", f"docker-archive:{archive}")["Architecture"]
    usage = run_cli("build", image, "--push")
    assert usage.returncode == 2 and "--push needs -t" in usage.stderr


def test_token_expiring_mid_pull_is_renewed(token_registry: RegistryServer, tmp_path: Path) -> None:
    """The registry stops accepting the pull token after 2 s (the client was told 300 s); the blob's next ranged
    request gets a 401, the auth fetches a new token, and the bytes read are the disk's."""
    token = token_registry.token
    assert token is not None
    raw = make_image(tmp_path, "raw", 6 * MiB, name="vm.img")
    ref = f"{token_registry.name}/cd/long:v1"
    creds = f"{TOKEN_USER}:{TOKEN_PASSWORD}"
    built = run_cli("build", "-q", raw, "-t", ref, "--push", "--compression", "none", "--creds", creds)
    assert built.returncode == 0, built.stderr
    token.lifetime, token.expires_in = 2, 300
    issued_before = len(token.issued)
    slept = []

    def slow(n: int) -> None:
        if not slept:
            slept.append(n)
            time.sleep(2.5)

    source, found = open_registry_disk(ref, credentials=Credentials(TOKEN_USER, TOKEN_PASSWORD, None, "test"),
                                       http=HttpOptions(streams=1, chunk=MiB,
                                                        retry=RetryPolicy(attempts=2, backoff=0.05)),
                                       on_bytes=slow)
    with source:
        assert found.access == "the uncompressed layer, read in place"
        data = b"".join(source.pread(at, MiB) for at in range(0, source.size, MiB))
    assert data == raw.read_bytes()
    assert len(token.issued) - issued_before >= 2, "a new token after the first one expired"


def test_push_through_a_proxy_that_refuses_large_bodies(registry_proxy: RegistryFaultProxy,
                                                        tmp_path: Path) -> None:
    """The registry (here a fault proxy in front of one) answers 413 to the streamed PUT: diskport push goes on in
    PATCH chunks of --chunk-size, and the image pulls back byte for byte."""
    raw = make_image(tmp_path, "raw", 5 * MiB, name="vm.img")
    layout = tmp_path / "vm.oci"
    assert run_cli("build", "-q", raw, "--compression", "none", "--output", layout).returncode == 0
    registry_proxy.add(Rule(method="PUT|PATCH", min_body=int(2.5 * MiB), status=413, times=None))
    ref = f"{registry_proxy.name}/cd/chunked:v1"
    proc = run_cli("push", layout, ref, "--chunk-size", "2M")
    assert proc.returncode == 0, proc.stderr
    patches = [r.content_range for r in registry_proxy.records if r.method == "PATCH"]
    assert len(patches) == 3 and all(r is not None and r[1] - r[0] + 1 <= 2 * MiB for r in patches), patches
    dest = pvc_dir(tmp_path) / "disk.raw"
    assert run_cli("pull", ref, dest).returncode == 0
    assert dest.read_bytes() == raw.read_bytes()
    assert run_cli("push", layout, ref, "--chunk-size", "1K").returncode == 2
