"""OCI image layouts on disk: write one, read any (image-spec v1.1 image-layout.md).

A layout is a folder holding ``oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``index.json`` (an image
index whose entries may carry ``org.opencontainers.image.ref.name``, the tag) and every blob under
``blobs/<algorithm>/<hex>``. diskport only writes and trusts sha256.

:class:`LayoutWriter` builds a new layout in a temporary folder beside the destination and renames it into
place only when complete; any failure (Ctrl-C included) removes it. :func:`read_layout` opens an existing
layout, whoever wrote it (diskport, skopeo, umoci, buildah): blobs are found by validated digest only, JSON
blobs are size-limited and verified against their digest, and :meth:`Layout.walk` lists everything an entry
reaches (nested indexes, manifests, configs, layers) children first, the order a registry upload needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from diskport.destination import make_part_folder
from diskport.errors import CorruptImage, DestinationError, SourceError, UsageError
from diskport.oci.media import (
    ANNOTATION_REF_NAME,
    INDEX_TYPES,
    OCI_INDEX,
    Descriptor,
    canonical_json,
    is_digest,
)

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
BLOBS = "blobs"
#: Default ceiling for a JSON blob (manifest, index, config) read into memory.
JSON_LIMIT = 4 * 1024 * 1024
_READ_CHUNK = 4 * 1024 * 1024


def blob_relpath(digest: str) -> str:
    """``blobs/sha256/<hex>`` for a validated sha256 digest (nothing else can name a path)."""
    if not is_digest(digest):
        raise UsageError(f"'{digest}' is not a sha256 digest")
    algorithm, hex_digest = digest.split(":", 1)
    return os.path.join(BLOBS, algorithm, hex_digest)


def check_destination(path: str, force: bool) -> None:
    """Refuse an existing ``path`` unless ``force``; even with force, only a file, an empty folder or an OCI
    layout is replaced (never an arbitrary folder). Called before any long work, and again when writing."""
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise DestinationError(f"folder {parent} does not exist", path=path)
        return
    if not force:
        raise UsageError("already exists; pass --force to replace it", path=path)
    if os.path.isdir(path) and not os.path.islink(path) and os.listdir(path) \
            and not os.path.isfile(os.path.join(path, LAYOUT_FILE)):
        raise UsageError("is a folder that is not an OCI image layout; refusing to replace it, even with --force",
                         path=path)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


class LayoutWriter:
    """A new OCI layout at ``path``, written in a folder beside it and renamed into place on a clean exit.

    Add blobs (:meth:`add_json`, or write them into :attr:`blobs_dir` directly, as
    :func:`diskport.oci.layer.write_layer` does) and entries of ``index.json`` (:meth:`add_manifest`).
    """

    def __init__(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        self.path = os.fspath(path)
        self.force = force
        self.tmp: str | None = None
        self._lock_fd = -1
        self.entries: list[Descriptor] = []

    def __enter__(self) -> LayoutWriter:
        check_destination(self.path, self.force)
        try:
            self.tmp, self._lock_fd = make_part_folder(self.path)
            os.chmod(self.tmp, 0o777 & ~_umask())
            os.makedirs(self.blobs_dir)
            _write_file(os.path.join(self.tmp, LAYOUT_FILE), canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
        except OSError as e:
            self._discard()
            raise DestinationError(f"cannot create the layout beside the destination: {e.strerror}",
                                   path=self.path) from None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self._discard()
                raise
        else:
            self._discard()

    @property
    def blobs_dir(self) -> str:
        """Where sha256 blobs go: ``<tmp>/blobs/sha256``; a blob's file name is its digest's hex."""
        if self.tmp is None:
            raise RuntimeError("LayoutWriter used outside its with block")
        return os.path.join(self.tmp, BLOBS, "sha256")

    def add_blob(self, data: bytes) -> str:
        """Store ``data`` as a blob; returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert self.tmp is not None
        try:
            _write_file(os.path.join(self.tmp, blob_relpath(digest)), data)
        except OSError as e:
            raise DestinationError(f"cannot write blob {digest}: {e.strerror}", path=self.path) from None
        return digest

    def add_json(self, obj: Any, media_type: str, *, platform: dict[str, str] | None = None,
                 annotations: dict[str, str] | None = None) -> Descriptor:
        """Store ``obj`` as canonical JSON; returns its descriptor (with ``platform``/``annotations`` if given)."""
        data = canonical_json(obj)
        return Descriptor(media_type, self.add_blob(data), len(data), dict(annotations or {}), platform)

    def add_manifest(self, descriptor: Descriptor, ref_name: str | None = None) -> None:
        """List a manifest or index in ``index.json``, tagged ``ref_name`` when given."""
        if ref_name is not None:
            descriptor = Descriptor(descriptor.media_type, descriptor.digest, descriptor.size,
                                    {**descriptor.annotations, ANNOTATION_REF_NAME: ref_name}, descriptor.platform)
        self.entries.append(descriptor)

    def commit(self) -> None:
        """Write ``index.json`` and rename the folder into place (replacing an old layout when forced)."""
        assert self.tmp is not None
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d.to_json() for d in self.entries]}
        try:
            _write_file(os.path.join(self.tmp, INDEX_FILE), canonical_json(index))
        except OSError as e:
            raise DestinationError(f"cannot write index.json: {e.strerror}", path=self.path) from None
        check_destination(self.path, self.force)
        old: str | None = None
        try:
            if os.path.isdir(self.path) and not os.path.islink(self.path):
                old = self.tmp + ".old"
                os.rename(self.path, old)
            elif os.path.lexists(self.path):
                os.unlink(self.path)
            os.rename(self.tmp, self.path)
        except OSError as e:
            if old is not None and not os.path.lexists(self.path):
                with contextlib.suppress(OSError):
                    os.rename(old, self.path)
            raise DestinationError(f"cannot move the finished layout into place: {e.strerror}",
                                   path=self.path) from None
        self.tmp = None
        self._unlock()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- reading ----------------------------------------------------------------------------------------------------

def _load_json(data: bytes, what: str, path: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptImage(f"{what} is not valid JSON ({e})", path=path) from None


def _descriptors(items: Any, what: str, path: str) -> list[Descriptor]:
    if not isinstance(items, list):
        raise CorruptImage(f"{what} has no list of descriptors", path=path)
    try:
        return [Descriptor.from_json(item) for item in items]
    except ValueError as e:
        raise CorruptImage(f"{what}: {e}", path=path) from None


@dataclass(frozen=True)
class Layout:
    """An OCI image layout opened for reading: its ``index.json`` and the descriptors listed there."""

    path: str
    index: dict[str, Any]
    manifests: tuple[Descriptor, ...]

    def ref_names(self) -> list[str]:
        return [d.annotations[ANNOTATION_REF_NAME] for d in self.manifests if ANNOTATION_REF_NAME in d.annotations]

    def resolve(self, ref_name: str | None = None) -> Descriptor:
        """The ``index.json`` entry tagged ``ref_name``; without one, the only entry there is."""
        if ref_name is None:
            if len(self.manifests) == 1:
                return self.manifests[0]
            names = ", ".join(self.ref_names()) or "none tagged"
            raise UsageError(f"holds {len(self.manifests)} images ({names}); name one", path=self.path)
        found = [d for d in self.manifests if d.annotations.get(ANNOTATION_REF_NAME) == ref_name]
        if not found:
            raise UsageError(f"has no image tagged '{ref_name}' (tags: {', '.join(self.ref_names()) or 'none'})",
                             path=self.path)
        if len(found) > 1:
            raise CorruptImage(f"has {len(found)} images tagged '{ref_name}'", path=self.path)
        return found[0]

    def blob_path(self, digest: str) -> str:
        """The file of blob ``digest``. Only a ``sha256:<hex>`` digest is accepted, and the file must lie
        inside the layout's ``blobs`` folder (a symlink leading elsewhere is refused)."""
        if not is_digest(digest):
            raise CorruptImage(f"refers to '{digest}', which is not a sha256 digest", path=self.path)
        path = os.path.join(self.path, blob_relpath(digest))
        blobs = os.path.realpath(os.path.join(self.path, BLOBS))
        real = os.path.realpath(path)
        if os.path.commonpath([blobs, real]) != blobs:
            raise CorruptImage(f"blob {digest} is a link that leaves the layout", path=self.path)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise CorruptImage(f"blob {digest} is missing", path=self.path) from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptImage(f"blob {digest} is not a regular file", path=self.path)
        return path

    def check_blob(self, descriptor: Descriptor) -> str:
        """The blob's path, after checking that its size is the descriptor's (the content is not hashed)."""
        path = self.blob_path(descriptor.digest)
        size = os.path.getsize(path)
        if size != descriptor.size:
            raise CorruptImage(f"blob {descriptor.digest} holds {size} bytes; its descriptor says {descriptor.size}",
                               path=self.path)
        return path

    def verify_blob(self, descriptor: Descriptor) -> None:
        """Hash the whole blob and compare with the descriptor's digest and size (reads every byte)."""
        path = self.check_blob(descriptor)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                h.update(chunk)
        if "sha256:" + h.hexdigest() != descriptor.digest:
            raise CorruptImage(f"blob {descriptor.digest} does not match its digest", path=self.path)

    def read_blob(self, digest: str, limit: int = JSON_LIMIT, *, size: int | None = None) -> bytes:
        """The bytes of a small blob, verified against ``digest`` (and ``size`` when given); at most ``limit``."""
        path = self.blob_path(digest)
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CorruptImage(f"blob {digest} is larger than the {limit}-byte limit for its kind", path=self.path)
        if size is not None and len(data) != size:
            raise CorruptImage(f"blob {digest} holds {len(data)} bytes; its descriptor says {size}", path=self.path)
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise CorruptImage(f"blob {digest} does not match its digest", path=self.path)
        return data

    def read_json_blob(self, digest: str, limit: int = JSON_LIMIT, *, size: int | None = None) -> Any:
        """A JSON blob (manifest, index, config), verified as :meth:`read_blob` does, parsed."""
        return _load_json(self.read_blob(digest, limit, size=size), f"blob {digest}", self.path)

    def children(self, descriptor: Descriptor) -> list[Descriptor]:
        """What a manifest (its config, then its layers) or an index (its manifests) refers to; nothing for
        other blobs. Manifests are recognised by their JSON when the media type is not an index's."""
        if descriptor.media_type not in INDEX_TYPES and "manifest" not in descriptor.media_type:
            return []
        doc = self.read_json_blob(descriptor.digest, size=descriptor.size)
        if not isinstance(doc, dict):
            raise CorruptImage(f"blob {descriptor.digest} is not a JSON object", path=self.path)
        what = f"manifest {descriptor.digest}"
        if descriptor.media_type in INDEX_TYPES or "manifests" in doc:
            return _descriptors(doc.get("manifests"), what, self.path)
        found = _descriptors([doc.get("config")], what, self.path)
        found += _descriptors(doc.get("layers", []), what, self.path)
        if "subject" in doc:
            found += _descriptors([doc["subject"]], what, self.path)
        return found

    def walk(self, descriptor: Descriptor) -> Iterator[Descriptor]:
        """Every descriptor reachable from ``descriptor``, each once, children before the parent that refers
        to them, ``descriptor`` itself last: blobs, then manifests, then indexes."""
        seen: set[str] = set()

        def visit(desc: Descriptor, depth: int) -> Iterator[Descriptor]:
            if depth > 8:
                raise CorruptImage("indexes nest more than 8 deep", path=self.path)
            for child in self.children(desc):
                if child.digest not in seen:
                    seen.add(child.digest)
                    yield from visit(child, depth + 1)
            yield desc

        seen.add(descriptor.digest)
        yield from visit(descriptor, 0)


def read_layout(path: str | os.PathLike[str]) -> Layout:
    """Open the OCI image layout at ``path``; SourceError when it is not one, CorruptImage when it is broken."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise SourceError("no such folder" if not os.path.exists(path) else "is not a folder", path=path)
    marker = os.path.join(path, LAYOUT_FILE)
    try:
        with open(marker, "rb") as f:
            layout = _load_json(f.read(JSON_LIMIT), LAYOUT_FILE, path)
    except FileNotFoundError:
        raise SourceError(f"is not an OCI image layout (no {LAYOUT_FILE} file)", path=path) from None
    except OSError as e:
        raise SourceError(f"cannot read {LAYOUT_FILE}: {e.strerror}", path=path) from None
    version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise CorruptImage(f"{LAYOUT_FILE} names layout version {version!r}; diskport reads 1.x", path=path)
    try:
        with open(os.path.join(path, INDEX_FILE), "rb") as f:
            data = f.read(JSON_LIMIT + 1)
    except FileNotFoundError:
        raise CorruptImage(f"has no {INDEX_FILE}", path=path) from None
    except OSError as e:
        raise SourceError(f"cannot read {INDEX_FILE}: {e.strerror}", path=path) from None
    if len(data) > JSON_LIMIT:
        raise CorruptImage(f"{INDEX_FILE} is larger than {JSON_LIMIT} bytes", path=path)
    index = _load_json(data, INDEX_FILE, path)
    if not isinstance(index, dict) or index.get("schemaVersion") != 2:
        raise CorruptImage(f"{INDEX_FILE} is not an image index (schemaVersion 2)", path=path)
    manifests = _descriptors(index.get("manifests"), INDEX_FILE, path)
    return Layout(path, index, tuple(manifests))
