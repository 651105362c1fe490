"""Windows facts from the Windows volume and its registry hives, the way libguestfs finds them.

- The Windows volume is the NTFS one with ``Windows/System32/config/SOFTWARE``.
- SOFTWARE, ``Microsoft\\Windows NT\\CurrentVersion``: ProductName, EditionID, InstallationType (Client, Server,
  Server Core), CurrentBuild(Number), DisplayVersion. Windows 11 still writes "Windows 10" in ProductName;
  its build (22000 or later) tells them apart.
- SYSTEM: the control set in use is ``Select\\Current`` (not always ControlSet001); in it, the Services keys of
  the VirtIO drivers (viostor, vioscsi, netkvm) and their Start value (0 = loaded at boot, which a boot disk's
  driver must be), ``Session Manager\\Environment\\PROCESSOR_ARCHITECTURE`` and
  ``Session Manager\\Power\\HiberbootEnabled`` (Fast Startup).
- Files: ``System32/drivers/NAME.sys``, the drivers staged in ``System32/DriverStore/FileRepository`` (which
  Plug and Play installs when the device appears: enough for a NIC, not for the boot disk), ``hiberfil.sys``
  (its first bytes say whether a hibernation image is in it).

Hives are read cell by cell through :mod:`diskport.guest.windows.regf`; never whole.
"""

from __future__ import annotations

from typing import Any

from diskport.errors import CorruptImage, DiskportError
from diskport.guest.facts import DriverFacts, OsFacts
from diskport.guest.filesystems.base import Filesystem
from diskport.guest.windows.regf import Hive, Key

SOFTWARE = "/Windows/System32/config/SOFTWARE"
SYSTEM = "/Windows/System32/config/SYSTEM"
ARCHITECTURES = {"AMD64": "x86_64", "ARM64": "aarch64", "x86": "i386"}
#: driver -> whether it must be loaded at boot to serve its bus (storage) or may arrive by Plug and Play (NIC)
VIRTIO_DRIVERS = {"viostor": True, "vioscsi": True, "netkvm": False}
WINDOWS_11_BUILD = 22000


def is_windows_volume(fs: Filesystem[Any]) -> bool:
    return fs.stat(SOFTWARE) is not None


def _text(key: Key | None, name: str) -> str | None:
    value = key.value(name) if key is not None else None
    return value.as_str() if value is not None else None


def _number(key: Key | None, name: str) -> int | None:
    value = key.value(name) if key is not None else None
    return value.as_int() if value is not None else None


def windows_facts(fs: Filesystem[Any], partition: int | None,
                  warnings: list[str]) -> tuple[OsFacts, list[DriverFacts]]:
    """The Windows facts and VirtIO drivers; a hive that cannot be read is a warning (its facts stay unknown),
    never a reason to lose the others."""
    facts = OsFacts(type="windows", partition=partition, distribution="windows")
    software = fs.open(SOFTWARE)
    if software is not None:
        try:
            _software_facts(Hive(software), facts)
        except DiskportError as e:
            warnings.append(f"SOFTWARE hive unreadable: {e}")

    drivers: list[DriverFacts] | None = None
    system = fs.open(SYSTEM)
    if system is None:
        why = f"no {SYSTEM}"
        warnings.append(f"{why}: the drivers Windows loads at boot are unknown")
    else:
        try:
            drivers = _system_facts(fs, Hive(system), facts, warnings)
            why = ""
        except DiskportError as e:
            why = f"SYSTEM hive unreadable: {e}"
            warnings.append(why)
    if drivers is None:
        drivers = [DriverFacts(name, "unknown", why) for name in VIRTIO_DRIVERS]

    hiber = fs.open("/hiberfil.sys")
    if hiber is not None and hiber.pread(0, 4).lower() == b"hibr":
        warnings.append("hiberfil.sys holds a hibernation image: Windows was hibernated or shut down with "
                        "Fast Startup; boot it and shut it down fully before uploading")
    return facts, drivers


def _software_facts(hive: Hive, facts: OsFacts) -> None:
    current = hive.open_key(r"Microsoft\Windows NT\CurrentVersion")
    if current is None:
        return
    facts.product_name = _text(current, "ProductName")
    facts.edition = _text(current, "EditionID")
    facts.installation_type = _text(current, "InstallationType")
    build = _text(current, "CurrentBuildNumber") or _text(current, "CurrentBuild")
    facts.build = int(build) if build and build.isascii() and build.isdigit() else None
    facts.version = _text(current, "DisplayVersion") or _text(current, "CurrentVersion")
    name = facts.product_name
    if name and facts.build is not None and facts.build >= WINDOWS_11_BUILD and "Windows 10" in name:
        name = name.replace("Windows 10", "Windows 11")
    facts.pretty_name = name
    facts.evidence.append(SOFTWARE + r": Microsoft\Windows NT\CurrentVersion")


def _system_facts(fs: Filesystem[Any], hive: Hive, facts: OsFacts, warnings: list[str]) -> list[DriverFacts]:
    current_set = _number(hive.open_key("Select"), "Current") or 1
    control_set = hive.open_key(f"ControlSet{current_set:03d}")
    facts.evidence.append(f"{SYSTEM}: Select\\Current = {current_set}")
    if control_set is None:
        raise CorruptImage(f"Select\\Current names ControlSet{current_set:03d}, which is absent", path=hive.name,
                           fmt="regf")
    manager = hive.open_key(f"ControlSet{current_set:03d}\\Control\\Session Manager")
    arch = _text(manager.subkey("Environment") if manager is not None else None, "PROCESSOR_ARCHITECTURE")
    facts.architecture = ARCHITECTURES.get(arch or "", arch)
    if _number(manager.subkey("Power") if manager is not None else None, "HiberbootEnabled") == 1:
        warnings.append("Fast Startup is on (HiberbootEnabled = 1): shut Windows down fully "
                        "(shutdown /s /f /t 0) before uploading, or its NTFS volume is left in use")
    services = control_set.subkey("Services")
    staged = {n.split(".inf_", 1)[0].lower() for n in
              fs.listdir("/Windows/System32/DriverStore/FileRepository") if ".inf_" in n}
    drivers = []
    for name, boot_critical in VIRTIO_DRIVERS.items():
        key = services.subkey(name) if services is not None else None
        start = _number(key, "Start")
        sys_file = f"/Windows/System32/drivers/{name}.sys"
        has_file = fs.stat(sys_file) is not None
        service = f"ControlSet{current_set:03d}\\Services\\{name}"
        if key is not None and has_file and (start == 0 or (not boot_critical and start in (1, 2, 3))):
            drivers.append(DriverFacts(name, "installed", f"{service} Start={start}, {sys_file}"))
        elif key is not None and start is not None and has_file:
            drivers.append(DriverFacts(name, "disabled", f"{service} Start={start}: not loaded at boot"
                                       if start != 4 else f"{service} Start=4: disabled"))
        elif name in staged and not boot_critical:
            drivers.append(DriverFacts(name, "installed", f"staged in the DriverStore ({name}.inf)"))
        elif name in staged:
            drivers.append(DriverFacts(name, "missing", f"only staged in the DriverStore ({name}.inf): "
                                                        "not loaded at boot"))
        elif key is not None and not has_file:
            drivers.append(DriverFacts(name, "missing", f"{service} exists but {sys_file} does not"))
        elif key is not None:
            drivers.append(DriverFacts(name, "missing", f"{service} has no Start value"))
        elif has_file:
            drivers.append(DriverFacts(name, "missing", f"{sys_file} exists but no {service} key loads it"))
        else:
            drivers.append(DriverFacts(name, "missing", f"no {service} key or {sys_file}"))
    return drivers
