"""Where credentials come from (oci/credentials.py): the chain of providers, its order, a Kubernetes pull
secret as one provider, and a new provider added by one registration."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from diskport.errors import RegistryError, UsageError
from diskport.oci import credentials
from diskport.oci.credentials import (
    PROVIDERS,
    CredentialProvider,
    Credentials,
    Lookup,
    PullSecretFile,
    resolve_credentials,
)
from diskport.oci.reference import parse_reference


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def pull_secret(path: Path, auths: dict[str, dict[str, str]]) -> Path:
    """A ``.dockerconfigjson`` as a Secret mounted in a pod holds it (decoded)."""
    path.write_text(json.dumps({"auths": auths}))
    return path


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment with no auth file and no credential helper in reach."""
    return {"HOME": str(tmp_path / "home"), "PATH": str(tmp_path / "bin"), **extra}


def test_pull_secret_is_read_like_a_docker_config(tmp_path: Path) -> None:
    secret = pull_secret(tmp_path / ".dockerconfigjson", {
        "quay.io": {"auth": b64("robot:tok3n")},
        "https://index.docker.io/v1/": {"username": "hub", "password": "hubpw"},
        "reg.example:5000/team": {"auth": b64("team:pw")},
    })
    env = clean_env(tmp_path)
    quay = resolve_credentials(parse_reference("quay.io/org/disk:v1"), pull_secret=secret, environ=env)
    assert quay is not None and (quay.username, quay.password) == ("robot", "tok3n")
    assert str(secret) in quay.source
    hub = resolve_credentials(parse_reference("busybox"), pull_secret=secret, environ=env)
    assert hub is not None and hub.username == "hub"
    team = resolve_credentials(parse_reference("reg.example:5000/team/vm"), pull_secret=secret, environ=env)
    assert team is not None and team.username == "team"
    assert resolve_credentials(parse_reference("reg.example:5000/other/vm"), pull_secret=secret,
                               environ=env) is None
    assert resolve_credentials("ghcr.io", pull_secret=secret, environ=env) is None


def test_order_of_the_chain(tmp_path: Path) -> None:
    secret = pull_secret(tmp_path / "secret.json", {"quay.io": {"auth": b64("from-secret:1")}})
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": {"quay.io": {"auth": b64("from-file:2")}}}))
    env = clean_env(tmp_path, DISKPORT_USERNAME="from-env", DISKPORT_PASSWORD="3")
    ref = parse_reference("quay.io/org/disk")

    def who(**kw: object) -> str | None:
        found = resolve_credentials(ref, environ=kw.pop("environ", env), **kw)  # type: ignore[arg-type]
        return None if found is None else found.username

    assert who(creds="explicit:0", pull_secret=secret) == "explicit"
    assert who(pull_secret=secret) == "from-secret"
    assert who() == "from-env"
    assert who(environ={k: v for k, v in env.items() if not k.startswith("DISKPORT_")}) == "from-file"
    # A pull secret without this registry lets the chain go on.
    other = pull_secret(tmp_path / "other.json", {"ghcr.io": {"auth": b64("gh:4")}})
    assert who(pull_secret=other) == "from-env"


def test_pull_secret_errors_are_one_line(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    with pytest.raises(UsageError, match="does not exist") as missing:
        resolve_credentials("quay.io", pull_secret=tmp_path / "nope.json", environ=env)
    assert str(tmp_path / "nope.json") in str(missing.value)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        resolve_credentials("quay.io", pull_secret=broken, environ=env)
    bad_auth = pull_secret(tmp_path / "bad.json", {"quay.io": {"auth": "!!!"}})
    with pytest.raises(RegistryError, match="base64"):
        resolve_credentials("quay.io", pull_secret=bad_auth, environ=env)


def test_a_new_provider_is_one_class_and_one_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Lookup] = []

    class Vault(CredentialProvider):
        def find(self, lookup: Lookup) -> Credentials | None:
            asked.append(lookup)
            return Credentials("vault", "s3cret", None, "vault") if lookup.registry == "quay.io" else None

    monkeypatch.setattr(credentials, "PROVIDERS", [*PROVIDERS, Vault()])
    env = clean_env(tmp_path)
    found = resolve_credentials(parse_reference("quay.io/org/disk"), environ=env)
    assert found is not None and (found.username, found.source) == ("vault", "vault")
    assert asked[-1].repository == "org/disk" and asked[-1].environ is env
    assert resolve_credentials("ghcr.io", environ=env) is None
    # Earlier providers still win over the new one.
    env_creds = clean_env(tmp_path, DISKPORT_USERNAME="env", DISKPORT_PASSWORD="pw")
    found = resolve_credentials("quay.io", environ=env_creds)
    assert found is not None and found.username == "env"


def test_pull_secret_provider_is_registered() -> None:
    assert any(isinstance(p, PullSecretFile) for p in PROVIDERS)
    assert PullSecretFile().find(Lookup("quay.io", "", {})) is None  # no file given: not this provider's turn
