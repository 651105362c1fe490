"""Registry credentials and authentication: where the user's credentials are, and how a registry gets them.

**Where credentials come from**, first found wins:

1. ``--creds USER:PASSWORD`` (the ``creds`` argument of :func:`resolve_credentials`);
2. the environment: ``DISKPORT_USERNAME`` and ``DISKPORT_PASSWORD`` (both set), for CI jobs that hold a secret;
3. auth files, in this order (a file named explicitly by an environment variable before the default places):
   ``$REGISTRY_AUTH_FILE`` (podman/skopeo's override), ``$DOCKER_CONFIG/config.json``,
   ``${XDG_RUNTIME_DIR}/containers/auth.json`` (where ``podman login`` writes), ``~/.docker/config.json`` (where
   ``docker login`` writes; skipped when ``$DOCKER_CONFIG`` is set, as docker does). The first file that has
   credentials for the registry wins. Inside one file: ``credHelpers[registry]`` (``docker-credential-<name>
   get``), then the ``auths`` entry (base64 ``auth`` = ``user:password``, or ``username``/``password``, or an
   ``identitytoken``; podman's ``registry/namespace`` keys match the most specific repository path), then the
   file's ``credsStore`` helper. A helper answering "credentials not found" means none; a ``credHelpers`` helper
   that is not installed is an error, a ``credsStore`` helper that is not installed is skipped (docker desktop
   configs carried into containers name one that is not there), with a log message.

Docker Hub's key is ``https://index.docker.io/v1/`` (docker) or ``docker.io`` (podman); both are looked up, and
a helper is asked for ``https://index.docker.io/v1/`` as docker asks it. Other registries are asked for by
``host[:port]``.

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

import base64
import binascii
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from diskport.errors import RegistryError, UsageError
from diskport.net import USER_AGENT, read_capped, retry_after
from diskport.oci.reference import DOCKER_HUB, DOCKER_HUB_ALIASES, LOOPBACK_HOSTS, Reference

log = logging.getLogger(__name__)

ENV_USERNAME = "DISKPORT_USERNAME"
ENV_PASSWORD = "DISKPORT_PASSWORD"
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
DEFAULT_TOKEN_LIFETIME = 60.0
HELPER_TIMEOUT = 30.0
MAX_TOKEN_RESPONSE = 1024 * 1024
CREDENTIALS_HINT = ("pass --creds USER:PASSWORD, set DISKPORT_USERNAME and DISKPORT_PASSWORD, or log in with "
                    "'docker login' / 'podman login' (config.json, auth.json)")
_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_CHALLENGE_ITEM = re.compile(r"""[\s,]*(?P<name>[!#$%&'*+.^_`|~0-9A-Za-z-]+)"""
                             r"""(?:\s*=\s*(?P<value>"(?:[^"\\]|\\.)*"|[^\s,"]*))?""")
_QUOTED_PAIR = re.compile(r"\\(.)")


# ---------------------------------------------------------------------------------------------------------
# Credentials and where they are found
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """A user name with a password or an identity (OAuth2 refresh) token; ``source`` says where they came from,
    for messages (``--creds``, ``the environment``, a file path)."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str | None = field(default=None, repr=False)
    source: str = ""

    @property
    def basic(self) -> str:
        """The ``Authorization: Basic`` value of the user and password."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def parse_creds(text: str, source: str = "--creds") -> Credentials:
    """``USER:PASSWORD`` (the password may contain colons); a :class:`UsageError` when it is not that."""
    username, sep, password = text.partition(":")
    if not sep or not username:
        raise UsageError(f"{source} expects USER:PASSWORD")
    return Credentials(username, password, None, source)


def auth_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The auth files looked at, in order (see the module docstring); they need not exist."""
    env = os.environ if environ is None else environ
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("DOCKER_CONFIG"):
        files.append(Path(env["DOCKER_CONFIG"]) / "config.json")
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    if not env.get("DOCKER_CONFIG"):
        home = env.get("HOME") or str(Path.home())
        files.append(Path(home) / ".docker" / "config.json")
    unique: list[Path] = []
    for path in files:
        if path not in unique:
            unique.append(path)
    return unique


def resolve_credentials(reference: Reference | str, *, creds: str | None = None,
                        environ: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials for the registry of ``reference`` (a :class:`Reference` or a registry name such as
    ``quay.io`` or ``127.0.0.1:5000``), from the first source that has some; None for anonymous access.

    ``environ`` (default ``os.environ``) supplies the variables, HOME and the PATH credential helpers are found on.
    """
    env = os.environ if environ is None else environ
    if creds is not None:
        return parse_creds(creds)
    if env.get(ENV_USERNAME) and ENV_PASSWORD in env:
        return Credentials(env[ENV_USERNAME], env[ENV_PASSWORD], None, f"${ENV_USERNAME}/${ENV_PASSWORD}")
    if isinstance(reference, Reference):
        registry, repository = reference.registry, reference.repository
    else:
        registry, repository = _normal_host(reference), ""
    for path in auth_files(env):
        found = _from_file(path, registry, repository, env)
        if found is not None:
            return found
    return None


def helper_server_url(registry: str) -> str:
    """What a credential helper is asked for: Docker Hub's historical index URL, else ``host[:port]``."""
    return DOCKER_HUB_KEY if registry == DOCKER_HUB else registry


def _normal_host(host: str) -> str:
    host = host.lower()
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def _key_parts(key: str) -> tuple[str, str]:
    """A config key (``https://index.docker.io/v1/``, ``quay.io``, ``quay.io/org``, ``http://h:5000``) as
    (registry, repository path prefix)."""
    text = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", key.strip())
    host, _, path = text.partition("/")
    path = path.strip("/")
    if path in ("v1", "v2"):
        path = ""
    return _normal_host(host), path


def _best_key(keys: Iterable[str], registry: str, repository: str) -> str | None:
    """The config key for this registry and repository, the most specific (longest path) first."""
    best: tuple[int, str] | None = None
    for key in keys:
        host, path = _key_parts(key)
        if host != registry:
            continue
        if path and not (repository == path or repository.startswith(path + "/")):
            continue
        if best is None or len(path) > best[0]:
            best = (len(path), key)
    return None if best is None else best[1]


def _load_config(path: Path) -> dict[str, object] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RegistryError(f"cannot read the auth file: {e.strerror}", path=str(path)) from None
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RegistryError(f"the auth file is not valid JSON ({e.msg} at line {e.lineno})", path=str(path),
                            hint="fix or remove it") from None
    if not isinstance(data, dict):
        raise RegistryError("the auth file is not a JSON object", path=str(path))
    return data


def _from_file(path: Path, registry: str, repository: str, env: Mapping[str, str]) -> Credentials | None:
    data = _load_config(path)
    if data is None:
        return None
    helpers = data.get("credHelpers")
    if isinstance(helpers, dict):
        key = _best_key(helpers, registry, repository)
        if key is not None and isinstance(helpers[key], str):
            found = run_credential_helper(helpers[key], helper_server_url(registry), env,
                                          where=f"credHelpers in {path}")
            if found is not None:
                return found
    auths = data.get("auths")
    if isinstance(auths, dict):
        candidates = {k: v for k, v in auths.items() if isinstance(v, dict) and _has_secret(v)}
        key = _best_key(candidates, registry, repository)
        if key is not None:
            return _decode_entry(candidates[key], f"{path} ({key})")
    store = data.get("credsStore")
    if isinstance(store, str) and store:
        try:
            return run_credential_helper(store, helper_server_url(registry), env, where=f"credsStore in {path}")
        except _HelperMissing as e:
            log.info("%s; skipping it", e)
    return None


def _has_secret(entry: dict[str, object]) -> bool:
    return bool(entry.get("auth") or entry.get("identitytoken") or entry.get("password"))


def _decode_entry(entry: dict[str, object], source: str) -> Credentials:
    username, password = entry.get("username"), entry.get("password")
    username = username if isinstance(username, str) else ""
    password = password if isinstance(password, str) else ""
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            raw = base64.b64decode(auth + "=" * (-len(auth) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise RegistryError("its 'auth' value is not base64 of USER:PASSWORD", path=source) from None
        username, sep, password = raw.partition(":")
        if not sep:
            raise RegistryError("its 'auth' value does not decode to USER:PASSWORD", path=source)
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials(username, "", token, source)
    return Credentials(username, password, None, source)


class _HelperMissing(RegistryError):
    pass


def run_credential_helper(name: str, server_url: str, environ: Mapping[str, str] | None = None, *,
                          where: str = "") -> Credentials | None:
    """``docker-credential-<name> get`` with ``server_url`` on stdin: its credentials, or None when it answers
    that it has none ("credentials not found"). A helper that is not installed or fails otherwise is a
    :class:`RegistryError`. ``<token>`` as the user name means the secret is an identity token."""
    env = dict(os.environ if environ is None else environ)
    if _HELPER_NAME.fullmatch(name) is None:
        raise RegistryError(f"credential helper name {name!r} is not valid" + (f" ({where})" if where else ""))
    program = f"docker-credential-{name}"
    exe = shutil.which(program, path=env.get("PATH", os.defpath))
    if exe is None:
        raise _HelperMissing(f"credential helper {program} is not installed" + (f" ({where})" if where else ""),
                             hint="install it or remove it from the auth file")
    try:
        proc = subprocess.run([exe, "get"], input=server_url, capture_output=True, text=True,
                              timeout=HELPER_TIMEOUT, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise RegistryError(f"credential helper {program} did not answer within {HELPER_TIMEOUT:.0f} s") from None
    except OSError as e:
        raise RegistryError(f"credential helper {program} could not run: {e.strerror}") from None
    if proc.returncode != 0:
        said = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
        message = said[0] if said else f"exit status {proc.returncode}"
        if "credentials not found" in message.lower():
            return None
        raise RegistryError(f"credential helper {program} failed for {server_url}: {message}")
    try:
        answer = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RegistryError(f"credential helper {program} did not answer JSON for {server_url}") from None
    username = answer.get("Username") if isinstance(answer, dict) else None
    secret = answer.get("Secret") if isinstance(answer, dict) else None
    if not isinstance(secret, str) or not secret:
        return None
    source = f"{program} ({where})" if where else program
    if username == "<token>":
        return Credentials("", "", secret, source)
    return Credentials(username if isinstance(username, str) else "", secret, None, source)


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
