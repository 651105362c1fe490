"""The one retry policy of every transfer (a download, a layer pull, a blob upload, a registry request).

* **What is transient**: timeouts, connection errors (refused, reset, broken off) and a server that broke the
  protocol mid-answer; statuses 408, 429, 500, 502, 503 and 504. Anything else (TLS verification, 4xx, 501) is
  an answer, and the caller reports it.
* **How long to wait**: exponential backoff from ``backoff`` seconds, doubling with each failure in a row, at most
  ``max_backoff``, with jitter (each wait drawn from its upper half, so clients that failed together do not come
  back together). A ``Retry-After`` (seconds or an HTTP date) is honoured instead, but never beyond
  ``max_retry_after`` (120 s): a server saying "come back in 31 years" gets two minutes.
* **When to give up**: after ``attempts`` failures in a row without progress, or when the transfer has spent its
  ``budget`` of waiting (600 s) in all. Progress (bytes got through) resets the count, not the budget; the first
  retry after progress goes at once, so a link that drops every few hundred KiB completes without waiting at
  all.
* **Waits end early** when the operation is cancelled (:class:`Cancelled`, for worker threads whose transfer
  was closed); in the main thread a signal ends them too (SIGTERM and Ctrl-C raise there).

Written here rather than taken from a retry library because the rules (progress resets, a shared budget, a
capped Retry-After, cancellation by event) are these and no others.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from dataclasses import dataclass

import httpx

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def is_transient_status(status: int) -> bool:
    return status in TRANSIENT_STATUSES


def is_transient_error(error: BaseException) -> bool:
    """A failure of the exchange itself that another attempt may not meet. TLS verification failures are
    ``ConnectError`` too: callers that want to name them check first."""
    return isinstance(error, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError
                      | httpx.ProxyError)


def retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` of an answer in seconds (delta-seconds or an HTTP date), None when absent or invalid.
    Not capped here: :meth:`RetryPolicy.delay` caps it."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8               # failures in a row without progress before giving up
    backoff: float = 0.5            # the first wait; doubles with each failure in a row
    max_backoff: float = 30.0
    budget: float = 600.0           # seconds of waiting one transfer may spend, in all
    max_retry_after: float = 120.0  # a Retry-After is honoured up to this
    jitter: float = 0.5             # waits are drawn from [(1 - jitter) * w, w]

    def delay(self, failures: int, retry_after: float | None = None, *, unit: float | None = None) -> float:
        """The wait before the next attempt after ``failures`` failures in a row (1 for the first); ``unit``
        in [0, 1] picks within the jitter (random when None)."""
        if retry_after is not None:
            return max(0.0, min(float(retry_after), self.max_retry_after))
        base = min(self.backoff * 2.0 ** max(0, failures - 1), self.max_backoff)
        u = random.random() if unit is None else unit
        return float(base * (1.0 - self.jitter * (1.0 - u)))


class RetriesExhausted(Exception):
    """Giving up: ``reason`` is the last failure, ``attempts`` how many attempts failed in a row, ``spent``
    whether the budget ran out (rather than the count)."""

    def __init__(self, reason: str, attempts: int, spent: bool, budget: float) -> None:
        self.reason, self.attempts, self.spent, self.budget = reason, attempts, spent, budget
        super().__init__(self.describe())

    def describe(self) -> str:
        if self.spent:
            return f"giving up: {self.budget:g} s of retrying spent (last: {self.reason})"
        return f"giving up after {self.attempts} attempts: {self.reason}"


class Cancelled(Exception):
    """The transfer was closed while an operation waited to retry (or was about to start one)."""


class RetryBudget:
    """The seconds of waiting left to one transfer, shared by its operations and threads."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.left = seconds
        self._lock = threading.Lock()

    def take(self, delay: float) -> bool:
        with self._lock:
            if delay > self.left:
                return False
            self.left -= delay
            return True


def _sleep(seconds: float, cancel: threading.Event | None) -> None:
    """Wait ``seconds``; :class:`Cancelled` as soon as ``cancel`` is set. (Tests replace this.)"""
    if seconds <= 0:
        return
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise Cancelled()


class Retrier:
    """The failures of one operation (a request, a body being read, an upload) under ``policy``, drawing on
    ``budget`` (a new one when None). ``failed`` waits or raises :class:`RetriesExhausted`; ``progressed``
    says bytes got through."""

    def __init__(self, policy: RetryPolicy, budget: RetryBudget | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.policy = policy
        self.budget = budget if budget is not None else RetryBudget(policy.budget)
        self.cancel = cancel
        self.failures = 0          # in a row, since the start or the last progress
        self.total = 0             # in all
        self._after_progress = False

    def failed(self, reason: str, retry_after: float | None = None) -> None:
        self.failures += 1
        self.total += 1
        if self.failures > self.policy.attempts:
            raise RetriesExhausted(reason, self.failures, False, self.budget.seconds)
        if self._after_progress and retry_after is None:
            delay = 0.0            # it was moving: try again at once, back off if that fails too
            self.failures = 0
        else:
            delay = self.policy.delay(self.failures, retry_after)
        self._after_progress = False
        if not self.budget.take(delay):
            raise RetriesExhausted(reason, self.failures, True, self.budget.seconds)
        self.check()
        _sleep(delay, self.cancel)
        self.check()

    def progressed(self) -> None:
        self.failures = 0
        self._after_progress = True

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled()
