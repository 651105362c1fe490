"""Start-up stays light: which modules ``diskport --version``, ``--help`` and ``inspect`` of a local file load.

Not a timing test (timings live in the README, measured with hyperfine): each case runs in a fresh interpreter
and lists ``sys.modules`` when it exits, and fails if a heavy module is among them. The static name lists the
command line offers as choices (:mod:`diskport.names`) are checked against the registries that implement them.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from diskport import cli, names
from tests.support.clients import qemu_img, qemu_io, require_tool, run

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


#: What inspect of an uncompressed local file must not load either: the readers open without numpy (their
#: openers check tables with the standard library; numpy is for mapping extents, which inspect does not do),
#: and a codec is imported only for a stream of its kind (detection is magic bytes).
NOT_FOR_UNCOMPRESSED_INSPECT = (
    *NOT_FOR_LOCAL_INSPECT, "numpy", "zstandard", "isal", "lzma", "_lzma", "bz2", "_bz2", "gzip",
    "diskport.sources.xz", "diskport.zeros", "subprocess", "tempfile", "ctypes.util",
)


def _local_image(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A 64 MiB disk of ``kind`` made by its own tools, and the format name inspect reports for it."""
    if kind == "iso":
        content = tmp_path / "content"
        content.mkdir()
        (content / "readme.txt").write_text("an ISO made by xorriso\n" * 100)
        image = tmp_path / "disk.iso"
        run(require_tool("xorriso"), "-as", "mkisofs", "-quiet", "-V", "START", "-o", image, content)
        return image, "iso"
    fmt, _, variant = kind.partition("-")
    image = tmp_path / f"disk.{fmt}"
    options = ["-o", "subformat=streamOptimized"] if variant == "stream" else []
    qemu_img("create", "-f", fmt, *options, image, "64M")
    if variant == "data":  # allocated L2 tables and data clusters: the opener's table checks have work to do
        qemu_io(image, fmt, "write -P 0x5a 0 1M", "write -P 0xa5 40M 64k")
    return image, fmt


@pytest.mark.parametrize("kind", ["qcow2", "qcow2-data", "raw", "vmdk", "vmdk-stream", "vpc", "vhdx", "vdi",
                                  "iso"])
def test_inspect_of_a_local_file_loads_no_network_guest_writer_numpy_or_codec(tmp_path: Path, kind: str) -> None:
    image, fmt = _local_image(tmp_path, kind)
    modules, proc = _modules_after(tmp_path, "inspect", "--json", str(image))
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["format"] == fmt
    peer = image.stat().st_size if fmt == "iso" else json.loads(qemu_img("info", "--output=json", image).stdout)[
        "virtual-size"]  # vpc rounds 64 MiB up to its CHS geometry, as qemu-img says
    assert facts["virtual-size"] == peer
    assert "diskport.inspect" in modules and "diskport.formats" in modules
    assert _matching(modules, NOT_FOR_UNCOMPRESSED_INSPECT) == []


def test_inspect_of_a_compressed_file_loads_its_codec_only(tmp_path: Path) -> None:
    """The other side of the lazy codecs: a gzip-compressed qcow2 loads isal (gzip's decoder), not zstandard or
    the xz reader (the spool's tempfile brings shutil, which imports bz2 and lzma itself)."""
    image, _ = _local_image(tmp_path, "qcow2")
    packed = tmp_path / "disk.qcow2.gz"
    packed.write_bytes(gzip.compress(image.read_bytes()))
    modules, proc = _modules_after(tmp_path, "inspect", "--json", str(packed))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["compression"] == ["gzip"]
    assert "isal" in modules
    assert _matching(modules, ("zstandard", "diskport.sources.xz")) == []


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
