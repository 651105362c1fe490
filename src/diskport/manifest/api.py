"""The work behind :mod:`diskport.manifest`: resolve the source, gather the guest's facts (from the disk or from
the image's labels), plan, render the target's documents, write the file atomically."""

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
             scratch_dir: str | None = None) -> ManifestResult:
    """The manifest for ``location`` (``docker://REF``, an ``http(s)://`` URL, or a path with ``url``)."""
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
    else:
        remote = "://" in location
        if remote and not location.startswith(("http://", "https://")):
            raise UsageError(f"'{location}' is not docker://REF, an http(s) URL or a path")
        if remote and url:
            raise UsageError("--url names where a local image will be published; SOURCE is already a URL")
        if not remote and not url:
            raise UsageError(f"{location} is a local file: pass --url URL saying where the platform will download "
                             "it from (or give the URL, or docker://REF after `diskport build --push`)")
        report = inspect_guest(location, fmt, scratch_dir=scratch_dir, http=http)
        why = ""
        if checksum:
            checksum, why = checked_checksum(checksum), "set by --checksum"
        elif compute:
            checksum = compute_checksum(location, http)
            why = f"computed by --compute-checksum over {'the URL' if remote else location}"
        source = BootSource("http", report.format, report.virtual_size, url=url or location, checksum=checksum,
                            checksum_why=why)
        facts = facts_from_report(report)
        facts.origin = f"guest inspection of {location} ({report.format})"
    plan = make_plan(source, facts, overrides, target=target)
    return ManifestResult(render(plan, target, location), target, plan, facts.origin)


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
