"""Linux MD RAID members: identification by the md superblock (versions 0.90, 1.0, 1.1, 1.2).

Layouts from Linux's ``include/uapi/linux/raid/md_p.h`` (and ``Documentation/admin-guide/md.rst``):

* 0.90 (``mdp_superblock_t``, 4 KiB) sits in the last 64 KiB-aligned 64 KiB of the device: magic 0xa92b4efc,
  ``major_version`` 0, ``minor_version`` 90, the array UUID in ``set_uuid0`` (at 20) and ``set_uuid1..3``
  (at 52; shown as four 32-bit numbers, as blkid and mdadm print them), ``level`` at 28, ``size`` (KiB used
  per device) at 32, ``raid_disks`` at 40, ``sb_csum`` at 152;
* 1.x (``mdp_superblock_1``, 256 bytes plus 2 per device role) at the end of the device (1.0: 8 KiB from the end,
  4 KiB aligned), at 0 (1.1) or at 4 KiB (1.2): magic, ``major_version`` 1, ``set_uuid`` at 16, ``set_name`` at
  32 (blkid's label), ``level`` at 72, ``raid_disks`` at 92, ``data_offset``/``data_size``/``super_offset`` at
  128/136/144 (sectors), ``device_uuid`` at 168, ``sb_csum`` at 216 over ``256 + 2 * max_dev`` bytes.

A 1.x superblock counts only when ``super_offset`` is where it was found and its checksum matches (as blkid
requires); the 0.90 checksum is reported in ``details``. A RAID1 member with a 1.0 or 0.90 superblock at its end
also shows the filesystem at its start: that is why this probe runs before the filesystems. Identification
only: assembling arrays is not diskport's business.
"""

from __future__ import annotations

import struct

from diskport.guest.filesystems._superblock import c_string, chunk, uuid_text
from diskport.guest.filesystems.base import FilesystemSpec, FsInfo
from diskport.guest.view import Readable

MAGIC = 0xA92B4EFC
SB1 = 256
MAX_DEV = 1920  # roles fitting a 4 KiB superblock area
LEVELS = {-4: "multipath", -1: "linear", 0: "raid0", 1: "raid1", 4: "raid4", 5: "raid5", 6: "raid6", 10: "raid10"}


def _fold(total: int) -> int:
    return ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


def sb1_checksum(sb: bytes) -> int:
    """``calc_sb_1_csum``: little-endian 32-bit words summed (the checksum field as zero), carries folded."""
    body = bytearray(sb)
    body[216:220] = b"\0\0\0\0"
    words = len(body) // 4
    total = sum(struct.unpack_from(f"<{words}I", body))
    if len(body) % 4:
        total += struct.unpack_from("<H", body, words * 4)[0]
    return _fold(total)


def sb0_checksum(sb: bytes) -> int:
    body = bytearray(sb)
    body[152:156] = b"\0\0\0\0"
    return _fold(sum(struct.unpack_from("<1024I", body)))


def _v1(volume: Readable, offset: int, minor: str) -> FsInfo | None:
    head = chunk(volume, offset, SB1)
    if head is None or struct.unpack_from("<II", head, 0) != (MAGIC, 1):
        return None
    data_offset, data_size, super_offset = struct.unpack_from("<QQQ", head, 128)
    (csum, max_dev) = struct.unpack_from("<II", head, 216)
    if super_offset * 512 != offset or max_dev > MAX_DEV:
        return None
    sb = chunk(volume, offset, SB1 + 2 * max_dev)
    if sb is None or sb1_checksum(sb) != csum:
        return None
    (level,) = struct.unpack_from("<i", head, 72)
    (raid_disks,) = struct.unpack_from("<I", head, 92)
    return FsInfo(type="linux_raid_member", label=c_string(head[32:64]), uuid=uuid_text(head[16:32]),
                  size=data_size * 512 or None, version=f"1.{minor}",
                  details={"uuid_sub": uuid_text(head[168:184]), "level": LEVELS.get(level, str(level)),
                           "raid_disks": raid_disks, "data_offset": data_offset * 512,
                           "superblock_offset": offset})


def _v090(volume: Readable) -> FsInfo | None:
    offset = (volume.size & ~0xFFFF) - 0x10000
    if offset < 0:
        return None
    sb = chunk(volume, offset, 4096)
    if sb is None:
        return None
    magic, major, minor, patch = struct.unpack_from("<IIII", sb, 0)
    if magic != MAGIC or (major, minor) != (0, 90):
        return None
    (level,) = struct.unpack_from("<i", sb, 28)
    size_kib, _, raid_disks = struct.unpack_from("<III", sb, 32)
    (csum,) = struct.unpack_from("<I", sb, 152)
    # blkid and mdadm show the four 32-bit UUID words as numbers (byte-swapped from disk on little-endian).
    words = struct.unpack_from("<I", sb, 20) + struct.unpack_from("<III", sb, 52)
    set_uuid = bytes.fromhex("".join(f"{w:08x}" for w in words))
    return FsInfo(type="linux_raid_member", uuid=uuid_text(set_uuid), size=size_kib * 1024 or None,
                  version=f"0.90.{patch}",
                  details={"level": LEVELS.get(level, str(level)), "raid_disks": raid_disks,
                           "checksum_ok": sb0_checksum(sb) == csum, "superblock_offset": offset})


def identify(volume: Readable) -> FsInfo | None:
    info = _v090(volume)
    if info is not None:
        return info
    end = ((volume.size // 512 - 16) & ~7) * 512
    if end > 0:
        info = _v1(volume, end, "0")
        if info is not None:
            return info
    return _v1(volume, 0, "1") or _v1(volume, 4096, "2")


SPEC = FilesystemSpec("linux_raid_member", identify, None)
