"""Real NTFS volumes for tests, built without mounting: ``mkntfs`` onto a sparse file, then ``wimlib-imagex``
captures a folder into a WIM and applies it straight onto the unmounted volume image (wimlib writes NTFS through
libntfs-3g; ``ntfscp`` cannot create folders).

Fragmented files: wimlib and ntfs-3g allocate contiguously while the volume has room, so
:func:`write_fragmented` allocates the file piece by piece with ``ntfsfallocate``, a new one-cluster pad file
(``/frag-pad-NNNN``, left on the volume) between pieces, then writes its data with ``ntfscp``.

Oracles for the tests: :func:`ntfsls_names`, :func:`ntfscat`, :func:`data_runs` (``ntfsinfo -v``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

from tests.support.clients import require_tool


def _run(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True)


def build_ntfs_volume(path: Path, tree_dir: Path, size: int, *, cluster_size: int = 4096, sector_size: int = 512,
                      label: str = "diskport", fragmented: Mapping[str, Path] | None = None) -> Path:
    """An NTFS volume of ``size`` bytes at ``path`` holding a copy of ``tree_dir`` (hard links, sparse files and
    unicode names kept), then each file of ``fragmented`` (volume path -> host file; its folder must exist in
    the tree) written in fragments."""
    require_tool("mkntfs")
    require_tool("wimlib-imagex")
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    _run("mkntfs", "-F", "-Q", "-q", "-c", str(cluster_size), "-s", str(sector_size), "-L", label, path)
    wim = path.with_suffix(".wim")
    _run("wimlib-imagex", "capture", tree_dir, wim, "--no-acls")
    _run("wimlib-imagex", "apply", wim, path)
    wim.unlink()
    for target, source in (fragmented or {}).items():
        write_fragmented(path, target, source)
    return path


def free_clusters(volume: Path) -> tuple[int, int]:
    """(cluster size, free clusters) as ``ntfsinfo -m`` reports them."""
    out = _run("ntfsinfo", "-m", volume).stdout.decode()
    cluster = int(re.search(r"Cluster Size:\s*(\d+)", out).group(1))  # type: ignore[union-attr]
    free = int(re.search(r"Free Clusters:\s*(\d+)", out).group(1))  # type: ignore[union-attr]
    return cluster, free


def write_fragmented(volume: Path, target: str, source: Path, pieces: int = 64) -> None:
    """Copy ``source`` to ``target`` on ``volume`` in about ``pieces`` fragments.

    ntfs-3g allocates contiguously while it can (it refused, when tried, to fill holes left by truncated
    fillers, and ``ntfsfallocate`` crashes on a sparse file): it extends a file from the cluster after its last
    one, and gives a new file the start of the largest free range. So the file starts as a new one-cluster file
    (at the start of the largest free range), and before each further piece (``ntfsfallocate``) a new
    one-cluster pad file (``/frag-pad-NNNN``, left on the volume) takes the cluster after it. This needs the
    free space after the file to stay the largest free range: give the volume ample room (a sparse file costs
    nothing). ``ntfscp`` then writes the data into the clusters already allocated (same size: no
    reallocation)."""
    require_tool("ntfscp")
    require_tool("ntfsfallocate")
    cluster, _ = free_clusters(volume)
    size = source.stat().st_size
    piece = max(cluster, -(-size // pieces // cluster) * cluster)
    first = source.with_name(source.name + ".first")
    with open(source, "rb") as f:
        first.write_bytes(f.read(cluster))  # as big as a pad, so that it lands where the pads will
    pad = source.with_name(source.name + ".pad")
    pad.write_bytes(b"\x5a" * cluster)
    try:
        _run("ntfscp", volume, first, target)
        offset = min(cluster, size)
        k = 0
        while offset < size:
            _run("ntfscp", volume, pad, f"/frag-pad-{k:04d}")
            length = min(piece, size - offset)
            _run("ntfsfallocate", "-o", str(offset), "-l", str(length), volume, target)
            offset += length
            k += 1
    finally:
        first.unlink()
        pad.unlink()
    _run("ntfscp", "-f", volume, source, target)


def _inodes(volume: Path, folder: str) -> list[tuple[str, int]]:
    out = _run("ntfsls", "-i", "-p", folder, volume).stdout.decode("utf-8", "surrogateescape")
    result = []
    for line in out.splitlines():
        number, _, name = line.strip().partition(" ")
        result.append((name.strip(), int(number)))
    return result


def data_runs(volume: Path, path: str) -> int:
    """How many data runs ``ntfsinfo -v`` reports for the unnamed $DATA of ``path``."""
    out = _run("ntfsinfo", "-v", "-F", path, volume).stdout.decode("utf-8", "replace")
    counts = [int(n) for n in re.findall(r"Total runs: (\d+)", out)]
    return max(counts, default=0)


def ntfsls_names(volume: Path, folder: str) -> list[str]:
    """The names ``ntfsls`` lists in ``folder`` (no DOS names, no metadata files)."""
    out = _run("ntfsls", "-p", folder, volume).stdout.decode("utf-8", "surrogateescape")
    return [line for line in out.split("\n") if line and line not in (".", "..")]


def ntfsls_long(volume: Path, folder: str) -> dict[str, int]:
    """``ntfsls -l``: name -> size (directories 0)."""
    out = _run("ntfsls", "-l", "-p", folder, volume).stdout.decode("utf-8", "surrogateescape")
    result = {}
    for line in out.split("\n"):
        m = re.match(r"\s*(\d+) \w{3} +\d+ \d\d:\d\d \d{4} (.*)$", line)
        if m and m.group(2) not in (".", ".."):
            result[m.group(2)] = int(m.group(1))
    return result


def ntfscat(volume: Path, path: str) -> bytes:
    return _run("ntfscat", volume, path).stdout
