"""Several disks of one OVA written in one pass over the package (``--all-disks``, ``--disk N=DEST``).

All or nothing: each disk is written beside its destination under a part-file name, the manifest checks run
once every disk has been read (in a stream the manifest may come after the last disk), and only then are the
disks renamed into place; on any failure every staged file is removed. The staged names are
:func:`~diskport.destination.make_part_file`'s (``.DEST.<pid>.<random>.diskport-part``, locked while the job
lives), so what a SIGKILLed job staged is removed by the next job for the same destinations, as part files
are. The disks are taken in the order their files appear in the descriptor's References, which is the tar
order exporters write, so a stream never has to go back.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from diskport.destination import make_part_file, refuse_existing, relock
from diskport.engine import Progress, write_image
from diskport.errors import UsageError, located
from diskport.formats.base import Access
from diskport.ova.package import OvaPackage
from diskport.sources.base import Source


@dataclass
class DiskResult:
    index: int
    disk_id: str
    destination: str
    source_format: str
    virtual_size: int
    data_bytes: int
    zero_bytes: int
    access: Access
    bus: str | None


def default_names(pkg: OvaPackage, vm: str | None, folder: str, output_format: str) -> dict[int, str]:
    """``--all-disks FOLDER``: each disk under its file's name, with the output format's extension."""
    out: dict[int, str] = {}
    for i, disk in enumerate(pkg.disks(vm)):
        if disk.file is None:
            continue  # an empty disk the VM would create: no file to convert
        stem = os.path.basename(disk.file.href)
        stem = re.sub(r"\.(vmdk|qcow2|vhdx?|vdi|img|raw)$", "", stem, flags=re.IGNORECASE)
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".") or f"disk{i}"
        out[i] = os.path.join(folder, f"{stem}.{output_format}")
    return out


def parse_targets(items: tuple[str, ...]) -> dict[int, str]:
    out: dict[int, str] = {}
    for item in items:
        number, sep, path = item.partition("=")
        if not sep or not number.strip().isdigit() or not path:
            raise UsageError(f"--disk takes N=DEST (0=boot.raw, 1=data.raw), not '{item}'")
        if int(number) in out:
            raise UsageError(f"--disk {number} is given twice")
        out[int(number)] = path
    return out


def _is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


Targets = dict[int, str] | Callable[[OvaPackage], dict[int, str]]


def write_disks(source: Source, targets: Targets, *, vm: str | None = None, output_format: str = "raw",
                scratch_dir: str | None = None, force: bool = False, sync: bool = False,
                size_limit: int | None = None, progress: Progress | None = None,
                checks: tuple[Callable[[], None], ...] = (), cache: str = "auto",
                ) -> tuple[OvaPackage, list[DiskResult], float]:
    """Write the disks ``targets`` names (index in the VM's disk list -> destination) from the OVA in ``source``.

    ``targets`` may be a function of the opened package (names from the descriptor). ``checks`` run with the
    manifest's, after every disk is read and before any is renamed into place. ``cache`` is each disk's
    page-cache policy (:mod:`diskport.cache`)."""
    from diskport.formats import open_appliance, open_ova_disk  # formats imports this package

    began = time.monotonic()
    pkg = open_appliance(source, scratch_dir=scratch_dir)
    try:
        if callable(targets):
            targets = targets(pkg)
        for dest in targets.values():
            refuse_existing(dest, force)
        if len(set(map(os.path.abspath, targets.values()))) != len(targets):
            raise UsageError("two disks are given the same destination")
        disks = pkg.disks(vm)
        for index in targets:
            if not 0 <= index < len(disks):
                raise UsageError(f"the appliance has {len(disks)} disk(s), numbered 0 to {len(disks) - 1}; there "
                                 f"is no disk {index}", path=pkg.name)
        files = list(pkg.descriptor.files)
        def position(i: int) -> int:
            ref = disks[i].file
            return files.index(ref.id) if ref is not None else -1

        order = sorted(targets, key=position)
        staged: dict[int, str] = {}
        locks: list[int] = []
        deferred: list[Callable[[], None]] = []
        results: list[DiskResult] = []
        try:
            for index in order:
                dest = targets[index]
                block = _is_block(dest)
                if block and pkg.streamed:
                    raise UsageError("several disks of a streamed OVA are staged as files before they are "
                                     "verified; a block device cannot be", path=dest,
                                     hint="write to files, or read the OVA from a file or a ranged URL")
                target, lock = dest, -1
                if not block:
                    target, lock = make_part_file(dest)
                    staged[index] = target
                    locks.append(lock)
                with open_ova_disk(pkg, index, vm, scratch_dir=scratch_dir or os.path.dirname(
                        os.path.abspath(dest)), size_limit=size_limit) as image:
                    if not block:
                        deferred.extend(image.checks)
                        image.checks = []
                    with located(pkg.name, image.format):
                        stats, _ = write_image(image, target, output_format=output_format, force=True,
                                               sync=sync, progress=progress, cache=cache)
                    if not block:
                        locks[-1] = relock(target, lock)
                    disk = disks[index]
                    bus = next((a.controller.bus for a in pkg.system(vm).attachments
                                if a.disk_id == disk.id and a.controller), None)
                    results.append(DiskResult(index, disk.id, dest, image.format, stats.virtual_size,
                                              stats.data_bytes, stats.zero_bytes, image.access, bus))
            for check in [*deferred, *checks]:
                check()
            for index, path in staged.items():
                os.replace(path, targets[index])
            staged.clear()
        finally:
            for path in staged.values():
                with contextlib.suppress(OSError):
                    os.unlink(path)
            for fd in locks:
                with contextlib.suppress(OSError):
                    os.close(fd)
    finally:
        pkg.close()
    return pkg, sorted(results, key=lambda r: r.index), time.monotonic() - began
