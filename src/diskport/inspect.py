"""Facts about an image for ``diskport inspect``.

The JSON form uses ``qemu-img info --output=json`` field names where the fact is the same (``filename``,
``format``, ``virtual-size``, ``actual-size``, ``cluster-size``, ``format-specific``), so scripts written for
qemu-img read it unchanged; diskport's own facts (``compression``) are added beside them.
"""

from __future__ import annotations

import os
from typing import Any

from diskport.errors import safe_text
from diskport.formats import open_image
from diskport.ova import DEFAULT, OvaChoice
from diskport.sources.base import Source
from diskport.units import human_size

#: How much of a raw disk in a compressed file ``inspect`` decompresses to learn its size before it stops.
SIZE_SCAN_LIMIT = 8 * 1024 ** 3


def inspect_image(location: str | os.PathLike[str] | Source, fmt: str | None = None, *,
                  scratch_dir: str | None = None, size_scan_limit: int = SIZE_SCAN_LIMIT,
                  ova: OvaChoice = DEFAULT) -> dict[str, Any]:
    """Facts about the image at ``location``.

    A raw disk inside a compressed file declares no size: it is decompressed, without writing anything, to
    learn it, up to ``size_scan_limit`` bytes; past that the facts say the disk is at least that large
    (``virtual-size-known`` false) rather than spend minutes on a file that expands a thousandfold. A
    random-access format inside a compressed file is spooled to scratch to be read.
    """
    with open_image(location, fmt, scratch_dir=scratch_dir, ova=ova) as image:
        stopped = False
        if not image.size_known:
            for _ in image.extents():
                if image.virtual_size >= size_scan_limit:
                    stopped = True
                    break
        facts = image.info()
        facts["filename"] = location.name if isinstance(location, Source) else os.fspath(location)
        if image.compression or image.appliance is not None:
            facts["access"] = str(image.access)
        if stopped:
            facts["virtual-size-known"] = False
            facts["access"] = str(image.access.with_note(
                f"stopped after {human_size(image.virtual_size)} decompressed: the disk is at least that large "
                "(--size-scan-limit reads further)"))
        return facts


def _flatten(prefix: str, value: Any, lines: list[str]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}{key}: " if not prefix else f"{prefix.rstrip(': ')}.{key}: ", sub, lines)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for i, item in enumerate(value):
            _flatten(f"{prefix.rstrip(': ')}[{i}]: ", item, lines)
    else:
        lines.append(f"{prefix}{value}")


def render_text(facts: dict[str, Any]) -> str:
    lines = [
        f"file:          {facts['filename']}",
        f"format:        {facts['format']}",
    ]
    if facts.get("compression") or "access" in facts:
        lines.append(f"compression:   {' > '.join(facts.get('compression', [])) or 'none'} ({facts['access']})")
    at_least = "at least " if facts.get("virtual-size-known") is False else ""
    lines.append(f"virtual size:  {at_least}{human_size(facts['virtual-size'])} ({facts['virtual-size']} bytes)")
    if "actual-size" in facts:
        lines.append(f"disk size:     {human_size(facts['actual-size'])}")
    if "cluster-size" in facts:
        lines.append(f"cluster size:  {facts['cluster-size']}")
    appliance = facts.get("ova")
    if appliance:
        lines.extend(render_ova(appliance))
    specific = facts.get("format-specific", {}).get("data")
    if specific:
        lines.append("format specific:")
        details: list[str] = []
        _flatten("", specific, details)
        lines.extend(f"    {line}" for line in details)
    # Names come from the image (extent files, backing names): escaped as error messages are, one line each.
    return "\n".join(safe_text(line) for line in lines)


def render_ova(ova: dict[str, Any]) -> list[str]:
    """The appliance's facts, when the image is the boot disk of an OVA (strings from the OVF escaped)."""
    os_facts = ova["os"]
    memory = human_size(ova["memory"]) if ova.get("memory") else "not stated"
    lines = [
        f"appliance:     OVF {safe_text(ova['ovf-version'])}, VM {safe_text(ova['vm'])}"
        + (f" (of {', '.join(safe_text(v) for v in ova['virtual-systems'])})" if len(ova["virtual-systems"]) > 1
           else ""),
        f"  cpus, memory: {ova.get('cpus') or 'not stated'}, {memory}",
        f"  guest os:     {safe_text(str(os_facts.get('os-type')))} (CIM id {os_facts.get('cim-id')})",
        f"  firmware:     {safe_text(str(ova.get('firmware') or 'not stated'))}"
        + (f" ({ova['firmware-source']})" if ova.get("firmware-source") else ""),
    ]
    for nic in ova.get("nics", []):
        lines.append(f"  nic:          {safe_text(str(nic.get('type')))} on {safe_text(str(nic.get('network')))}")
    for disk in ova["disks"]:
        lines.append(f"  disk {disk['index']}:       {safe_text(disk['id'])} {safe_text(str(disk['file']))}, "
                     f"{human_size(disk['capacity'])}, {disk['bus'] or 'no bus'}" + (", boot" if disk["boot"] else ""))
    manifest = ova["manifest"]
    if manifest["file"]:
        checked = ", ".join(safe_text(name) for name in manifest["verified"]) or "nothing yet"
        lines.append(f"  manifest:     {safe_text(manifest['file'])} ({', '.join(manifest['algorithms'])}, "
                     f"{manifest['entries']} entries; checked here: {checked}; disks are checked as they are "
                     "converted)")
    else:
        lines.append("  manifest:     none (members not verified)")
    if manifest["certificate"]:
        lines.append(f"  certificate:  {safe_text(manifest['certificate'])}")
    return lines
