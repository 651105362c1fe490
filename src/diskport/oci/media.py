"""The OCI and Docker vocabulary every other ``oci`` module shares: media types, descriptors, canonical JSON.

Facts from the OCI image spec (image-spec v1.1: descriptor.md, manifest.md, image-index.md, config.md) and the
Docker image manifest v2 schema 2; the code is ours.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from diskport.errors import UsageError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

#: Every manifest media type a client accepts when it fetches a manifest, most wanted first.
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = {
    OCI_LAYER: None, DOCKER_LAYER: None,
    OCI_LAYER_GZIP: "gzip", DOCKER_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
}
#: ``--compression`` value -> OCI layer media type
LAYER_MEDIA = {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}

ANNOTATION_CREATED = "org.opencontainers.image.created"
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_SOURCE = "org.opencontainers.image.source"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def is_digest(text: str) -> bool:
    """A sha256 digest in the ``sha256:<64 hex>`` form (the only algorithm diskport writes or trusts)."""
    return _DIGEST.fullmatch(text) is not None


def check_digest(digest: str) -> None:
    """UsageError unless ``digest`` is a sha256 digest (a digest a caller passes in, not one read)."""
    if not is_digest(digest):
        raise UsageError(f"{digest!r} is not a sha256 digest (sha256:<64 hex digits>)")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no spaces, UTF-8. Same object, same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest or index says about the blob it points at."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = dict(self.platform)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Descriptor:
        """Parse a descriptor; ValueError when it is not one (callers turn that into their own error)."""
        if not isinstance(obj, dict):
            raise ValueError("descriptor is not an object")
        media, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(media, str) or not isinstance(digest, str) or not is_digest(digest):
            raise ValueError(f"descriptor has no valid mediaType/digest ({digest!r})")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"descriptor {digest} has no valid size")
        annotations = obj.get("annotations") or {}
        platform = obj.get("platform")
        if not isinstance(annotations, dict) or (platform is not None and not isinstance(platform, dict)):
            raise ValueError(f"descriptor {digest} has malformed annotations or platform")
        return cls(media, digest, size, {str(k): str(v) for k, v in annotations.items()},
                   {str(k): str(v) for k, v in platform.items()} if platform else None)
