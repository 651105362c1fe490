"""diskport: bring virtual-machine disk images into KubeVirt-style platforms.

The library is usable on its own; the command line (:mod:`diskport.cli`) is a thin layer over it.

    >>> from diskport import convert, open_image, import_image, build_image, push_layout, inspect_guest
    >>> convert("disk.qcow2", "disk.raw", output_format="raw")          # doctest: +SKIP
    >>> with open_image("disk.vmdk") as image:                         # doctest: +SKIP
    ...     print(image.format, image.virtual_size)

The names below are loaded when first used (PEP 562), so importing one part of diskport does not import numpy,
httpx and every reader: a command that needs none of them starts faster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diskport._lazy import lazy_getattr
from diskport.errors import (
    CorruptImage,
    DestinationError,
    DiskportError,
    RegistryError,
    SourceError,
    UnsafeImage,
    UnsupportedImage,
    UsageError,
)
from diskport.version import __version__

if TYPE_CHECKING:
    from diskport.engine import ConvertResult, convert
    from diskport.formats import open_image
    from diskport.guest import GuestReport, inspect_guest
    from diskport.importer import ImportResult, import_image
    from diskport.oci.build import BuildResult, build_image
    from diskport.oci.push import push_layout

#: name -> the module that defines it
_LAZY = {
    "ConvertResult": "diskport.engine", "convert": "diskport.engine", "open_image": "diskport.formats",
    "GuestReport": "diskport.guest", "inspect_guest": "diskport.guest",
    "ImportResult": "diskport.importer", "import_image": "diskport.importer",
    "BuildResult": "diskport.oci.build", "build_image": "diskport.oci.build", "push_layout": "diskport.oci.push",
}

__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "BuildResult",
    "ConvertResult",
    "CorruptImage",
    "DestinationError",
    "DiskportError",
    "GuestReport",
    "ImportResult",
    "RegistryError",
    "SourceError",
    "UnsafeImage",
    "UnsupportedImage",
    "UsageError",
    "__version__",
    "build_image",
    "convert",
    "import_image",
    "inspect_guest",
    "open_image",
    "push_layout",
]
