"""Initramfs images built as dracut and initramfs-tools lay them out, with GNU cpio and the compressors' own tools:
an uncompressed early-microcode newc archive, then the main newc archive compressed (gzip, xz --check=crc32 as
the kernel wants, zstd, lz4 -l: the legacy frame the kernel reads)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.clients import require_tool

COMPRESSORS = {
    "gzip": ["gzip", "-9", "-n", "-c"],
    "xz": ["xz", "--check=crc32", "-c"],
    "zstd": ["zstd", "-q", "-c"],
    "lz4": ["lz4", "-q", "-l", "-c"],
    "none": [],
}


def cpio_newc(tree: Path) -> bytes:
    """``find . | cpio -o -H newc`` run in ``tree`` (the archive's bytes)."""
    names = subprocess.run(["find", "."], cwd=tree, check=True, capture_output=True).stdout
    out = subprocess.run([require_tool("cpio"), "-o", "-H", "newc", "--quiet"], cwd=tree, input=names,
                         check=True, capture_output=True)
    return out.stdout


def compress(data: bytes, method: str) -> bytes:
    if method == "none":
        return data
    argv = COMPRESSORS[method]
    return subprocess.run([require_tool(argv[0]), *argv[1:]], input=data, check=True, capture_output=True).stdout


def main_tree(root: Path, version: str, modules: dict[str, str], filler: int = 200_000) -> Path:
    """A dracut-like main archive tree: ``usr/lib/modules/VERSION/kernel/<folder>/<name>.ko.xz`` per module."""
    for rel in ("usr/bin", "etc", "usr/lib/dracut"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    (root / "init").symlink_to("usr/lib/systemd/systemd")
    (root / "etc/initrd-release").write_text("ID=fedora\n")
    (root / "usr/bin/bash").write_bytes(os.urandom(filler))   # something large to skip over
    for name, folder in modules.items():
        where = root / "usr/lib/modules" / version / "kernel" / folder
        where.mkdir(parents=True, exist_ok=True)
        (where / f"{name}.ko.xz").write_bytes(os.urandom(5000))
    return root


def initramfs(work: Path, version: str, modules: dict[str, str], method: str = "zstd",
              microcode: bool = True, filler: int = 200_000) -> bytes:
    """The bytes of an initramfs: an early-microcode archive (when asked), then the compressed main archive."""
    early = b""
    if microcode:
        ucode = work / "early"
        (ucode / "kernel/x86/microcode").mkdir(parents=True)
        (ucode / "kernel/x86/microcode/GenuineIntel.bin").write_bytes(os.urandom(30_000))
        early = cpio_newc(ucode)
    main = cpio_newc(main_tree(work / "main", version, modules, filler))
    return early + compress(main, method)


def cpio_list(data: bytes) -> list[str]:
    """GNU cpio's own listing of an uncompressed archive (the oracle for names)."""
    out = subprocess.run([require_tool("cpio"), "-it", "--quiet"], input=data, check=True, capture_output=True)
    return out.stdout.decode().splitlines()
