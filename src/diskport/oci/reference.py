"""Image references: ``[docker://][REGISTRY[:PORT]/]NAMESPACE/NAME[:TAG][@sha256:HEX]``.

The one grammar every part of diskport parses references with (the CLI's -t, docker-archive RepoTags, pulls
and pushes). It is the one docker and the distribution project use (distribution's ``reference`` grammar):
path components of lowercase letters and digits joined by ``.``, ``_``, ``__`` or runs of ``-``; a tag of up to
128 ASCII letters, digits, ``_``, ``.`` and ``-``, not starting with ``.`` or ``-``; at most 255 characters for
the whole name. Docker's rules for the registry part are followed too: the first component names a registry
only when it contains a ``.`` or a ``:``, is ``localhost``, or has an uppercase letter; otherwise the reference
is on Docker Hub, whose registry is called ``docker.io`` (``index.docker.io`` is an alias), is served by
``registry-1.docker.io``, and puts single-component names under ``library/``. A reference with neither tag nor
digest means ``:latest``, as in docker.

Transport: https, always, except for a registry on the loopback names ``localhost``, ``127.0.0.1`` and ``::1``
(any port), where plain http is allowed too (the client tries https first and falls back to http only when the
server does not speak TLS, as docker and skopeo do for local registries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from diskport.errors import UsageError
from diskport.oci.media import is_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_TAG = "latest"
NAME_MAX = 255

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?")
# ASCII only: Python's \w would take any Unicode letter, which no registry does.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass(frozen=True)
class Reference:
    """A parsed image reference.

    ``registry`` is the registry as named (``docker.io``, ``quay.io``, ``127.0.0.1:5000``, ``[::1]:5000``);
    ``repository`` the path inside it (``library/ubuntu``); ``tag`` and ``digest`` what the reference points at
    (either, both or, for a bare repository, neither).
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def host(self) -> str:
        """The registry's host name without port or IPv6 brackets."""
        host = self.registry
        if host.startswith("["):
            return host[1:host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def endpoint(self) -> str:
        """``host[:port]`` to connect to: ``registry-1.docker.io`` for Docker Hub, else the registry."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    @property
    def plain_http_allowed(self) -> bool:
        """Whether plain http may be used: only for a registry on a loopback name."""
        return self.host.lower() in LOOPBACK_HOSTS

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag (``latest`` by default)."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def with_reference(self, reference: str) -> Reference:
        """The same repository at ``reference`` (a tag or a ``sha256:`` digest)."""
        if is_digest(reference):
            return replace(self, tag=None, digest=reference)
        if _TAG.fullmatch(reference) is None:
            raise UsageError(f"{reference!r} is neither a tag nor a sha256 digest")
        return replace(self, tag=reference, digest=None)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _fail(text: str, problem: str) -> UsageError:
    return UsageError(f"invalid image reference {text!r}: {problem}",
                      hint="expected [REGISTRY[:PORT]/]NAME[:TAG] or NAME@sha256:DIGEST")


def _split_registry(name: str) -> tuple[str | None, str]:
    """Docker's rule: the first component is a registry when it has a dot or colon, is localhost, or has
    an uppercase letter (which a repository path cannot)."""
    first, sep, rest = name.partition("/")
    if not sep:
        return None, name
    if "." in first or ":" in first or first == "localhost" or first.lower() != first:
        return first, rest
    return None, name


def parse_reference(text: str) -> Reference:
    """Parse ``[docker://][REGISTRY/]NAME[:TAG][@sha256:HEX]``; a :class:`UsageError` says what is wrong.

    The tag stays None when the text has none (``Reference.reference`` then means ``latest``).
    """
    original = text
    body = text.strip()
    if body.lower().startswith("docker://"):
        body = body[len("docker://"):]
    elif _SCHEME.match(body):
        raise _fail(original, "only docker:// references name a registry image")
    if not body:
        raise _fail(original, "it is empty")
    digest: str | None = None
    if "@" in body:
        body, _, digest = body.rpartition("@")
        if not is_digest(digest):
            if ":" in digest and not digest.startswith("sha256:"):
                raise _fail(original, f"digest {digest!r} is not sha256 (the only algorithm diskport uses)")
            raise _fail(original, f"digest {digest!r} is not sha256: and 64 lowercase hex digits")
    tag: str | None = None
    colon, slash = body.rfind(":"), body.rfind("/")
    if colon > slash:  # a colon after the last slash starts the tag (before it, it is a registry's port)
        body, tag = body[:colon], body[colon + 1:]
        if _TAG.fullmatch(tag) is None:
            raise _fail(original, f"tag {tag!r} is not valid (letters, digits, _ . -, at most 128 characters, "
                                  "not starting with . or -)")
    registry, path = _split_registry(body)
    if registry is None:
        registry = DOCKER_HUB
    elif _REGISTRY.fullmatch(registry) is None:
        raise _fail(original, f"registry {registry!r} is not a host name or address with an optional port")
    elif registry.lower() in ("index.docker.io", DOCKER_HUB):
        registry = DOCKER_HUB
    if not path:
        raise _fail(original, "the repository name is missing")
    for component in path.split("/"):
        if _PATH_COMPONENT.fullmatch(component) is None:
            if component.lower() != component and _PATH_COMPONENT.fullmatch(component.lower()):
                raise _fail(original, "repository names must be lowercase")
            raise _fail(original, f"repository path component {component!r} is not valid (lowercase letters and "
                                  "digits, joined by . _ __ or -)")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if len(registry) + 1 + len(path) > NAME_MAX:
        raise _fail(original, f"the name is longer than {NAME_MAX} characters")
    return Reference(registry, path, tag, digest)


def repo_tag(text: str) -> str:
    """``name[:tag]`` as a docker-archive's RepoTags (and ``docker load``) want it, from an image reference in this
    module's grammar: as written, with ``:latest`` added when there is no tag; a digest has no place there."""
    ref = parse_reference(text)
    if ref.digest is not None:
        raise UsageError(f"{text!r} names a digest; a docker-archive's image is named by a tag (like "
                         "'quay.io/org/disk:v1')")
    body = text.strip().removeprefix("docker://")
    return body if ref.tag else f"{body}:{DEFAULT_TAG}"


def is_tag(text: str) -> bool:
    """Whether ``text`` is a tag by this module's grammar (ASCII letters, digits, ``_ . -``, at most 128)."""
    return _TAG.fullmatch(text) is not None


def check_image_name(text: str) -> str:
    """``text`` as the name a build gives its image (``-t``): a tag (``v1``) or a reference without a digest
    (``quay.io/org/disk:v1``), both by this module's grammar; a :class:`UsageError` otherwise. A digest is
    refused, not read as a tag: a build makes its own digest."""
    if is_tag(text):
        return text
    ref = parse_reference(text)
    if ref.digest is not None:
        raise UsageError(f"{text!r} names a digest; a build makes its own digest, so name the image by a tag "
                         "(like 'v1' or 'quay.io/org/disk:v1')")
    return text


def layout_tag(text: str) -> str:
    """The tag an OCI layout names a build's image by, from ``-t text`` (checked by :func:`check_image_name`): a
    tag as written (``V1``: tags may be upper case, repository names may not), else the reference's tag
    (``v7`` of ``quay.io/org/disk:v7``), else the reference as written."""
    check_image_name(text)
    if is_tag(text):
        return text
    return parse_reference(text).tag or text


def parse_repository(text: str) -> str:
    """A bare repository path (``namespace/name``), as in ``--mount-from``; a :class:`UsageError` when it is not."""
    for component in text.split("/"):
        if _PATH_COMPONENT.fullmatch(component) is None:
            raise UsageError(f"invalid repository name {text!r}",
                             hint="lowercase letters and digits, joined by . _ __ or -, in /-separated components")
    return text
