"""GETs on the standard library's ``http.client`` whose bodies are read straight into the caller's buffer.

httpx reads a body in 64 KiB pieces, each through h11's receive buffer into a new ``bytes``: on loopback one
connection tops out near 380 MB/s and costs about 1 s of CPU per 512 MB, and threads reading in parallel only
share that CPU. ``http.client``'s ``readinto`` fills the caller's buffer from the socket with no copy in between
(the GIL released while it waits): 1.1 GB/s on one connection at an eighth of the CPU (``bench/http_read.py``).

So the bulk of a ranged download (:mod:`diskport.sources.http`) goes here, and everything else stays on httpx.
A :class:`DirectConnections` serves one URL on one origin and is built only for what it does the same as httpx:
HTTP/1.1 to the URL itself (the caller uses it only when its first answer came without a redirect, with no
proxy in the environment, no auth flow and no cookies), with the same TLS context (:func:`tls_context`: the
system's CAs, ``--ca-bundle``, ``--insecure``), the same user agent and ``Accept-Encoding: identity``. It does
no retries, redirects or status handling of its own: the caller checks each answer and falls back to httpx
for anything that is not what it asked for.

Connections are persistent: a body read to its end gives its connection back for the next request; one that
is closed early closes its connection. A request on a kept connection that the server has closed meanwhile is
sent again once on a new one.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.request
from collections.abc import Mapping

import httpx

from diskport.net.client import USER_AGENT, tls_context

#: What ``readinto`` and a failed request raise: the connection broke, stalled or spoke nonsense.
DirectError = (OSError, http.client.HTTPException)


def environment_proxy(scheme: str) -> bool:
    """Whether the environment names a proxy that a request with ``scheme`` might go through (``*_PROXY``,
    ``ALL_PROXY``, any case). NO_PROXY is not looked at: with a proxy configured at all, httpx decides."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get(scheme) or proxies.get("all"))


class _Connection(http.client.HTTPConnection):
    """Connect within ``connect_timeout``, then wait at most ``read_timeout`` for each read."""

    read_timeout: float | None = None

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)


class _TlsConnection(http.client.HTTPSConnection):
    read_timeout: float | None = None

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)


class DirectResponse:
    """An answer whose headers have arrived; ``readinto`` reads its body."""

    def __init__(self, owner: DirectConnections, connection: http.client.HTTPConnection,
                 response: http.client.HTTPResponse) -> None:
        self._owner = owner
        self._connection: http.client.HTTPConnection | None = connection
        self._response = response
        self.status = response.status
        self.headers = response.headers   # case-insensitive ``get``, like httpx's

    def readinto(self, buf: memoryview) -> int:
        """Up to ``len(buf)`` bytes of the body; 0 at its end (or when the server closed the connection early:
        the caller knows how many bytes it expects)."""
        return self._response.readinto(buf)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._response.isclosed() and not self._response.will_close:
            self._owner._give_back(connection)   # read to its end: the connection can take the next request
        else:
            self._response.close()
            connection.close()


class DirectConnections:
    """Persistent ``http.client`` connections to the origin of ``url``, for GETs of that URL."""

    def __init__(self, url: str, *, connect_timeout: float, read_timeout: float, ca_bundle: str | None = None,
                 insecure: bool = False, headers: Mapping[str, str] | None = None, max_idle: int = 8) -> None:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {url}")
        self.scheme = parsed.scheme
        self.host = parsed.host
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.target = parsed.raw_path.decode("ascii")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._context: ssl.SSLContext | None = None
        if self.scheme == "https":
            verify = tls_context(ca_bundle, insecure)
            if isinstance(verify, ssl.SSLContext):
                self._context = verify
            else:
                self._context = ssl.create_default_context()
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
            self._context.set_alpn_protocols(["http/1.1"])
        given = {k.lower() for k in (headers or {})}
        defaults = {"User-Agent": USER_AGENT, "Accept": "*/*", "Accept-Encoding": "identity"}
        self.headers = {**{k: v for k, v in defaults.items() if k.lower() not in given}, **(headers or {})}
        self._idle: list[http.client.HTTPConnection] = []
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._closed = False

    def _new(self) -> http.client.HTTPConnection:
        connection: _Connection | _TlsConnection
        if self._context is not None:
            connection = _TlsConnection(self.host, self.port, timeout=self.connect_timeout, context=self._context)
        else:
            connection = _Connection(self.host, self.port, timeout=self.connect_timeout)
        connection.read_timeout = self.read_timeout
        return connection

    def get(self, headers: Mapping[str, str]) -> DirectResponse:
        """GET the URL with ``headers`` added to the defaults; the answer once its headers are in. Raises one of
        :data:`DirectError` when no answer came."""
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        sent = {**self.headers, **headers}
        if connection is not None:
            try:
                return self._exchange(connection, sent)
            except DirectError:
                pass  # the server closed a kept connection meanwhile: once more on a new one
        return self._exchange(self._new(), sent)

    def _exchange(self, connection: http.client.HTTPConnection, headers: Mapping[str, str]) -> DirectResponse:
        try:
            connection.request("GET", self.target, headers=dict(headers))
            return DirectResponse(self, connection, connection.getresponse())
        except BaseException:
            connection.close()
            raise

    def _give_back(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
