"""RegistryClient's branches (token auth, retries with a capped Retry-After, 413 and 416 during an upload,
redirects of blobs to storage) over ``httpx.MockTransport``: a registry that answers what each branch needs,
in milliseconds. The live docker-registry tests in tests/oci/test_registry.py remain the end-to-end checks.
Waits are recorded, not slept.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from diskport.errors import RegistryError
from diskport.net import RetryPolicy
from diskport.oci.auth import Credentials
from diskport.oci.registry import RegistryClient, RegistryOptions

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
OPTIONS = RegistryOptions(retry=RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.01), chunk_size=256 * 1024)


@pytest.fixture(autouse=True)
def _no_sleeping(waits: list[float]) -> list[float]:
    return waits


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Registry:
    """Just enough of the distribution API: /v2/, token auth (optional), manifests, blob HEAD/GET, uploads
    (POST, PATCH with Content-Range, PUT ?digest=, GET status). Faults by attribute."""

    token: str | None = None                     # Bearer token wanted; None: anonymous
    manifests: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    statuses: list[tuple[str, int, dict[str, str]]] = field(default_factory=list)  # (method, status, headers)
    max_body: int | None = None                  # larger request bodies get 413
    patch_416_once: bool = False
    blob_storage: str | None = None              # GET blob redirects here
    uploads: dict[str, bytearray] = field(default_factory=dict)
    log: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.log.append(request)
        # The stream, not request.read(): the client sets a file-backed stream after building the request,
        # and httpx's cached (empty) content would hide it.
        body = b"".join(request.stream) if isinstance(request.stream, httpx.SyncByteStream) else request.read()
        for i, (method, status, headers) in enumerate(self.statuses):
            if method == request.method:
                del self.statuses[i]
                return httpx.Response(status, headers=headers)
        url = request.url
        if url.host == "auth.example":
            creds = request.headers.get("Authorization", "")
            if creds != "Basic " + base64.b64encode(b"alice:pw").decode():
                return httpx.Response(401)
            return httpx.Response(200, json={"token": self.token, "expires_in": 300})
        if url.host == "storage.example":
            return httpx.Response(200, content=self.blobs[url.path.lstrip("/")])
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example/token",'
                                                                    'service="reg",scope="repository:a/b:pull"'})
        if self.max_body is not None and len(body) > self.max_body:
            return httpx.Response(413)
        path = url.path
        if path == "/v2/":
            return httpx.Response(200)
        m = re.fullmatch(r"/v2/a/b/manifests/(.+)", path)
        if m:
            data = self.manifests.get(m.group(1))
            if data is None:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]})
            return httpx.Response(200, content=data, headers={"Content-Type": MANIFEST_TYPE,
                                                              "Docker-Content-Digest": digest(data)})
        m = re.fullmatch(r"/v2/a/b/blobs/(sha256:[0-9a-f]{64})", path)
        if m:
            data = self.blobs.get(m.group(1))
            if data is None:
                return httpx.Response(404)
            if request.method == "GET" and self.blob_storage:
                return httpx.Response(307, headers={"Location": f"{self.blob_storage}/{m.group(1)}"})
            return httpx.Response(200, content=b"" if request.method == "HEAD" else data,
                                  headers={"Content-Length": str(len(data))})
        if path == "/v2/a/b/blobs/uploads/" and request.method == "POST":
            name = f"u{len(self.uploads)}"
            self.uploads[name] = bytearray()
            return httpx.Response(202, headers={"Location": f"/v2/a/b/blobs/uploads/{name}", "Range": "0-0"})
        m = re.fullmatch(r"/v2/a/b/blobs/uploads/(u\d+)", path)
        if m:
            held = self.uploads[m.group(1)]
            here = {"Location": path, "Range": f"0-{max(0, len(held) - 1)}"}
            if request.method == "GET":
                return httpx.Response(204, headers=here)
            if request.method == "PATCH":
                start = int(request.headers["Content-Range"].split("-")[0])
                if self.patch_416_once or start != len(held):
                    self.patch_416_once = False
                    return httpx.Response(416, headers=here)
                held += body
                return httpx.Response(202, headers={**here, "Range": f"0-{len(held) - 1}"})
            if request.method == "PUT":
                held += body
                wanted = url.params["digest"]
                if digest(bytes(held)) != wanted:
                    return httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID"}]})
                self.blobs[wanted] = bytes(held)
                return httpx.Response(201, headers={"Docker-Content-Digest": wanted})
        return httpx.Response(404)


def client(registry: Registry, options: RegistryOptions = OPTIONS,
           credentials: Credentials | None = None) -> RegistryClient:
    return RegistryClient("reg.example/a/b:v1", options, credentials=credentials,
                          transport=httpx.MockTransport(registry))


def test_token_auth_then_a_manifest() -> None:
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE}).encode()
    registry = Registry(token="t0k", manifests={"v1": manifest})
    with client(registry, credentials=Credentials("alice", "pw", source="--creds")) as c:
        body, media_type, got = c.get_manifest()
    assert (body, media_type, got) == (manifest, MANIFEST_TYPE, digest(manifest))
    token_requests = [r for r in registry.log if r.url.host == "auth.example"]
    assert len(token_requests) == 1
    assert token_requests[0].url.params.get_list("scope") == ["repository:a/b:pull"]
    assert registry.log[-1].headers["Authorization"] == "Bearer t0k"
    assert all(r.headers["User-Agent"].startswith("diskport/") for r in registry.log)


def test_refused_credentials_are_one_clear_error() -> None:
    registry = Registry(token="t0k")
    with client(registry, credentials=Credentials("alice", "wrong", source="--creds")) as c, \
            pytest.raises(RegistryError, match=r"authentication failed for reg\.example.*refused the credentials "
                                               r"from --creds \(HTTP 401\)"):
        c.ping()


def test_retries_with_a_capped_retry_after(waits: list[float]) -> None:
    manifest = b'{"schemaVersion": 2}'
    registry = Registry(manifests={"v1": manifest},
                        statuses=[("GET", 503, {"Retry-After": "99999999"}), ("GET", 502, {})])
    with client(registry) as c:
        assert c.get_manifest()[0] == manifest
    assert waits[0] == 120.0


def test_retries_are_bounded() -> None:
    registry = Registry(statuses=[("GET", 500, {})] * 10)
    with client(registry) as c, pytest.raises(RegistryError, match="GET /v2/ failed after 4 attempts: HTTP 500"):
        c.ping()


def test_a_413_makes_the_upload_chunked_and_a_416_resyncs(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    path = tmp_path / "blob"
    path.write_bytes(data)
    registry = Registry(max_body=300 * 1024, patch_416_once=True)
    with client(registry) as c:
        result = c.upload_blob(digest(data), len(data), path)
    assert result.how == "uploaded" and result.chunked
    assert registry.blobs[digest(data)] == data
    methods = [r.method for r in registry.log if "/uploads/" in r.url.path]
    assert methods[:2] == ["POST", "PUT"]       # the monolithic PUT first, refused with 413
    assert "PATCH" in methods and "GET" in methods  # chunks, and a status query after the 416


def test_an_existing_blob_is_not_sent_again(tmp_path: Path) -> None:
    data = b"already there"
    path = tmp_path / "blob"
    path.write_bytes(data)
    registry = Registry(blobs={digest(data): data})
    with client(registry) as c:
        assert c.upload_blob(digest(data), len(data), path).how == "exists"
    assert not any(r.method in ("POST", "PUT", "PATCH") for r in registry.log)


def test_a_blob_redirected_to_storage_gets_no_credentials() -> None:
    config = b'{"architecture": "amd64"}'
    registry = Registry(token="t0k", blobs={digest(config): config}, blob_storage="https://storage.example")
    with client(registry, credentials=Credentials("alice", "pw", source="--creds")) as c:
        assert c.get_blob(digest(config)) == config
    stored = [r for r in registry.log if r.url.host == "storage.example"]
    assert stored and all("Authorization" not in r.headers for r in stored)


def test_a_wrong_manifest_digest_is_refused() -> None:
    registry = Registry(manifests={"v1": b'{"schemaVersion": 2}'})
    original = registry.__call__

    def lying(request: httpx.Request) -> httpx.Response:
        response = original(request)
        if "/manifests/" in request.url.path:
            response.headers["Docker-Content-Digest"] = digest(b"other")
        return response

    with RegistryClient("reg.example/a/b:v1", OPTIONS, credentials=None,
                        transport=httpx.MockTransport(lying)) as c, \
            pytest.raises(RegistryError, match="the registry says"):
        c.get_manifest()
