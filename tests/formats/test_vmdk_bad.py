"""VMDK input diskport refuses: deltas, parents, outside references, malformed descriptors and sparse
extents, grain tables that loop or share, bad compressed grains, and a seeded fuzz of the structures whose
work is bounded by counting reads."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from diskport import CorruptImage, UnsafeImage, UnsupportedImage, convert
from diskport.errors import DiskportError, SourceError
from diskport.formats import open_image
from diskport.formats.vmdk import GD_AT_END
from diskport.sources import open_source
from tests.support import MiB
from tests.support.clients import qemu_img
from tests.support.images import (
    CountingSource,
    ReadCount,
    counting_opens,
    make_image,
    mutate,
)
from tests.support.vmdk import (
    HEADER,
    descriptor_text,
    header_of,
    patch,
    qemu_vmdk,
    read_all,
    with_footer,
    write_descriptor,
)


def test_stream_optimized_incomplete_footer_refused(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "streamOptimized", size=8 * MiB)
    with_footer(image)
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size - 512)  # the end-of-stream marker is lost
    with pytest.raises(CorruptImage, match="footer"):
        open_image(image)


# -- refusals ---------------------------------------------------------------------------------------------
def test_delta_disk_made_by_qemu_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, "8M")
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    with pytest.raises(UnsafeImage, match=r"parent disk 'base\.vmdk'"):
        convert(child, tmp_path / "x.raw")
    assert not (tmp_path / "x.raw").exists()


@pytest.mark.parametrize(("extra", "needle"), [
    ('parentCID=0badcafe\nparentFileNameHint="parent-disk.vmdk"', r"'parent-disk\.vmdk'"),
    ('parentFileNameHint="/vmfs/volumes/ds/base.vmdk"', r"'/vmfs/volumes/ds/base\.vmdk'"),
    ("parentCID=0badcafe", r"CID 0badcafe \(no parentFileNameHint\)"),
])
def test_descriptor_parent_refused(tmp_path: Path, extra: str, needle: str) -> None:
    qemu_vmdk(tmp_path, "monolithicFlat", size=4 * MiB, name="d.vmdk")
    text = (tmp_path / "d.vmdk").read_text().replace("parentCID=ffffffff\n", "")
    (tmp_path / "d.vmdk").write_text(text.replace("createType", extra + "\ncreateType"))
    with pytest.raises(UnsafeImage, match=needle):
        open_image(tmp_path / "d.vmdk")


@pytest.mark.parametrize(("name", "error", "needle"), [
    ("../outside-flat.vmdk", UnsafeImage, "outside its own folder"),
    ("/etc/passwd", UnsafeImage, "outside its own folder"),
    ("http://example.com/x-flat.vmdk", UnsafeImage, "outside its own folder"),
    ("sub/../../outside-flat.vmdk", UnsafeImage, "outside its own folder"),
    ("link-flat.vmdk", UnsafeImage, "leaves the image's folder"),
    ("missing-flat.vmdk", SourceError, "missing"),
])
def test_extent_references_outside_folder_refused(tmp_path: Path, name: str, error: type[DiskportError],
                                                   needle: str) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    outside = tmp_path / "outside-flat.vmdk"
    outside.write_bytes(b"secret" * 1000)
    (folder / "link-flat.vmdk").symlink_to(outside)
    desc = write_descriptor(folder / "disk.vmdk", [f'RW 8 FLAT "{name}" 0'])
    with pytest.raises(error, match=needle):
        convert(desc, tmp_path / "x.raw")


def test_cowd_and_esx_extents_refused(tmp_path: Path) -> None:
    cowd = tmp_path / "cowd.vmdk"
    cowd.write_bytes(b"COWD" + struct.pack("<I", 1) + bytes(2040))
    with pytest.raises(UnsupportedImage, match="COWD"):
        open_image(cowd)
    (tmp_path / "x-flat.vmdk").write_bytes(bytes(4096))
    for line, needle in (('RW 8 VMFSSPARSE "x-flat.vmdk"', "VMFSSPARSE"), ('RW 8 VMFSRDM "x-flat.vmdk"', "VMFSRDM"),
                         ('NOACCESS 8 FLAT "x-flat.vmdk" 0', "NOACCESS"), ('RW 8 WEIRD "x-flat.vmdk"', "WEIRD")):
        desc = write_descriptor(tmp_path / "esx.vmdk", [line])
        with pytest.raises(UnsupportedImage, match=needle):
            open_image(desc)
    desc = write_descriptor(tmp_path / "dev.vmdk", ['RW 8 FLAT "x-flat.vmdk" 0'], create_type="fullDevice")
    with pytest.raises(UnsupportedImage, match="fullDevice"):
        open_image(desc)
    cowd_extent = write_descriptor(tmp_path / "c.vmdk", ['RW 8 SPARSE "cowd.vmdk"'])
    with pytest.raises(UnsupportedImage, match="COWD"):
        open_image(cowd_extent)


def test_malformed_descriptors_refused(tmp_path: Path) -> None:
    (tmp_path / "x-flat.vmdk").write_bytes(bytes(4096))
    cases = [
        (['RW 8 FLAT "x-flat.vmdk" 0'], "createType", "no createType"),
        (["RW eight FLAT x"], "monolithicFlat", "not a valid extent line"),
        (['RW 8 FLAT "x-flat.vmdk" 1'], "monolithicFlat", "truncated"),          # 8 sectors at sector 1
        (['RW 800 FLAT "x-flat.vmdk" 0'], "monolithicFlat", "truncated"),
        (['RW 8 ZERO "x-flat.vmdk"'], "monolithicFlat", "names a file"),
        (["RW 8 FLAT"], "monolithicFlat", "names no file"),
        ([], "monolithicFlat", "no extents"),
        (['RW 8 SPARSE "x-flat.vmdk"'], "monolithicFlat", "not a VMDK sparse extent"),
    ]
    for lines, create_type, needle in cases:
        text = descriptor_text(lines, create_type)
        if create_type == "createType":
            text = text.replace('createType="createType"\n', "")
        (tmp_path / "bad.vmdk").write_text(text)
        with pytest.raises(CorruptImage, match=needle):
            open_image(tmp_path / "bad.vmdk", "vmdk")
    big = tmp_path / "big.vmdk"
    big.write_bytes(descriptor_text(['RW 8 FLAT "x-flat.vmdk" 0']).encode() + b"#" * (1024 * 1024))
    with pytest.raises(CorruptImage, match="at most 1024 KiB"):
        open_image(big, "vmdk")


def test_sparse_extent_capacity_must_match_descriptor(tmp_path: Path) -> None:
    qemu_vmdk(tmp_path, "twoGbMaxExtentSparse", size=4 * MiB, name="b.vmdk")
    desc = write_descriptor(tmp_path / "m.vmdk", ['RW 4096 SPARSE "b-s001.vmdk"'])
    with pytest.raises(CorruptImage, match="capacity of 8192 sectors"):
        open_image(desc)


def test_truncated_sparse_refused(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "monolithicSparse")
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size // 2)
    with pytest.raises(CorruptImage, match="beyond the end of the file"):
        convert(image, tmp_path / "x.raw")
    assert not (tmp_path / "x.raw").exists()
    with open(image, "r+b") as f:
        f.truncate(600)
    with pytest.raises(CorruptImage):
        open_image(image)
    with open(image, "r+b") as f:
        f.truncate(40)
    with pytest.raises(CorruptImage, match="too short"):
        open_image(image, "vmdk")


def test_grain_directory_past_eof_refused(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "monolithicSparse", size=8 * MiB)
    patch(image, 56, struct.pack("<Q", image.stat().st_size // 512 + 10))
    with pytest.raises(CorruptImage, match=r"grain directory at .* beyond the end"):
        open_image(image)
    image = qemu_vmdk(tmp_path, "monolithicSparse", size=8 * MiB, name="gt.vmdk")
    gd_offset = int(header_of(image)[9]) * 512
    patch(image, gd_offset, struct.pack("<I", 0xFFFFFF00))
    with pytest.raises(CorruptImage, match="grain directory entry 0 points to a grain table"):
        open_image(image)


def test_huge_capacity_with_tiny_file_refused_quickly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = qemu_vmdk(tmp_path, "monolithicSparse", size=8 * MiB)
    for capacity, error in ((1 << 40, CorruptImage), ((1 << 64) - 1, CorruptImage)):
        patch(image, 12, struct.pack("<Q", capacity))
        with counting_opens(monkeypatch) as count, pytest.raises(error):
            open_image(image)
        # The header alone condemns it: the probes' reads and the header, not the 4 MiB file nor a table.
        assert count.reads <= 16 and count.bytes <= 128 * 1024, (count.reads, count.bytes)
    patch(image, 12, struct.pack("<Q", 1 << 50))  # needs a grain directory of 2^28 entries
    with pytest.raises(UnsupportedImage, match=r"grain directory of .* entries exceeds"):
        open_image(image)


def test_shared_and_looping_tables_are_refused(tmp_path: Path) -> None:
    """Every GTE pointing at one grain, or every GDE at one GT (a 70 MiB disk from one grain, the amplification
    of issue 10): a sparse extent never shares a grain, so both are corrupt, whatever qemu makes of them."""
    image = qemu_vmdk(tmp_path, "monolithicSparse", size=70 * MiB)
    header = header_of(image)
    gd_offset = int(header[9]) * 512
    pristine = image.read_bytes()
    gd = list(struct.unpack_from("<3I", pristine, gd_offset))
    gt0 = gd[0] * 512
    first_grain = struct.unpack_from("<I", pristine, gt0)[0]
    data = bytearray(pristine)
    struct.pack_into("<512I", data, gt0, *([first_grain] * 512))   # duplicate grain pointers
    image.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="for more than one guest grain"):
        convert(image, tmp_path / "a.raw")
    data = bytearray(pristine)
    struct.pack_into("<3I", data, gd_offset, gd[0], gd[0], gd[0])  # one grain table for the whole disk
    image.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="which another grain table already names"):
        convert(image, tmp_path / "b.raw")
    assert not (tmp_path / "a.raw").exists() and not (tmp_path / "b.raw").exists()


def test_newline_check_and_unknown_versions(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "monolithicSparse", size=8 * MiB)
    patch(image, 73, b"\n \n\n")
    with pytest.raises(CorruptImage, match="text mode"):
        open_image(image)
    patch(image, 73, b"\n \r\n")
    patch(image, 4, struct.pack("<I", 4))
    with pytest.raises(UnsupportedImage, match="version 4"):
        open_image(image, "vmdk")
    patch(image, 4, struct.pack("<I", 1))
    patch(image, 77, struct.pack("<H", 7))
    with pytest.raises(UnsupportedImage, match="compression algorithm 7"):
        open_image(image)


def test_bad_compressed_grains_refused(tmp_path: Path) -> None:
    image = qemu_vmdk(tmp_path, "streamOptimized", size=8 * MiB)
    gd_offset = int(header_of(image)[9]) * 512
    data = image.read_bytes()
    gt = struct.unpack_from("<I", data, gd_offset)[0] * 512
    marker = struct.unpack_from("<I", data, gt)[0] * 512
    lba, size = struct.unpack_from("<QI", data, marker)
    original = data[marker: marker + 12 + max(size, 512)]
    assert lba == 0 and 0 < size < 2 * 65536
    cases: list[tuple[bytes, str]] = [
        (struct.pack("<QI", 0, 1 << 20), "exceeds twice the grain size"),
        (struct.pack("<QI", 0, 0), "metadata marker"),
        (struct.pack("<QI", 0, size) + b"garbage!", "does not inflate"),
        # A valid deflate stream of two grains' worth of bytes: more than one grain.
        (struct.pack("<QI", 0, len(z := zlib.compress(bytes(2 * 65536)))) + z, "more than 65536 bytes"),
        (struct.pack("<QI", 0, len(z := zlib.compress(bytes(4096)))) + z, "inflates to 4096 bytes"),
        (struct.pack("<QI", 0, 20) + zlib.compress(bytes(65536))[:20], "truncated"),
    ]
    for replacement, needle in cases:
        patch(image, marker, replacement)
        with open_image(image) as opened, pytest.raises(CorruptImage, match=needle):
            read_all(opened)
        patch(image, marker, original)
    with open_image(image) as opened:
        assert read_all(opened) > 0


# -- fuzz -------------------------------------------------------------------------------------------------
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0x1000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 1 << 32, (1 << 63) - 1, (1 << 64) - 1]


def sparse_regions(data: bytes) -> list[tuple[int, int]]:
    """Header, embedded descriptor, grain directory, grain tables and the first grain marker."""
    (_, _, _, capacity, grain, desc_off, desc_size, gtes, _, gd, _, _, _, _) = HEADER.unpack_from(data, 0)
    regions = [(0, 80), (desc_off * 512, (desc_off + desc_size) * 512)]
    if gd != GD_AT_END:
        entries = -(-capacity // (gtes * grain))
        regions.append((gd * 512, gd * 512 + 4 * entries))
        for (gt,) in struct.iter_unpack("<I", data[gd * 512: gd * 512 + 4 * entries]):
            if gt:
                regions.append((gt * 512, gt * 512 + 4 * gtes))
                first = struct.unpack_from("<I", data, gt * 512)[0]
                if first > 1:
                    regions.append((first * 512, first * 512 + 16))
    else:
        regions.append((len(data) - 1536, len(data)))
    return regions


def fuzz_one(path: Path, inputs: int) -> bool:
    """Open and read all of ``path``; True if that worked, False if it raised a DiskportError. The bytes read
    from the files (``inputs`` bytes in all, with the extents a descriptor names) stay within two passes over
    them, in at most a read per sector: whatever the mutation, no grain table or grain is read again and
    again, and no read runs far past what it needs."""
    count = ReadCount()
    requested = 0
    ok = True
    try:
        with CountingSource(open_source(path), count) as source, open_image(source, "vmdk") as image:
            requested += read_all(image)
            rng = random.Random(image.virtual_size)
            for _ in range(2):
                if image.virtual_size:
                    offset = rng.randrange(image.virtual_size)
                    requested += len(image.read(offset, min(100_000, image.virtual_size - offset)))
    except DiskportError:
        ok = False
    # One pass over the files and a second for the two reads of 100,000 bytes; a read per sector at most.
    assert count.bytes <= 2 * inputs + 200_000, (count.bytes, requested, inputs)
    assert count.reads <= inputs // 512 + 16, (count.reads, requested, inputs)
    return ok


def test_fuzz_mutated_images(tmp_path: Path) -> None:
    """Seeded random mutations of headers, grain directories/tables, markers, footers and descriptors: each
    open and full read succeeds or raises a DiskportError, nothing else, and in bounded reads."""
    small = [(0, 300 * 1024, "random"), (1 * MiB + 4096, 200 * 1024, "text"), (2 * MiB - 512, 512, "0x77")]
    bases: list[tuple[Path, int]] = []
    for subformat, extra, iterations in (("monolithicSparse", "", 1100), ("streamOptimized", "", 1100),
                                         ("monolithicSparse", "zeroed_grain=on", 300)):
        image = make_image(tmp_path, "vmdk", 2 * MiB, f"subformat={subformat}" + (f",{extra}" if extra else ""),
                           name=f"base-{subformat}-{len(bases)}.vmdk", layout=small)
        bases.append((image, iterations))
    footer = tmp_path / "base-footer.vmdk"
    shutil.copy(bases[1][0], footer)
    with_footer(footer)
    bases.append((footer, 400))
    rng = random.Random(20240611)
    outcomes: list[bool] = []
    for base, iterations in bases:
        original = base.read_bytes()
        regions = sparse_regions(original)
        target = tmp_path / "fuzz.vmdk"
        for _ in range(iterations):
            target.write_bytes(mutate(bytearray(original), regions, rng, interesting=INTERESTING, truncate=True))
            outcomes.append(fuzz_one(target, target.stat().st_size))
    # Descriptor text mutations over a two-extent descriptor (sparse extent + flat extent).
    extents = [make_image(tmp_path, "vmdk", 2 * MiB, "subformat=twoGbMaxExtentSparse", name="ds.vmdk", layout=small),
               make_image(tmp_path, "vmdk", 1 * MiB, "subformat=monolithicFlat", name="df.vmdk", seed=2)]
    named = sum(p.stat().st_size for p in tmp_path.glob("d[sf]-*.vmdk"))
    text = descriptor_text(['RW 4096 SPARSE "ds-s001.vmdk"', 'RW 1024 FLAT "df-flat.vmdk" 1024', "RW 64 ZERO"],
                           create_type="twoGbMaxExtentSparse").encode()
    assert extents and named > 1 * MiB
    for _ in range(600):
        target = tmp_path / "fuzz-desc.vmdk"
        target.write_bytes(mutate(bytearray(text), [(0, len(text))], rng, interesting=INTERESTING, truncate=True))
        outcomes.append(fuzz_one(target, target.stat().st_size + named))
    assert len(outcomes) == 3500
    # The mutations must both break images and leave some readable, or the fuzz tests nothing.
    assert 0.1 < sum(outcomes) / len(outcomes) < 0.9


# -- descriptors diskport refuses (issue 10) ----------------------------------------------------------------
def test_sesparse_descriptors_are_refused(tmp_path: Path) -> None:
    extent = tmp_path / "disk-sesparse.vmdk"
    extent.write_bytes(bytes(4096))
    for create_type, kind in (("seSparse", "SESPARSE"), ("vmfsSparse", "VMFSSPARSE")):
        desc = tmp_path / f"{create_type}.vmdk"
        desc.write_text(f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                        f'createType="{create_type}"\nRW 8 {kind} "disk-sesparse.vmdk"\n')
        with pytest.raises(UnsupportedImage, match=create_type):
            open_image(desc)
        text = desc.read_text().replace(f'createType="{create_type}"', 'createType="monolithicFlat"')
        desc.write_text(text)
        with pytest.raises(UnsupportedImage, match=f"type {kind}, which only ESX hosts read"):
            open_image(desc)


def test_an_extent_that_is_a_named_pipe_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "disk-flat.vmdk")
    desc = tmp_path / "disk.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\nRW 2048 FLAT "disk-flat.vmdk" 0\n')
    # In a child with a timeout: before the fix open() waited for a writer forever.
    proc = subprocess.run([sys.executable, "-m", "diskport", "convert", "-q", str(desc), str(tmp_path / "o.raw")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "named pipe" in proc.stderr, proc.stderr
    with pytest.raises(UnsafeImage, match="is a named pipe; only regular files"):
        open_image(desc)
