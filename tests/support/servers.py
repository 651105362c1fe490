"""Real HTTP(S) servers on loopback for the ``diskport import`` tests, as pytest fixtures.

Each server serves one folder (the ``serve_dir`` fixture, a fresh folder per test) on ``127.0.0.1`` and a free
port, and yields an object with ``.url(name)``, ``.root`` and ``.put(name, data) -> url``. What each one models:

* ``nginx``: Debian's nginx, the typical real file server: byte ranges (206, 416, multipart), strong ETag,
  Last-Modified, ``If-Range``, ``sendfile on``, ``gzip off``. Run as a non-daemon child from a generated
  config in a private prefix; ``.access_log()`` / ``.access_entries()`` read its JSON access log (method, uri,
  status, bytes sent, Range, If-Range, Authorization, connection id) so tests can count requests.
* ``plain_http``: Python's ``http.server`` (``SimpleHTTPRequestHandler``): a server WITHOUT range support, it
  always answers 200 with the whole file and a Content-Length. Requests are recorded in ``.requests``.
* ``tls_server``: nginx over TLS with a certificate from a session test CA (``tls_pki``, made with the openssl
  CLI): ``.url(name)`` verifies against ``.ca_bundle``; ``.untrusted_url(name)`` is the same folder behind a
  self-signed certificate (fails even with the CA bundle); ``.wrong_name_url(name)`` behind a CA-signed
  certificate for another host name (fails hostname verification). Without the CA bundle every one fails.
* ``fault_server``: our own ranged HTTP/1.1 server (ranges, If-Range per RFC 9110, ETag, Last-Modified, 416)
  whose misbehaviour is programmed per test through ``.faults`` (a :class:`Faults`): dropped connections,
  stalls, injected statuses with Retry-After, spurious 416s, a file that changes between requests, a lying
  Content-Length, no validators, redirect chains across host names, ranges off. Every request is recorded in
  ``.requests`` (:class:`RequestRecord`) and ``.injected`` counts the faults that actually happened.
* ``proxy_server``: a minimal forward proxy (absolute-form GET/HEAD and CONNECT tunnels, loopback targets only)
  recording what it relays, to prove ``HTTP_PROXY`` / ``HTTPS_PROXY`` from the environment are honoured.

Nothing here waits more than a few seconds for anything; every process and thread is stopped and reaped at
teardown, also when the test failed. A missing ``nginx`` or ``openssl`` is a test failure (``require_tool``).
The servers are also context managers (``with FaultServer(root) as srv:``) for tests that need two of them.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import BaseRequestHandler
from typing import IO, Any, Self, cast
from urllib.parse import quote, unquote, urlsplit

import pytest

from tests.support.clients import require_tool, run

LOOPBACK = "127.0.0.1"
OTHER_NAME = "localhost"    # the same loopback address under another host name (a different origin)
MAX_WAIT = 5.0              # the longest any helper waits for a server to start, stop or settle
MAX_STALL = 30.0            # a stall never lasts longer than this (it ends at once when the client goes away)
SETTLE = 2.0                # how long ``.requests`` waits for in-flight requests to finish
IDLE_TIMEOUT = 10.0         # an idle keep-alive connection is closed by the Python servers after this
CHUNK = 64 * 1024
_HOP = re.compile(r"/_r/(\d+)/(.*)")
_INVERT = bytes(255 - i for i in range(256))
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
               "te", "trailer", "transfer-encoding", "upgrade"}
_LOOPBACK_NAMES = {LOOPBACK, OTHER_NAME, "::1"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for nginx, which needs the number in its config)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _url(scheme: str, host: str, port: int, name: str) -> str:
    return f"{scheme}://{host}:{port}/{quote(name.lstrip('/'))}"


class _ServesFiles:
    """``url(name)`` and ``put(name, data)`` for a server of ``root`` (the three file servers share them)."""

    root: Path
    scheme: str
    port: int

    def url(self, name: str, host: str = LOOPBACK) -> str:
        return _url(self.scheme, host, self.port, name)

    def put(self, name: str, data: bytes) -> str:
        _put(self.root, name, data)
        return self.url(name)


def _put(root: Path, name: str, data: bytes) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ---------------------------------------------------------------------------------------------------------
# Request records, shared by the Python servers
# ---------------------------------------------------------------------------------------------------------

@dataclass
class RequestRecord:
    """One request as a Python server received and answered it.

    ``host`` is the Host header as sent (``127.0.0.1:PORT`` or ``localhost:PORT``); ``headers`` keeps every
    request header in order; ``status`` is the status answered (None if none was); ``bytes_sent`` counts body
    bytes written (not headers); ``done`` is set when the server finished with the request.
    """

    method: str
    path: str
    host: str
    headers: list[tuple[str, str]]
    status: int | None = None
    bytes_sent: int = 0
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def header(self, name: str) -> str | None:
        """The request header ``name`` (case-insensitive), None when absent."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def response_header(self, name: str) -> str | None:
        return next((v for k, v in self.response_headers if k.lower() == name.lower()), None)

    @property
    def host_name(self) -> str:
        """The host name of the Host header, without the port."""
        return self.host.rsplit(":", 1)[0] if self.host.count(":") == 1 else self.host


class _Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[RequestRecord] = []

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._items.append(record)

    def snapshot(self, settle: float = SETTLE) -> list[RequestRecord]:
        """The requests so far, after waiting (at most ``settle`` s in all) for in-flight ones to finish."""
        deadline = time.monotonic() + settle
        with self._lock:
            items = list(self._items)
        for record in items:
            record.done.wait(max(0.0, deadline - time.monotonic()))
        return items


# ---------------------------------------------------------------------------------------------------------
# The threaded Python servers: a common base that stops every handler thread at teardown
# ---------------------------------------------------------------------------------------------------------

class _LoopbackHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on 127.0.0.1 that knows its open connections, so teardown can end them all."""

    daemon_threads = True

    def __init__(self, handler: Callable[..., BaseRequestHandler], owner: _ThreadedServer) -> None:
        self.owner = owner
        self._conn_lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        super().__init__((LOOPBACK, 0), handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._conns[request] = threading.current_thread()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._conns.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # a client that went away: expected in these tests
        super().handle_error(request, client_address)

    def end_connections(self, timeout: float) -> list[threading.Thread]:
        """Shut every open connection down and join its thread; the threads still alive after ``timeout``."""
        with self._conn_lock:
            items = list(self._conns.items())
        for sock, _ in items:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for _, thread in items:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t for _, t in items if t.is_alive()]


class StartStop:
    """A server with ``start()`` and ``stop()``, used as a context manager: stopped on every way out."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ThreadedServer(StartStop):
    """A Python HTTP server on 127.0.0.1:<free port>, served from a thread; a context manager."""

    scheme = "http"

    def __init__(self, handler: Callable[..., BaseRequestHandler]) -> None:
        self.stopping = threading.Event()
        self.recorder = _Recorder()
        self.httpd = _LoopbackHTTPServer(handler, owner=self)
        self.port: int = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{type(self).__name__}:{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, end every connection (stalls included) and join every thread, within seconds."""
        self.stopping.set()
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(MAX_WAIT)
            self._thread = None
        self.httpd.server_close()
        alive = self.httpd.end_connections(MAX_WAIT)
        if alive:
            raise RuntimeError(f"{type(self).__name__}: handler threads did not end: {alive}")

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received so far, in arrival order (waits up to 2 s for in-flight ones to finish)."""
        return self.recorder.snapshot()


class _RecordingHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler that records each request into its server's recorder, quietly."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    record: RequestRecord | None = None

    @property
    def owner(self) -> _ThreadedServer:
        return cast(_LoopbackHTTPServer, self.server).owner

    def handle_one_request(self) -> None:
        self.record = None
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        finally:
            if self.record is not None:
                self.record.done.set()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.record = RequestRecord(method=self.command, path=self.path, host=self.headers.get("Host", ""),
                                        headers=list(self.headers.items()))
            self.owner.recorder.add(self.record)
        return ok

    def send_response(self, code: int, message: str | None = None) -> None:
        if self.record is not None:
            self.record.status = code
        super().send_response(code, message)

    def send_header(self, keyword: str, value: str) -> None:
        if self.record is not None:
            self.record.response_headers.append((keyword, value))
        super().send_header(keyword, value)

    def write_body(self, data: bytes) -> None:
        self.wfile.write(data)
        if self.record is not None:
            self.record.bytes_sent += len(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def close_abruptly(self) -> None:
        """Close the connection now, whatever was announced: the client sees a truncated message."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------------------------------------
# plain_http: http.server, no ranges
# ---------------------------------------------------------------------------------------------------------

class _PlainHandler(_RecordingHandler, SimpleHTTPRequestHandler):
    def copyfile(self, source: Any, outputfile: Any) -> None:
        while chunk := source.read(CHUNK):
            self.write_body(chunk)


class PlainHTTPServer(_ServesFiles, _ThreadedServer):
    """``http.server`` serving ``root``: it ignores Range (always 200 + Content-Length, Last-Modified, no ETag).

    It models the many servers and proxies that do not do ranges, for which an import must read the body as a
    stream. ``.requests`` records what it received.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

        def handler(*args: Any) -> BaseRequestHandler:
            return _PlainHandler(*args, directory=str(root))

        super().__init__(handler)



# ---------------------------------------------------------------------------------------------------------
# fault_server: ranges done by hand, with programmable faults
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Faults:
    """What :class:`FaultServer` does wrong, set by a test (before or between requests).

    Counts (``*_times``, ``status_sequence``, ``answer_416_times``, ``change_after_requests``) run over the
    whole server from its start, across files. ``FaultServer.injected[kind]`` counts what actually happened,
    with kinds ``status``, ``redirect``, ``416``, ``drop``, ``stall``, ``lie``, ``change``.
    """

    ranges: bool = True
    """False: Range and If-Range are ignored (always 200) and no Accept-Ranges is sent."""
    no_validators: bool = False
    """True: neither ETag nor Last-Modified is sent, and no If-Range can match."""
    ignore_if_range: bool = False
    """True: If-Range is ignored and a Range always answered 206 from the file as it is now (with its current
    validators), as some servers and caches do."""
    status_sequence: list[int] = field(default_factory=list)
    """Statuses answered, in order, to the first requests (any path, before redirects); then normal service."""
    retry_after: int | str | None = None
    """Sent as Retry-After with the 429 and 503 answers of ``status_sequence``."""
    answer_416_times: int = 0
    """The first N GETs with a Range are answered 416 (with ``Content-Range: bytes */size``)."""
    drop_after: int | None = None
    """Close the connection after this many body bytes of a GET (only when the body is longer) ..."""
    drop_times: int = 1
    """... for the first ``drop_times`` such GETs."""
    stall_after: int | None = None
    """Stop sending after this many body bytes of a GET (only when the body is longer) ..."""
    stall_seconds: float = 2.0
    """... for this long (capped at 30 s; the handler ends at once if the client goes away), then go on ..."""
    stall_times: int = 1
    """... for the first ``stall_times`` such GETs."""
    change_after_requests: int | None = None
    """After N requests that reached a file, the next one first replaces that file (once): new bytes (each
    byte inverted, or ``new_content``), Last-Modified at least 1 s later, hence a new ETag."""
    new_content: bytes | None = None
    lie_content_length: int | None = None
    """Announce this Content-Length (when larger than the true one), send the true body, then close ..."""
    lie_times: int | None = None
    """... for the first N GETs (None: every GET)."""
    redirect_hops: int = 0
    """Answer a request for /name by ``redirect_status`` through this many hops (``/_r/<k>/name``) ..."""
    redirect_cross_host: bool = False
    """... the first hop switching host name, 127.0.0.1 <-> localhost (same port: another origin); at least
    one hop when set ..."""
    redirect_to: str | None = None
    """... and end the chain with a redirect to this URL instead of serving the file (with no hops: one
    redirect straight there)."""
    redirect_status: int = 302


def _if_range_matches(value: str, validators: dict[str, str]) -> bool:
    """RFC 9110 13.1.5: an entity-tag matches by strong comparison (a weak one never does), a date only when
    it is exactly the Last-Modified."""
    value = value.strip()
    if value.startswith("W/"):
        return False
    if value.startswith('"'):
        return value == validators.get("ETag")
    last_modified = validators.get("Last-Modified")
    if last_modified is None:
        return False
    try:
        return email.utils.parsedate_to_datetime(value) == email.utils.parsedate_to_datetime(last_modified)
    except (TypeError, ValueError):
        return False


_UNSATISFIABLE = (-1, -1)


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """The (first, last) byte of a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range over ``size`` bytes.

    None when the header is to be ignored (not bytes, several ranges, invalid): the answer is then a 200.
    ``_UNSATISFIABLE`` when no byte of it exists: a 416.
    """
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    m = re.fullmatch(r"\s*(\d*)\s*-\s*(\d*)\s*", spec)
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # suffix: the last n bytes
        n = int(m.group(2))
        return _UNSATISFIABLE if n == 0 or size == 0 else (max(0, size - n), size - 1)
    first = int(m.group(1))
    if m.group(2) and int(m.group(2)) < first:
        return None
    if first >= size:
        return _UNSATISFIABLE
    return first, min(int(m.group(2)), size - 1) if m.group(2) else size - 1


def _validators(st: os.stat_result) -> dict[str, str]:
    return {"ETag": f'"{st.st_size:x}-{st.st_mtime_ns:x}"',
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True)}


class _FaultHandler(_RecordingHandler):
    @property
    def fault_server(self) -> FaultServer:
        return cast(FaultServer, self.owner)

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if body:
            self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.write_body(body)

    def _serve(self) -> None:
        srv = self.fault_server
        faults = srv.faults
        status = srv.next_injected_status()
        if status is not None:
            headers = []
            if status in (429, 503) and faults.retry_after is not None:
                headers.append(("Retry-After", str(faults.retry_after)))
            self._reply(status, headers, b"injected %d\n" % status)
            return
        location = srv.redirect_location(self.path, self.headers.get("Host", ""))
        if location is not None:
            srv.count("redirect")
            self._reply(faults.redirect_status, [("Location", location)])
            return
        path = srv.resolve(self.path)
        if path is None:
            self._reply(404, [], b"not found\n")
            return
        srv.count_served(path)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below; a replaced file keeps its old bytes here
        except OSError:
            self._reply(404, [], b"not found\n")
            return
        with fh:
            self._serve_file(fh, os.fstat(fh.fileno()))

    def _serve_file(self, fh: IO[bytes], st: os.stat_result) -> None:
        srv = self.fault_server
        faults = srv.faults
        size = st.st_size
        validators = {} if faults.no_validators else _validators(st)
        status, start, length = 200, 0, size
        extra: list[tuple[str, str]] = []
        range_header = self.headers.get("Range")
        if faults.ranges and range_header is not None and self.command == "GET":
            if srv.take("416", faults.answer_416_times):
                self._reply(416, [("Content-Range", f"bytes */{size}"), *validators.items()])
                return
            if_range = self.headers.get("If-Range")
            if if_range is None or faults.ignore_if_range or _if_range_matches(if_range, validators):
                spec = parse_range(range_header, size)
                if spec == _UNSATISFIABLE:
                    self._reply(416, [("Content-Range", f"bytes */{size}"), *validators.items()])
                    return
                if spec is not None:
                    first, last = spec
                    status, start, length = 206, first, last - first + 1
                    extra.append(("Content-Range", f"bytes {first}-{last}/{size}"))
        lie = (self.command == "GET" and faults.lie_content_length is not None
               and faults.lie_content_length > length and srv.take("lie", faults.lie_times))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(faults.lie_content_length if lie else length))
        if faults.ranges:
            self.send_header("Accept-Ranges", "bytes")
        for k, v in [*validators.items(), *extra]:
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        if self._send_body(fh, start, length) and lie:
            self.close_abruptly()

    def _send_body(self, fh: IO[bytes], start: int, length: int) -> bool:
        """Send ``length`` bytes from ``start``, with the programmed drop and stall; False if cut short."""
        srv = self.fault_server
        f = srv.faults
        drop_at = f.drop_after if (f.drop_after is not None and f.drop_after < length
                                   and srv.take("drop", f.drop_times)) else None
        stall_at = f.stall_after if (f.stall_after is not None and f.stall_after < length
                                     and srv.take("stall", f.stall_times)) else None
        fh.seek(start)
        sent = 0
        while True:
            if stall_at is not None and sent == stall_at:
                stall_at = None
                if not self._stall(f.stall_seconds):
                    return False
            if drop_at is not None and sent == drop_at:
                self.close_abruptly()
                return False
            if sent >= length:
                return True
            limit = length - sent
            for mark in (stall_at, drop_at):
                if mark is not None:
                    limit = min(limit, mark - sent)
            chunk = fh.read(min(CHUNK, limit))
            if not chunk:  # the file shrank under us
                self.close_abruptly()
                return False
            self.write_body(chunk)
            sent += len(chunk)

    def _stall(self, seconds: float) -> bool:
        """Send nothing for ``seconds`` (at most MAX_STALL); False (connection closed) if the client went away
        or the server is stopping."""
        deadline = time.monotonic() + min(seconds, MAX_STALL)
        while (left := deadline - time.monotonic()) > 0:
            if self.fault_server.stopping.is_set() or self._client_gone(min(left, 0.05)):
                self.close_abruptly()
                return False
        return True

    def _client_gone(self, timeout: float) -> bool:
        readable, _, _ = select.select([self.connection], [], [], timeout)
        if not readable:
            return False
        try:
            gone: bool = self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True
        if not gone:
            time.sleep(timeout)  # a pipelined request is waiting: not gone, and do not spin
        return gone


class FaultServer(_ServesFiles, _ThreadedServer):
    """Our own ranged HTTP/1.1 file server over ``root``, misbehaving as ``.faults`` says.

    Without faults it is a correct ranged server: ``Range: bytes=a-b | a- | -n`` gives 206 with Content-Range,
    an unsatisfiable range 416 (``Content-Range: bytes */size``), several ranges or an invalid one a 200;
    strong ETag (size and mtime) and Last-Modified; ``If-Range`` per RFC 9110 (a mismatch, a weak tag or no
    validators means the full 200); keep-alive. It exists because no real server can be told to fail on cue.
    ``.requests`` is every request received (:class:`RequestRecord`), ``.injected`` what faults happened.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults = Faults()
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._served = 0
        self._changed = False
        super().__init__(_FaultHandler)


    # -- fault bookkeeping, called from handler threads ------------------------------------------------------
    def take(self, kind: str, limit: int | None) -> bool:
        """Use one of the ``limit`` allowed ``kind`` faults (None: unlimited); False when none is left."""
        with self._lock:
            if limit is not None and self.injected[kind] >= limit:
                return False
            self.injected[kind] += 1
            return True

    def count(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1

    def next_injected_status(self) -> int | None:
        with self._lock:
            i = self.injected["status"]
            if i >= len(self.faults.status_sequence):
                return None
            self.injected["status"] += 1
            return self.faults.status_sequence[i]

    def redirect_location(self, raw_path: str, host_header: str) -> str | None:
        f = self.faults
        path = urlsplit(raw_path).path
        host = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else LOOPBACK
        m = _HOP.fullmatch(path)
        if m is not None:
            remaining, rest = int(m.group(1)), m.group(2)
            if remaining > 0:
                return f"http://{host}:{self.port}/_r/{remaining - 1}/{rest}"
            return f.redirect_to
        hops = max(f.redirect_hops, 1 if f.redirect_cross_host else 0)
        if hops > 0:
            if f.redirect_cross_host:
                host = OTHER_NAME if host == LOOPBACK else LOOPBACK
            return f"http://{host}:{self.port}/_r/{hops - 1}/{path.lstrip('/')}"
        return f.redirect_to

    def resolve(self, raw_path: str) -> Path | None:
        path = urlsplit(raw_path).path
        m = _HOP.fullmatch(path)
        if m is not None:
            path = m.group(2)
        root = self.root.resolve()
        candidate = (root / unquote(path).lstrip("/")).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            return None
        return candidate

    def count_served(self, path: Path) -> None:
        with self._lock:
            self._served += 1
            n = self.faults.change_after_requests
            if n is None or self._changed or self._served <= n:
                return
            self._changed = True
            self.injected["change"] += 1
        self.replace_content(path)

    def replace_content(self, path: Path, data: bytes | None = None) -> None:
        """Give ``path`` new bytes (``data``, else ``faults.new_content``, else every byte inverted) and an
        mtime at least one second later, hence a new ETag and Last-Modified. Atomic: readers keep the old."""
        old = path.stat()
        if data is None:
            data = self.faults.new_content if self.faults.new_content is not None else \
                path.read_bytes().translate(_INVERT)
        tmp = path.with_name(path.name + ".changing")
        tmp.write_bytes(data)
        mtime = max(time.time(), old.st_mtime + 1.0)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# proxy_server: a forward proxy for loopback targets
# ---------------------------------------------------------------------------------------------------------

class _ProxyHandler(_RecordingHandler):
    def _target_allowed(self, host: str | None) -> bool:
        return host is not None and host.strip("[]") in _LOOPBACK_NAMES

    def do_CONNECT(self) -> None:
        host, _, port = self.path.rpartition(":")
        if not self._target_allowed(host) or not port.isdigit():
            self._refuse(403)
            return
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=MAX_WAIT)
        except OSError:
            self._refuse(502)
            return
        with upstream:
            self.send_response(200, "Connection established")
            self.end_headers()
            self.close_connection = True
            self._relay(self.connection, upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        idle_until = time.monotonic() + IDLE_TIMEOUT
        while time.monotonic() < idle_until and not self.owner.stopping.is_set():
            readable, _, _ = select.select(list(peers), [], [], 0.05)
            for sock in readable:
                try:
                    data = sock.recv(CHUNK)
                    if not data:
                        return
                    peers[sock].sendall(data)
                except OSError:
                    return
                if sock is upstream and self.record is not None:
                    self.record.bytes_sent += len(data)
                idle_until = time.monotonic() + IDLE_TIMEOUT

    def _refuse(self, status: int) -> None:
        body = b"proxy refused\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.write_body(body)

    def do_GET(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def _forward(self) -> None:
        url = urlsplit(self.path)
        if url.scheme != "http" or not self._target_allowed(url.hostname):
            self._refuse(403)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        conn = http.client.HTTPConnection(url.hostname or LOOPBACK, url.port or 80, timeout=MAX_WAIT)
        try:
            conn.request(self.command, url.path + (f"?{url.query}" if url.query else "") or "/", headers=headers)
            response = conn.getresponse()
        except OSError:
            conn.close()
            self._refuse(502)
            return
        try:
            self.send_response(response.status, response.reason)
            for k, v in response.getheaders():
                if k.lower() not in _HOP_BY_HOP:
                    self.send_header(k, v)
            if response.getheader("Content-Length") is None and self.command != "HEAD":
                self.send_header("Connection", "close")  # the body ends with the connection
            self.end_headers()
            if self.command == "HEAD":
                return
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException):
                    self.close_abruptly()  # upstream broke off: so does the relayed message
                    return
                if not chunk:
                    break
                self.write_body(chunk)
            if response.length:  # fewer bytes than announced
                self.close_abruptly()
        finally:
            conn.close()


class ProxyServer(_ThreadedServer):
    """A forward HTTP proxy on loopback (``.proxy_url``), for ``HTTP_PROXY`` / ``HTTPS_PROXY``.

    Absolute-form ``GET``/``HEAD http://127.0.0.1:P/...`` are forwarded (hop-by-hop headers and
    Proxy-Authorization dropped); ``CONNECT host:port`` opens a tunnel (how HTTPS goes through a proxy).
    Only loopback targets are allowed (others get 403), so nothing leaves the machine. ``.requests`` records
    each request as the proxy saw it (``path`` is the absolute URL, or ``host:port`` for CONNECT).
    """

    def __init__(self) -> None:
        super().__init__(_ProxyHandler)

    @property
    def proxy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


# ---------------------------------------------------------------------------------------------------------
# The test PKI (openssl CLI)
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TestPki:
    """A test CA and three server certificates (all EC P-256 keys, valid from now for 7 days).

    ``server``: signed by the CA, SAN ``IP:127.0.0.1, DNS:localhost``. ``self_signed``: same SAN, not from
    the CA. ``wrong_name``: signed by the CA for ``DNS:wrong-name.invalid`` only.
    """

    __test__ = False  # not a test class, whatever its name

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    self_signed_cert: Path
    self_signed_key: Path
    wrong_name_cert: Path
    wrong_name_key: Path


def make_test_pki(folder: Path) -> TestPki:
    openssl = require_tool("openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def key(name: str) -> Path:
        path = folder / f"{name}.key"
        run(openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
        return path

    leaf_ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
                "extendedKeyUsage=serverAuth", "subjectKeyIdentifier=hash"]

    def signed(name: str, san: str, ca_cert: Path, ca_key: Path) -> tuple[Path, Path]:
        k = key(name)
        csr, cert, ext = folder / f"{name}.csr", folder / f"{name}.pem", folder / f"{name}.ext"
        ext.write_text("\n".join([*leaf_ext, "authorityKeyIdentifier=keyid,issuer", f"subjectAltName={san}"]) + "\n")
        run(openssl, "req", "-new", "-key", k, "-subj", f"/CN={name}", "-out", csr)
        run(openssl, "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-days", "7", "-sha256",
            "-set_serial", f"0x{secrets.token_hex(8)}", "-extfile", ext, "-out", cert)
        return cert, k

    ca_key = key("ca")
    ca_cert = folder / "ca.pem"
    run(openssl, "req", "-x509", "-new", "-key", ca_key, "-sha256", "-days", "7", "-subj", "/CN=diskport test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash", "-out", ca_cert)
    server_cert, server_key = signed("server", "IP:127.0.0.1,DNS:localhost", ca_cert, ca_key)
    wrong_cert, wrong_key = signed("wrong-name", "DNS:wrong-name.invalid", ca_cert, ca_key)
    ss_key = key("self-signed")
    ss_cert = folder / "self-signed.pem"
    run(openssl, "req", "-x509", "-new", "-key", ss_key, "-sha256", "-days", "7", "-subj", "/CN=127.0.0.1",
        *[a for e in leaf_ext for a in ("-addext", e)], "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-out", ss_cert)
    return TestPki(ca_cert, ca_key, server_cert, server_key, ss_cert, ss_key, wrong_cert, wrong_key)


# ---------------------------------------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------------------------------------

_LOG_FORMAT = (
    '{"msec":"$msec","request_time":"$request_time","host":"$http_host","server_port":"$server_port","method":"$request_method",'
    '"uri":"$request_uri","status":$status,"bytes_sent":$bytes_sent,"body_bytes_sent":$body_bytes_sent,'
    '"range":"$http_range","if_range":"$http_if_range","authorization":"$http_authorization",'
    '"user_agent":"$http_user_agent","connection":$connection,"connection_requests":$connection_requests,'
    '"request_completion":"$request_completion"}'
)


def _nginx_binary() -> str:
    """nginx lives in /usr/sbin, which a non-root PATH often lacks; a missing nginx fails the test."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/local/sbin:/usr/sbin:/sbin") \
        or require_tool("nginx")


def _q(value: object) -> str:
    """A double-quoted nginx config string."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class NginxServer(_ServesFiles, StartStop):
    """Debian's nginx serving ``root`` on 127.0.0.1:<free port>, a non-daemon child run from ``prefix``.

    Defaults left on: byte ranges, ETag, Last-Modified, If-Range; ``sendfile on``, ``gzip off``. The config,
    pid file, error log, access log and temp paths all live in ``prefix``. ``/__ready`` (not logged) is the
    readiness probe. ``stop()`` ends it (SIGTERM, then SIGKILL of its process group) and reaps it.
    """

    scheme = "http"

    def __init__(self, root: Path, prefix: Path, *, rate_per_connection: str | None = None,
                 ranges: bool = True) -> None:
        self.root = root
        self.prefix = prefix
        self.rate = rate_per_connection  # nginx limit_rate ("100m"): a CDN or object store's cap per connection
        self.ranges = ranges  # False: max_ranges 0, every Range ignored (200 with the whole file)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None


    # -- logs --------------------------------------------------------------------------------------------------
    @property
    def access_log_path(self) -> Path:
        return self.prefix / "access.log"

    def access_log(self, expect: int | None = None, timeout: float = MAX_WAIT) -> list[str]:
        """The access log lines (one JSON object each), after waiting (bounded) for ``expect`` of them:
        nginx writes a line when it has finished a request, a moment after the client has the last byte."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                lines = self.access_log_path.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            if expect is None or len(lines) >= expect or time.monotonic() >= deadline:
                return lines
            time.sleep(0.02)

    def access_entries(self, expect: int | None = None, timeout: float = MAX_WAIT) -> list[dict[str, Any]]:
        """The access log parsed: dicts with method, uri, status, bytes_sent, body_bytes_sent, range, if_range,
        authorization, host, server_port, connection (id), connection_requests, request_completion ("OK")."""
        return [json.loads(line) for line in self.access_log(expect, timeout)]

    def error_log(self) -> str:
        texts = []
        for name in ("error.log", "stderr.log"):
            with contextlib.suppress(FileNotFoundError):
                texts.append((self.prefix / name).read_text(errors="replace"))
        return "\n".join(texts)

    # -- config and process ---------------------------------------------------------------------------------
    def _servers(self) -> list[str]:
        return [self._server_block(f"listen {LOOPBACK}:{self.port};")]

    def _server_block(self, listen: str) -> str:
        return f"""
    server {{
        {listen}
        server_name _;
        root {_q(self.root)};
        location = /__ready {{ access_log off; return 204; }}
        location / {{ }}
    }}"""

    def _pick_ports(self) -> None:
        self.port = free_port()

    def _config(self) -> str:
        p = self.prefix
        temp = "\n".join(f"    {kind}_temp_path {_q(p / 'temp' / kind)};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        user = "user root root;" if os.geteuid() == 0 else ""  # workers must read the 0700 pytest folders
        return f"""daemon off;
master_process on;
worker_processes 1;
{user}
pid {_q(p / 'nginx.pid')};
error_log {_q(p / 'error.log')} warn;
events {{ worker_connections 256; }}
http {{
    types {{ }}
    default_type application/octet-stream;
    log_format diskport escape=json '{_LOG_FORMAT}';
    access_log {_q(p / 'access.log')} diskport;
{temp}
    sendfile on;
    tcp_nopush on;
    gzip off;
    etag on;
    keepalive_timeout 10s;
    {f"limit_rate {self.rate};" if self.rate else ""}
    {"" if self.ranges else "max_ranges 0;"}
{"".join(self._servers())}
}}
"""

    def _probe(self) -> bool:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=1.0)
        try:
            conn.request("GET", "/__ready")
            return conn.getresponse().status == 204
        except OSError:
            return False
        finally:
            conn.close()

    def start(self) -> None:
        nginx = _nginx_binary()
        for _ in range(3):  # a free port can be taken between free_port() and nginx's bind: pick again
            self.prefix.mkdir(parents=True, exist_ok=True)
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (self.prefix / "temp" / kind).mkdir(parents=True, exist_ok=True)
            self._pick_ports()
            conf = self.prefix / "nginx.conf"
            conf.write_text(self._config())
            with open(self.prefix / "stderr.log", "wb") as stderr:
                self.proc = subprocess.Popen([nginx, "-p", str(self.prefix), "-c", str(conf),
                                              "-e", str(self.prefix / "error.log")],
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                             start_new_session=True)
            deadline = time.monotonic() + MAX_WAIT
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._probe():
                    return
                time.sleep(0.02)
            log = self.error_log()
            self.stop()
            if "Address already in use" not in log:
                pytest.fail(f"nginx did not start within {MAX_WAIT:.0f} s:\n{log}", pytrace=False)
        pytest.fail(f"nginx could not bind a free port:\n{self.error_log()}", pytrace=False)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # fast shutdown: the master ends its workers, then itself
            try:
                proc.wait(MAX_WAIT)
            except subprocess.TimeoutExpired:
                # The unreaped master keeps its process group id ours: kill the group (workers too), reap.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(MAX_WAIT)


class NginxTlsServer(NginxServer):
    """nginx over TLS, three listeners on the same folder: ``.url`` (CA-signed certificate for 127.0.0.1 and
    localhost: verifies with ``.ca_bundle``), ``.untrusted_url`` (self-signed: fails even with the bundle),
    ``.wrong_name_url`` (CA-signed for another name: fails hostname verification)."""

    scheme = "https"

    def __init__(self, root: Path, prefix: Path, pki: TestPki) -> None:
        super().__init__(root, prefix)
        self.pki = pki
        self.ca_bundle: Path = pki.ca_cert
        self.untrusted_port = 0
        self.wrong_name_port = 0

    def untrusted_url(self, name: str, host: str = LOOPBACK) -> str:
        return _url(self.scheme, host, self.untrusted_port, name)

    def wrong_name_url(self, name: str, host: str = LOOPBACK) -> str:
        return _url(self.scheme, host, self.wrong_name_port, name)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting the test CA only."""
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def _pick_ports(self) -> None:
        self.port, self.untrusted_port, self.wrong_name_port = free_port(), free_port(), free_port()

    def _servers(self) -> list[str]:
        blocks = []
        for port, cert, key in ((self.port, self.pki.server_cert, self.pki.server_key),
                                (self.untrusted_port, self.pki.self_signed_cert, self.pki.self_signed_key),
                                (self.wrong_name_port, self.pki.wrong_name_cert, self.pki.wrong_name_key)):
            blocks.append(self._server_block(f"listen {LOOPBACK}:{port} ssl;\n"
                                             f"        ssl_certificate {_q(cert)};\n"
                                             f"        ssl_certificate_key {_q(key)};"))
        return blocks

    def _probe(self) -> bool:
        conn = http.client.HTTPSConnection(LOOPBACK, self.port, timeout=1.0, context=self.ssl_context())
        try:
            conn.request("GET", "/__ready")
            return conn.getresponse().status == 204
        except OSError:
            return False
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def serve_dir(tmp_path: Path) -> Path:
    """The folder the test's servers serve (all of them the same one)."""
    folder = tmp_path / "www"
    folder.mkdir()
    return folder


@pytest.fixture
def nginx(serve_dir: Path, tmp_path: Path) -> Iterator[NginxServer]:
    with NginxServer(serve_dir, tmp_path / "nginx") as server:
        yield server


@pytest.fixture
def nginx_no_ranges(serve_dir: Path, tmp_path: Path) -> Iterator[NginxServer]:
    """nginx with ``max_ranges 0``: the same real server, answering every Range with the whole file."""
    with NginxServer(serve_dir, tmp_path / "nginx", ranges=False) as server:
        yield server


@pytest.fixture
def plain_http(serve_dir: Path) -> Iterator[PlainHTTPServer]:
    with PlainHTTPServer(serve_dir) as server:
        yield server


@pytest.fixture(scope="session")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(serve_dir: Path, tmp_path: Path, tls_pki: TestPki) -> Iterator[NginxTlsServer]:
    with NginxTlsServer(serve_dir, tmp_path / "nginx-tls", tls_pki) as server:
        yield server


@pytest.fixture
def fault_server(serve_dir: Path) -> Iterator[FaultServer]:
    with FaultServer(serve_dir) as server:
        yield server


@pytest.fixture
def proxy_server() -> Iterator[ProxyServer]:
    with ProxyServer() as server:
        yield server
