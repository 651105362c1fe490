"""The one function that builds an ``httpx.Client`` for diskport, so that TLS, proxies, limits and the user
agent are decided once.

TLS: verified against the system's CAs (OpenSSL's default paths, which honour ``SSL_CERT_FILE`` and
``SSL_CERT_DIR``; certifi's bundle only when the system has none, as in a bare container) plus the PEM file of
``--ca-bundle``; ``--insecure`` turns verification off. Proxies: ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``
and ``NO_PROXY`` from the environment (httpx's ``trust_env``). Redirects are never followed by the client
itself: the callers follow them by hand, because they decide which headers may go to the new location.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from diskport.errors import UsageError
from diskport.version import __version__

USER_AGENT = f"diskport/{__version__}"


def tls_context(ca_bundle: str | None = None, insecure: bool = False) -> ssl.SSLContext | bool:
    """What httpx's ``verify`` gets: False with ``insecure``, else a context trusting the system's CAs and
    ``ca_bundle``. A bundle that cannot be loaded is a :class:`UsageError` naming it."""
    if insecure:
        return False
    context = ssl.create_default_context()
    if not context.cert_store_stats().get("x509_ca"):
        try:  # no system CA store (a minimal container): the bundle httpx would have used
            import certifi

            context.load_verify_locations(cafile=certifi.where())
        except (ImportError, OSError, ssl.SSLError):
            pass
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"--ca-bundle {ca_bundle}: cannot load it as PEM certificates ({e})") from None
    return context


def make_client(*, timeout: httpx.Timeout, ca_bundle: str | None = None, insecure: bool = False,
                max_connections: int = 8, max_keepalive: int = 8, auth: httpx.Auth | None = None,
                user_agent: str = USER_AGENT, transport: httpx.BaseTransport | None = None,
                event_hooks: Mapping[str, Sequence[Callable[..., Any]]] | None = None) -> httpx.Client:
    """An ``httpx.Client`` with diskport's settings (see the module docstring). ``transport`` replaces the
    network (``httpx.MockTransport`` in tests); proxies from the environment are then not looked at, since
    they would route around it."""
    return httpx.Client(
        verify=tls_context(ca_bundle, insecure), timeout=timeout, trust_env=transport is None,
        follow_redirects=False, auth=auth, transport=transport,
        headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive),
        event_hooks={k: list(v) for k, v in (event_hooks or {}).items()})
