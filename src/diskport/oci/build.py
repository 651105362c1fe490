"""``build``: package disk images as a KubeVirt containerDisk, into an OCI layout and/or a docker-archive.

:func:`build_image` is the whole job as a library call. One disk per architecture (``{"amd64": "disk.qcow2"}``);
each becomes a manifest (config: architecture, os ``linux``, the layer's diff_id, ``created``) with its one layer
(:mod:`diskport.oci.layer`). One architecture: ``index.json`` of the layout lists that manifest (with its
platform), so the layout's index is the image index. Several: an image index blob lists one manifest per
platform and ``index.json`` lists that index. The tag, when given, is the entry's
``org.opencontainers.image.ref.name``. Pushing a build is then pushing what ``index.json`` lists
(:attr:`BuildResult.descriptor`, or :func:`diskport.oci.layout.read_layout` on the output).

Rules chosen:

* Every disk is opened with the engine first (:func:`diskport.formats.open_image`), before anything is written,
  so images diskport refuses (backing files, external data files, corrupt or hostile headers) are refused here
  too, with the engine's errors.
* A compressed file (``.gz``, ``.xz``, ``.zst``, ``.bz2``) is never shipped as it is: KubeVirt cannot boot it.
  Without ``convert_to`` it is refused, the message suggesting ``--convert qcow2``; with it the engine
  decompresses and converts in one pass. A VMDK descriptor whose data lies in other files is refused the same
  way: the image would hold the descriptor alone.
* KubeVirt boots a containerDisk holding raw (ISO included) or qcow2. Other formats (vmdk, vhd, vhdx, vdi) are
  packaged as they are with a warning: they rely on the platform converting them on import (CDI).
  ``convert_to="qcow2"`` converts any disk first, into a scratch folder (default: beside the output) that is
  removed afterwards; ``convert_compression`` (``zlib``, ``zstd``) compresses its clusters.
* The file under ``disk/`` is the source's base name; after conversion, that name with its compression and
  image extensions replaced by ``.qcow2``.
* Every timestamp is ``SOURCE_DATE_EPOCH`` when set, else 0 (1970-01-01), so the same disk gives the same digests.
* With both an output layout and a docker-archive, the disk is read twice (the archive's layer is uncompressed);
  the archive is renamed into place before the layout.
* ``cache`` (``auto``, ``writeback``, ``none``) is the page-cache mode of every file written: the converted disk,
  the layer blob and the docker-archive, each decided on its own as it opens, ``auto`` from a bound of its size
  known up front (the disk's virtual size for a conversion, :func:`diskport.oci.layer.layer_bound` for a blob).
  :attr:`ImageResult.cache` says what was chosen and why.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from diskport.cache import MODES as CACHE_MODES
from diskport.cache import CachePolicy
from diskport.engine import convert
from diskport.errors import DiskportError, SourceError, UnsupportedImage, UsageError
from diskport.formats import open_image
from diskport.oci import archive as docker_archive_mod
from diskport.oci import layout as layout_mod
from diskport.oci.archive import ArchiveResult, write_docker_archive
from diskport.oci.layer import COMPRESSIONS, MAX_MTIME, Layer, check_disk_name, tar_size, write_layer
from diskport.oci.layout import LayoutWriter
from diskport.oci.media import (
    ANNOTATION_CREATED,
    ANNOTATION_SOURCE,
    ANNOTATION_TITLE,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
)
from diskport.oci.platform import host_architecture, parse_platform, platform_key
from diskport.oci.reference import check_image_name
from diskport.sources.compression import detect_compression

if TYPE_CHECKING:
    from diskport.formats.base import DiskImage
    from diskport.guest.facts import GuestReport
    from diskport.manifest.model import OvfFacts

#: Formats a KubeVirt containerDisk boots as they are.
BOOTABLE_FORMATS = ("raw", "iso", "qcow2")
CONVERT_FORMATS = ("qcow2",)
CONVERT_COMPRESSIONS = ("zlib", "zstd")
_COMPRESSED_SUFFIXES = (".gz", ".xz", ".zst", ".zstd", ".bz2")
_IMAGE_SUFFIXES = (".qcow2", ".qcow", ".raw", ".img", ".iso", ".vmdk", ".vhd", ".vpc", ".vhdx", ".vdi")

Progress = Callable[[int, int], None]


def source_date_epoch(environ: Mapping[str, str] | None = None) -> int:
    """The fixed time of every timestamp: ``SOURCE_DATE_EPOCH`` (reproducible-builds.org) if set, else 0."""
    value = (os.environ if environ is None else environ).get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    if not value.isdigit() or int(value) > MAX_MTIME:
        raise UsageError(f"SOURCE_DATE_EPOCH='{value}' is not a number of seconds since 1970 (0 to {MAX_MTIME})")
    return int(value)


def rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _strip_suffixes(base: str) -> str:
    lower = base.lower()
    for suffix in _COMPRESSED_SUFFIXES:
        if lower.endswith(suffix) and len(base) > len(suffix):
            base, lower = base[: -len(suffix)], lower[: -len(suffix)]
            break
    for suffix in _IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def disk_file_name(path: str, convert_to: str | None = None) -> str:
    """The file name under ``disk/``: the base name, or after conversion its stem with ``.<convert_to>``."""
    base = os.path.basename(os.path.normpath(path))
    return check_disk_name(f"{_strip_suffixes(base)}.{convert_to}" if convert_to else base)


def default_output(disk: str) -> str:
    """Where a build goes when no destination is named: ``./<stem>.oci`` (``fedora.qcow2`` -> ``./fedora.oci``)."""
    return os.path.join(os.curdir, _strip_suffixes(os.path.basename(os.path.normpath(disk))) + ".oci")


def image_config(platform: Mapping[str, str], diff_ids: list[str], created: str,
                 labels: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The OCI image config of a containerDisk (image-spec config.md); also the docker-archive's config.

    ``env`` becomes ``config.Env``: KubeVirt's hints (``INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE``), which CDI
    copies from a registry import into PVC labels that ``preference.inferFromVolume`` reads.
    """
    inner: dict[str, Any] = {}
    if env:
        inner["Env"] = [f"{k}={v}" for k, v in env.items()]
    if labels:
        inner["Labels"] = dict(labels)
    config: dict[str, Any] = {
        "architecture": platform["architecture"],
        "os": platform.get("os", "linux"),
        "created": created,
        "config": inner,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    if platform.get("variant"):
        config["variant"] = platform["variant"]
    return config


def _one_layer_config(platform: Mapping[str, str], created: str, labels: Mapping[str, str],
                      env: Mapping[str, str], diff_id: str) -> dict[str, Any]:
    return image_config(platform, [diff_id], created, labels, env)


#: The image environment variable CDI turns into the PVC label KubeVirt infers a preference from.
PREFERENCE_ENV = "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE"
#: Its instancetype counterpart, written only when asked (``build --instancetype``): sizing is the user's call.
INSTANCETYPE_ENV = "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE"
_RESOURCE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _ovf_labels(guest: GuestReport, ovf: OvfFacts) -> dict[str, str]:
    """What an OVA's descriptor adds to the guest's labels: firmware when the disk cannot tell, CPUs, memory,
    the OS type when inspection found none -- decided by :func:`diskport.manifest.model.join_ovf`, as
    ``manifest X.ova`` decides them."""
    from diskport.manifest.model import facts_from_report, ovf_labels

    return ovf_labels(facts_from_report(guest), ovf)


def _hints(guest: GuestReport | None, instancetype: str | None = None) -> dict[str, str]:
    """KubeVirt's default-preference hint for the guest, when a common-instancetypes preference fits, and the
    default instancetype when one was asked for."""
    hints = {INSTANCETYPE_ENV: instancetype} if instancetype else {}
    if guest is None:
        return hints
    from diskport.manifest.model import facts_from_report, preference_for

    facts = facts_from_report(guest)
    name = preference_for(facts, str(facts.bus.value))
    return {**hints, PREFERENCE_ENV: name} if name else hints


@dataclass(frozen=True)
class ImageResult:
    """One architecture's image."""

    platform: dict[str, str]
    source: str              # the disk as given
    source_format: str       # its format as the engine detected it ("gzip" when it was compressed)
    disk_name: str           # the file under disk/
    disk_format: str         # the format of that file
    disk_size: int           # its size in bytes
    converted: bool
    layer: Layer | None = None           # in the layout
    config: Descriptor | None = None     # in the layout
    manifest: Descriptor | None = None   # in the layout, with the platform
    archive: ArchiveResult | None = None
    #: What guest inspection found in the disk (its labels are in the config and the manifest), or None.
    guest: GuestReport | None = None
    #: The page-cache policy of each file written for it: ``convert`` (the converted disk), ``layer``,
    #: ``docker-archive``.
    cache: dict[str, CachePolicy] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildResult:
    output: str | None                   # the OCI layout written
    docker_archive: str | None
    tag: str | None
    #: What the layout's index.json lists (and what a push tags): the manifest, or the index of several.
    descriptor: Descriptor | None
    index_digest: str | None             # the image index blob, with several architectures
    images: dict[str, ImageResult]       # by platform key ("amd64", "arm/v7")
    created: str
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Disk:
    platform: dict[str, str]
    path: str
    fmt: str
    compression: str | None
    #: An OVA's descriptor facts (its labels join the guest's), else None.
    ovf: OvfFacts | None = None


def _inspect_guest(path: str, given: str, warnings: list[str],
                   warn: Callable[[str], None] | None) -> GuestReport | None:
    """Guest inspection of the disk packaged (a few MB read); a disk it cannot look into is built all the same."""
    from diskport.guest import inspect_guest

    try:
        return inspect_guest(path)
    except DiskportError as e:
        text = f"{given}: the guest was not inspected, so the image carries no verdict labels: {e}"
        warnings.append(text)
        if warn is not None:
            warn(text)
        return None


def _inspect(path: str, convert_to: str | None) -> _Disk:
    """Open the disk with the engine (refusing what it refuses) and learn its format."""
    if "://" in path:
        return _inspect_remote(path, convert_to)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError("no such file", path=path) from None
    except OSError as e:
        raise SourceError(f"cannot use: {e.strerror}", path=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise SourceError("is a folder, not a disk image", path=path)
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except OSError as e:
        raise SourceError(f"cannot read: {e.strerror}", path=path) from None
    if not head:
        raise SourceError("is empty", path=path)
    compression = detect_compression(head)
    if compression is not None:
        if convert_to is None:
            raise UsageError(f"is {compression}-compressed; KubeVirt cannot boot a compressed file, so it is not "
                             "packaged as it is", path=path,
                             hint="pass --convert qcow2 to decompress and convert it in one pass")
        # The conversion opens (and validates) it; opening it here would decompress it twice.
        return _Disk({}, path, compression, compression)
    with open_image(path) as image:
        if image.appliance is not None:
            if convert_to is None:
                raise UsageError("is an OVA appliance; a containerDisk holds one disk file, not the package",
                                 path=path, hint="pass --convert qcow2 to package its boot disk, converted")
            return _Disk({}, path, "ova", None, _ovf_of(image))
        if convert_to is None and image.data_in_other_files():
            raise UnsupportedImage(f"is a {image.format} descriptor whose data lies in other files; a containerDisk "
                                   "holds a single file", path=path, fmt=image.format,
                                   hint="pass --convert qcow2 to package it as one qcow2 file")
        return _Disk({}, path, image.format, None)


def _inspect_remote(url: str, convert_to: str | None) -> _Disk:
    """A disk or appliance at a URL (an ``.ovf`` with its files beside it, an ``.ova``): packaged only converted,
    since the layer is written from a local file."""
    if convert_to is None:
        raise UsageError("is a URL; a containerDisk is packaged from a local file", path=url,
                         hint="pass --convert qcow2 to convert it from the URL in one pass")
    with open_image(url) as image:
        if image.appliance is not None:
            return _Disk({}, url, "ova", None, _ovf_of(image))
        return _Disk({}, url, image.format, None)


def _ovf_of(image: DiskImage) -> OvfFacts:
    from diskport.manifest.api import ovf_facts

    assert image.appliance is not None
    return ovf_facts(image.appliance, image.appliance_vm)


@contextlib.contextmanager
def _prepared(disk: _Disk, convert_to: str | None, convert_compression: str | None, scratch: str,
              progress: Progress | None, cache: str) -> Iterator[tuple[str, str, str, CachePolicy | None]]:
    """``(file to package, its name under disk/, its format, the conversion's page-cache policy)``; a conversion
    lives in scratch until the end."""
    if convert_to is None:
        yield disk.path, disk_file_name(disk.path), disk.fmt, None
        return
    name = disk_file_name(disk.path, convert_to)
    folder = tempfile.mkdtemp(prefix=".diskport-convert.", dir=scratch)
    try:
        converted = os.path.join(folder, name)
        result = convert(disk.path, converted, output_format=convert_to, compression=convert_compression,
                         scratch_dir=scratch, progress=progress, cache=cache)
        yield converted, name, convert_to, result.cache
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _reporter(progress: Progress | None, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    report = progress
    return lambda done: report(done, total)


def _file_size(path: str) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def _check_options(compression: str, convert_to: str | None, convert_compression: str | None,
                   tag: str | None, cache: str) -> None:
    if cache not in CACHE_MODES:
        raise UsageError(f"unknown cache mode '{cache}' (choose from {', '.join(CACHE_MODES)})")
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown layer compression '{compression}' (choose from {', '.join(COMPRESSIONS)})")
    if convert_to is not None and convert_to not in CONVERT_FORMATS:
        raise UsageError(f"cannot convert to '{convert_to}' for a containerDisk (choose from "
                         f"{', '.join(CONVERT_FORMATS)})")
    if convert_compression is not None:
        if convert_to is None:
            raise UsageError("compressing the disk's clusters needs --convert qcow2")
        if convert_compression not in CONVERT_COMPRESSIONS:
            raise UsageError(f"unknown qcow2 compression '{convert_compression}' (choose from "
                             f"{', '.join(CONVERT_COMPRESSIONS)})")
    if tag is not None:
        check_image_name(tag)


def build_image(disks: Mapping[str, str | os.PathLike[str]] | str | os.PathLike[str], *,
                output: str | os.PathLike[str] | None = None,
                docker_archive: str | os.PathLike[str] | None = None, tag: str | None = None,
                compression: str = "gzip", convert_to: str | None = None, convert_compression: str | None = None,
                source: str | None = None, force: bool = False, scratch_dir: str | None = None,
                progress: Progress | None = None, phase: Callable[[str], None] | None = None,
                warn: Callable[[str], None] | None = None, instancetype: str | None = None,
                cache: str = "auto") -> BuildResult:
    """Package ``disks`` (architecture -> disk path; a single path means this machine's architecture) as a
    containerDisk image in the OCI layout ``output`` and/or the docker-archive ``docker_archive``.

    Without either, ``output`` is :func:`default_output` of the first disk. ``tag`` names the image in the
    layout (``ref.name``) and the archive (a ``name[:tag]`` reference there). ``compression`` is the layer's
    (``gzip``, ``zstd``, ``none``; a docker-archive's layer is always uncompressed). ``source`` becomes the
    ``org.opencontainers.image.source`` annotation. ``phase`` hears what is being done ("convert amd64",
    "package amd64"); ``progress`` the bytes done of that phase and its total; ``warn`` each warning (also kept
    in the result). An existing output is replaced only with ``force``. Nothing is left behind on failure.
    ``instancetype`` (``u1.medium``...) becomes the image's default-instancetype hint for KubeVirt. ``cache`` is
    the page-cache mode of the files written (see the module docstring).
    """
    began = time.monotonic()
    _check_options(compression, convert_to, convert_compression, tag, cache)
    if instancetype is not None and not _RESOURCE_NAME.fullmatch(instancetype):
        raise UsageError(f"--instancetype {instancetype!r} is not a Kubernetes resource name (lowercase letters, "
                         "digits, '-' and '.')")
    if isinstance(disks, (str, os.PathLike)):
        disks = {host_architecture(): disks}
    if not disks:
        raise UsageError("no disk to package")
    by_key: dict[str, _Disk] = {}
    for arch, path in disks.items():
        plat = parse_platform(arch)
        key = platform_key(plat)
        if key in by_key:
            raise UsageError(f"two disks for architecture {key}")
        by_key[key] = _Disk(plat, os.fspath(path), "", None)
    if docker_archive is not None and len(by_key) > 1:
        raise UsageError("a docker-archive holds one architecture; write an OCI layout (--output) for several",
                         path=os.fspath(docker_archive))
    out = os.fspath(output) if output is not None else None
    archive_path = os.fspath(docker_archive) if docker_archive is not None else None
    if out is None and archive_path is None:
        out = default_output(next(iter(by_key.values())).path)
    if out is not None and archive_path is not None and os.path.abspath(out) == os.path.abspath(archive_path):
        raise UsageError("the layout and the docker-archive cannot be the same path", path=out)
    if out is not None:
        layout_mod.check_destination(out, force)
    if archive_path is not None:
        docker_archive_mod.check_destination(archive_path, force)
    mtime = source_date_epoch()
    created = rfc3339(mtime)

    warnings: list[str] = []
    checked: dict[str, _Disk] = {}
    for key, disk in by_key.items():
        found = _inspect(disk.path, convert_to)
        checked[key] = _Disk(disk.platform, disk.path, found.fmt, found.compression, found.ovf)
        if convert_to is None and found.fmt not in BOOTABLE_FORMATS:
            text = (f"{disk.path}: {found.fmt} is not a format a KubeVirt containerDisk boots (raw or qcow2); the "
                    "image relies on the platform converting it on import (CDI). Pass --convert qcow2 to convert it "
                    "now")
            warnings.append(text)
            if warn is not None:
                warn(text)

    scratch = scratch_dir or os.path.dirname(os.path.abspath(out or archive_path or "."))
    images: dict[str, ImageResult] = {}
    top: Descriptor | None = None
    index_digest: str | None = None
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(LayoutWriter(out, force=force)) if out is not None else None
        for key, disk in checked.items():
            if phase is not None and convert_to is not None:
                phase(f"convert {key}")
            with _prepared(disk, convert_to, convert_compression, scratch, progress, cache) as (path, name, fmt,
                                                                                            converted):
                guest = _inspect_guest(path, disk.path, warnings, warn)
                labels = guest.labels() if guest is not None else {}
                if guest is not None and disk.ovf is not None:
                    labels.update(_ovf_labels(guest, disk.ovf))
                env = _hints(guest, instancetype)
                if phase is not None:
                    phase(f"package {key}")
                size = _file_size(path)
                report = _reporter(progress, tar_size(size, name))
                layer = config = manifest = None
                policies = {"convert": converted} if converted is not None else {}
                if writer is not None:
                    layer = write_layer(path, name, writer.blobs_dir, compression, mtime=mtime, progress=report,
                                        cache=cache)
                    if layer.cache is not None:
                        policies["layer"] = layer.cache
                    config = writer.add_json(image_config(disk.platform, [layer.diff_id], created, labels, env),
                                             OCI_CONFIG)
                    annotations = {ANNOTATION_CREATED: created, ANNOTATION_TITLE: name, **labels}
                    if source:
                        annotations[ANNOTATION_SOURCE] = source
                    body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.to_json(),
                            "layers": [layer.descriptor.to_json()], "annotations": annotations}
                    manifest = writer.add_json(body, OCI_MANIFEST, platform=disk.platform)
                archived = None
                if archive_path is not None:
                    archived = write_docker_archive(
                        archive_path, path, name,
                        functools.partial(_one_layer_config, disk.platform, created, labels, env),
                        mtime=mtime, repo_tags=[tag] if tag else [], force=force, progress=report, cache=cache)
                    if archived.cache is not None:
                        policies["docker-archive"] = archived.cache
                images[key] = ImageResult(disk.platform, disk.path, disk.fmt, name, fmt, size,
                                          convert_to is not None, layer, config, manifest, archived, guest,
                                          policies)
        if writer is not None:
            manifests = [image.manifest for image in images.values() if image.manifest is not None]
            if len(manifests) == 1:
                top = manifests[0]
            else:
                annotations = {ANNOTATION_CREATED: created}
                if source:
                    annotations[ANNOTATION_SOURCE] = source
                index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                         "manifests": [m.to_json() for m in manifests], "annotations": annotations}
                top = writer.add_json(index, OCI_INDEX)
                index_digest = top.digest
            writer.add_manifest(top, tag)
    return BuildResult(out, archive_path, tag, top, index_digest, images, created, time.monotonic() - began,
                       warnings)
