"""diskport.net.direct against nginx on loopback (plain and TLS with a test CA): ranged bodies read into the
caller's buffer, connections kept between requests, the same TLS verification as httpx's client."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from diskport.net import USER_AGENT
from diskport.net.direct import DirectConnections, DirectError, environment_proxy
from tests.support import MiB
from tests.support.servers import NginxServer, NginxTlsServer


@pytest.fixture
def blob(serve_dir: Path) -> bytes:
    data = os.urandom(3 * MiB + 123)
    (serve_dir / "blob.bin").write_bytes(data)
    return data


def _get(connections: DirectConnections, start: int, end: int) -> bytes:
    response = connections.get({"Range": f"bytes={start}-{end}"})
    assert response.status == 206
    out = bytearray(end - start + 1)
    view, done = memoryview(out), 0
    while done < len(out):
        n = response.readinto(view[done:])
        assert n, f"body ended after {done} of {len(out)} bytes"
        done += n
    assert response.readinto(memoryview(bytearray(1))) == 0
    response.close()
    return bytes(out)


def test_ranges_come_exact_on_one_kept_connection(nginx: NginxServer, blob: bytes) -> None:
    connections = DirectConnections(nginx.url("blob.bin"), connect_timeout=5, read_timeout=5,
                                    headers={"Authorization": "Bearer t0ken"})
    spans = [(0, MiB - 1), (MiB, 3 * MiB - 1), (3 * MiB, len(blob) - 1), (17, 4096)]
    try:
        for start, end in spans:
            assert _get(connections, start, end) == blob[start:end + 1]
    finally:
        connections.close()
    entries = nginx.access_entries(expect=len(spans))
    assert [e["range"] for e in entries] == [f"bytes={s}-{e}" for s, e in spans]
    assert len({e["connection"] for e in entries}) == 1, entries
    assert [e["connection_requests"] for e in entries] == [1, 2, 3, 4]
    assert all(e["authorization"] == "Bearer t0ken" and e["user_agent"] == USER_AGENT for e in entries)


def test_a_body_closed_early_closes_its_connection(nginx: NginxServer, blob: bytes) -> None:
    connections = DirectConnections(nginx.url("blob.bin"), connect_timeout=5, read_timeout=5)
    try:
        response = connections.get({"Range": f"bytes=0-{len(blob) - 1}"})
        assert response.readinto(memoryview(bytearray(1000))) > 0
        response.close()  # the rest of the body is still on its way: that connection cannot take another request
        assert _get(connections, 5, 99) == blob[5:100]
    finally:
        connections.close()
    entries = nginx.access_entries(expect=2)
    assert len({e["connection"] for e in entries}) == 2, entries


def test_a_user_agent_given_replaces_the_default(nginx: NginxServer, blob: bytes) -> None:
    connections = DirectConnections(nginx.url("blob.bin"), connect_timeout=5, read_timeout=5,
                                    headers={"user-agent": "mine/1"})
    try:
        assert _get(connections, 0, 9) == blob[:10]
    finally:
        connections.close()
    assert [e["user_agent"] for e in nginx.access_entries(expect=1)] == ["mine/1"]


def test_tls_is_verified_like_the_client(tls_server: NginxTlsServer, blob: bytes) -> None:
    trusted = DirectConnections(tls_server.url("blob.bin"), connect_timeout=5, read_timeout=5,
                                ca_bundle=str(tls_server.ca_bundle))
    try:
        assert _get(trusted, 100, 200_000) == blob[100:200_001]
    finally:
        trusted.close()
    for url in (tls_server.untrusted_url("blob.bin"), tls_server.wrong_name_url("blob.bin")):
        refused = DirectConnections(url, connect_timeout=5, read_timeout=5, ca_bundle=str(tls_server.ca_bundle))
        with pytest.raises(ssl.SSLCertVerificationError):
            refused.get({"Range": "bytes=0-9"})
        refused.close()
    insecure = DirectConnections(tls_server.untrusted_url("blob.bin"), connect_timeout=5, read_timeout=5,
                                 insecure=True)
    try:
        assert _get(insecure, 0, 9) == blob[:10]
    finally:
        insecure.close()
    assert issubclass(ssl.SSLCertVerificationError, DirectError)


def test_a_refused_connection_raises_a_direct_error(nginx: NginxServer) -> None:
    url = nginx.url("blob.bin")
    nginx.stop()
    connections = DirectConnections(url, connect_timeout=2, read_timeout=2)
    with pytest.raises(DirectError):
        connections.get({})


@pytest.mark.parametrize(("variable", "scheme", "expected"), [
    ("HTTPS_PROXY", "https", True), ("https_proxy", "http", False), ("HTTP_PROXY", "http", True),
    ("ALL_PROXY", "https", True), ("NO_PROXY", "http", False),
])
def test_a_proxy_in_the_environment_is_seen(monkeypatch: pytest.MonkeyPatch, variable: str, scheme: str,
                                            expected: bool) -> None:
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    assert not environment_proxy(scheme)
    monkeypatch.setenv(variable, "http://127.0.0.1:9" if variable != "NO_PROXY" else "*")
    assert environment_proxy(scheme) is expected
