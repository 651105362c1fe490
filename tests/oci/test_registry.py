"""The registry client (diskport.oci.registry, auth, reference) against real registries on loopback.

docker-registry (distribution 2.8) is the server, skopeo the independent client that checks what was pushed, and
the fault proxy of tests/support/registry.py makes the network and the registry misbehave on cue. Reference
parsing is checked on its own; challenge parsing and credential lookup are in tests/oci/test_auth.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from diskport.errors import RegistryError, SourceError, UsageError
from diskport.net import RetryPolicy
from diskport.oci.auth import (
    Credentials,
    RegistryAuth,
    repository_scope,
)
from diskport.oci.media import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    canonical_json,
    sha256_digest,
)
from diskport.oci.reference import Reference, parse_reference
from diskport.oci.registry import MAX_ANSWER, RegistryClient, RegistryOptions, UploadResult
from diskport.sources.http import HttpOptions, HttpSource
from tests.support import MiB
from tests.support.clients import skopeo, skopeo_json
from tests.support.images import sha256_file
from tests.support.oci import b64, write_helper, write_json
from tests.support.registry import TOKEN_PASSWORD, TOKEN_USER, RegistryFaultProxy, RegistryServer, Rule
from tests.support.servers import FaultServer, NginxServer, ProxyServer

FAST_RETRY = RetryPolicy(attempts=4, backoff=0.05, max_backoff=0.5, budget=30.0)
FAST: dict[str, Any] = dict(retry=FAST_RETRY, timeout=20.0, connect_timeout=5.0)


def options(**kw: Any) -> RegistryOptions:
    """Options with small retry waits (the tests' faults are short)."""
    return RegistryOptions(**{**FAST, **kw})


def fast_retry(**retry: Any) -> RegistryOptions:
    """:func:`options` with some of the retry policy changed."""
    return options(retry=replace(FAST_RETRY, **retry))


@dataclass
class Blob:
    path: Path
    digest: str
    size: int

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


def make_blob(folder: Path, size: int, seed: int = 1, name: str | None = None) -> Blob:
    path = folder / (name or f"blob-{seed}-{size}")
    path.write_bytes(random.Random(seed).randbytes(size))
    return Blob(path, "sha256:" + sha256_file(path), size)


def bytes_blob(folder: Path, data: bytes) -> Blob:
    digest = sha256_digest(data)
    path = folder / digest.replace(":", "-")
    path.write_bytes(data)
    return Blob(path, digest, len(data))


@dataclass
class Pushed:
    layer: Blob
    config: Blob
    manifest: bytes
    digest: str


def push_image(client: RegistryClient, folder: Path, layer: Blob, tag: str = "v1", *,
               docker: bool = False) -> Pushed:
    """A one-layer image: the layer, a config and a manifest (OCI, or Docker v2 schema 2)."""
    config = bytes_blob(folder, canonical_json({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]}}))
    assert client.upload_blob(layer.digest, layer.size, layer.path).how in ("uploaded", "exists", "mounted")
    client.upload_blob(config.digest, config.size, config.path)
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG, "digest": config.digest,
                   "size": config.size},
        "layers": [{"mediaType": DOCKER_LAYER if docker else OCI_LAYER, "digest": layer.digest,
                    "size": layer.size}]})
    digest = client.put_manifest(tag, manifest, DOCKER_MANIFEST if docker else OCI_MANIFEST)
    assert digest == sha256_digest(manifest)
    return Pushed(layer, config, manifest, digest)


def cert_dir(tmp_path: Path, ca: Path) -> Path:
    folder = tmp_path / "certs"
    folder.mkdir(exist_ok=True)
    (folder / "ca.crt").write_bytes(ca.read_bytes())
    return folder


def counted_progress() -> tuple[list[int], Callable[[int], None]]:
    seen: list[int] = []
    return seen, seen.append


def clean_env(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """No credentials from the user's own files or environment leak into a test."""
    for name in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DISKPORT_USERNAME", "DISKPORT_PASSWORD",
                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env(monkeypatch, tmp_path / "home")


# ---------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest", "endpoint"), [
    ("ubuntu", "docker.io", "library/ubuntu", None, None, "registry-1.docker.io"),
    ("docker://ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None, "registry-1.docker.io"),
    ("kubevirt/fedora-cloud-container-disk-demo:latest", "docker.io", "kubevirt/fedora-cloud-container-disk-demo",
     "latest", None, "registry-1.docker.io"),
    ("index.docker.io/library/alpine", "docker.io", "library/alpine", None, None, "registry-1.docker.io"),
    ("docker.io/alpine", "docker.io", "library/alpine", None, None, "registry-1.docker.io"),
    ("quay.io/containerdisks/fedora:40", "quay.io", "containerdisks/fedora", "40", None, "quay.io"),
    ("localhost/disk", "localhost", "disk", None, None, "localhost"),
    ("localhost:5000/a/b/c:t_1.x-y", "localhost:5000", "a/b/c", "t_1.x-y", None, "localhost:5000"),
    ("127.0.0.1:5000/disk@sha256:" + "a" * 64, "127.0.0.1:5000", "disk", None, "sha256:" + "a" * 64,
     "127.0.0.1:5000"),
    ("[::1]:5000/disk:v1@sha256:" + "b" * 64, "[::1]:5000", "disk", "v1", "sha256:" + "b" * 64, "[::1]:5000"),
    ("Registry.Example.COM/ns/my__name-x.y", "Registry.Example.COM", "ns/my__name-x.y", None, None,
     "Registry.Example.COM"),
])
def test_parse_reference(text: str, registry: str, repository: str, tag: str | None, digest: str | None,
                         endpoint: str) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest, ref.endpoint) == (
        registry, repository, tag, digest, endpoint)
    assert ref.reference == (digest or tag or "latest")
    assert parse_reference(str(ref)) == ref  # the canonical form parses back to the same thing


@pytest.mark.parametrize(("text", "problem"), [
    ("", "empty"),
    ("quay.io/Fedora/disk", "lowercase"),
    ("quay.io/ns/disk:-bad", "tag"),
    ("quay.io/ns/disk:tägg", "tag"),  # Python's \w takes any letter; a registry takes ASCII only
    ("quay.io/ns/disk:" + "x" * 129, "tag"),
    ("quay.io/ns/disk@sha256:abc", "digest"),
    ("quay.io/ns/disk@sha512:" + "a" * 128, "not sha256"),
    ("https://quay.io/ns/disk", "docker://"),
    ("quay.io/ns//disk", "component"),
    ("quay.io/", "missing"),
    ("bad_host:5000/x", "registry"),
    ("quay.io/" + "a" * 250, "255"),
])
def test_parse_reference_refuses(text: str, problem: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_reference(text)
    assert problem in str(err.value)
    assert repr(text) in str(err.value)


def test_one_grammar_for_build_tags_and_archive_names(tmp_path: Path) -> None:
    """-t, the layout's tag and a docker-archive's RepoTags all go through parse_reference."""
    from diskport.oci.reference import repo_tag
    from tests.support.clients import run_cli
    from tests.support.images import make_image

    assert repo_tag("quay.io/org/disk") == "quay.io/org/disk:latest"
    assert repo_tag("disk:v1") == "disk:v1"
    for bad in ("disk:tägg", "Disk:v1", "disk@sha256:" + "a" * 64):
        with pytest.raises(UsageError):
            repo_tag(bad)
    disk = make_image(tmp_path, "raw", 1024 * 1024, name="vm.raw")
    digest = "sha256:" + "b" * 64
    out = run_cli("build", disk, "-t", f"quay.io/org/disk@{digest}", "--output", tmp_path / "a.oci")
    assert out.returncode == 2 and "names a digest" in out.stderr, out.stderr
    out = run_cli("build", disk, "-t", "quay.io/org/disk:tägg", "--output", tmp_path / "b.oci")
    assert out.returncode == 2 and "tag" in out.stderr
    out = run_cli("build", disk, "-t", "quay.io/org/disk:v2", "--output", tmp_path / "c.oci", "-q")
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "c.oci" / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "v2"


def test_plain_http_only_for_loopback() -> None:
    allowed = ["localhost:5000/a", "127.0.0.1/a", "127.0.0.1:1/a", "[::1]:5000/a", "localhost/a"]
    refused = ["quay.io/a", "10.0.0.1:5000/a", "127.0.0.2:5000/a", "localhost.example.com/a", "docker.io/a"]
    assert all(parse_reference(t).plain_http_allowed for t in allowed)
    assert not any(parse_reference(t).plain_http_allowed for t in refused)
    with pytest.raises(UsageError, match="only allowed for registries on localhost"):
        RegistryClient("10.0.0.1:5000/a", options(plain_http=True), credentials=None)
    ref = parse_reference("quay.io/ns/x:1").with_reference("sha256:" + "c" * 64)
    assert (ref.tag, ref.digest) == (None, "sha256:" + "c" * 64)
    with pytest.raises(UsageError):
        ref.with_reference("not a tag")


# ---------------------------------------------------------------------------------------------------------
# Pushing to real registries, checked with skopeo
# ---------------------------------------------------------------------------------------------------------

def test_push_is_seen_by_skopeo(registry: RegistryServer, tmp_path: Path) -> None:
    layer = make_blob(tmp_path, 6 * MiB + 12345)
    seen, progress = counted_progress()
    with RegistryClient(f"{registry.name}/containerdisks/demo:v1", options(), credentials=None) as client:
        result = client.upload_blob(layer.digest, layer.size, layer.path, progress)
        assert (result.how, result.chunked, result.resumes) == ("uploaded", False, 0)
        assert sum(seen) == layer.size
        pushed = push_image(client, tmp_path, layer)
        assert client.base_url == f"http://{registry.name}"  # https found no TLS: plain http on loopback
        assert client.blob_exists(layer.digest) == layer.size
        assert client.blob_exists("sha256:" + "0" * 64) is None
    inspected = skopeo_json(tmp_path, "inspect", "--tls-verify=false",
                            f"docker://{registry.name}/containerdisks/demo:v1")
    assert inspected["Digest"] == pushed.digest
    assert inspected["Layers"] == [layer.digest]
    raw = skopeo(tmp_path, "inspect", "--raw", "--tls-verify=false", f"docker://{registry.name}/containerdisks/demo:v1")
    assert raw.stdout.encode() == pushed.manifest
    out = tmp_path / "copied"
    skopeo(tmp_path, "copy", "--src-tls-verify=false", f"docker://{registry.name}/containerdisks/demo:v1",
           f"dir:{out}")
    assert (out / layer.digest.removeprefix("sha256:")).read_bytes() == layer.data
    assert (out / pushed.config.digest.removeprefix("sha256:")).read_bytes() == pushed.config.data


def test_tls_registry_with_htpasswd(tls_registry: RegistryServer, tmp_path: Path) -> None:
    layer = make_blob(tmp_path, 3 * MiB)
    ref = f"{tls_registry.name}/secure/disk:1.0"
    creds = Credentials(tls_registry.username, tls_registry.password, None, "test")
    with RegistryClient(ref, options(ca_bundle=str(tls_registry.ca_bundle)), credentials=creds) as client:
        pushed = push_image(client, tmp_path, layer, tag="1.0")
        assert client.base_url == f"https://{tls_registry.name}"
        assert client.auth.scheme == "basic"
    out = skopeo(tmp_path, "inspect", "--cert-dir", str(cert_dir(tmp_path, tls_pki_ca(tls_registry))),
                 "--creds", f"{tls_registry.username}:{tls_registry.password}", f"docker://{ref}")
    assert json.loads(out.stdout)["Digest"] == pushed.digest
    # without the CA: a verification error with a hint, not a fallback to http
    with RegistryClient(ref, options(), credentials=creds) as client, \
            pytest.raises(RegistryError, match="certificate verification failed") as err:
        client.ping()
    assert "--ca-bundle" in str(err.value)
    # --tls-verify=false reads it without the CA
    with RegistryClient(ref, options(tls_verify=False), credentials=creds) as client:
        assert client.get_manifest()[2] == pushed.digest


def tls_pki_ca(server: RegistryServer) -> Path:
    assert server.ca_bundle is not None
    return server.ca_bundle


def test_wrong_credentials_name_the_registry(tls_registry: RegistryServer, token_registry: RegistryServer,
                                             tmp_path: Path) -> None:
    wrong = Credentials(tls_registry.username, "wrong", None, "--creds")
    with RegistryClient(f"{tls_registry.name}/x/y", options(ca_bundle=str(tls_registry.ca_bundle)),
                        credentials=wrong) as client, pytest.raises(RegistryError) as err:
        client.get_manifest("latest")
    assert f"authentication failed for {tls_registry.name}" in str(err.value)
    assert "--creds" in str(err.value) and "config.json" in str(err.value)
    with RegistryClient(f"{tls_registry.name}/x/y", options(ca_bundle=str(tls_registry.ca_bundle)),
                        credentials=None) as client, pytest.raises(RegistryError, match="none were found"):
        client.ping()
    token = token_registry.token
    assert token is not None
    with RegistryClient(f"{token_registry.name}/x/y", options(), credentials=Credentials(TOKEN_USER, "nope", None,
                                                                                         "--creds")) as client, \
            pytest.raises(RegistryError) as err:
        client.upload_blob(*blob_args(make_blob(tmp_path, 1000)))
    assert f"authentication failed for {token_registry.name}" in str(err.value)
    assert token.realm in str(err.value) and token.refusals >= 1 and not token.issued


def blob_args(blob: Blob) -> tuple[str, int, Path]:
    return blob.digest, blob.size, blob.path


# ---------------------------------------------------------------------------------------------------------
# Upload protocol: skips, mounts, fallbacks, resumes (through the fault proxy)
# ---------------------------------------------------------------------------------------------------------

def body_requests(proxy: RegistryFaultProxy) -> list[tuple[str, int]]:
    """(method, body bytes received) of every PUT/PATCH with a body that reached the proxy."""
    return [(r.method, r.received) for r in proxy.records if r.method in ("PUT", "PATCH") and r.received]


def test_second_upload_is_skipped_by_head(registry_proxy: RegistryFaultProxy, tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 2 * MiB)
    with RegistryClient(f"{registry_proxy.name}/skip/me", options(), credentials=None) as client:
        assert client.upload_blob(*blob_args(blob)).how == "uploaded"
        before = len(registry_proxy.records)
        seen, progress = counted_progress()
        assert client.upload_blob(*blob_args(blob), progress) == UploadResult(blob.digest, blob.size, "exists")
        assert seen == [blob.size]
    again = registry_proxy.records[before:]
    assert [(r.method, r.status) for r in again] == [("HEAD", 200)]
    assert body_requests(registry_proxy) == [("PUT", blob.size)]
    # relative Location headers from this registry were followed
    post = next(r for r in registry_proxy.records if r.method == "POST")
    assert (post.response_header("Location") or "").startswith("/v2/")


def test_cross_repository_mount(token_registry: RegistryServer, tmp_path: Path,
                                make_fault_proxy: Callable[[RegistryServer], RegistryFaultProxy]) -> None:
    proxy = make_fault_proxy(token_registry)
    token = token_registry.token
    assert token is not None
    creds = Credentials(TOKEN_USER, TOKEN_PASSWORD, None, "test")
    blob = make_blob(tmp_path, 3 * MiB)
    with RegistryClient(f"{proxy.name}/team/base", options(), credentials=creds) as source:
        source.upload_blob(*blob_args(blob))
    before = len(proxy.records)
    with RegistryClient(f"{proxy.name}/team/derived", options(), credentials=creds) as target:
        seen, progress = counted_progress()
        result = target.upload_blob(*blob_args(blob), progress, mount_from=["team/base"])
        assert result.how == "mounted" and seen == [blob.size]
        assert target.blob_exists(blob.digest) == blob.size
        assert "repository:team/base:pull" in target.auth.scopes
        # a repository without the blob: 202, the session is cancelled, False
        other = make_blob(tmp_path, 1000, seed=9)
        assert target.mount_blob(other.digest, "team/base") is False
    mounted = proxy.records[before:]
    posts = [r for r in mounted if r.method == "POST"]
    assert "mount=" + blob.digest.replace(":", "%3A") in posts[0].path and "from=team%2Fbase" in posts[0].path
    assert posts[0].status == 201
    assert [r.status for r in posts[1:]] == [202]
    assert any(r.method == "DELETE" and r.status == 204 for r in mounted)
    assert not [r for r in mounted if r.method in ("PUT", "PATCH")]  # no blob bytes were sent
    assert any("repository:team/base:pull" in i.scopes for i in token.issued)


def test_413_falls_back_to_chunked(registry_proxy: RegistryFaultProxy, tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 5 * MiB + 777)
    registry_proxy.add(Rule(method="PUT|PATCH", min_body=int(1.5 * MiB), status=413, times=None))
    seen, progress = counted_progress()
    with RegistryClient(f"{registry_proxy.name}/big/layer", options(chunk_size=MiB), credentials=None) as client:
        result = client.upload_blob(*blob_args(blob), progress)
        assert (result.how, result.chunked) == ("uploaded", True)
        assert client.get_blob(blob.digest) == blob.data
    assert sum(seen) == blob.size
    refused = [r for r in registry_proxy.records if r.status == 413]
    assert [(r.method, r.declared) for r in refused] == [("PUT", blob.size)]
    patches = [r for r in registry_proxy.records if r.method == "PATCH"]
    ranges = [r.content_range for r in patches]
    assert ranges == [(i * MiB, min((i + 1) * MiB, blob.size) - 1) for i in range(6)]
    assert all(r.status == 202 for r in patches)
    final = [r for r in registry_proxy.records if r.method == "PUT"][-1]
    assert final.status == 201 and final.received == 0 and "digest=sha256" in final.path


def test_413_halves_the_chunk_size(registry_proxy: RegistryFaultProxy, tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 3 * MiB)
    registry_proxy.add(Rule(method="PUT|PATCH", min_body=MiB + 1, status=413, times=None))
    with RegistryClient(f"{registry_proxy.name}/big/halved", options(chunk_size=4 * MiB),
                        credentials=None) as client:
        assert client.upload_blob(*blob_args(blob)).chunked
        assert client.get_blob(blob.digest) == blob.data
    refused = [(r.method, r.declared) for r in registry_proxy.records if r.status == 413]
    assert refused == [("PUT", 3 * MiB), ("PATCH", 3 * MiB // 2)]  # the whole blob, then half of it
    piece = 3 * MiB // 4
    accepted = [r.content_range for r in registry_proxy.records if r.method == "PATCH" and r.status == 202]
    assert accepted == [(i * piece, (i + 1) * piece - 1) for i in range(4)]


def test_reset_mid_chunk_resumes_from_the_registry_offset(registry_proxy: RegistryFaultProxy,
                                                          tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 4 * MiB + 100)
    rule = registry_proxy.add(Rule(method="PATCH", skip=2, reset_after=300 * 1024))
    seen, progress = counted_progress()
    with RegistryClient(f"{registry_proxy.name}/flaky/net", options(chunked=True, chunk_size=MiB),
                        credentials=None) as client:
        result = client.upload_blob(*blob_args(blob), progress)
        assert (result.how, result.resumes, result.restarts) == ("uploaded", 1, 0)
        assert client.get_blob(blob.digest) == blob.data
    assert rule.fired == 1 and sum(seen) == blob.size
    records = registry_proxy.records
    broken = next(i for i, r in enumerate(records) if r.action == "reset")
    assert records[broken].content_range == (2 * MiB, 3 * MiB - 1) and records[broken].received == 300 * 1024
    status_check, resumed = records[broken + 1], records[broken + 2]
    assert (status_check.method, status_check.status, status_check.response_header("Range")) == (
        "GET", 204, f"0-{2 * MiB - 1}")
    assert resumed.method == "PATCH" and resumed.content_range == (2 * MiB, 3 * MiB - 1) and resumed.status == 202


def test_reset_of_monolithic_put_falls_back_to_chunks(registry_proxy: RegistryFaultProxy, tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 3 * MiB)
    registry_proxy.add(Rule(method="PUT", min_body=1, reset_after=MiB))
    with RegistryClient(f"{registry_proxy.name}/flaky/put", options(chunk_size=MiB), credentials=None) as client:
        result = client.upload_blob(*blob_args(blob))
        assert (result.how, result.chunked) == ("uploaded", True)
        assert client.get_blob(blob.digest) == blob.data
    assert next(r.action for r in registry_proxy.records if r.method == "PUT" and r.declared) == "reset"
    assert [r.content_range for r in registry_proxy.records if r.method == "PATCH"] == [
        (0, MiB - 1), (MiB, 2 * MiB - 1), (2 * MiB, 3 * MiB - 1)]


def test_partial_body_kept_by_registry_restarts_the_upload(registry_proxy: RegistryFaultProxy,
                                                           tmp_path: Path) -> None:
    """distribution stores the part of a broken PATCH it received, then refuses the upload (its state token no
    longer matches the stored size): the client starts a new upload and the blob still arrives intact."""
    blob = make_blob(tmp_path, 3 * MiB)
    registry_proxy.add(Rule(method="PATCH", skip=1, reset_after=200 * 1024, forward_partial=True))
    with RegistryClient(f"{registry_proxy.name}/flaky/partial", options(chunked=True, chunk_size=MiB),
                        credentials=None) as client:
        result = client.upload_blob(*blob_args(blob))
        assert result.how == "uploaded" and result.restarts >= 1
        assert client.get_blob(blob.digest) == blob.data
    assert sum(1 for r in registry_proxy.records if r.method == "POST") == 1 + result.restarts


def test_416_and_the_registry_minimum_chunk(registry_proxy: RegistryFaultProxy, tmp_path: Path) -> None:
    """OCI-Chunk-Min-Length raises the chunk size; a 416 makes the client ask where the upload is and go on."""
    blob = make_blob(tmp_path, 4 * MiB)
    minimum = 3 * MiB // 2
    registry_proxy.add(Rule(method="POST", response_headers={"OCI-Chunk-Min-Length": str(minimum)}))
    registry_proxy.add(Rule(method="PATCH", skip=1, status=416))
    with RegistryClient(f"{registry_proxy.name}/range/check", options(chunked=True, chunk_size=MiB),
                        credentials=None) as client:
        result = client.upload_blob(*blob_args(blob))
        assert (result.how, result.resumes, result.restarts) == ("uploaded", 1, 0)
        assert client.get_blob(blob.digest) == blob.data
    patches = [(r.status, r.content_range) for r in registry_proxy.records if r.method == "PATCH"]
    assert patches == [(202, (0, minimum - 1)), (416, (minimum, 2 * minimum - 1)),
                       (202, (minimum, 2 * minimum - 1)), (202, (2 * minimum, blob.size - 1))]
    status_checks = [r for r in registry_proxy.records if r.method == "GET" and "/blobs/uploads/" in r.path]
    assert [r.response_header("Range") for r in status_checks] == [f"0-{minimum - 1}"]


def test_unreachable_registry(tmp_path: Path) -> None:
    from tests.support.servers import free_port

    port = free_port()
    with RegistryClient(f"127.0.0.1:{port}/no/one", fast_retry(attempts=2), credentials=None) as client, \
            pytest.raises(RegistryError) as err:
        client.ping()
    message = str(err.value)
    assert message.startswith(f"127.0.0.1:{port}/no/one: GET /v2/ failed after 3 attempts: connection failed")


def test_lying_digests_are_refused(registry_proxy: RegistryFaultProxy, tmp_path: Path,
                                   fault_server: FaultServer) -> None:
    layer = make_blob(tmp_path, 10_000)
    fake = "sha256:" + "f" * 64
    with RegistryClient(f"{registry_proxy.name}/lies/here", options(), credentials=None) as client:
        pushed = push_image(client, tmp_path, layer)
        lie = registry_proxy.add(Rule(method="GET", path="/manifests/", response_headers={
            "Docker-Content-Digest": fake}))
        with pytest.raises(RegistryError, match=f"the registry says {fake}"):
            client.get_manifest("v1")
        assert lie.fired == 1
        assert client.get_manifest("v1")[2] == pushed.digest
        with pytest.raises(RegistryError, match="more than the 100 allowed"):
            RegistryClient(f"{registry_proxy.name}/lies/here", options(max_manifest=100),
                           credentials=None).get_manifest("v1")
        wrong = fault_server.put("wrong", b"not the config")
        registry_proxy.add(Rule(method="GET", path="/blobs/sha256:", redirect=wrong))
        with pytest.raises(RegistryError, match="wrong content"):
            client.get_blob(pushed.config.digest)
        registry_proxy.add(Rule(method="PUT", path="/blobs/uploads/", response_headers={
            "Docker-Content-Digest": fake}))
        other = make_blob(tmp_path, 5000, seed=4)
        with pytest.raises(RegistryError, match=f"stored blob {other.digest} as {fake}"):
            client.upload_blob(*blob_args(other))


def test_retry_after_is_honoured(registry_proxy: RegistryFaultProxy, tmp_path: Path) -> None:
    blob = make_blob(tmp_path, MiB)
    registry_proxy.add(Rule(method="POST", status=503, retry_after="1"))
    registry_proxy.add(Rule(method="PUT", min_body=1, status=429, retry_after="1"))
    registry_proxy.add(Rule(method="HEAD", status=502, times=2))
    started = time.monotonic()
    with RegistryClient(f"{registry_proxy.name}/busy/reg", fast_retry(backoff=0.01), credentials=None) as client:
        assert client.upload_blob(*blob_args(blob)).how == "uploaded"
        assert client.get_blob(blob.digest) == blob.data
    assert time.monotonic() - started >= 2.0  # two Retry-After: 1, not the 10 ms backoff
    statuses = [(r.method, r.status) for r in registry_proxy.records if r.method != "GET"]
    assert statuses[:3] == [("HEAD", 502), ("HEAD", 502), ("HEAD", 404)]
    assert ("POST", 503) in statuses and ("PUT", 429) in statuses and statuses[-1] == ("PUT", 201)


def test_retries_are_bounded(registry_proxy: RegistryFaultProxy, tmp_path: Path) -> None:
    registry_proxy.add(Rule(method="GET", path="/manifests/", status=500, times=None))
    with RegistryClient(f"{registry_proxy.name}/down/hill", fast_retry(attempts=3), credentials=None) as client, \
            pytest.raises(RegistryError) as err:
        client.get_manifest("v1")
    assert f"{registry_proxy.name}/down/hill" in str(err.value) and "after 4 attempts" in str(err.value)
    assert "HTTP 500" in str(err.value)
    assert sum(1 for r in registry_proxy.records if "/manifests/" in r.path) == 4


# ---------------------------------------------------------------------------------------------------------
# Tokens: expiry, refresh, scopes
# ---------------------------------------------------------------------------------------------------------

def sleeper(after: int, seconds: float) -> Callable[[int], None]:
    """A progress callback that sleeps once, when ``after`` bytes have been reported: the upload stalls there."""
    total, slept = 0, False

    def progress(n: int) -> None:
        nonlocal total, slept
        total += n
        if not slept and total >= after:
            slept = True
            time.sleep(seconds)
    return progress


def test_token_expiring_mid_upload_is_renewed(token_registry: RegistryServer, tmp_path: Path) -> None:
    """The registry stops accepting the token after 2 s while the client was told 300 s: the registry's 401 in
    the middle of a chunked upload (2 MiB bodies, straight to the registry) makes the client fetch a new token and
    go on."""
    token = token_registry.token
    assert token is not None
    token.lifetime, token.expires_in = 2, 300
    blob = make_blob(tmp_path, 6 * MiB)
    creds = Credentials(TOKEN_USER, TOKEN_PASSWORD, None, "test")
    with RegistryClient(f"{token_registry.name}/long/upload", options(chunked=True, chunk_size=2 * MiB),
                        credentials=creds) as client:
        result = client.upload_blob(*blob_args(blob), sleeper(2 * MiB, 2.5))
        assert (result.how, result.restarts) == ("uploaded", 0)
        assert client.auth.token_fetches == 2
        assert client.get_blob(blob.digest) == blob.data
    assert len(token.issued) == 2
    access = [line for line in token_registry.log().splitlines() if line.startswith("127.0.0.1 - -")]
    patches = [re.search(r'"PATCH \S+ HTTP/1.1" (\d+)', line) for line in access]
    assert [int(m.group(1)) for m in patches if m] == [202, 401, 202, 202]  # refused once, then the new token


def test_token_lifetime_is_honoured(token_registry: RegistryServer, tmp_path: Path,
                                    make_fault_proxy: Callable[[RegistryServer], RegistryFaultProxy]) -> None:
    """Told the truth (expires_in 2 s), the client fetches a new token before sending an expired one."""
    token = token_registry.token
    assert token is not None
    token.lifetime = 2
    proxy = make_fault_proxy(token_registry)
    blob = make_blob(tmp_path, MiB)
    creds = Credentials(TOKEN_USER, TOKEN_PASSWORD, None, "test")
    with RegistryClient(f"{proxy.name}/long/honest", options(chunked=True, chunk_size=256 * 1024),
                        credentials=creds) as client:
        assert client.upload_blob(*blob_args(blob), sleeper(256 * 1024, 2.2)).how == "uploaded"
    assert len(token.issued) == 2
    assert [r.path for r in proxy.records if r.upstream_status == 401] == ["/v2/"]  # only the first contact


def test_injected_401_mid_upload_gets_a_new_token(token_registry: RegistryServer, tmp_path: Path,
                                                  make_fault_proxy: Callable[[RegistryServer],
                                                                             RegistryFaultProxy]) -> None:
    token = token_registry.token
    assert token is not None
    token.token_field = "access_token"  # the OAuth2 name of the field is accepted too
    proxy = make_fault_proxy(token_registry)
    rule = proxy.add(Rule(method="PATCH", skip=1, status=401))
    blob = make_blob(tmp_path, 3 * MiB)
    creds = Credentials(TOKEN_USER, TOKEN_PASSWORD, None, "test")
    with RegistryClient(f"{proxy.name}/auth/again", options(chunked=True, chunk_size=MiB),
                        credentials=creds) as client:
        result = client.upload_blob(*blob_args(blob))
        assert (result.how, result.resumes, result.restarts) == ("uploaded", 0, 0)
        assert client.get_blob(blob.digest) == blob.data
    assert rule.fired == 1 and len(token.issued) == 2
    patches = [r for r in proxy.records if r.method == "PATCH"]
    assert [r.status for r in patches] == [202, 401, 202, 202]
    assert (patches[1].response_header("WWW-Authenticate") or "").endswith('error="invalid_token"')
    assert patches[1].header("Authorization") != patches[2].header("Authorization")  # the new token
    assert patches[1].content_range == patches[2].content_range == (MiB, 2 * MiB - 1)  # the same body, again


def test_token_server_kid_header_and_retry(token_registry: RegistryServer, tmp_path: Path) -> None:
    """distribution also accepts a JWT naming its key by libtrust ``kid``; a token server 503 is retried."""
    token = token_registry.token
    assert token is not None
    token.header_mode = "kid"
    token.status_sequence = [503]
    blob = make_blob(tmp_path, 1000)
    with RegistryClient(f"{token_registry.name}/kid/test", options(),
                        credentials=Credentials(TOKEN_USER, TOKEN_PASSWORD, None, "test")) as client:
        assert client.upload_blob(*blob_args(blob)).how == "uploaded"
    assert token.status_sequence == [] and len(token.issued) == 1
    assert token.issued[0].access == [{"type": "repository", "name": "kid/test", "actions": ["pull", "push"]}]


def test_anonymous_token_cannot_push(token_registry: RegistryServer, tmp_path: Path) -> None:
    with RegistryClient(f"{token_registry.name}/anon/push", options(), credentials=None) as client:
        client.ping()  # an anonymous token is enough for /v2/
        with pytest.raises(RegistryError) as err:
            client.upload_blob(*blob_args(make_blob(tmp_path, 1000)))
    assert f"authentication failed for {token_registry.name}" in str(err.value)
    assert "none were found" in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# Credentials from files and helpers, end to end
# ---------------------------------------------------------------------------------------------------------

def test_credentials_from_docker_config(tls_registry: RegistryServer, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_json(tmp_path / "docker-config" / "config.json", {"auths": {
        tls_registry.name: {"auth": b64(f"{tls_registry.username}:{tls_registry.password}")}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(config.parent))
    blob = make_blob(tmp_path, 100_000)
    with RegistryClient(f"{tls_registry.name}/from/config", options(ca_bundle=str(tls_registry.ca_bundle))) as client:
        assert client.auth.credentials is not None and str(config) in client.auth.credentials.source
        assert client.upload_blob(*blob_args(blob)).how == "uploaded"
    config.write_text(json.dumps({"auths": {tls_registry.name: {"auth": b64(f"{tls_registry.username}:bad")}}}))
    with RegistryClient(f"{tls_registry.name}/from/config", options(ca_bundle=str(tls_registry.ca_bundle))) as client, \
            pytest.raises(RegistryError) as err:
        client.blob_exists(blob.digest)
    assert f"the credentials from {config}" in str(err.value)


def test_credentials_from_a_helper_program(token_registry: RegistryServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "helper.log"
    bin_dir = tmp_path / "bin"
    write_helper(bin_dir, "test", {token_registry.name: (TOKEN_USER, TOKEN_PASSWORD)}, log)
    config = write_json(tmp_path / "docker-config" / "config.json", {"credHelpers": {token_registry.name: "test"}})
    monkeypatch.setenv("DOCKER_CONFIG", str(config.parent))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    blob = make_blob(tmp_path, 100_000)
    with RegistryClient(f"{token_registry.name}/from/helper", options()) as client:
        assert client.upload_blob(*blob_args(blob)).how == "uploaded"
    assert log.read_text().splitlines() == [token_registry.name]
    token = token_registry.token
    assert token is not None and [(i.user, i.grant) for i in token.issued] == [(TOKEN_USER, "basic")]


def test_identity_token_uses_the_oauth2_refresh_grant(token_registry: RegistryServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    token = token_registry.token
    assert token is not None
    token.refresh_tokens["refresh-abc"] = TOKEN_USER
    config = write_json(tmp_path / "docker-config" / "config.json", {"auths": {
        token_registry.name: {"auth": b64(f"{TOKEN_USER}:"), "identitytoken": "refresh-abc"}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(config.parent))
    with RegistryClient(f"{token_registry.name}/oauth/push", options()) as client:
        assert client.upload_blob(*blob_args(make_blob(tmp_path, 5000))).how == "uploaded"
    assert [(i.user, i.grant) for i in token.issued] == [(TOKEN_USER, "refresh_token")]


# ---------------------------------------------------------------------------------------------------------
# Pulling: redirects, manifests, small blobs, proxies
# ---------------------------------------------------------------------------------------------------------

def test_authorization_never_follows_a_redirect_to_another_host(
        token_registry: RegistryServer, tmp_path: Path, fault_server: FaultServer,
        make_fault_proxy: Callable[[RegistryServer], RegistryFaultProxy]) -> None:
    """Blob GETs redirected to storage on another host: the token goes to the registry, never to storage, through
    RegistryClient, a plain httpx.Client, and the import's HttpSource (with a primed and with a fresh auth)."""
    proxy = make_fault_proxy(token_registry)
    blob = make_blob(tmp_path, 2 * MiB)
    creds = Credentials(TOKEN_USER, TOKEN_PASSWORD, None, "test")
    storage_url = fault_server.put("storage/blob", blob.data).replace("127.0.0.1", "localhost")
    http = HttpOptions(retry=RetryPolicy(attempts=2, backoff=0.05))
    with RegistryClient(f"{proxy.name}/redirect/me", options(), credentials=creds) as client:
        client.upload_blob(*blob_args(blob))
        proxy.add(Rule(method="GET", path="/blobs/sha256:", authorized=True, redirect=storage_url, times=None))
        assert client.get_blob(blob.digest) == blob.data
        # the same auth on another client, following the redirect by hand as HttpSource does
        with httpx.Client(auth=client.auth, follow_redirects=False, trust_env=False) as other:
            first = other.get(client.blob_url(blob.digest))
            assert first.status_code == 307
            assert other.get(first.headers["location"]).content == blob.data
        fetched = client.auth.token_fetches
        with HttpSource(client.blob_url(blob.digest), replace(http, auth=client.auth)) as source:
            assert source.pread(0, blob.size) == blob.data
        assert client.auth.token_fetches == fetched  # the cached token served it
        url = client.blob_url(blob.digest)
    fresh = RegistryAuth(proxy.name, creds, scopes=[repository_scope("redirect/me", "pull")])
    with HttpSource(url, replace(http, auth=fresh)) as source:
        assert source.pread(0, blob.size) == blob.data
    assert fresh.token_fetches == 1 and fresh.scheme == "bearer"
    redirected = [r for r in proxy.records if r.action == "redirect"]
    assert len(redirected) >= 4
    assert all((r.header("Authorization") or "").startswith("Bearer ") for r in redirected)
    refused = [r for r in proxy.records if "/blobs/sha256:" in r.path and r.status == 401]
    assert len(refused) == 1 and refused[0].header("Authorization") is None  # the fresh auth's first contact
    storage = fault_server.requests
    assert len(storage) >= 4 and {r.host_name for r in storage} == {"localhost"}
    assert all(r.header("Authorization") is None for r in storage)


def test_manifests_of_all_four_types(registry: RegistryServer, tmp_path: Path) -> None:
    layer = make_blob(tmp_path, 200_000)
    with RegistryClient(f"{registry.name}/many/types", options(), credentials=None) as client:
        oci = push_image(client, tmp_path, layer, tag="oci")
        docker = push_image(client, tmp_path, layer, tag="docker", docker=True)
        platform = {"architecture": "amd64", "os": "linux"}
        index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": oci.digest, "size": len(oci.manifest), "platform": platform}]})
        listed = canonical_json({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
            {"mediaType": DOCKER_MANIFEST, "digest": docker.digest, "size": len(docker.manifest),
             "platform": platform}]})
        expected = {"oci": (oci.manifest, OCI_MANIFEST), "docker": (docker.manifest, DOCKER_MANIFEST),
                    "index": (index, OCI_INDEX), "list": (listed, DOCKER_LIST)}
        assert client.put_manifest("index", index, OCI_INDEX) == sha256_digest(index)
        assert client.put_manifest("list", listed, DOCKER_LIST) == sha256_digest(listed)
        for tag, (body, media_type) in expected.items():
            assert client.get_manifest(tag) == (body, media_type, sha256_digest(body)), tag
            assert client.get_manifest(sha256_digest(body), accept=MANIFEST_TYPES)[0] == body
        by_digest = RegistryClient(f"{registry.name}/many/types@{oci.digest}", options(), credentials=None)
        with by_digest:
            assert by_digest.get_manifest() == (oci.manifest, OCI_MANIFEST, oci.digest)
        # a client that does not accept OCI gets no OCI manifest from distribution
        with pytest.raises(RegistryError, match="no such manifest"):
            client.get_manifest("oci", accept=(DOCKER_MANIFEST,))
        assert client.get_blob(oci.config.digest) == oci.config.data
        with pytest.raises(RegistryError, match="more than the 100 allowed"):
            client.get_blob(oci.config.digest, limit=100)
    inspected = skopeo_json(tmp_path, "inspect", "--raw", "--tls-verify=false",
                            f"docker://{registry.name}/many/types:list")
    assert inspected["manifests"][0]["digest"] == docker.digest


def test_missing_manifest_and_blob(registry: RegistryServer, tmp_path: Path) -> None:
    with RegistryClient(f"{registry.name}/not/there:nope", options(), credentials=None) as client:
        with pytest.raises(RegistryError) as err:
            client.get_manifest()
        assert str(err.value).startswith(f"{registry.name}/not/there:nope: no such manifest")
        with pytest.raises(RegistryError, match=f"{registry.name}/not/there: no such blob"):
            client.get_blob("sha256:" + "1" * 64)
        # a manifest naming blobs the registry does not have is refused with the registry's own words
        missing = "sha256:" + "2" * 64
        manifest = canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                   "config": {"mediaType": OCI_CONFIG, "digest": missing, "size": 10},
                                   "layers": []})
        with pytest.raises(RegistryError) as err:
            client.put_manifest("v1", manifest, OCI_MANIFEST)
        assert "MANIFEST_BLOB_UNKNOWN" in str(err.value) and f"{registry.name}/not/there" in str(err.value)
        with pytest.raises(UsageError, match="hash to"):
            client.put_manifest(missing, manifest, OCI_MANIFEST)


def test_a_server_that_is_not_a_registry(nginx: NginxServer) -> None:
    ref = Reference(f"127.0.0.1:{nginx.port}", "some/repo", "v1")
    with RegistryClient(ref, options(), credentials=None) as client, \
            pytest.raises(RegistryError, match="is not a registry"):
        client.ping()


def test_proxy_from_the_environment(registry: RegistryServer, proxy_server: ProxyServer, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_blob(tmp_path, 50_000)
    with RegistryClient(f"{registry.name}/via/proxy", options(), credentials=None) as client:
        pushed = push_image(client, tmp_path, layer)
    monkeypatch.setenv("HTTP_PROXY", proxy_server.proxy_url)
    monkeypatch.setenv("NO_PROXY", "")
    with RegistryClient(f"{registry.name}/via/proxy:v1", options(plain_http=True), credentials=None) as client:
        assert client.get_manifest()[2] == pushed.digest
        assert client.blob_exists(layer.digest) == layer.size
    relayed = [r.path for r in proxy_server.requests]
    assert relayed == [f"http://{registry.name}/v2/", f"http://{registry.name}/v2/via/proxy/manifests/v1",
                       f"http://{registry.name}/v2/via/proxy/blobs/{layer.digest}"]


def test_user_agent_and_file_size_check(registry_proxy: RegistryFaultProxy, tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 1000)
    with RegistryClient(f"{registry_proxy.name}/ua/check", options(), credentials=None) as client:
        with pytest.raises(SourceError, match="has 1000 bytes, its descriptor says 1001"):
            client.upload_blob(blob.digest, 1001, blob.path)
        with pytest.raises(UsageError, match="not a sha256 digest"):
            client.blob_exists("md5:abc")
        client.upload_blob(*blob_args(blob))
    from diskport import __version__

    assert {r.header("User-Agent") for r in registry_proxy.records} == {f"diskport/{__version__}"}


def test_a_blob_file_that_shrinks_mid_upload(registry: RegistryServer, tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 3 * MiB)

    def truncate(n: int) -> None:
        os.truncate(blob.path, MiB)

    with RegistryClient(f"{registry.name}/shrink/me", options(), credentials=None) as client, \
            pytest.raises(SourceError, match=f"the file ended at byte {MiB} while {3 * MiB} were to be sent") as err:
        client.upload_blob(*blob_args(blob), truncate)
    assert err.value.path == str(blob.path)


def test_an_endless_answer_is_cut_off() -> None:
    """Something that answers in a registry's place with an endless body (chunked, no length): the client stops
    reading at its bound and says so, instead of filling memory."""

    class Endless(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            self.end_headers()
            block = b"x" * (1 << 20)
            with contextlib.suppress(OSError):
                while True:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ref = f"127.0.0.1:{server.server_address[1]}/any/thing:v1"
        with RegistryClient(ref, options(), credentials=None) as client, \
                pytest.raises(RegistryError, match=f"answered with more than {MAX_ANSWER} bytes"):
            client.ping()
    finally:
        server.shutdown()
        server.server_close()
