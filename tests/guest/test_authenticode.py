"""Authenticode signatures of EFI loaders, against sbverify on the same files.

The signed loaders are Debian's own (shim signed by Microsoft's UEFI CAs, grub signed by Debian), fetched with
``apt-get download``; the unsigned one comes from grub-mkimage, and a test certificate signs it with sbsign.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from diskport.errors import CorruptImage
from diskport.guest.authenticode import MAX_SIGNATURES, pe_layout, read_signature
from tests.support.clients import require_tool, run


class FileReadable:
    """A file read at random, counting what is read."""

    def __init__(self, path: Path) -> None:
        self.name, self.size, self.read = str(path), path.stat().st_size, 0
        self._f = path.open("rb")

    def pread(self, offset: int, length: int) -> bytes:
        self._f.seek(offset)
        data = self._f.read(length)
        self.read += len(data)
        return data


@pytest.fixture(scope="module")
def loaders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    for tool in ("apt-get", "dpkg", "grub-mkimage", "sbsign", "sbverify", "openssl"):
        require_tool(tool)
    d = tmp_path_factory.mktemp("loaders")
    got = subprocess.run(["apt-get", "download", "shim-signed", "grub-efi-amd64-signed"], cwd=d,
                         capture_output=True, text=True)
    assert got.returncode == 0, f"apt-get download failed: {got.stderr}"
    for deb in d.glob("*.deb"):
        run("dpkg", "-x", deb, d / "x")
    out = {"shim": d / "x/usr/lib/shim/shimx64.efi.signed",
           "grub": d / "x/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"}
    run("grub-mkimage", "-O", "x86_64-efi", "-o", d / "unsigned.efi", "-p", "/EFI/BOOT", "normal")
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "key.pem", "-out",
        d / "cert.pem", "-subj", "/CN=diskport test signer", "-days", "2")
    run("sbsign", "--key", d / "key.pem", "--cert", d / "cert.pem", "--output", d / "signed.efi",
        d / "unsigned.efi")
    out.update(unsigned=d / "unsigned.efi", signed=d / "signed.efi", cert=d / "cert.pem")
    return out


def sbverify_ok(path: Path, cert: Path) -> bool:
    return run("sbverify", "--cert", cert, path, check=False).returncode == 0


def test_shim_is_signed_by_microsoft_and_intact(loaders: dict[str, Path]) -> None:
    issuers = run("sbverify", "--list", loaders["shim"]).stdout
    assert "Microsoft Corporation UEFI CA 2011" in issuers
    sig = read_signature(FileReadable(loaders["shim"]))
    assert (sig.machine, sig.signed, sig.signer, sig.digest_ok) == ("x86-64", True, "Microsoft UEFI CA 2011", True)
    assert sig.signatures == issuers.count("image signature issuers") == 2


def test_debian_grub_names_debians_ca(loaders: dict[str, Path]) -> None:
    assert "Debian Secure Boot CA" in run("sbverify", "--list", loaders["grub"]).stdout
    sig = read_signature(FileReadable(loaders["grub"]))
    assert (sig.signed, sig.signer, sig.digest_ok) == (True, "Debian Secure Boot CA", True)


def test_unsigned_and_self_signed_agree_with_sbverify(loaders: dict[str, Path]) -> None:
    unsigned = read_signature(FileReadable(loaders["unsigned"]))
    assert (unsigned.signed, unsigned.signer, unsigned.digest_ok) == (False, None, None)
    assert not sbverify_ok(loaders["unsigned"], loaders["cert"])
    signed = read_signature(FileReadable(loaders["signed"]))
    assert sbverify_ok(loaders["signed"], loaders["cert"])
    assert (signed.signed, signed.signer, signed.digest_ok) == (True, "diskport test signer", True)


@pytest.mark.parametrize("where", ["header", "body", "end"])
def test_a_changed_byte_breaks_the_digest_as_sbverify_says(loaders: dict[str, Path], tmp_path: Path,
                                                           where: str) -> None:
    data = bytearray(loaders["signed"].read_bytes())
    layout = pe_layout(FileReadable(loaders["signed"]))
    at = {"header": 0x40, "body": len(data) // 3, "end": layout.cert_offset - 1}[where]
    data[at] ^= 0xFF
    changed = tmp_path / "changed.efi"
    changed.write_bytes(bytes(data))
    assert not sbverify_ok(changed, loaders["cert"])
    sig = read_signature(FileReadable(changed))
    assert (sig.signed, sig.digest_ok) == (True, False)


def test_checksum_field_is_outside_the_digest(loaders: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(loaders["signed"].read_bytes())
    layout = pe_layout(FileReadable(loaders["signed"]))
    data[layout.checksum_at:layout.checksum_at + 4] = b"\x12\x34\x56\x78"
    changed = tmp_path / "checksum.efi"
    changed.write_bytes(bytes(data))
    assert sbverify_ok(changed, loaders["cert"])
    assert read_signature(FileReadable(changed)).digest_ok is True


def _with_table(src: Path, dst: Path, table: bytes, size: int | None = None, offset: int | None = None) -> Path:
    data = bytearray(src.read_bytes())
    layout = pe_layout(FileReadable(src))
    body = data[:layout.cert_offset] if layout.cert_size else data
    at = len(body) if offset is None else offset
    struct.pack_into("<II", body, layout.certdir_at, at, len(table) if size is None else size)
    dst.write_bytes(bytes(body) + table)
    return dst


def test_garbage_tables_are_reported_not_raised(loaders: dict[str, Path], tmp_path: Path) -> None:
    junk = struct.pack("<IHH", 8 + 64, 0x200, 2) + b"\x30\x82\xff\xff" + bytes(60)
    sig = read_signature(FileReadable(_with_table(loaders["unsigned"], tmp_path / "junk.efi", junk)))
    assert sig.signed and sig.signer is None and sig.problem and "unreadable" in sig.problem
    bad_len = struct.pack("<IHH", 4096, 0x200, 2) + bytes(56)
    sig = read_signature(FileReadable(_with_table(loaders["unsigned"], tmp_path / "len.efi", bad_len)))
    assert sig.signer is None and sig.problem


def test_table_outside_the_image_is_corrupt(loaders: dict[str, Path], tmp_path: Path) -> None:
    path = _with_table(loaders["unsigned"], tmp_path / "out.efi", b"", size=1 << 30)
    with pytest.raises(CorruptImage, match="outside the image"):
        read_signature(FileReadable(path))
    path = _with_table(loaders["unsigned"], tmp_path / "low.efi", bytes(16), offset=4)
    with pytest.raises(CorruptImage, match="outside the image"):
        read_signature(FileReadable(path))


def test_not_a_pe_image(tmp_path: Path) -> None:
    for name, data in {"empty": b"", "mz-only": b"MZ" + bytes(62), "no-pe": b"MZ" + bytes(58) + b"\x40\0\0\0" +
                       b"XX\0\0" + bytes(40)}.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CorruptImage):
            read_signature(FileReadable(path))


def test_nested_signatures_are_bounded(loaders: dict[str, Path], tmp_path: Path) -> None:
    """Many WIN_CERTIFICATE records: at most MAX_SIGNATURES are parsed, the first chosen."""
    layout = pe_layout(FileReadable(loaders["signed"]))
    one = loaders["signed"].read_bytes()[layout.cert_offset:layout.cert_offset + layout.cert_size]
    path = _with_table(loaders["unsigned"], tmp_path / "many.efi", one * (MAX_SIGNATURES * 4))
    sig = read_signature(FileReadable(path))
    assert (sig.signatures, sig.signer, sig.digest_ok) == (MAX_SIGNATURES, "diskport test signer", True)
