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

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, cms, x509

from diskport.errors import CorruptImage
from diskport.guest.view import Readable

#: A loader larger than this is not one (shim and grub are ~1-2 MiB, bootmgfw ~2-3 MiB); refused, not hashed.
MAX_IMAGE = 64 * 1024 * 1024
#: The certificate table is a few KiB; more than this is hostile.
MAX_CERT_TABLE = 1024 * 1024
#: More signatures than this in one table (shim has two) is not a loader's.
MAX_SIGNATURES = 8
WIN_CERT_PKCS_SIGNED_DATA = 0x0002
SPC_INDIRECT_DATA = "1.3.6.1.4.1.311.2.1.4"
NESTED_SIGNATURE = "1.3.6.1.4.1.311.2.4.1"
#: Certificate authorities as the certificates name them -> as the platform's Secure Boot db is known by.
AUTHORITIES = {
    "Microsoft Corporation UEFI CA 2011": "Microsoft UEFI CA 2011",
    "Microsoft Windows Production PCA 2011": "Microsoft Windows Production PCA 2011",
    "Microsoft UEFI CA 2023": "Microsoft UEFI CA 2023",
    "Windows UEFI CA 2023": "Windows UEFI CA 2023",
}
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
    #: How many signatures the table holds (shim has two), counted up to MAX_SIGNATURES.
    signatures: int = 0
    #: Why a certificate table that is there could not be read.
    problem: str | None = None


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
    """The machine and Authenticode signature of the PE image ``image``.

    ``signer`` is the authority the first signature chains to, preferring one of :data:`AUTHORITIES` when the
    image carries several (shim is signed by both Microsoft UEFI CAs). The signatures' RSA values are not
    verified here, the firmware does that: the answer says who an image claims signed it and whether its bytes
    are the ones signed, which is what tells a user whether Secure Boot can work.
    """
    layout = pe_layout(image)
    sig = Signature(machine=layout.machine, signed=layout.cert_size > 0)
    if not sig.signed:
        return sig
    if layout.cert_size > MAX_CERT_TABLE:
        sig.problem = f"certificate table of {layout.cert_size} bytes is too large"
        return sig
    if image.size > MAX_IMAGE:
        sig.problem = f"a {image.size}-byte image is too large to be a loader"
        return sig
    table = image.pread(layout.cert_offset, layout.cert_size)
    try:
        signatures = list(_signed_datas(table))
    except (ValueError, TypeError, KeyError) as e:   # asn1crypto reports malformed DER as these
        sig.problem = f"unreadable signature ({type(e).__name__})"
        return sig
    if not signatures:
        sig.problem = "the certificate table holds no PKCS#7 signature"
        return sig
    sig.signatures = len(signatures)
    named = [(_authority(sd), sd) for sd in signatures]
    signer, chosen = next(((n, sd) for n, sd in named if n in AUTHORITIES.values()), named[0])
    sig.signer = signer
    try:
        algorithm, wanted = _signed_digest(chosen)
    except (ValueError, TypeError, KeyError) as e:
        sig.problem = f"unreadable signed digest ({type(e).__name__})"
        return sig
    sig.digest_ok = _image_digest(image, layout, algorithm) == wanted
    return sig


def _signed_datas(table: bytes) -> Iterator[cms.SignedData]:
    """The SignedData of each WIN_CERTIFICATE record (8-byte aligned), and the signatures nested in them."""
    at = count = 0
    while at + 8 <= len(table) and count < MAX_SIGNATURES:
        length, _revision, kind = struct.unpack("<IHH", table[at:at + 8])
        if length < 8 or at + length > len(table):
            raise ValueError("WIN_CERTIFICATE length")
        if kind == WIN_CERT_PKCS_SIGNED_DATA:
            info = cms.ContentInfo.load(table[at + 8:at + length])
            pending = [info]
            while pending and count < MAX_SIGNATURES:
                info = pending.pop(0)
                if info["content_type"].native != "signed_data":
                    continue
                signed = info["content"]
                count += 1
                yield signed
                for signer in signed["signer_infos"]:
                    for attr in signer["unsigned_attrs"] or []:
                        if attr["type"].dotted == NESTED_SIGNATURE:
                            pending.extend(cms.ContentInfo.load(v.dump()) for v in attr["values"])
        at += (length + 7) // 8 * 8


def _common_name(name: x509.Name) -> str:
    value = name.native.get("common_name", "")
    return str(value[0] if isinstance(value, list) else value)


def _authority(signed: cms.SignedData) -> str:
    """Walk from the signer's certificate up through the certificates included; first known authority wins."""
    certs = [c.chosen for c in signed["certificates"] or [] if c.name == "certificate"]
    info = signed["signer_infos"][0]
    sid = info["sid"]
    current: Any = None
    if sid.name == "issuer_and_serial_number":
        issuer, serial = sid.chosen["issuer"], sid.chosen["serial_number"].native
        current = next((c for c in certs if c.issuer == issuer and c.serial_number == serial), None)
        chain = [_common_name(issuer)]
    else:
        chain = []
    seen = 0
    while current is not None and seen < len(certs):
        seen += 1
        chain.append(_common_name(current.issuer))
        if current.issuer == current.subject:
            break
        current = next((c for c in certs if c.subject == current.issuer), None)
    for name in chain:
        if name in AUTHORITIES:
            return AUTHORITIES[name]
    return chain[-1] if chain else "an unnamed signer"


def _signed_digest(signed: cms.SignedData) -> tuple[str, bytes]:
    """The hash algorithm and image digest in the signature's SpcIndirectDataContent."""
    encap = signed["encap_content_info"]
    if encap["content_type"].dotted != SPC_INDIRECT_DATA:
        raise ValueError("not Authenticode content")
    indirect = encap["content"].parsed
    info = algos.DigestInfo.load(indirect[1].dump())
    return str(info["digest_algorithm"]["algorithm"].native), bytes(info["digest"].native)


def _image_digest(image: Readable, layout: PeLayout, algorithm: str) -> bytes:
    """Authenticode's image hash: every byte but the checksum, the certificate directory entry and the table."""
    try:
        digest = hashlib.new(algorithm)
    except ValueError:
        raise CorruptImage(f"unknown hash algorithm {algorithm!r}", path=image.name, fmt="pe") from None
    skips = sorted([(layout.checksum_at, 4), (layout.certdir_at, 8), (layout.cert_offset, layout.cert_size)])
    at = 0
    for start, length in [*skips, (image.size, 0)]:
        while at < start:
            chunk = image.pread(at, min(1 << 20, start - at))
            if not chunk:
                raise CorruptImage("image ends early", path=image.name, fmt="pe", offset=at)
            digest.update(chunk)
            at += len(chunk)
        at = max(at, start + length)
    return digest.digest()
