"""diskport.net: the retry policy, the bounded reads and the client builder, without a network.

Waits are recorded, not slept (``diskport.net.retry._sleep`` is replaced): these tests assert which waits the
policy asks for, never how long anything took. The bounded reads run over ``httpx.MockTransport`` because the
point is a body that never ends, which is cheaper to model than to serve.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from diskport.errors import UsageError
from diskport.net import (
    USER_AGENT,
    BodyTooLarge,
    Cancelled,
    Retrier,
    RetriesExhausted,
    RetryBudget,
    RetryPolicy,
    is_transient_error,
    is_transient_status,
    make_client,
    read_bounded,
    read_capped,
    retry_after,
    tls_context,
)
from diskport.version import __version__


def test_backoff_doubles_is_capped_and_jittered() -> None:
    policy = RetryPolicy(backoff=0.5, max_backoff=4.0, jitter=0.5)
    assert [policy.delay(n, unit=1.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.delay(3, unit=0.0) == 1.0  # the lower half of the jitter range
    drawn = {policy.delay(3) for _ in range(50)}
    assert all(1.0 <= d <= 2.0 for d in drawn) and len(drawn) > 1


def test_retry_after_is_honoured_but_capped() -> None:
    policy = RetryPolicy()
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=1e9) == 120.0  # 31 years asked, two minutes given
    assert RetryPolicy(max_retry_after=5).delay(1, retry_after=60) == 5


def test_retry_after_parsing() -> None:
    def answer(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after(answer("7")) == 7.0
    assert retry_after(answer("soon")) is None
    assert retry_after(httpx.Response(503)) is None
    later = email.utils.formatdate(time.time() + 3600, usegmt=True)
    assert 3500 < (retry_after(answer(later)) or 0) <= 3600
    past = email.utils.formatdate(time.time() - 3600, usegmt=True)
    assert retry_after(answer(past)) == 0.0


def test_failures_in_a_row_are_bounded(waits: list[float]) -> None:
    retries = Retrier(RetryPolicy(attempts=3, backoff=1.0, jitter=0.0))
    for _ in range(3):
        retries.failed("HTTP 503")
    with pytest.raises(RetriesExhausted, match="giving up after 4 attempts: HTTP 503") as err:
        retries.failed("HTTP 503")
    assert not err.value.spent
    assert waits == [1.0, 2.0, 4.0]


def test_progress_resets_the_count_and_retries_at_once(waits: list[float]) -> None:
    """A link that breaks after every stretch of progress never runs out of attempts, and does not wait."""
    retries = Retrier(RetryPolicy(attempts=2, backoff=1.0, jitter=0.0))
    for _ in range(50):
        retries.progressed()
        retries.failed("connection reset")
    assert waits == [0.0] * 50 and retries.total == 50
    retries.failed("connection reset")  # no progress since: back off again
    retries.failed("connection reset")
    with pytest.raises(RetriesExhausted):
        retries.failed("connection reset")
    assert waits[50:] == [1.0, 2.0]


def test_one_budget_for_the_whole_transfer(waits: list[float]) -> None:
    """Two operations of one transfer draw on one budget; progress does not renew it."""
    policy = RetryPolicy(attempts=100, backoff=1.0, max_backoff=1.0, jitter=0.0, budget=5.0)
    budget = RetryBudget(policy.budget)
    first, second = Retrier(policy, budget), Retrier(policy, budget)
    for _ in range(3):
        first.failed("HTTP 500")
    second.failed("HTTP 500")
    first.progressed()
    first.failed("HTTP 500")  # at once after progress: costs nothing
    second.failed("HTTP 500")
    with pytest.raises(RetriesExhausted, match=r"giving up: 5 s of retrying spent \(last: HTTP 500\)") as err:
        second.failed("HTTP 500")
    assert err.value.spent and sum(waits) == 5.0


def test_a_capped_retry_after_still_draws_on_the_budget(waits: list[float]) -> None:
    retries = Retrier(RetryPolicy(budget=200.0))
    retries.failed("HTTP 429", retry_after=1e9)
    with pytest.raises(RetriesExhausted, match="spent"):
        retries.failed("HTTP 429", retry_after=1e9)
    assert waits == [120.0]


def test_cancel_ends_a_wait(waits: list[float]) -> None:
    cancel = threading.Event()
    retries = Retrier(RetryPolicy(), cancel=cancel)
    retries.failed("stall")
    cancel.set()
    with pytest.raises(Cancelled):
        retries.failed("stall")
    with pytest.raises(Cancelled):
        retries.check()


def test_a_real_cancelled_wait_returns_when_the_event_is_set() -> None:
    """The one test that really waits: a 60 s backoff on a worker thread ends when its transfer is closed."""
    cancel = threading.Event()
    retries = Retrier(RetryPolicy(backoff=60.0, jitter=0.0), cancel=cancel)
    outcome: list[BaseException] = []

    def worker() -> None:
        try:
            retries.failed("stall")
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    cancel.set()
    thread.join(10)
    assert not thread.is_alive() and isinstance(outcome[0], Cancelled)


def test_what_is_transient() -> None:
    assert all(is_transient_status(s) for s in (408, 429, 500, 502, 503, 504))
    assert not any(is_transient_status(s) for s in (200, 206, 400, 401, 403, 404, 413, 416, 501, 505))
    request = httpx.Request("GET", "https://example.invalid/")
    assert is_transient_error(httpx.ReadTimeout("t", request=request))
    assert is_transient_error(httpx.ConnectError("refused", request=request))
    assert is_transient_error(httpx.RemoteProtocolError("cut", request=request))
    assert not is_transient_error(httpx.UnsupportedProtocol("ftp", request=request))
    assert not is_transient_error(httpx.LocalProtocolError("bad header"))


def _endless(_: httpx.Request) -> httpx.Response:
    def body() -> Iterator[bytes]:
        while True:
            yield b"x" * 65536

    return httpx.Response(200, content=body())


def test_bounded_reads_of_an_endless_body() -> None:
    with httpx.Client(transport=httpx.MockTransport(_endless)) as client:
        response = client.send(client.build_request("GET", "http://h/"), stream=True)
        body, more = read_bounded(response, 100_000)
        assert (len(body), more) == (100_000, True) and response.is_closed
        response = client.send(client.build_request("GET", "http://h/"), stream=True)
        with pytest.raises(BodyTooLarge, match="http://h/ answered with more than 200000 bytes"):
            read_capped(response, 200_000)
        assert response.is_closed


def test_capped_read_of_a_small_body_and_a_declared_size() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        data = b"{}" if request.url.path == "/small" else b"y" * 5000
        return httpx.Response(200, content=data)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        assert read_capped(client.send(client.build_request("GET", "http://h/small"), stream=True), 10) == b"{}"
        big = client.send(client.build_request("GET", "http://h/big?sig=secret"), stream=True)
        with pytest.raises(ValueError, match=r"^http://h/big answered with more than 4096 bytes$"):
            read_capped(big, 4096, ValueError)  # the declared length refuses it; the query is not quoted


def test_client_settings_in_one_place(tmp_path: object) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    assert f"diskport/{__version__}" == USER_AGENT
    with make_client(timeout=httpx.Timeout(5.0), transport=httpx.MockTransport(handler)) as client:
        client.get("http://h/")
        assert not client.follow_redirects and not client.trust_env
    assert seen[0].headers["User-Agent"] == USER_AGENT
    assert seen[0].headers["Accept-Encoding"] == "identity"
    assert tls_context(insecure=True) is False
    with pytest.raises(UsageError, match=r"--ca-bundle /nonexistent\.pem: cannot load it as PEM"):
        tls_context("/nonexistent.pem")
