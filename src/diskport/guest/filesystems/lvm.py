"""LVM2 physical volumes: identification by the label in one of the first four sectors.

LVM2's on-disk label (lvm2 ``lib/label/label.h`` and ``lib/format_text/layout.h``, described in libyal's
libvslvm "Logical Volume Manager (LVM) format"): a 512-byte sector among sectors 0-3 starting with "LABELONE",
``sector_xl`` (the sector it is in) at 8, ``crc_xl`` at 16 (LVM's CRC-32 — the usual reflected polynomial with
initial value 0xf597a6cf and no final inversion — over the rest of the sector from byte 20), ``offset_xl`` at 20
(where the PV header starts, from the label), ``type`` "LVM2 001" at 24. The PV header holds the PV UUID (32
characters, shown by LVM in groups of 6-4-4-4-4-4-6) and the device size. Identification only; the metadata
areas, volume groups and logical volumes are read by :mod:`diskport.guest.volumes.lvm`.
"""

from __future__ import annotations

import struct
import zlib

from diskport.guest.filesystems._superblock import chunk
from diskport.guest.filesystems.base import FilesystemSpec, FsInfo
from diskport.guest.view import Readable

LABEL = b"LABELONE"
LVM2 = b"LVM2 001"
CRC_INIT = 0xF597A6CF
GROUPS = (6, 4, 4, 4, 4, 4, 6)


def lvm_crc(data: bytes) -> int:
    """LVM's calc_crc: CRC-32 from CRC_INIT without the final inversion (zlib's crc32 inverts on both ends)."""
    return zlib.crc32(data, CRC_INIT ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def format_uuid(raw: str) -> str:
    parts, at = [], 0
    for width in GROUPS:
        parts.append(raw[at:at + width])
        at += width
    return "-".join(parts)


def identify(volume: Readable) -> FsInfo | None:
    head = chunk(volume, 0, 4 * 512)
    if head is None:
        return None
    for sector in range(4):
        label = head[sector * 512:(sector + 1) * 512]
        if label[:8] != LABEL:
            continue
        sector_xl, crc, offset = struct.unpack_from("<QII", label, 8)
        if sector_xl != sector or label[24:32] != LVM2 or lvm_crc(label[20:]) != crc:
            continue
        if not 32 <= offset <= 512 - 40:
            continue
        raw_uuid = label[offset:offset + 32]
        (device_size,) = struct.unpack_from("<Q", label, offset + 32)
        if not raw_uuid.isascii() or not raw_uuid.isalnum():
            continue
        return FsInfo(type="LVM2_member", uuid=format_uuid(raw_uuid.decode()), size=device_size or None,
                      version="LVM2 001", details={"label_sector": sector})
    return None


SPEC = FilesystemSpec("LVM2_member", identify, None)
