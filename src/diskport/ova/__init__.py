"""OVA and OVF appliances as disk sources: the VMware and VirtualBox export format.

An OVA is a container, not a disk: :mod:`~diskport.ova.package` resolves it to one :class:`Source` per disk
(plus the checks its manifest asks for), and the format openers read that source like any other file, so
``inspect``, ``convert``, ``import`` and ``build`` take an OVA wherever they take a disk. The two checks every
open runs (:func:`is_ovf_descriptor`, :func:`is_tar`) live here, so a file that is no appliance does not import
the package reader.
:mod:`~diskport.ova.descriptor` reads the OVF descriptor (VM, hardware, firmware, OS) and
:mod:`~diskport.ova.manifest` the ``.mf`` digests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OvaChoice:
    """Which virtual machine of an appliance (``--vm``) and which of its disks: index 0, the default, is the boot
    disk (the one on the first boot device, else the first disk)."""

    vm: str | None = None
    disk: int = 0


DEFAULT = OvaChoice()


def is_ovf_descriptor(head: bytes) -> bool:
    """Whether ``head`` starts an OVF descriptor (XML whose root is an OVF Envelope)."""
    text = head[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    return text.startswith(b"<") and b"Envelope" in text and b"dmtf.org/ovf/envelope" in text


def is_tar(head: bytes) -> bool:
    """Whether ``head`` starts with a ustar/GNU/PAX tar header: only then can it be an OVA, so only then is
    :mod:`diskport.ova.package` (the tar reader, the OVF parser) imported to look further."""
    return head[257:262] == b"ustar"
