"""Boot a disk under qemu (TCG: the KVM device here is a nested one that fails real guests) and read what the
firmware, GRUB, the kernel and /init say on the serial console.

SeaBIOS writes its messages to the VGA screen and its debug port (0x402); the debug port goes to a second log
so "No bootable device" and "Booting from Hard Disk" are seen without a screen. OVMF mirrors its console to the
serial port. qemu runs until /init powers the guest off, a firmware failure text appears, or the timeout; it is
then killed (by its own pid) and reaped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tests.guest.boot.disks import GRUB_MARK
from tests.guest.boot.initramfs import LOOPED, MODPROBE_FAILED, ROOT_FOUND, ROOT_MISSING, STARTED
from tests.support.clients import require_tool

Firmware = Literal["bios", "efi", "efi-secure"]
Bus = Literal["virtio", "sata"]
OVMF = Path("/usr/share/OVMF")
FIRMWARE_FILES = {"efi": ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
                  "efi-secure": ("OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd")}

#: Failure texts, each ending the run once seen: what -> pattern on the serial console or SeaBIOS's log.
FAILURES = {
    "no-bootable-device": re.compile(r"No bootable device|Boot failed: not a bootable disk"),
    "access-denied": re.compile(r"Access Denied"),
    "uefi-shell": re.compile(r"UEFI Interactive Shell|Shell> "),
    "panic": re.compile(r"Kernel panic - not syncing[^\n]*"),
}
STAGES = (("grub", GRUB_MARK), ("kernel", STARTED))
SERIAL_LIMIT = 4 * 1024 * 1024
FIRMWARE_LOG_LIMIT = 256 * 1024


@dataclass
class BootResult:
    firmware: str
    bus: str
    #: "root-found", "root-missing", one of FAILURES' keys, or "timeout".
    outcome: str
    #: The root's device when found; why it was not, when missing.
    detail: str | None = None
    seconds: float = 0.0
    serial: str = ""
    firmware_log: str = ""
    #: stage -> seconds after qemu started when it was first seen: "grub" (its echo), "kernel" (/init ran)
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def root_device(self) -> str | None:
        return self.detail if self.outcome == "root-found" else None

    @property
    def root_disk(self) -> str | None:
        """The disk device under the root: the root device itself, or the device /init attached /dev/loop0 over
        (its ``diskport.loop=DEV@OFFSET``) when the root was found on that loop."""
        if self.root_device == "/dev/loop0" and (m := re.search(rf"{LOOPED} (\S+)@\d+", self.serial)):
            return f"/dev/{m[1]}"
        return self.root_device

    @property
    def failed_modules(self) -> list[str]:
        """Modules /init could not load (a bad modules.dep, a signature refused under lockdown...)."""
        return re.findall(rf"{MODPROBE_FAILED} (\S+)", self.serial)

    def __str__(self) -> str:
        tail = "\n".join(self.serial.splitlines()[-25:])
        return (f"{self.firmware}/{self.bus}: {self.outcome} ({self.detail}) after {self.seconds:.1f}s, "
                f"stages {self.stages}\n--- serial (tail) ---\n{tail}\n--- firmware log (tail) ---\n"
                + "\n".join(self.firmware_log.splitlines()[-8:]))


class _Log:
    """A log qemu appends to, read incrementally and kept up to ``limit`` bytes (SeaBIOS's debug port floods
    when it runs garbage: zeroed boot code executes as instructions that trap over and over)."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit, self.data = path, limit, bytearray()

    def text(self) -> str:
        if len(self.data) < self.limit:
            try:
                with open(self.path, "rb") as f:
                    f.seek(len(self.data))
                    self.data += f.read(self.limit - len(self.data))
            except FileNotFoundError:
                pass
        return self.data.decode("utf-8", "replace").replace("\r", "")


def _outcome(serial: str, fwlog: str) -> tuple[str | None, str | None]:
    if (m := re.search(rf"{ROOT_FOUND} (\S+)", serial)) is not None:
        return "root-found", m[1]
    if (m := re.search(rf"{ROOT_MISSING} ([^\n]*)", serial)) is not None:
        return "root-missing", m[1].strip()
    for name, pattern in FAILURES.items():
        if pattern.search(serial) or pattern.search(fwlog):
            return name, None
    return None, None


def boot(disk: Path, work: Path, firmware: Firmware = "bios", bus: Bus = "virtio",
         timeout: float = 60.0) -> BootResult:
    """Boot ``disk`` (raw, opened with snapshot=on: never written, shareable between runs)."""
    work.mkdir(parents=True, exist_ok=True)
    serial, fwlog = work / "serial.log", work / "firmware.log"
    for f in (serial, fwlog):
        f.unlink(missing_ok=True)
    args = [require_tool("qemu-system-x86_64"), "-accel", "tcg", "-machine", "q35", "-m", "512", "-smp", "1",
            "-nodefaults", "-nographic", "-monitor", "none", "-serial", f"file:{serial}", "-no-reboot", "-nic", "none",
            "-drive", f"if=none,id=disk0,format=raw,snapshot=on,file={disk}"]
    args += (["-device", "virtio-blk-pci,drive=disk0,bootindex=1"] if bus == "virtio"
             else ["-device", "ide-hd,drive=disk0,bus=ide.0,bootindex=1"])
    if firmware == "bios":
        args += ["-chardev", f"file,id=seabios,path={fwlog}", "-device", "isa-debugcon,iobase=0x402,chardev=seabios"]
    else:
        code, vars_ = FIRMWARE_FILES[firmware]
        for name in (code, vars_):
            if not (OVMF / name).exists():
                raise AssertionError(f"{OVMF / name} is missing: install Debian's ovmf")
        own_vars = work / vars_
        shutil.copy(OVMF / vars_, own_vars)
        args += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF / code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={own_vars}"]
        if firmware == "efi-secure":  # the Secure Boot build keeps its variables behind SMM
            args[args.index("q35")] = "q35,smm=on"
            args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    began = time.monotonic()
    serial_log, firmware_log = _Log(serial, SERIAL_LIMIT), _Log(fwlog, FIRMWARE_LOG_LIMIT)
    with open(work / "qemu.out", "wb") as qemu_out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=qemu_out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    outcome = detail = None
    stages: dict[str, float] = {}
    try:
        while time.monotonic() - began < timeout:
            if proc.poll() is not None:
                break
            text = serial_log.text()
            for name, mark in STAGES:
                if name not in stages and mark in text:
                    stages[name] = round(time.monotonic() - began, 1)
            outcome, detail = _outcome(text, firmware_log.text())
            if outcome is not None and outcome != "root-found" and outcome != "root-missing":
                break  # a firmware failure: nothing more will come
            time.sleep(0.1)
        else:
            outcome = "timeout"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # qemu's own session, started above
        proc.wait()
    seconds = time.monotonic() - began
    text, log = serial_log.text(), firmware_log.text()
    if outcome != "timeout":
        outcome, detail = _outcome(text, log)
    if outcome is None:
        out = (work / "qemu.out").read_text(errors="replace")
        raise AssertionError(f"qemu exited ({proc.returncode}) before any outcome: {out}\n{text}\n{log}")
    for name, mark in STAGES:
        if name not in stages and mark in text:
            stages[name] = round(seconds, 1)
    return BootResult(firmware, bus, outcome, detail, seconds, text, log, stages)
