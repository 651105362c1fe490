"""The package face: every documented name resolves, and importing it loads none of the heavy parts."""

from __future__ import annotations

import subprocess
import sys

import diskport


def test_every_exported_name_resolves() -> None:
    for name in diskport.__all__:
        assert getattr(diskport, name) is not None, name
    assert issubclass(diskport.UsageError, diskport.DiskportError)


def test_importing_the_package_loads_no_heavy_module() -> None:
    code = ("import sys, diskport; print(' '.join(m for m in ('numpy', 'httpx', 'diskport.engine', "
            "'diskport.guest', 'diskport.formats') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == ""
