"""docker-archive: the ``docker save`` tarball, for ``docker load``, ``podman load`` and ``skopeo docker-archive:``.

The outer tar holds ``manifest.json`` (``[{"Config": "<hex>.json", "RepoTags": [...], "Layers": [...]}]``), the
image config as ``<hex>.json`` (its sha256 hex: the image ID) and each layer as an uncompressed tar. One image
of one platform per file, so several architectures cannot share one archive.

It is written in one pass over the disk: the layer tar's length is known in advance
(:func:`diskport.oci.layer.tar_size`), so its outer header comes first and the layer streams straight after it,
at offset 4096 (a padded pax header puts it there, keeping the disk's bytes 4 KiB aligned for ``O_DIRECT``);
the config, which needs the layer's diff_id, and ``manifest.json`` follow. The file is written beside its final
name and renamed when complete (:class:`diskport.destination.Destination`). Its page-cache policy (``cache``) is
decided as for a layer blob, from a bound known before it opens: the outer header, the layer tar's exact length,
and at most :data:`TRAILER_BOUND` for the config, ``manifest.json`` and the end of the archive.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from diskport.cache import CachePolicy
from diskport.destination import Destination
from diskport.errors import UsageError
from diskport.oci.layer import (
    DATA_ALIGN,
    END_OF_ARCHIVE,
    Progress,
    TarStream,
    copy_tar,
    member_header,
    padded,
)
from diskport.oci.media import canonical_json, sha256_digest
from diskport.oci.reference import repo_tag
from diskport.writers import RawWriter

#: Where the layer sits in the archive; the name does not depend on its digest, which is known only later.
LAYER_PATH = "layer/layer.tar"
MANIFEST_PATH = "manifest.json"
_FILE_MODE = 0o644
#: More than the config, manifest.json (their headers included) and the end of the archive ever take.
TRAILER_BOUND = 1024 * 1024

def check_destination(path: str, force: bool) -> None:
    """An existing file is replaced only with ``force``; a folder never."""
    if os.path.isdir(path):
        raise UsageError("is a folder; name the archive file to write", path=path)
    if os.path.lexists(path) and not force:
        raise UsageError("already exists; pass --force to replace it", path=path)


@dataclass(frozen=True)
class ArchiveResult:
    path: str
    diff_id: str
    config_digest: str
    tar_size: int    # the layer tar inside
    size: int        # the whole archive
    cache: CachePolicy | None = field(default=None, compare=False)  # the page-cache policy it was written with


def write_docker_archive(path: str | os.PathLike[str], disk: str, name: str,
                         config_for: Callable[[str], Any], *, mtime: int, repo_tags: Sequence[str] = (),
                         force: bool = False, progress: Progress | None = None, cache: str = "auto",
                         ) -> ArchiveResult:
    """Write a docker-archive of the containerDisk of ``disk`` (file name ``name`` under ``disk/``).

    ``config_for(diff_id)`` returns the image config object for the layer's diff_id; ``repo_tags`` are
    references (``name[:tag]``) the image is loaded as; ``mtime`` is every timestamp. ``progress`` receives the
    layer tar's bytes done; ``cache`` is the page-cache mode (see the module docstring). Nothing exists at
    ``path`` unless the archive is complete.
    """
    path = os.fspath(path)
    check_destination(path, force)
    tags = [repo_tag(t) for t in repo_tags]
    with TarStream(disk, name, mtime=mtime, scan_zeros=True) as stream:
        head = member_header(LAYER_PATH, size=stream.size, mode=_FILE_MODE, uid=0, gid=0, mtime=mtime,
                             align=DATA_ALIGN)
        bound = len(head) + padded(stream.size) + TRAILER_BOUND
        with Destination(path, force=force, size=bound, cache=cache) as dest:
            writer = RawWriter(dest.fd, None, name=dest.path, direct_fd=dest.direct_fd)
            writer.behind = dest.behind
            pos = _write_members(writer, stream, head, config_for, tags, mtime, progress)
    return ArchiveResult(path, *pos, dest.policy)


def _write_members(writer: RawWriter, stream: TarStream, head: bytes, config_for: Callable[[str], Any],
                   tags: list[str], mtime: int, progress: Progress | None) -> tuple[str, str, int, int]:
    """The archive after its first header: the layer, the config, manifest.json, the end; returns
    ``(diff_id, config digest, layer tar size, archive size)``."""
    writer.write(0, head)
    diff_id = copy_tar(stream, writer, len(head), progress)
    pos = len(head) + padded(stream.size)
    config = canonical_json(config_for(diff_id))
    config_digest = sha256_digest(config)
    config_name = config_digest.removeprefix("sha256:") + ".json"
    manifest = canonical_json([{"Config": config_name, "RepoTags": tags, "Layers": [LAYER_PATH]}])
    for member, data in ((config_name, config), (MANIFEST_PATH, manifest)):
        header = member_header(member, size=len(data), mode=_FILE_MODE, uid=0, gid=0, mtime=mtime)
        body = header + data.ljust(padded(len(data)), b"\0")
        writer.write(pos, body)
        pos += len(body)
    writer.write(pos, END_OF_ARCHIVE)
    pos += len(END_OF_ARCHIVE)
    writer.finish(pos)
    return diff_id, config_digest, stream.size, pos
