"""Real container registries on loopback for the registry tests, as pytest fixtures and context managers.

* ``registry``: Debian's ``docker-registry`` (distribution 2.8), plain http, no auth, filesystem storage in the
  test's tmp folder, deletes enabled, absolute ``Location`` headers.
* ``tls_registry``: the same over TLS with a certificate from the session test CA (``tls_pki``) and htpasswd
  (bcrypt) Basic auth; ``.username`` / ``.password`` / ``.ca_bundle``.
* ``token_server`` + ``token_registry``: distribution's token authentication (``auth.token``: realm, service,
  issuer, rootcertbundle) with our own token server (:class:`TokenServer`, ``http.server`` in a thread) issuing
  ES256 JWTs. distribution 2.8 finds the signing key from the JWT header in three ways: an ``x5c`` certificate
  chain verified against ``rootcertbundle`` (used by default), a ``jwk``, or a ``kid`` equal to the libtrust key
  id of a key in ``rootcertbundle`` (``TokenServer.header_mode = "kid"``); both tested modes work. It checks Basic
  credentials (or an OAuth2 refresh token), grants the requested scopes, counts what it issued (``.issued``) and
  has a configurable lifetime. distribution accepts a token up to 60 s past its ``exp`` (clock leeway), so the
  server writes ``exp = now + lifetime - 60``: the registry really refuses it after ``lifetime`` seconds, while
  the client is told ``expires_in`` (default the lifetime; a longer one makes the client keep an expired token).
* ``registry_proxy`` / ``make_fault_proxy``: :class:`RegistryFaultProxy`, a reverse proxy of our own in front of a
  registry, that misbehaves by :class:`Rule`: answer a status (413 for large bodies, 401 as if a token expired,
  5xx/429 with Retry-After), break the connection in the middle of a request body (optionally after passing the
  partial body on, so the registry keeps a partial upload), redirect (blob GETs to another host). Every request
  is recorded (:class:`ProxyRecord`: method, path, headers, declared and received body bytes, what was done).
  ``registry_proxy`` fronts its own registry configured with *relative* Location headers.

Readiness is polled on ``/v2/``; every process and thread is stopped and reaped at teardown; the registry's log
(``.log_path``) stays in the test's tmp folder and its tail is added to the report of a failed test. A missing
``docker-registry`` or ``htpasswd`` fails the test (``require_tool``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.client
import json
import re
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.support.clients import require_tool, run
from tests.support.servers import (
    LOOPBACK,
    MAX_WAIT,
    RequestRecord,
    StartStop,
    TestPki,
    _RecordingHandler,
    _ThreadedServer,
    free_port,
)

REGISTRY_BINARY = "docker-registry"
TOKEN_USER, TOKEN_PASSWORD = "alice", "s3cret-token"  # the token server's one user, unless told otherwise
TOKEN_LEEWAY = 60                 # seconds distribution 2.8 accepts a token past its exp (and before its nbf)
CHUNK = 64 * 1024
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
               "te", "trailer", "transfer-encoding", "upgrade"}
_SERVERS = pytest.StashKey[list["RegistryServer"]]()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# ---------------------------------------------------------------------------------------------------------
# Token signing
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenSigner:
    """An EC P-256 key and its self-signed certificate (``cert_path``: the registry's ``rootcertbundle``)."""

    key: ec.EllipticCurvePrivateKey
    cert_der: bytes
    cert_path: Path

    @property
    def key_id(self) -> str:
        """The libtrust key id of the public key: SHA-256 of its DER SubjectPublicKeyInfo, first 240 bits, base32,
        in 12 groups of 4 joined by ``:``; what distribution matches a JWT ``kid`` against."""
        spki = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        text = base64.b32encode(hashlib.sha256(spki).digest()[:30]).decode("ascii").rstrip("=")
        return ":".join(text[i:i + 4] for i in range(0, len(text), 4))

    def sign(self, claims: dict[str, Any], header_mode: str = "x5c") -> str:
        """A compact JWS (ES256) of ``claims``; the header names the key by ``x5c`` chain or by ``kid``."""
        header: dict[str, Any] = {"typ": "JWT", "alg": "ES256"}
        if header_mode == "x5c":
            header["x5c"] = [base64.b64encode(self.cert_der).decode("ascii")]
        else:
            header["kid"] = self.key_id
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        r, s = decode_dss_signature(self.key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def make_token_signer(folder: Path) -> TokenSigner:
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "diskport test token signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = folder / "token-signer.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TokenSigner(key, cert.public_bytes(serialization.Encoding.DER), path)


# ---------------------------------------------------------------------------------------------------------
# The token server
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Issued:
    """One token the server issued: to whom, for which requested scopes, granting what, when (monotonic)."""

    user: str
    scopes: list[str]
    access: list[dict[str, Any]]
    at: float
    grant: str  # "basic", "anonymous", "refresh_token", "password"


class _TokenHandler(_RecordingHandler):
    @property
    def token_server(self) -> TokenServer:
        return cast(TokenServer, self.owner)

    def _answer(self, status: int, body: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.write_body(data)

    def do_GET(self) -> None:
        srv = self.token_server
        url = urlsplit(self.path)
        if url.path != "/token":
            self._answer(404, {"error": "not found"})
            return
        if (status := srv.next_status()) is not None:
            self._answer(status, {"error": f"injected {status}"}, (("Retry-After", "0"),))
            return
        query = parse_qs(url.query)
        user, grant = "", "anonymous"
        authorization = self.headers.get("Authorization", "")
        if authorization.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            if srv.users.get(user) != password or not user:
                srv.count_refusal()
                self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                             (("WWW-Authenticate", 'Basic realm="token"'),))
                return
            grant = "basic"
        elif not srv.anonymous:
            srv.count_refusal()
            self._answer(401, {"error": "credentials required"}, (("WWW-Authenticate", 'Basic realm="token"'),))
            return
        self._issue(user, grant, query.get("service", [""])[0], query.get("scope", []))

    def do_POST(self) -> None:
        srv = self.token_server
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        if urlsplit(self.path).path != "/token":
            self._answer(404, {"error": "not found"})
            return
        grant_type = form.get("grant_type", [""])[0]
        if grant_type == "refresh_token":
            user = srv.refresh_tokens.get(form.get("refresh_token", [""])[0], "")
        elif grant_type == "password":
            user = form.get("username", [""])[0]
            if srv.users.get(user) != form.get("password", [None])[0]:
                user = ""
        else:
            user = ""
        if not user:
            srv.count_refusal()
            self._answer(401, {"error": "invalid_grant"})
            return
        scopes = " ".join(form.get("scope", [])).split()
        self._issue(user, grant_type, form.get("service", [""])[0], scopes)

    def _issue(self, user: str, grant: str, service: str, scopes: list[str]) -> None:
        srv = self.token_server
        if service != srv.service:
            self._answer(400, {"error": f"unknown service {service!r}"})
            return
        access = [entry for scope in scopes if (entry := srv.grant(user, scope)) is not None]
        now = int(time.time())
        claims = {"iss": srv.issuer, "sub": user, "aud": srv.service, "exp": now + int(srv.lifetime) - TOKEN_LEEWAY,
                  "nbf": now, "iat": now, "jti": secrets.token_hex(12), "access": access}
        token = srv.signer.sign(claims, srv.header_mode)
        body: dict[str, Any] = {"issued_at": datetime.datetime.now(datetime.UTC).isoformat()}
        if srv.token_field in ("token", "both"):
            body["token"] = token
        if srv.token_field in ("access_token", "both"):
            body["access_token"] = token
        expires_in = srv.expires_in if srv.expires_in is not None else srv.lifetime
        if expires_in > 0:
            body["expires_in"] = expires_in
        srv.record_issue(Issued(user, list(scopes), access, time.monotonic(), grant))
        self._answer(200, body)


class TokenServer(_ThreadedServer):
    """A token server of distribution's token authentication spec at ``.realm`` (``/token``).

    ``users`` (name -> password) are checked on Basic credentials (wrong ones: 401); no credentials get an
    anonymous token (granting nothing) when ``anonymous``; ``refresh_tokens`` (token -> user) serve the OAuth2
    POST. Every requested ``repository:<name>:<actions>`` scope is granted to a known user (``denied_actions``
    are withheld). ``lifetime``: seconds the registry accepts a token; ``expires_in``: what the client is told
    (None: the lifetime). ``token_field``: ``token``, ``access_token`` or ``both``. ``status_sequence``: statuses
    answered to the first GETs (with Retry-After: 0). ``.issued`` lists the tokens issued; ``.refusals`` counts 401s.
    """

    def __init__(self, signer: TokenSigner, *, service: str = "diskport-test-registry",
                 issuer: str = "diskport-test-token-server", users: dict[str, str] | None = None) -> None:
        self.signer = signer
        self.service = service
        self.issuer = issuer
        self.users = dict(users if users is not None else {TOKEN_USER: TOKEN_PASSWORD})
        self.refresh_tokens: dict[str, str] = {}
        self.anonymous = True
        self.denied_actions: set[str] = set()
        self.lifetime = 300.0
        self.expires_in: float | None = None
        self.token_field = "token"
        self.header_mode = "x5c"
        self.status_sequence: list[int] = []
        self._lock = threading.Lock()
        self._issued: list[Issued] = []
        self.refusals = 0
        super().__init__(_TokenHandler)

    @property
    def realm(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/token"

    @property
    def issued(self) -> list[Issued]:
        with self._lock:
            return list(self._issued)

    def record_issue(self, issued: Issued) -> None:
        with self._lock:
            self._issued.append(issued)

    def count_refusal(self) -> None:
        with self._lock:
            self.refusals += 1

    def next_status(self) -> int | None:
        with self._lock:
            return self.status_sequence.pop(0) if self.status_sequence else None

    def grant(self, user: str, scope: str) -> dict[str, Any] | None:
        head, _, actions = scope.rpartition(":")
        kind, _, name = head.partition(":")
        if kind != "repository" or not name or not user:
            return None
        allowed = [a for a in actions.split(",") if a and a not in self.denied_actions]
        return {"type": kind, "name": name, "actions": allowed}


# ---------------------------------------------------------------------------------------------------------
# docker-registry
# ---------------------------------------------------------------------------------------------------------

class RegistryServer(StartStop):
    """``docker-registry serve CONFIG`` on 127.0.0.1:<free port>, storage and log in ``prefix``.

    ``tls``: serve https with the test CA's server certificate. ``users``: htpasswd (bcrypt) Basic auth.
    ``token``: distribution's token auth against that :class:`TokenServer`. ``relative_urls``: relative
    ``Location`` headers. ``.name`` is ``127.0.0.1:PORT`` (for references), ``.url`` the base URL.
    """

    def __init__(self, prefix: Path, *, tls: TestPki | None = None, users: dict[str, str] | None = None,
                 token: TokenServer | None = None, relative_urls: bool = False, label: str = "docker-registry") -> None:
        self.prefix = prefix
        self.tls = tls
        self.users = dict(users or {})
        self.token = token
        self.relative_urls = relative_urls
        self.label = label
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.storage = prefix / "storage"
        self.log_path = prefix / "registry.log"

    @property
    def name(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.name}"

    @property
    def ca_bundle(self) -> Path | None:
        return self.tls.ca_cert if self.tls else None

    @property
    def username(self) -> str:
        return next(iter(self.users)) if self.users else ""

    @property
    def password(self) -> str:
        return self.users[self.username] if self.users else ""

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def _config(self) -> dict[str, Any]:
        http_section: dict[str, Any] = {"addr": f"{LOOPBACK}:{self.port}", "secret": secrets.token_hex(16),
                                        "relativeurls": self.relative_urls}
        if self.tls is not None:
            http_section["tls"] = {"certificate": str(self.tls.server_cert), "key": str(self.tls.server_key)}
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": http_section,
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.users:
            htpasswd = require_tool("htpasswd")
            lines = [run(htpasswd, "-Bbn", user, password).stdout.strip() for user, password in self.users.items()]
            path = self.prefix / "htpasswd"
            path.write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "diskport-test", "path": str(path)}}
        elif self.token is not None:
            config["auth"] = {"token": {"realm": self.token.realm, "service": self.token.service,
                                        "issuer": self.token.issuer,
                                        "rootcertbundle": str(self.token.signer.cert_path)}}
        return config

    def _ready(self) -> bool:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(LOOPBACK, self.port, timeout=1.0, context=context) if context
            else http.client.HTTPConnection(LOOPBACK, self.port, timeout=1.0))
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status in (200, 401)
        except OSError:
            return False
        finally:
            conn.close()

    def start(self) -> None:
        binary = require_tool(REGISTRY_BINARY)
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        for _ in range(3):  # the free port may be taken before the registry binds it: pick another
            self.port = free_port()
            config = self.prefix / "config.yml"
            config.write_text(json.dumps(self._config(), indent=1))  # JSON is YAML
            with open(self.log_path, "ab") as logfile:
                self.proc = subprocess.Popen([binary, "serve", str(config)], stdin=subprocess.DEVNULL,
                                             stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + MAX_WAIT
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._ready():
                    return
                time.sleep(0.02)
            self.stop()
            if "address already in use" not in self.log():
                pytest.fail(f"{REGISTRY_BINARY} did not start within {MAX_WAIT:.0f} s:\n{self.log_tail()}",
                            pytrace=False)
        pytest.fail(f"{REGISTRY_BINARY} could not bind a free port:\n{self.log_tail()}", pytrace=False)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(MAX_WAIT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(MAX_WAIT)


# ---------------------------------------------------------------------------------------------------------
# The fault-injecting reverse proxy
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Rule:
    """One misbehaviour of :class:`RegistryFaultProxy`. A request matches when ``method`` (a regex, fullmatch),
    ``path`` (a regex searched in path and query), ``min_body`` (declared body bytes at least this) and
    ``authorized`` (only requests carrying Authorization, as a registry redirects only those) all do; the
    first ``skip`` matching requests pass, the next ``times`` (None: all) get the action:

    * ``status``: read the whole body, then answer it (with ``retry_after`` as Retry-After; a 401 carries
      ``challenge`` as WWW-Authenticate, by default the last challenge the registry sent, with
      ``error="invalid_token"``, as a registry says of an expired token);
    * ``reset_after``: read that many body bytes, then break the connection (RST); with ``forward_partial``
      those bytes go to the registry first, in a request that breaks off the same way;
    * ``redirect``: answer 307 to this URL;
    * none of those: forward it, setting ``response_headers`` on the registry's answer (replacing its own).
    """

    method: str | None = None
    path: str | None = None
    min_body: int | None = None
    authorized: bool = False
    skip: int = 0
    times: int | None = 1
    status: int | None = None
    retry_after: str | None = None
    challenge: str | None = None
    reset_after: int | None = None
    forward_partial: bool = False
    redirect: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    matched: int = 0
    fired: int = 0

    def matches(self, method: str, path: str, declared: int, authorization: str | None) -> bool:
        if self.authorized and not authorization:
            return False
        if self.method is not None and re.fullmatch(self.method, method) is None:
            return False
        if self.path is not None and re.search(self.path, path) is None:
            return False
        return self.min_body is None or declared >= self.min_body


@dataclass
class ProxyRecord(RequestRecord):
    """A request as the proxy saw it: ``declared`` (Content-Length, None for none), ``received`` body bytes read
    from the client, ``action`` (``forwarded``, ``status``, ``reset``, ``redirect``), ``upstream_status``."""

    declared: int | None = None
    received: int = 0
    action: str = ""
    upstream_status: int | None = None

    @property
    def content_range(self) -> tuple[int, int] | None:
        value = self.header("Content-Range")
        m = re.fullmatch(r"(?:bytes[ =])?(\d+)-(\d+)(?:/\S+)?", value.strip()) if value else None
        return (int(m.group(1)), int(m.group(2))) if m else None


class _ProxyHandler(_RecordingHandler):
    record: ProxyRecord | None = None

    @property
    def proxy(self) -> RegistryFaultProxy:
        return cast(RegistryFaultProxy, self.owner)

    def parse_request(self) -> bool:
        ok = BaseHTTPRequestHandler.parse_request(self)  # not _RecordingHandler's: the record is a ProxyRecord
        if ok:
            length = self.headers.get("Content-Length")
            self.record = ProxyRecord(method=self.command, path=self.path, host=self.headers.get("Host", ""),
                                      headers=list(self.headers.items()),
                                      declared=int(length) if length and length.isdigit() else None)
            self.owner.recorder.add(self.record)
        return ok

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    # -- body --------------------------------------------------------------------------------------------------
    def _read_body(self, limit: int | None = None) -> bytes:
        """The request body (Content-Length or chunked), at most ``limit`` bytes of it."""
        out = bytearray()
        record = self.record
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while limit is None or len(out) < limit:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                out += self.rfile.read(size)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            if limit is not None:
                remaining = min(remaining, limit)
            while remaining > 0:
                data = self.rfile.read(min(CHUNK, remaining))
                if not data:
                    break
                out += data
                remaining -= len(data)
        if limit is not None:
            del out[limit:]
        if record is not None:
            record.received = len(out)
        return bytes(out)

    def _reset(self) -> None:
        """Break the connection with a RST, whatever the client is sending."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_abruptly()

    # -- actions -------------------------------------------------------------------------------------------
    def _handle(self) -> None:
        proxy = self.proxy
        record = self.record
        declared = record.declared if record is not None and record.declared is not None else 0
        rule = proxy.pick(self.command, self.path, declared, self.headers.get("Authorization"))
        if rule is not None and rule.reset_after is not None:
            partial = self._read_body(rule.reset_after)
            if rule.forward_partial:
                proxy.forward_partial(self.command, self.path, list(self.headers.items()), partial)
            if record is not None:
                record.action = "reset"
            self._reset()
            return
        body = self._read_body()
        if rule is not None and rule.status is not None:
            if record is not None:
                record.action = "status"
            headers = []
            if rule.retry_after is not None:
                headers.append(("Retry-After", rule.retry_after))
            if rule.status == 401:
                challenge = rule.challenge or proxy.expired_challenge()
                if challenge:
                    headers.append(("WWW-Authenticate", challenge))
            error = {"errors": [{"code": "UNAUTHORIZED" if rule.status == 401 else "UNAVAILABLE",
                                 "message": f"injected by the test proxy ({rule.status})"}]}
            self._reply(rule.status, headers, json.dumps(error).encode())
            return
        if rule is not None and rule.redirect is not None:
            if record is not None:
                record.action = "redirect"
            self._reply(307, [("Location", rule.redirect)], b"")
            return
        if record is not None:
            record.action = "forwarded"
        self._forward(body, rule.response_headers if rule is not None else {})

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.write_body(body)

    def _forward(self, body: bytes, extra: dict[str, str]) -> None:
        proxy = self.proxy
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["X-Forwarded-Proto"] = "http"
        headers["Content-Length"] = str(len(body))
        if self.command in ("GET", "HEAD", "DELETE") and not body:
            headers.pop("Content-Length")
        conn = proxy.upstream_connection()
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
        except OSError:
            conn.close()
            self._reply(502, [], b"")
            return
        try:
            if self.record is not None:
                self.record.upstream_status = response.status
            if response.status == 401 and response.getheader("WWW-Authenticate"):
                proxy.last_challenge = response.getheader("WWW-Authenticate")
            self.send_response(response.status, response.reason)
            replaced = {k.lower() for k in extra}
            for k, v in response.getheaders():
                if k.lower() not in _HOP_BY_HOP and k.lower() not in replaced:
                    self.send_header(k, v)
            for k, v in extra.items():
                self.send_header(k, v)
            data = b"" if self.command == "HEAD" else response.read()
            if response.getheader("Content-Length") is None and self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.write_body(data)
        finally:
            conn.close()


class RegistryFaultProxy(_ThreadedServer):
    """A reverse proxy on 127.0.0.1:<free port> in front of ``upstream`` (a :class:`RegistryServer`), misbehaving
    as its ``rules`` say (first matching rule with turns left acts). ``.name`` is ``127.0.0.1:PORT`` for image
    references; the registry sees the proxy's Host (and ``X-Forwarded-Proto: http``), so its absolute Locations
    point back through the proxy. ``.requests`` are :class:`ProxyRecord` objects.
    """

    def __init__(self, upstream: RegistryServer, rules: list[Rule] | None = None) -> None:
        self.upstream = upstream
        self.rules: list[Rule] = list(rules or [])
        self.last_challenge: str | None = None
        self._rules_lock = threading.Lock()
        super().__init__(_ProxyHandler)

    @property
    def name(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def records(self) -> list[ProxyRecord]:
        return cast(list[ProxyRecord], self.requests)

    def add(self, rule: Rule) -> Rule:
        with self._rules_lock:
            self.rules.append(rule)
        return rule

    def pick(self, method: str, path: str, declared: int, authorization: str | None) -> Rule | None:
        with self._rules_lock:
            for rule in self.rules:
                if not rule.matches(method, path, declared, authorization):
                    continue
                rule.matched += 1
                if rule.matched <= rule.skip or (rule.times is not None and rule.fired >= rule.times):
                    continue
                rule.fired += 1
                return rule
        return None

    def expired_challenge(self) -> str | None:
        challenge = self.last_challenge
        if challenge is None:
            return None
        challenge = re.sub(r',\s*error="[^"]*"', "", challenge)
        return challenge + ',error="invalid_token"' if challenge.lower().startswith("bearer") else challenge

    def upstream_connection(self) -> http.client.HTTPConnection:
        up = self.upstream
        if up.tls is not None:
            context = ssl.create_default_context(cafile=str(up.tls.ca_cert))
            return http.client.HTTPSConnection(LOOPBACK, up.port, timeout=MAX_WAIT * 6, context=context)
        return http.client.HTTPConnection(LOOPBACK, up.port, timeout=MAX_WAIT * 6)

    def forward_partial(self, method: str, path: str, headers: list[tuple[str, str]], partial: bytes) -> None:
        """Send the request upstream with its declared length but only ``partial`` bytes of body, then break that
        connection too: the registry sees the same broken body the client's network would have given it."""
        conn = self.upstream_connection()
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                if k.lower() not in _HOP_BY_HOP:
                    conn.putheader(k, v)
            conn.putheader("X-Forwarded-Proto", "http")
            conn.endheaders()
            conn.send(partial)
            time.sleep(0.2)  # let the registry read (and store) what arrived before the connection breaks
            if conn.sock is not None:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------------------------
# Fixtures and the failure report
# ---------------------------------------------------------------------------------------------------------

def _track(request: pytest.FixtureRequest, server: RegistryServer) -> None:
    request.node.stash.setdefault(_SERVERS, []).append(server)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for server in item.stash.get(_SERVERS, []):
            report.sections.append((f"{server.label} {server.name} log (tail; whole: {server.log_path})",
                                    server.log_tail()))
    return report


@pytest.fixture(scope="session")
def token_signer(tmp_path_factory: pytest.TempPathFactory) -> TokenSigner:
    return make_token_signer(tmp_path_factory.mktemp("token-signer"))


@pytest.fixture
def registry(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RegistryServer]:
    """docker-registry over plain http, no authentication, absolute Location headers."""
    with RegistryServer(tmp_path / "registry", label="registry") as server:
        _track(request, server)
        yield server


@pytest.fixture
def tls_registry(tmp_path: Path, tls_pki: TestPki, request: pytest.FixtureRequest) -> Iterator[RegistryServer]:
    """docker-registry over TLS (test CA: ``.ca_bundle``) with htpasswd auth for ``.username``/``.password``."""
    with RegistryServer(tmp_path / "tls-registry", tls=tls_pki, users={"bob": "htpasswd-s3cret"},
                        label="tls_registry") as server:
        _track(request, server)
        yield server


@pytest.fixture
def token_server(token_signer: TokenSigner) -> Iterator[TokenServer]:
    with TokenServer(token_signer) as server:
        yield server


@pytest.fixture
def token_registry(tmp_path: Path, token_server: TokenServer,
                   request: pytest.FixtureRequest) -> Iterator[RegistryServer]:
    """docker-registry over plain http with token auth from ``token_server`` (``.token``; user ``alice``)."""
    with RegistryServer(tmp_path / "token-registry", token=token_server, label="token_registry") as server:
        _track(request, server)
        yield server


@pytest.fixture
def make_fault_proxy() -> Iterator[Callable[[RegistryServer], RegistryFaultProxy]]:
    """A factory: ``make_fault_proxy(registry)`` starts a :class:`RegistryFaultProxy` in front of it."""
    proxies: list[RegistryFaultProxy] = []

    def make(upstream: RegistryServer) -> RegistryFaultProxy:
        proxy = RegistryFaultProxy(upstream)
        proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def registry_proxy(tmp_path: Path, request: pytest.FixtureRequest,
                   make_fault_proxy: Callable[[RegistryServer], RegistryFaultProxy]) -> Iterator[RegistryFaultProxy]:
    """A fault proxy in front of its own plain-http registry that answers *relative* Location headers
    (``.upstream``)."""
    with RegistryServer(tmp_path / "proxied-registry", relative_urls=True, label="proxied registry") as server:
        _track(request, server)
        yield make_fault_proxy(server)
