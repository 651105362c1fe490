"""Byte sources: where image bytes come from.

A :class:`Source` is addressed by offset. Format readers only ever call :meth:`Source.pread` (and
:meth:`Source.readinto`), so a local file, a block device, ranged HTTP reads and spooled decompressed
streams are interchangeable under a reader. :func:`open_source` picks one by location.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from diskport.errors import SourceError, UsageError
from diskport.sources.base import Source
from diskport.sources.file import FileSource

if TYPE_CHECKING:
    from diskport.sources.http import HttpOptions


def open_source(location: str | os.PathLike[str], http: HttpOptions | None = None,
                on_bytes: Callable[[int], None] | None = None) -> Source:
    """The source at a local path, a ``file://`` URL or an ``http(s)://`` URL; other schemes are refused."""
    text = os.fspath(location)
    if "://" not in text:
        return FileSource(text)
    from urllib.parse import unquote, urlsplit  # a local path needs neither

    scheme = urlsplit(text).scheme.lower()
    if scheme in ("http", "https"):
        if urlsplit(text).path.endswith("/") or not urlsplit(text).path:
            raise SourceError("is a folder URL, not a disk image", path=text,
                             hint="name the appliance's .ovf descriptor in it (https://host/dir/vm.ovf) or a disk file")
        from diskport.sources.http import HttpSource  # httpx is imported only for URLs

        return HttpSource(text, http, on_bytes=on_bytes)
    if scheme == "file":
        return FileSource(unquote(urlsplit(text).path))
    raise UsageError(f"{scheme}:// URLs are not supported", path=text,
                     hint="pass a signed https URL instead (for example a presigned S3 or GCS URL)")


__all__ = ["FileSource", "Source", "open_source"]
