"""ISO 9660 (with Joliet) and UDF: identification by their volume descriptors.

ISO 9660 (ECMA-119, 4th edition): volume descriptors from byte 32768 in 2048-byte sectors, each starting with a
type and "CD001", up to the set terminator (type 255). The primary descriptor (type 1) gives the volume
identifier at 40 (the label), the volume space size at 80 and the logical block size at 128 (both-endian
fields, the little-endian half read), the modification and creation dates at 830 and 813 (blkid's UUID is one
of them as ``YYYY-MM-DD-HH-MM-SS-CC``, the modification date first). A Joliet supplementary descriptor (type 2,
escape sequence ``%/@``, ``%/C`` or ``%/E`` at 88) carries the label in UCS-2, which blkid prefers.

UDF (ECMA-167 3rd edition part 2 and 3, OSTA UDF 2.60): a volume recognition sequence after the ISO descriptors
("BEA01", "NSR02"/"NSR03", "TEA01") says UDF; the anchor volume descriptor pointer (tag 2) at sector 256 of the
block size (512, 1024, 2048 or 4096 are tried) leads to the main volume descriptor sequence, whose primary
volume descriptor (tag 1: volume identifier, volume set identifier) and logical volume descriptor (tag 6:
logical volume identifier, the UDF revision in its domain identifier's suffix) give label, UUID and version as
blkid reports them. A disc with both (a UDF bridge) is reported as ``udf``. Identification only; by hand
because the few fields needed sit at fixed offsets.
"""

from __future__ import annotations

import struct

from diskport.guest.filesystems._superblock import chunk
from diskport.guest.filesystems.base import FilesystemSpec, FsInfo
from diskport.guest.view import Readable

START = 32768
SECTOR = 2048
MAX_DESCRIPTORS = 32      # ISO volume descriptors before the terminator
MAX_VRS = 64              # sectors of the UDF volume recognition sequence scanned
MAX_VDS = 64              # descriptors of the UDF main volume descriptor sequence walked
JOLIET = (b"%/@", b"%/C", b"%/E")


def _date(raw: bytes) -> str | None:
    digits = raw[:16]
    if not digits.isdigit() or not digits.strip(b"0"):
        return None
    d = digits.decode()
    return f"{d[0:4]}-{d[4:6]}-{d[6:8]}-{d[8:10]}-{d[10:12]}-{d[12:14]}-{d[14:16]}"


def dstring(raw: bytes) -> str | None:
    """An OSTA compressed Unicode d-string (ECMA-167 1/7.2.12; its last byte is the used length)."""
    used = raw[-1]
    if not raw or used < 2 or used > len(raw) - 1:
        return None
    body, comp = raw[1:used], raw[0]
    if comp == 8:
        text = body.decode("latin-1")
    elif comp == 16:
        text = body[: len(body) // 2 * 2].decode("utf-16-be", errors="replace")
    else:
        return None
    return text.rstrip("\0").strip() or None


def _udf(volume: Readable) -> FsInfo | None:
    nsr = False
    for index in range(MAX_VRS):
        desc = chunk(volume, START + index * SECTOR, 8)
        if desc is None:
            return None
        ident = desc[1:6]
        if ident in (b"NSR02", b"NSR03"):
            nsr = True
            break
        if ident not in (b"BEA01", b"CD001", b"CDW02", b"BOOT2", b"TEA01"):
            break
    if not nsr:
        return None
    for block in (512, 1024, 2048, 4096):
        anchor = chunk(volume, 256 * block, 512)
        if anchor is None:
            continue
        tag, location = struct.unpack_from("<H", anchor, 0)[0], struct.unpack_from("<I", anchor, 12)[0]
        if tag != 2 or location != 256:
            continue
        length, extent = struct.unpack_from("<II", anchor, 16)
        label = volume_id = uuid = version = None
        for index in range(min(length // block, MAX_VDS)):
            desc = chunk(volume, (extent + index) * block, 512)
            if desc is None:
                break
            (kind,) = struct.unpack_from("<H", desc, 0)
            if kind == 1 and volume_id is None:
                volume_id = dstring(desc[24:56])
                uuid = _udf_uuid(desc[72:200])
            elif kind == 6 and label is None:
                label = dstring(desc[84:212])
                revision = struct.unpack_from("<H", desc, 216 + 24)[0]
                if desc[217:236].startswith(b"*OSTA UDF Compliant") and revision:
                    version = f"{revision >> 8:x}.{revision & 0xFF:02x}"
            elif kind == 8:
                break
        return FsInfo(type="udf", label=label or volume_id, uuid=uuid, version=version,
                      details={"block_size": block, "volume_id": volume_id})
    return FsInfo(type="udf")


def _udf_uuid(raw: bytes) -> str | None:
    """blkid's UUID of a UDF volume: the volume set identifier's first 16 characters when they are hex digits
    (as mkudffs and Windows write it), else its first 8 bytes in hex."""
    text = dstring(raw)
    if text is None:
        return None
    head = text[:16]
    if len(head) == 16 and all(c in "0123456789abcdefABCDEF" for c in head):
        return head.lower()
    return text.encode("utf-8")[:8].hex() or None


def identify(volume: Readable) -> FsInfo | None:
    pvd: bytes | None = None
    joliet: bytes | None = None
    for index in range(MAX_DESCRIPTORS):
        desc = chunk(volume, START + index * SECTOR, SECTOR)
        if desc is None or desc[1:6] != b"CD001":
            break
        if desc[0] == 1 and pvd is None:
            pvd = desc
        elif desc[0] == 2 and desc[88:91] in JOLIET and joliet is None:
            joliet = desc
        elif desc[0] == 255:
            break
    udf = _udf(volume)
    if udf is not None:
        return udf
    if pvd is None:
        return None
    (blocks,) = struct.unpack_from("<I", pvd, 80)
    (block_size,) = struct.unpack_from("<H", pvd, 128)
    label = pvd[40:72].decode("latin-1").strip() or None
    if joliet is not None:
        label = joliet[40:72].decode("utf-16-be", errors="replace").rstrip("\0 ").strip() or label
    return FsInfo(type="iso9660", label=label, uuid=_date(pvd[830:847]) or _date(pvd[813:830]),
                  size=blocks * block_size if block_size in (512, 1024, 2048, 4096) else None,
                  version="Joliet Extension" if joliet is not None else None,
                  details={"block_size": block_size})


SPEC = FilesystemSpec("iso9660", identify, None)
