"""Small answers read no further than a limit, whatever the server sends: an error text, a manifest, a token.

Two uses of one bounded reader: :func:`read_bounded` cuts (an error text: its first bytes are enough) and
:func:`read_capped` refuses (a manifest or a token that is too large is an error). :func:`cap_body` wraps a
response's stream so that even httpx reading a body whole (in an auth flow) stops at the limit. A server
answering with an endless body costs ``limit`` bytes of memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx


class BodyTooLarge(Exception):
    pass


def _too_large(url: httpx.URL, limit: int) -> str:
    return f"{url.copy_with(query=None)} answered with more than {limit} bytes"


class _CappedStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, url: httpx.URL, limit: int,
                 error: Callable[[str], Exception]) -> None:
        self.inner, self.url, self.limit, self.error = inner, url, limit, error

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self.inner:
            seen += len(chunk)
            if seen > self.limit:
                raise self.error(_too_large(self.url, self.limit))
            yield chunk

    def close(self) -> None:
        self.inner.close()


def cap_body(response: httpx.Response, limit: int, error: Callable[[str], Exception] = BodyTooLarge) -> None:
    """Make reading ``response``'s body fail with ``error`` (given the message) once it passes ``limit`` bytes;
    a body capped already keeps the lower limit."""
    stream = response.stream
    if isinstance(stream, _CappedStream):
        if limit < stream.limit:
            stream.limit, stream.error = limit, error
    elif isinstance(stream, httpx.SyncByteStream):
        response.stream = _CappedStream(stream, response.request.url, limit, error)


def read_bounded(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body, and whether there was more. A body already read is cut; a streamed
    one is read no further than ``limit`` and closed."""
    try:
        body = response.content
    except httpx.ResponseNotRead:
        pass
    else:
        return body[:limit], len(body) > limit
    out = bytearray()
    try:
        for chunk in response.iter_bytes():
            out += chunk
            if len(out) > limit:
                return bytes(out[:limit]), True
    finally:
        response.close()
    return bytes(out), False


def read_capped(response: httpx.Response, limit: int,
                error: Callable[[str], Exception] = BodyTooLarge) -> bytes:
    """The whole body, or ``error`` when its Content-Length or its bytes pass ``limit``. Read with ``read()``,
    so httpx (an auth flow) may read it again."""
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        response.close()
        raise error(_too_large(response.request.url, limit))
    cap_body(response, limit, error)
    try:
        return response.read()
    except BaseException:
        response.close()
        raise
