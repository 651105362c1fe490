"""The upload state machine of one blob: monolithic PUT, chunked PATCHes, resume from the registry's offset,
new sessions when the registry forgot one (the protocol is described in :mod:`diskport.oci.registry`).

:class:`BlobUpload` drives the :class:`~diskport.oci.registry.RegistryClient` it is given (its requests, retries,
authentication and error messages); the client's :meth:`~diskport.oci.registry.RegistryClient.upload_blob` and
``mount_blob`` are the public face. :class:`FileSlice` is a replayable request body read from disk, so nothing
of a blob is held in memory and a body can be sent again after a token refresh.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import httpx

from diskport.errors import RegistryError, SourceError
from diskport.oci.auth import ReplayableStream, repository_scope
from diskport.oci.failures import Failures, Transient, error_codes, error_detail
from diskport.oci.media import check_digest
from diskport.oci.reference import parse_repository

if TYPE_CHECKING:
    from diskport.oci.registry import RegistryClient

KiB = 1024
MiB = 1024 * KiB
DEFAULT_CHUNK = 64 * MiB
MIN_CHUNK = 256 * KiB          # a 413 halves the chunk size down to this (or the registry's minimum)
READ_BLOCK = 1 * MiB
MAX_RESTARTS = 3               # new upload sessions after the registry forgot one
_RANGE = re.compile(r"(?:bytes=)?(\d+)-(\d+)")


@dataclass(frozen=True)
class UploadResult:
    """What ``upload_blob`` did: ``how`` is ``exists`` (HEAD found it: nothing sent), ``mounted`` (from another
    repository: nothing sent) or ``uploaded``. ``chunked``: the blob went up in PATCH chunks; ``resumes``: times it
    continued after a failure from the offset the registry reported; ``restarts``: new upload sessions."""

    digest: str
    size: int
    how: Literal["exists", "mounted", "uploaded"]
    chunked: bool = False
    resumes: int = 0
    restarts: int = 0


class FileSlice(ReplayableStream):
    """Bytes ``[start, end)`` of the file at ``path`` as a request body, read from disk in ``block``-sized pieces
    each time it is iterated (so it can be sent again without being held in memory). ``on_position`` is told the
    file offset reached after each piece is handed on."""

    def __init__(self, path: str | os.PathLike[str], start: int, end: int, block: int = READ_BLOCK,
                 on_position: Callable[[int], None] | None = None) -> None:
        self.path = os.fspath(path)
        self.start, self.end, self.block = start, end, max(1, block)
        self.on_position = on_position

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[bytes]:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise SourceError(f"cannot open the blob file: {e.strerror}", path=self.path) from None
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, self.start, self.end - self.start, os.POSIX_FADV_SEQUENTIAL)
            position = self.start
            while position < self.end:
                try:
                    data = os.pread(fd, min(self.block, self.end - position), position)
                except OSError as e:
                    raise SourceError(f"cannot read the blob file: {e.strerror}", path=self.path,
                                      offset=position) from None
                if not data:
                    raise SourceError(f"the file ended at byte {position} while {self.end} were to be sent",
                                      path=self.path)
                position += len(data)
                yield data
                if self.on_position is not None:
                    self.on_position(position)
        finally:
            os.close(fd)


class Progress:
    """Reports bytes sent beyond the furthest point reached, so a resent body is not counted twice."""

    def __init__(self, callback: Callable[[int], None] | None) -> None:
        self.callback = callback
        self.high = 0
        self._lock = threading.Lock()

    def reach(self, position: int) -> None:
        with self._lock:
            delta = position - self.high
            if delta <= 0:
                return
            self.high = position
        if self.callback is not None:
            self.callback(delta)


class Restart(Exception):
    """The registry no longer has the upload session: start a new one."""


def uploaded_bytes(range_header: str | None) -> int | None:
    """Bytes an upload holds from its ``Range: 0-N`` header (N+1; ``0-0`` is what registries say for an empty
    upload); None when the header is absent or not of that form."""
    if not range_header:
        return None
    m = _RANGE.fullmatch(range_header.strip())
    if m is None or int(m.group(1)) != 0:
        return None
    end = int(m.group(2))
    return 0 if end == 0 else end + 1


@dataclass
class Session:
    """An upload session: where to send the next request, and the registry's minimum chunk."""

    location: httpx.URL
    min_chunk: int = 0


@dataclass
class UploadState:
    """The state of one blob upload as the protocol loop moves it on."""

    digest: str
    size: int
    path: Path
    tracker: Progress
    session: Session
    failures: Failures
    chunk: int
    chunked: bool
    offset: int = 0
    resumes: int = 0
    restarts: int = 0
    resync: bool = False

    @property
    def what(self) -> str:
        return f"uploading blob {self.digest}"


class BlobUpload:
    """Uploads of blobs into the repository of ``client``: :meth:`run` one blob, :meth:`start` and :meth:`cancel`
    an upload session (a mount attempt is a :meth:`start` with ``mount_from``)."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client

    def start(self, digest: str | None = None, mount_from: str | None = None) -> Session | None:
        """``POST /blobs/uploads/`` (a mount when ``mount_from``): None when mounted, else the upload session."""
        self.client._need_push()
        url = httpx.URL(self.client._url("blobs/uploads/"))
        what = "starting an upload"
        if mount_from is not None and digest is not None:
            self.client._auth.add_scopes(repository_scope(mount_from, "pull"))
            url = url.copy_merge_params({"mount": digest, "from": mount_from})
            what = f"mounting {digest} from {mount_from}"
        response = self.client._request("POST", url, what=what, content=b"")
        status = response.status_code
        if status == 201 and mount_from is not None and digest is not None:
            reported = response.headers.get("docker-content-digest")
            if reported and reported != digest:
                raise RegistryError(f"{self.client.where}: {what}: the registry mounted {reported}")
            return None
        if status != 202:
            raise self.client._fail(response, what)
        minimum = response.headers.get("oci-chunk-min-length", "")
        return Session(self._location(response), int(minimum) if minimum.isdigit() else 0)

    def _location(self, response: httpx.Response) -> httpx.URL:
        location = response.headers.get("location")
        if not location:
            raise RegistryError(f"{self.client.where}: the registry answered HTTP {response.status_code} to "
                                f"{response.request.method} {response.request.url.path} without a Location")
        try:
            return response.url.join(location)
        except httpx.InvalidURL:
            raise RegistryError(f"{self.client.where}: the registry answered an unusable Location "
                                f"{location!r}") from None

    def cancel(self, session: Session) -> None:
        with contextlib.suppress(Transient, RegistryError):  # best effort: registries purge abandoned uploads
            self.client._send_once(self.client._client.build_request("DELETE", session.location))

    def run(self, digest: str, size: int, path: str | os.PathLike[str],
            progress: Callable[[int], None] | None = None, *, mount_from: Sequence[str] = ()) -> UploadResult:
        """Put the blob ``digest`` (``size`` bytes, the file at ``path``) into the repository; see the module
        docstring for the protocol. ``progress`` is called with the number of new bytes sent (the whole size at
        once when nothing needs sending). ``mount_from``: repositories on this registry to mount it from first."""
        check_digest(digest)
        try:
            actual = os.stat(path).st_size
        except OSError as e:
            raise SourceError(f"cannot read the blob file: {e.strerror}", path=os.fspath(path)) from None
        if actual != size:
            raise SourceError(f"the blob file has {actual} bytes, its descriptor says {size}", path=os.fspath(path))
        tracker = Progress(progress)
        self.client._need_push()
        if self.client.blob_exists(digest) is not None:
            tracker.reach(size)
            return UploadResult(digest, size, "exists")
        session: Session | None = None
        for i, repository in enumerate(mount_from):
            if repository == self.client.repository:
                continue
            started = self.start(digest, parse_repository(repository))
            if started is None:
                tracker.reach(size)
                return UploadResult(digest, size, "mounted")
            if i + 1 < len(mount_from):
                self.cancel(started)
            else:
                session = started
        if session is None:
            session = self.start()
            assert session is not None
        return self._upload(session, digest, size, Path(path), tracker)

    def _body_request(self, method: str, url: httpx.URL, path: Path, start: int, end: int, tracker: Progress,
                      *, content_range: bool, timeout: httpx.Timeout | None = None) -> httpx.Request:
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(end - start)}
        if content_range:
            headers["Content-Range"] = f"{start}-{end - 1}"
        request = self.client._client.build_request(method, url, headers=headers,
                                             timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        if end > start:
            request.stream = FileSlice(path, start, end, self.client.options.read_block, tracker.reach)
        return request

    def _upload_status(self, session: Session) -> int:
        """How many bytes the registry holds of the upload (``GET <location>``: ``Range: 0-N``); updates the
        session's location. :class:`Restart` when the registry no longer knows the upload."""
        response = self.client._request("GET", session.location, what="asking for the upload's status")
        if response.status_code in (404, 400):
            raise Restart(f"the registry no longer has the upload (HTTP {response.status_code}"
                           f"{': ' + d if (d := error_detail(response)) else ''})")
        if response.status_code not in (200, 202, 204):
            raise self.client._fail(response, "asking for the upload's status")
        if response.headers.get("location"):
            session.location = self._location(response)
        held = uploaded_bytes(response.headers.get("range"))
        return 0 if held is None else held

    def _upload(self, session: Session, digest: str, size: int, path: Path, tracker: Progress) -> UploadResult:
        """Send the blob into ``session``: the protocol loop (monolithic PUT, chunked PATCHes, resync, restart)."""
        o = self.client.options
        up = UploadState(digest, size, path, tracker, session, Failures(o.retry, self.client.where),
                     chunk=max(o.chunk_size, session.min_chunk, 1), chunked=o.chunked)
        while True:
            try:
                if up.resync:
                    self._resync(up)
                if up.chunked and up.offset < size:
                    self._send_chunk(up)
                    continue
                result = self._finish(up)
                if result is not None:
                    return result
            except Transient as e:
                if e.broken and not up.chunked:
                    up.chunked = True  # a body that broke off: go on in smaller pieces
                up.failures.wait(e, up.what)
                up.resync = True
            except Restart as e:
                up.restarts += 1
                if up.restarts > MAX_RESTARTS:
                    raise RegistryError(f"{self.client.where}: {up.what} failed: {e}, {up.restarts} times") from None
                new = self.start()
                assert new is not None
                up.session, up.offset, up.resync = new, 0, False

    def _resync(self, up: UploadState) -> None:
        """After a failure: go on from what the registry holds."""
        up.resync = False
        held = self._upload_status(up.session)
        if held > up.size:
            raise Restart(f"the registry holds {held} bytes of a {up.size}-byte blob")
        if held > 0:
            up.resumes += 1
            up.chunked = True  # a monolithic PUT cannot go on from the middle
        up.offset = held

    def _send_chunk(self, up: UploadState) -> None:
        """One PATCH of ``[offset, offset + chunk)``; moves ``offset`` to what the registry then holds."""
        end = min(up.offset + up.chunk, up.size)
        request = self._body_request("PATCH", up.session.location, up.path, up.offset, end, up.tracker,
                                     content_range=True)
        response = self.client._send_once(request)
        status = response.status_code
        if status == 202:
            up.session.location = self._location(response)
            before, up.offset = up.offset, uploaded_bytes(response.headers.get("range")) or end  # "0-0": as sent
            if up.offset > up.size:
                raise Restart(f"the registry holds {up.offset} bytes of a {up.size}-byte blob")
            if up.offset > before:
                up.failures.reset()
            else:  # accepted, yet not taken: do not go round for ever
                up.failures.wait(Transient(f"the registry kept the upload at {up.offset} bytes"), up.what)
        elif status == 413 and up.chunk > max(MIN_CHUNK, up.session.min_chunk):
            up.chunk = max(up.chunk // 2, MIN_CHUNK, up.session.min_chunk)
        elif status == 416:
            up.failures.wait(Transient("HTTP 416: the registry is at another offset"), up.what)
            up.resync = True
        elif status == 404:
            raise Restart("the registry no longer has the upload (HTTP 404)")
        else:
            raise self.client._fail(response, f"{up.what} (bytes {up.offset}-{end - 1})")

    def _finish(self, up: UploadState) -> UploadResult | None:
        """The ``PUT ?digest=``: with the whole body (monolithic) or none (after the chunks). None: go on (the
        registry wants chunks)."""
        o = self.client.options
        commit = httpx.Timeout(o.timeout, connect=o.connect_timeout, read=max(o.timeout, o.commit_timeout))
        url = up.session.location.copy_merge_params({"digest": up.digest})
        start = up.offset if up.chunked else 0
        response = self.client._send_once(self._body_request("PUT", url, up.path, start, up.size, up.tracker,
                                                      content_range=False, timeout=commit))
        status = response.status_code
        if status in (201, 204):
            reported = response.headers.get("docker-content-digest")
            if reported and reported != up.digest:
                raise RegistryError(f"{self.client.where}: the registry stored blob {up.digest} as {reported}")
            up.tracker.reach(up.size)
            return UploadResult(up.digest, up.size, "uploaded", up.chunked, up.resumes, up.restarts)
        if status == 413 and not up.chunked:
            up.chunked = True
            up.chunk = min(up.chunk, max(MIN_CHUNK, up.session.min_chunk, up.size // 2))
            up.resync = True
            return None
        if status == 404:
            raise Restart("the registry no longer has the upload (HTTP 404)")
        if status == 400 and (up.resumes or up.restarts) and \
                error_codes(response) & {"DIGEST_INVALID", "BLOB_UPLOAD_INVALID", "SIZE_INVALID"}:
            raise Restart(f"the resumed upload does not verify ({error_detail(response)})")
        raise self.client._fail(response, up.what)
