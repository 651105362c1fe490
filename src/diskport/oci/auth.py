"""How a registry gets the user's credentials: the ``WWW-Authenticate`` challenge, Basic, and Bearer tokens.

Where the credentials come from (``--creds``, a pull secret, the environment, auth files, credential helpers)
is :mod:`diskport.oci.credentials`, a chain of providers; its names are re-exported here.

**How the registry gets them**: :class:`RegistryAuth`, an ``httpx.Auth`` (works on any ``httpx.Client``). A
request to the registry's own host goes out as it is until the registry answers 401; the challenge
(``WWW-Authenticate``, RFC 7235) is then answered and remembered, so later requests carry credentials from the
start: ``Basic`` sends the user and password; ``Bearer realm=,service=,scope=`` (distribution's token
authentication spec) fetches a token from the realm (GET with ``service`` and ``scope`` parameters and Basic
credentials, or the OAuth2 ``refresh_token`` POST for an identity token), accepting ``token`` or
``access_token`` and keeping it for its ``expires_in`` (60 s when absent) per set of scopes. A request answered
401 again (a token that expired during a long upload, or one lacking a scope the challenge names) gets one new
token and is sent again -- when its body can be sent again: bytes, or a :class:`ReplayableStream` (a body that
re-reads its file each time it is iterated). A one-shot stream is never replayed; the 401 goes back to the
caller. Credentials go only to the registry's own host (and port) and to the token realm, never over plain http
except to loopback, and never to another host a request is redirected to (blob storage): the auth never touches
those requests.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field

import httpx

from diskport.errors import RegistryError
from diskport.net import USER_AGENT, read_capped, retry_after
from diskport.oci.credentials import (
    CREDENTIALS_HINT,
    ENV_PASSWORD,
    ENV_USERNAME,
    Credentials,
    auth_files,
    parse_creds,
    resolve_credentials,
    run_credential_helper,
)
from diskport.oci.reference import LOOPBACK_HOSTS

__all__ = [
    "CREDENTIALS_HINT", "ENV_PASSWORD", "ENV_USERNAME", "Challenge", "Credentials", "RegistryAuth",
    "ReplayableStream", "TokenServerError", "auth_files", "parse_challenges", "parse_creds", "repository_scope",
    "resolve_credentials", "run_credential_helper",
]

DEFAULT_TOKEN_LIFETIME = 60.0
MAX_TOKEN_RESPONSE = 1024 * 1024
_CHALLENGE_ITEM = re.compile(r"""[\s,]*(?P<name>[!#$%&'*+.^_`|~0-9A-Za-z-]+)"""
                             r"""(?:\s*=\s*(?P<value>"(?:[^"\\]|\\.)*"|[^\s,"]*))?""")
_QUOTED_PAIR = re.compile(r"\\(.)")


# ---------------------------------------------------------------------------------------------------------
# Challenges and scopes
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Challenge:
    """One ``WWW-Authenticate`` challenge: the scheme (lowercase) and its parameters (names lowercase)."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(value: str) -> list[Challenge]:
    """Every challenge in a ``WWW-Authenticate`` value (RFC 7235 section 4.1: ``scheme param=value, ...``,
    values as tokens or quoted strings, several challenges separated by commas)."""
    challenges: list[Challenge] = []
    current: Challenge | None = None
    pos = 0
    while (m := _CHALLENGE_ITEM.match(value, pos)) is not None:
        pos = m.end()
        name, raw = m.group("name").lower(), m.group("value")
        if raw is None:  # a bare token starts a challenge
            current = Challenge(name)
            challenges.append(current)
        elif current is not None:
            current.params[name] = _QUOTED_PAIR.sub(r"\1", raw[1:-1]) if raw.startswith('"') else raw
    return challenges


def repository_scope(repository: str, *actions: str) -> str:
    """``repository:<name>:<actions>``, the scope a token request names (``pull``, ``push``)."""
    return f"repository:{repository}:{','.join(actions)}"


def _parse_scope(scope: str) -> tuple[str, str, set[str]] | None:
    head, sep, actions = scope.rpartition(":")
    kind, sep2, name = head.partition(":")
    if not sep or not sep2 or not kind or not name:
        return None
    return kind, name, {a for a in actions.split(",") if a}


# ---------------------------------------------------------------------------------------------------------
# The httpx.Auth
# ---------------------------------------------------------------------------------------------------------

class ReplayableStream(httpx.SyncByteStream):
    """A request body that can be iterated again from its start (each iteration re-reads its source), so a
    request carrying it may be sent again after a 401. Subclasses implement ``__iter__``."""


class TokenServerError(RegistryError):
    """The token server failed in a way worth retrying (5xx, 429); ``retry_after`` in seconds when it said."""

    def __init__(self, message: str, *, retry_after: float | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


@dataclass
class _Token:
    value: str
    expires_at: float      # time.monotonic()
    lifetime: float

    def fresh(self, now: float) -> bool:
        return now < self.expires_at - min(10.0, self.lifetime * 0.1)


def _default_port(scheme: str) -> int | None:
    return {"https": 443, "http": 80}.get(scheme)


def _replayable(request: httpx.Request) -> bool:
    return isinstance(request.stream, httpx.ByteStream | ReplayableStream)


class RegistryAuth(httpx.Auth):
    """Authentication for one registry host, as an ``httpx.Auth`` usable on any (synchronous) ``httpx.Client``.

    ``endpoint`` is the ``host[:port]`` requests go to (``registry-1.docker.io``, ``127.0.0.1:5000``); ``name``
    names the registry in messages (``docker.io``). ``scopes`` are the token scopes asked for (more can be
    added with :meth:`add_scopes`; a challenge naming another scope adds it too). Thread-safe: one instance
    may serve several clients and threads. ``token_fetches`` counts the tokens fetched.
    """

    requires_request_body = False
    requires_response_body = False

    def __init__(self, endpoint: str, credentials: Credentials | None = None, *, name: str | None = None,
                 scopes: Iterable[str] = (), user_agent: str | None = None) -> None:
        url = httpx.URL(f"https://{endpoint}")
        self._host = url.host.lower()
        self._port = url.port  # None: the scheme's default port
        self.name = name or endpoint
        self.credentials = credentials
        self.user_agent = user_agent or USER_AGENT
        self._lock = threading.Lock()
        self._scheme: str | None = None
        self._realm: str | None = None
        self._service: str | None = None
        self._scopes: dict[tuple[str, str], set[str]] = {}
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._refresh_token = credentials.identity_token if credentials else None
        self.token_fetches = 0
        self.add_scopes(*scopes)

    # -- what is asked for -------------------------------------------------------------------------------
    def add_scopes(self, *scopes: str) -> None:
        """Ask for these scopes too (``repository:name:pull,push``); actions on the same resource merge."""
        with self._lock:
            for scope in scopes:
                for one in scope.split():
                    parsed = _parse_scope(one)
                    if parsed is not None:
                        kind, name, actions = parsed
                        self._scopes.setdefault((kind, name), set()).update(actions)

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes a token is asked for, sorted (actions sorted too): the token cache's key."""
        with self._lock:
            return self._scope_key()

    def _scope_key(self) -> tuple[str, ...]:
        return tuple(sorted(f"{kind}:{name}:{','.join(sorted(actions))}"
                            for (kind, name), actions in self._scopes.items()))

    @property
    def scheme(self) -> str | None:
        """``basic`` or ``bearer`` once the registry has challenged, else None."""
        return self._scheme

    def covers(self, url: httpx.URL) -> bool:
        """Whether a request to ``url`` may carry this registry's credentials: the registry's own host and port,
        over https (plain http only to loopback)."""
        if url.host.lower() != self._host:
            return False
        port = url.port or _default_port(url.scheme)
        if self._port is not None and port != self._port:
            return False
        if self._port is None and port != _default_port(url.scheme):
            return False
        return url.scheme == "https" or (url.scheme == "http" and self._host in LOOPBACK_HOSTS)

    def invalidate(self) -> None:
        """Forget every cached token (the next request fetches a new one)."""
        with self._lock:
            self._tokens.clear()

    # -- the flow ----------------------------------------------------------------------------------------
    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not self.covers(request.url):
            yield request  # another host (a redirect to storage): never credentials
            return
        yield from self._authorize(request, stale=None)
        response = yield request
        if response.status_code != 401:
            return
        sent = request.headers.get("Authorization")
        challenge = self._learn(response)
        if challenge is None or not _replayable(request):
            return  # a one-shot body cannot go again: the caller sees the 401 (and may start over)
        if challenge.scheme == "basic" and (self.credentials is None or not self.credentials.username
                                            or sent == self.credentials.basic):
            return  # nothing (else) to offer
        # Bearer: a first answer, an expired token (a long upload), a scope the token lacks: one new token.
        yield from self._authorize(request, stale=sent)
        yield request

    def _learn(self, response: httpx.Response) -> Challenge | None:
        """Remember what the 401 asks for (a Bearer challenge is preferred over Basic); the chosen challenge."""
        challenges = [c for value in response.headers.get_list("www-authenticate") for c in parse_challenges(value)]
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.params.get("realm")), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        with self._lock:
            if bearer is not None:
                self._scheme = "bearer"
                self._realm = bearer.params["realm"]
                self._service = bearer.params.get("service")
            elif basic is not None:
                self._scheme = "basic"
        if bearer is not None and bearer.params.get("scope"):
            self.add_scopes(bearer.params["scope"])
        return bearer or basic

    def _authorize(self, request: httpx.Request, stale: str | None) -> Generator[httpx.Request, httpx.Response, None]:
        """Put the credentials the registry wants on ``request``, fetching a token first when needed (a token
        equal to ``stale`` was just refused and is dropped)."""
        with self._lock:
            scheme = self._scheme
        if scheme is None:
            return
        if scheme == "basic":
            if self.credentials is not None and self.credentials.username:
                request.headers["Authorization"] = self.credentials.basic
            return
        with self._lock:
            key = self._scope_key()
            token = self._tokens.get(key)
            if token is not None and (f"Bearer {token.value}" == stale or not token.fresh(time.monotonic())):
                del self._tokens[key]
                token = None
        value = token.value if token is not None else (yield from self._fetch_token(key))
        request.headers["Authorization"] = f"Bearer {value}"

    def _fetch_token(self, scopes: tuple[str, ...]) -> Generator[httpx.Request, httpx.Response, str]:
        with self._lock:
            realm, service, refresh = self._realm, self._service, self._refresh_token
        assert realm is not None
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            raise RegistryError(f"{self.name}: the token realm {realm!r} is not a URL") from None
        if url.scheme not in ("http", "https"):
            raise RegistryError(f"{self.name}: the token realm {realm!r} is not an http(s) URL")
        creds = self.credentials
        if creds is not None and url.scheme == "http" and url.host.lower() not in LOOPBACK_HOSTS:
            raise RegistryError(f"{self.name}: refusing to send credentials to the token server {realm} over "
                                "plain http")
        headers = {"User-Agent": self.user_agent, "Accept": "application/json"}
        if refresh:  # OAuth2 refresh-token grant (distribution's token spec, oauth.md)
            form = {"grant_type": "refresh_token", "refresh_token": refresh, "client_id": "diskport",
                    "scope": " ".join(scopes)}
            if service:
                form["service"] = service
            request = httpx.Request("POST", url, headers=headers, data=form)
        else:
            params: list[tuple[str, str]] = [("service", service)] if service else []
            params += [("scope", s) for s in scopes]
            if creds is not None and creds.username:
                params.append(("account", creds.username))
                headers["Authorization"] = creds.basic
            request = httpx.Request("GET", url.copy_merge_params(tuple(params)), headers=headers)
        started = time.monotonic()
        response = yield request
        body = read_capped(response, MAX_TOKEN_RESPONSE, RegistryError)
        status = response.status_code
        if status in (401, 403):
            who = f"the credentials from {creds.source}" if creds is not None else "an anonymous token request"
            raise RegistryError(f"authentication failed for {self.name}: the token server {url.copy_with(query=None)} "
                                f"refused {who} (HTTP {status})", hint=CREDENTIALS_HINT)
        if status == 429 or status >= 500:
            raise TokenServerError(f"{self.name}: the token server {url.copy_with(query=None)} answered HTTP "
                                   f"{status}", retry_after=retry_after(response))
        if status != 200:
            raise RegistryError(f"{self.name}: the token server {url.copy_with(query=None)} answered HTTP {status}")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            answer = {}
        token = answer.get("token") or answer.get("access_token")  # the second is OAuth2's name for it
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.name}: the token server {url.copy_with(query=None)} answered no token")
        lifetime = answer.get("expires_in")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        new_refresh = answer.get("refresh_token")
        with self._lock:
            self.token_fetches += 1
            self._tokens[scopes] = _Token(token, started + float(lifetime), float(lifetime))
            if refresh and isinstance(new_refresh, str) and new_refresh:
                self._refresh_token = new_refresh
        return token
