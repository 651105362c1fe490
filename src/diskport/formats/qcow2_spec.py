"""qcow2's on-disk vocabulary (qemu's docs/interop/qcow2.txt), shared by the reader (formats/qcow2.py) and the
writer (writers/qcow2.py) so the two cannot drift apart."""

from __future__ import annotations

MAGIC = b"QFI\xfb"
FMT = "qcow2"
#: Version 3's header up to and including the compression type, padded to 8 bytes.
HEADER_LENGTH = 112

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

#: The header's compression_type byte.
COMPRESSION_NAMES = {0: "zlib", 1: "zstd"}
COMPRESSION_TYPES = {"zlib": 0, "deflate": 0, "zstd": 1}

L1_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

#: qemu's QCOW_MAX_L1_SIZE: qemu opens no image with a larger L1 table.
MAX_L1_BYTES = 32 * 1024 * 1024
