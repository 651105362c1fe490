"""OVA and OVF appliances as disk sources: the VMware and VirtualBox export format.

An OVA is a container, not a disk: :mod:`~diskport.ova.package` resolves it to one :class:`Source` per disk
(plus the checks its manifest asks for), and the format openers read that source like any other file, so
``inspect``, ``convert``, ``import`` and ``build`` take an OVA wherever they take a disk.
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
