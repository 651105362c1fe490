"""exFAT: identification by the main boot sector and the volume label entry of the root directory.

Microsoft's exFAT file system specification: section 3.1 (Main Boot Sector: ``FileSystemName`` "EXFAT   " at 3,
``MustBeZero`` 11..63, ``VolumeLength`` at 72, ``ClusterHeapOffset`` at 88, ``ClusterCount`` at 92,
``FirstClusterOfRootDirectory`` at 96, ``VolumeSerialNumber`` at 100, ``FileSystemRevision`` at 104,
``BytesPerSectorShift`` at 108, ``SectorsPerClusterShift`` at 109, ``NumberOfFats`` at 110, signature 55AA at
510) and section 7.3 (the Volume Label directory entry, type 0x83: a character count and up to 11 UTF-16LE
characters). The label is looked for in the first 4 KiB of the root directory's first cluster, where formatting
tools write it; the UUID is the serial number as blkid prints it (``XXXX-XXXX``). Identification only.
"""

from __future__ import annotations

import struct

from diskport.guest.filesystems._superblock import chunk
from diskport.guest.filesystems.base import FilesystemSpec, FsInfo
from diskport.guest.view import Readable

NAME = b"EXFAT   "
LABEL_SCAN = 4096
LABEL_ENTRY = 0x83


def identify(volume: Readable) -> FsInfo | None:
    boot = chunk(volume, 0, 512)
    if boot is None or boot[3:11] != NAME or boot[510:512] != b"\x55\xaa" or boot[11:64].strip(b"\0"):
        return None
    (length,) = struct.unpack_from("<Q", boot, 72)
    heap, clusters, root = struct.unpack_from("<III", boot, 88)
    (serial,) = struct.unpack_from("<I", boot, 100)
    minor, major = boot[104], boot[105]
    sector_shift, cluster_shift, fats = boot[108], boot[109], boot[110]
    if not (9 <= sector_shift <= 12 and sector_shift + cluster_shift <= 25 and fats in (1, 2)):
        return None
    sector = 1 << sector_shift
    cluster = sector << cluster_shift
    label = None
    if 2 <= root < clusters + 2:
        entries = chunk(volume, heap * sector + (root - 2) * cluster, min(cluster, LABEL_SCAN))
        for at in range(0, len(entries or b""), 32):
            assert entries is not None
            kind = entries[at]
            if kind == 0:
                break
            if kind == LABEL_ENTRY:
                count = min(entries[at + 1], 11)
                label = entries[at + 2:at + 2 + 2 * count].decode("utf-16-le", errors="replace") or None
                break
    return FsInfo(type="exfat", label=label, uuid=f"{serial >> 16:04X}-{serial & 0xFFFF:04X}", size=length * sector,
                  version=f"{major}.{minor}", details={"block_size": sector, "cluster_size": cluster})


SPEC = FilesystemSpec("exfat", identify, None)
