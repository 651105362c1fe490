"""Linux swap areas (and hibernation images written over them): identification by the signature page.

The last 10 bytes of the first page hold "SWAPSPACE2" (version 1) or "SWAP-SPACE" (the old version 0); the page
size is the writer's (4 KiB on x86, up to 64 KiB elsewhere, so each is tried). Version 1's header follows the
first 1 KiB (``union swap_header`` in Linux's ``include/linux/swap.h``): ``version`` at 1024, ``last_page`` at
1028, ``nr_badpages`` at 1032, ``sws_uuid[16]`` at 1036, ``sws_volume[16]`` at 1052, in the writer's byte
order. A hibernated system replaces the signature with its own ("S1SUSPEND", "S2SUSPEND", "ULSUSPEND",
"LINHIB0001"...), which blkid calls ``swsuspend``: reported so, since such a swap must not be reused.
Identification only.
"""

from __future__ import annotations

import struct

from diskport.guest.filesystems._superblock import c_string, chunk, uuid_text
from diskport.guest.filesystems.base import FilesystemSpec, FsInfo
from diskport.guest.view import Readable

PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)
SWAP = {b"SWAPSPACE2": "1", b"SWAP-SPACE": "0"}
SUSPEND = (b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"\xed\xc3\x02\xe9\x98\x56\xe5\x0c", b"LINHIB0001")


def identify(volume: Readable) -> FsInfo | None:
    for page in PAGE_SIZES:
        tail = chunk(volume, page - 10, 10)
        if tail is None:
            return None
        if any(tail.startswith(sig) for sig in SUSPEND):
            return FsInfo(type="swsuspend", details={"page_size": page})
        version = SWAP.get(tail)
        if version is None:
            continue
        if version == "0":
            return FsInfo(type="swap", version="0", details={"page_size": page})
        header = chunk(volume, 1024, 44)
        if header is None:
            return None
        for order in "<>":
            number, last_page = struct.unpack_from(order + "II", header, 0)
            if number == 1:
                break
        else:
            return None
        size = (last_page + 1) * page
        return FsInfo(type="swap", label=c_string(header[28:44]),
                      uuid=uuid_text(header[12:28]) if header[12:28].strip(b"\0") else None,
                      size=size, version="1",
                      details={"page_size": page, "byte_order": "little" if order == "<" else "big",
                               "truncated": size > volume.size})
    return None


SPEC = FilesystemSpec("swap", identify, None)
