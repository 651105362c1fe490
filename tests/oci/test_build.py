"""containerDisk builds (OCI layouts, docker-archives) checked by independent readers: skopeo, umoci, GNU tar,
Python's tarfile and qemu-img."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from diskport.errors import CorruptImage, DiskportError, SourceError, UnsafeImage, UnsupportedImage, UsageError
from diskport.oci import layer as layer_mod
from diskport.oci.build import (
    BuildResult,
    build_image,
    default_output,
    disk_file_name,
    source_date_epoch,
)
from diskport.oci.layer import check_disk_name, layer_header, tar_size, write_layer, write_tar
from diskport.oci.layout import read_layout
from diskport.oci.media import (
    ANNOTATION_CREATED,
    ANNOTATION_REF_NAME,
    ANNOTATION_SOURCE,
    ANNOTATION_TITLE,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
)
from diskport.oci.platform import parse_platform
from diskport.writers import RawWriter
from tests.support import MiB
from tests.support.clients import qemu_img, require_tool, run, run_cli, skopeo, skopeo_json, umoci
from tests.support.images import make_image, qemu_raw_sha256, sha256_file
from tests.support.oci import decompress, image_of, layer_tar

GiB = 1024 * MiB
MEDIA = {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}


@pytest.fixture(autouse=True)
def _no_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


def assert_container_disk(tar_bytes: bytes, name: str, disk: bytes, mtime: int = 0) -> None:
    """Exactly ``disk/`` (0555) and ``disk/<name>`` (0444), both 107:107, time ``mtime``, content ``disk``."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        members = tf.getmembers()
        assert [(m.name, m.type) for m in members] == [("disk", tarfile.DIRTYPE), (f"disk/{name}", tarfile.REGTYPE)]
        directory, file = members
        assert (directory.mode, file.mode) == (0o555, 0o444)
        assert {(m.uid, m.gid) for m in members} == {(107, 107)}
        assert {m.mtime for m in members} == {mtime}
        assert file.size == len(disk)
        assert file.offset_data % 4096 == 0
        extracted = tf.extractfile(file)
        assert extracted is not None
        assert extracted.read() == disk


def check_layout_image(out: Path, tag: str | None, name: str, disk: Path, compression: str, *,
                       arch: str = "amd64", mtime: int = 0) -> tuple[Descriptor, str]:
    """Everything a layout image must be; returns the layer descriptor and the diff_id."""
    layout = read_layout(out)
    manifest, _, config = image_of(layout, tag, arch)
    assert manifest["mediaType"] == OCI_MANIFEST and manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    assert config["architecture"] == arch and config["os"] == "linux"
    assert config["rootfs"]["type"] == "layers"
    assert manifest["annotations"][ANNOTATION_TITLE] == name
    assert manifest["annotations"][ANNOTATION_CREATED] == config["created"]
    [layer] = [Descriptor.from_json(d) for d in manifest["layers"]]
    assert layer.media_type == MEDIA[compression]
    tar_bytes = layer_tar(layout, layer)
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    assert config["rootfs"]["diff_ids"] == [diff_id]
    assert len(tar_bytes) == tar_size(disk.stat().st_size, name)
    assert_container_disk(tar_bytes, name, disk.read_bytes(), mtime)
    for d in layout.walk(layout.resolve(tag)):
        layout.verify_blob(d)
    return layer, diff_id


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- layouts read by skopeo and umoci -----------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_layout_accepted_by_skopeo_and_umoci(tmp_path: Path, fmt: str, compression: str) -> None:
    disk = make_image(tmp_path, fmt, 12 * MiB, name=f"fedora.{fmt}")
    out = tmp_path / "fedora.oci"
    result = build_image({"amd64": str(disk)}, output=str(out), tag="v1", compression=compression,
                         source="https://example.com/fedora")
    assert result.output == str(out) and result.index_digest is None
    image = result.images["amd64"]
    assert (image.disk_format, image.disk_name, image.converted) == (fmt, f"fedora.{fmt}", False)
    layer, diff_id = check_layout_image(out, "v1", f"fedora.{fmt}", disk, compression)
    assert image.layer is not None and image.layer.descriptor == layer and image.layer.diff_id == diff_id
    assert (compression == "none") == (layer.digest == diff_id)

    index = json.loads((out / "index.json").read_text())
    [entry] = index["manifests"]
    assert entry["annotations"][ANNOTATION_REF_NAME] == "v1"
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert json.loads((out / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    manifest = json.loads((out / "blobs" / "sha256" / entry["digest"][7:]).read_bytes())
    assert manifest["annotations"][ANNOTATION_SOURCE] == "https://example.com/fedora"

    inspected = skopeo_json(tmp_path, "inspect", f"oci:{out}:v1")
    assert (inspected["Architecture"], inspected["Os"]) == ("amd64", "linux")
    assert inspected["Layers"] == [layer.digest]
    assert inspected["Digest"] == entry["digest"]
    copied = tmp_path / "copied"
    skopeo(tmp_path, "copy", f"oci:{out}:v1", f"dir:{copied}")
    assert sha256_file(copied / layer.digest[7:]) == layer.digest[7:]

    # containers/storage (what podman and CRI-O use) applies the layer: owners, modes and bytes as asked.
    store = tmp_path / "store"
    skopeo(tmp_path, "copy", f"oci:{out}:v1", f"containers-storage:[vfs@{store}/root+{store}/run]localhost/fedora:v1")
    [applied] = (store / "root" / "vfs" / "dir").glob(f"*/disk/fedora.{fmt}")
    info = applied.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (107, 107, 0o444)
    assert (applied.parent.stat().st_mode & 0o7777) == 0o555
    assert applied.read_bytes() == disk.read_bytes()

    if compression != "zstd":  # umoci 0.4.7 reads gzip and uncompressed layers only
        bundle = tmp_path / "bundle"
        umoci("unpack", "--rootless", "--image", f"{out}:v1", bundle)
        assert (bundle / "rootfs" / "disk" / f"fedora.{fmt}").read_bytes() == disk.read_bytes()
        assert "v1" in umoci("ls", "--layout", out).stdout.split()


def test_gnu_tar_reads_the_layer(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "qcow2", 6 * MiB, name="disk.qcow2")
    out = tmp_path / "disk.oci"
    result = build_image({"amd64": str(disk)}, output=str(out), compression="none")
    assert result.images["amd64"].layer is not None
    blob = out / "blobs" / "sha256" / result.images["amd64"].layer.descriptor.digest[7:]
    gnu_tar = require_tool("tar")
    listed = run(gnu_tar, "--numeric-owner", "-tvf", blob).stdout.splitlines()
    assert [line.split()[:2] for line in listed] == [["dr-xr-xr-x", "107/107"], ["-r--r--r--", "107/107"]]
    assert [line.split()[-1] for line in listed] == ["disk/", "disk/disk.qcow2"]
    target = tmp_path / "x"
    target.mkdir()
    run(gnu_tar, "-xf", blob, "-C", target)
    assert (target / "disk" / "disk.qcow2").read_bytes() == disk.read_bytes()


def test_sparse_disk_leaves_holes_in_an_uncompressed_blob(tmp_path: Path) -> None:
    disk = tmp_path / "sparse.raw"
    with open(disk, "wb") as f:
        f.truncate(96 * MiB)
        f.seek(40 * MiB)
        f.write(os.urandom(MiB))
    dense = tmp_path / "dense.raw"  # every block allocated, mostly zeros: found by the zero scan
    shutil.copyfile(disk, dense)
    with open(dense, "r+b") as f:
        f.write(bytes(96 * MiB))
        f.seek(40 * MiB)
        f.write(disk.read_bytes()[40 * MiB: 41 * MiB])
    assert dense.stat().st_blocks * 512 >= 96 * MiB
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    sparse_layer = write_layer(str(disk), "disk.raw", str(blobs), "none", mtime=0)
    dense_layer = write_layer(str(dense), "disk.raw", str(blobs), "none", mtime=0)
    assert sparse_layer == dense_layer  # same bytes, same digest, whatever the file's allocation
    blob = blobs / sparse_layer.descriptor.digest[7:]
    assert blob.stat().st_size == tar_size(96 * MiB, "disk.raw")
    assert blob.stat().st_blocks * 512 < 8 * MiB  # the 95 MiB of zeros were not written
    assert sha256_file(blob) == sparse_layer.descriptor.digest[7:]


# --- reproducibility ----------------------------------------------------------------------------------------------

def _digests(result: BuildResult) -> tuple[str | None, str, str]:
    image = result.images["amd64"]
    assert result.descriptor is not None and image.layer is not None
    return result.descriptor.digest, image.layer.descriptor.digest, image.layer.diff_id


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_same_disk_same_digests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str) -> None:
    disk = make_image(tmp_path, "qcow2", 20 * MiB, name="disk.qcow2")
    first = build_image({"amd64": str(disk)}, output=str(tmp_path / "a"), compression=compression)
    second = build_image({"amd64": str(disk)}, output=str(tmp_path / "b"), compression=compression)
    assert _digests(first) == _digests(second)
    assert listing(tmp_path / "a" / "blobs" / "sha256") == listing(tmp_path / "b" / "blobs" / "sha256")
    assert first.created == "1970-01-01T00:00:00Z"

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = build_image({"amd64": str(disk)}, output=str(tmp_path / "c"), compression=compression)
    assert dated.created == "2023-11-14T22:13:20Z"
    a, b, c = _digests(first), _digests(dated), _digests(second)
    assert a != b and a[2] != b[2] and a == c
    check_layout_image(tmp_path / "c", None, "disk.qcow2", disk, compression, mtime=1700000000)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_output_independent_of_threads_and_allocation(tmp_path: Path, compression: str) -> None:
    disk = tmp_path / "mixed.raw"
    with open(disk, "wb") as f:  # data, text and runs of whole 8 MiB hole windows, the last window a hole too
        f.truncate(64 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(5 * MiB))
        f.seek(41 * MiB + 123)
        f.write(b"containerDisk " * 300000)
    dense = tmp_path / "dense.raw"
    run("cp", "--sparse=never", disk, dense)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    layers = [write_layer(str(path), "disk.raw", str(blobs), compression, mtime=0, threads=threads)
              for path in (disk, dense) for threads in (1, 4)]
    built = layers[0]
    assert all(layer == built for layer in layers)
    blob = (blobs / built.descriptor.digest[7:]).read_bytes()
    assert len(blob) == built.descriptor.size
    tar_bytes = decompress(blob, built.descriptor.media_type)
    assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == built.diff_id
    assert_container_disk(tar_bytes, "disk.raw", disk.read_bytes())
    if compression == "gzip":
        assert blob[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # mtime 0, no name, OS fixed
        assert run(require_tool("gzip"), "-t", blobs / built.descriptor.digest[7:]).returncode == 0


def test_source_date_epoch_validated() -> None:
    assert source_date_epoch({"SOURCE_DATE_EPOCH": "1234"}) == 1234
    assert source_date_epoch({}) == 0
    for bad in ("-5", "yesterday", "1.5", str(8**11)):
        with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH"):
            source_date_epoch({"SOURCE_DATE_EPOCH": bad})


# --- docker-archive ----------------------------------------------------------------------------------------------

def test_docker_archive_read_by_skopeo(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "qcow2", 10 * MiB, name="rhel.qcow2")
    archive = tmp_path / "rhel.tar"
    result = build_image({"amd64": str(disk)}, docker_archive=str(archive), tag="example.com/vm/rhel:9")
    assert result.output is None and result.docker_archive == str(archive)
    built = result.images["amd64"].archive
    assert built is not None and built.size == archive.stat().st_size

    inspected = skopeo_json(tmp_path, "inspect", f"docker-archive:{archive}")
    assert inspected["Architecture"] == "amd64"
    assert inspected["Layers"] == [built.diff_id]

    with tarfile.open(archive) as outer:
        names = [m.name for m in outer.getmembers()]
        assert names == ["layer/layer.tar", f"{built.config_digest[7:]}.json", "manifest.json"]
        inner_member = outer.getmember("layer/layer.tar")
        assert inner_member.offset_data == 4096 and inner_member.size == built.tar_size
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert manifest == [{"Config": f"{built.config_digest[7:]}.json", "RepoTags": ["example.com/vm/rhel:9"],
                             "Layers": ["layer/layer.tar"]}]
        inner = outer.extractfile(inner_member).read()  # type: ignore[union-attr]
    assert "sha256:" + hashlib.sha256(inner).hexdigest() == built.diff_id
    assert_container_disk(inner, "rhel.qcow2", disk.read_bytes())

    by_name = skopeo_json(tmp_path, "inspect", f"docker-archive:{archive}:example.com/vm/rhel:9")  # by its RepoTag
    assert by_name["Digest"] == inspected["Digest"]
    copied = tmp_path / "copied.oci"
    skopeo(tmp_path, "copy", f"docker-archive:{archive}", f"oci:{copied}:9")
    layout = read_layout(copied)  # a layout skopeo wrote: the reader is general
    manifest_json, _, config = image_of(layout, "9")
    assert config["rootfs"]["diff_ids"] == [built.diff_id]
    [layer] = [Descriptor.from_json(d) for d in manifest_json["layers"]]
    assert_container_disk(layer_tar(layout, layer), "rhel.qcow2", disk.read_bytes())
    walked = list(layout.walk(layout.resolve("9")))
    assert walked[-1] == layout.resolve("9") and len(walked) == 3


def test_layout_and_archive_together(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "raw", 4 * MiB, name="small.img")
    result = build_image(str(disk), output=str(tmp_path / "l.oci"), docker_archive=str(tmp_path / "a.tar"),
                         tag="small:1")
    image = next(iter(result.images.values()))
    assert image.layer is not None and image.archive is not None
    assert image.layer.diff_id == image.archive.diff_id  # the same tar in both
    assert image.config is not None and image.config.digest == image.archive.config_digest
    assert skopeo_json(tmp_path, "inspect", f"docker-archive:{tmp_path / 'a.tar'}")["Layers"] == [image.archive.diff_id]


# --- several architectures ----------------------------------------------------------------------------------------

def test_multi_arch_index(tmp_path: Path) -> None:
    amd = make_image(tmp_path, "qcow2", 6 * MiB, name="fedora-x86_64.qcow2", seed=1)
    arm = make_image(tmp_path, "raw", 6 * MiB, name="fedora-aarch64.raw", seed=2)
    out = tmp_path / "fedora.oci"
    result = build_image({"x86_64": str(amd), "arm64": str(arm)}, output=str(out), tag="40", compression="zstd")
    assert sorted(result.images) == ["amd64", "arm64"]
    assert result.descriptor is not None and result.descriptor.media_type == OCI_INDEX
    assert result.index_digest == result.descriptor.digest

    index_json = json.loads((out / "index.json").read_text())
    [entry] = index_json["manifests"]
    assert entry["mediaType"] == OCI_INDEX and entry["annotations"][ANNOTATION_REF_NAME] == "40"
    raw = skopeo_json(tmp_path, "inspect", "--raw", f"oci:{out}:40")
    assert raw["mediaType"] == OCI_INDEX
    assert sorted((m["platform"]["architecture"], m["platform"]["os"]) for m in raw["manifests"]) == [
        ("amd64", "linux"), ("arm64", "linux")]
    for arch, disk in (("amd64", amd), ("arm64", arm)):
        layer, _ = check_layout_image(out, "40", disk.name, disk, "zstd", arch=arch)
        inspected = skopeo_json(tmp_path, "inspect", "--override-arch", arch, f"oci:{out}:40")
        assert inspected["Architecture"] == arch and inspected["Layers"] == [layer.digest]
    layout = read_layout(out)
    walked = list(layout.walk(layout.resolve("40")))
    assert walked[-1].digest == result.index_digest and len(walked) == 7  # 2 x (layer, config, manifest) + index
    assert [d.media_type for d in walked].index(OCI_MANIFEST) > [d.media_type for d in walked].index(OCI_CONFIG)


def test_multi_arch_docker_archive_refused(tmp_path: Path) -> None:
    a = make_image(tmp_path, "raw", MiB, name="a.raw", seed=1)
    b = make_image(tmp_path, "raw", MiB, name="b.raw", seed=2)
    with pytest.raises(UsageError, match="one architecture"):
        build_image({"amd64": str(a), "arm64": str(b)}, docker_archive=str(tmp_path / "x.tar"))
    assert listing(tmp_path) == ["a.raw", "b.raw"]


def test_platform_names() -> None:
    assert parse_platform("aarch64") == {"architecture": "arm64", "os": "linux"}
    assert parse_platform("linux/amd64") == {"architecture": "amd64", "os": "linux"}
    assert parse_platform("arm/v7") == {"architecture": "arm", "os": "linux", "variant": "v7"}
    for bad in ("sparc", "amd64/x", ""):
        with pytest.raises(UsageError, match="architecture"):
            parse_platform(bad)


# --- large disks ----------------------------------------------------------------------------------------------

def test_header_of_a_disk_past_8_gib() -> None:
    size = 9 * GiB + 512
    header = layer_header("big.raw", size, 0)
    assert len(header) == 4096
    with tarfile.open(fileobj=io.BytesIO(header + bytes(1024)), mode="r|") as tf:
        first = tf.next()
        second = tf.next()
    assert first is not None and second is not None
    assert (first.name, second.name, second.size) == ("disk", "disk/big.raw", size)
    assert second.pax_headers["size"] == str(size)
    assert tar_size(size, "big.raw") == 4096 + size + 1024


@pytest.mark.slow
def test_sparse_9_gib_disk(tmp_path: Path) -> None:
    """A 9 GiB raw disk, almost all hole: a valid PAX tar whose member reads back as 9 GiB; almost nothing is
    written. (Slow only because sha256 must still see 9 GiB of zeros.)"""
    disk = tmp_path / "big.raw"
    marks = {0: b"first", 8 * GiB - 3: b"straddle", 9 * GiB - 4: b"last"}
    with open(disk, "wb") as f:
        f.truncate(9 * GiB)
        for offset, data in marks.items():
            f.seek(offset)
            f.write(data)
    out = tmp_path / "big.oci"
    result = build_image({"amd64": str(disk)}, output=str(out), compression="none")
    layer = result.images["amd64"].layer
    assert layer is not None
    blob = out / "blobs" / "sha256" / layer.descriptor.digest[7:]
    assert blob.stat().st_size == layer.descriptor.size == tar_size(9 * GiB, "big.raw")
    assert blob.stat().st_blocks * 512 < 4 * MiB
    with tarfile.open(blob) as tf:
        member = tf.getmember("disk/big.raw")
        assert member.size == 9 * GiB and member.mode == 0o444
        content = tf.extractfile(member)
        assert content is not None
        for offset, expected in marks.items():
            content.seek(offset)
            assert content.read(len(expected)) == expected
    listed = run(require_tool("tar"), "--numeric-owner", "-tvf", blob).stdout
    assert str(9 * GiB) in listed and "disk/big.raw" in listed
    assert skopeo_json(tmp_path, "inspect", f"oci:{out}")["Layers"] == [layer.descriptor.digest]


# --- refusals, warnings, conversion -------------------------------------------------------------------------------

def test_backing_file_refused(tmp_path: Path) -> None:
    base = make_image(tmp_path, "qcow2", 4 * MiB, name="base.qcow2")
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", overlay)
    with pytest.raises(UnsafeImage, match="backing file"):
        build_image({"amd64": str(overlay)}, output=str(tmp_path / "out.oci"))
    with pytest.raises(UnsafeImage, match="backing file"):  # converting does not make it safe
        build_image({"amd64": str(overlay)}, output=str(tmp_path / "out.oci"), convert_to="qcow2")
    assert listing(tmp_path) == ["base.qcow2", "overlay.qcow2"]


def test_external_data_file_refused(tmp_path: Path) -> None:
    image = tmp_path / "meta.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.bin'}", image, "4M")
    with pytest.raises(UnsafeImage, match="external data file"):
        build_image({"amd64": str(image)}, output=str(tmp_path / "out.oci"))
    assert listing(tmp_path) == ["data.bin", "meta.qcow2"]


def test_multi_file_vmdk_needs_convert(tmp_path: Path) -> None:
    descriptor = tmp_path / "flat.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", descriptor, "4M")
    run(require_tool("qemu-io"), "-f", "vmdk", "-c", "write -P 0x5c 1M 64k", descriptor)
    with pytest.raises(UnsupportedImage, match="data lies in other files"):
        build_image({"amd64": str(descriptor)}, output=str(tmp_path / "out.oci"))
    assert not (tmp_path / "out.oci").exists()
    result = build_image({"amd64": str(descriptor)}, output=str(tmp_path / "out.oci"), convert_to="qcow2")
    assert result.images["amd64"].disk_name == "flat.qcow2"


def test_corrupt_header_refused(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "qcow2", 4 * MiB, name="broken.qcow2")
    os.truncate(disk, 100)
    with pytest.raises(CorruptImage):
        build_image({"amd64": str(disk)}, output=str(tmp_path / "out.oci"))
    assert listing(tmp_path) == ["broken.qcow2"]


@pytest.mark.parametrize("fmt", ["vmdk", "vpc"])
def test_unbootable_format_warns(tmp_path: Path, fmt: str) -> None:
    disk = make_image(tmp_path, fmt, 4 * MiB, name=f"legacy.{fmt}")
    heard: list[str] = []
    result = build_image({"amd64": str(disk)}, output=str(tmp_path / "out.oci"), warn=heard.append)
    assert len(heard) == 1 and "CDI" in heard[0] and "--convert qcow2" in heard[0]
    assert result.warnings == heard
    assert result.images["amd64"].disk_format == fmt
    check_layout_image(tmp_path / "out.oci", None, f"legacy.{fmt}", disk, "gzip")


@pytest.mark.parametrize(("fmt", "compression"), [("vmdk", None), ("vpc", "zstd"), ("qcow2", "zlib")])
def test_convert_to_qcow2(tmp_path: Path, fmt: str, compression: str | None) -> None:
    disk = make_image(tmp_path, fmt, 8 * MiB, name=f"legacy.{fmt}")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    heard: list[str] = []
    phases: list[str] = []
    out = tmp_path / "out.oci"
    result = build_image({"amd64": str(disk)}, output=str(out), convert_to="qcow2", convert_compression=compression,
                         scratch_dir=str(scratch), warn=heard.append, phase=phases.append)
    assert heard == [] and phases == ["convert amd64", "package amd64"]
    assert listing(scratch) == []
    image = result.images["amd64"]
    assert (image.disk_name, image.disk_format, image.source_format, image.converted) == (
        "legacy.qcow2", "qcow2", fmt, True)
    layout = read_layout(out)
    manifest, _, _ = image_of(layout, None)
    [layer] = [Descriptor.from_json(d) for d in manifest["layers"]]
    with tarfile.open(fileobj=io.BytesIO(layer_tar(layout, layer))) as tf:
        assert tf.getnames() == ["disk", "disk/legacy.qcow2"]
        tf.extract("disk/legacy.qcow2", tmp_path / "x", filter="data")
    inside = tmp_path / "x" / "disk" / "legacy.qcow2"
    info = json.loads(qemu_img("info", "--output=json", inside).stdout)
    assert info["format"] == "qcow2"
    if compression is not None:
        assert info["format-specific"]["data"]["compression-type"] == compression
        assert info["actual-size"] < 8 * MiB
    assert qemu_raw_sha256(inside, tmp_path) == qemu_raw_sha256(disk, tmp_path, fmt)


def test_compressed_disk_needs_convert(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "qcow2", 4 * MiB, name="disk.qcow2")
    packed = tmp_path / "disk.qcow2.gz"
    packed.write_bytes(gzip.compress(disk.read_bytes()))
    out = tmp_path / "out.oci"
    with pytest.raises(UsageError, match=r"gzip-compressed.*--convert qcow2"):
        build_image({"amd64": str(packed)}, output=str(out))
    assert not out.exists()
    result = build_image({"amd64": str(packed)}, output=str(out), convert_to="qcow2")
    assert result.images["amd64"].disk_name == "disk.qcow2"
    assert result.images["amd64"].source_format == "gzip"
    assert listing(tmp_path) == ["disk.qcow2", "disk.qcow2.gz", "out.oci"]


def test_existing_output(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "raw", MiB, name="disk.raw")
    out = tmp_path / "disk.oci"
    first = build_image({"amd64": str(disk)}, output=str(out), tag="a")
    with pytest.raises(UsageError, match="already exists"):
        build_image({"amd64": str(disk)}, output=str(out), tag="b")
    assert read_layout(out).ref_names() == ["a"]
    second = build_image({"amd64": str(disk)}, output=str(out), tag="b", force=True)
    assert read_layout(out).ref_names() == ["b"] and first.descriptor == second.descriptor
    archive = tmp_path / "disk.tar"
    archive.write_bytes(b"keep")
    with pytest.raises(UsageError, match="already exists"):
        build_image({"amd64": str(disk)}, docker_archive=str(archive))
    assert archive.read_bytes() == b"keep"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an OCI image layout"):
        build_image({"amd64": str(disk)}, output=str(precious), force=True)
    assert listing(precious) == ["notes.txt"]
    assert listing(tmp_path) == ["disk.oci", "disk.raw", "disk.tar", "precious"]


def _interrupt_after(calls: int) -> Callable[[int, int], None]:
    seen = [0]

    def progress(done: int, total: int) -> None:
        seen[0] += 1
        if seen[0] >= calls:
            raise KeyboardInterrupt

    return progress


@pytest.mark.parametrize("target", ["gzip", "zstd", "none", "docker-archive"])
def test_interrupted_build_leaves_nothing(tmp_path: Path, target: str) -> None:
    disk = make_image(tmp_path, "raw", 40 * MiB, name="disk.raw")
    out = tmp_path / "out"
    kwargs: dict[str, Any] = ({"docker_archive": str(out)} if target == "docker-archive"
                              else {"output": str(out), "compression": target})
    with pytest.raises(KeyboardInterrupt):
        build_image({"amd64": str(disk)}, progress=_interrupt_after(2), **kwargs)
    assert listing(tmp_path) == ["disk.raw"]
    assert [t.name for t in threading.enumerate() if t.name.startswith("diskport-")] == []


def test_disk_changing_during_build_fails_cleanly(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "raw", 48 * MiB, name="disk.raw")
    before = disk.stat().st_size

    def shrink(done: int, total: int) -> None:
        if disk.stat().st_size == before:
            os.truncate(disk, 4 * MiB)

    with pytest.raises(SourceError, match="changed while it was being read"):
        build_image({"amd64": str(disk)}, output=str(tmp_path / "out.oci"), compression="none", progress=shrink)
    assert listing(tmp_path) == ["disk.raw"]


def test_missing_disk(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        build_image({"amd64": str(tmp_path / "nope.qcow2")}, output=str(tmp_path / "out.oci"))
    assert listing(tmp_path) == []


def test_progress_reaches_the_tar_size(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "raw", 20 * MiB, name="disk.raw")
    seen: list[tuple[int, int]] = []
    build_image({"amd64": str(disk)}, output=str(tmp_path / "o"), progress=lambda d, t: seen.append((d, t)))
    total = tar_size(20 * MiB, "disk.raw")
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# --- names, options -----------------------------------------------------------------------------------------------

def test_disk_names() -> None:
    for bad in ("", ".", "..", "a/b", "line\nbreak", "x" * 256):
        with pytest.raises(UsageError):
            check_disk_name(bad)
    assert disk_file_name("/images/fedora.vmdk", "qcow2") == "fedora.qcow2"
    assert disk_file_name("/images/fedora.img.xz", "qcow2") == "fedora.qcow2"
    assert disk_file_name("/images/fedora.img.xz") == "fedora.img.xz"
    assert default_output("/images/fedora.qcow2") == os.path.join(".", "fedora.oci")


@pytest.mark.parametrize("name", ["ディスク.img", "d" * 150 + ".raw"])
def test_long_and_unicode_names_use_pax_path(tmp_path: Path, name: str) -> None:
    disk = tmp_path / "src.raw"
    disk.write_bytes(os.urandom(64 * 1024))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    built = write_layer(str(disk), name, str(blobs), "none", mtime=0)
    tar_bytes = (blobs / built.descriptor.digest[7:]).read_bytes()
    assert len(tar_bytes) == tar_size(64 * 1024, name)
    assert_container_disk(tar_bytes, name, disk.read_bytes())
    listed = run(require_tool("tar"), "-tf", blobs / built.descriptor.digest[7:]).stdout.splitlines()
    assert listed == ["disk/", f"disk/{name}"]


def test_bad_options(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "raw", MiB, name="d.raw")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"compression": "brotli"}, "compression"),
        ({"convert_to": "vmdk"}, "convert"),
        ({"convert_compression": "zstd"}, "--convert qcow2"),
        ({"tag": "bad tag"}, "tag"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(UsageError, match=needle):
            build_image({"amd64": str(disk)}, output=str(tmp_path / "o"), **kwargs)
    with pytest.raises(UsageError, match="repository names must be lowercase"):
        build_image({"amd64": str(disk)}, docker_archive=str(tmp_path / "a.tar"), tag="UPPER:case")
    assert listing(tmp_path) == ["d.raw"]


# --- the layout reader --------------------------------------------------------------------------------------------

def test_layout_reader_refuses_broken_layouts(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "raw", MiB, name="d.raw")
    out = tmp_path / "d.oci"
    result = build_image({"amd64": str(disk)}, output=str(out), tag="t")
    layout = read_layout(out)
    top = layout.resolve("t")
    assert result.descriptor is not None and top.digest == result.descriptor.digest
    with pytest.raises(UsageError, match="no image tagged 'u'"):
        layout.resolve("u")
    for bad in ("sha256:../../etc/passwd", "md5:abc", "sha256:" + "A" * 64):
        with pytest.raises(CorruptImage, match="not a sha256 digest"):
            layout.blob_path(bad)
    config_desc = Descriptor.from_json(layout.read_json_blob(top.digest)["config"])
    config_path = Path(layout.blob_path(config_desc.digest))
    config_path.write_bytes(config_path.read_bytes().replace(b"amd64", b"arm64"))
    with pytest.raises(CorruptImage, match="does not match its digest"):
        layout.read_json_blob(config_desc.digest)
    with pytest.raises(CorruptImage, match="does not match"):
        for desc in layout.walk(top):
            layout.verify_blob(desc)
    config_path.unlink()
    config_path.symlink_to("/etc/hostname")
    with pytest.raises(CorruptImage, match="leaves the layout"):
        layout.read_json_blob(config_desc.digest)
    with pytest.raises(CorruptImage, match="larger than"):
        layout.read_json_blob(top.digest, limit=10)

    (out / "index.json").write_text("{not json")
    with pytest.raises(CorruptImage, match=r"index\.json is not valid JSON"):
        read_layout(out)
    (out / "oci-layout").unlink()
    with pytest.raises(SourceError, match="not an OCI image layout"):
        read_layout(out)
    with pytest.raises(SourceError, match="no such folder"):
        read_layout(tmp_path / "missing")


def test_errors_are_one_line_and_name_the_path(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "raw", MiB, name="d.raw")
    build_image({"amd64": str(disk)}, output=str(tmp_path / "o"))
    for call in (lambda: build_image({"amd64": str(disk)}, output=str(tmp_path / "o")),
                 lambda: read_layout(tmp_path / "d.raw")):
        with pytest.raises(DiskportError) as caught:
            call()
        text = str(caught.value)
        assert "\n" not in text and str(tmp_path) in text


def test_tar_size_matches_written_length_for_odd_sizes(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for size in (0, 1, 511, 513, 4095, layer_mod.WINDOW - 4096 + 7, layer_mod.WINDOW + 1):
        disk = tmp_path / f"{size}.bin"
        disk.write_bytes(os.urandom(size))
        for compression in ("none", "gzip"):
            built = write_layer(str(disk), "x.bin", str(blobs), compression, mtime=0)
            tar_bytes = decompress((blobs / built.descriptor.digest[7:]).read_bytes(), built.descriptor.media_type)
            assert len(tar_bytes) == built.tar_size == tar_size(size, "x.bin")
            assert_container_disk(tar_bytes, "x.bin", disk.read_bytes())


def test_write_tar_into_any_writer_at_an_offset(tmp_path: Path) -> None:
    disk = make_image(tmp_path, "qcow2", 3 * MiB, name="d.qcow2")
    target = tmp_path / "container.bin"
    with open(target, "wb") as f:
        f.write(b"prefix" * 1000)  # 6000 bytes the tar must not touch
        writer = RawWriter(f.fileno(), None, name=str(target))
        diff_id, length = write_tar(str(disk), "d.qcow2", writer, 8192, mtime=5)
    data = target.read_bytes()
    assert data[:6000] == b"prefix" * 1000 and len(data) == 8192 + length
    assert "sha256:" + hashlib.sha256(data[8192:]).hexdigest() == diff_id
    assert_container_disk(data[8192:], "d.qcow2", disk.read_bytes(), mtime=5)


def test_build_removes_the_layout_a_killed_build_left_but_not_a_live_one(tmp_path: Path) -> None:
    """SIGKILL leaves the half-written layout folder; the next build of the same output removes it (its process
    is gone, its lock free) but never the folder of a build still running, which holds its folder's flock."""
    import subprocess
    import sys

    disk = make_image(tmp_path, "qcow2", 1024 * 1024, name="vm.qcow2")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f".vm.oci.{dead}.abcdefgh.diskport-part"
    (stale / "blobs/sha256").mkdir(parents=True)
    (stale / "blobs/sha256/junk").write_bytes(bytes(4096))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; d = sys.argv[1] + f'/.vm.oci.{os.getpid()}.live1234.diskport-part'; "
        "os.mkdir(d); fd = os.open(d, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print(d, flush=True); "
        "time.sleep(60)"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        live = Path(holder.stdout.readline().strip())
        assert live.is_dir()
        unlocked_alive = tmp_path / f".vm.oci.{holder.pid}.unlocked.diskport-part"  # alive pid: not judged
        unlocked_alive.mkdir()
        built = run_cli("build", disk, "--output", tmp_path / "vm.oci", "-q")
        assert built.returncode == 0, built.stderr
        assert not stale.exists(), "the killed build's folder is removed"
        assert live.is_dir() and unlocked_alive.is_dir(), "a running build's folders stay"
        assert (tmp_path / "vm.oci" / "index.json").is_file()
    finally:
        holder.kill()
        holder.communicate(timeout=10)
