"""No import runs back up the house (issue 9): the lower layers never import the ones built on them.

Read from the source with ``ast`` (every ``import``/``from ... import``, at any depth, lazy imports included), so
a deferred import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

SRC = REPO / "src" / "diskport"

#: package (relative to src/diskport) -> module prefixes it must not import
RULES = {
    "net": ("diskport.sources", "diskport.formats", "diskport.oci", "diskport.guest", "diskport.manifest",
            "diskport.ova", "diskport.engine", "diskport.importer", "diskport.cli"),
    "sources": ("diskport.formats", "diskport.oci", "diskport.guest", "diskport.manifest", "diskport.ova",
                "diskport.engine", "diskport.importer", "diskport.cli"),
    "formats": ("diskport.oci", "diskport.guest", "diskport.manifest", "diskport.engine", "diskport.importer",
                "diskport.cli"),
    # the writers share the readers' leaf spec modules (formats/qcow2_spec.py), nothing else of formats/
    "writers": ("diskport.formats.qcow2", "diskport.formats.vmdk", "diskport.formats.vhdx", "diskport.oci",
                "diskport.guest", "diskport.manifest", "diskport.importer",
                "diskport.cli"),
}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)  # "from diskport import x" is "diskport": the package face, above everything
    return names


@pytest.mark.parametrize("package", sorted(RULES))
def test_lower_layers_import_nothing_above_them(package: str) -> None:
    files = sorted((SRC / package).rglob("*.py"))
    assert files, package
    wrong = [f"{f.relative_to(SRC)} imports {name}" for f in files for name in sorted(imported(f))
             if name == "diskport" or (name.startswith(RULES[package]) and not name.endswith("_spec"))]
    assert not wrong, "\n".join(wrong)


def test_pull_does_not_import_build() -> None:
    assert "diskport.oci.build" not in imported(SRC / "oci" / "pull.py")


def test_the_rule_sees_a_lazy_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from diskport.formats import open_image\n    import diskport.oci.build\n")
    assert {"diskport.formats", "diskport.oci.build"} <= imported(probe)


@pytest.mark.parametrize("module", ["diskport.zeros", "diskport.runs", "diskport.cache", "diskport.units",
                                    "diskport.sources.spool", "diskport.sources.compression", "diskport.net"])
def test_a_low_module_imports_on_its_own(module: str) -> None:
    """A fresh interpreter imports it first, so an import cycle through a package above it fails here."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
