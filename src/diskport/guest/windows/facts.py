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

from diskport.errors import DiskportError
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
    facts = OsFacts(type="windows", partition=partition)
    software = fs.open(SOFTWARE)
    if software is not None:
        try:
            current = Hive(software).open_key(r"Microsoft\Windows NT\CurrentVersion")
        except DiskportError as e:
            warnings.append(f"SOFTWARE hive unreadable: {e}")
            current = None
        facts.product_name = _text(current, "ProductName")
        facts.edition = _text(current, "EditionID")
        facts.installation_type = _text(current, "InstallationType")
        build = _text(current, "CurrentBuildNumber") or _text(current, "CurrentBuild")
        facts.build = int(build) if build and build.isdigit() else None
        facts.version = _text(current, "DisplayVersion") or _text(current, "CurrentVersion")
        name = facts.product_name
        if name and facts.build is not None and facts.build >= WINDOWS_11_BUILD and "Windows 10" in name:
            name = name.replace("Windows 10", "Windows 11")
        facts.pretty_name = name
        facts.distribution = "windows"
        facts.evidence.append(SOFTWARE + r": Microsoft\Windows NT\CurrentVersion")

    drivers: list[DriverFacts] = []
    system = fs.open(SYSTEM)
    control_set: Key | None = None
    if system is not None:
        try:
            hive = Hive(system)
            current_set = _number(hive.open_key("Select"), "Current") or 1
            control_set = hive.open_key(f"ControlSet{current_set:03d}")
            facts.evidence.append(f"{SYSTEM}: Select\\Current = {current_set}")
        except DiskportError as e:
            warnings.append(f"SYSTEM hive unreadable: {e}")
    if control_set is not None:
        env = control_set.subkey("Control")
        env = env.subkey("Session Manager") if env is not None else None
        arch = _text(env.subkey("Environment") if env is not None else None, "PROCESSOR_ARCHITECTURE")
        facts.architecture = ARCHITECTURES.get(arch or "", arch)
        if _number(env.subkey("Power") if env is not None else None, "HiberbootEnabled") == 1:
            warnings.append("Fast Startup is on (HiberbootEnabled = 1): shut Windows down fully "
                            "(shutdown /s /f /t 0) before uploading, or its NTFS volume is left in use")
    services = control_set.subkey("Services") if control_set is not None else None
    staged = {n.split(".inf_", 1)[0].lower() for n in
              fs.listdir("/Windows/System32/DriverStore/FileRepository") if ".inf_" in n}
    for name, boot_critical in VIRTIO_DRIVERS.items():
        key = services.subkey(name) if services is not None else None
        start = _number(key, "Start")
        sys_file = f"/Windows/System32/drivers/{name}.sys"
        has_file = fs.stat(sys_file) is not None
        if key is not None and has_file and (start == 0 or (not boot_critical and start in (1, 2, 3))):
            drivers.append(DriverFacts(name, "installed", f"Services\\{name} Start={start}, {sys_file}"))
        elif key is not None and start is not None and has_file:
            drivers.append(DriverFacts(name, "disabled", f"Services\\{name} Start={start}: not loaded at boot"))
        elif name in staged and not boot_critical:
            drivers.append(DriverFacts(name, "installed", f"staged in the DriverStore ({name}.inf)"))
        elif name in staged:
            drivers.append(DriverFacts(name, "missing", f"only staged in the DriverStore ({name}.inf): "
                                                        "not loaded at boot"))
        else:
            drivers.append(DriverFacts(name, "missing", f"no Services\\{name} key or {name}.sys"))

    hiber = fs.open("/hiberfil.sys")
    if hiber is not None and hiber.pread(0, 4).lower() == b"hibr":
        warnings.append("hiberfil.sys holds a hibernation image: Windows was hibernated or shut down with "
                        "Fast Startup; boot it and shut it down fully before uploading")
    return facts, drivers
