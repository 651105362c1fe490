"""The tar walk that finds the disk in a layer: archives made by Python's tarfile (an independent writer), in
every header style, plus damaged and hostile ones."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from diskport.errors import CorruptImage, UnsafeImage, UnsupportedImage
from diskport.oci.tarscan import MemberStream, RandomTarReader, StreamTarReader, iter_tar, scan_layer
from diskport.sources.base import SliceSource
from diskport.sources.file import FileSource
from diskport.sources.stream import DecompressingStream
from tests.conftest import MiB

GiB = 1024 * MiB


def make_tar(path: Path, members: list[tuple[str, bytes | None]], fmt: int = tarfile.PAX_FORMAT,
             kinds: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = len(data)
            if kinds and name in kinds:
                info.type = kinds[name]
                info.size = 0
                info.linkname = "elsewhere"
                tar.addfile(info)
                continue
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_finds_the_disk_in_place(tmp_path: Path, fmt: int) -> None:
    disk = bytes(range(256)) * 4096 + b"tail"
    long_dir = "x" * 120  # past ustar's 100-byte name: PAX path, GNU long name, or the ustar prefix
    path = make_tar(tmp_path / "layer.tar", [("etc/", None), (f"{long_dir}/readme", b"r" * 700),
                                            ("disk/", None), ("disk/vm.qcow2", disk)], fmt)
    source = FileSource(path)
    scan = scan_layer(RandomTarReader(source), frozenset())
    assert scan.disk is not None and scan.disk_name == "vm.qcow2" and scan.disk.size == len(disk)
    assert SliceSource(source, scan.disk.data_offset, scan.disk.size).pread(0, len(disk)) == disk
    names = [e.name for e in iter_tar(RandomTarReader(FileSource(path)))]
    assert names == ["etc/", f"{long_dir}/readme", "disk/", "disk/vm.qcow2"]


def test_finds_the_disk_in_a_gzip_stream(tmp_path: Path) -> None:
    disk = b"\x42" * (3 * MiB + 5)
    path = make_tar(tmp_path / "layer.tar", [("./disk/", None), ("./disk/a.img", disk)])
    packed = tmp_path / "layer.tar.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    stream = DecompressingStream(FileSource(packed), "gzip")
    reader = StreamTarReader(stream, str(packed))
    scan = scan_layer(reader, frozenset())
    assert scan.disk is not None and scan.disk_name == "a.img"
    member = MemberStream(reader, scan.disk.size, "a.img", "the gzip layer")
    assert member.sequential
    assert member.pread(0, 10) == disk[:10]  # the head is kept for the probe
    got = member.pread(0, len(disk) + 100)
    assert got == disk
    with pytest.raises(CorruptImage, match="only be read in order"):
        member.pread(MemberStream.HEAD, 10)
    member.close()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_sizes_of_8_gib_and_more(tmp_path: Path, fmt: int) -> None:
    """A header for a 9 GiB member (PAX size record, or GNU base-256): only the header is needed to read it."""
    info = tarfile.TarInfo("disk/big.raw")
    info.size = 9 * GiB
    (tmp_path / "h.tar").write_bytes(info.tobuf(fmt, "utf-8", "surrogateescape"))
    entry = next(iter_tar(RandomTarReader(FileSource(tmp_path / "h.tar"))))
    assert (entry.name, entry.size) == ("disk/big.raw", 9 * GiB)


def test_whiteouts_and_refusals(tmp_path: Path) -> None:
    upper = make_tar(tmp_path / "upper.tar", [("disk/.wh.old.img", b"")])
    scan = scan_layer(RandomTarReader(FileSource(upper)), frozenset())
    assert scan.disk is None and scan.whiteouts == {"old.img"} and not scan.opaque
    lower = make_tar(tmp_path / "lower.tar", [("disk/old.img", b"o" * 1000)])
    assert scan_layer(RandomTarReader(FileSource(lower)), scan.whiteouts).disk is None
    opaque = make_tar(tmp_path / "opaque.tar", [("disk/.wh..wh..opq", b"")])
    assert scan_layer(RandomTarReader(FileSource(opaque)), frozenset()).opaque

    two = make_tar(tmp_path / "two.tar", [("disk/a.img", b"a"), ("disk/b.img", b"b")])
    with pytest.raises(UnsupportedImage, match="more than one file under disk/"):
        scan_layer(RandomTarReader(FileSource(two)), frozenset())
    link = make_tar(tmp_path / "link.tar", [("disk/a.img", b"")], kinds={"disk/a.img": tarfile.SYMTYPE})
    with pytest.raises(UnsupportedImage, match="is a link"):
        scan_layer(RandomTarReader(FileSource(link)), frozenset())


def test_damaged_and_hostile_headers(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "ok.tar", [("disk/a.img", b"a" * 600)])
    data = bytearray(path.read_bytes())
    header_at = data.index(b"disk/a.img") // 512 * 512
    data[header_at + 130] ^= 1  # one bit of the size field
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="checksum mismatch"):
        list(iter_tar(RandomTarReader(FileSource(tmp_path / "bad.tar"))))

    info = tarfile.TarInfo("pax")
    info.type = tarfile.XHDTYPE
    info.size = 64 * MiB  # a PAX header that claims 64 MiB: refused before anything is read
    (tmp_path / "huge.tar").write_bytes(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
    with pytest.raises(UnsafeImage, match="metadata entry"):
        list(iter_tar(RandomTarReader(FileSource(tmp_path / "huge.tar"))))

    (tmp_path / "cut.tar").write_bytes(path.read_bytes()[:700])
    with pytest.raises(CorruptImage):
        list(iter_tar(RandomTarReader(FileSource(tmp_path / "cut.tar"))))
