"""Linux facts from a guest's filesystems: which one is the root, the distribution, the kernels and their drivers.

What is read, and why each file:

- ``/etc/os-release`` (or ``/usr/lib/os-release``, which it usually links to): ID, VERSION_ID, PRETTY_NAME
  (os-release(5)). The filesystem holding it, with an ``/etc``, is the root.
- kernels: ``/lib/modules/VERSION`` folders (``/usr/lib/modules`` on merged-/usr systems) and
  ``/boot/vmlinuz-VERSION`` on the root or on a separate ``/boot`` volume.
- for the newest kernel, each driver the platform's buses need (virtio_blk, virtio_scsi, virtio_net, and ahci
  for the sata bus): built in when ``modules.builtin`` lists it or ``/boot/config-VERSION`` says ``=y``; a module
  when its ``.ko`` (``.ko.xz``/``.ko.zst``/``.ko.gz``) is in the kernel's module tree; else missing. Whether the
  initramfs carries a module is read from the kernel's initramfs (``/boot/initrd.img-VERSION``,
  ``/boot/initramfs-VERSION.img``, ``/boot/initrd-VERSION``, or the ``initrd`` a boot entry names) by
  :mod:`~diskport.guest.initramfs`, for the :data:`MAX_INITRAMFS` newest kernels.
- the boot configuration: BLS entries (``/boot/loader/entries/*.conf``: ``linux``, ``initrd``, ``options``,
  ``$kernelopts`` from ``grubenv``) and ``linux``/``linuxefi`` lines of ``grub/grub.cfg`` or ``grub2/grub.cfg``;
  the default entry's ``root=`` and the ``/`` line of ``/etc/fstab`` say where the root is. ``/.autorelabel``:
  an SELinux relabel is pending (the first boot relabels, then reboots).
- cloud-init and qemu-guest-agent by their programs; ``/etc/fstab`` lines naming ``/dev/sdX`` or ``/dev/hdX``
  (on a virtio bus the disk is ``/dev/vdX``, so such a line fails the boot); the architecture from the ELF
  header of ``/bin/sh``.

Every file is read with a small limit; nothing is walked recursively.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from diskport.errors import DiskportError
from diskport.guest.facts import BootEntry, DriverFacts, InitramfsFacts, KernelFacts, OsFacts
from diskport.guest.filesystems.base import Filesystem
from diskport.guest.initramfs import list_initramfs

OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")
MODULE_ROOTS = ("/lib/modules", "/usr/lib/modules")
SMALL = 64 * 1024
MODULES_BUILTIN_LIMIT = 4 * 1024 * 1024
CONFIG_LIMIT = 2 * 1024 * 1024
GRUB_CFG_LIMIT = 1024 * 1024
#: Kernels whose initramfs is listed (the newest first): each can cost tens of MB over HTTP.
MAX_INITRAMFS = 2
#: Boot Loader Specification entries read.
MAX_BLS = 64
INITRD_NAMES = ("initrd.img-{v}", "initramfs-{v}.img", "initrd-{v}", "initramfs-{v}")

#: driver -> (where its module lives under kernel/, its CONFIG_ symbol)
DRIVERS = {
    "virtio_blk": ("drivers/block", "CONFIG_VIRTIO_BLK"),
    "virtio_scsi": ("drivers/scsi", "CONFIG_SCSI_VIRTIO"),
    "virtio_net": ("drivers/net", "CONFIG_VIRTIO_NET"),
    "ahci": ("drivers/ata", "CONFIG_SATA_AHCI"),
}
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x03: "i386", 0x28: "arm", 0xF3: "riscv64", 0x15: "ppc64",
                0x16: "s390x"}


def is_linux_root(fs: Filesystem[Any]) -> bool:
    return fs.stat("/etc", follow=True) is not None and any(fs.stat(p) is not None for p in OS_RELEASE)


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines, values unquoted as a shell would for the simple quoting os-release allows."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = re.sub(r"\\(.)", r"\1", value[1:-1]) if value[0] == '"' else value[1:-1]
        values[key.strip()] = value
    return values


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", version)]


def linux_facts(root: Filesystem[Any], boot: Filesystem[Any] | None, partition: int | None,
                warnings: list[str]) -> tuple[OsFacts, list[DriverFacts], dict[str, bool]]:
    """Facts from the root filesystem (and a separate ``/boot`` filesystem, when there is one)."""
    facts = OsFacts(type="linux", partition=partition)
    for path in OS_RELEASE:
        data = root.read(path, SMALL)
        if data is not None:
            release = parse_os_release(data.decode("utf-8", "replace"))
            facts.distribution = release.get("ID")
            facts.version = release.get("VERSION_ID")
            facts.pretty_name = release.get("PRETTY_NAME") or release.get("NAME")
            facts.evidence.append(path)
            break
    facts.architecture = _architecture(root)

    module_root = next((m for m in MODULE_ROOTS if root.stat(m) is not None), None)
    kernels = set(root.listdir(module_root)) if module_root else set()
    boot_fs, boot_dir = (boot, "/") if boot is not None else (root, "/boot")
    images = [n for n in boot_fs.listdir(boot_dir) if n.startswith("vmlinuz-") or n.startswith("vmlinux-")]
    kernels.update(n.split("-", 1)[1] for n in images)
    facts.kernels = sorted(kernels, key=_version_key)

    boot_prefix = "" if boot is not None else "/boot"
    facts.boot_entries = _boot_entries(boot_fs, boot_prefix)
    default = _default_entry(facts.boot_entries)
    if default is not None:
        facts.kernel_root = _cmdline_value(default.options, "root")
    if facts.kernel_root and re.fullmatch(r"/dev/[sh]d[a-z]+\d*", facts.kernel_root):
        warnings.append(f"the kernel command line says root={facts.kernel_root}: on a virtio bus the disk is "
                        "/dev/vdX; use root=UUID=")
    drivers: list[DriverFacts] = []
    for rank, version in enumerate(reversed(facts.kernels)):
        kernel = KernelFacts(version)
        image = next((n for n in images if n.split("-", 1)[1] == version), None)
        kernel.image = f"{boot_prefix}/{image}" if image else None
        kernel.drivers = _drivers(root, module_root, boot_fs, boot_dir, version)
        if rank < MAX_INITRAMFS:
            kernel.initramfs = _initramfs(boot_fs, boot_prefix, version, facts.boot_entries, kernel.drivers,
                                          image is not None)
        facts.kernel_details.append(kernel)
    if facts.kernel_details:
        drivers = facts.kernel_details[0].drivers
    else:
        warnings.append("no kernel found in /boot or /lib/modules")
    if root.stat("/.autorelabel") is not None:
        facts.selinux_relabel = True
        warnings.append("an SELinux relabel is pending (/.autorelabel): the first boot relabels every file and "
                        "reboots, which takes minutes")

    agents = {
        "cloud-init": any(root.stat(p) is not None for p in ("/usr/bin/cloud-init", "/etc/cloud/cloud.cfg")),
        "qemu-guest-agent": any(root.stat(p) is not None for p in ("/usr/bin/qemu-ga", "/usr/sbin/qemu-ga")),
    }
    fstab = root.read("/etc/fstab", SMALL)
    if fstab is not None:
        for line in fstab.decode("utf-8", "replace").splitlines():
            device = line.split("#", 1)[0].split()
            if len(device) >= 2 and device[1] == "/":
                facts.root_device = device[0]
            if device and re.fullmatch(r"/dev/[sh]d[a-z]+\d*", device[0]):
                warnings.append(f"/etc/fstab names {device[0]}: on a virtio bus the disk is /dev/vdX; "
                                "use UUID= or LABEL=")
    return facts, drivers, agents


def _architecture(root: Filesystem[Any]) -> str | None:
    for path in ("/bin/sh", "/usr/bin/sh", "/bin/busybox"):
        head = root.read(path, 20)
        if head is not None and len(head) == 20 and head[:4] == b"\x7fELF":
            endian = "<" if head[5] == 1 else ">"
            return ELF_MACHINES.get(struct.unpack_from(endian + "H", head, 18)[0])
    return None


def _drivers(root: Filesystem[Any], module_root: str | None, boot_fs: Filesystem[Any], boot_dir: str,
             version: str) -> list[DriverFacts]:
    builtin: set[str] = set()
    config: dict[str, str] = {}
    base = f"{module_root}/{version}" if module_root else None
    if base is not None:
        listing = root.read(f"{base}/modules.builtin", MODULES_BUILTIN_LIMIT)
        if listing is not None:
            builtin = {line.rsplit("/", 1)[-1].removesuffix(".ko").replace("-", "_")
                       for line in listing.decode("utf-8", "replace").splitlines() if line}
    text = boot_fs.read(f"{boot_dir.rstrip('/')}/config-{version}", CONFIG_LIMIT)
    if text is not None:
        for line in text.decode("utf-8", "replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.startswith("CONFIG_"):
                config[key] = value
    found = []
    for name, (folder, symbol) in DRIVERS.items():
        if name in builtin:
            found.append(DriverFacts(name, "builtin", f"{base}/modules.builtin ({version})"))
        elif config.get(symbol) == "y":
            found.append(DriverFacts(name, "builtin", f"/boot/config-{version}: {symbol}=y"))
        elif base is not None and (path := _module_file(root, f"{base}/kernel/{folder}/{name}")):
            found.append(DriverFacts(name, "module", path))
        elif not builtin and not config:
            found.append(DriverFacts(name, "unknown", f"neither modules.builtin nor config-{version} was found"))
        else:
            found.append(DriverFacts(name, "missing", f"not built into {version} and no module found"))
    return found


def _module_file(root: Filesystem[Any], stem: str) -> str | None:
    for suffix in MODULE_SUFFIXES:
        if root.stat(stem + suffix) is not None:
            return stem + suffix
    return None


def fstab_mounts(root: Filesystem[Any]) -> dict[str, str]:
    """Mount point -> source of each /etc/fstab line (the first line for a mount point wins)."""
    data = root.read("/etc/fstab", SMALL)
    mounts: dict[str, str] = {}
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            mounts.setdefault(fields[1], fields[0])
    return mounts


def _cmdline_value(options: str, key: str) -> str | None:
    value = None
    for word in options.split():
        name, sep, rest = word.partition("=")
        if sep and name == key:
            value = rest  # the last one wins, as in the kernel
    return value


def _boot_entries(boot_fs: Filesystem[Any], prefix: str) -> list[BootEntry]:
    """BLS entries first (newest version first, as grub's blscfg sorts them), then grub.cfg's linux lines."""
    entries: list[BootEntry] = []
    grubenv = None
    folder = f"{prefix}/loader/entries"
    names = sorted((n for n in boot_fs.listdir(folder) if n.endswith(".conf")), key=_version_key, reverse=True)
    for name in names[:MAX_BLS]:
        data = boot_fs.read(f"{folder}/{name}", SMALL)
        if data is None:
            continue
        fields: dict[str, list[str]] = {}
        for line in data.decode("utf-8", "replace").splitlines():
            key, _, value = line.strip().partition(" ")
            if key and not key.startswith("#"):
                fields.setdefault(key, []).append(value.strip())
        if "linux" not in fields:
            continue
        options = " ".join(fields.get("options", []))
        if "$kernelopts" in options:
            if grubenv is None:
                env = boot_fs.read(f"{prefix}/grub2/grubenv", SMALL) or b""
                grubenv = next((line[len("kernelopts="):] for line in env.decode("utf-8", "replace").splitlines()
                                if line.startswith("kernelopts=")), "")
            options = options.replace("$kernelopts", grubenv)
        initrd = [p for value in fields.get("initrd", []) for p in value.split() if not p.startswith("$")]
        entries.append(BootEntry(f"{folder}/{name}", fields["linux"][0], options, initrd,
                                 (fields.get("title") or [""])[0] or None))
    for cfg in (f"{prefix}/grub/grub.cfg", f"{prefix}/grub2/grub.cfg"):
        data = boot_fs.read(cfg, GRUB_CFG_LIMIT)
        if data is None:
            continue
        title = None
        for line in data.decode("utf-8", "replace").splitlines():
            words = line.strip().split()
            if not words:
                continue
            if words[0] in ("menuentry", "submenu"):
                m = re.match(r"\s*(?:menuentry|submenu)\s+(['\"])(.*?)\1", line)
                title = m[2] if m else None
            elif words[0] in ("linux", "linuxefi", "linux16") and len(words) >= 2:
                entries.append(BootEntry(cfg, words[1], " ".join(words[2:]), [], title))
            elif words[0] in ("initrd", "initrdefi", "initrd16") and entries and entries[-1].source == cfg:
                entries[-1].initrd.extend(words[1:])
    return entries


def _default_entry(entries: list[BootEntry]) -> BootEntry | None:
    """The entry that boots by default: the newest BLS entry, else grub.cfg's first ``linux`` line."""
    return entries[0] if entries else None


def _initramfs(boot_fs: Filesystem[Any], prefix: str, version: str, entries: list[BootEntry],
               drivers: list[DriverFacts], have_image: bool) -> InitramfsFacts | None:
    """The kernel's initramfs listed, and each module driver marked as in it or not."""
    candidates = [p for e in entries if version in e.kernel for p in e.initrd]
    candidates += [f"{prefix}/{pattern.format(v=version)}" for pattern in INITRD_NAMES]
    modules = {d.name for d in drivers if d.state == "module"}
    for path in candidates:
        if prefix and not path.startswith(prefix + "/"):
            path = prefix + "/" + path.lstrip("/")
        elif not prefix and path.startswith("/boot/") and boot_fs.stat(path) is None:
            path = path[len("/boot"):]
        try:
            handle = boot_fs.open(path)
        except DiskportError as e:
            return InitramfsFacts(path, problem=str(e))
        if handle is None:
            continue
        try:
            listing = list_initramfs(handle, modules)
        except DiskportError as e:
            return InitramfsFacts(path, problem=str(e))
        found = sorted(set(listing.modules) & set(DRIVERS))
        facts = InitramfsFacts(path, listing.archives, listing.entries, found, listing.complete, listing.problem)
        for driver in drivers:
            if driver.state != "module":
                continue
            if driver.name in listing.modules:
                driver.initramfs = True
                driver.evidence += f"; in {path} ({listing.modules[driver.name]})"
            elif listing.complete:
                driver.initramfs = False
                driver.evidence += f"; not in {path}"
            else:
                driver.evidence += f"; {path} could not be read to its end ({listing.problem})"
        return facts
    for driver in drivers:   # with its image there and no initramfs, modules cannot load before the root
        if driver.state == "module" and have_image:
            driver.initramfs = False
            driver.evidence += f"; no initramfs found for {version}"
    return None
