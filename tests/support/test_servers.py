"""The test servers of tests/support/servers.py do what they claim: each behaviour an import test relies on, checked
with httpx against the real server."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import servers
from tests.support.servers import FaultServer, NginxServer, NginxTlsServer, PlainHTTPServer, ProxyServer, parse_range

# The fixtures, by name (redundant, and harmless, once conftest.py has ``pytest_plugins = ["tests.support.servers"]``).
serve_dir = servers.serve_dir
nginx = servers.nginx
plain_http = servers.plain_http
tls_pki = servers.tls_pki
tls_server = servers.tls_server
fault_server = servers.fault_server
proxy_server = servers.proxy_server

TIMEOUT = httpx.Timeout(5.0)
DATA = random.Random(7).randbytes(300_000)


def client(**kw: object) -> httpx.Client:
    return httpx.Client(timeout=TIMEOUT, trust_env=False, **kw)  # type: ignore[arg-type]


def get_truncated(c: httpx.Client, url: str, **kw: object) -> tuple[httpx.Response, bytes, Exception | None]:
    """GET ``url`` streaming; the response, the bytes that arrived and the error that ended them, if any."""
    got = bytearray()
    with c.stream("GET", url, **kw) as r:  # type: ignore[arg-type]
        try:
            for chunk in r.iter_raw():
                got += chunk
        except httpx.HTTPError as e:
            return r, bytes(got), e
    return r, bytes(got), None


# -- nginx -------------------------------------------------------------------------------------------------

def test_nginx_ranges_validators_and_access_log(nginx: NginxServer) -> None:
    url = nginx.put("disk.img", DATA)
    with client() as c:
        r = c.get(url, headers={"Range": "bytes=100-199", "Accept-Encoding": "gzip"})
        assert r.status_code == 206
        assert r.content == DATA[100:200]
        assert r.headers["content-range"] == f"bytes 100-199/{len(DATA)}"
        assert "content-encoding" not in r.headers
        etag, last_modified = r.headers["etag"], r.headers["last-modified"]
        assert etag.startswith('"') and last_modified.endswith("GMT")
        tail = c.get(url, headers={"Range": f"bytes={len(DATA) - 10}-"})
        assert (tail.status_code, tail.content) == (206, DATA[-10:])
        same = c.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
        assert (same.status_code, same.content) == (206, DATA[:10])
        stale = c.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
        assert (stale.status_code, stale.content) == (200, DATA)
        beyond = c.get(url, headers={"Range": f"bytes={len(DATA)}-"})
        assert beyond.status_code == 416
        full = c.get(url)
        assert (full.status_code, full.content, full.headers["accept-ranges"]) == (200, DATA, "bytes")
    entries = nginx.access_entries(expect=6)
    assert [e["status"] for e in entries] == [206, 206, 206, 200, 416, 200]
    assert [e["range"] for e in entries][:2] == ["bytes=100-199", f"bytes={len(DATA) - 10}-"]
    assert entries[2]["if_range"] == etag
    assert entries[0]["body_bytes_sent"] == 100
    assert all(e["uri"] == "/disk.img" and e["request_completion"] == "OK" for e in entries)
    assert len({e["connection"] for e in entries}) == 1  # keep-alive: one connection


def test_nginx_stops_and_is_reaped(serve_dir: Path, tmp_path: Path) -> None:
    server = NginxServer(serve_dir, tmp_path / "nginx-own")
    with server:
        proc = server.proc
        assert proc is not None and proc.poll() is None
        assert httpx.get(server.put("a", b"abc"), timeout=TIMEOUT).content == b"abc"
    assert proc.returncode is not None  # reaped
    assert server.proc is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url("a"), timeout=TIMEOUT)


# -- plain_http ----------------------------------------------------------------------------------------------

def test_plain_http_ignores_range(plain_http: PlainHTTPServer) -> None:
    url = plain_http.put("disk.img", DATA)
    with client() as c:
        r = c.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 200
    assert r.content == DATA
    assert r.headers["content-length"] == str(len(DATA))
    assert "accept-ranges" not in r.headers and "etag" not in r.headers
    [record] = plain_http.requests
    assert (record.method, record.path, record.status) == ("GET", "/disk.img", 200)
    assert record.header("range") == "bytes=100-199"
    assert record.bytes_sent == len(DATA)


# -- tls_server ----------------------------------------------------------------------------------------------

def test_tls_verifies_with_ca_bundle_only(tls_server: NginxTlsServer) -> None:
    url = tls_server.put("disk.img", DATA)
    assert url.startswith("https://127.0.0.1:")
    with client(verify=tls_server.ssl_context()) as c:
        r = c.get(url, headers={"Range": "bytes=5-9"})
        assert (r.status_code, r.content) == (206, DATA[5:10])
        assert c.get(tls_server.url("disk.img", host="localhost")).content == DATA
        for bad in (tls_server.untrusted_url("disk.img"), tls_server.wrong_name_url("disk.img")):
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                c.get(bad)
    with client() as c, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        c.get(url)  # the system trust store does not know the test CA
    with client(verify=False) as c:
        assert c.get(tls_server.untrusted_url("disk.img")).content == DATA
    assert tls_server.ca_bundle.read_text().startswith("-----BEGIN CERTIFICATE-----")


# -- fault_server: correct service -----------------------------------------------------------------------------

def test_parse_range() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=90-200", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-1000", 100) == (0, 99)
    assert parse_range("bytes=100-", 100) == (-1, -1)
    assert parse_range("bytes=-0", 100) == (-1, -1)
    assert parse_range("bytes=0-", 0) == (-1, -1)
    for ignored in ("bytes=5-1", "bytes=0-1,5-6", "items=0-1", "bytes=x-", "bytes=-"):
        assert parse_range(ignored, 100) is None, ignored


def test_fault_server_serves_ranges_correctly(fault_server: FaultServer) -> None:
    url = fault_server.put("disk.img", DATA)
    size = len(DATA)
    with client() as c:
        r = c.get(url, headers={"Range": "bytes=1000-1999"})
        assert (r.status_code, r.content) == (206, DATA[1000:2000])
        assert r.headers["content-range"] == f"bytes 1000-1999/{size}"
        assert r.headers["accept-ranges"] == "bytes"
        assert r.headers["etag"].startswith('"') and r.headers["last-modified"].endswith("GMT")
        assert c.get(url, headers={"Range": f"bytes={size - 5}-"}).content == DATA[-5:]
        assert c.get(url, headers={"Range": "bytes=-7"}).content == DATA[-7:]
        unsat = c.get(url, headers={"Range": f"bytes={size}-"})
        assert (unsat.status_code, unsat.headers["content-range"]) == (416, f"bytes */{size}")
        multi = c.get(url, headers={"Range": "bytes=0-1,5-6"})
        assert (multi.status_code, multi.content) == (200, DATA)
        head = c.head(url)
        assert (head.status_code, head.headers["content-length"], head.content) == (200, str(size), b"")
        assert c.get(fault_server.url("missing")).status_code == 404
        assert c.get(fault_server.url("../../etc/passwd")).status_code == 404
    records = fault_server.requests
    assert [r.status for r in records] == [206, 206, 206, 416, 200, 200, 404, 404]
    assert [r.bytes_sent for r in records[:5]] == [1000, 5, 7, 0, size]
    assert records[0].header("Range") == "bytes=1000-1999" and records[0].method == "GET"
    assert records[5].method == "HEAD"


def test_fault_server_if_range(fault_server: FaultServer) -> None:
    url = fault_server.put("disk.img", DATA)
    with client() as c:
        first = c.get(url, headers={"Range": "bytes=0-9"})
        etag, date = first.headers["etag"], first.headers["last-modified"]
        for validator in (etag, date):
            r = c.get(url, headers={"Range": "bytes=10-19", "If-Range": validator})
            assert (r.status_code, r.content) == (206, DATA[10:20]), validator
        for stale in ('"other"', "W/" + etag, "Mon, 01 Jan 2001 00:00:00 GMT", "not a date"):
            r = c.get(url, headers={"Range": "bytes=10-19", "If-Range": stale})
            assert (r.status_code, r.content) == (200, DATA), stale


# -- fault_server: each fault, exactly as programmed --------------------------------------------------------

def test_drop_after_truncates_the_first_n_gets(fault_server: FaultServer) -> None:
    url = fault_server.put("disk.img", DATA)
    fault_server.faults.drop_after = 70_000
    fault_server.faults.drop_times = 2
    with client() as c:
        for _ in range(2):
            r, got, error = get_truncated(c, url)
            assert isinstance(error, httpx.RemoteProtocolError)
            assert r.headers["content-length"] == str(len(DATA))
            assert got == DATA[:70_000]
        r, got, error = get_truncated(c, url, headers={"Range": "bytes=70000-"})
        assert (error, r.status_code, got) == (None, 206, DATA[70_000:])
    assert fault_server.injected["drop"] == 2
    assert [r.bytes_sent for r in fault_server.requests] == [70_000, 70_000, len(DATA) - 70_000]


def test_drop_only_counts_when_the_body_is_longer(fault_server: FaultServer) -> None:
    url = fault_server.put("disk.img", DATA)
    fault_server.faults.drop_after = 100
    with client() as c:
        assert c.get(url, headers={"Range": "bytes=0-99"}).content == DATA[:100]  # not longer: no drop
        assert get_truncated(c, url)[1] == DATA[:100]
        assert c.get(url).content == DATA
    assert fault_server.injected["drop"] == 1


def test_stall_then_resume(fault_server: FaultServer) -> None:
    url = fault_server.put("disk.img", DATA)
    fault_server.faults.stall_after = 5000
    fault_server.faults.stall_seconds = 0.6
    with client() as c:
        t0 = time.monotonic()
        r = c.get(url)
        elapsed = time.monotonic() - t0
        assert (r.status_code, r.content) == (200, DATA)
        assert elapsed >= 0.6
        t0 = time.monotonic()
        assert c.get(url).content == DATA  # stall_times=1: the second is not stalled
        assert time.monotonic() - t0 < 0.5
    assert fault_server.injected["stall"] == 1


def test_stall_ends_when_the_client_gives_up(fault_server: FaultServer) -> None:
    url = fault_server.put("disk.img", DATA)
    fault_server.faults.stall_after = 1234
    fault_server.faults.stall_seconds = 4.0
    with httpx.Client(timeout=httpx.Timeout(5.0, read=0.3), trust_env=False) as c:
        _, got, error = get_truncated(c, url)
    closed = time.monotonic()
    assert isinstance(error, httpx.ReadTimeout)
    assert got == DATA[:1234]
    [record] = fault_server.recorder.snapshot(settle=3.0)
    assert record.done.is_set()
    assert time.monotonic() - closed < 1.0  # the handler noticed, it did not sleep the 4 s out
    assert record.bytes_sent == 1234


def test_status_sequence_in_order_with_retry_after(fault_server: FaultServer) -> None:
    url = fault_server.put("disk.img", DATA)
    fault_server.faults.status_sequence = [500, 503, 429]
    fault_server.faults.retry_after = 2
    with client() as c:
        answers = [c.get(url) for _ in range(4)]
    assert [r.status_code for r in answers] == [500, 503, 429, 200]
    assert [r.headers.get("retry-after") for r in answers] == [None, "2", "2", None]
    assert answers[3].content == DATA
    assert fault_server.injected["status"] == 3


def test_answer_416_times(fault_server: FaultServer) -> None:
    url = fault_server.put("disk.img", DATA)
    fault_server.faults.answer_416_times = 2
    with client() as c:
        assert c.get(url).status_code == 200  # no Range: not counted
        r = c.get(url, headers={"Range": "bytes=0-9"})
        assert (r.status_code, r.headers["content-range"]) == (416, f"bytes */{len(DATA)}")
        assert c.get(url, headers={"Range": "bytes=0-9"}).status_code == 416
        assert c.get(url, headers={"Range": "bytes=0-9"}).content == DATA[:10]
    assert fault_server.injected["416"] == 2


def test_change_after_requests_makes_if_range_fail(fault_server: FaultServer, serve_dir: Path) -> None:
    url = fault_server.put("disk.img", DATA)
    fault_server.faults.change_after_requests = 1
    with client() as c:
        first = c.get(url, headers={"Range": "bytes=0-99"})
        assert first.content == DATA[:100]
        resumed = c.get(url, headers={"Range": "bytes=100-", "If-Range": first.headers["etag"]})
        by_date = c.get(url, headers={"Range": "bytes=100-", "If-Range": first.headers["last-modified"]})
    changed = bytes(255 - b for b in DATA)
    assert resumed.status_code == 200 and resumed.content == changed
    assert by_date.status_code == 200 and by_date.content == changed
    assert resumed.headers["etag"] != first.headers["etag"]
    assert resumed.headers["last-modified"] != first.headers["last-modified"]
    assert (serve_dir / "disk.img").read_bytes() == changed
    assert fault_server.injected["change"] == 1


def test_lie_content_length_gives_a_short_body(fault_server: FaultServer) -> None:
    url = fault_server.put("disk.img", DATA)
    fault_server.faults.lie_content_length = len(DATA) + 1000
    fault_server.faults.lie_times = 1
    with client() as c:
        r, got, error = get_truncated(c, url)
        assert isinstance(error, httpx.RemoteProtocolError)
        assert r.headers["content-length"] == str(len(DATA) + 1000)
        assert got == DATA
        assert c.get(url).headers["content-length"] == str(len(DATA))
    assert fault_server.injected["lie"] == 1


def test_no_validators(fault_server: FaultServer) -> None:
    url = fault_server.put("disk.img", DATA)
    with client() as c:
        validators = c.get(url, headers={"Range": "bytes=0-0"}).headers
        fault_server.faults.no_validators = True
        r = c.get(url, headers={"Range": "bytes=0-9"})
        assert r.status_code == 206 and "etag" not in r.headers and "last-modified" not in r.headers
        for value in (validators["etag"], validators["last-modified"]):
            assert c.get(url, headers={"Range": "bytes=0-9", "If-Range": value}).status_code == 200


def test_ranges_off(fault_server: FaultServer) -> None:
    url = fault_server.put("disk.img", DATA)
    fault_server.faults.ranges = False
    with client() as c:
        r = c.get(url, headers={"Range": "bytes=0-9"})
    assert (r.status_code, r.content) == (200, DATA)
    assert "accept-ranges" not in r.headers and "content-range" not in r.headers


def test_redirect_chain_across_host_names(fault_server: FaultServer) -> None:
    url = fault_server.put("dir/disk.img", DATA)
    fault_server.faults.redirect_hops = 2
    fault_server.faults.redirect_cross_host = True
    port = fault_server.port
    with client(follow_redirects=True) as c:
        r = c.get(url, headers={"Authorization": "Bearer secret"})
    assert (r.status_code, r.content) == (200, DATA)
    assert str(r.url) == f"http://localhost:{port}/_r/0/dir/disk.img"
    records = fault_server.requests
    assert [(x.host, x.path, x.status) for x in records] == [
        (f"127.0.0.1:{port}", "/dir/disk.img", 302),
        (f"localhost:{port}", "/_r/1/dir/disk.img", 302),
        (f"localhost:{port}", "/_r/0/dir/disk.img", 200)]
    # httpx drops Authorization on a cross-origin redirect: what each host received is on record
    assert [x.header("Authorization") for x in records] == ["Bearer secret", None, None]
    assert [x.host_name for x in records] == ["127.0.0.1", "localhost", "localhost"]
    assert fault_server.injected["redirect"] == 2


def test_redirect_to_another_server(fault_server: FaultServer, nginx: NginxServer) -> None:
    fault_server.put("disk.img", DATA)
    fault_server.faults.redirect_to = nginx.url("disk.img")
    fault_server.faults.redirect_status = 307
    with client() as c:
        r = c.get(fault_server.url("disk.img"), headers={"Range": "bytes=0-9"})
        assert (r.status_code, r.headers["location"]) == (307, nginx.url("disk.img"))
        followed = c.get(fault_server.url("disk.img"), headers={"Range": "bytes=0-9", "Authorization": "x"},
                         follow_redirects=True)
    assert (followed.status_code, followed.content) == (206, DATA[:10])
    [entry] = nginx.access_entries(expect=1)
    assert (entry["status"], entry["range"], entry["authorization"]) == (206, "bytes=0-9", "")


def test_fault_server_stop_ends_stalled_and_idle_connections(serve_dir: Path) -> None:
    server = FaultServer(serve_dir)
    with server:
        url = server.put("disk.img", DATA)
        server.faults.stall_after = 10
        server.faults.stall_seconds = 5.0
        idle = client()
        assert idle.get(server.url("disk.img"), headers={"Range": "bytes=0-1"}).status_code == 206  # kept alive
        errors: list[Exception | None] = []
        reader = threading.Thread(target=lambda: errors.append(get_truncated(client(), url)[2]))
        reader.start()
        deadline = time.monotonic() + 3
        while server.injected["stall"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.injected["stall"] == 1
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 2.0  # stop() did not wait the stall out
    reader.join(3)
    idle.close()
    assert not reader.is_alive()
    assert isinstance(errors[0], httpx.RemoteProtocolError)
    assert not [t for t in threading.enumerate() if t.name.startswith(f"FaultServer:{server.port}")]


# -- proxy_server ----------------------------------------------------------------------------------------------

def test_http_proxy_from_the_environment(proxy_server: ProxyServer, plain_http: PlainHTTPServer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = plain_http.put("disk.img", DATA)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy_server.proxy_url)
    with httpx.Client(timeout=TIMEOUT, trust_env=True) as c:
        r = c.get(url)
        refused = c.get("http://example.invalid/disk.img")
    assert (r.status_code, r.content) == (200, DATA)
    assert refused.status_code == 403  # only loopback targets: nothing leaves the machine
    [relayed, other] = proxy_server.requests
    assert (relayed.method, relayed.path, relayed.status) == ("GET", url, 200)
    assert relayed.bytes_sent == len(DATA)
    assert other.path == "http://example.invalid/disk.img"
    assert len(plain_http.requests) == 1


def test_https_proxy_tunnels_with_connect(proxy_server: ProxyServer, tls_server: NginxTlsServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    url = tls_server.put("disk.img", DATA)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy_server.proxy_url)
    with httpx.Client(timeout=TIMEOUT, trust_env=True, verify=tls_server.ssl_context()) as c:
        r = c.get(url, headers={"Range": "bytes=0-99"})
    assert (r.status_code, r.content) == (206, DATA[:100])
    [tunnel] = proxy_server.requests
    assert (tunnel.method, tunnel.path, tunnel.status) == ("CONNECT", f"127.0.0.1:{tls_server.port}", 200)
    assert tls_server.access_entries(expect=1)[0]["status"] == 206
