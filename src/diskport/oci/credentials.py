r"""Where registry credentials come from: a chain of providers, asked in order, the first that has some wins.

The chain (:data:`PROVIDERS`), for the registry (and repository) of a reference:

1. :class:`ExplicitCreds`: ``--creds USER:PASSWORD`` (the ``creds`` argument of :func:`resolve_credentials`);
2. :class:`PullSecretFile`: a Kubernetes pull secret (``--pull-secret FILE``, the ``pull_secret`` argument): the
   ``kubernetes.io/dockerconfigjson`` Secret itself in YAML or JSON (``kubectl get secret NAME -o yaml``), or its
   ``.dockerconfigjson`` as a file (mounted from the Secret, or ``kubectl get secret NAME -o
   jsonpath='{.data.\.dockerconfigjson}' | base64 -d``); its ``auths`` are read as a docker config's are;
3. :class:`EnvironmentCreds`: ``DISKPORT_USERNAME`` and ``DISKPORT_PASSWORD`` (both set), for CI jobs that hold a
   secret;
4. :class:`AuthFiles`: auth files, in this order (a file named explicitly by an environment variable before the
   default places): ``$REGISTRY_AUTH_FILE`` (podman/skopeo's override), ``$DOCKER_CONFIG/config.json``,
   ``${XDG_RUNTIME_DIR}/containers/auth.json`` (where ``podman login`` writes), ``~/.docker/config.json`` (where
   ``docker login`` writes; skipped when ``$DOCKER_CONFIG`` is set, as docker does). The first file that has
   credentials for the registry wins. Inside one file: ``credHelpers[registry]`` (``docker-credential-<name>
   get``, :func:`run_credential_helper`), then the ``auths`` entry (base64 ``auth`` = ``user:password``, or
   ``username``/``password``, or an ``identitytoken``; podman's ``registry/namespace`` keys match the most
   specific repository path), then the file's ``credsStore`` helper. A helper answering "credentials not found"
   means none; a ``credHelpers`` helper that is not installed is an error, a ``credsStore`` helper that is not
   installed is skipped (docker desktop configs carried into containers name one that is not there), with a log
   message.

Docker Hub's key is ``https://index.docker.io/v1/`` (docker) or ``docker.io`` (podman); both are looked up, and
a helper is asked for ``https://index.docker.io/v1/`` as docker asks it. Other registries are asked for by
``host[:port]``.

A new source is one :class:`CredentialProvider` subclass (its :meth:`~CredentialProvider.find` gets a
:class:`Lookup`: the registry, the repository, the caller's explicit settings and the environment; it returns
:class:`Credentials` or None to let the next provider answer) and one line in :data:`PROVIDERS`. How a registry
is then given the credentials (Basic, Bearer tokens) is :mod:`diskport.oci.auth`'s business, not this module's.
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from diskport.errors import RegistryError, UsageError
from diskport.oci.reference import DOCKER_HUB, DOCKER_HUB_ALIASES, Reference

log = logging.getLogger(__name__)

ENV_USERNAME = "DISKPORT_USERNAME"
ENV_PASSWORD = "DISKPORT_PASSWORD"
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
HELPER_TIMEOUT = 30.0
CREDENTIALS_HINT = ("pass --creds USER:PASSWORD or --pull-secret FILE (a Kubernetes pull secret), set "
                    "DISKPORT_USERNAME and DISKPORT_PASSWORD, or log in with "
                    "'docker login' / 'podman login' (config.json, auth.json)")
_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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


# ---------------------------------------------------------------------------------------------------------
# The chain of providers
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lookup:
    """What every provider is asked: credentials for ``registry`` (normalised host[:port]) and ``repository``
    (empty when only a registry is named), with what the caller passed explicitly and the environment
    (variables, HOME, and the PATH credential helpers are found on)."""

    registry: str
    repository: str
    environ: Mapping[str, str]
    creds: str | None = None
    pull_secret: str | os.PathLike[str] | None = None


class CredentialProvider:
    """One place credentials may be. :meth:`find` returns them, or None when this place has none for the
    registry (the chain then asks the next); a place that exists but cannot be read is a RegistryError."""

    def find(self, lookup: Lookup) -> Credentials | None:
        raise NotImplementedError


class ExplicitCreds(CredentialProvider):
    """``--creds USER:PASSWORD``."""

    def find(self, lookup: Lookup) -> Credentials | None:
        return None if lookup.creds is None else parse_creds(lookup.creds)


class PullSecretFile(CredentialProvider):
    """A Kubernetes pull secret (``--pull-secret FILE``): the ``.dockerconfigjson`` itself (a docker config: its
    ``auths`` are read), or the ``kubernetes.io/dockerconfigjson`` Secret holding it, in YAML or JSON as
    ``kubectl get secret NAME -o yaml`` prints it (``data`` base64, or ``stringData``)."""

    def find(self, lookup: Lookup) -> Credentials | None:
        if lookup.pull_secret is None:
            return None
        path = Path(lookup.pull_secret)
        if not path.is_file():
            raise UsageError("the pull secret file does not exist", path=str(path))
        data = _load_pull_secret(path)
        if data is None:
            return None
        return _from_auths(data, path, lookup.registry, lookup.repository)


SECRET_TYPE = "kubernetes.io/dockerconfigjson"
SECRET_KEY = ".dockerconfigjson"


def _load_pull_secret(path: Path) -> dict[str, object] | None:
    """The docker config of a pull secret file: the file itself when it is one, else the ``.dockerconfigjson``
    of the Secret it holds."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RegistryError(f"cannot read the pull secret: {getattr(e, 'strerror', None) or e}",
                            path=str(path)) from None
    if not text.strip():
        return None
    try:
        data: object = json.loads(text)
    except json.JSONDecodeError as e:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        if not (isinstance(data, dict) and data.get("kind") == "Secret"):
            raise RegistryError(f"the pull secret is not valid JSON ({e.msg} at line {e.lineno}) nor a Secret in "
                                "YAML", path=str(path),
                                hint=f"give the {SECRET_KEY} or the {SECRET_TYPE} Secret holding it") from None
    if not isinstance(data, dict):
        raise RegistryError("the pull secret is not a JSON object", path=str(path))
    if data.get("kind") != "Secret":
        return data
    kind = data.get("type")
    if kind != SECRET_TYPE:
        raise RegistryError(f"the Secret is of type {kind!r}, not {SECRET_TYPE!r}", path=str(path))
    inner = _secret_value(data, path)
    try:
        config = json.loads(inner)
    except json.JSONDecodeError as e:
        raise RegistryError(f"the Secret's {SECRET_KEY} is not valid JSON ({e.msg} at line {e.lineno})",
                            path=str(path)) from None
    if not isinstance(config, dict):
        raise RegistryError(f"the Secret's {SECRET_KEY} is not a JSON object", path=str(path))
    return config


def _secret_value(secret: dict[object, object], path: Path) -> str:
    """``stringData[.dockerconfigjson]`` as written, else ``data[.dockerconfigjson]`` decoded from base64."""
    string_data, data = secret.get("stringData"), secret.get("data")
    if isinstance(string_data, dict) and isinstance(string_data.get(SECRET_KEY), str):
        return str(string_data[SECRET_KEY])
    if isinstance(data, dict) and isinstance(data.get(SECRET_KEY), str):
        try:
            return base64.b64decode("".join(str(data[SECRET_KEY]).split()), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise RegistryError(f"the Secret's data[{SECRET_KEY}] is not base64 of UTF-8 text",
                                path=str(path)) from None
    raise RegistryError(f"the Secret has no {SECRET_KEY} in data or stringData", path=str(path))


class EnvironmentCreds(CredentialProvider):
    """``DISKPORT_USERNAME`` and ``DISKPORT_PASSWORD``."""

    def find(self, lookup: Lookup) -> Credentials | None:
        env = lookup.environ
        if env.get(ENV_USERNAME) and ENV_PASSWORD in env:
            return Credentials(env[ENV_USERNAME], env[ENV_PASSWORD], None, f"${ENV_USERNAME}/${ENV_PASSWORD}")
        return None


class AuthFiles(CredentialProvider):
    """docker's and podman's auth files (:func:`auth_files`), each with its credHelpers, auths and credsStore."""

    def find(self, lookup: Lookup) -> Credentials | None:
        for path in auth_files(lookup.environ):
            found = _from_file(path, lookup.registry, lookup.repository, lookup.environ)
            if found is not None:
                return found
        return None


#: The chain, in the order it is asked. A new source of credentials is a class above and a line here.
PROVIDERS: list[CredentialProvider] = [
    ExplicitCreds(),
    PullSecretFile(),
    EnvironmentCreds(),
    AuthFiles(),
]


def resolve_credentials(reference: Reference | str, *, creds: str | None = None,
                        pull_secret: str | os.PathLike[str] | None = None,
                        environ: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials for the registry of ``reference`` (a :class:`Reference` or a registry name such as
    ``quay.io`` or ``127.0.0.1:5000``), from the first provider of :data:`PROVIDERS` that has some; None for
    anonymous access.

    ``creds`` is ``USER:PASSWORD``; ``pull_secret`` a Kubernetes pull secret's ``.dockerconfigjson`` file;
    ``environ`` (default ``os.environ``) supplies the variables, HOME and the PATH credential helpers are found on.
    """
    if isinstance(reference, Reference):
        registry, repository = reference.registry, reference.repository
    else:
        registry, repository = _normal_host(reference), ""
    lookup = Lookup(registry, repository, os.environ if environ is None else environ, creds, pull_secret)
    for provider in PROVIDERS:
        found = provider.find(lookup)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------------------
# Auth files (docker config.json, podman auth.json, pull secrets) and credential helpers
# ---------------------------------------------------------------------------------------------------------

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
    found = _from_auths(data, path, registry, repository)
    if found is not None:
        return found
    store = data.get("credsStore")
    if isinstance(store, str) and store:
        try:
            return run_credential_helper(store, helper_server_url(registry), env, where=f"credsStore in {path}")
        except _HelperMissing as e:
            log.info("%s; skipping it", e)
    return None


def _from_auths(data: dict[str, object], path: Path, registry: str, repository: str) -> Credentials | None:
    """The ``auths`` entry of a config for this registry and repository (the most specific key)."""
    auths = data.get("auths")
    if isinstance(auths, dict):
        candidates = {k: v for k, v in auths.items() if isinstance(v, dict) and _has_secret(v)}
        key = _best_key(candidates, registry, repository)
        if key is not None:
            return _decode_entry(candidates[key], f"{path} ({key})")
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
