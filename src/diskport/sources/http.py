"""HTTP(S) as a :class:`~diskport.sources.base.Source`: the bytes of a disk image at a URL.

Built by hand on httpx (which does the HTTP) because the rules that make a multi-GB transfer survive a network
are not in any client library:

* **Ranges when the server has them.** The first request asks for the first 64 KiB with ``Range``; a 206 answer
  makes the source random-access (``pread`` anywhere: a qcow2 converts straight over ranged GETs, no scratch).
  A 200 answer makes it sequential: the body already flowing is the stream, read front to back.
* **Small reads are cached, large reads are streamed, several ranges at once.** Reads under 256 KiB (headers,
  tables) are served from an LRU of 256 KiB blocks. A large read starts a pipeline: ``streams`` ranged requests
  of ``chunk`` bytes each are in flight on their own connections, ahead of the reader, and reads that go on
  where the last one ended take the next chunk. Servers and object stores that cap each connection's rate give
  ``streams`` times the throughput, and there is never a round trip's pause between two ranges. Memory is
  ``streams * chunk`` (4 x 8 MiB by default).
* **Resume, never stitch.** A body that breaks off is resumed from the last byte received with a ``Range``
  request carrying ``If-Range`` (the strong ETag, else Last-Modified). A server that answers 200 to it has a
  different file now: that is an error, never a splice of two files. So is a 206 whose ETag or Last-Modified
  differs from the first answer's, or that carries neither (a server ignoring ``If-Range``): every ranged answer
  is checked, not only resumes. Without a validator a break cannot be resumed safely and fails.
* **Retries** by :mod:`diskport.net.retry` (one policy, one budget of waiting per source, the count of breaks
  reset whenever a resumed body made progress), a stall timeout (no byte for ``stall_timeout`` seconds is a
  failure, and retried like one), redirects followed by hand so that credentials (``Authorization``, cookies,
  ``--header`` values) are sent only to the origin the user named: the same scheme, host and port (a redirect
  from https to http drops them, like a redirect to another host). The client (proxies, TLS) comes from
  :func:`diskport.net.make_client`; ``transport`` replaces the network in unit tests.
* **Closing stops everything at once.** The pipeline's fetches run on daemon threads that check a cancel event
  between chunks and wait on it between retries, so SIGTERM or Ctrl-C ends the process within moments even
  while a fetch is stalled (the main thread, which receives the signal, never waits for them).
"""

from __future__ import annotations

import contextlib
import functools
import re
import ssl
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol, TypeVar
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpx

from diskport.errors import SourceError, UnsafeImage
from diskport.net import (
    Cancelled,
    Retrier,
    RetriesExhausted,
    RetryBudget,
    RetryPolicy,
    is_transient_error,
    is_transient_status,
    make_client,
    retry_after,
)
from diskport.net.direct import DirectConnections, DirectError, DirectResponse, environment_proxy
from diskport.sources.base import ReadintoSource

HEAD_BYTES = 64 * 1024
BLOCK = 256 * 1024
CACHE_BLOCKS = 64          # 16 MiB of small reads
MAX_REDIRECTS = 10
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_SENSITIVE = {"authorization", "cookie", "proxy-authorization"}
#: The most a direct body read asks for at once: a cancelled transfer stops within one such piece.
_PIECE = 1024 * 1024


class _Headers(Protocol):
    """httpx's headers and http.client's alike: a case-insensitive ``get``."""

    def get(self, key: str, default: None = None) -> str | None: ...


@dataclass
class HttpOptions:
    headers: dict[str, str] = field(default_factory=dict)
    ca_bundle: str | None = None
    insecure: bool = False
    #: When to retry, how long to wait, when to give up (``budget``: seconds of waiting, in all, per source).
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    stall_timeout: float = 60.0   # seconds without a byte
    connect_timeout: float = 30.0
    streams: int = 4              # ranged requests in flight for large reads
    chunk: int = 8 * 1024 * 1024  # bytes per ranged request
    #: Authentication for the origin (a registry's token auth); never used for another origin after a redirect.
    auth: httpx.Auth | None = None
    #: Read ranged bodies with http.client (:mod:`diskport.net.direct`) where it does what httpx would;
    #: False keeps every request on httpx.
    direct: bool = True


class _Retry(Exception):
    """A failure worth another attempt; ``wait`` overrides the backoff (Retry-After)."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


_T = TypeVar("_T")


def _spawn(fn: Callable[[], _T]) -> Future[_T]:
    """``fn`` on a daemon thread: a fetch stuck in a socket never holds the process up at exit."""
    future: Future[_T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:  # handed to the reader, which raises it
            future.set_exception(e)

    threading.Thread(target=run, name="diskport-http", daemon=True).start()
    return future


class HttpSource(ReadintoSource):
    """The image at ``url``. ``sequential`` is True when the server does not answer ranges."""

    def __init__(self, url: str, options: HttpOptions | None = None, *,
                 on_bytes: Callable[[int], None] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.name = url
        self.url = url
        self.options = options or HttpOptions()
        self._on_bytes = on_bytes
        self.downloaded = 0
        self._lock = threading.Lock()
        self._policy = self.options.retry
        self._budget = RetryBudget(self._policy.budget)  # one budget of waiting for the whole transfer
        self._closed = threading.Event()
        timeout = httpx.Timeout(self.options.stall_timeout, connect=self.options.connect_timeout)
        self._transport = transport
        self.client = make_client(timeout=timeout, ca_bundle=self.options.ca_bundle, insecure=self.options.insecure,
                                  transport=transport)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cursor: _Cursor | None = None   # the body of a server without ranges
        self._direct: DirectConnections | None = None  # http.client for the ranged bodies, where it fits
        self._pipeline: _Pipeline | None = None
        self._exact = False
        self._head = b""
        self.validator: str | None = None       # what If-Range carries
        self._etag: str | None = None           # the first answer's, which every later one must repeat
        self._last_modified: str | None = None
        self.sequential = False
        try:
            self._open()
        except BaseException:
            self.client.close()
            raise

    def relative_url(self, name: str, what: str) -> str:
        """The URL of ``name`` beside this file (an OVF's ``ovf:href``), confined to this URL's folder: absolute
        paths, URLs, ``..`` (also percent-encoded), queries and fragments are refused as external references."""
        decoded = unquote(name)
        if (not name or "://" in name or decoded.startswith("/") or "\\" in decoded or "\0" in decoded
                or "?" in name or "#" in name or ":" in decoded.split("/", 1)[0]
                or any(part in ("..", ".", "") for part in decoded.split("/"))):
            raise UnsafeImage(f"refers to {what} '{name}' outside its own folder; diskport only opens files "
                              "beside the image", path=self.name)
        base = urlsplit(self.url)
        folder = base.path.rsplit("/", 1)[0] + "/"
        url = urljoin(f"{base.scheme}://{base.netloc}{folder}", quote(decoded, safe="/"))
        target = urlsplit(url)
        if (target.scheme, target.netloc) != (base.scheme, base.netloc) or not target.path.startswith(folder):
            raise UnsafeImage(f"refers to {what} '{name}' outside its own folder", path=self.name)
        return url

    def open_relative(self, name: str, what: str) -> HttpSource:
        """Open ``name`` from this URL's folder (see :meth:`relative_url`), with the same options; a missing
        file (HTTP 404) is a :class:`SourceError` naming it."""
        url = self.relative_url(name, what)
        try:
            # its bytes count as this source's (``downloaded``, the progress): one download of the appliance
            return HttpSource(url, self.options, on_bytes=self._count, transport=self._transport)
        except SourceError as e:
            raise SourceError(f"{what} '{name}' cannot be read: {e.message}", path=self.name,
                              hint=e.hint) from None

    # -- the first request -----------------------------------------------------------------------------
    def _open(self) -> None:
        response = self._send(0, HEAD_BYTES - 1)
        retries = self._retrier()
        while response.status_code == 416 and response.headers.get("content-range", "").strip() != "bytes */0":
            response.close()  # a file that is not empty cannot be unsatisfiable from byte 0: a passing fault
            try:
                retries.failed("HTTP 416")
            except RetriesExhausted:
                break
            response = self._send(0, HEAD_BYTES - 1)
        if response.status_code == 206:
            start, _, total = self._content_range(response)
            if start != 0 or total is None:
                response.close()
                self._open_sequential(self._send(None, None))
                return
            self.size = total
            self._remember_validators(response)
            self._direct = self._direct_connections(response)
            self._head = self._read_body(response, min(HEAD_BYTES, total))
            return
        if response.status_code == 416:
            unsatisfied = response.headers.get("content-range", "").strip()
            response.close()
            if unsatisfied == "bytes */0":  # only an empty file cannot satisfy bytes=0-65535
                self.size = 0
                self._head = b""
                return
            raise SourceError(f"HTTP 416 to the first bytes of a file that is not empty ({unsatisfied or 'no size'})",
                              path=self.name)
        self._open_sequential(response)

    def _open_sequential(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            response.close()
            raise SourceError(f"unexpected HTTP {response.status_code}", path=self.name)
        self.sequential = True
        self.sequential_reason = "the download (the server does not answer range requests)"
        length = response.headers.get("content-length")
        self.size_known = bool(length and length.isdigit())
        self.size = int(length) if self.size_known else UNDECLARED_SIZE
        self._remember_validators(response)
        self._cursor = _Cursor(self, response, 0)
        # Keep the first bytes: the format probe reads them, then the stream reads them again from 0.
        head = bytearray(HEAD_BYTES)
        self._head = bytes(head[: self._cursor.readinto(memoryview(head))])

    def _direct_connections(self, response: httpx.Response) -> DirectConnections | None:
        """http.client connections for the ranged bodies, when they would send what httpx sends to where it
        sends it: the URL answered itself (no redirect, whose target may need other headers), over HTTP/1.1,
        no proxy in the environment, no auth flow, no cookie set, the real network (not a test's transport)."""
        url = httpx.URL(self.url)
        if (not self.options.direct or self._transport is not None or self.options.auth is not None
                or response.url != url or response.http_version != "HTTP/1.1" or self.client.cookies
                or url.scheme not in ("http", "https") or environment_proxy(url.scheme)):
            return None
        return DirectConnections(self.url, connect_timeout=self.options.connect_timeout,
                                 read_timeout=self.options.stall_timeout, ca_bundle=self.options.ca_bundle,
                                 insecure=self.options.insecure, headers=self.options.headers,
                                 max_idle=max(1, self.options.streams) + 1)

    def _send_direct(self, start: int, end: int | None, cancel: threading.Event) -> DirectResponse | None:
        """A ranged GET over :attr:`_direct`: the 206 answer, or None when the caller should ask httpx
        instead (no answer came, or another status: httpx's path retries, follows, reports). An answer that
        redirects or wants credentials turns the direct path off for the rest of the transfer."""
        direct = self._direct
        if direct is None or cancel.is_set():
            return None
        headers = {"Range": f"bytes={start}-{'' if end is None else end}"}
        if self.validator:
            headers["If-Range"] = self.validator
        try:
            response = direct.get(headers)
        except DirectError:
            return None
        if response.status == 206:
            return response
        response.close()
        if 300 <= response.status < 400 or response.status in (401, 403, 407):
            self._direct = None
            direct.close()
        return None

    def _remember_validators(self, response: httpx.Response) -> None:
        self._etag = response.headers.get("etag")
        self._last_modified = response.headers.get("last-modified")
        strong = self._etag if self._etag and not self._etag.startswith("W/") else None
        self.validator = strong or self._last_modified  # a weak tag never matches If-Range (RFC 9110 13.1.5)

    def check_same_file(self, response: httpx.Response | DirectResponse) -> None:
        """A ranged answer must come from the file the transfer started with: the same ETag and Last-Modified
        as the first answer (a server that ignores If-Range sends the new file's bytes with the new file's
        validators). A :class:`SourceError` otherwise: the output is never a splice of two files."""
        if self._etag is None and self._last_modified is None:
            return
        headers: _Headers = response.headers
        etag, modified = headers.get("etag"), headers.get("last-modified")
        if etag is None and modified is None:
            changed = "the answer to a range request carries no ETag or Last-Modified to match"
        elif self._etag is not None and etag is not None and etag != self._etag:
            changed = f"its ETag went from {self._etag} to {etag}"
        elif self._last_modified is not None and modified is not None and modified != self._last_modified:
            changed = f"its Last-Modified went from {self._last_modified} to {modified}"
        else:
            return
        response.close()
        raise SourceError(f"the file changed on the server while it was being read ({changed})", path=self.name,
                          hint="start the import again")

    def _retrier(self, cancel: threading.Event | None = None) -> Retrier:
        return Retrier(self._policy, self._budget, cancel or self._closed)

    @staticmethod
    def _content_range(response: httpx.Response | DirectResponse) -> tuple[int, int, int | None]:
        headers: _Headers = response.headers
        m = _CONTENT_RANGE.fullmatch((headers.get("content-range") or "").strip())
        if m is None:
            raise _Retry("206 answer without a valid Content-Range")
        total = None if m.group(3) == "*" else int(m.group(3))
        return int(m.group(1)), int(m.group(2)), total

    # -- requests ----------------------------------------------------------------------------------------
    def _send(self, start: int | None, end: int | None, *, if_range: bool = False,
              cancel: threading.Event | None = None) -> httpx.Response:
        """One GET (with retries and redirects) whose response is open for streaming."""
        retries = self._retrier(cancel)
        while True:
            retries.check()
            try:
                return self._send_once(start, end, if_range)
            except _Retry as e:
                try:
                    retries.failed(str(e), e.wait)
                except RetriesExhausted as gave_up:
                    raise SourceError(gave_up.describe(), path=self.name) from None

    def _send_once(self, start: int | None, end: int | None, if_range: bool) -> httpx.Response:
        url = self.url
        headers = dict(self.options.headers)
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
            if if_range and self.validator:
                headers["If-Range"] = self.validator
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                auth = self.options.auth if _origin(url) == origin else None
                response = self.client.send(self.client.build_request("GET", url, headers=headers), stream=True,
                                            auth=auth)
            except httpx.TimeoutException as e:
                raise _Retry(f"no answer within the timeout ({type(e).__name__})") from None
            except httpx.TransportError as e:
                if isinstance(e, httpx.UnsupportedProtocol):
                    raise SourceError(f"unsupported URL: {e}", path=self.name) from None
                if "CERTIFICATE_VERIFY_FAILED" in str(e) or isinstance(e.__cause__, ssl.SSLError):
                    raise SourceError(f"TLS failed: {e}", path=self.name,
                                      hint="pass --ca-bundle with the server's CA, or --insecure") from None
                if not is_transient_error(e):
                    raise SourceError(f"HTTP failed: {e or type(e).__name__}", path=self.name) from None
                raise _Retry(f"connection failed: {e}") from None
            if response.is_redirect:
                location = response.headers.get("location")
                response.close()
                if not location:
                    raise SourceError(f"HTTP {response.status_code} redirect without a Location", path=self.name)
                url = str(response.url.join(location))
                if _origin(url) != origin:
                    # Another origin (another host or port, or https down to http): never send it the user's
                    # credentials or headers.
                    headers = {k: v for k, v in headers.items()
                               if k.lower() not in _SENSITIVE and k not in self.options.headers}
                continue
            status = response.status_code
            if is_transient_status(status):
                wait = retry_after(response)
                response.close()
                raise _Retry(f"HTTP {status}", wait)
            if status in (200, 206, 416):
                return response
            response.close()
            hint = {401: "the server wants credentials: pass --header 'Authorization: ...'",
                    403: "access denied; a signed URL may have expired",
                    404: "check the URL"}.get(status)
            raise SourceError(f"HTTP {status} {response.reason_phrase}", path=self.name, hint=hint)
        raise SourceError(f"more than {MAX_REDIRECTS} redirects", path=self.name)

    def _read_body(self, response: httpx.Response, length: int) -> bytes:
        out = bytearray()
        try:
            for chunk in response.iter_raw():
                out += chunk
                if len(out) >= length:
                    break
        finally:
            response.close()
        self._count(len(out))
        return bytes(out[:length])

    def _count(self, n: int) -> None:
        with self._lock:
            self.downloaded += n
        if self._on_bytes is not None:
            self._on_bytes(n)

    # -- Source ------------------------------------------------------------------------------------------
    def readinto(self, offset: int, buf: memoryview) -> int:
        length = min(len(buf), max(0, self.size - offset))
        if length <= 0:
            return 0
        if self.sequential:
            return self._sequential_read(offset, buf[:length])
        if length < BLOCK:
            return self._cached_read(offset, buf[:length])
        if self._exact:
            return self._fetch(offset, buf[:min(length, self.options.chunk)])
        return self._pipelined_read(offset, buf[:length])

    def prefer_exact_reads(self) -> None:
        self._exact = True

    def _sequential_read(self, offset: int, buf: memoryview) -> int:
        if offset < len(self._head):  # the head, when the first answer was already a full body
            n = min(len(buf), len(self._head) - offset)
            buf[:n] = self._head[offset: offset + n]
            return n + (self._sequential_read(offset + n, buf[n:]) if n < len(buf) else 0)
        cursor = self._cursor
        if cursor is None or cursor.position != offset:
            raise SourceError(f"the server does not answer range requests, so it can only be read in order "
                              f"(asked for {offset:#x}, at {0 if cursor is None else cursor.position:#x})",
                              path=self.name)
        return cursor.readinto(buf)

    def _cached_read(self, offset: int, buf: memoryview) -> int:
        if offset + len(buf) <= len(self._head):  # the first bytes, fetched by the opening request
            buf[:] = self._head[offset: offset + len(buf)]
            return len(buf)
        done = 0
        while done < len(buf):
            pos = offset + done
            index = pos // BLOCK
            block = self._cache.get(index)
            if block is None:
                start = index * BLOCK
                data = bytearray(min(BLOCK, self.size - start))
                got = self._fetch(start, memoryview(data))
                block = bytes(data[:got])
                self._cache[index] = block
                if len(self._cache) > CACHE_BLOCKS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(index)
            at = pos - index * BLOCK
            n = min(len(buf) - done, len(block) - at)
            if n <= 0:
                break
            buf[done: done + n] = block[at: at + n]
            done += n
        return done

    def _fetch(self, start: int, buf: memoryview) -> int:
        """Exactly ``len(buf)`` bytes from ``start`` through a fresh ranged request (resumed on breaks)."""
        cursor = _Cursor(self, None, start, end=start + len(buf) - 1)
        try:
            return cursor.readinto(buf)
        finally:
            cursor.close()

    def _pipelined_read(self, offset: int, buf: memoryview) -> int:
        pipeline = self._pipeline
        if pipeline is None or not pipeline.serves(offset):
            if pipeline is not None:
                pipeline.close()
            pipeline = self._pipeline = _Pipeline(self, offset)
        return pipeline.readinto(offset, buf)

    def allocated_bytes(self) -> int | None:
        return None

    def close(self) -> None:
        self._closed.set()  # fetches on other threads stop at their next chunk or wait
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None
        if self._direct is not None:
            self._direct.close()
        self.client.close()


#: ``size`` of a sequential source whose server sent no Content-Length.
#: ``size`` of a body whose length was not declared (``size_known`` is False): an upper bound no read reaches.
UNDECLARED_SIZE = 1 << 62


class _Cursor:
    """An open response body at ``position``, resumed with If-Range when it breaks off.

    A ranged body comes over :mod:`diskport.net.direct` where the source has it, straight into the reader's
    buffer; otherwise (and for the body of a server without ranges) from httpx's chunks.
    """

    def __init__(self, source: HttpSource, response: httpx.Response | None, position: int,
                 end: int | None = None, cancel: threading.Event | None = None) -> None:
        self.source = source
        self.response: httpx.Response | DirectResponse | None = response
        self.position = position
        self.end = end
        self._chunks: Iterator[bytes] | None = None
        self._pending = memoryview(b"")
        self._cancel = cancel or source._closed
        self._retries = source._retrier(self._cancel)  # breaks in a row; reset by every chunk received

    def _open(self) -> None:
        src = self.source
        response: httpx.Response | DirectResponse | None = None
        if not src.sequential:
            response = src._send_direct(self.position, self.end, self._cancel)
        if response is None:
            response = src._send(self.position, self.end, if_range=True, cancel=self._cancel)
            if response.status_code == 416 and self.position >= src.size:
                response.close()
                self.response = None
                return
            if response.status_code != 206:
                response.close()
                raise SourceError("the file changed on the server while it was being read (the resumed request "
                                  "no longer matches its ETag/Last-Modified)" if response.status_code == 200
                                  else f"unexpected HTTP {response.status_code} to a range request",
                                  path=src.name, hint="start the import again")
        start, _, total = src._content_range(response)
        if start != self.position or (total is not None and total != src.size):
            response.close()
            raise SourceError(f"the server answered a range request for {self.position} with one from {start} "
                              f"(of {total} bytes, expected {src.size})", path=src.name)
        src.check_same_file(response)
        self.response = response

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` from the body (fewer bytes only at its end), resuming through breaks."""
        done = 0
        while done < len(buf):
            n = self._read_some(buf[done:])
            if n == 0:
                break
            done += n
        return done

    def _read_some(self, buf: memoryview) -> int:
        """Some bytes of the body into ``buf`` (the next piece the socket gave), 0 at its end."""
        while True:
            if self._pending:
                n = min(len(buf), len(self._pending))
                buf[:n] = self._pending[:n]  # memoryview slices: no copies but this one
                self._pending = self._pending[n:]
                self.position += n
                return n
            want = len(buf)
            if self.end is not None:
                if self.position > self.end:
                    return 0
                want = min(want, self.end + 1 - self.position)
            if self.source.sequential and self.position >= self.source.size:
                return 0
            try:
                if self.response is None:
                    if self.source.sequential:
                        raise SourceError(f"the connection broke after {self.position} bytes and the server does "
                                          "not answer range requests, so the transfer cannot resume",
                                          path=self.source.name, hint="start the import again")
                    if not self.source.validator and self._retries.total:
                        raise SourceError("the connection broke and the server offers no ETag or "
                                          "Last-Modified to resume safely", path=self.source.name)
                    self._open()
                    if self.response is None:
                        return 0
                if self._cancel.is_set():
                    raise Cancelled()
                response = self.response
                if isinstance(response, DirectResponse):
                    got = response.readinto(buf[:min(want, _PIECE)])
                    raw = None
                else:
                    if self._chunks is None:
                        # httpx's own chunks (what the socket gave): re-chunking costs 3x the throughput.
                        self._chunks = response.iter_raw()
                    raw = next(self._chunks, None)
                    if raw == b"":
                        continue
                    got = len(raw) if raw is not None else 0
            except (httpx.TransportError, httpx.StreamError, _Retry, *DirectError) as e:
                self._broken(e)
                continue
            if got == 0:
                if not self.source.size_known:
                    return 0  # the body ended, and nobody said how long it would be
                expected_end = self.source.size if self.end is None else self.end + 1
                if self.position < expected_end:
                    self._broken(SourceError(f"body ended at {self.position} of {expected_end} bytes"))
                    continue
                self.close()  # read to its end: a direct connection goes back for the next request
                return 0
            self._retries.progressed()
            self.source._count(got)
            if raw is None:
                self.position += got
                if self.end is not None and self.position > self.end:
                    self.close()
                return got
            self._pending = memoryview(raw)

    def _broken(self, error: BaseException) -> None:
        """The body broke off: drop it; the next read resumes at ``position`` (after the retry policy's wait;
        breaks in a row are bounded, breaks after progress are not)."""
        self.close()
        try:
            self._retries.failed(str(error) or type(error).__name__)
        except RetriesExhausted as e:
            what = (f"{e.budget:g} s of retrying spent" if e.spent
                    else f"transfer broke off {e.attempts} times in a row")
            raise SourceError(f"{what}, last: {error or type(error).__name__}", path=self.source.name) from None

    def close(self) -> None:
        if (self._chunks is not None and not self._pending and self.end is not None
                and self.position > self.end):
            # Every byte asked for is in: one more step lets httpx see the body's end (no wait: the length is
            # known), so it keeps the connection for the next range instead of closing it with the response.
            with contextlib.suppress(httpx.TransportError, httpx.StreamError):
                next(self._chunks, None)
        if self.response is not None:
            self.response.close()
            self.response = None
        self._chunks = None


class _Pipeline:
    """Ranged requests of ``chunk`` bytes, ``streams`` of them in flight ahead of a reader going forward.

    Each chunk is fetched whole into a buffer of its own by a worker (through a :class:`_Cursor`, so a break
    resumes with If-Range); the reader copies chunks out in order, and a buffer it has read is the next fetch's.
    A read behind the pipeline, or far ahead of what is in flight, starts a new one; a read a little ahead skips
    forward through the chunks already on their way.
    """

    def __init__(self, source: HttpSource, start: int) -> None:
        self.source = source
        self.position = start         # next byte the reader gets
        self._next = start            # first byte not yet requested
        self._streams = max(1, source.options.streams)
        self._chunk = max(BLOCK, source.options.chunk)
        self._cancel = threading.Event()
        self._inflight: deque[tuple[int, Future[int]]] = deque()
        self._buffers: deque[bytearray] = deque()      # the fetches', in request order
        self._free: list[bytearray] = []               # read, for the next fetch
        self._current: bytearray | None = None          # the chunk being read
        self._part = memoryview(b"")                    # what of it is still to read
        self._fill()

    def serves(self, offset: int) -> bool:
        return self.position <= offset < self._next

    def _fill(self) -> None:
        while len(self._inflight) < self._streams and self._next < self.source.size:
            length = min(self._chunk, self.source.size - self._next)
            buffer = self._free.pop() if self._free else bytearray(self._chunk)
            self._buffers.append(buffer)
            self._inflight.append((self._next, _spawn(functools.partial(
                self._fetch, self._next, memoryview(buffer)[:length]))))
            self._next += length

    def _fetch(self, start: int, buf: memoryview) -> int:
        """The range's bytes into ``buf``, whole."""
        cursor = _Cursor(self.source, None, start, end=start + len(buf) - 1, cancel=self._cancel)
        try:
            got = cursor.readinto(buf)
        finally:
            cursor.close()
        if got != len(buf):
            raise SourceError(f"range {start}+{len(buf)} ended after {got} bytes", path=self.source.name)
        return got

    def readinto(self, offset: int, buf: memoryview) -> int:
        done = 0
        while done < len(buf):
            part = self._part
            if not part:
                if self._current is not None:
                    self._free.append(self._current)
                    self._current = None
                if not self._inflight:
                    break
                _, future = self._inflight.popleft()
                buffer = self._buffers.popleft()
                got = future.result()
                self._current, self._part = buffer, memoryview(buffer)[:got]
                self._fill()
                continue
            skip = offset + done - self.position  # a read that starts ahead of the reader: drop what lies between
            n = min(len(part), skip) if skip else min(len(part), len(buf) - done)
            if not skip:
                buf[done: done + n] = part[:n]
                done += n
            self.position += n
            self._part = part[n:]
        return done

    def close(self) -> None:
        self._cancel.set()
        for _, future in self._inflight:
            future.cancel()
        self._inflight.clear()
        self._buffers.clear()
        self._free.clear()
        self._current, self._part = None, memoryview(b"")
