"""XFS test images: ``mkfs.xfs -p PROTOFILE`` over a tree made here, and ``xfs_db -r`` as the oracle.

xfsprogs here takes a protofile (not a directory) to fill a new filesystem: a line per entry, ``name
TYPE-mode uid gid [source or target]``, directories closed by ``$``; names cannot hold spaces. Files are
copied contiguously, so a file with a B-tree data fork needs a mount (``mount -o loop``, which works here as
root) to write it sparsely.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from tests.support.clients import require_tool, run

MiB = 1024 * 1024


def protofile(root: Path) -> str:
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(folder: Path, depth: int) -> None:
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            assert " " not in entry.name, entry
            pad = " " * depth
            st = entry.lstat()
            mode = f"{stat.S_IMODE(st.st_mode):03o}"
            if entry.is_symlink():
                lines.append(f"{pad}{entry.name} l--{mode} 0 0 {os.readlink(entry)}")
            elif entry.is_dir():
                lines.append(f"{pad}{entry.name} d--{mode} 0 0")
                walk(entry, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{entry.name} ---{mode} 0 0 {entry}")

    walk(root, 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def mkfs_xfs(path: Path, tree: Path, options: tuple[str, ...] = (), size: int = 300 * MiB) -> Path:
    """A sparse ``size``-byte file made XFS by ``mkfs.xfs -p`` over ``tree``."""
    proto = path.with_suffix(".proto")
    proto.write_text(protofile(tree))
    with open(path, "wb") as f:
        f.truncate(size)
    run(require_tool("mkfs.xfs"), "-q", *options, "-p", proto, path)
    return path


def xfs_db(image: Path, *commands: str) -> str:
    args: list[str | os.PathLike[str]] = [require_tool("xfs_db"), "-r"]
    for command in commands:
        args += ["-c", command]
    return run(*args, image).stdout


def xfs_ls(image: Path, path: str) -> list[tuple[int, str]]:
    """``xfs_db ls``: (inode, name) in on-disk order, without . and .."""
    out = []
    for line in xfs_db(image, f"ls {path}").splitlines()[1:]:
        m = re.match(r"\s*\d+\s+(\d+)\s+\S+\s+0x[0-9a-f]+\s+\d+\s+(\S+) \(good\)$", line)
        assert m, line
        if m[2] not in (".", ".."):
            out.append((int(m[1]), m[2]))
    return out


def fork_format(image: Path, path: str) -> str:
    """"local", "extents" or "btree": the data fork's format as xfs_db prints it."""
    out = xfs_db(image, f"path {path}", "p core.format")
    m = re.search(r"core.format = \d+ \((\w+)\)", out)
    assert m, out
    return m[1]


def bmap_offsets(image: Path, path: str, written: bool = False) -> list[int]:
    """The file offsets (in blocks) of every extent of ``path`` (only written ones: flag 0), by ``xfs_db bmap``."""
    out = xfs_db(image, f"path {path}", "bmap")
    return [int(m[0]) for m in re.findall(r"data offset (\d+) startblock \d+ \S+ count \d+ flag (\d)", out)
            if not written or m[1] == "0"]


def inode_byte(image: Path, ino: int) -> int:
    """Where inode ``ino`` lies in the image, by ``xfs_db convert``."""
    out = xfs_db(image, f"convert ino {ino} byte")
    m = re.search(r"0x([0-9a-f]+) \(\d+\)", out)
    assert m, out
    return int(m[1], 16)


def inode_number(image: Path, path: str) -> int:
    parent, _, name = path.rstrip("/").rpartition("/")
    return next(ino for ino, n in xfs_ls(image, parent or "/") if n == name)


def fsblock_byte(image: Path, fsblock: int) -> int:
    """Where the block ``fsblock`` (AG-encoded, as ``bmap`` prints it) lies, by ``xfs_db convert``."""
    out = xfs_db(image, f"convert fsblock {fsblock} byte")
    m = re.search(r"0x([0-9a-f]+) \(\d+\)", out)
    assert m, out
    return int(m[1], 16)
