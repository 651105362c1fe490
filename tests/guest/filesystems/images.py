"""Test filesystems built with Debian's tools, the tools' own answers (the oracles), and a bytes volume.

ext images come from ``mkfs.ext2/3/4 -d DIR`` over a tree made here; FAT images from ``mkfs.vfat -C`` then
``mmd``/``mcopy``/``mdel``. The oracles read the same images back: ``debugfs`` (``rdump``, ``ls -p``,
``stat``) for ext, ``mcopy -s`` and ``mdir -/ -b`` for FAT, ``blkid -p -o export`` for both.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

from diskport.guest.filesystems.base import Filesystem
from tests.support.clients import require_tool, run
from tests.support.images import ReadCount

KiB = 1024
MiB = 1024 * KiB
#: mtools and mkfs need a UTF-8 locale to take non-ASCII names.
UTF8 = {**os.environ, "LC_ALL": "C.UTF-8", "MTOOLS_SKIP_CHECK": "1"}


class BytesVolume:
    """A :class:`~diskport.guest.view.Readable` over bytes in memory (for mutated images): ``head`` (mutable,
    not copied) over the start of ``base`` when both are given. It counts what is read (``reads`` calls,
    ``bytes_read`` returned), the machine-independent measure of a reader's work; past a ``budget`` of bytes a
    read raises :class:`~tests.support.images.ReadBudgetExceeded`, so a reader that loops fails at once."""

    def __init__(self, head: bytes | bytearray, base: bytes = b"", name: str = "mem",
                 budget: int | None = None) -> None:
        self.head = head
        self.base = base
        self.size = max(len(head), len(base))
        self.name = name
        self.count = ReadCount(budget)

    @property
    def reads(self) -> int:
        return self.count.reads

    @property
    def bytes_read(self) -> int:
        return self.count.bytes

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"read {offset}+{length}")
        end = min(offset + length, self.size)
        self.count.add(max(0, end - offset))
        if end <= len(self.head):
            return bytes(self.head[offset:end])
        if offset >= len(self.head):
            return self.base[offset:end]
        return bytes(self.head[offset:]) + self.base[len(self.head):end]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tree(root: Path, *, many: int = 3000, big: int = 1 * MiB, seed: int = 7) -> Path:
    """A guest-like tree: os-release through the usual symlink, a file needing double-indirect blocks at
    1 KiB blocks, a sparse file reaching into triple-indirect ones, a directory of ``many`` entries (an
    htree), fast and slow symlinks, small files (inline candidates), an empty file, a deep tree and
    non-ASCII names."""
    rng = random.Random(seed)
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n'
                                             'VERSION_ID="12"\n')
    os.symlink("../usr/lib/os-release", root / "etc/os-release")
    (root / "etc/fstab").write_text("UUID=1234 / ext4 defaults 0 1\n/dev/sda2 none swap sw 0 0\n")
    (root / "etc/hostname").write_text("guest\n")
    (root / "etc/empty").write_bytes(b"")
    os.symlink("/usr/lib/" + "x" * 80 + "/target", root / "etc/slow-link")   # longer than 60 bytes: slow
    os.symlink("hostname", root / "etc/fast-link")
    (root / "boot").mkdir()
    (root / "boot/vmlinuz-6.1.0-18-amd64").write_bytes(rng.randbytes(big))
    with open(root / "boot/sparse.img", "wb") as f:   # past 64.3 MiB: triple-indirect at 1 KiB blocks
        f.truncate(72 * MiB)
        f.seek(5 * MiB)
        f.write(b"middle" * 100)
        f.seek(72 * MiB - 5)
        f.write(b"tail!")
    many_dir = root / "usr/share/many"
    many_dir.mkdir(parents=True)
    for i in range(many):
        (many_dir / f"entry-{i:05d}-{'n' * (i % 40)}").write_text(f"{i}\n")
    deep = root
    for level in range(12):
        deep = deep / f"level{level}"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("the bottom\n")
    (root / "unicode").mkdir()
    (root / "unicode/Ünïcödé — ファイル.txt").write_text("unicode\n")
    (root / "smalldir").mkdir()
    for i in range(3):
        (root / f"smalldir/s{i}").write_text("tiny " * i)
    return root


def mkfs_ext(path: Path, tree: Path, tool: str = "mkfs.ext4", size: str = "96M", options: tuple[str, ...] = (),
             label: str = "guestroot") -> Path:
    """``tool -d tree``, then ``e2fsck -fyD``: mke2fs writes linear directories, e2fsck -D indexes (htree) the
    ones that span several blocks, as a kernel-written volume has them."""
    run(require_tool(tool), "-q", "-F", "-L", label, *options, "-d", tree, path, size, env=UTF8)
    fsck = run(require_tool("e2fsck"), "-fyD", path, check=False)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
    return path


def blkid(path: Path) -> dict[str, str]:
    out = run(require_tool("blkid"), "-p", "-o", "export", path, check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def debugfs(image: Path, request: str) -> str:
    return run(require_tool("debugfs"), "-R", request, image, env=UTF8).stdout


def debugfs_ls(image: Path, path: str) -> dict[str, tuple[int, int]]:
    """``name -> (inode, mode)`` of a directory as ``debugfs ls -p`` lists it (without . and ..)."""
    out = {}
    for line in debugfs(image, f'ls -p "{path}"').splitlines():
        if not line.startswith("/"):
            continue
        fields = line.split("/")
        # /ino/mode/uid/gid/name/size/ : names may hold no '/', so the split is exact
        name = "/".join(fields[5:-2])
        if name in (".", "..") or int(fields[1]) == 0:   # inode 0: empty records (htree nodes, csum tails)
            continue
        out[name] = (int(fields[1]), int(fields[2], 8))
    return out


def debugfs_rdump(image: Path, dest: Path) -> Path:
    """Every file of the image as debugfs writes it out (``rdump / dest``): the oracle's bytes."""
    dest.mkdir()
    subprocess.run([require_tool("debugfs"), "-R", f'rdump / "{dest}"', str(image)], check=True,
                   capture_output=True, env=UTF8)
    return dest


def tree_of(root: Path) -> dict[str, tuple[str, str]]:
    """``path -> (kind, sha256 or link target)`` of a host tree (lost+found left out)."""
    out: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = "/" + str(full.relative_to(root))
            if rel.startswith("/lost+found"):
                continue
            if full.is_symlink():
                out[rel] = ("symlink", os.readlink(full))
            elif full.is_dir():
                out[rel] = ("dir", "")
            else:
                out[rel] = ("file", sha256(full.read_bytes()))
    return out


def mkfs_fat(path: Path, bits: int, size_kib: int, label: str = "ESP", sectors_per_cluster: int | None = None) -> Path:
    args = [require_tool("mkfs.vfat"), "-C", "-F", str(bits), "-n", label]
    if sectors_per_cluster:
        args += ["-s", str(sectors_per_cluster)]
    run(*args, path, str(size_kib))
    return path


def mtools(tool: str, image: Path, *args: str) -> str:
    return run(require_tool(tool), "-i", str(image), *args, env=UTF8).stdout


def fat_tree(image: Path, work: Path, *, seed: int = 3, many_clusters: int = 600 * KiB) -> dict[str, bytes]:
    """Fill a FAT image: long mixed-case and non-ASCII names, a deep tree, a file over many clusters and a
    fragmented one (written into the holes left by deleting others). Returns ``path -> bytes`` written."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    work.mkdir(exist_ok=True)

    def put(path: str, data: bytes) -> None:
        src = work / "src.bin"
        src.write_bytes(data)
        mtools("mcopy", image, "-o", str(src), "::" + path)
        files[path] = data

    mtools("mmd", image, "::/EFI", "::/EFI/BOOT", "::/EFI/debian", "::/Mixed Case Folder", "::/ÄÖÜ ünïcödé")
    put("/EFI/BOOT/BOOTX64.EFI", b"MZ" + rng.randbytes(40 * KiB))
    put("/EFI/debian/grub.cfg", b"search.fs_uuid 1234 root\nset prefix=($root)'/boot/grub'\n")
    put("/Mixed Case Folder/A Long File Name With Spaces.TxT", b"long name\n")
    put("/ÄÖÜ ünïcödé/ファイル名.txt", b"unicode\n")
    put("/lower.txt", b"lower 8.3 name\n")
    put("/UPPER.TXT", b"upper 8.3 name\n")
    put("/MiXeD.tXt", b"mixed 8.3 name gets an LFN\n")
    deep = ""
    for level in range(10):
        deep += f"/Level {level} dir"
        mtools("mmd", image, "::" + deep)
    put(deep + "/bottom file.txt", b"bottom\n")
    put("/big.bin", rng.randbytes(many_clusters))
    for i in range(6):
        put(f"/gap{i}.bin", rng.randbytes(3 * KiB + i))
    for i in (1, 3, 4):
        mtools("mdel", image, f"::/gap{i}.bin")
        del files[f"/gap{i}.bin"]
    with open(image, "r+b") as f:   # FAT32: forget FSInfo's next-free hint, so mtools fills the gaps first
        boot = f.read(512)
        if boot[0x52:0x5A] == b"FAT32   ":
            fsinfo = int.from_bytes(boot[0x30:0x32], "little") * int.from_bytes(boot[0x0B:0x0D], "little")
            f.seek(fsinfo + 0x1EC)
            f.write(b"\xff\xff\xff\xff")
    put("/fragmented.bin", rng.randbytes(20 * KiB))
    return files


def mdir_paths(image: Path) -> set[str]:
    """Every path ``mdir -/ -b`` lists (recursive, bare): mtools' view of the tree."""
    out = set()
    for line in mtools("mdir", image, "-/", "-b", "::/").splitlines():
        line = line.strip()
        if line.startswith("::/"):
            path = line[2:].rstrip("/")
            if path and not path.endswith(("/.", "/..")):
                out.add(path)
    return out


def walk(fs: Filesystem[object], path: str = "/", out: dict[str, tuple[str, str]] | None = None,
         limit: int = 1 << 30) -> dict[str, tuple[str, str]]:
    """``path -> (kind, sha256 or link target)`` of everything under ``path``, through the node operations
    (a path lookup per file would rescan a directory of thousands for each of its entries)."""
    out = {} if out is None else out
    start = fs.lookup(path)
    assert start is not None
    todo: list[tuple[str, object]] = [(path.rstrip("/"), start)]
    seen = {start}      # a damaged tree can link a directory into itself: a walker cuts the cycle
    while todo:
        where, node = todo.pop()
        for name, child in fs.entries(node):
            full = f"{where}/{name}"
            if full == "/lost+found":
                continue
            st = fs.stat_node(child)
            if st.kind == "dir":
                out[full] = ("dir", "")
                if child not in seen:
                    seen.add(child)
                    todo.append((full, child))
            elif st.kind == "symlink":
                out[full] = ("symlink", fs.readlink_node(child))
            else:
                handle = fs.open_node(child)
                data = handle.pread(0, min(limit, handle.size))
                assert len(data) == min(limit, st.size), full
                out[full] = ("file", sha256(data))
    return out
