"""Push an OCI image layout to a registry: blobs first, then manifests, then the index, so the registry never
holds a manifest whose blobs are missing. Each blob goes through :meth:`RegistryClient.upload_blob` (skipped when
the registry has it, streamed from disk, chunked and resumed when the network or the registry asks for it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from diskport.errors import UsageError
from diskport.oci.auth import Credentials
from diskport.oci.layout import Layout, read_layout
from diskport.oci.media import INDEX_TYPES, MANIFEST_TYPES, Descriptor
from diskport.oci.reference import Reference, parse_reference
from diskport.oci.registry import RegistryClient, RegistryOptions
from diskport.oci.upload import UploadResult


@dataclass
class PushResult:
    reference: str
    digest: str                      # of what REF now points at (the index, or the only manifest)
    media_type: str
    uploads: list[UploadResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sent_bytes(self) -> int:
        return sum(u.size for u in self.uploads if u.how == "uploaded")

    @property
    def skipped_bytes(self) -> int:
        return sum(u.size for u in self.uploads if u.how != "uploaded")


def _is_manifest(layout: Layout, desc: Descriptor) -> bool:
    return desc.media_type in MANIFEST_TYPES or desc.media_type in INDEX_TYPES or bool(layout.children(desc))


def choose_root(layout: Layout, reference: Reference) -> Descriptor:
    """The image in the layout to push: the one tagged like REF's tag, else the only one there is."""
    if reference.tag and reference.tag in layout.ref_names():
        return layout.resolve(reference.tag)
    return layout.resolve(None)


def push_layout(layout_path: str, reference: str | Reference, *, options: RegistryOptions | None = None,
                credentials: Credentials | Literal["auto"] | None = "auto",
                progress: Callable[[int, int], None] | None = None) -> PushResult:
    """Push the image in the layout at ``layout_path`` to ``reference`` (``registry/name:tag``).

    ``progress(done, total)`` is called with bytes of blobs handled so far (sent, or found already there)."""
    began = time.monotonic()
    layout = read_layout(layout_path)
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    root = choose_root(layout, ref)
    order = list(layout.walk(root))
    blobs = [d for d in order if not _is_manifest(layout, d)]
    if ref.digest and ref.digest != root.digest:
        raise UsageError(f"{ref}: the layout's image is {root.digest}; push it by tag or by that digest")
    total = sum(d.size for d in blobs)
    done = 0

    def moved(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    result = PushResult(str(ref), root.digest, root.media_type)
    with RegistryClient(ref, options, credentials=credentials, push=True) as client:
        for desc in blobs:
            before = done
            upload = client.upload_blob(desc.digest, desc.size, layout.check_blob(desc), progress=moved)
            result.uploads.append(upload)
            moved(before + desc.size - done)  # a skipped or mounted blob counts as handled too
        for desc in order:
            if _is_manifest(layout, desc):
                body = layout.read_blob(desc.digest, size=desc.size)
                client.put_manifest(ref.reference if desc.digest == root.digest else desc.digest, body,
                                    desc.media_type)
    result.seconds = time.monotonic() - began
    return result
