"""diskport import against real servers on loopback: nginx (ranges), http.server (no ranges), TLS with a test
CA, and a fault-injecting server. Every case either completes with exactly qemu-img's bytes or fails cleanly with
nothing left behind."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from diskport.errors import DiskportError, SourceError
from diskport.importer import import_image, parse_size
from diskport.net import RetryPolicy, read_bounded
from diskport.sources.http import HttpOptions, HttpSource
from tests.support import MiB
from tests.support.clients import run_cli
from tests.support.images import loop_device, make_image, pvc_dir, qemu_raw_sha256, sha256_file
from tests.support.servers import FaultServer, NginxServer, NginxTlsServer, PlainHTTPServer

FAST = HttpOptions(retry=RetryPolicy(attempts=4, backoff=0.05, max_backoff=0.2), stall_timeout=1.0, connect_timeout=2.0)


@pytest.fixture
def qcow2(serve_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    image = make_image(serve_dir, "qcow2", 12 * MiB + 4096, name="disk.qcow2")
    return image, qemu_raw_sha256(image, tmp_path)


def test_ranged_qcow2_converts_without_scratch(nginx: NginxServer, qcow2: tuple[Path, str], tmp_path: Path) -> None:
    image, expected = qcow2
    dest = pvc_dir(tmp_path) / "disk.img"
    result = import_image(nginx.url("disk.qcow2"), dest, http=FAST)
    assert sha256_file(dest) == expected
    assert result.access.kind == "direct", str(result.access)
    assert result.access.reason.startswith("read over HTTP range requests")
    ranges = [e["range"] for e in nginx.access_entries()]
    assert all(r.startswith("bytes=") for r in ranges), ranges
    # no more was fetched than the file holds, give or take what was in flight when the reader jumped
    assert result.downloaded_bytes <= image.stat().st_size * 1.05
    assert os.listdir(dest.parent) == ["disk.img"]


def test_several_ranges_in_flight(serve_dir: Path, tmp_path: Path) -> None:
    """Large reads go out as several ranged requests at once, on their own connections: with nginx capping each
    connection's rate (as CDNs and object stores do), their times overlap, and the bytes are exact. (nginx lets
    one second's worth through at once, then paces: at 1 MB/s, each 2 MiB range takes about a second.)"""
    image = make_image(serve_dir, "qcow2", 16 * MiB, name="busy.qcow2")
    expected = qemu_raw_sha256(image, tmp_path)
    dest = pvc_dir(tmp_path) / "disk.img"
    with NginxServer(serve_dir, tmp_path / "nginx-capped", rate_per_connection="1m") as capped:
        import_image(capped.url("busy.qcow2"), dest, http=HttpOptions(streams=4, chunk=2 * MiB))
        big = [e for e in capped.access_entries() if int(e["body_bytes_sent"]) >= MiB]
    assert sha256_file(dest) == expected
    assert len({e["connection"] for e in big}) >= 3, big
    spans = sorted((float(e["msec"]) - float(e["request_time"]), float(e["msec"])) for e in big)
    overlapping = sum(1 for (_, end), (begin, _) in itertools.pairwise(spans) if begin < end)
    assert overlapping >= 2, spans


def test_import_into_block_device(nginx: NginxServer, qcow2: tuple[Path, str], tmp_path: Path) -> None:
    """A persistent disk in block mode: the device is written in place, zero runs zeroed (the device held 0xff),
    bytes past the disk untouched; a disk larger than the device fails before anything is written."""
    _, expected = qcow2
    virtual = 12 * MiB + 4096
    with loop_device(tmp_path / "pv.img", 16 * MiB) as dev:
        proc = run_cli("import", "-q", nginx.url("disk.qcow2"), dev)
        assert proc.returncode == 0, proc.stderr
        with open(dev, "rb") as f:
            disk, rest = f.read(virtual), f.read()
        assert hashlib.sha256(disk).hexdigest() == expected
        assert rest == b"\xff" * (16 * MiB - virtual)
    with loop_device(tmp_path / "small.img", 8 * MiB) as dev:
        proc = run_cli("import", "-q", nginx.url("disk.qcow2"), dev)
        assert proc.returncode == 1
        assert f"holds {8 * MiB} bytes; the disk needs {virtual}" in proc.stderr, proc.stderr
        with open(dev, "rb") as f:
            assert f.read() == b"\xff" * (8 * MiB), "nothing was written"


def test_server_without_ranges_spools_and_says_why(plain_http: PlainHTTPServer, qcow2: tuple[Path, str],
                                                   tmp_path: Path) -> None:
    _, expected = qcow2
    dest = pvc_dir(tmp_path) / "disk.img"
    result = import_image(plain_http.url("disk.qcow2"), dest, http=FAST)
    assert sha256_file(dest) == expected
    assert result.access.kind == "spooled" and "does not answer range requests" in str(result.access)
    assert os.listdir(dest.parent) == ["disk.img"], "the spool is gone"


def test_compressed_raw_streams(nginx: NginxServer, serve_dir: Path, tmp_path: Path) -> None:
    raw = make_image(serve_dir, "raw", 6 * MiB, name="disk.raw")
    nginx.put("disk.raw.gz", gzip.compress(raw.read_bytes()))
    dest = pvc_dir(tmp_path) / "disk.img"
    result = import_image(nginx.url("disk.raw.gz"), dest, http=FAST)
    assert sha256_file(dest) == sha256_file(raw)
    assert result.compression == ["gzip"] and result.access.kind == "stream"


def test_tls_with_test_ca(tls_server: NginxTlsServer, serve_dir: Path, tmp_path: Path) -> None:
    image = make_image(serve_dir, "qcow2", 4 * MiB, name="disk.qcow2")
    expected = qemu_raw_sha256(image, tmp_path)
    dest = pvc_dir(tmp_path) / "disk.img"
    proc = run_cli("import", "-q", tls_server.url("disk.qcow2"), dest)
    assert proc.returncode == 1 and "TLS failed" in proc.stderr and "--ca-bundle" in proc.stderr
    assert not dest.exists()
    proc = run_cli("import", "-q", "--ca-bundle", tls_server.ca_bundle, tls_server.url("disk.qcow2"), dest)
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(dest) == expected
    proc = run_cli("import", "-q", "--force", "--ca-bundle", tls_server.ca_bundle,
                   tls_server.untrusted_url("disk.qcow2"), dest)
    assert proc.returncode == 1 and "TLS failed" in proc.stderr
    assert sha256_file(dest) == expected, "a failed import leaves the old disk as it was"
    proc = run_cli("import", "-q", "--force", "--insecure", tls_server.untrusted_url("disk.qcow2"), dest)
    assert proc.returncode == 0


def test_inspect_of_an_https_url_takes_the_same_tls_options(tls_server: NginxTlsServer, serve_dir: Path) -> None:
    """inspect URL (without --guest) honours --ca-bundle and --insecure, as import does and its help says."""
    make_image(serve_dir, "qcow2", 4 * MiB, name="disk.qcow2")
    proc = run_cli("inspect", "--json", tls_server.url("disk.qcow2"))
    assert proc.returncode == 1 and "TLS failed" in proc.stderr
    proc = run_cli("inspect", "--json", "--ca-bundle", tls_server.ca_bundle, tls_server.url("disk.qcow2"))
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["format"] == "qcow2" and facts["virtual-size"] == 4 * MiB
    assert facts["filename"] == tls_server.url("disk.qcow2")
    proc = run_cli("inspect", "--ca-bundle", tls_server.ca_bundle, tls_server.untrusted_url("disk.qcow2"))
    assert proc.returncode == 1 and "TLS failed" in proc.stderr
    proc = run_cli("inspect", "--json", "--insecure", tls_server.untrusted_url("disk.qcow2"))
    assert proc.returncode == 0 and json.loads(proc.stdout)["format"] == "qcow2", proc.stderr


def test_dropped_connection_resumes_with_if_range(fault_server: FaultServer, qcow2: tuple[Path, str],
                                                  tmp_path: Path) -> None:
    _, expected = qcow2
    fault_server.faults.drop_after = 300 * 1024
    fault_server.faults.drop_times = 3
    dest = pvc_dir(tmp_path) / "disk.img"
    import_image(fault_server.url("disk.qcow2"), dest, http=FAST)
    assert sha256_file(dest) == expected
    assert fault_server.injected["drop"] == 3
    resumed = [r for r in fault_server.requests if r.header("If-Range")]
    assert resumed, "a resumed request must carry If-Range"


def test_errors_and_rate_limits_are_retried(fault_server: FaultServer, qcow2: tuple[Path, str],
                                            tmp_path: Path) -> None:
    _, expected = qcow2
    fault_server.faults.status_sequence = [503, 500, 429]
    fault_server.faults.retry_after = 0
    dest = pvc_dir(tmp_path) / "disk.img"
    import_image(fault_server.url("disk.qcow2"), dest, http=FAST)
    assert sha256_file(dest) == expected
    assert [r.status for r in fault_server.requests[:3]] == [503, 500, 429]


def test_stall_is_detected_and_retried(fault_server: FaultServer, qcow2: tuple[Path, str], tmp_path: Path) -> None:
    _, expected = qcow2
    fault_server.faults.stall_after = 100 * 1024
    fault_server.faults.stall_seconds = 3
    dest = pvc_dir(tmp_path) / "disk.img"
    import_image(fault_server.url("disk.qcow2"), dest, http=FAST)
    assert sha256_file(dest) == expected
    assert fault_server.injected["stall"] == 1


def test_file_changed_on_server_is_never_stitched(fault_server: FaultServer, qcow2: tuple[Path, str],
                                                  tmp_path: Path) -> None:
    fault_server.faults.drop_after = 200 * 1024
    fault_server.faults.drop_times = 1
    fault_server.faults.change_after_requests = 2
    dest = pvc_dir(tmp_path) / "disk.img"
    with pytest.raises(DiskportError, match=r"changed|corrupt|magic|truncated|beyond"):
        import_image(fault_server.url("disk.qcow2"), dest, http=FAST)
    assert os.listdir(dest.parent) == []


def test_persistent_errors_fail_cleanly(fault_server: FaultServer, qcow2: tuple[Path, str], tmp_path: Path) -> None:
    fault_server.faults.status_sequence = [500] * 20
    dest = pvc_dir(tmp_path) / "disk.img"
    with pytest.raises(SourceError, match="giving up after 5 attempts: HTTP 500"):
        import_image(fault_server.url("disk.qcow2"), dest, http=FAST)
    assert os.listdir(dest.parent) == []


def test_short_body_is_resumed(fault_server: FaultServer, qcow2: tuple[Path, str], tmp_path: Path) -> None:
    _, expected = qcow2
    fault_server.faults.lie_content_length = 64 * MiB
    fault_server.faults.lie_times = 2
    dest = pvc_dir(tmp_path) / "disk.img"
    import_image(fault_server.url("disk.qcow2"), dest, http=FAST)
    assert sha256_file(dest) == expected


def test_credentials_not_sent_to_another_host(fault_server: FaultServer, qcow2: tuple[Path, str],
                                              tmp_path: Path) -> None:
    _, expected = qcow2
    fault_server.faults.redirect_hops = 1
    fault_server.faults.redirect_cross_host = True
    dest = pvc_dir(tmp_path) / "disk.img"
    options = HttpOptions(headers={"Authorization": "Bearer secret", "X-Token": "t0ken"},
                          retry=RetryPolicy(attempts=2, backoff=0.05))
    import_image(fault_server.url("disk.qcow2"), dest, http=options)
    assert sha256_file(dest) == expected
    first = fault_server.requests[0]
    assert first.header("Authorization") == "Bearer secret"
    others = [r for r in fault_server.requests if r.host_name != first.host_name]
    assert others, "the redirect went to the other host name"
    assert all(r.header("Authorization") is None and r.header("X-Token") is None for r in others)


def test_checksum(nginx: NginxServer, qcow2: tuple[Path, str], tmp_path: Path) -> None:
    image, expected = qcow2
    import hashlib

    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    dest = pvc_dir(tmp_path) / "disk.img"
    proc = run_cli("import", "-q", "--checksum", "sha256:" + "0" * 64, nginx.url("disk.qcow2"), dest)
    assert proc.returncode == 1 and "checksum mismatch" in proc.stderr
    assert os.listdir(dest.parent) == []
    proc = run_cli("import", "--checksum", f"sha256:{digest}", nginx.url("disk.qcow2"), dest)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stderr
    assert sha256_file(dest) == expected
    assert run_cli("import", "--checksum", "crc32:1234", nginx.url("disk.qcow2"), dest).returncode == 2


def test_size(nginx: NginxServer, qcow2: tuple[Path, str], tmp_path: Path) -> None:
    dest = pvc_dir(tmp_path) / "disk.img"
    proc = run_cli("import", "-q", "--size", "8M", nginx.url("disk.qcow2"), dest)
    assert proc.returncode == 1
    assert f"the disk is {12 * MiB + 4096} bytes, larger than --size {8 * MiB}" in proc.stderr
    assert os.listdir(dest.parent) == []
    assert run_cli("import", "-q", "--size", "1Gi", nginx.url("disk.qcow2"), dest).returncode == 0
    assert dest.stat().st_size == 1024 * MiB
    assert parse_size("10G") == parse_size("10Gi") == 10 * 1024**3
    assert parse_size("512") == 512


def test_schemes(tmp_path: Path, qcow2: tuple[Path, str]) -> None:
    image, expected = qcow2
    proc = run_cli("import", "s3://bucket/disk.qcow2", tmp_path / "x.img")
    assert proc.returncode == 2 and "signed https URL" in proc.stderr
    dest = pvc_dir(tmp_path) / "disk.img"
    assert run_cli("import", "-q", image.as_uri(), dest).returncode == 0
    assert sha256_file(dest) == expected


def test_json_progress_and_inspect_url(nginx: NginxServer, qcow2: tuple[Path, str], tmp_path: Path) -> None:
    dest = pvc_dir(tmp_path) / "disk.img"
    proc = run_cli("import", "--progress=json", nginx.url("disk.qcow2"), dest)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["converted"] == lines[-1]["total"] == 12 * MiB + 4096
    assert lines[-1]["downloaded"] > 0
    facts = json.loads(run_cli("inspect", "--json", nginx.url("disk.qcow2"), check=True).stdout)
    assert facts["format"] == "qcow2" and facts["virtual-size"] == 12 * MiB + 4096


def test_metrics_endpoint_and_phases(fault_server: FaultServer, qcow2: tuple[Path, str], tmp_path: Path) -> None:
    """While an import runs (slowed by a stall), /metrics serves Prometheus text; JSON lines end with "done"."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fault_server.faults.stall_after = 1024 * 1024
    fault_server.faults.stall_seconds = 3
    dest = pvc_dir(tmp_path) / "disk.img"
    proc = subprocess.Popen([sys.executable, "-m", "diskport", "import", "--progress=json", "--metrics-port",
                             str(port), fault_server.url("disk.qcow2"), str(dest)],
                            stderr=subprocess.PIPE, text=True)
    text = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "diskport_phase" not in text:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
        except httpx.HTTPError:
            time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert 'diskport_phase{phase="running"} 1' in text
    assert "# TYPE diskport_downloaded_bytes_total counter" in text
    assert "diskport_download_size_bytes " in text
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines[-1]["phase"] == "done" and lines[-1]["converted"] == 12 * MiB + 4096
    assert lines[-1]["download_total"] == qcow2[0].stat().st_size


@pytest.mark.parametrize(("sig", "code"), [(15, 143), (2, 130)])
def test_interrupted_import_leaves_nothing(fault_server: FaultServer, qcow2: tuple[Path, str], tmp_path: Path,
                                           sig: int, code: int) -> None:
    import subprocess
    import sys
    import time

    fault_server.faults.stall_after = 2 * MiB
    fault_server.faults.stall_seconds = 5
    folder = pvc_dir(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "diskport", "import", "-q", fault_server.url("disk.qcow2"),
                             str(folder / "disk.img")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not fault_server.injected["stall"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fault_server.injected["stall"], "the import never reached the stall"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert os.listdir(folder) == []


def test_proxy_from_environment(proxy_server: object, nginx: NginxServer, qcow2: tuple[Path, str],
                                tmp_path: Path) -> None:
    from tests.support.servers import ProxyServer

    assert isinstance(proxy_server, ProxyServer)
    _, expected = qcow2
    dest = pvc_dir(tmp_path) / "disk.img"
    env = {**os.environ, "HTTP_PROXY": proxy_server.proxy_url, "http_proxy": proxy_server.proxy_url,
           "NO_PROXY": "", "no_proxy": ""}
    proc = run_cli("import", "-q", nginx.url("disk.qcow2"), dest, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(dest) == expected
    through = [r for r in proxy_server.requests if "disk.qcow2" in r.path]
    assert through and len(through) == len(nginx.access_entries()), "every request goes through the proxy"


def test_spurious_416_is_retried_and_a_persistent_one_fails_cleanly(fault_server: FaultServer,
                                                                      qcow2: tuple[Path, str],
                                                                      tmp_path: Path) -> None:
    _, expected = qcow2
    fault_server.faults.answer_416_times = 2
    dest = pvc_dir(tmp_path) / "disk.img"
    import_image(fault_server.url("disk.qcow2"), dest, http=FAST)
    assert sha256_file(dest) == expected, "a 416 must never turn into an empty disk"
    fault_server.faults.answer_416_times = 1000
    again = pvc_dir(tmp_path) / "again.img"
    with pytest.raises(SourceError, match="416"):
        import_image(fault_server.url("disk.qcow2"), again, http=FAST)
    assert sorted(os.listdir(again.parent)) == ["disk.img"]


def test_empty_file_imports_as_empty_disk(nginx: NginxServer, tmp_path: Path) -> None:
    nginx.put("empty.img", b"")
    dest = pvc_dir(tmp_path) / "disk.img"
    result = import_image(nginx.url("empty.img"), dest, http=FAST)
    assert dest.stat().st_size == 0 and result.virtual_size == 0


def test_small_answers_are_read_bounded(nginx: NginxServer) -> None:
    """An error text is read no further than its limit, however long the body the server sends."""
    nginx.put("endless", bytes(16 * MiB))
    with httpx.Client() as client:
        response = client.send(client.build_request("GET", nginx.url("endless")), stream=True)
        body, more = read_bounded(response, 64 * 1024)
        assert (len(body), more) == (64 * 1024, True)
        assert response.is_closed
        whole = client.get(nginx.url("endless"))
        assert read_bounded(whole, 100) == (bytes(100), True)
        assert read_bounded(whole, 32 * MiB) == (bytes(16 * MiB), False)


# ---------------------------------------------------------------------------------------------------------
# Issue 10, transfer items 1, 2, 4 and 5 against the live fault server (item 3, https redirecting to http on
# the same host and port, needs one port that speaks both: it is tested over MockTransport in
# tests/sources/test_http_unit.py)
# ---------------------------------------------------------------------------------------------------------

def test_a_206_of_a_changed_file_is_refused_and_the_destination_untouched(fault_server: FaultServer,
                                                                           serve_dir: Path,
                                                                           tmp_path: Path) -> None:
    """A server that ignores If-Range answers the later ranges 206 from the new file, with its new ETag: the
    import fails in one line, and the disk already at DEST (replaced with --force) stays as it was."""
    make_image(serve_dir, "raw", 12 * MiB, name="disk.raw")
    fault_server.faults.ignore_if_range = True
    fault_server.faults.change_after_requests = 2
    dest = pvc_dir(tmp_path) / "disk.img"
    dest.write_bytes(b"the old disk")
    proc = run_cli("import", "-q", "--force", fault_server.url("disk.raw"), dest)
    assert proc.returncode == 1, proc.stderr
    assert "the file changed on the server while it was being read (its ETag went from" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert fault_server.injected["change"] == 1
    assert dest.read_bytes() == b"the old disk"
    assert os.listdir(dest.parent) == ["disk.img"]


def test_a_drop_every_700_kib_still_completes(fault_server: FaultServer, qcow2: tuple[Path, str],
                                               tmp_path: Path) -> None:
    """Every body breaks after 700 KiB; each resume moves on, so the breaks in a row never pass retries=4."""
    _, expected = qcow2
    fault_server.faults.drop_after = 700 * 1024
    fault_server.faults.drop_times = 1000
    dest = pvc_dir(tmp_path) / "disk.img"
    import_image(fault_server.url("disk.qcow2"), dest, http=FAST)
    assert sha256_file(dest) == expected
    assert fault_server.injected["drop"] > FAST.retry.attempts + 1  # one 8 MiB range alone breaks 11 times


def _start_stalled_import(fault_server: FaultServer, dest: Path) -> subprocess.Popen[str]:
    fault_server.faults.stall_after = 2 * MiB
    fault_server.faults.stall_seconds = 30
    proc = subprocess.Popen([sys.executable, "-m", "diskport", "import", "-q", fault_server.url("disk.qcow2"),
                             str(dest)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    def stalled() -> bool:
        return fault_server.injected["stall"] >= fault_server.faults.stall_times and \
            any(n.startswith(f".{dest.name}.") for n in _parts(dest.parent))

    while not stalled() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stalled(), "the import never reached the stall"
    return proc


def _parts(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".diskport-part"))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_a_stall_ends_the_import_within_seconds(fault_server: FaultServer,
                                                                qcow2: tuple[Path, str], tmp_path: Path,
                                                                sig: int, code: int) -> None:
    """The server sends nothing for 30 s; SIGTERM (a pod being stopped, 30 s of grace) or Ctrl-C must end the
    import long before that, with the part file removed. (5 s is a bound, not a benchmark.)"""
    folder = pvc_dir(tmp_path)
    proc = _start_stalled_import(fault_server, folder / "disk.img")
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=25)
    finally:
        proc.kill()
    took = time.monotonic() - sent
    assert proc.returncode == code, err
    assert took < 5.0, f"exited {took:.1f} s after the signal"
    assert os.listdir(folder) == []


def test_the_next_run_removes_what_a_killed_run_left(fault_server: FaultServer, qcow2: tuple[Path, str],
                                                      tmp_path: Path) -> None:
    """SIGKILL runs no cleanup: the part file stays. The next run for the same DEST removes it (its process is
    gone) but never the part file of a job still running, nor files it did not make."""
    _, expected = qcow2
    folder = pvc_dir(tmp_path)
    dest = folder / "disk.img"
    killed = _start_stalled_import(fault_server, dest)
    left = _parts(folder)
    killed.kill()
    killed.communicate(timeout=10)
    assert _parts(folder) == left and len(left) == 1, "SIGKILL leaves the part file"
    other = folder / "other.img"
    fault_server.faults.stall_times = 2  # the first stall is used up: one more for the live job
    live = _start_stalled_import(fault_server, other)
    try:
        foreign = [".disk.img.1.abcdefgh.diskport-part",       # pid 1 is alive: not ours to judge
                   ".disk.img.notours.diskport-part",          # not diskport's name
                   "disk.img.99999999.abcdefgh.diskport-part"]  # not hidden: not diskport's name
        for name in foreign:
            (folder / name).write_bytes(b"keep")
        (folder / ".disk.img.0.x.diskport-part").symlink_to(folder / "nowhere")
        import_image(fault_server.url("disk.qcow2"), dest, http=FAST)
        assert sha256_file(dest) == expected
        names = set(os.listdir(folder))
        assert left[0] not in names, "the killed run's part file is gone"
        assert set(foreign) <= names and ".disk.img.0.x.diskport-part" in names
        assert len([n for n in _parts(folder) if n.startswith(".other.img.")]) == 1, "the live job's part stays"
    finally:
        live.kill()
        live.communicate(timeout=10)


@pytest.mark.parametrize("direct", [True, False])
def test_the_bulk_comes_over_a_few_kept_connections_with_the_user_headers(nginx: NginxServer,
                                                                         qcow2: tuple[Path, str], tmp_path: Path,
                                                                         direct: bool) -> None:
    """Ranged bodies come over http.client (``direct``) or httpx; the server sees the same: the user's headers,
    If-Range on every range after the first, and connections kept (here a range of 1 MiB at a time on 2 streams)."""
    _, expected = qcow2
    dest = pvc_dir(tmp_path) / "disk.img"
    options = HttpOptions(headers={"Authorization": "Bearer s3cret"}, streams=2, chunk=MiB, direct=direct)
    import_image(nginx.url("disk.qcow2"), dest, http=options)
    assert sha256_file(dest) == expected
    entries = nginx.access_entries()
    assert len(entries) >= 8, entries
    assert all(e["authorization"] == "Bearer s3cret" and e["user_agent"].startswith("diskport/") for e in entries)
    assert all(e["if_range"] for e in entries[1:]), entries
    assert len({e["connection"] for e in entries}) <= 4, entries


def _read_all(source: HttpSource) -> bytes:
    out = bytearray(source.size)
    view, done = memoryview(out), 0
    while done < len(out):
        n = source.readinto(done, view[done: done + 3 * MiB])
        assert n, f"nothing at {done}"
        done += n
    return bytes(out)


def test_a_redirect_after_the_first_answer_goes_back_to_httpx(fault_server: FaultServer, serve_dir: Path) -> None:
    """The direct path is for the URL that answered itself: a redirect later is followed by httpx (with its rules
    for credentials), and the direct path is not tried again for that transfer."""
    data = os.urandom(10 * MiB + 17)
    (serve_dir / "blob.bin").write_bytes(data)
    source = HttpSource(fault_server.url("blob.bin"), HttpOptions(**{**vars(FAST), "streams": 2, "chunk": MiB}))
    try:
        fault_server.faults.redirect_hops = 1
        assert _read_all(source) == data
    finally:
        source.close()
    followed = [r for r in fault_server.requests if r.path.startswith("/_r/")]
    assert len(followed) >= 10
    # a direct attempt from each of the 2 streams at most (both may be on their way), then httpx only
    assert len(followed) + 1 <= fault_server.injected["redirect"] <= len(followed) + 2


def test_a_passing_error_on_the_direct_path_is_retried_through_httpx(fault_server: FaultServer,
                                                                     serve_dir: Path) -> None:
    data = os.urandom(6 * MiB + 5)
    (serve_dir / "blob.bin").write_bytes(data)
    source = HttpSource(fault_server.url("blob.bin"), HttpOptions(**{**vars(FAST), "streams": 2, "chunk": MiB}))
    try:
        fault_server.faults.status_sequence = [503, 503]
        fault_server.faults.retry_after = 0
        assert _read_all(source) == data
    finally:
        source.close()
    assert fault_server.injected["status"] == 2
