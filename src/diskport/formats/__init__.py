"""Format readers, and the choice between them.

Every format module offers ``probe(head, source) -> confidence`` (0 = not this format, 100 = its magic and
version) and an opener. :func:`detect` runs all probes on the content (never the file name); when more than one
format claims the bytes with the same top confidence, each is opened and only a format whose whole structure
validates is chosen. Two that both validate are refused as ambiguous rather than guessed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from diskport.errors import DiskportError, UnsupportedImage
from diskport.formats import iso, qcow2, raw, vdi, vhd, vhdx, vmdk
from diskport.formats.base import DiskImage, Extent
from diskport.formats.compression import detect_compression
from diskport.sources import Source, open_source

HEAD_SIZE = 64 * 1024


@dataclass(frozen=True)
class FormatSpec:
    name: str
    probe: Callable[[bytes, Source], int]
    open: Callable[[Source], DiskImage]


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("qcow2", qcow2.probe, qcow2.open_qcow2),
        FormatSpec("vmdk", vmdk.probe, vmdk.open_vmdk),
        FormatSpec("vpc", vhd.probe, vhd.open_vhd),
        FormatSpec("vhdx", vhdx.probe, vhdx.open_vhdx),
        FormatSpec("vdi", vdi.probe, vdi.open_vdi),
        FormatSpec("iso", iso.probe, iso.open_iso),
        FormatSpec("raw", raw.probe, raw.open_raw),
    )
}
# Names users type for the same formats.
ALIASES = {"vhd": "vpc", "img": "raw"}


def format_names() -> list[str]:
    return [*FORMATS, *ALIASES]


def read_head(source: Source) -> bytes:
    return source.pread(0, min(HEAD_SIZE, source.size))


def probe_scores(source: Source, head: bytes | None = None) -> dict[str, int]:
    head = read_head(source) if head is None else head
    return {name: score for name, spec in FORMATS.items() if (score := spec.probe(head, source)) > 0}


def open_detected(source: Source, fmt: str | None = None) -> DiskImage:
    """Open ``source`` as ``fmt``, or as the format its content shows."""
    if fmt is not None:
        name = ALIASES.get(fmt, fmt)
        if name not in FORMATS:
            raise UnsupportedImage(f"unknown format '{fmt}' (known: {', '.join(format_names())})",
                                   path=source.name)
        return FORMATS[name].open(source)
    head = read_head(source)
    compression = detect_compression(head)
    if compression:
        raise UnsupportedImage(f"is {compression}-compressed; reading compressed images is not implemented yet",
                               path=source.name)
    scores = probe_scores(source, head)
    top = max(scores.values())
    leaders = [name for name, score in scores.items() if score == top]
    if len(leaders) == 1:
        return FORMATS[leaders[0]].open(source)
    opened: list[DiskImage] = []
    errors: list[DiskportError] = []
    for name in leaders:
        try:
            opened.append(FORMATS[name].open(source))
        except DiskportError as e:
            errors.append(e)
    if len(opened) == 1:
        return opened[0]
    if not opened:
        raise errors[0]
    raise UnsupportedImage(
        f"content is valid as more than one format ({', '.join(i.format for i in opened)}); "
        "refusing to guess", path=source.name, hint="name the format with --format")


def open_image(location: str | os.PathLike[str] | Source, fmt: str | None = None) -> DiskImage:
    """Open a disk image from a path or a :class:`Source`; the caller closes it (it is a context manager)."""
    source = location if isinstance(location, Source) else open_source(location)
    try:
        return open_detected(source, fmt)
    except BaseException:
        if not isinstance(location, Source):
            source.close()
        raise


__all__ = ["FORMATS", "DiskImage", "Extent", "FormatSpec", "open_detected", "open_image", "probe_scores"]
