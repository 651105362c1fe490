"""A client of the OCI distribution API (``/v2/``): blobs and manifests to and from a registry.

Built by hand on httpx because no Python library moves multi-GB layers by these rules (the OCI distribution
spec, v1.1, "Push" and "Pull" and "Error codes"; distribution's token authentication spec; the habits of docker,
go-containerregistry and regclient):

* **Blobs go up streamed, never held.** ``upload_blob`` first asks ``HEAD /v2/<name>/blobs/<digest>`` and sends
  nothing when the registry has it. Otherwise it opens an upload (``POST /v2/<name>/blobs/uploads/``, or a
  cross-repository mount with ``?mount=<digest>&from=<repo>``: 201 means mounted, 202 is an upload session to go
  on with) and sends the file in one ``PUT <location>?digest=`` with a ``Content-Length``, read from disk in
  1 MiB blocks. A registry (or a proxy before it) that answers 413, or a connection that breaks during that body,
  makes it fall back to **chunked** uploads: ``PATCH`` requests of ``chunk_size`` bytes (64 MiB by default, at
  least the ``OCI-Chunk-Min-Length`` the registry announces, halved on a 413) with ``Content-Range: start-end``,
  then ``PUT ?digest=``. ``Location`` headers may be relative and change with every answer; the latest is used.
* **Resume, not restart.** After a failure the upload's status is asked (``GET <location>``: ``Range: 0-N``) and
  the upload goes on from byte N+1; a 416 does the same. A registry that has forgotten or invalidated the upload
  (404: distribution cancels an upload whose stored size no longer matches its state token, which happens when a
  broken body was partly written) gets a new upload from byte 0, a bounded number of times.
* **Retries** by :mod:`diskport.net.retry` on connection errors, timeouts, 5xx and 429 (``Retry-After``
  honoured up to 120 s), bounded by failures in a row (reset whenever bytes get through) and by one budget of
  waiting per request or upload (:class:`RegistryOptions`).
* **Authentication** is :class:`~diskport.oci.auth.RegistryAuth`: the first request (``GET /v2/``) learns the
  challenge, the token for the repository's scopes is fetched before the first upload body, request bodies are
  replayable (each iteration re-reads the file), so a token that expires mid-upload costs one new token, not the
  upload. ``auth`` and ``blob_url`` let another HTTP client (the import's ``HttpSource``) stream a layer with the
  same credentials, which never follow a redirect to another host.
* **Trust nothing that is read.** Manifests are bounded (4 MiB), their digest is checked against the digest asked
  for and against ``Docker-Content-Digest``; small blobs (configs) are bounded and checked against their digest;
  the digest a registry reports after an upload must be the one sent.
* **Transport**: the client of :func:`diskport.net.make_client`: https, verified against the system CAs plus
  ``ca_bundle`` (or not at all with ``tls_verify=False``); plain http only for loopback registries, tried when
  https finds no TLS there. Proxies come from the environment (``HTTPS_PROXY``, ``NO_PROXY``...). User-Agent
  ``diskport/<version>``. ``transport`` replaces the network in unit tests (``httpx.MockTransport``).

Every failure is a :class:`~diskport.errors.RegistryError` whose one-line message names the registry, the
repository and what failed, with the registry's own error codes and messages (``errors[].code/message``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx

from diskport.errors import RegistryError, UsageError
from diskport.net import (
    USER_AGENT,
    RetryPolicy,
    cap_body,
    is_transient_error,
    is_transient_status,
    make_client,
    read_capped,
    retry_after,
)
from diskport.oci.auth import (
    CREDENTIALS_HINT,
    Credentials,
    RegistryAuth,
    TokenServerError,
    repository_scope,
    resolve_credentials,
)
from diskport.oci.failures import Failures, NotTls, Transient, error_detail
from diskport.oci.media import MANIFEST_TYPES, check_digest, is_digest, sha256_digest
from diskport.oci.reference import Reference, parse_reference, parse_repository
from diskport.oci.upload import DEFAULT_CHUNK, READ_BLOCK, BlobUpload, UploadResult
from diskport.sources.http import HttpOptions

__all__ = ["MAX_ANSWER", "MAX_MANIFEST", "MAX_SMALL_BLOB", "RegistryClient", "RegistryOptions", "UploadResult"]

KiB = 1024
MiB = 1024 * KiB
MAX_MANIFEST = 4 * MiB
MAX_SMALL_BLOB = 16 * MiB
#: No answer from a registry is read past this, whatever it says: the largest thing read whole is a small blob.
MAX_ANSWER = MAX_SMALL_BLOB + MiB


@dataclass
class RegistryOptions:
    """How to talk to a registry. Times are seconds."""

    tls_verify: bool = True
    ca_bundle: str | None = None          # PEM file of CAs trusted besides the system's
    plain_http: bool | None = None        # None: https, http fallback on loopback; True: http (loopback only)
    timeout: float = 60.0                 # no byte sent or received for this long is a failure (and retried)
    connect_timeout: float = 30.0
    commit_timeout: float = 900.0         # waiting for the answer to an upload's final PUT (a resumed upload is
                                          # hashed again by the registry before it answers)
    #: When to retry, how long to wait, when to give up (``budget``: per request or upload).
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    chunk_size: int = DEFAULT_CHUNK       # PATCH size of a chunked upload
    chunked: bool = False                 # upload in chunks from the start (no monolithic PUT first)
    read_block: int = READ_BLOCK          # bytes read from disk and handed to the socket at a time
    max_manifest: int = MAX_MANIFEST
    user_agent: str = USER_AGENT

    def http_options(self, base: HttpOptions | None = None, *, auth: httpx.Auth | None = None) -> HttpOptions:
        """``base`` (default :class:`HttpOptions`) for fetching this registry's blobs over plain HTTP
        (:class:`~diskport.sources.http.HttpSource`): its TLS trust widened by this registry's (``ca_bundle``,
        ``tls_verify=False``) and, when given, the registry's ``auth``. The one place registry options become
        HTTP options."""
        base = base or HttpOptions()
        return dataclasses.replace(base, insecure=base.insecure or not self.tls_verify,
                                   ca_bundle=base.ca_bundle or self.ca_bundle, auth=auth or base.auth)


def _ssl_error(error: BaseException) -> BaseException | None:
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class RegistryClient:
    """The repository ``reference`` names (``registry/namespace/name``; its tag or digest is the default for
    :meth:`get_manifest`) on its registry.

    ``credentials``: ``"auto"`` looks them up (:func:`~diskport.oci.auth.resolve_credentials`), None is anonymous.
    ``push``: ask for push access from the first token (it is asked for anyway when something is pushed). ``auth``:
    share an existing :class:`RegistryAuth` (same registry). One client may be used from several threads.
    """

    def __init__(self, reference: Reference | str, options: RegistryOptions | None = None, *,
                 credentials: Credentials | Literal["auto"] | None = "auto", push: bool = False,
                 auth: RegistryAuth | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.reference = parse_reference(reference) if isinstance(reference, str) else reference
        self.repository = self.reference.repository
        self.registry = self.reference.registry
        self.options = options or RegistryOptions()
        self.where = self.reference.name
        if self.options.plain_http and not self.reference.plain_http_allowed:
            raise UsageError(f"{self.registry}: plain http is only allowed for registries on localhost, 127.0.0.1 "
                             "and ::1")
        if auth is None:
            creds = resolve_credentials(self.reference) if credentials == "auto" else credentials
            auth = RegistryAuth(self.reference.endpoint, creds, name=self.registry,
                                user_agent=self.options.user_agent)
        self._auth = auth
        auth.add_scopes(repository_scope(self.repository, "pull", "push") if push
                        else repository_scope(self.repository, "pull"))
        self._client = make_client(
            timeout=httpx.Timeout(self.options.timeout, connect=self.options.connect_timeout),
            ca_bundle=self.options.ca_bundle, insecure=not self.options.tls_verify, max_connections=16,
            max_keepalive=8, auth=auth, user_agent=self.options.user_agent, transport=transport,
            event_hooks={"response": [_cap_answer]})
        self._base: str | None = None
        self._lock = threading.Lock()

    # -- public accessors ----------------------------------------------------------------------------------
    @property
    def auth(self) -> RegistryAuth:
        """The ``httpx.Auth`` of this registry, to stream a blob through another ``httpx.Client``."""
        return self._auth

    @property
    def base_url(self) -> str:
        """``https://host[:port]`` (or ``http://`` for a plain-http loopback registry); pings the registry first."""
        self.ping()
        assert self._base is not None
        return self._base

    def blob_url(self, digest: str) -> str:
        """The URL a GET of blob ``digest`` goes to (it may redirect to storage on another host)."""
        check_digest(digest)
        return f"{self.base_url}/v2/{self.repository}/blobs/{digest}"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending -------------------------------------------------------------------------------------------
    def _send_once(self, request: httpx.Request, *, stream: bool = False, follow_redirects: bool = False,
                   tls_fallback: bool = False) -> httpx.Response:
        """One request; the answer unless it is a failure worth retrying (raised as :class:`Transient`)."""
        try:
            response = self._client.send(request, stream=stream, follow_redirects=follow_redirects)
        except TokenServerError as e:
            raise Transient(str(e), wait=e.retry_after) from None
        except httpx.TimeoutException as e:
            raise Transient(f"no answer within the timeout ({type(e).__name__})", broken=True) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
            raise RegistryError(f"{self.where}: unusable URL {request.url}: {e}") from None
        except httpx.TooManyRedirects:
            raise RegistryError(f"{self.where}: too many redirects from {request.url}") from None
        except httpx.TransportError as e:
            cause = _ssl_error(e)
            if isinstance(e, httpx.ConnectError) and cause is not None:
                if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e):
                    raise RegistryError(f"{self.registry}: TLS certificate verification failed: {cause}",
                                        hint="pass --ca-bundle with the registry's CA certificate, or "
                                             "--tls-verify=false") from None
                if tls_fallback:
                    raise NotTls(str(cause)) from None
                raise RegistryError(f"{self.registry}: TLS handshake failed: {cause}",
                                    hint="is it a plain-http registry? only loopback registries may be") from None
            if not is_transient_error(e):
                raise RegistryError(f"{self.where}: {request.method} {request.url.copy_with(query=None)} failed: "
                                    f"{e or type(e).__name__}") from None
            raise Transient(f"connection failed: {e or type(e).__name__}", broken=True) from None
        status = response.status_code
        if is_transient_status(status):
            wait = retry_after(response)
            detail = error_detail(response)
            response.close()
            raise Transient(f"HTTP {status} {response.reason_phrase}" + (f" ({detail})" if detail else ""), wait)
        return response

    def _request(self, method: str, url: str | httpx.URL, *, what: str, headers: dict[str, str] | None = None,
                 content: bytes | None = None, stream: bool = False, follow_redirects: bool = False,
                 timeout: httpx.Timeout | None = None, tls_fallback: bool = False) -> httpx.Response:
        """A request with retries; the first answer that is not a retryable failure (the caller judges it)."""
        failures = Failures(self.options.retry, self.where)
        while True:
            request = self._client.build_request(method, url, headers=headers, content=content,
                                                 timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
            try:
                return self._send_once(request, stream=stream, follow_redirects=follow_redirects,
                                       tls_fallback=tls_fallback)
            except Transient as e:
                failures.wait(e, what)

    def _fail(self, response: httpx.Response, what: str) -> RegistryError:
        """The error for an answer that ends ``what``: one line naming registry, repository and the problem."""
        status = response.status_code
        detail = error_detail(response)
        said = f"HTTP {status}" + (f": {detail}" if detail else "")
        creds = self._auth.credentials
        if status == 401:
            who = (f"the credentials from {creds.source} were refused" if creds is not None
                   else "the registry wants credentials and none were found")
            return RegistryError(f"authentication failed for {self.registry}: {who} ({what} in {self.repository}: "
                                 f"{said})", hint=CREDENTIALS_HINT)
        if status == 403:
            return RegistryError(f"{self.where}: access denied: {what} ({said})",
                                 hint=("the credentials from " + creds.source + " lack the permission")
                                 if creds is not None else CREDENTIALS_HINT)
        return RegistryError(f"{self.where}: {what} failed: {said}")

    # -- ping ----------------------------------------------------------------------------------------------
    def ping(self) -> None:
        """``GET /v2/``: checks the registry is there, learns its authentication (fetching a token for this
        repository's scopes) and, for a loopback registry, whether it speaks TLS. Done once; later calls are free."""
        with self._lock:
            if self._base is not None:
                return
            plain = self.options.plain_http
            if plain:
                schemes = ["http"]
            elif plain is None and self.reference.plain_http_allowed:
                schemes = ["https", "http"]
            else:
                schemes = ["https"]
            for i, scheme in enumerate(schemes):
                base = f"{scheme}://{self.reference.endpoint}"
                try:
                    response = self._request("GET", f"{base}/v2/", what="GET /v2/",
                                             tls_fallback=i + 1 < len(schemes))
                except NotTls:
                    continue
                if response.status_code == 404:
                    raise RegistryError(f"{self.registry} is not a registry: GET {base}/v2/ answered 404",
                                        hint="check the registry name and port")
                if response.status_code != 200:
                    raise self._fail(response, "GET /v2/")
                self._base = base
                return
            raise RegistryError(f"{self.registry}: no registry answered")  # pragma: no cover - loop always returns

    def _need_push(self) -> None:
        self._auth.add_scopes(repository_scope(self.repository, "pull", "push"))

    def _url(self, path: str) -> str:
        return f"{self.base_url}/v2/{self.repository}/{path}"

    # -- blobs ---------------------------------------------------------------------------------------------
    def blob_exists(self, digest: str) -> int | None:
        """``HEAD`` the blob: its size when the repository has it (-1 if the registry gave no length), else None."""
        check_digest(digest)
        response = self._request("HEAD", self.blob_url(digest), what=f"checking blob {digest}",
                                 follow_redirects=True)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, f"checking blob {digest}")
        length = response.headers.get("content-length", "")
        return int(length) if length.isdigit() else -1

    def mount_blob(self, digest: str, from_repository: str) -> bool:
        """Mount blob ``digest`` from ``from_repository`` on the same registry: True when mounted (201). When the
        registry cannot (202: it opened an upload instead), that upload is cancelled and False returned."""
        check_digest(digest)
        uploads = BlobUpload(self)
        session = uploads.start(digest, parse_repository(from_repository))
        if session is None:
            return True
        uploads.cancel(session)
        return False

    def upload_blob(self, digest: str, size: int, path: str | os.PathLike[str],
                    progress: Callable[[int], None] | None = None, *,
                    mount_from: Sequence[str] = ()) -> UploadResult:
        """Put the blob ``digest`` (``size`` bytes, the file at ``path``) into the repository; see the module
        docstring for the protocol (the state machine is :class:`~diskport.oci.upload.BlobUpload`). ``progress`` is
        called with the number of new bytes sent (the whole size at once when nothing needs sending).
        ``mount_from``: repositories on this registry to mount it from first."""
        return BlobUpload(self).run(digest, size, path, progress, mount_from=mount_from)

    # -- small blobs ---------------------------------------------------------------------------------------
    def get_blob(self, digest: str, *, limit: int = MAX_SMALL_BLOB) -> bytes:
        """The bytes of a small blob (a config), at most ``limit`` of them, checked against ``digest``."""
        check_digest(digest)
        what = f"fetching blob {digest}"
        response = self._request("GET", self.blob_url(digest), what=what, stream=True, follow_redirects=True)
        try:
            if response.status_code == 404:
                raise RegistryError(f"{self.where}: no such blob {digest}")
            if response.status_code != 200:
                raise self._fail(response, what)
            body = self._read_limited(response, limit, what)
        finally:
            response.close()
        if sha256_digest(body) != digest:
            raise RegistryError(f"{self.where}: blob {digest} has the wrong content (its bytes hash to "
                                f"{sha256_digest(body)})")
        return body

    def _read_limited(self, response: httpx.Response, limit: int, what: str) -> bytes:
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise RegistryError(f"{self.where}: {what}: {length} bytes, more than the {limit} allowed")
        try:
            return read_capped(response, limit,
                               lambda _: RegistryError(f"{self.where}: {what}: more than the {limit} allowed"))
        except httpx.TransportError as e:
            raise RegistryError(f"{self.where}: {what}: the connection broke: {e}") from None

    # -- manifests -----------------------------------------------------------------------------------------
    def _manifest_name(self, reference: str) -> str:
        return f"{self.where}@{reference}" if is_digest(reference) else f"{self.where}:{reference}"

    def get_manifest(self, reference: str | None = None, accept: Iterable[str] = MANIFEST_TYPES
                     ) -> tuple[bytes, str, str]:
        """The manifest at ``reference`` (a tag or digest; default the client's reference): ``(body, media type,
        digest)``. The body is bounded (``max_manifest``) and its digest checked against the reference when it is
        a digest and against ``Docker-Content-Digest``."""
        ref = self._check_reference(reference)
        name = self._manifest_name(ref)
        what = f"fetching manifest {ref}"
        response = self._request("GET", self._url(f"manifests/{ref}"), what=what, stream=True,
                                 headers={"Accept": ", ".join(accept)})
        try:
            if response.status_code == 404:
                detail = error_detail(response)
                raise RegistryError(f"{name}: no such manifest" + (f" ({detail})" if detail else ""),
                                    hint="check the repository and tag")
            if response.status_code != 200:
                raise self._fail(response, what)
            body = self._read_limited(response, self.options.max_manifest, what)
        finally:
            response.close()
        digest = sha256_digest(body)
        if is_digest(ref) and digest != ref:
            raise RegistryError(f"{name}: the registry sent a manifest whose digest is {digest}")
        reported = response.headers.get("docker-content-digest", "")
        if reported.startswith("sha256:") and reported != digest:
            raise RegistryError(f"{name}: the manifest's bytes hash to {digest}, the registry says {reported}")
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        if media_type not in MANIFEST_TYPES:
            try:
                declared = json.loads(body).get("mediaType")
            except (ValueError, AttributeError):
                declared = None
            if isinstance(declared, str) and declared:
                media_type = declared
        return body, media_type, digest

    def put_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        """Store ``body`` (a manifest or index of ``media_type``) under ``reference`` (a tag, or its own digest);
        returns its digest."""
        ref = self._check_reference(reference)
        digest = sha256_digest(body)
        if is_digest(ref) and ref != digest:
            raise UsageError(f"manifest pushed by digest {ref}, but its bytes hash to {digest}")
        self._need_push()
        what = f"pushing manifest {ref}"
        response = self._request("PUT", self._url(f"manifests/{ref}"), what=what, content=body,
                                 headers={"Content-Type": media_type})
        if response.status_code not in (200, 201, 202, 204):
            raise self._fail(response, what)
        reported = response.headers.get("docker-content-digest", "")
        if reported.startswith("sha256:") and reported != digest:
            raise RegistryError(f"{self._manifest_name(ref)}: the registry stored the manifest as {reported}, "
                                f"its bytes hash to {digest}")
        return digest

    def _check_reference(self, reference: str | None) -> str:
        ref = reference if reference is not None else self.reference.reference
        return self.reference.with_reference(ref).reference


def _cap_answer(response: httpx.Response) -> None:
    """No answer from a registry (or whatever answers in its place) is read past :data:`MAX_ANSWER`, also where
    httpx reads a body whole itself."""
    cap_body(response, MAX_ANSWER, RegistryError)
