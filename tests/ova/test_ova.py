"""OVA appliances as VMware and VirtualBox export them: converted disks against qemu-img's conversion of the same
VMDK, the descriptor's facts, several disks, streamed and ranged HTTP, gzip, and hostile packages."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from diskport import convert
from diskport.errors import CorruptImage, SourceError, UnsafeImage, UnsupportedImage, UsageError
from diskport.importer import import_image
from diskport.inspect import inspect_image
from diskport.net import RetryPolicy
from diskport.oci.build import build_image
from diskport.oci.layout import read_layout
from diskport.oci.media import Descriptor
from diskport.ova import OvaChoice
from diskport.sources.http import HttpOptions
from tests.ova.build import Disk, Vm, make_ova, manifest, tar_members, vmware_ovf, write_tar
from tests.support import MiB
from tests.support.clients import require_tool, run, run_cli
from tests.support.images import make_image, pvc_dir, qemu_raw_sha256, sha256_file
from tests.support.oci import image_of, layer_tar
from tests.support.servers import NginxServer, PlainHTTPServer

FAST = HttpOptions(retry=RetryPolicy(attempts=2, backoff=0.05, max_backoff=0.2), stall_timeout=1.0,
                   connect_timeout=2.0)
TAR_FORMATS = {"ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}


@pytest.mark.parametrize("tar_format", list(TAR_FORMATS))
def test_vmware_ova_converts_like_qemu(tmp_path: Path, disks: list[tuple[Disk, str]], tar_format: str) -> None:
    disk, expected = disks[0]
    ova = make_ova(tmp_path / "linux.ova", [Vm("linux", [disk])], fmt=TAR_FORMATS[tar_format])
    out = tmp_path / "out.raw"
    result = convert(ova, out)
    assert sha256_file(out) == expected
    assert result.source_format == "vmdk"
    assert "manifest linux.mf: 2 member(s) verified" in str(result.access), str(result.access)
    assert "read in order" in str(result.access)  # streamOptimized: hashed as it passes, no second read


def test_virtualbox_ovf2_facts_and_efi(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    disk, expected = disks[0]
    disk.bus = "sata"
    vm = Vm("Ubuntu 22.04", [disk], cpus=4, memory_mib=3072, os_id=94, os_type="Ubuntu_64", firmware="efi",
            nics=["E1000"])
    ova = make_ova(tmp_path / "ubuntu.ova", [vm], style="virtualbox", version=2)
    proc = run_cli("inspect", "--json", ova)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)["ova"]
    assert facts["ovf-version"] == "2.0" and facts["vm"] == "Ubuntu 22.04"
    assert facts["cpus"] == 4 and facts["memory"] == 3072 * MiB
    assert facts["os"] == {"cim-id": 94, "os-type": "Ubuntu_64", "description": "Ubuntu_64"}
    assert facts["firmware"] == "efi" and facts["firmware-source"] == "vbox:Machine Firmware"
    assert facts["nics"] == [{"name": "Ethernet adapter on 'NAT'", "type": "E1000", "network": "NAT"}]
    assert [(d["id"], d["capacity"], d["bus"], d["boot"]) for d in facts["disks"]] == [
        ("vmdisk1", disk.capacity, "sata", True)]
    out = tmp_path / "out.raw"
    convert(ova, out)
    assert sha256_file(out) == expected


def test_vmware_windows_bios_sha1_and_cert(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    disk, expected = disks[0]
    vm = Vm("win2019", [disk], os_id=112, os_type="windows2019srv_64Guest", firmware="bios", memory_mib=8192)
    ova = make_ova(tmp_path / "win.ova", [vm], algo="sha1", cert=True)
    facts = inspect_image(ova)["ova"]
    assert facts["os"]["os-type"] == "windows2019srv_64Guest" and facts["os"]["cim-id"] == 112
    assert facts["firmware"] == "bios" and facts["firmware-source"] == "vmw:Config firmware"
    assert facts["memory"] == 8 * 1024 * MiB
    assert facts["controllers"][0]["bus"] == "scsi" and facts["controllers"][0]["type"] == "VirtualSCSI"
    assert facts["manifest"]["algorithms"] == ["sha1"]
    assert "signature is not verified" in facts["manifest"]["certificate"]
    proc = run_cli("inspect", ova)
    assert "windows2019srv_64Guest" in proc.stdout and "certificate:" in proc.stdout, proc.stdout
    for name, packed in (("win.raw", ova), ("win-gz.raw", ova.with_name("win.ova.gz"))):
        if packed.suffix == ".gz":
            packed.write_bytes(gzip.compress(ova.read_bytes(), 1))
        result = convert(packed, tmp_path / name)
        assert sha256_file(tmp_path / name) == expected
        assert "manifest win.mf: 2 member(s) verified" in str(result.access) and "signature is not verified" in \
            str(result.access), str(result.access)


def test_three_disks_boot_disk_by_boot_order_and_all_disks(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    for disk, bus in zip((d for d, _ in disks), ("scsi", "sata", "nvme"), strict=True):
        disk.bus = bus
    vm = Vm("three", [d for d, _ in disks], boot_disk=1, firmware="efi")
    ova = make_ova(tmp_path / "three.ova", [vm])
    facts = inspect_image(ova)["ova"]
    # the boot disk (the second file, named by vmw:BootOrderSection) is listed first
    assert [(d["id"], d["bus"], d["boot"]) for d in facts["disks"]] == [
        ("vmdisk2", "sata", True), ("vmdisk1", "scsi", False), ("vmdisk3", "nvme", False)]
    out = tmp_path / "boot.raw"
    convert(ova, out)
    assert sha256_file(out) == disks[1][1]
    folder = tmp_path / "all"
    proc = run_cli("convert", ova, folder, "--all-disks")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(folder)) == ["three-disk1.raw", "three-disk2.raw", "three-disk3.raw"]
    for k, (_, expected) in enumerate(disks, 1):
        assert sha256_file(folder / f"three-disk{k}.raw") == expected
    assert "4 member(s) verified" in proc.stderr and "boot" in proc.stderr
    proc = run_cli("convert", ova, "--disk", f"2={tmp_path / 'third.qcow2'}", "-O", "qcow2")
    assert proc.returncode == 0, proc.stderr
    assert qemu_raw_sha256(tmp_path / "third.qcow2", tmp_path) == disks[2][1]


@pytest.mark.parametrize("style", ["vmware", "virtualbox"])
def test_compressed_and_chunked_files_in_place_and_through_gzip(tmp_path: Path, disks: list[tuple[Disk, str]],
                                                                style: str) -> None:
    (a, ea), (b, eb), _ = disks
    a.gzip = True
    b.chunk = 1_000_000  # a few chunks: disk.vmdk.000000000, .000000001, ...
    for compress in (False, True):
        name = f"packed-{style}-{compress}.ova" + (".gz" if compress else "")
        ova = make_ova(tmp_path / name, [Vm("vm", [a, b])], style=style, compress=compress)
        with tarfile.open(ova) as tar:
            assert sum(".vmdk.0000000" in n for n in tar.getnames()) >= 2
        folder = tmp_path / f"out-{compress}-{style}"
        proc = run_cli("convert", ova, folder, "--all-disks")
        assert proc.returncode == 0, proc.stderr
        outs = sorted(folder.iterdir())
        assert [sha256_file(p) for p in outs] == [ea, eb]


def test_two_virtual_machines_need_vm(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    (a, _), (b, eb), _ = disks
    ova = make_ova(tmp_path / "vapp.ova", [Vm("web", [a]), Vm("db", [b])])
    with pytest.raises(UnsupportedImage, match=r"2 virtual machines \(web, db\).*--vm"):
        convert(ova, tmp_path / "x.raw")
    assert not (tmp_path / "x.raw").exists()
    convert(ova, tmp_path / "db.raw", ova=OvaChoice(vm="db"))
    assert sha256_file(tmp_path / "db.raw") == eb
    proc = run_cli("convert", ova, tmp_path / "web.raw", "--vm", "nope")
    assert proc.returncode == 1 and "no virtual machine named 'nope'" in proc.stderr


def test_ranged_http_reads_members_in_place(nginx: NginxServer, serve_dir: Path, tmp_path: Path) -> None:
    """A qcow2 and a monolithicSparse VMDK in an OVA over nginx: slices read with ranges, no scratch."""
    qcow2 = make_image(tmp_path, "qcow2", 8 * MiB, name="q.qcow2", seed=5)
    sparse = make_image(tmp_path, "vmdk", 8 * MiB, "subformat=monolithicSparse", name="s.vmdk", seed=6)
    ova = make_ova(serve_dir / "mixed.ova", [Vm("mixed", [Disk(qcow2, 8 * MiB), Disk(sparse, 8 * MiB)])])
    dest = pvc_dir(tmp_path) / "disk.img"
    result = import_image(nginx.url(ova.name), dest, http=FAST)
    assert sha256_file(dest) == qemu_raw_sha256(qcow2, tmp_path)
    assert result.access.kind == "direct", str(result.access)
    assert result.access.reason.startswith("read over HTTP range requests"), str(result.access)
    assert "is read in place and hashed by the reads that convert it" in str(result.access), str(result.access)
    assert "2 member(s) verified, read again for the digest: mixed-disk1.vmdk " in str(result.access)
    assert os.listdir(dest.parent) == ["disk.img"]
    ranges = [e["range"] for e in nginx.access_entries()]
    assert ranges and all(r.startswith("bytes=") for r in ranges)
    folder = tmp_path / "both"
    proc = run_cli("import", nginx.url(ova.name), folder, "--all-disks", "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(folder / "mixed-disk2.raw") == qemu_raw_sha256(sparse, tmp_path)


def test_raw_member_in_place_is_hashed_by_the_read_that_converts_it(tmp_path: Path) -> None:
    """Each byte of a raw member read once: the digest needs no second read; a changed byte still fails it."""
    raw = tmp_path / "plain.raw"
    qemu_img = make_image(tmp_path, "qcow2", 8 * MiB, name="q.qcow2", seed=7)
    run("qemu-img", "convert", "-O", "raw", qemu_img, raw)
    ova = make_ova(tmp_path / "rawova.ova", [Vm("vm", [Disk(raw, 8 * MiB)])])
    result = convert(ova, tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == sha256_file(raw)
    assert "2 member(s) verified" in str(result.access) and "read again" not in str(result.access), str(result.access)
    data = bytearray(ova.read_bytes())
    at = data.index(raw.read_bytes()[: 1 << 16]) + 5 * MiB + 3
    data[at] ^= 0xFF
    ova.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"of member 'rawova-disk1\.vmdk' is [0-9a-f]+, the manifest rawova\.mf says"):
        convert(ova, tmp_path / "bad.raw")
    assert not (tmp_path / "bad.raw").exists()


@pytest.mark.parametrize("style", ["vmware", "virtualbox"])
def test_server_without_ranges_streams_members_in_tar_order(plain_http: PlainHTTPServer, serve_dir: Path,
                                                            tmp_path: Path, disks: list[tuple[Disk, str]],
                                                            style: str) -> None:
    (a, ea), (b, eb), _ = disks
    ova = make_ova(serve_dir / f"{style}.ova", [Vm("vm", [a, b])], style=style)
    dest = pvc_dir(tmp_path) / "disk.img"
    result = import_image(plain_http.url(ova.name), dest, http=FAST)
    assert sha256_file(dest) == ea
    assert result.access.kind == "stream", str(result.access)
    assert result.access.reason.startswith("streamOptimized VMDK is read straight from the member"), str(result.access)
    assert "verified" in str(result.access)
    assert os.listdir(dest.parent) == ["disk.img"], "no scratch"
    folder = tmp_path / "all"
    proc = run_cli("import", plain_http.url(ova.name), folder, "--all-disks", "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    assert [sha256_file(p) for p in sorted(folder.iterdir())] == [ea, eb]
    assert os.listdir(folder) and not any(n.startswith(".") for n in os.listdir(folder))


def test_sparse_member_in_a_stream_is_spooled_and_says_so(tmp_path: Path) -> None:
    sparse = make_image(tmp_path, "vmdk", 8 * MiB, "subformat=monolithicSparse", name="s.vmdk", seed=6)
    ova = make_ova(tmp_path / "sparse.ova.gz", [Vm("vm", [Disk(sparse, 8 * MiB)])], compress=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = convert(ova, tmp_path / "out.raw", scratch_dir=str(scratch))
    assert sha256_file(tmp_path / "out.raw") == qemu_raw_sha256(sparse, tmp_path)
    assert result.access.kind == "spooled", str(result.access)
    assert result.access.reason.startswith("vmdk needs random access"), str(result.access)
    assert result.compression[0] == "gzip"
    assert os.listdir(scratch) == []


def test_truncated_stream_is_refused(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    disk, _ = disks[0]
    ova = make_ova(tmp_path / "t.ova", [Vm("vm", [disk])])
    data = ova.read_bytes()
    cut = tmp_path / "cut.ova.gz"
    cut.write_bytes(gzip.compress(data[: len(data) // 2]))
    with pytest.raises(CorruptImage, match="truncated"):
        convert(cut, tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").exists()


# -- the manifest --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("style", ["vmware", "virtualbox"])
def test_checksum_mismatch_leaves_nothing(tmp_path: Path, disks: list[tuple[Disk, str]], style: str,
                                          compress: bool) -> None:
    (a, _), (b, _), _ = disks
    ova = make_ova(tmp_path / "m.ova", [Vm("vm", [a, b])], style=style)
    members = tar_members(ova)
    # the last byte of the first disk changed: padding after its last grain, which no reader looks at; only the
    # digest can tell
    name, data = members[1] if style == "virtualbox" else members[2]
    assert name.endswith("disk1.vmdk") and data[-1] == 0
    damaged = bytearray(data)
    damaged[-1] ^= 0x01
    at = [n for n, _ in members].index(name)
    members[at] = (name, bytes(damaged))
    bad = write_tar(tmp_path / ("bad.ova" + (".gz" if compress else "")), members, compress=compress)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SourceError, match=r"sha256 of member 'm-disk1.vmdk' is [0-9a-f]{64}, the manifest m.mf says"):
        convert(bad, out / "disk.raw")
    proc = run_cli("convert", bad, out / "all", "--all-disks")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert os.listdir(out) == ["all"] and os.listdir(out / "all") == []


def test_manifest_that_lists_a_file_twice_is_refused(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    disk, _ = disks[0]
    members = tar_members(make_ova(tmp_path / "m.ova", [Vm("vm", [disk])]))
    name, mf = members[1]
    members[1] = (name, mf + mf.splitlines(keepends=True)[-1])
    bad = write_tar(tmp_path / "twice.ova", members)
    with pytest.raises(CorruptImage, match=r"the manifest lists 'm-disk1\.vmdk' twice"):
        convert(bad, tmp_path / "out.raw")


def test_missing_and_extra_manifest_entries_are_reported(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    disk, expected = disks[0]
    members = tar_members(make_ova(tmp_path / "m.ova", [Vm("vm", [disk])]))
    ovf = members[0]
    members[1] = ("m.mf", manifest([ovf, ("ghost.vmdk", b"")]))
    odd = write_tar(tmp_path / "odd.ova", members)
    result = convert(odd, tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == expected
    assert "not listed: ghost.vmdk (listed, not in the package), m-disk1.vmdk" in str(result.access), str(result.access)
    # in a stream the manifest came first and nothing after the disk is read: entries naming no member are
    # known only when the stream was read to its end (manifest last, as VirtualBox writes it)
    streamed = tmp_path / "odd.ova.gz"
    streamed.write_bytes(gzip.compress(odd.read_bytes(), 1))
    result = convert(streamed, tmp_path / "streamed.raw")
    assert "not listed: m-disk1.vmdk" in str(result.access), str(result.access)
    last = write_tar(tmp_path / "last.ova", [members[0], members[2], members[1]], compress=True)
    result = convert(last, tmp_path / "last.raw")
    assert "not listed: m-disk1.vmdk, ghost.vmdk (listed, not in the package)" in str(result.access), str(result.access)


# -- hostile packages ----------------------------------------------------------------------------------------
def _ova_with_ovf(tmp_path: Path, disk: Disk, ovf: str, extra: list[tuple[str, bytes]] | None = None) -> Path:
    return write_tar(tmp_path / "hostile.ova", [("h.ovf", ovf.encode()), ("h-disk1.vmdk", disk.path.read_bytes()),
                                                *(extra or [])])


def _plain_ovf(disk: Disk, href: str = "h-disk1.vmdk", capacity: str | None = None) -> str:
    text = vmware_ovf([Vm("h", [disk])], [(href, disk.path.stat().st_size, disk)])
    if capacity is not None:
        text = text.replace(f'ovf:capacity="{disk.capacity // 2**20}" ovf:capacityAllocationUnits="byte * 2^20"',
                            capacity)
    return text


@pytest.mark.parametrize(("href", "needle"), [
    ("/etc/passwd", "'/etc/passwd', which is not a member"),
    ("http://example.com/disk.vmdk", "'http://example.com/disk.vmdk', which is not a member"),
    ("../outside.vmdk", "'../outside.vmdk', which is not a member"),
])
def test_references_outside_the_package_refused(tmp_path: Path, disks: list[tuple[Disk, str]], href: str,
                                                needle: str) -> None:
    ova = _ova_with_ovf(tmp_path, disks[0][0], _plain_ovf(disks[0][0], href))
    proc = run_cli("convert", ova, tmp_path / "out.raw")
    assert proc.returncode == 1 and needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out.raw").exists()


def test_entity_bomb_and_external_entity_refused(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    plain = _plain_ovf(disks[0][0])
    body = plain.split("\n", 1)[1]
    bomb = ('<?xml version="1.0"?>\n<!DOCTYPE Envelope [<!ENTITY a "aaaaaaaaaa">'
            + "".join(f'<!ENTITY {chr(98 + i)} "&{chr(97 + i)};&{chr(97 + i)};&{chr(97 + i)};&{chr(97 + i)};">'
                      for i in range(20))
            + ']>\n' + body.replace("<Info>A virtual machine</Info>", "<Info>&u;</Info>"))
    external = ('<?xml version="1.0"?>\n<!DOCTYPE Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
                + body.replace("<Info>A virtual machine</Info>", "<Info>&x;</Info>"))
    for text in (bomb, external):
        ova = _ova_with_ovf(tmp_path, disks[0][0], text)
        with pytest.raises(UnsafeImage, match="forbidden XML construct"):
            inspect_image(ova)


def test_exabyte_capacity_refused(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    ovf = _plain_ovf(disks[0][0], capacity='ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^60"')
    with pytest.raises(UnsafeImage, match="capacity of 1152921504606846976 bytes"):
        convert(_ova_with_ovf(tmp_path, disks[0][0], ovf), tmp_path / "out.raw")


@pytest.mark.parametrize("compress", [False, True])
def test_member_path_with_dotdot_and_symlink_member_refused(tmp_path: Path, disks: list[tuple[Disk, str]],
                                                            compress: bool) -> None:
    disk = disks[0][0]
    ovf = _plain_ovf(disk).encode()
    for case in ("dotdot", "symlink"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            info = tarfile.TarInfo("h.ovf")
            info.size = len(ovf)
            tar.addfile(info, io.BytesIO(ovf))
            if case == "dotdot":
                data = disk.path.read_bytes()
                info = tarfile.TarInfo("../h-disk1.vmdk")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info = tarfile.TarInfo("h-disk1.vmdk")
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/passwd"
                tar.addfile(info)
        path = tmp_path / f"{case}.ova"
        path.write_bytes(gzip.compress(buf.getvalue()) if compress else buf.getvalue())
        with pytest.raises(UnsafeImage, match="outside the package" if case == "dotdot" else "is a link"):
            convert(path, tmp_path / "out.raw")
        assert not (tmp_path / "out.raw").exists()


def test_descriptor_not_first_is_read_with_random_access_only(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    disk, expected = disks[0]
    members = tar_members(make_ova(tmp_path / "o.ova", [Vm("vm", [disk])]))
    reordered = write_tar(tmp_path / "late.ova", [members[2], members[0], members[1]])
    convert(reordered, tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == expected
    streamed = write_tar(tmp_path / "late.ova.gz", [members[2], members[0], members[1]], compress=True)
    with pytest.raises(UnsupportedImage, match=r"whose \.ovf descriptor is not the first member"):
        convert(streamed, tmp_path / "streamed.raw")


def test_disk_choice_errors(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    disk, _ = disks[0]
    ova = make_ova(tmp_path / "one.ova", [Vm("vm", [disk])])
    proc = run_cli("convert", ova, "--disk", f"3={tmp_path / 'x.raw'}")
    assert proc.returncode == 2 and "there is no disk 3" in proc.stderr, proc.stderr
    proc = run_cli("convert", disk.path, tmp_path / "d", "--all-disks")
    assert proc.returncode == 2 and "is not an OVA appliance" in proc.stderr, proc.stderr
    with pytest.raises(UsageError, match="--convert qcow2"):
        build_image(str(ova), output=str(tmp_path / "img.oci"))


def test_build_packages_the_boot_disk_converted(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    (a, _), (b, eb), _ = disks
    ova = make_ova(tmp_path / "app.ova", [Vm("app", [a, b], boot_disk=1)])
    out = tmp_path / "app.oci"
    result = build_image(str(ova), output=str(out), convert_to="qcow2", compression="none")
    image = next(iter(result.images.values()))
    assert image.disk_format == "qcow2" and image.source_format == "ova"
    layout = read_layout(out)
    manifest, _, _ = image_of(layout, None)
    tar = layer_tar(layout, Descriptor.from_json(manifest["layers"][0]))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        member = tf.getmember(f"disk/{image.disk_name}")
        data = tf.extractfile(member).read()  # type: ignore[union-attr]
    packaged = tmp_path / "packaged.qcow2"
    packaged.write_bytes(data)
    assert qemu_raw_sha256(packaged, tmp_path) == eb  # the boot disk, the second file


def test_an_ova_inside_an_ova_is_refused(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    disk = disks[0][0]
    inner = make_ova(tmp_path / "inner.ova", [Vm("h", [disk])])
    nested = Disk(inner, disk.capacity)
    outer = _ova_with_ovf(tmp_path, nested, _plain_ovf(nested))
    with pytest.raises(UnsupportedImage, match="an OVA appliance inside an OVA"):
        convert(outer, tmp_path / "out.raw")


def test_ovf_with_its_files_in_a_folder(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    (a, ea), (b, eb), _ = disks
    ova = make_ova(tmp_path / "app.ova", [Vm("app", [a, b], firmware="efi")])
    folder = tmp_path / "unpacked"
    folder.mkdir()
    for name, data in tar_members(ova):
        (folder / name).write_bytes(data)
    facts = inspect_image(folder / "app.ovf")["ova"]
    assert facts["firmware"] == "efi" and [d["file"] for d in facts["disks"]] == ["app-disk1.vmdk", "app-disk2.vmdk"]
    result = convert(folder / "app.ovf", tmp_path / "boot.raw")
    assert sha256_file(tmp_path / "boot.raw") == ea
    assert "manifest app.mf: 2 member(s) verified" in str(result.access), str(result.access)
    proc = run_cli("convert", folder / "app.ovf", "--disk", f"1={tmp_path / 'data.raw'}")
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(tmp_path / "data.raw") == eb
    # a disk file swapped for a link out of the folder is refused; a changed one fails its digest
    outside = tmp_path / "elsewhere.vmdk"
    (folder / "app-disk2.vmdk").rename(outside)
    (folder / "app-disk2.vmdk").symlink_to(outside)
    proc = run_cli("convert", folder / "app.ovf", "--disk", f"1={tmp_path / 'link.raw'}")
    assert proc.returncode == 1 and "a link that leaves the image's folder" in proc.stderr, proc.stderr
    data = bytearray((folder / "app-disk1.vmdk").read_bytes())
    data[-1] ^= 1
    (folder / "app-disk1.vmdk").write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"the manifest app\.mf says"):
        convert(folder / "app.ovf", tmp_path / "tampered.raw")
    assert not (tmp_path / "tampered.raw").exists()


def test_bounded_members_and_metadata(tmp_path: Path, disks: list[tuple[Disk, str]]) -> None:
    disk = disks[0][0]
    ovf = ("h.ovf", _plain_ovf(disk).encode())
    many = write_tar(tmp_path / "many.ova", [ovf, *((f"f{i}", b"") for i in range(10_001))])
    with pytest.raises(UnsafeImage, match="more than 10000 members"):
        convert(many, tmp_path / "out.raw")
    huge_mf = ("h.mf", b"SHA256(h.ovf)= " + b"0" * 64 + b"\n" + b"\n" * (1024 * 1024))
    for compress in (False, True):
        path = write_tar(tmp_path / f"mf-{compress}.ova", [ovf, huge_mf, ("h-disk1.vmdk", disk.path.read_bytes())],
                         compress=compress)
        with pytest.raises(UnsafeImage, match=r"manifest 'h\.mf' is 1048656 bytes, more than the 1048576 limit"):
            convert(path, tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").exists()


def test_guest_inspection_carries_the_ovf_facts(tmp_path: Path) -> None:
    """A GPT disk (sgdisk, an ESP made by mkfs.vfat) in an OVA: inspect --guest reads the guest and the OVF."""
    require_tool("sgdisk")
    require_tool("mkfs.vfat")
    raw = tmp_path / "gpt.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    run("sgdisk", "-n", "1:2048:+32M", "-t", "1:ef00", "-c", "1:EFI system", raw)
    esp = tmp_path / "esp.img"
    with open(esp, "wb") as f:
        f.truncate(32 * MiB)
    run("mkfs.vfat", "-F", "32", "-n", "ESP", esp)
    with open(raw, "r+b") as f:
        f.seek(2048 * 512)
        f.write(esp.read_bytes())
    vmdk = tmp_path / "gpt.vmdk"
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, vmdk)
    ova = make_ova(tmp_path / "gpt.ova", [Vm("gpt", [Disk(vmdk, 64 * MiB)], firmware="efi")])
    proc = run_cli("inspect", "--guest", "--json", ova)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["filename"] == str(ova) and report["format"] == "vmdk"
    assert report["partition-table"]["scheme"] == "gpt"
    assert [p.get("filesystem") for p in report["partitions"]] == ["vfat"], report["partitions"]
    assert report["ova"]["firmware"] == "efi" and report["ova"]["vm"] == "gpt"
    text = run_cli("inspect", "--guest", ova).stdout
    assert "GPT" in text and "appliance:     OVF 1.0, VM gpt" in text, text
