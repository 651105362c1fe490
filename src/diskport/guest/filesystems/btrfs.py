"""btrfs: identification by the primary superblock at 64 KiB (a reader comes in a later issue, here).

``struct btrfs_super_block`` (btrfs-progs ``kernel-shared/uapi/btrfs_tree.h``, and the on-disk format page of
the btrfs documentation): ``csum[32]``, ``fsid[16]`` at 32, ``bytenr`` at 48 (the superblock's own offset,
65536 for the primary), ``magic`` "_BHRfS_M" at 64, ``generation`` at 72, ``total_bytes`` at 112,
``bytes_used`` at 120, ``num_devices`` at 136, ``sectorsize`` at 144, ``nodesize`` at 148, ``csum_type`` at 196,
``dev_item`` at 201 (its ``uuid`` at 201+66), ``label[256]`` at 299, all little-endian. The checksum is not
verified (crc32c is not in the standard library); ``bytenr`` and the sizes are. Identification only; by hand
because it is a fixed layout.
"""

from __future__ import annotations

import struct

from diskport.guest.filesystems._superblock import c_string, chunk, uuid_text
from diskport.guest.filesystems.base import FilesystemSpec, FsInfo
from diskport.guest.view import Readable

SUPER_OFFSET = 0x10000
MAGIC = b"_BHRfS_M"
DEV_ITEM = 201


def identify(volume: Readable) -> FsInfo | None:
    sb = chunk(volume, SUPER_OFFSET, 4096)
    if sb is None or sb[64:72] != MAGIC:
        return None
    (bytenr,) = struct.unpack_from("<Q", sb, 48)
    (generation,) = struct.unpack_from("<Q", sb, 72)
    total_bytes, bytes_used = struct.unpack_from("<QQ", sb, 112)
    (num_devices,) = struct.unpack_from("<Q", sb, 136)
    sectorsize, nodesize = struct.unpack_from("<II", sb, 144)
    if bytenr != SUPER_OFFSET or sectorsize & (sectorsize - 1) or not 512 <= sectorsize <= 65536:
        return None
    return FsInfo(type="btrfs", label=c_string(sb[299:299 + 256]), uuid=uuid_text(sb[32:48]), size=total_bytes,
                  details={"uuid_sub": uuid_text(sb[DEV_ITEM + 66:DEV_ITEM + 82]), "block_size": sectorsize,
                           "node_size": nodesize, "devices": num_devices, "bytes_used": bytes_used,
                           "generation": generation})


SPEC = FilesystemSpec("btrfs", identify, None)
