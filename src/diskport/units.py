"""Sizes: human-readable (powers of 1024, as qemu-img prints them), and parsed from the command line."""

from __future__ import annotations

import re

from diskport.errors import UsageError

_SIZE = re.compile(r"\s*(\d+)\s*([KMGTPE]i?)?[bB]?\s*")
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}


def parse_size(text: str) -> int:
    """Bytes, or a number with K/M/G/T/P/E (powers of 1024, as qemu-img reads them) or Ki/Mi/Gi/Ti/Pi/Ei (as
    Kubernetes writes them)."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise UsageError(f"size '{text}' is not bytes or a number with K/M/G/T (or Ki/Mi/Gi/Ti)")
    return int(m.group(1)) * int(1024 ** _UNITS[(m.group(2) or "").rstrip("i")])


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    text = f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text} {unit}"
