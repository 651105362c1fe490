"""How the registry client judges a failure: worth another attempt or final, and the registry's own words.

:class:`Transient` is a failure worth retrying (connection broke, 5xx, 429); :class:`Failures` counts them for
one request or upload under :class:`~diskport.net.RetryPolicy` and turns the last into a one-line
:class:`~diskport.errors.RegistryError`; :func:`error_detail` and :func:`error_codes` read the registry's
``errors[]`` (OCI distribution spec, "Error codes"). Shared by the client (:mod:`diskport.oci.registry`) and the
upload state machine (:mod:`diskport.oci.upload`).
"""

from __future__ import annotations

import json

import httpx

from diskport.errors import RegistryError
from diskport.net import Retrier, RetriesExhausted, RetryPolicy, read_bounded

MAX_ERROR_BODY = 64 * 1024


class Transient(Exception):
    """A failure worth another attempt; ``wait`` overrides the backoff (Retry-After); ``broken``: the connection
    broke (rather than the registry answering an error)."""

    def __init__(self, reason: str, wait: float | None = None, broken: bool = False) -> None:
        super().__init__(reason)
        self.wait = wait
        self.broken = broken


class NotTls(Exception):
    """https found a server that does not speak TLS (a plain-http registry on loopback)."""


class Failures:
    """The failures of one request or upload under the retry policy, as :class:`RegistryError` when it gives
    up; ``reset`` when bytes got through."""

    def __init__(self, policy: RetryPolicy, where: str) -> None:
        self.where = where
        self._retrier = Retrier(policy)

    def wait(self, error: Transient, what: str) -> None:
        try:
            self._retrier.failed(str(error), error.wait)
        except RetriesExhausted as e:
            if e.spent:
                raise RegistryError(f"{self.where}: {what} failed: {e.budget:g} s of retrying spent, last: "
                                    f"{error}") from None
            raise RegistryError(f"{self.where}: {what} failed after {e.attempts} attempts: {error}") from None

    def reset(self) -> None:
        self._retrier.progressed()


def error_detail(response: httpx.Response) -> str:
    """The registry's explanation: ``CODE: message`` of each ``errors[]`` entry (OCI distribution spec, error
    codes), else the first line of a text body; empty when there is none."""
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_ERROR_BODY:
        return ""
    try:
        body, _ = read_bounded(response, MAX_ERROR_BODY)
    except (httpx.HTTPError, httpx.StreamError):
        return ""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("errors"), list):
        parts = []
        for entry in obj["errors"]:
            if isinstance(entry, dict):
                code, message = entry.get("code"), entry.get("message")
                parts.append(": ".join(str(x) for x in (code, message) if x))
        return "; ".join(p for p in parts if p)
    text = body.decode("utf-8", "replace").strip()
    first = text.splitlines()[0] if text else ""
    return first[:200] if first and not first.lstrip().startswith("<") else ""


def error_codes(response: httpx.Response) -> set[str]:
    try:
        obj = json.loads(read_bounded(response, MAX_ERROR_BODY)[0])
    except (ValueError, httpx.HTTPError, httpx.StreamError):
        return set()
    errors = obj.get("errors") if isinstance(obj, dict) else None
    return {str(e.get("code")) for e in errors if isinstance(e, dict)} if isinstance(errors, list) else set()
