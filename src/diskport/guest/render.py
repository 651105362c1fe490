"""The text form of a guest report (the JSON form is :meth:`GuestReport.to_json`)."""

from __future__ import annotations

from diskport.errors import safe_text
from diskport.guest.facts import GuestReport
from diskport.units import human_size


def _shown(text: str, limit: int = 200) -> str:
    """Text holding names read from the image, with control characters escaped so it cannot forge lines or
    drive the terminal (the same escaping as error messages), cut to ``limit`` characters."""
    return safe_text(text, limit)


def render_guest(r: GuestReport) -> str:
    lines = [f"file:          {r.filename}", f"format:        {r.format}",
             f"virtual size:  {human_size(r.virtual_size)} ({r.virtual_size} bytes)"]
    table = r.scheme.upper() if r.scheme != "none" else "none (a bare volume)"
    flags = [f for f, on in (("protective MBR", r.protective_mbr), ("hybrid MBR", r.hybrid_mbr)) if on]
    lines.append(f"partitions:    {table}, {r.sector_size}-byte sectors" + (f", {', '.join(flags)}" if flags else ""))
    for note in r.table_notes:
        lines.append(f"  note: {note}")
    for v in r.volumes:
        fs = v.filesystem or "-"
        if v.label:
            fs += f" '{_shown(v.label)}'"
        kind = v.type_name or v.type or ""
        number = "lv" if v.number is None else v.number
        lines.append(f"  {number:>3}  {human_size(v.start):>9} +{human_size(v.size):>9}  {kind:<22} {fs}"
                     + (f"  name '{v.name}'" if v.name else "") + ("  active" if v.active else "")
                     + (f"  ({v.error})" if v.error else ""))
    fw = r.firmware
    lines.append(f"firmware:      {fw.verdict}")
    lines.extend(f"  {reason}" for reason in fw.reasons)
    for loader in fw.loaders:
        signed = f"signed by {loader.signer}" if loader.signed else "unsigned"
        if loader.signed and loader.digest_ok is False:
            signed += " (digest mismatch)"
        lines.append(f"  loader {loader.path} ({loader.role}, partition {loader.partition}): {signed}")
    lines.append(f"secure boot:   {'possible' if fw.secure_boot else 'no'} ({fw.secure_boot_reason})")
    os_line = r.os.pretty_name or r.os.type
    if r.os.type == "windows":
        extra = [x for x in (r.os.edition, r.os.installation_type, f"build {r.os.build}" if r.os.build else None,
                             r.os.architecture) if x]
        os_line += f" ({', '.join(extra)})" if extra else ""
    elif r.os.type == "linux":
        extra = [x for x in (r.os.architecture, f"kernel {r.os.kernels[-1]}" if r.os.kernels else None) if x]
        os_line += f" ({', '.join(extra)})" if extra else ""
    on = (f" on logical volume {r.os.lv}" if r.os.lv else
          f" on partition {r.os.partition}" if r.os.partition is not None else "")
    lines.append(f"os:            {os_line}{on}")
    where = [x for x in (f"root {r.os.root_device}" if r.os.root_device else None,
                         f"root= {r.os.kernel_root}" if r.os.kernel_root else None,
                         f"btrfs subvolume {r.os.root_subvolume}" if r.os.root_subvolume else None,
                         f"/boot on partition {r.os.boot_partition}" if r.os.boot_partition is not None else None)
             if x]
    if where:
        lines.append(f"  {', '.join(where)}")
    for k in r.os.kernel_details:
        if k.initramfs is not None:
            held = ", ".join(k.initramfs.modules) or "none of the bus drivers"
            lines.append(f"  kernel {k.version}: initramfs {k.initramfs.path} ({' + '.join(k.initramfs.archives)}"
                         f", {k.initramfs.entries} entries) holds {held}"
                         + (f" ({k.initramfs.problem})" if k.initramfs.problem else ""))
    for d in r.drivers:
        held = {True: ", in the initramfs", False: ", not in the initramfs", None: ""}[d.initramfs]
        lines.append(f"  driver {d.name}: {d.state}{held} ({d.evidence})")
    for name, present in r.agents.items():
        lines.append(f"  {name}: {'yes' if present else 'no'}")
    for w in r.warnings:
        lines.append(f"warning:       {w}")
    lines.append("advice:")
    for a in r.advice:
        value = str(a.value).lower() if isinstance(a.value, bool) else a.value
        lines.append(f"  {a.field}: {value}  [{a.rule}: {a.reason}]")
    lines.append(f"read:          {human_size(r.bytes_read)} in {r.reads} reads, {r.seconds:.2f} s")
    return "\n".join(_shown(line, 1000) for line in lines)
