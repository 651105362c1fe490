"""XFS: identification by the primary superblock (a reader comes in a later issue, into this module).

The superblock is sector 0 of allocation group 0, big-endian (XFS Algorithms & Data Structures, 3rd edition,
chapter "Allocation Groups", section "Superblocks"): ``sb_magicnum`` "XFSB" at 0, ``sb_blocksize`` at 4,
``sb_dblocks`` at 8, ``sb_uuid`` at 32, ``sb_logstart`` at 48, ``sb_versionnum`` at 100 (its low nibble is the
version, 4 or 5), ``sb_sectsize`` at 102, ``sb_fname[12]`` (the label) at 108, ``sb_blocklog`` at 120,
``sb_sectlog`` at 121, ``sb_agblocks`` at 84, ``sb_agcount`` at 88. The fields are checked for consistency
(power-of-two sizes whose logs match) before the volume is called XFS. Identification only; written by hand
because it is twenty lines of fixed offsets.
"""

from __future__ import annotations

import struct

from diskport.guest.filesystems._superblock import c_string, chunk, uuid_text
from diskport.guest.filesystems.base import FilesystemSpec, FsInfo
from diskport.guest.view import Readable

MAGIC = b"XFSB"


def identify(volume: Readable) -> FsInfo | None:
    sb = chunk(volume, 0, 512)
    if sb is None or sb[:4] != MAGIC:
        return None
    blocksize, dblocks = struct.unpack_from(">IQ", sb, 4)
    agblocks, agcount = struct.unpack_from(">II", sb, 84)
    versionnum, sectsize = struct.unpack_from(">HH", sb, 100)
    blocklog, sectlog = sb[120], sb[121]
    if not (9 <= blocklog <= 16 and blocksize == 1 << blocklog and 9 <= sectlog <= 15 and sectsize == 1 << sectlog
            and dblocks and agblocks and agcount):
        return None
    version = versionnum & 0xF
    if version not in (4, 5):
        return None
    return FsInfo(type="xfs", label=c_string(sb[108:120]), uuid=uuid_text(sb[32:48]), size=dblocks * blocksize,
                  version=f"v{version}",
                  details={"block_size": blocksize, "sector_size": sectsize, "ag_count": agcount})


SPEC = FilesystemSpec("xfs", identify, None)
