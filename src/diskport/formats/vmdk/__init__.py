"""VMDK reader (VMware *Virtual Disk Format 1.1* technical note).

A VMDK disk is a list of *extents* laid end to end in guest order, named by a text *descriptor* (spec "The
Descriptor File": a header with ``version``, ``CID``, ``parentCID`` and ``createType``, then "Extent
Descriptions" lines ``ACCESS SECTORS TYPE "file" [OFFSET]``, then the disk database ``ddb.*``). The descriptor
is either its own small file (``monolithicFlat``, ``twoGbMaxExtentFlat``, ``twoGbMaxExtentSparse``), whose
extents live in files beside it, or it is embedded in a single *hosted sparse extent* (``monolithicSparse``,
``streamOptimized``), which then is the whole disk.

Extent types read here:

* ``FLAT``: the guest bytes are the bytes of a file from a sector offset on.
* ``ZERO``: reads as zeros, no file.
* ``SPARSE``: a hosted sparse extent (spec "Hosted Sparse Extents"). Its header (spec "Hosted Sparse Extent
  Header", magic ``KDMV``, versions 1 to 3) gives the capacity, the grain size and the offset of the grain
  directory. Each grain directory entry (GDE) holds the sector of a grain table (GT); each grain table entry
  (GTE) holds the sector of one grain. A GTE of 0 is an unallocated grain and a GTE of 1 is a zeroed grain when
  the header's zeroed-grain flag is set (spec "Grain Directories and Grain Tables"); both read as zeros, as
  diskport never follows a parent disk.
* ``streamOptimized`` sparse extents (spec "Stream-Optimized Compressed Sparse Extents") store each grain
  deflate-compressed behind a grain marker (sector number and compressed size). When the header's grain
  directory offset is ``GD_AT_END`` the real header is the *footer*, the second-last sector of the file, between
  a footer marker and the end-of-stream marker (spec "The Footer"); it is read there as qemu does.

``VMFS`` extents (the ``-flat.vmdk`` of a disk copied off an ESX datastore) are plain flat files and are read
as ``FLAT``. Refused: ESX-only extents (``VMFSSPARSE``, ``VMFSRDM``, ``VMFSRAW``, ``SESPARSE``; spec "ESX Server
Sparse Extents", magic ``COWD``) and raw device descriptors as unsupported; delta disks (a real ``parentCID``
or a ``parentFileNameHint``) and extent names outside the image's folder as unsafe, since diskport never follows
references out of the image (extent files are opened only through :meth:`Source.open_relative`).

Safety: the descriptor is at most 1 MiB; every structure's offset and length is checked against its file's size
before it is read; the grain directory is sized by what the capacity needs (and capped at qemu's 32 Mi entries);
only one grain table is decoded at a time (plus a small cache) with numpy; a compressed grain is at most twice
the grain size and inflates to at most one grain. The work done is bounded by the virtual size whatever the
tables point at, since every grain is looked up once through a two-level table without chains (shared or
self-referencing tables only repeat bytes); stretches of unallocated tables are skipped with numpy and an empty
table costs one small read.

The reader is split by concern: :mod:`.spec` holds the constants and the on-disk header (a leaf, imported by
all), :mod:`.descriptor` parses descriptor text, :mod:`.extents` reads the flat, zero and hosted sparse extents,
:mod:`.image` lays the extents end to end as one :class:`VmdkImage`, and :mod:`.stream` reads a streamOptimized
file front to back from a stream.
"""

from __future__ import annotations

import re
import struct
from typing import TYPE_CHECKING

from diskport._lazy import lazy_getattr
from diskport.formats.vmdk.spec import (
    COWD_MAGIC,
    DESCRIPTOR_MARK,
    DISAGREE,
    FMT,
    GD_AT_END,
    SECTOR,
    SPARSE_MAGIC,
    SparseHeader,
)

if TYPE_CHECKING:
    from diskport.formats.vmdk.descriptor import (
        Descriptor,
        ExtentLine,
        decode_descriptor_text,
        parse_descriptor,
        read_embedded_descriptor,
        read_identity,
    )
    from diskport.formats.vmdk.extents import (
        ExtentReader,
        FlatExtent,
        SparseExtent,
        ZeroExtent,
        read_sparse_header,
        resolve_footer,
    )
    from diskport.formats.vmdk.image import VmdkImage, open_vmdk
    from diskport.formats.vmdk.stream import StreamedVmdkImage, is_stream_optimized
    from diskport.sources.base import Source

_CREATE_TYPE_LINE = re.compile(rb"^[ \t]*createType[ \t]*=", re.MULTILINE)


def probe(head: bytes, source: Source) -> int:
    """A sparse extent's magic and version, a COWD magic, or descriptor text. Here, not in :mod:`.image`, so
    that probing loads no reader: the readers are imported when a VMDK is opened (or streamed)."""
    if head[:4] == SPARSE_MAGIC and len(head) >= 8 and struct.unpack_from("<I", head, 4)[0] in (1, 2, 3):
        return 100
    if head[:4] == SPARSE_MAGIC:
        return 60
    if head[:4] == COWD_MAGIC:
        return 90
    text = head[:4096]
    if text.startswith(DESCRIPTOR_MARK) or (b"\0" not in text[:1024] and _CREATE_TYPE_LINE.search(text)):
        return 90
    return 0


__getattr__ = lazy_getattr(__name__, {
    "Descriptor": "diskport.formats.vmdk.descriptor",
    "ExtentLine": "diskport.formats.vmdk.descriptor",
    "decode_descriptor_text": "diskport.formats.vmdk.descriptor",
    "parse_descriptor": "diskport.formats.vmdk.descriptor",
    "read_embedded_descriptor": "diskport.formats.vmdk.descriptor",
    "read_identity": "diskport.formats.vmdk.descriptor",
    "ExtentReader": "diskport.formats.vmdk.extents",
    "FlatExtent": "diskport.formats.vmdk.extents",
    "SparseExtent": "diskport.formats.vmdk.extents",
    "ZeroExtent": "diskport.formats.vmdk.extents",
    "read_sparse_header": "diskport.formats.vmdk.extents",
    "resolve_footer": "diskport.formats.vmdk.extents",
    "VmdkImage": "diskport.formats.vmdk.image",
    "open_vmdk": "diskport.formats.vmdk.image",
    "StreamedVmdkImage": "diskport.formats.vmdk.stream",
    "is_stream_optimized": "diskport.formats.vmdk.stream",
})

__all__ = [
    "COWD_MAGIC", "DISAGREE", "FMT", "GD_AT_END", "SECTOR", "SPARSE_MAGIC",
    "Descriptor", "ExtentLine", "ExtentReader", "FlatExtent", "SparseExtent", "SparseHeader",
    "StreamedVmdkImage", "VmdkImage", "ZeroExtent", "decode_descriptor_text", "is_stream_optimized", "open_vmdk",
    "parse_descriptor", "probe", "read_embedded_descriptor", "read_identity", "read_sparse_header",
    "resolve_footer",
]
