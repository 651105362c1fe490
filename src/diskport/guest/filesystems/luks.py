"""LUKS1 and LUKS2 encrypted volumes: identification by the binary header.

LUKS1 On-Disk Format Specification 1.2.3 section 2.4 (``magic`` "LUKS\\xba\\xbe", ``version`` 1, ``cipher-name``
at 8, ``cipher-mode`` at 40, ``hash-spec`` at 72, ``payload-offset`` at 104 in sectors, ``key-bytes`` at 108,
``uuid`` at 168, all big-endian) and the LUKS2 On-Disk Format Specification 1.1.x section 2 (the same magic and
version 2, ``hdr_size`` at 8, ``seqid`` at 16, ``label`` at 24, ``checksum_alg`` at 72, ``uuid`` at 168,
``subsystem`` at 208, ``hdr_offset`` at 256; the secondary header begins "SKUL\\xba\\xbe"). When the primary is
damaged blkid also looks for the secondary header at every offset LUKS2 allows (16 KiB to 4 MiB); here only
16 KiB is tried, the default, which lies in the same block as the primary and so costs no extra read over
HTTP. Nothing is decrypted: the volume's contents stay unknown, which is the point of reporting it.
"""

from __future__ import annotations

import struct

from diskport.guest.filesystems._superblock import c_string, chunk
from diskport.guest.filesystems.base import FilesystemSpec, FsInfo
from diskport.guest.view import Readable

PRIMARY = b"LUKS\xba\xbe"
SECONDARY = b"SKUL\xba\xbe"
SECONDARY_AT = 0x4000


def _parse(hdr: bytes, at: int) -> FsInfo | None:
    (version,) = struct.unpack_from(">H", hdr, 6)
    uuid = c_string(hdr[168:208], "ascii")
    if version == 1 and at == 0:
        (payload,) = struct.unpack_from(">I", hdr, 104)
        (key_bytes,) = struct.unpack_from(">I", hdr, 108)
        return FsInfo(type="crypto_LUKS", uuid=uuid, version="1",
                      details={"cipher": c_string(hdr[8:40], "ascii"), "cipher_mode": c_string(hdr[40:72], "ascii"),
                               "hash": c_string(hdr[72:104], "ascii"), "key_bits": key_bytes * 8,
                               "payload_offset": payload * 512})
    if version == 2:
        hdr_size, seqid = struct.unpack_from(">QQ", hdr, 8)
        (hdr_offset,) = struct.unpack_from(">Q", hdr, 256)
        if hdr_offset != at:
            return None
        return FsInfo(type="crypto_LUKS", label=c_string(hdr[24:72]), uuid=uuid, version="2",
                      details={"subsystem": c_string(hdr[208:256]), "header_size": hdr_size, "seqid": seqid,
                               "checksum": c_string(hdr[72:104], "ascii"),
                               "header": "primary" if at == 0 else "secondary"})
    return None


def identify(volume: Readable) -> FsInfo | None:
    hdr = chunk(volume, 0, 512)
    if hdr is None:
        return None
    if hdr[:6] == PRIMARY:
        info = _parse(hdr, 0)
        if info is not None:
            return info
    second = chunk(volume, SECONDARY_AT, 512)
    if second is not None and second[:6] == SECONDARY:
        return _parse(second, SECONDARY_AT)
    return None


SPEC = FilesystemSpec("crypto_LUKS", identify, None)
