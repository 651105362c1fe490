"""Reading back what diskport built, independently of diskport's own checks: the layer tar of a layout image,
and an image's manifest and config (through an index when it has one)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any

import zstandard

from diskport.oci.layout import Layout
from diskport.oci.media import OCI_INDEX, Descriptor


def decompress(data: bytes, media_type: str) -> bytes:
    if media_type.endswith("+gzip") or data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if media_type.endswith("+zstd") or data[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def layer_tar(layout: Layout, layer: Descriptor) -> bytes:
    path = layout.check_blob(layer)
    blob = Path(path).read_bytes()
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer.digest
    return decompress(blob, layer.media_type)


def image_of(layout: Layout, tag: str | None, arch: str | None = None) -> tuple[dict[str, Any], Descriptor, Any]:
    """(manifest JSON, its descriptor, config JSON) of ``tag`` (and ``arch`` inside an index)."""
    desc = layout.resolve(tag)
    if desc.media_type == OCI_INDEX:
        index = layout.read_json_blob(desc.digest, size=desc.size)
        entries = [Descriptor.from_json(m) for m in index["manifests"]]
        desc = next(d for d in entries if d.platform and d.platform["architecture"] == arch)
    manifest = layout.read_json_blob(desc.digest, size=desc.size)
    config_desc = Descriptor.from_json(manifest["config"])
    return manifest, desc, layout.read_json_blob(config_desc.digest, size=config_desc.size)
