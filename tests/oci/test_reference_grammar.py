"""One image-reference grammar (oci/reference.py) for every place a name is read: the CLI's -t, build's layout
tag, a docker-archive's RepoTags, pushes and pulls. A Unicode tag such as ``tägg`` is refused by each, and
``-t disk@sha256:HEX`` is refused as a digest instead of becoming the tag ``HEX``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from diskport.errors import UsageError
from diskport.oci.build import build_image
from diskport.oci.reference import check_image_name, is_tag, layout_tag, parse_reference, repo_tag
from tests.support import MiB
from tests.support.clients import run_cli
from tests.support.images import make_image

HEX = hashlib.sha256(b"diskport").hexdigest()
DIGEST_REF = f"disk@sha256:{HEX}"


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("text", ["tägg", "disk:tägg", "quay.io/org/disk:tägg", "docker://disk:tägg"])
def test_unicode_tag_refused_by_the_parser(text: str) -> None:
    assert not is_tag("tägg")
    with pytest.raises(UsageError):
        parse_reference(text)
    with pytest.raises(UsageError):
        check_image_name(text)
    with pytest.raises(UsageError):
        repo_tag(text)


def test_unicode_tag_refused_by_with_reference() -> None:
    ref = parse_reference("quay.io/org/disk:v1")
    with pytest.raises(UsageError, match="neither a tag nor a sha256 digest"):
        ref.with_reference("tägg")
    assert ref.with_reference("v2").tag == "v2"


def test_digest_reference_is_a_digest_not_a_tag() -> None:
    ref = parse_reference(DIGEST_REF)
    assert ref.digest == f"sha256:{HEX}" and ref.tag is None
    assert ref.reference == f"sha256:{HEX}"
    with pytest.raises(UsageError, match="digest"):
        check_image_name(DIGEST_REF)
    with pytest.raises(UsageError, match="digest"):
        repo_tag(DIGEST_REF)


def test_build_accepts_tags_and_references_by_the_same_grammar() -> None:
    for good in ("v1", "V1", "40", "1.0-rc_2", "disk:v1", "quay.io/org/disk:v1", "127.0.0.1:5000/vm/disk"):
        assert check_image_name(good) == good
    for bad in ("tägg", "bad tag", ".hidden", "-dash", "UPPER:case", "x:" + "y" * 129):
        with pytest.raises(UsageError):
            check_image_name(bad)


@pytest.mark.parametrize("tag", ["tägg", "disk:tägg", DIGEST_REF])
def test_build_image_refuses_before_writing(tmp_path: Path, tag: str) -> None:
    disk = make_image(tmp_path, "raw", MiB, name="d.raw")
    with pytest.raises(UsageError):
        build_image({"amd64": str(disk)}, output=str(tmp_path / "o.oci"), tag=tag)
    with pytest.raises(UsageError):
        build_image({"amd64": str(disk)}, docker_archive=str(tmp_path / "a.tar"), tag=tag)
    assert listing(tmp_path) == ["d.raw"]


@pytest.mark.parametrize("tag", ["tägg", "disk:tägg", DIGEST_REF])
def test_cli_build_refuses_tag(tmp_path: Path, tag: str) -> None:
    disk = make_image(tmp_path, "raw", MiB, name="d.raw")
    for extra in (["--output", str(tmp_path / "o.oci")], ["--docker-archive", str(tmp_path / "a.tar")]):
        proc = run_cli("build", "-q", disk, "-t", tag, *extra)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 2
        if tag == DIGEST_REF:
            assert "digest" in proc.stderr
    assert listing(tmp_path) == ["d.raw"]


def test_cli_build_tags_the_layout_by_the_reference_tag(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "raw", MiB, name="d.raw")
    layout = tmp_path / "o.oci"
    assert run_cli("build", "-q", disk, "-t", "quay.io/org/disk:v7", "--output", layout).returncode == 0
    assert '"org.opencontainers.image.ref.name":"v7"' in (layout / "index.json").read_text().replace(" ", "")


def test_layout_tag_follows_the_grammar() -> None:
    """Tags may be upper case (distribution's tag is [\\w][\\w.-]{0,127}); repository components may not."""
    cases = {"V1": "V1", "v1": "v1", "disk": "disk", "disk:V7": "V7", "quay.io/org/disk:Rc_1.0": "Rc_1.0",
             "127.0.0.1:5000/vm/disk": "127.0.0.1:5000/vm/disk", "X" * 128: "X" * 128}
    assert {text: layout_tag(text) for text in cases} == cases
    for bad in ("UPPER:case", "org/Disk:v1", ".V1", "X" * 129, DIGEST_REF, "tägg"):
        with pytest.raises(UsageError):
            layout_tag(bad)


@pytest.mark.parametrize("text,tag", [("V1", "V1"), ("quay.io/org/disk:Beta-2", "Beta-2")])
def test_cli_build_takes_an_upper_case_tag_for_a_layout(tmp_path: Path, text: str, tag: str) -> None:
    disk = make_image(tmp_path, "raw", MiB, name="d.raw")
    layout = tmp_path / "o.oci"
    proc = run_cli("build", "-q", disk, "-t", text, "--output", layout)
    assert proc.returncode == 0, proc.stderr
    assert f'"org.opencontainers.image.ref.name":"{tag}"' in (layout / "index.json").read_text().replace(" ", "")


def test_cli_build_refuses_an_upper_case_repository(tmp_path: Path) -> None:
    """A docker-archive's RepoTags and a push need a repository, and ``V1`` read as one is not lowercase."""
    disk = make_image(tmp_path, "raw", MiB, name="d.raw")
    for args in (["--docker-archive", str(tmp_path / "a.tar")],
                 ["--output", str(tmp_path / "o.oci"), "-t", "org/Disk:v1"], ["--push"]):
        proc = run_cli("build", "-q", disk, "-t", "V1", *args)
        assert proc.returncode == 2, proc.stderr
        assert "lowercase" in proc.stderr and "Traceback" not in proc.stderr
    assert listing(tmp_path) == ["d.raw"]


@pytest.mark.parametrize("command", ["push", "pull"])
def test_cli_push_and_pull_refuse_unicode_tag(tmp_path: Path, command: str) -> None:
    args = ["push", str(tmp_path), "127.0.0.1:9/vm/disk:tägg"] if command == "push" else \
        ["pull", "127.0.0.1:9/vm/disk:tägg", str(tmp_path / "out.raw")]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "tägg" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.raw").exists()
