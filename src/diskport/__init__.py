"""diskport: bring virtual-machine disk images into KubeVirt-style platforms.

The library is usable on its own; the command line (:mod:`diskport.cli`) is a thin layer over it.

    >>> from diskport import convert, open_image
    >>> convert("disk.qcow2", "disk.raw", output_format="raw")          # doctest: +SKIP
    >>> with open_image("disk.vmdk") as image:                         # doctest: +SKIP
    ...     print(image.format, image.virtual_size)
"""

from diskport.engine import ConvertResult, convert
from diskport.errors import (
    CorruptImage,
    DiskportError,
    UnsafeImage,
    UnsupportedImage,
)
from diskport.formats import open_image
from diskport.version import __version__

__all__ = [
    "ConvertResult",
    "CorruptImage",
    "DiskportError",
    "UnsafeImage",
    "UnsupportedImage",
    "__version__",
    "convert",
    "open_image",
]
