"""Where registry credentials come from (diskport.oci.auth): auth files in the order docker and podman read
them, the environment, --creds, docker-credential helper programs (real ones, written by the tests), and the
parsing of WWW-Authenticate challenges and token scopes. Credentials used against a live registry (the token
server's refresh grant, a helper answering for a real registry) are in tests/oci/test_registry.py."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from diskport.errors import RegistryError, UsageError
from diskport.oci.auth import RegistryAuth, auth_files, parse_challenges, parse_creds, resolve_credentials
from diskport.oci.reference import parse_reference
from tests.support.oci import b64, write_helper, write_json


def test_parse_challenges() -> None:
    value = ('Bearer realm="https://auth.example.com/token",service="registry.example.com",'
             'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope", '
             'Basic realm="quoted \\"name\\", with comma"')
    bearer, basic = parse_challenges(value)
    assert bearer.scheme == "bearer"
    assert bearer.params == {"realm": "https://auth.example.com/token", "service": "registry.example.com",
                             "scope": "repository:a/b:pull,push repository:c:pull", "error": "insufficient_scope"}
    assert basic.scheme == "basic" and basic.params == {"realm": 'quoted "name", with comma'}
    assert [c.scheme for c in parse_challenges("Basic")] == ["basic"]
    assert parse_challenges("Bearer realm=unquoted,service=svc")[0].params == {"realm": "unquoted",
                                                                                "service": "svc"}


def test_scopes_merge_per_repository() -> None:
    auth = RegistryAuth("127.0.0.1:5000")
    auth.add_scopes("repository:a/b:pull", "repository:a/b:push,pull", "repository:c:pull repository:a/b:pull")
    assert auth.scopes == ("repository:a/b:pull,push", "repository:c:pull")
    assert auth.covers(httpx.URL("http://127.0.0.1:5000/v2/"))
    assert not auth.covers(httpx.URL("http://127.0.0.1:5001/v2/"))
    assert not auth.covers(httpx.URL("http://localhost:5000/v2/"))
    hub = RegistryAuth("registry-1.docker.io")
    assert hub.covers(httpx.URL("https://registry-1.docker.io/v2/"))
    assert not hub.covers(httpx.URL("http://registry-1.docker.io/v2/"))  # never credentials over plain http
    assert not hub.covers(httpx.URL("https://registry-1.docker.io:8443/v2/"))


def test_credentials_order_and_keys(tmp_path: Path) -> None:
    home = tmp_path / "h"
    docker_default = write_json(home / ".docker" / "config.json", {"auths": {
        "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass")},
        "quay.io": {"auth": b64("home:quay")},
        "http://reg.example:5000/v2/": {"auth": b64("old:style")},
        "reg.example:6000": {"username": "plain", "password": "fields"},
        "empty.example": {},
    }})
    env = {"HOME": str(home), "PATH": os.defpath}
    assert auth_files(env) == [docker_default]
    hub = resolve_credentials(parse_reference("alpine"), environ=env)
    assert hub is not None and (hub.username, hub.password) == ("hubuser", "hubpass")
    assert hub.source.startswith(str(docker_default))
    found = resolve_credentials("reg.example:5000", environ=env)
    assert found is not None and (found.username, found.password) == ("old", "style")
    found = resolve_credentials("reg.example:6000", environ=env)
    assert found is not None and (found.username, found.password) == ("plain", "fields")
    assert resolve_credentials("empty.example", environ=env) is None
    assert resolve_credentials("other.example", environ=env) is None

    # podman's file (XDG_RUNTIME_DIR) comes before ~/.docker; its namespace keys match the longest path
    run_dir = tmp_path / "run"
    write_json(run_dir / "containers" / "auth.json", {"auths": {
        "quay.io": {"auth": b64("podman:any")},
        "quay.io/team": {"auth": b64("podman:team")},
        "quay.io/team/special": {"auth": b64("podman:special")},
        "docker.io": {"auth": b64("podman:hub")},
    }})
    env["XDG_RUNTIME_DIR"] = str(run_dir)
    pick = {t: resolve_credentials(parse_reference(t), environ=env) for t in (
        "quay.io/other/x", "quay.io/team/x", "quay.io/team/special", "quay.io/team/specialist", "alpine")}
    assert {t: c.password for t, c in pick.items() if c} == {
        "quay.io/other/x": "any", "quay.io/team/x": "team", "quay.io/team/special": "special",
        "quay.io/team/specialist": "team", "alpine": "hub"}

    # DOCKER_CONFIG replaces ~/.docker and comes before XDG_RUNTIME_DIR; REGISTRY_AUTH_FILE before everything
    write_json(tmp_path / "dc" / "config.json", {"auths": {"quay.io": {"auth": b64("dockerconfig:x")}}})
    env["DOCKER_CONFIG"] = str(tmp_path / "dc")
    write_json(tmp_path / "raf.json", {"auths": {"quay.io/team": {"auth": b64("raf:x")}}})
    env["REGISTRY_AUTH_FILE"] = str(tmp_path / "raf.json")
    assert auth_files(env) == [tmp_path / "raf.json", tmp_path / "dc" / "config.json",
                               run_dir / "containers" / "auth.json"]
    users = {t: getattr(resolve_credentials(parse_reference(t), environ=env), "username", None)
             for t in ("quay.io/team/x", "quay.io/other/x", "alpine")}
    assert users == {"quay.io/team/x": "raf", "quay.io/other/x": "dockerconfig", "alpine": "podman"}

    # the environment beats the files, --creds beats everything
    env |= {"DISKPORT_USERNAME": "envuser", "DISKPORT_PASSWORD": "env:pass"}
    from_env = resolve_credentials("quay.io", environ=env)
    assert from_env is not None and (from_env.username, from_env.password) == ("envuser", "env:pass")
    explicit = resolve_credentials("quay.io", creds="me:pa:ss", environ=env)
    assert explicit is not None and (explicit.username, explicit.password, explicit.source) == ("me", "pa:ss",
                                                                                                 "--creds")
    with pytest.raises(UsageError, match="USER:PASSWORD"):
        parse_creds("no-colon")
    assert "pa:ss" not in repr(explicit)  # secrets stay out of reprs and logs


def test_credentials_identity_token_and_bad_files(tmp_path: Path) -> None:
    path = write_json(tmp_path / "c" / "config.json", {"auths": {
        "reg.example": {"auth": b64("alice:"), "identitytoken": "refresh-me"},
        "bad.example": {"auth": "%%%not base64%%%"},
    }})
    env = {"DOCKER_CONFIG": str(path.parent), "PATH": os.defpath}
    found = resolve_credentials("reg.example", environ=env)
    assert found is not None and (found.username, found.identity_token) == ("alice", "refresh-me")
    with pytest.raises(RegistryError, match="not base64") as err:
        resolve_credentials("bad.example", environ=env)
    assert str(path) in str(err.value)
    path.write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        resolve_credentials("reg.example", environ=env)


def test_credential_helpers(tmp_path: Path) -> None:
    log = tmp_path / "helper.log"
    bin_dir = tmp_path / "bin"
    write_helper(bin_dir, "test", {"reg.example:5000": ("helper-user", "helper-pass"),
                                   "https://index.docker.io/v1/": ("<token>", "hub-identity")}, log)
    write_helper(bin_dir, "store", {"store.example": ("store-user", "store-pass")}, log)
    config = write_json(tmp_path / "dc" / "config.json", {
        "credHelpers": {"reg.example:5000": "test", "docker.io": "test", "nothing.example": "test",
                        "missing.example": "absent"},
        "credsStore": "store",
        "auths": {"nothing.example": {"auth": b64("inline:fallback")}},
    })
    env = {"DOCKER_CONFIG": str(config.parent), "PATH": f"{bin_dir}{os.pathsep}{os.defpath}"}
    found = resolve_credentials("reg.example:5000", environ=env)
    assert found is not None and (found.username, found.password) == ("helper-user", "helper-pass")
    assert "docker-credential-test" in found.source
    hub = resolve_credentials(parse_reference("busybox"), environ=env)
    assert hub is not None and (hub.identity_token, hub.password) == ("hub-identity", "")
    # the helper has none: the inline entry is next
    fallback = resolve_credentials("nothing.example", environ=env)
    assert fallback is not None and fallback.username == "inline"
    # no credHelpers entry: the credsStore helper
    stored = resolve_credentials("store.example", environ=env)
    assert stored is not None and (stored.username, stored.password) == ("store-user", "store-pass")
    assert resolve_credentials("unknown.example", environ=env) is None
    assert log.read_text().splitlines() == ["reg.example:5000", "https://index.docker.io/v1/", "nothing.example",
                                            "store.example", "unknown.example"]
    with pytest.raises(RegistryError, match="docker-credential-absent is not installed"):
        resolve_credentials("missing.example", environ=env)
    # a credsStore helper that is not installed is skipped (docker desktop configs in containers)
    write_json(config, {"credsStore": "desktop", "auths": {}})
    assert resolve_credentials("store.example", environ=env) is None
