"""btrfs test images built here, and btrfs-progs' own view of them (the oracle).

Flat images come from ``mkfs.btrfs --rootdir DIR`` (btrfs-progs 6.2 here has no mkfs-time compression);
images with subvolumes and compressed extents are written by the kernel through a loop mount
(``mount -o loop,compress-force=ALG``, remounted between algorithms), as a guest writes them. The oracle is
the mounted tree itself (walked before unmounting) and ``btrfs inspect-internal dump-tree``, whose chunk and
leaf listings also tell the hostile tests where to patch.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google_crc32c

from diskport.guest.filesystems import identify, open_filesystem
from diskport.guest.filesystems.base import Filesystem
from diskport.guest.filesystems.btrfs import BtrfsFilesystem
from tests.guest.filesystems.images import sha256
from tests.guest.support import view_of
from tests.support.clients import require_tool, run

MiB = 1024 * 1024


def mkfs_btrfs(path: Path, size: int, tree: Path | None = None, *extra: str, label: str = "fedora") -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    args = ["-q", "-f", "-L", label, *extra] + (["--rootdir", str(tree)] if tree is not None else [])
    run(require_tool("mkfs.btrfs"), *args, path)
    return path


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path, options: str = "") -> Iterator[Path]:
    """The image loop-mounted read-write (as root), unmounted (and so flushed) afterwards."""
    mountpoint.mkdir(exist_ok=True)
    opts = "loop" + ("," + options if options else "")
    run(require_tool("mount"), "-t", "btrfs", "-o", opts, image, mountpoint)
    try:
        yield mountpoint
    finally:
        run(require_tool("umount"), mountpoint)


def remount(mountpoint: Path, options: str) -> None:
    run(require_tool("sync"))
    run(require_tool("mount"), "-o", f"remount,{options}", mountpoint)


def btrfs(*args: str | os.PathLike[str]) -> str:
    return run(require_tool("btrfs"), *args).stdout


def dump_tree(image: Path, *args: str) -> str:
    return btrfs("inspect-internal", "dump-tree", *args, image)


def chunk_map(image: Path) -> list[tuple[int, int, list[int]]]:
    """``(logical, length, [physical of each stripe])`` of every chunk, from ``dump-tree -t chunk``."""
    out = []
    for m in re.finditer(r"CHUNK_ITEM (\d+)\) itemoff \d+ itemsize \d+\n\s+length (\d+).*?num_stripes (\d+)"
                         r"[^\n]*\n((?:\s+stripe \d+ devid \d+ offset \d+\n\s+dev_uuid \S+\n)+)",
                         dump_tree(image, "-t", "chunk"), re.S):
        offsets = [int(x) for x in re.findall(r"offset (\d+)", m[4])]
        out.append((int(m[1]), int(m[2]), offsets))
    return out


def physical(image: Path, logical: int) -> list[int]:
    """Every device offset of a logical address (both copies of a DUP chunk)."""
    for start, length, offsets in chunk_map(image):
        if start <= logical < start + length:
            return [o + logical - start for o in offsets]
    raise AssertionError(f"{logical} in no chunk")


def patch_tree_block(image: Path, logical: int, change: dict[int, bytes], nodesize: int = 16384) -> None:
    """Write ``change`` (block offset -> bytes) into every copy of the tree block and re-seal its crc32c, so only
    the changed fields are hostile."""
    for phys in physical(image, logical):
        with open(image, "r+b") as f:
            f.seek(phys)
            block = bytearray(f.read(nodesize))
            for at, data in change.items():
                block[at:at + len(data)] = data
            block[0:4] = struct.pack("<I", google_crc32c.value(bytes(block[32:])))
            f.seek(phys)
            f.write(block)


def reseal_superblock(image: Path, offset: int = 0x10000) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        sb = bytearray(f.read(4096))
        sb[0:4] = struct.pack("<I", google_crc32c.value(bytes(sb[32:])))
        f.seek(offset)
        f.write(sb)


def fs_tree(fs: Filesystem[Any], path: str = "/", limit: int = 1 << 30) -> dict[str, tuple[str, str]]:
    """The same map as :func:`tests.guest.filesystems.images.tree_of`, read by a diskport filesystem reader."""
    out: dict[str, tuple[str, str]] = {}
    for name in fs.listdir(path):
        full = path.rstrip("/") + "/" + name
        st = fs.stat(full, follow=False)
        assert st is not None, full
        if st.kind == "symlink":
            out[full] = ("symlink", fs.readlink(full) or "")
        elif st.kind == "dir":
            out[full] = ("dir", "")
            out.update(fs_tree(fs, full, limit))
        else:
            data = fs.read(full, limit)
            assert data is not None and len(data) == st.size, full
            out[full] = ("file", sha256(data))
    return out


def open_btrfs(path: Path) -> Iterator[BtrfsFilesystem]:
    with view_of(path) as view:
        info = identify(view)
        assert info is not None and info.type == "btrfs", info
        fs = open_filesystem(view, info)
        assert isinstance(fs, BtrfsFilesystem)
        yield fs
