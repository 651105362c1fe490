"""``diskport manifest``: the platform's workload or KubeVirt's VirtualMachine that boots a disk, chosen from
what is inside it.

The source is what the platform will boot from: ``docker://REF`` (a containerDisk, resolved to its digest so the
manifest pins it; the verdict labels ``build`` wrote into the image config are read instead of the disk when
they are there), an ``http(s)://`` URL (inspected over ranges), or a local image with ``url`` saying where it will
be published. :mod:`~diskport.manifest.model` decides every field once, with its reason; each target is one
module with a ``build(plan) -> [Document, ...]`` function and one line in :data:`TARGETS`;
:mod:`~diskport.manifest.yamlout` writes the YAML with the reasons as comments; :mod:`~diskport.manifest.api`
does the work.

The names below are loaded when first used (PEP 562), so the command line can list the targets without loading
guest inspection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diskport._lazy import lazy_getattr
from diskport.names import DEFAULT_TARGET, MANIFEST_TARGETS

if TYPE_CHECKING:
    from diskport.manifest.api import (
        ManifestResult,
        checked_checksum,
        compute_checksum,
        docker_source,
        generate,
        manifest_for_report,
        render,
        write_atomic,
    )
    from diskport.manifest.model import BootSource, Overrides

#: One line per target: its name and the module whose ``build(plan)`` writes its documents. The command line
#: offers the names in :data:`diskport.names.MANIFEST_TARGETS` without importing this package: a name there
#: without a module here fails at import.
_MODULES: dict[str, str] = {
    "cpln": "diskport.manifest.cpln",
    "kubevirt": "diskport.manifest.kubevirt",
}
TARGETS: dict[str, str] = {name: _MODULES[name] for name in MANIFEST_TARGETS}

_LAZY = {name: "diskport.manifest.api" for name in (
    "ManifestResult", "checked_checksum", "compute_checksum", "docker_source", "generate", "manifest_for_report",
    "render", "write_atomic")}
_LAZY.update(BootSource="diskport.manifest.model", Overrides="diskport.manifest.model")

__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "DEFAULT_TARGET",
    "TARGETS",
    "BootSource",
    "ManifestResult",
    "Overrides",
    "checked_checksum",
    "compute_checksum",
    "docker_source",
    "generate",
    "manifest_for_report",
    "render",
    "write_atomic",
]
