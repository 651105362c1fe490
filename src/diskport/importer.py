"""``diskport import``: a disk at a URL or path, downloaded, decompressed and converted into a persistent disk.

The orchestration of the pieces the other commands use: :mod:`diskport.sources.http` reads the URL (straight
over ranged GETs when the server answers them, in order otherwise), :func:`diskport.formats.open_image` finds the
format and decides between streaming and spooling, and the engine writes the destination beside itself and
renames it at the end. What this module adds: the choice of source by scheme (``docker://`` is the disk inside a
containerDisk image, found by :mod:`diskport.oci.pull`), ``--size``, ``--checksum``, and a summary that says which
path was taken and why.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from diskport.cache import CachePolicy
from diskport.destination import refuse_existing
from diskport.engine import write_image
from diskport.errors import DestinationError, DiskportError, UsageError, located
from diskport.formats import open_image
from diskport.formats.base import Access
from diskport.ova import DEFAULT, OvaChoice
from diskport.progress import JobProgress
from diskport.sources import open_source
from diskport.sources.base import SliceSource, Source
from diskport.sources.checksum import ChecksumSource, parse_checksum
from diskport.sources.http import HttpOptions, HttpSource
from diskport.units import parse_size as parse_size  # re-exported: it lived here first

if TYPE_CHECKING:
    from diskport.guest.facts import GuestReport
    from diskport.oci.auth import Credentials
    from diskport.oci.registry import RegistryOptions

REGISTRY_SCHEME = "docker://"

@dataclass
class ImportResult:
    source: str
    destination: str
    source_format: str
    output_format: str
    compression: list[str]
    access: Access
    virtual_size: int
    downloaded_bytes: int
    data_bytes: int
    zero_bytes: int
    seconds: float
    checksum: str | None
    #: With ``inspect``: guest inspection of the disk written, or why it could not be done.
    guest: GuestReport | None = None
    guest_error: str | None = None
    #: The virtual machine whose disk was imported, when SOURCE was an OVA.
    appliance_vm: str | None = None
    #: The page-cache policy used and why (:mod:`diskport.cache`).
    cache: CachePolicy | None = None


def import_image(location: str, destination: str | os.PathLike[str], *, size: int | None = None,
                 output_format: str = "raw", checksum: str | None = None, http: HttpOptions | None = None,
                 scratch_dir: str | None = None, force: bool = False, sync: bool = True,
                 job: JobProgress | None = None, platform: str | None = None,
                 registry: RegistryOptions | None = None,
                 credentials: Credentials | Literal["auto"] | None = "auto",
                 inspect: bool = False, ova: OvaChoice = DEFAULT, cache: str = "auto") -> ImportResult:
    """Import the disk at ``location`` into ``destination`` (a file or a block device).

    ``size`` is the persistent disk's size: the import fails before writing when the disk is larger, and a raw
    disk is grown to it. ``checksum`` (``sha256:HEX``, also md5, sha1, sha512) is verified over the bytes as
    downloaded before the destination is put in place. The result is flushed to stable storage (``sync``).
    ``job`` receives the progress: bytes downloaded and converted, and the phase. A ``docker://REF`` location is
    a containerDisk image: ``platform`` picks from an index, ``registry`` and ``credentials`` say how to reach it.
    With ``inspect``, the disk written is looked into afterwards (:func:`diskport.guest.inspect_guest`); a guest
    that cannot be inspected does not fail the import, ``guest_error`` says why. ``ova`` picks the disk of an
    OVA appliance (its boot disk by default). ``cache`` is the page-cache policy (``auto``, ``writeback``,
    ``none``: :mod:`diskport.cache`); whichever it is, the disk is flushed before success when ``sync``.
    """
    began = time.monotonic()
    dst = os.fspath(destination)
    expected = parse_checksum(checksum) if checksum else None
    refuse_existing(dst, force)
    on_bytes = job.on_download if job else None
    checks: list[Callable[[], None]] = []
    found = ""
    source: Source
    if location.startswith(REGISTRY_SCHEME):
        if expected:
            raise UsageError("--checksum is for files at URLs; an image in a registry is checked by its digests")
        from diskport.oci.pull import open_registry_disk  # the registry client only for registry images

        source, pulled = open_registry_disk(location, platform=platform, registry=registry, credentials=credentials,
                                            http=http, on_bytes=on_bytes)
        found = f"disk/{pulled.disk_name} in {pulled.access}"
        if pulled.verify is not None:
            checks.append(pulled.verify)
        download = pulled.layer.size
    else:
        source = open_source(location, http, on_bytes)
        download = source.size if isinstance(source, HttpSource) and source.size_known else 0
    if job is not None and download:
        job.download_total = download
    try:
        checked = ChecksumSource(source, *expected) if expected else None
        scratch = scratch_dir or os.path.dirname(os.path.abspath(dst))
        image = open_image(checked or source, scratch_dir=scratch, size_limit=size, ova=ova)
    except BaseException:
        source.close()
        raise
    if checked is not None:
        checks.append(checked.verify)
    http_source = source.parent if isinstance(source, SliceSource) else source
    with image:
        if isinstance(http_source, HttpSource) and not source.sequential and image.access.kind == "direct" \
                and not image.access.reason:
            image.access.reason = "read over HTTP range requests, no scratch space"
        image.access.origin = found
        if size is not None and image.size_known and image.virtual_size > size:
            raise DestinationError(f"the disk is {image.virtual_size} bytes, larger than --size {size}",
                                   path=dst, hint="pass a larger --size")
        with located(location, image.format):
            stats, _ = write_image(image, dst, output_format=output_format, force=force, sync=sync,
                                   progress=job, grow_to=size, cache=cache,
                                   before_commit=(lambda: _verify(checks, job)) if checks else None)
        downloaded = http_source.downloaded if isinstance(http_source, HttpSource) else source.size
        if job is not None:
            job(stats.virtual_size, stats.virtual_size)
        guest, guest_error = _inspect_written(dst, output_format) if inspect else (None, None)
        return ImportResult(source=location, destination=dst, source_format=image.format,
                            output_format=output_format, compression=list(image.compression),
                            access=image.access, virtual_size=stats.virtual_size, downloaded_bytes=downloaded,
                            data_bytes=stats.data_bytes, zero_bytes=stats.zero_bytes,
                            seconds=time.monotonic() - began,
                            checksum=f"{expected[0]}:{expected[1]}" if expected else None,
                            guest=guest, guest_error=guest_error, cache=stats.cache,
                            appliance_vm=(image.appliance.system(image.appliance_vm).name or "vm")
                            if image.appliance is not None else None)


def _inspect_written(dst: str, output_format: str) -> tuple[GuestReport | None, str | None]:
    from diskport.guest import inspect_guest

    try:
        return inspect_guest(dst, output_format), None
    except DiskportError as e:
        return None, str(e)


def _verify(checks: list[Callable[[], None]], job: JobProgress | None) -> None:
    if job is not None:
        job.set_phase("verifying")
    for check in checks:
        check()
