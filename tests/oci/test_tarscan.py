"""The tar walk that finds the disk in a layer: archives made by Python's tarfile (an independent writer), in
every header style, plus damaged and hostile ones."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from diskport.errors import CorruptImage, UnsafeImage, UnsupportedImage
from diskport.oci.tarscan import LayerScan, MemberStream, RandomTarReader, StreamTarReader, iter_tar, scan_layer
from diskport.sources.base import SliceSource
from diskport.sources.file import FileSource
from diskport.sources.stream import DecompressingStream
from tests.support import MiB

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


def _gzip_stream(path: Path) -> StreamTarReader:
    packed = path.with_suffix(".tar.gz")
    packed.write_bytes(gzip.compress(path.read_bytes()))
    return StreamTarReader(DecompressingStream(FileSource(packed), "gzip"), str(packed))


def test_negative_pax_size_is_corrupt(tmp_path: Path) -> None:
    """A PAX ``size=-1`` record on the disk entry (issue 10): a clear error, not ValueError, in both walks."""
    info = tarfile.TarInfo("disk/a.img")
    info.size = 1024
    info.pax_headers = {"size": "-1"}
    raw = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + bytes(1024) + bytes(1024)
    (tmp_path / "neg.tar").write_bytes(raw)
    with pytest.raises(CorruptImage, match="is negative"):
        scan_layer(RandomTarReader(FileSource(tmp_path / "neg.tar")), frozenset())
    with pytest.raises(CorruptImage, match="is negative"):
        scan_layer(_gzip_stream(tmp_path / "neg.tar"), frozenset())


def _stream_member(path: Path) -> MemberStream:
    reader = _gzip_stream(path)
    scan = scan_layer(reader, frozenset())
    assert scan.disk is not None
    return MemberStream(reader, scan.disk.size, f"layer:disk/{scan.disk_name}", "the gzip layer", scan)


def test_compressed_layer_gets_the_checks_of_an_uncompressed_one(tmp_path: Path) -> None:
    """A short disk, a second file under disk/, a link after the disk: refused whatever the compression."""
    info = tarfile.TarInfo("disk/big.raw")
    info.size = 100 * 1000**3  # 100 GB declared, 64 KiB present
    short = tmp_path / "short.tar"
    short.write_bytes(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + b"\x42" * (64 * 1024))
    with pytest.raises(CorruptImage, match="ends inside a member"):
        scan_layer(RandomTarReader(FileSource(short)), frozenset())
    member = _stream_member(short)
    buf = memoryview(bytearray(MiB))
    with pytest.raises(CorruptImage, match=r"layer ends 65536 bytes into the disk, whose tar header says 1000"):
        offset = 0
        while n := member.readinto(offset, buf):
            offset += n

    two = make_tar(tmp_path / "two.tar", [("disk/a.img", b"a" * 3000), ("etc/x", b"x"), ("disk/b.img", b"b")])
    member = _stream_member(two)
    assert member.pread(0, 3000) == b"a" * 3000  # the disk itself reads as before
    with pytest.raises(UnsupportedImage, match=r"more than one file under disk/ \(a.img, b.img\)"):
        member.check_rest()

    link = tmp_path / "link.tar"
    with tarfile.open(link, "w", format=tarfile.PAX_FORMAT) as tar:
        body = tarfile.TarInfo("disk/a.img")
        body.size = 700
        tar.addfile(body, io.BytesIO(b"d" * 700))
        sym = tarfile.TarInfo("disk/b.img")
        sym.type = tarfile.SYMTYPE
        sym.linkname = "/etc/shadow"
        tar.addfile(sym)
    with pytest.raises(UnsupportedImage, match="is a link"):
        scan_layer(RandomTarReader(FileSource(link)), frozenset())
    member = _stream_member(link)
    with pytest.raises(UnsupportedImage, match=r"disk/b\.img is a link"):
        member.check_rest()

    good = make_tar(tmp_path / "good.tar", [("disk/a.img", b"g" * 5000), ("disk/.wh.old", b""), ("etc/y", b"y")])
    member = _stream_member(good)
    member.check_rest()  # reads the disk it was not asked for, then the rest: nothing to refuse
    hidden = make_tar(tmp_path / "hidden.tar", [("disk/a.img", b"g" * 5000), ("disk/old.img", b"o")])
    _stream_member(hidden).check_rest(frozenset({"old.img"}))  # a file the upper layers hide is no second disk


def test_pull_checks_the_rest_of_a_compressed_layer_before_commit(tmp_path: Path) -> None:
    """The pull side wires :meth:`MemberStream.check_rest` into the check run before the destination is put in
    place, and refuses more layers than a runtime stacks. The blob is a local file standing in for the
    registry's (the registry round trip is tested in test_containerdisk; here only the layer walk matters)."""
    import hashlib

    from diskport.errors import RegistryError
    from diskport.oci.media import Descriptor
    from diskport.oci.pull import MAX_LAYERS, _Puller
    from diskport.oci.reference import parse_reference

    two = make_tar(tmp_path / "two.tar", [("disk/a.img", b"a" * 3000), ("disk/b.img", b"b")])
    blob = tmp_path / "two.tar.gz"
    blob.write_bytes(gzip.compress(two.read_bytes()))
    layer = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip",
                       "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest(), blob.stat().st_size)
    puller = _Puller(parse_reference("localhost:5000/vm:1"), None, None, None)  # type: ignore[arg-type]
    found = puller._scan(FileSource(blob), layer, frozenset(), "sha256:0")  # type: ignore[arg-type]
    assert not isinstance(found, LayerScan)
    member, pulled = found
    assert member.pread(0, 3000) == b"a" * 3000 and pulled.verify is not None
    with pytest.raises(UnsupportedImage, match="more than one file under disk/"):
        pulled.verify()
    member.close()

    manifest = {"layers": [layer.to_json()] * (MAX_LAYERS + 1)}
    with pytest.raises(RegistryError, match=f"{MAX_LAYERS + 1} layers, more than the {MAX_LAYERS}"):
        puller.find_disk(manifest, "sha256:0")
