"""The HTTP layer under :mod:`diskport.sources.http` and :mod:`diskport.oci`: one place for what every request
diskport sends has in common.

* :mod:`diskport.net.client` builds every ``httpx.Client``: user agent, connection limits, proxies from the
  environment, TLS from ``--ca-bundle`` / ``--insecure`` (or ``--tls-verify``), an optional transport (tests
  pass ``httpx.MockTransport``).
* :mod:`diskport.net.retry` is the one retry policy: which errors and statuses are transient, exponential
  backoff with jitter, ``Retry-After`` honoured up to a cap, failures in a row counted per operation and reset
  by progress, and one budget of waiting per transfer.
* :mod:`diskport.net.body` reads small answers (error texts, manifests, tokens) no further than a limit.

Nothing here knows about disks or registries; sources/ and oci/ build on it and never on each other.
"""

from diskport.net.body import BodyTooLarge, cap_body, read_bounded, read_capped
from diskport.net.client import USER_AGENT, make_client, tls_context
from diskport.net.retry import (
    Cancelled,
    Retrier,
    RetriesExhausted,
    RetryBudget,
    RetryPolicy,
    is_transient_error,
    is_transient_status,
    retry_after,
)

__all__ = [
    "USER_AGENT",
    "BodyTooLarge",
    "Cancelled",
    "Retrier",
    "RetriesExhausted",
    "RetryBudget",
    "RetryPolicy",
    "cap_body",
    "is_transient_error",
    "is_transient_status",
    "make_client",
    "read_bounded",
    "read_capped",
    "retry_after",
    "tls_context",
]
