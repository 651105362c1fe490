"""The initramfs lister on archives made by GNU cpio and gzip/xz/zstd/lz4, and on hostile ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from diskport.guest import initramfs as initramfs_mod
from diskport.guest.initramfs import list_initramfs, module_name
from tests.guest.filesystems.images import BytesVolume
from tests.guest.initramfs_images import compress, cpio_list, cpio_newc, initramfs, main_tree

VERSION = "6.5.6-300.fc39.x86_64"
BUS = {"virtio_blk": "drivers/block", "virtio_scsi": "drivers/scsi", "virtio_net": "drivers/net",
       "ahci": "drivers/ata"}


@pytest.mark.parametrize("method", ["gzip", "xz", "zstd", "lz4", "none"])
def test_microcode_then_compressed_main(tmp_path: Path, method: str) -> None:
    data = initramfs(tmp_path, VERSION, {"virtio_blk": "drivers/block", "ext4": "fs/ext4"}, method)
    listing = list_initramfs(BytesVolume(data, name="initramfs.img"))
    assert listing.problem is None and listing.complete
    assert listing.archives == ["cpio", "cpio" if method == "none" else f"cpio+{method}"]
    assert set(listing.modules) == {"virtio_blk", "ext4"}
    assert listing.modules["virtio_blk"] == f"usr/lib/modules/{VERSION}/kernel/drivers/block/virtio_blk.ko.xz"
    main = cpio_newc(tmp_path / "main")
    early = cpio_newc(tmp_path / "early")
    want = [n for n in cpio_list(early) + cpio_list(main) if n != "."]
    assert listing.entries == len(want) + 2    # cpio -t leaves out the "." entries find gives
    assert {module_name(n) for n in want} - {None} == set(listing.modules)


def test_zstd_main_archive_in_two_frames(tmp_path: Path) -> None:
    """The main archive compressed as two zstd frames (split mid-entry): one stream, as the kernel reads it."""
    main = cpio_newc(main_tree(tmp_path / "main", VERSION, {"virtio_blk": "drivers/block", "ahci": "drivers/ata"}))
    half = len(main) // 2 + 3
    data = compress(main[:half], "zstd") + compress(main[half:], "zstd")
    listing = list_initramfs(BytesVolume(data))
    assert listing.problem is None and listing.complete and listing.archives == ["cpio+zstd"]
    assert {"virtio_blk", "ahci"} <= set(listing.modules)


def test_without_virtio_blk_and_early_stop(tmp_path: Path) -> None:
    data = initramfs(tmp_path, VERSION, {"ahci": "drivers/ata"}, "gzip")
    listing = list_initramfs(BytesVolume(data), {"virtio_blk", "ahci"})
    assert listing.complete and "virtio_blk" not in listing.modules and "ahci" in listing.modules
    found = list_initramfs(BytesVolume(data), {"ahci"})
    assert "ahci" in found.modules and not found.complete   # stopped once everything asked for was seen


def test_uncompressed_data_is_skipped_not_read(tmp_path: Path) -> None:
    """In an uncompressed archive, file data is never read: only the headers and names are."""
    data = cpio_newc(main_tree(tmp_path / "t", VERSION, {"virtio_blk": "drivers/block"}))

    class Counting(BytesVolume):
        read = 0

        def pread(self, offset: int, length: int) -> bytes:
            out = super().pread(offset, length)
            Counting.read += min(len(out), 110 + 4096) if length != initramfs_mod.CHUNK else 0
            return out

    listing = list_initramfs(Counting(data))
    assert "virtio_blk" in listing.modules
    assert Counting.read < len(data) // 4


def newc(name: bytes, size: int, namesize: int | None = None, body: bytes = b"") -> bytes:
    fields = [0, 0o100644, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name) + 1 if namesize is None else namesize, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    return head + b"\0" * (-len(head) % 4) + body


def test_huge_namesize_is_refused(tmp_path: Path) -> None:
    data = newc(b"a", 0, namesize=0xFFFFFFFF) + bytes(100)
    for blob in (data, compress(data, "gzip")):
        listing = list_initramfs(BytesVolume(blob, name="bad.img"))
        assert listing.problem is not None and "name of 4294967295 bytes" in listing.problem


def test_huge_filesize_is_refused(tmp_path: Path) -> None:
    data = newc(b"usr/lib/modules/x/virtio_blk.ko", 0xFFFFFFF0, body=b"x" * 100)
    listing = list_initramfs(BytesVolume(data, name="bad.img"))
    assert listing.problem is not None and "more than the archive holds" in listing.problem
    gz = compress(data, "gzip")
    listing = list_initramfs(BytesVolume(gz, name="bad.img"))
    assert listing.problem is not None and "more than the archive holds" in listing.problem
    assert not listing.modules    # the damaged entry is not counted as a module


def test_decompression_bomb_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small zstd stream of zeros after a header claiming 4 GiB: the budget stops it, not the memory."""
    monkeypatch.setattr(initramfs_mod, "MAX_UNPACKED", 64 << 20)
    data = newc(b"big", 0xFFFFFFF0) + bytes(100 << 20)
    blob = compress(data, "zstd")
    listing = list_initramfs(BytesVolume(blob, name="bomb.img"))
    assert listing.problem is not None and "unpacks to more than" in listing.problem


def test_garbage_and_truncation(tmp_path: Path) -> None:
    data = initramfs(tmp_path, VERSION, {"virtio_blk": "drivers/block"}, "xz")
    cut = list_initramfs(BytesVolume(data[: len(data) - 200]))
    assert cut.problem is not None and not cut.complete
    junk = list_initramfs(BytesVolume(b"\x7fELF" + bytes(100)))
    assert junk.problem is not None and "unknown data" in junk.problem
