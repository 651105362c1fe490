"""BitLocker (and BitLocker To Go) volumes: identification by the volume header and the FVE metadata block.

Layout from libyal's libbde documentation ("BitLocker Drive Encryption (BDE) format", sections 2-4), the names
blkid uses: a BitLocker volume's boot sector has the OEM identifier "-FVE-FS-" (Windows Vista: jump ``EB 52
90``; Windows 7 and later: ``EB 58 90``, the first FVE metadata block's offset at 176); a BitLocker To Go volume
keeps a FAT boot sector ("MSWIN4.1", jump ``EB 58 90``) with the metadata offset at 440. The FVE metadata block
starts "-FVE-FS-" with its version (1 Vista, 2 Windows 7 and later) at 10 and the encrypted volume size at 16;
its metadata header follows at 64 (metadata size, the volume identifier GUID at 80, the encryption method at
100) and then entries (size, type, value type, version), of which the description (type 7, a UTF-16 string,
e.g. "DESKTOP-1 C: 12/2/2026") is what blkid reports as the label. "MSWIN4.1" is also what Windows 9x wrote on
plain FAT volumes, so To Go is only claimed when the metadata block is really there. Nothing is decrypted.
"""

from __future__ import annotations

import struct
import uuid

from diskport.guest.filesystems._superblock import chunk
from diskport.guest.filesystems.base import FilesystemSpec, FsInfo
from diskport.guest.view import Readable

VISTA = b"\xeb\x52\x90-FVE-FS-"
WIN7 = b"\xeb\x58\x90-FVE-FS-"
TOGO = b"\xeb\x58\x90MSWIN4.1"
FVE = b"-FVE-FS-"
#: Metadata bytes read for the entries (the description is among the first).
METADATA_READ = 8192
DESCRIPTION, STRING = 0x0007, 0x0002
METHODS = {0x8000: "AES-CCM-128 with diffuser", 0x8001: "AES-CCM-256 with diffuser", 0x8002: "AES-CBC-128",
           0x8003: "AES-CBC-256", 0x8004: "AES-XTS-128", 0x8005: "AES-XTS-256"}


def identify(volume: Readable) -> FsInfo | None:
    boot = chunk(volume, 0, 512)
    if boot is None:
        return None
    magic = boot[:11]
    if magic == VISTA:
        return FsInfo(type="BitLocker", details={"variant": "vista"})
    if magic == WIN7:
        (offset,) = struct.unpack_from("<Q", boot, 176)
        variant = "bitlocker"
    elif magic == TOGO:
        (offset,) = struct.unpack_from("<Q", boot, 440)
        variant = "to-go"
    else:
        return None
    if not offset or offset % 64:
        return None
    block = chunk(volume, offset, 112)
    if block is None or block[:8] != FVE:
        return None
    (version,) = struct.unpack_from("<H", block, 10)
    (volume_size,) = struct.unpack_from("<Q", block, 16)
    (meta_size,) = struct.unpack_from("<I", block, 64)
    identifier = str(uuid.UUID(bytes_le=bytes(block[80:96])))
    (method,) = struct.unpack_from("<I", block, 100)
    label = None
    meta = chunk(volume, offset + 64, min(meta_size, METADATA_READ)) if meta_size >= 48 else None
    at = 48
    while meta is not None and at + 8 <= len(meta):
        size, kind, value_type = struct.unpack_from("<HHH", meta, at)
        if size < 8 or at % 2 or at + size > len(meta):
            break
        if kind == DESCRIPTION and value_type == STRING:
            label = meta[at + 8:at + size].decode("utf-16-le", errors="replace").rstrip("\0") or None
            break
        at += size
    return FsInfo(type="BitLocker", label=label, uuid=identifier, size=volume_size or None, version=str(version),
                  details={"variant": variant, "metadata_offset": offset,
                           "encryption": METHODS.get(method, f"{method:#06x}")})


SPEC = FilesystemSpec("BitLocker", identify, None)
