"""The disk inside a containerDisk image in a registry, as a :class:`~diskport.sources.base.Source`.

The walk a platform importer does: the manifest at the reference (an index is resolved by ``--platform``, by
default this machine's), its layers top first, whiteouts honoured, until the single regular file under
``disk/`` (:mod:`diskport.oci.tarscan`). The disk then goes through the same opener and engine as every other
import, so ``diskport pull`` is ``diskport import docker://REF``:

* an **uncompressed** layer on a registry that answers ranges is read in place: the disk is a slice of the blob
  read over ranged requests, so a qcow2 converts with no scratch space (the layer's digest is not checked then:
  that would mean reading all of it; the manifest, fetched by digest, and TLS vouch for it);
* a **compressed** layer (gzip, zstd) is one forward stream: raw disks stream into the destination, the other
  formats are spooled, and the blob's sha256 is checked against the manifest before the destination is put in
  place.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from diskport.errors import CorruptImage, RegistryError, SourceError
from diskport.oci.auth import Credentials
from diskport.oci.media import INDEX_TYPES, LAYER_TYPES, Descriptor
from diskport.oci.platform import host_architecture, parse_platform, platform_key
from diskport.oci.reference import Reference, parse_reference
from diskport.oci.registry import RegistryClient, RegistryOptions
from diskport.oci.tarscan import LayerScan, MemberStream, RandomTarReader, StreamTarReader, scan_layer
from diskport.sources.base import SliceSource, Source
from diskport.sources.checksum import ChecksumSource
from diskport.sources.compression import detect_compression
from diskport.sources.http import HttpOptions, HttpSource
from diskport.sources.stream import DecompressingStream

MAX_NESTING = 2
#: Most layers walked in one image: Docker's layer store refuses to stack more than 128 (its ``maxDepth``), so
#: more is not an image any runtime can run, and each layer costs a request.
MAX_LAYERS = 128


@dataclass
class PulledDisk:
    """Where the disk was found and how it is read; ``verify`` runs before the destination is committed."""

    reference: str
    manifest_digest: str
    layer: Descriptor
    disk_name: str
    access: str
    verify: Callable[[], None] | None = None
    layers_scanned: int = 1
    platform: str | None = None
    notes: list[str] = field(default_factory=list)


def load_json(body: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise CorruptImage(f"{what} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CorruptImage(f"{what} is not a JSON object")
    return obj


def _descriptors(obj: dict[str, Any], key: str, what: str) -> list[Descriptor]:
    items = obj.get(key)
    if not isinstance(items, list):
        raise CorruptImage(f"{what} has no '{key}' list")
    try:
        return [Descriptor.from_json(item) for item in items]
    except ValueError as e:
        raise CorruptImage(f"{what}: {e}") from None


def choose_manifest(index: dict[str, Any], wanted: str, where: str) -> Descriptor:
    want = parse_platform(wanted)
    entries = _descriptors(index, "manifests", f"{where}: the index")
    offered = []
    for entry in entries:
        plat = entry.platform or {}
        offered.append("/".join(p for p in (plat.get("os"), plat.get("architecture"), plat.get("variant")) if p))
        if all(plat.get(key) == value for key, value in want.items()):
            return entry
    raise RegistryError(f"{where}: no image for linux/{platform_key(want)} (the index offers "
                        f"{', '.join(offered) or 'none'})", hint="choose one with --platform")


class _Puller:
    def __init__(self, reference: Reference, client: RegistryClient, http: HttpOptions,
                 on_bytes: Callable[[int], None] | None) -> None:
        self.reference = reference
        self.client = client
        self.http = http
        self.on_bytes = on_bytes
        self.where = str(reference)

    def manifest(self, wanted_platform: str) -> tuple[dict[str, Any], str, str | None]:
        body, media, digest = self.client.get_manifest(self.reference.reference)
        chosen: str | None = None
        for _ in range(MAX_NESTING + 1):
            obj = load_json(body, f"{self.where}: the manifest")
            media = obj.get("mediaType", media) if isinstance(obj.get("mediaType"), str) else media
            if media not in INDEX_TYPES and "manifests" not in obj:
                return obj, digest, chosen
            entry = choose_manifest(obj, wanted_platform, self.where)
            chosen = wanted_platform
            body, media, digest = self.client.get_manifest(entry.digest)
        raise CorruptImage(f"{self.where}: indexes nested more than {MAX_NESTING} deep")

    def blob(self, layer: Descriptor) -> HttpSource:
        options = dataclasses.replace(self.http, auth=self.client.auth)
        source = HttpSource(self.client.blob_url(layer.digest), options, on_bytes=self.on_bytes)
        source.name = f"{self.reference.name}@{layer.digest[:19]}"
        if source.size != layer.size:
            source.close()
            raise CorruptImage(f"the layer blob is {source.size} bytes; the manifest says {layer.size}",
                               path=source.name)
        return source

    def find_disk(self, manifest: dict[str, Any], manifest_digest: str) -> tuple[Source, PulledDisk]:
        layers = _descriptors(manifest, "layers", f"{self.where}: the manifest")
        if not layers:
            raise RegistryError(f"{self.where}: the image has no layers, so no disk")
        if len(layers) > MAX_LAYERS:
            raise RegistryError(f"{self.where}: the image has {len(layers)} layers, more than the {MAX_LAYERS} "
                                "a container runtime stacks; not a containerDisk image")
        hidden: frozenset[str] = frozenset()
        for scanned, layer in enumerate(reversed(layers), 1):
            if layer.media_type not in LAYER_TYPES and "tar" not in layer.media_type:
                raise RegistryError(f"{self.where}: layer {layer.digest} is {layer.media_type}, not a tar layer")
            blob = self.blob(layer)
            try:
                found = self._scan(blob, layer, hidden, manifest_digest)
            except BaseException:
                blob.close()
                raise
            if not isinstance(found, LayerScan):
                found[1].layers_scanned = scanned
                return found
            blob.close()
            hidden = hidden | found.whiteouts
            if found.opaque:
                break  # an opaque whiteout: the layers below show nothing under disk/
        raise RegistryError(f"{self.where}: no file under disk/ in any layer; not a containerDisk image")

    def _scan(self, blob: HttpSource, layer: Descriptor, hidden: frozenset[str],
              manifest_digest: str) -> tuple[Source, PulledDisk] | LayerScan:
        kind = detect_compression(blob.pread(0, 16))
        if kind is None and not blob.sequential:
            scan = scan_layer(RandomTarReader(blob), hidden)
            if scan.disk is None:
                return scan
            disk = SliceSource(blob, scan.disk.data_offset, scan.disk.size, name=f"{self.where}:disk/{scan.disk_name}")
            return disk, PulledDisk(self.where, manifest_digest, layer, scan.disk_name,
                                    "the uncompressed layer, read in place")
        checked = ChecksumSource(blob, "sha256", layer.digest.split(":", 1)[1])
        label = f"the {kind} layer" if kind else "the layer, in order"
        reader = StreamTarReader(DecompressingStream(checked, kind), blob.name)
        scan = scan_layer(reader, hidden)
        if scan.disk is None:
            return scan
        member = MemberStream(reader, scan.disk.size, f"{self.where}:disk/{scan.disk_name}", label, scan)

        def verify() -> None:
            member.check_rest(hidden)  # the checks the in-place walk made up front
            try:
                checked.verify()
            except SourceError:
                raise CorruptImage(f"layer {layer.digest} does not match its digest", path=self.where,
                                   hint="nothing was written") from None

        return member, PulledDisk(self.where, manifest_digest, layer, scan.disk_name, label, verify)


def open_registry_disk(text: str, *, platform: str | None = None, registry: RegistryOptions | None = None,
                       credentials: Credentials | Literal["auto"] | None = "auto", http: HttpOptions | None = None,
                       on_bytes: Callable[[int], None] | None = None) -> tuple[Source, PulledDisk]:
    """The disk file of the containerDisk image ``text`` (``[docker://]registry/name[:tag|@digest]``)."""
    reference = parse_reference(text.removeprefix("docker://"))
    options = registry or RegistryOptions()
    client = RegistryClient(reference, options, credentials=credentials)
    blob_http = options.http_options(http)
    try:
        puller = _Puller(reference, client, blob_http, on_bytes)
        wanted = platform or host_architecture()
        manifest, digest, chosen = puller.manifest(wanted)
        source, info = puller.find_disk(manifest, digest)
        info.platform = chosen
        return source, info
    finally:
        client.close()
