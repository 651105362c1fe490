"""``build --cache``: the layer blob, the docker-archive and ``--convert``'s disk decide their page-cache mode from
a size bound known before they open (:func:`diskport.oci.layer.layer_bound`), under convert's rules; the bound
holds for incompressible data; every mode builds the same image (checked by skopeo and umoci); ``none`` leaves
nothing of the blob in the page cache and ``writeback`` under a real cgroup limit stays within its window
(fincore)."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest

from diskport import cache as cache_mod
from diskport import destination as destination_mod
from diskport.cache import KICK_BYTES, MODES
from diskport.oci.build import build_image
from diskport.oci.layer import COMPRESSIONS, layer_bound, tar_size, write_layer
from diskport.oci.layout import read_layout
from diskport.oci.media import Descriptor
from tests.support import MiB
from tests.support.clients import qemu_img, qemu_io, run_cli, skopeo, skopeo_json, umoci
from tests.support.host import fake_host, resident, run_in
from tests.support.images import qemu_raw_sha256, sha256_file
from tests.support.oci import image_of, layer_tar

GiB = 1024 * MiB
LINE = re.compile(r"amd64 (convert|layer|docker-archive): cache: (writeback|none) \((.+)\)")


@pytest.fixture(autouse=True)
def _no_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


def _disk(tmp_path: Path, size_mib: int = 48, name: str = "disk.raw") -> Path:
    """A raw disk with random (incompressible) data, a hole, and an unaligned tail of data."""
    raw = tmp_path / name
    qemu_img("create", "-f", "raw", raw, f"{size_mib}M")
    with open(raw, "r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(12 * MiB))
        f.seek(20 * MiB + 512)
        f.write(os.urandom(3 * MiB + 1000))
    qemu_io(raw, "raw", f"write -P 0x71 {size_mib - 1}M 4096")
    return raw


def _lines(stderr: str) -> dict[str, tuple[str, str]]:
    """The -v lines: file written -> (mode, reason)."""
    found = {m.group(1): (m.group(2), m.group(3)) for m in map(LINE.fullmatch, stderr.splitlines()) if m}
    assert found, stderr
    return found


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_the_bound_holds_for_incompressible_data(tmp_path: Path, compression: str) -> None:
    disk = tmp_path / "noise.raw"
    disk.write_bytes(os.urandom(10 * MiB + 1000))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    layer = write_layer(str(disk), "noise.raw", str(blobs), compression, mtime=0, cache="none")
    bound = layer_bound(disk.stat().st_size, "noise.raw", compression)
    assert layer.descriptor.size <= bound
    assert (blobs / layer.descriptor.digest.removeprefix("sha256:")).stat().st_size == layer.descriptor.size
    if compression == "none":
        assert bound == layer.descriptor.size == tar_size(disk.stat().st_size, "noise.raw"), "exact, uncompressed"
    else:
        assert layer.descriptor.size > disk.stat().st_size, "noise does not shrink: the bound is needed"
    assert layer.cache is not None and layer.cache.to_json() == {"mode": "none", "reason": "asked for: O_DIRECT"}


def test_auto_weighs_the_bound_under_convert_rules(tmp_path: Path) -> None:
    proc, sysfs = fake_host(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "fs/cgroup/cgroup.controllers": "memory",
        "fs/cgroup/kubepods/pod1/memory.max": str(600 * MiB),
        "fs/cgroup/kubepods/pod1/ctr/memory.current": str(100 * MiB),
    })
    decide = functools.partial(cache_mod.decide, "auto", block_device=False, proc=proc, sys=sysfs)
    big = decide(size=layer_bound(4 * GiB, "disk.raw", "gzip"))
    assert big.mode == "none" and big.reason.endswith("output > half of the 600 MiB cgroup memory limit")
    small = decide(size=layer_bound(200 * MiB, "disk.raw", "zstd"))
    assert small.mode == "writeback" and small.window == 150 * MiB
    # A disk of exactly half the limit passes convert's rule; its layer, headers included, does not.
    assert decide(size=300 * MiB).mode == "writeback"
    assert decide(size=layer_bound(300 * MiB, "disk.raw", "none")).mode == "none"

    roomy, roomy_sys = fake_host(tmp_path / "roomy", "0::/\n", {"fs/cgroup/cgroup.controllers": "memory"},
                                 available_kib=3 * 1024 * 1024)
    loose = functools.partial(cache_mod.decide, "auto", block_device=False, proc=roomy, sys=roomy_sys)
    assert loose(size=layer_bound(1400 * MiB, "disk.raw", "gzip")).mode == "writeback"
    over = loose(size=layer_bound(1536 * MiB, "disk.raw", "none"))
    assert over.mode == "none" and over.reason.endswith("output > half of 3 GiB available")


def _fake_decide(monkeypatch: pytest.MonkeyPatch, proc: Path, sysfs: Path) -> None:
    """Every Destination of this process decides over the fake trees."""
    monkeypatch.setattr(destination_mod, "decide", functools.partial(cache_mod.decide, proc=proc, sys=sysfs))


def test_build_under_a_fake_limit_goes_direct_for_a_large_sparse_disk(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound is the disk's virtual size: a sparse 1 GiB disk with 17 MiB of data is weighed as 1 GiB."""
    disk = _disk(tmp_path, 1024)
    proc, sysfs = fake_host(tmp_path / "pod", "4:memory:/kubepods/pod7\n", {
        "fs/cgroup/memory/kubepods/pod7/memory.limit_in_bytes": str(1536 * MiB),
        "fs/cgroup/memory/kubepods/pod7/memory.usage_in_bytes": str(200 * MiB),
    })
    _fake_decide(monkeypatch, proc, sysfs)
    result = build_image(str(disk), output=str(tmp_path / "a.oci"), docker_archive=str(tmp_path / "a.tar"),
                         compression="zstd", convert_to="qcow2")
    policies = {what: (p.mode, p.reason) for what, p in result.images["amd64"].cache.items()}
    assert set(policies) == {"convert", "layer", "docker-archive"}
    assert policies["convert"] == ("none", "1 GiB output > half of the 1.5 GiB cgroup memory limit"), \
        "the conversion weighs the disk's virtual size"
    # The converted qcow2 is small, and its layer's bound is what its size (known by then) gives.
    assert policies["layer"][0] == "writeback" and "<= half of the 1.5 GiB cgroup v1 memory limit" in \
        policies["layer"][1]
    assert policies["docker-archive"][0] == "writeback"

    raw_only = build_image(str(disk), output=str(tmp_path / "b.oci"), compression="none")
    assert raw_only.images["amd64"].cache["layer"].mode == "none"
    layout = read_layout(tmp_path / "b.oci")
    for d in layout.walk(layout.resolve()):
        layout.verify_blob(d)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_mode_builds_the_same_image(tmp_path: Path, compression: str) -> None:
    disk = _disk(tmp_path)
    digests = {}
    for mode in MODES:
        out = tmp_path / f"{mode}.oci"
        proc = run_cli("build", "-q", "-v", "--cache", mode, "--compression", compression, "-t", "v1",
                       "--output", out, disk)
        assert proc.returncode == 0, proc.stderr
        found = _lines(proc.stderr)
        assert set(found) == {"layer"}
        if mode != "auto":
            assert found["layer"][0] == mode, proc.stderr
        digests[mode] = (out / "index.json").read_bytes()
        layout = read_layout(out)
        manifest, _, _ = image_of(layout, "v1")
        assert len(layer_tar(layout, Descriptor.from_json(manifest["layers"][0]))) == \
            tar_size(disk.stat().st_size, "disk.raw")
        inspected = skopeo_json(tmp_path, "inspect", f"oci:{out}:v1")
        assert inspected["Layers"] == [manifest["layers"][0]["digest"]]
    assert digests["auto"] == digests["writeback"] == digests["none"]
    if compression != "zstd":  # umoci 0.4.7 reads gzip and uncompressed layers only
        bundle = tmp_path / "bundle"
        umoci("unpack", "--rootless", "--image", f"{tmp_path / 'writeback.oci'}:v1", bundle)
        assert sha256_file(bundle / "rootfs" / "disk" / "disk.raw") == sha256_file(disk)


def test_docker_archive_and_convert_in_writeback(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    archive = tmp_path / "image.tar"
    proc = run_cli("build", "-v", "--cache", "writeback", "--convert", "qcow2", "--docker-archive", archive,
                   "-t", "example.com/vm/disk:1", disk)
    assert proc.returncode == 0, proc.stderr
    found = _lines(proc.stderr)
    assert set(found) == {"convert", "docker-archive"}
    assert all(mode == "writeback" and "asked for" in why for mode, why in found.values())
    assert "wrote " + str(archive) in proc.stderr, "the summary still follows"
    inspected = skopeo_json(tmp_path, "inspect", f"docker-archive:{archive}")
    assert inspected["Architecture"] == "amd64" and len(inspected["Layers"]) == 1
    bundle_layout = tmp_path / "from-archive.oci"
    skopeo(tmp_path, "copy", f"docker-archive:{archive}", f"oci:{bundle_layout}:v1")
    bundle = tmp_path / "bundle"
    umoci("unpack", "--rootless", "--image", f"{bundle_layout}:v1", bundle)
    converted = bundle / "rootfs" / "disk" / "disk.qcow2"
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", disk, converted).returncode == 0


def test_none_leaves_the_blob_out_of_the_page_cache(tmp_path: Path) -> None:
    disk = _disk(tmp_path, 64)
    sizes = {}
    for mode in ("none", "writeback"):
        out = tmp_path / f"{mode}.oci"
        proc = run_cli("build", "-q", "--cache", mode, "--compression", "none", "--output", out, disk)
        assert proc.returncode == 0, proc.stderr
        [blob] = [p for p in (out / "blobs" / "sha256").iterdir() if p.stat().st_size > MiB]
        sizes[mode] = (resident(blob), blob.stat().st_blocks * 512)
    cached, allocated = sizes["writeback"]
    assert allocated >= 15 * MiB and cached >= allocated * 3 // 4, sizes
    direct, _ = sizes["none"]
    assert direct <= MiB, f"{direct} bytes of an O_DIRECT blob in the page cache"


@pytest.mark.slow
def test_inside_a_memory_limit(tmp_path: Path, memory_cgroup: Path) -> None:
    """auto goes direct for a layer above half the limit; forced writeback of twice the limit's worth of data
    keeps what the page cache holds of the blob within the write-behind window, and the image is whole."""
    raw = _disk(tmp_path, 512)
    qemu_io(raw, "raw", "write -P 0x44 100M 300M")
    out = tmp_path / "auto.oci"
    proc = run_in(memory_cgroup, 256 * MiB, "build", "-q", "-v", "--compression", "none", "--output", out, raw)
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc.stderr)["layer"] == ("none", "512 MiB output > half of the 256 MiB cgroup memory limit")

    out = tmp_path / "writeback.oci"
    proc = run_in(memory_cgroup, 160 * MiB, "build", "-q", "-v", "--cache", "writeback", "--compression", "none",
                  "-t", "v1", "--output", out, raw)
    assert proc.returncode == 0, proc.stderr
    window = int(re.search(r"at most (\d+) MiB of the output", proc.stderr).group(1))  # type: ignore[union-attr]
    assert KICK_BYTES // MiB <= window <= 40, proc.stderr
    layout = read_layout(out)
    manifest, _, _ = image_of(layout, "v1")
    blob = out / "blobs" / "sha256" / manifest["layers"][0]["digest"].removeprefix("sha256:")
    assert resident(blob) <= window * MiB + KICK_BYTES, "write-behind: the window in flight, one kick pending"
    for d in layout.walk(layout.resolve("v1")):
        layout.verify_blob(d)
    bundle = tmp_path / "bundle"
    umoci("unpack", "--rootless", "--image", f"{out}:v1", bundle)
    assert sha256_file(bundle / "rootfs" / "disk" / "disk.raw") == qemu_raw_sha256(raw, tmp_path)
