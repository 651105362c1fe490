"""Byte sources: where image bytes come from.

A :class:`Source` is addressed by offset. Format readers only ever call :meth:`Source.pread` (and
:meth:`Source.readinto`), so a local file, a block device, ranged HTTP reads and spooled decompressed
streams are interchangeable under a reader.
"""

from diskport.sources.base import Source
from diskport.sources.file import FileSource, open_source

__all__ = ["FileSource", "Source", "open_source"]
