"""The ``.mf`` manifest of an OVA: one ``ALGO(member)= hex`` line per file (DSP0243 "Package"), SHA1, SHA256 or
SHA512. Hand-written: the format is one regular expression. A file named twice is refused (which of two digests
would be checked?), a digest of the wrong length too; the comparison itself is in :mod:`diskport.ova.package`.
"""

from __future__ import annotations

import re

from diskport.errors import CorruptImage, UnsafeImage

MAX_MANIFEST = 1024 * 1024
ALGORITHMS = {"sha1": 40, "sha256": 64, "sha512": 128}
_LINE = re.compile(r"(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)")


def parse_manifest(data: bytes, where: str) -> dict[str, tuple[str, str]]:
    """``{member name: (algorithm, lowercase hex)}``."""
    if len(data) > MAX_MANIFEST:
        raise UnsafeImage(f"the manifest is {len(data)} bytes, more than the {MAX_MANIFEST} limit", path=where,
                          fmt="mf")
    out: dict[str, tuple[str, str]] = {}
    for number, raw in enumerate(data.decode("utf-8", "surrogateescape").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = _LINE.fullmatch(line)
        if m is None:
            raise CorruptImage(f"manifest line {number} is not 'SHA256(name)= hex': {line[:80]!r}", path=where,
                               fmt="mf")
        algo, name, digest = m.group(1).lower(), m.group(2).strip(), m.group(3).lower()
        while name.startswith("./"):
            name = name[2:]
        if len(digest) != ALGORITHMS[algo]:
            raise CorruptImage(f"manifest line {number}: a {algo} digest has {ALGORITHMS[algo]} hex digits, not "
                               f"{len(digest)}", path=where, fmt="mf")
        if name in out:
            raise CorruptImage(f"the manifest lists '{name}' twice", path=where, fmt="mf")
        out[name] = (algo, digest)
    return out
