"""The work behind :mod:`diskport.manifest`: resolve the source, gather the guest's facts (from the disk or from
the image's labels), plan, render the target's documents, write the file atomically.

An OVA (a local file or at a URL) is not what the platform downloads: neither CDI nor the platform reads one.
Its disks are, once ``diskport convert X.ova DIR --all-disks`` has written them and DIR is published. So for an
OVA ``--url`` says where: a folder URL ending in ``/`` (each disk under the name ``convert --all-disks`` gives
it, raw), or the boot disk's own URL (the data disks then beside it, named the same way, in the format its
extension names: ``.qcow2`` or raw). The boot disk is inspected inside the OVA; the descriptor's facts
(:class:`~diskport.manifest.model.OvfFacts`) join the guest's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from diskport.errors import CorruptImage, UsageError
from diskport.manifest import DEFAULT_TARGET, TARGETS
from diskport.manifest.model import (
    BootSource,
    GuestFacts,
    Overrides,
    OvfDisk,
    OvfFacts,
    Plan,
    facts_from_labels,
    facts_from_report,
    make_plan,
)
from diskport.manifest.yamlout import Document, dump
from diskport.sources.checksum import parse_checksum
from diskport.version import __version__

if TYPE_CHECKING:
    from diskport.guest.facts import GuestReport
    from diskport.oci.auth import Credentials
    from diskport.oci.registry import RegistryOptions
    from diskport.ova.package import OvaPackage
    from diskport.sources.http import HttpOptions

_HASH_BLOCK = 8 * 1024 * 1024


@dataclass
class ManifestResult:
    text: str
    target: str
    plan: Plan
    #: "guest inspection" (the disk was read) or the image labels' origin.
    facts_from: str


def builder(target: str) -> Callable[[Plan], list[Document]]:
    """The target module's ``build`` function."""
    try:
        module = importlib.import_module(TARGETS[target])
    except KeyError:
        raise UsageError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})") from None
    build: Callable[[Plan], list[Document]] = module.build
    return build


def render(plan: Plan, target: str, source_text: str) -> str:
    docs = builder(target)(plan)
    docs[0].header = [f"diskport {__version__} manifest --target {target} for {source_text}",
                      f"facts from {plan.guest.origin}"]
    docs[0].header += [f"warning: {w}" for w in plan.warnings]
    return "---\n".join(dump(doc) for doc in docs)


def manifest_for_report(report: GuestReport, source: BootSource, target: str = DEFAULT_TARGET,
                        overrides: Overrides | None = None, source_text: str | None = None,
                        inspected: str | None = None) -> ManifestResult:
    """The manifest from an inspection already done (``build --manifest``, ``import --manifest``);
    ``inspected`` names the disk inspected when its file name is a temporary one."""
    facts = facts_from_report(report)
    facts.origin = f"guest inspection of {inspected or report.filename} ({report.format})"
    plan = make_plan(source, facts, overrides or Overrides(), target=target)
    text = render(plan, target, source_text or source.image or source.url or report.filename)
    return ManifestResult(text, target, plan, facts.origin)


def checked_checksum(text: str) -> str:
    algo, digest = parse_checksum(text)
    return f"{algo}:{digest}"


def compute_checksum(location: str, http: HttpOptions | None = None) -> str:
    """sha256 of the file at a path or URL, read once from start to end."""
    from diskport.sources import open_source

    digest = hashlib.sha256()
    source = open_source(location, http)
    try:
        offset = 0
        while offset < source.size:
            chunk = source.pread(offset, min(_HASH_BLOCK, source.size - offset))
            if not chunk:
                break
            digest.update(chunk)
            offset += len(chunk)
    finally:
        source.close()
    return f"sha256:{digest.hexdigest()}"


def generate(location: str, *, target: str = DEFAULT_TARGET, overrides: Overrides | None = None,
             fmt: str | None = None, url: str | None = None, checksum: str | None = None,
             compute: bool = False, http: HttpOptions | None = None, platform: str | None = None,
             registry: RegistryOptions | None = None, credentials: Credentials | Literal["auto"] | None = "auto",
             scratch_dir: str | None = None, vm: str | None = None) -> ManifestResult:
    """The manifest for ``location`` (``docker://REF``, an ``http(s)://`` URL, or a path with ``url``); ``vm``
    chooses the virtual machine of an OVA holding several."""
    from diskport.guest import inspect_guest

    if target not in TARGETS:
        raise UsageError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})")
    overrides = overrides or Overrides()
    if checksum and compute:
        raise UsageError("give --checksum or --compute-checksum, not both")
    if location.startswith("docker://"):
        if url or checksum or compute:
            raise UsageError("--url and --checksum are for disks at URLs; a containerDisk is pinned by its digest")
        source, facts = docker_source(location, platform, registry, credentials)
        if facts is None:
            report = inspect_guest(f"docker://{source.image}", fmt, scratch_dir=scratch_dir, http=http,
                                   platform=platform, registry=registry, credentials=credentials)
            source.disk_format, source.virtual_size = report.format, report.virtual_size
            facts = facts_from_report(report)
            facts.origin = f"guest inspection of the disk in {source.image} ({report.format})"
        plan = make_plan(source, facts, overrides, target=target)
        return ManifestResult(render(plan, target, location), target, plan, facts.origin)
    else:
        remote = "://" in location
        if remote and not location.startswith(("http://", "https://")):
            raise UsageError(f"'{location}' is not docker://REF, an http(s) URL or a path")
        if not remote and not url:
            raise UsageError(f"{location} is a local file: pass --url URL saying where the platform will download "
                             "it from (or give the URL, or docker://REF after `diskport build --push`)")
        report, pkg_facts = _inspect(location, fmt, scratch_dir, http, vm)
        ovf: OvfFacts | None = None
        if pkg_facts is not None:
            if not url:
                raise UsageError(f"{location} is an OVA, which neither CDI nor the platform downloads: pass --url "
                                 "naming where its disks are published (a folder URL ending in '/', or the boot "
                                 "disk's URL)", hint="write them with `diskport convert X.ova DIR --all-disks` "
                                                     "and publish DIR")
            if compute:
                raise UsageError("--compute-checksum reads SOURCE, an OVA, not the disk the platform downloads",
                                 hint="pass --checksum with the sha256 of the converted boot disk")
            ova_disk_urls(pkg_facts, url)
            ovf = pkg_facts
        elif remote and url:
            raise UsageError("--url names where a local image will be published; SOURCE is already a URL")
        why = ""
        if checksum:
            checksum, why = checked_checksum(checksum), "set by --checksum"
        elif compute:
            checksum = compute_checksum(location, http)
            why = f"computed by --compute-checksum over {'the URL' if remote else location}"
        boot_url = ovf.disks[0].url if ovf is not None and ovf.disks[0].url else url or location
        disk_format = _published_format(url or "") if ovf is not None else report.format
        source = BootSource("http", disk_format, report.virtual_size, url=boot_url, checksum=checksum,
                            checksum_why=why)
        facts = facts_from_report(report)
        facts.origin = f"guest inspection of {location} ({report.format})"
        if ovf is not None:
            facts.origin = (f"guest inspection of {location} (its boot disk, {report.format}) and its OVF "
                            f"descriptor (VM {ovf.vm}, {len(ovf.disks)} disk(s))")
        plan = make_plan(source, facts, overrides, target=target, ovf=ovf)
        return ManifestResult(render(plan, target, location), target, plan, facts.origin)


def _inspect(location: str, fmt: str | None, scratch_dir: str | None, http: HttpOptions | None,
             vm: str | None) -> tuple[GuestReport, OvfFacts | None]:
    """Guest inspection of the disk, or of an OVA's boot disk together with its descriptor's facts (the disk URLs
    filled in later)."""
    from diskport.formats import open_image
    from diskport.guest import inspect_guest
    from diskport.ova import OvaChoice
    from diskport.sources import open_source

    remote = "://" in location
    opened = open_source(location, http) if remote else None
    try:
        with open_image(opened or location, fmt, scratch_dir=scratch_dir, random_access=True,
                        ova=OvaChoice(vm=vm)) as image:
            report = inspect_guest(image)
            ovf = ovf_facts(image.appliance, vm) if image.appliance is not None else None
    finally:
        if opened is not None:
            opened.close()
    if ovf is None and vm is not None:
        raise UsageError(f"--vm {vm}: {location} is not an OVA")
    report.filename = location
    return report, ovf


def ovf_facts(pkg: OvaPackage, vm: str | None) -> OvfFacts:
    """The descriptor's facts on the VM and its disks (boot disk first)."""
    vs = pkg.system(vm)
    disks = []
    for disk in pkg.disks(vm):
        attachment = next((a for a in vs.attachments if a.disk_id == disk.id), None)
        controller = attachment.controller if attachment is not None else None
        disks.append(OvfDisk(disk.id, disk.capacity, controller.bus if controller else None,
                             controller.subtype if controller else None,
                             disk.file.href if disk.file is not None else None))
    return OvfFacts(vm=vs.name or vs.id, cpus=vs.cpus, memory=vs.memory, firmware=vs.firmware,
                    firmware_source=vs.firmware_source, os_id=vs.os_id, os_type=vs.os_type,
                    os_description=vs.os_description, disks=disks)


def _published_format(url: str) -> str:
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] if not url.endswith("/") else ""
    return "qcow2" if name.lower().endswith(".qcow2") else "raw"


def ova_disk_urls(ovf: OvfFacts, url: str) -> None:
    """Each disk's URL from ``--url``: a folder (``.../``) holds every disk under the name ``convert
    --all-disks`` gives it; a file URL is the boot disk's, and the data disks are beside it, named the same way
    with its extension (``.qcow2``, else ``.raw``)."""
    import re

    fmt = _published_format(url)
    folder = url if url.endswith("/") else url.split("?", 1)[0].rsplit("/", 1)[0] + "/"
    for i, disk in enumerate(ovf.disks):
        if disk.url is None:
            continue  # an empty disk: no file
        if i == 0 and not url.endswith("/"):
            disk.url = url
            continue
        stem = re.sub(r"\.(vmdk|qcow2|vhdx?|vdi|img|raw)$", "", disk.url.rsplit("/", 1)[-1], flags=re.IGNORECASE)
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".") or f"disk{i}"
        disk.url = f"{folder}{stem}.{fmt}"


def docker_source(location: str, platform: str | None, registry: RegistryOptions | None,
                   credentials: Credentials | Literal["auto"] | None) -> tuple[BootSource, GuestFacts | None]:
    """The reference pinned by digest, and the verdict from the image config's labels (None: not labelled)."""
    from diskport.oci.media import INDEX_TYPES
    from diskport.oci.platform import host_architecture
    from diskport.oci.pull import choose_manifest, load_json
    from diskport.oci.reference import parse_reference
    from diskport.oci.registry import RegistryClient, RegistryOptions

    reference = parse_reference(location.removeprefix("docker://"))
    client = RegistryClient(reference, registry or RegistryOptions(), credentials=credentials)
    try:
        body, media, top = client.get_manifest(reference.reference)
        obj = load_json(body, f"{reference}: the manifest")
        media = obj.get("mediaType", media) if isinstance(obj.get("mediaType"), str) else media
        if media in INDEX_TYPES or "manifests" in obj:
            entry = choose_manifest(obj, platform or host_architecture(), str(reference))
            body, media, _ = client.get_manifest(entry.digest)
            obj = load_json(body, f"{reference}: the manifest")
        config = obj.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("digest"), str):
            raise CorruptImage(f"{reference}: the manifest has no config")
        config_obj = load_json(client.get_blob(config["digest"]), f"{reference}: the image config")
    finally:
        client.close()
    labels: Any = (config_obj.get("config") or {}).get("Labels") or {}
    labels = {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(labels, dict) else {}
    pinned = f"{reference.name}@{top}"
    given = None if reference.digest and not reference.tag else str(reference)
    where = f"{reference.name}@{top[:19]}"
    facts = facts_from_labels(labels, where)
    disk_format = labels.get("io.diskport.guest.disk-format")
    size = labels.get("io.diskport.guest.virtual-size")
    if facts is None or not disk_format:
        return BootSource("docker", "", None, image=pinned, pinned_from=given), None
    return BootSource("docker", disk_format, int(size) if size and size.isdigit() else None, image=pinned,
                      pinned_from=given), facts


def write_atomic(path: str, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it, renamed over it when complete."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".diskport-manifest-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
