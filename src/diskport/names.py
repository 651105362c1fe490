"""The names the command line offers as choices, with nothing that implements them imported.

``--format``, ``--output-format`` and ``--target`` take their choices from here, so ``--help`` renders without
loading numpy, every reader or guest inspection; :mod:`diskport.formats`, :mod:`diskport.writers` and
:mod:`diskport.manifest` register their readers, writers and targets under exactly these names
(tests/test_startup.py checks that each registry and its list agree).
"""

from __future__ import annotations

#: Formats with a reader, in the order :mod:`diskport.formats` registers them (raw, which claims everything, last).
INPUT_FORMATS: tuple[str, ...] = ("qcow2", "vmdk", "vpc", "vhdx", "vdi", "iso", "raw")
#: Names users type for the same formats.
FORMAT_ALIASES: dict[str, str] = {"vhd": "vpc", "img": "raw"}
#: Formats with a writer.
OUTPUT_FORMATS: tuple[str, ...] = ("raw", "qcow2")
#: Manifest targets (``manifest --target``), the default first.
MANIFEST_TARGETS: tuple[str, ...] = ("cpln", "kubevirt")
DEFAULT_TARGET = MANIFEST_TARGETS[0]


def format_names() -> list[str]:
    """Every name ``--format`` takes: the formats, then their aliases."""
    return [*INPUT_FORMATS, *FORMAT_ALIASES]
