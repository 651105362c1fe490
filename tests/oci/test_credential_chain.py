"""Where credentials come from (oci/credentials.py): the chain of providers, its order, a Kubernetes pull
secret as one provider, and a new provider added by one registration."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import yaml

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
from tests.support import MiB
from tests.support.clients import run_cli
from tests.support.images import make_image, pvc_dir, qemu_raw_sha256, sha256_file
from tests.support.registry import RegistryServer


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


# -- the Secret itself, as kubectl prints it, and --pull-secret on every registry command ---------------------------

def secret_yaml(path: Path, config: dict[str, object], *, kind: str = "kubernetes.io/dockerconfigjson",
                string_data: bool = False) -> Path:
    """A Secret as ``kubectl get secret NAME -o yaml`` prints it (``data`` base64) or as one writes it by hand
    (``stringData``)."""
    body = json.dumps(config)
    payload = {"stringData": {".dockerconfigjson": body}} if string_data else \
        {"data": {".dockerconfigjson": b64(body)}}
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "type": kind,
                                    "metadata": {"name": "regcred", "namespace": "vms"}, **payload}))
    return path


def test_pull_secret_as_the_secret_manifest(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    config: dict[str, object] = {"auths": {"quay.io": {"auth": b64("robot:from-yaml")}}}
    for name, secret in (("data", secret_yaml(tmp_path / "s.yaml", config)),
                         ("stringData", secret_yaml(tmp_path / "h.yaml", config, string_data=True))):
        found = resolve_credentials(parse_reference("quay.io/org/disk"), pull_secret=secret, environ=env)
        assert found is not None and (found.username, found.password) == ("robot", "from-yaml"), name
        assert str(secret) in found.source
    as_json = tmp_path / "s.json"  # kubectl get secret -o json
    as_json.write_text(json.dumps(yaml.safe_load((tmp_path / "s.yaml").read_text())))
    found = resolve_credentials("quay.io", pull_secret=as_json, environ=env)
    assert found is not None and found.username == "robot"
    assert resolve_credentials("ghcr.io", pull_secret=as_json, environ=env) is None


def test_pull_secret_manifest_errors_are_one_line(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    opaque = secret_yaml(tmp_path / "opaque.yaml", {"auths": {}}, kind="Opaque")
    with pytest.raises(RegistryError, match=r"of type 'Opaque', not 'kubernetes\.io/dockerconfigjson'"):
        resolve_credentials("quay.io", pull_secret=opaque, environ=env)
    bad = tmp_path / "bad64.yaml"
    bad.write_text("kind: Secret\ntype: kubernetes.io/dockerconfigjson\ndata:\n  .dockerconfigjson: '***'\n")
    with pytest.raises(RegistryError, match="not base64"):
        resolve_credentials("quay.io", pull_secret=bad, environ=env)
    empty = tmp_path / "empty.yaml"
    empty.write_text("kind: Secret\ntype: kubernetes.io/dockerconfigjson\ndata: {}\n")
    with pytest.raises(RegistryError, match=r"no \.dockerconfigjson"):
        resolve_credentials("quay.io", pull_secret=empty, environ=env)
    other = tmp_path / "other.yaml"
    other.write_text("kind: ConfigMap\ndata: {}\n")
    with pytest.raises(RegistryError, match=r"not valid JSON .* nor a Secret"):
        resolve_credentials("quay.io", pull_secret=other, environ=env)


def test_cli_pull_secret_on_every_registry_command(tls_registry: RegistryServer, tmp_path: Path) -> None:
    """build --push, push, pull, import, inspect and manifest of docker://REF against docker-registry with
    htpasswd auth, the Secret being the only credentials in reach (a clean HOME, no DISKPORT_* variables)."""
    env = {**clean_env(tmp_path), "PATH": os.environ["PATH"]}
    env.pop("DISKPORT_USERNAME", None)
    image = make_image(tmp_path, "qcow2", 4 * MiB, name="vm.qcow2")
    expected = qemu_raw_sha256(image, tmp_path)
    secret = secret_yaml(tmp_path / "regcred.yaml", {"auths": {tls_registry.name: {
        "auth": b64(f"{tls_registry.username}:{tls_registry.password}")}}})
    ca = ["--ca-bundle", str(tls_registry.ca_bundle)]
    ref = f"{tls_registry.name}/vms/disk:v1"
    denied = run_cli("build", "-q", image, "-t", ref, "--push", *ca, env=env)
    assert denied.returncode == 1 and "authentication" in denied.stderr, denied.stderr
    built = run_cli("build", "-q", image, "-t", ref, "--push", "--pull-secret", secret, *ca, env=env)
    assert built.returncode == 0, built.stderr
    layout = tmp_path / "vm.oci"
    assert run_cli("build", "-q", image, "--output", layout, env=env).returncode == 0
    pushed = run_cli("push", layout, f"{tls_registry.name}/vms/again:v2", "--pull-secret", secret, *ca, env=env)
    assert pushed.returncode == 0, pushed.stderr
    for command, source in (("pull", ref), ("import", f"docker://{tls_registry.name}/vms/again:v2")):
        dest = pvc_dir(tmp_path) / f"{command}.raw"
        done = run_cli(command, source, dest, "--pull-secret", secret, *ca, env=env)
        assert done.returncode == 0, done.stderr
        assert sha256_file(dest) == expected
        dest.unlink()
        refused = run_cli(command, source, dest, *ca, env=env)
        assert refused.returncode == 1 and "authentication" in refused.stderr, refused.stderr
        assert not dest.exists()
    inspected = run_cli("inspect", "--guest", "--json", f"docker://{ref}", "--pull-secret", secret, *ca, env=env)
    assert inspected.returncode == 0, inspected.stderr
    facts = json.loads(inspected.stdout)
    assert (facts["format"], facts["virtual-size"]) == ("qcow2", 4 * MiB)
    manifest = run_cli("manifest", f"docker://{ref}", "--pull-secret", secret, *ca, env=env)
    assert manifest.returncode == 0, manifest.stderr
    assert f"image: {tls_registry.name}/vms/disk@sha256:" in manifest.stdout   # pinned: the registry was read
    refused = run_cli("manifest", f"docker://{ref}", *ca, env=env)
    assert refused.returncode == 1 and "authentication" in refused.stderr, refused.stderr
    missing = run_cli("pull", ref, pvc_dir(tmp_path) / "x.raw", "--pull-secret", tmp_path / "nope.yaml", *ca,
                      env=env)
    assert missing.returncode == 2 and "the pull secret file does not exist" in missing.stderr, missing.stderr
