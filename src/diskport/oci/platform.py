"""OCI platforms of containerDisk images: the architecture names OCI uses, the aliases people type, this host's.

Apart from build and pull, which both need them (pull chooses from an index; build labels each disk).
"""

from __future__ import annotations

import platform as host_platform
import re
from collections.abc import Mapping

from diskport.errors import UsageError

#: Architectures as OCI platforms name them (Go's GOARCH), and the names ``uname -m`` and distributions use.
ARCHITECTURES = ("amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64", "mips64le", "loong64")
ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386", "i686": "386",
                "armv7l": "arm/v7", "armhf": "arm/v7", "ppc64el": "ppc64le"}


def parse_platform(text: str) -> dict[str, str]:
    """``amd64``, ``linux/arm64``, ``arm/v7``, ``aarch64``... -> an OCI platform (os is always linux)."""
    value = text.strip().lower().removeprefix("linux/")
    value = ARCH_ALIASES.get(value, value)
    arch, _, variant = value.partition("/")
    if arch not in ARCHITECTURES or (variant and not re.fullmatch(r"v[0-9]+", variant)):
        raise UsageError(f"unknown architecture '{text}' (known: {', '.join(ARCHITECTURES)}, optionally /variant "
                         "such as arm/v7)")
    found = {"architecture": arch, "os": "linux"}
    if variant:
        found["variant"] = variant
    return found


def platform_key(platform: Mapping[str, str]) -> str:
    """``amd64`` or ``arm/v7``: how results are keyed."""
    return platform["architecture"] + (f"/{platform['variant']}" if platform.get("variant") else "")


def host_architecture() -> str:
    """This machine's architecture as OCI names it (the default for a single disk)."""
    machine = host_platform.machine().lower()
    return ARCH_ALIASES.get(machine, machine)
