"""Names a package loads when first used (PEP 562), so importing the package does not import what they need.

    __getattr__ = lazy_getattr(__name__, {"convert": "diskport.engine", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``names[name]`` on first use of ``name``, takes
    ``name`` from it and keeps it in the package's namespace, so the next use is an ordinary lookup."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
