"""Start-up stays light: which modules ``diskport --version``, ``--help`` and ``inspect`` of a local file load.

Not a timing test (timings live in the README, measured with hyperfine): each case runs in a fresh interpreter
and lists ``sys.modules`` when it exits, and fails if a heavy module is among them. The static name lists the
command line offers as choices (:mod:`diskport.names`) are checked against the registries that implement them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from diskport import cli, names
from tests.support.clients import qemu_img

#: What start-up must not pay for: numpy and the compression libraries (the readers), httpx and ssl (URLs),
#: rich and http.server (progress), the registry client, guest inspection, manifests, the engine.
HEAVY = (
    "numpy", "httpx", "httpcore", "ssl", "rich", "http.server", "zstandard", "isal", "google_crc32c", "lz4",
    "lzallright", "yaml", "asn1crypto", "defusedxml", "concurrent.futures",
    "diskport.oci", "diskport.engine", "diskport.guest", "diskport.manifest", "diskport.importer",
    "diskport.progress", "diskport.formats", "diskport.writers", "diskport.sources", "diskport.inspect",
    "diskport.ova.package",
)
#: inspect of a local disk reads it (numpy, the decompressors, the readers may load), but it neither talks to
#: a server or a registry, nor inspects the guest, nor writes anything, nor (not being a tar) reads an OVA.
NOT_FOR_LOCAL_INSPECT = (
    "httpx", "httpcore", "ssl", "rich", "http.server", "yaml", "asn1crypto", "lz4", "lzallright", "defusedxml",
    "xml", "concurrent.futures", "diskport.oci", "diskport.ova.package", "diskport.ova.descriptor", "diskport.guest",
    "diskport.manifest", "diskport.engine", "diskport.importer", "diskport.progress", "diskport.writers",
    "diskport.sources.http", "diskport.net",
)

# Runs the command line as the installed `diskport` script does and writes sys.modules to argv[1] at exit
# (after click's SystemExit), so what a whole command loads is seen, not only what importing cli loads.
WRAPPER = """
import atexit, json, sys
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["diskport", *sys.argv[2:]]
from diskport.cli import main
main()
"""


def _matching(modules: list[str], heavy: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy)]


def _modules_after(tmp_path: Path, *args: str) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    out = tmp_path / "modules.json"
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(out), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    modules: list[str] = json.loads(out.read_text())
    return modules, proc


def test_importing_the_cli_loads_nothing_heavy() -> None:
    code = "import diskport.cli, json, sys; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    modules = json.loads(proc.stdout)
    assert "diskport.cli" in modules and "click" in modules
    assert _matching(modules, HEAVY) == []


def test_the_package_face_stays_lazy() -> None:
    code = ("import diskport, json, sys; before = sorted(sys.modules); diskport.convert; "
            "print(json.dumps([before, sorted(sys.modules)]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, after = json.loads(proc.stdout)
    assert _matching(before, HEAVY) == []
    assert "diskport.engine" in after  # and the name still resolves when used


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["-h"], *[[command, "--help"] for command in (
    "convert", "import", "build", "push", "pull", "manifest", "inspect")]])
def test_version_and_help_load_nothing_heavy(tmp_path: Path, args: list[str]) -> None:
    modules, proc = _modules_after(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert ("diskport" in proc.stdout) if args == ["--version"] else ("Usage:" in proc.stdout)
    assert "diskport.cli" in modules
    assert _matching(modules, HEAVY) == []


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_inspect_of_a_local_file_loads_no_network_guest_or_writer(tmp_path: Path, fmt: str) -> None:
    image = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-f", fmt, image, "64M")
    modules, proc = _modules_after(tmp_path, "inspect", "--json", str(image))
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["format"] == fmt and facts["virtual-size"] == 64 * 1024 * 1024
    assert "diskport.inspect" in modules
    assert _matching(modules, NOT_FOR_LOCAL_INSPECT) == []


def test_format_names_are_the_readers_registered() -> None:
    from diskport.formats import ALIASES, FORMATS

    assert tuple(FORMATS) == names.INPUT_FORMATS
    assert ALIASES == names.FORMAT_ALIASES and set(ALIASES.values()) <= set(FORMATS)
    option = next(p for p in cli.convert.params if p.name == "source_format")
    assert isinstance(option.type, click.Choice) and list(option.type.choices) == [*FORMATS, *ALIASES]


def test_manifest_targets_are_the_modules_registered() -> None:
    import importlib

    from diskport.manifest import DEFAULT_TARGET, TARGETS

    assert tuple(TARGETS) == names.MANIFEST_TARGETS and DEFAULT_TARGET == names.DEFAULT_TARGET
    assert all(callable(importlib.import_module(module).build) for module in TARGETS.values())
    option = next(p for p in cli.manifest.params if p.name == "target")
    assert isinstance(option.type, click.Choice) and list(option.type.choices) == list(TARGETS)
    assert option.default == DEFAULT_TARGET


@pytest.mark.parametrize("output_format", names.OUTPUT_FORMATS)
def test_every_output_format_offered_has_a_writer(tmp_path: Path, output_format: str) -> None:
    source = tmp_path / "disk.raw"
    source.write_bytes(b"\x5a" * 65536 + b"\0" * (1024 * 1024 - 65536))
    dest = tmp_path / f"out.{output_format}"
    proc = subprocess.run([sys.executable, "-m", "diskport", "convert", "-q", "-O", output_format, str(source),
                           str(dest)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(qemu_img("info", "--output=json", dest).stdout)
    assert info["format"] == output_format and info["virtual-size"] == 1024 * 1024
