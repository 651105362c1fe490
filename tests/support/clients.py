"""The tools the tests drive: qemu-img/qemu-io (the oracle), skopeo and umoci (independent OCI clients), and
diskport's own command line, run as a user would.

A missing tool is a test failure, never a skip: ``make test`` installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; 'make test' installs it (it is the test oracle)", pytrace=False)
    return path


def run(*args: str | os.PathLike[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(a) for a in args], check=check, capture_output=True, text=True,
                          **kw)  # type: ignore[call-overload, no-any-return]


def qemu_img(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(require_tool("qemu-img"), *args, check=check)


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    args: list[str] = [require_tool("qemu-io"), "-f", fmt]
    for c in commands:
        args += ["-c", c]
    out = run(*args, image)
    if "failed" in out.stdout.lower() or "error" in out.stderr.lower():
        raise AssertionError(f"qemu-io failed: {out.stdout} {out.stderr}")


def run_cli(*args: str | os.PathLike[str], check: bool = False, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the ``diskport`` command line in a subprocess, as a user would."""
    return run(sys.executable, "-m", "diskport", *args, check=check, **kw)


def skopeo(tmp_path: Path, *args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """skopeo with a private HOME and auth file under ``tmp_path`` (nothing of the user's is read)."""
    home = tmp_path / "skopeo-home"
    (home / "run").mkdir(parents=True, exist_ok=True)
    auth = home / "auth.json"
    if not auth.exists():
        auth.write_text("{}")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"),
           "REGISTRY_AUTH_FILE": str(auth), "TMPDIR": str(home)}
    return run(require_tool("skopeo"), "--insecure-policy", *args, check=check, env=env)


def skopeo_json(tmp_path: Path, *args: str | os.PathLike[str]) -> Any:
    """What ``skopeo`` prints, parsed as JSON (``inspect`` and friends)."""
    return json.loads(skopeo(tmp_path, *args).stdout)


def umoci(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return run(require_tool("umoci"), *args)
