"""A busybox-static initramfs whose /init says on the serial console that the kernel started, loads the disk
drivers it was given, looks for the root filesystem by its label, says where (or that it is not there) and
powers off.

It is built here rather than with initramfs-tools because what a test proves is which drivers the guest has:
an initramfs that carries exactly the modules named (and their dependencies, read from each module's
``.modinfo`` with ``objcopy``, then laid out by ``busybox depmod`` into a real ``modules.dep`` that ``modprobe``
follows) says so directly. The same modules, ``modules.builtin`` and the kernel config go onto the root
filesystem, which is the evidence inspection reads: the two cannot disagree.

A root on an LVM logical volume is beyond a busybox initramfs (no LVM tools, and Debian's device-mapper has no
``dm-mod.create=``): ``diskport.loop=vda4@OFFSET`` on the command line has /init attach /dev/loop0 at the byte
offset LVM itself reported for the LV's first extent, which is where the root's superblock and label lie.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path

from tests.support.clients import require_tool, run

#: What /init prints; a test reads these on the serial console.
STARTED = "DISKPORT-INIT-STARTED"
ROOT_FOUND = "DISKPORT-ROOT-FOUND"
ROOT_MISSING = "DISKPORT-ROOT-MISSING"
MODPROBE_FAILED = "DISKPORT-MODPROBE-FAILED"
ROOT_LABEL = "dproot"
#: Printed when ``diskport.loop=DEV@OFFSET`` on the kernel command line made /dev/loop0 (see INIT).
LOOPED = "DISKPORT-LOOP"

#: The drivers a disk on each bus needs (the pci transport, the block driver, the SCSI disk for sata).
VIRTIO_DRIVERS = ("virtio_pci", "virtio_blk")
SATA_DRIVERS = ("ahci", "sd_mod")

INIT = """#!/bin/sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo {started} "$(uname -r)"
for m in {modules}; do modprobe "$m" || echo {modprobe_failed} "$m"; done
loop=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in diskport.loop=*) loop="${{arg#diskport.loop=}}" ;; esac
done
undriven=""
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/device" ] && [ "$(cat "$d/device")" = 0x0002 ] && [ ! -e "$d/driver" ] && undriven="$undriven ${{d##*/}}"
done
i=0
while [ $i -lt {tries} ]; do
    if [ -n "$loop" ] && [ -b "/dev/${{loop%@*}}" ]; then
        losetup -o "${{loop#*@}}" /dev/loop0 "/dev/${{loop%@*}}" && echo {looped} "$loop"
        loop=""
    fi
    dev=$(findfs LABEL={label} 2>/dev/null) && break
    [ -n "$undriven" ] && break
    sleep 0.25
    i=$((i + 1))
done
if [ -n "$dev" ]; then
    echo {found} "$dev"
elif [ -n "$undriven" ]; then
    echo {missing} "virtio block device without a driver:$undriven"
else
    echo {missing} "no filesystem labelled {label}"
    cat /proc/partitions
fi
poweroff -f
"""


def modinfo_depends(ko: Path, work: Path) -> list[str]:
    """The ``depends=`` field of a module's ``.modinfo`` section (module names, ``-`` as ``_``)."""
    section = work / (ko.name + ".modinfo")
    run(require_tool("objcopy"), "-O", "binary", "--only-section=.modinfo", ko, section)
    fields = section.read_bytes().split(b"\0")
    section.unlink()
    for f in fields:
        if f.startswith(b"depends="):
            return [n.replace("-", "_") for n in f[8:].decode().split(",") if n]
    return []


def module_index(modules: Path) -> dict[str, Path]:
    """Module name -> its ``.ko`` under ``modules/kernel`` (names normalised as the kernel does)."""
    return {p.name.removesuffix(".ko").replace("-", "_"): p for p in (modules / "kernel").rglob("*.ko")}


def module_closure(modules: Path, wanted: tuple[str, ...], work: Path) -> list[Path]:
    """The ``.ko`` files of ``wanted`` and everything they depend on."""
    index = module_index(modules)
    seen: dict[str, Path] = {}
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in index:
            raise AssertionError(f"module {name} is not in {modules} (built in, or renamed?)")
        seen[name] = index[name]
        todo.extend(modinfo_depends(index[name], work))
    return sorted(seen.values())


def install_modules(target_root: Path, modules: Path, release: str, files: list[Path]) -> None:
    """Copy ``files`` (and modules.builtin, modules.order) into ``target_root/lib/modules/release`` at their
    paths, then ``busybox depmod`` writes modules.dep for them."""
    dest = target_root / "lib" / "modules" / release
    for ko in files:
        rel = ko.relative_to(modules)
        (dest / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(ko, dest / rel)
    for name in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
        if (modules / name).exists():
            shutil.copy(modules / name, dest / name)
    run(require_tool("busybox"), "depmod", "-b", target_root, release)
    if not (dest / "modules.dep").exists():
        raise AssertionError(f"busybox depmod wrote no modules.dep in {dest}")


def build_initramfs(out: Path, work: Path, modules: Path, release: str, drivers: tuple[str, ...],
                    root_wait_s: float = 8.0) -> Path:
    """A gzip'ed newc cpio archive: busybox, the modules of ``drivers`` with their dependencies, /init.

    /init waits up to ``root_wait_s`` for the root: virtio_blk adds its disk before modprobe returns, but the
    SCSI scan behind ahci is asynchronous and a loaded host slows the guest. A virtio block device (device id
    2 on the virtio bus) that no driver took after the modprobes ends the wait at once: that disk will never
    appear, and the console says so."""
    stage = work / "initramfs"
    if stage.exists():
        shutil.rmtree(stage)
    for d in ("bin", "dev", "proc", "sys", "lib/modules"):
        (stage / d).mkdir(parents=True)
    shutil.copy(require_tool("busybox"), stage / "bin" / "busybox")
    (stage / "bin" / "sh").symlink_to("busybox")
    install_modules(stage, modules, release, module_closure(modules, drivers, work))
    init = stage / "init"
    init.write_text(INIT.format(started=STARTED, found=ROOT_FOUND, looped=LOOPED, missing=ROOT_MISSING,
                                label=ROOT_LABEL,
                                modprobe_failed=MODPROBE_FAILED, modules=" ".join(drivers),
                                tries=int(root_wait_s / 0.25)))
    init.chmod(init.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    names = sorted(os.path.relpath(os.path.join(d, n), stage)
                   for d, dirs, files in os.walk(stage) for n in dirs + files)
    archive = subprocess.run([require_tool("cpio"), "--quiet", "-o", "-H", "newc", "--owner", "0:0",
                              "--reproducible"], cwd=stage, input=("\n".join(names) + "\n").encode(),
                             capture_output=True, check=True)
    out.write_bytes(gzip.compress(archive.stdout, mtime=0))
    return out
