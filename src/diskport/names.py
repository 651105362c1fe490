"""The names of the formats diskport reads and writes, with no reader or writer imported.

The command line builds its ``--format`` and ``--output-format`` choices from these, so ``--help`` renders
without loading numpy and every reader; :mod:`diskport.formats` and :mod:`diskport.writers` register their
readers and writers under exactly these names (a test checks that the two agree).
"""

from __future__ import annotations

#: Formats with a reader, in the order :mod:`diskport.formats` registers them (raw, which claims everything, last).
INPUT_FORMATS: tuple[str, ...] = ("qcow2", "vmdk", "vpc", "vhdx", "vdi", "iso", "raw")
#: Names users type for the same formats.
FORMAT_ALIASES: dict[str, str] = {"vhd": "vpc", "img": "raw"}
#: Formats with a writer.
OUTPUT_FORMATS: tuple[str, ...] = ("raw", "qcow2")


def format_names() -> list[str]:
    """Every name ``--format`` takes: the formats, then their aliases."""
    return [*INPUT_FORMATS, *FORMAT_ALIASES]
