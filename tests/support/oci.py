"""Reading back what diskport built, independently of diskport's own checks: the layer tar of a layout image,
and an image's manifest and config (through an index when it has one). And what a registry client finds on a
user's machine: docker/podman auth files and real ``docker-credential-<name>`` helper programs."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import stat
import sys
from pathlib import Path
from typing import Any

import zstandard

from diskport.oci.layout import Layout
from diskport.oci.media import OCI_INDEX, Descriptor


def decompress(data: bytes, media_type: str) -> bytes:
    if media_type.endswith("+gzip") or data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if media_type.endswith("+zstd") or data[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def layer_tar(layout: Layout, layer: Descriptor) -> bytes:
    path = layout.check_blob(layer)
    blob = Path(path).read_bytes()
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer.digest
    return decompress(blob, layer.media_type)


def image_of(layout: Layout, tag: str | None, arch: str | None = None) -> tuple[dict[str, Any], Descriptor, Any]:
    """(manifest JSON, its descriptor, config JSON) of ``tag`` (and ``arch`` inside an index)."""
    desc = layout.resolve(tag)
    if desc.media_type == OCI_INDEX:
        index = layout.read_json_blob(desc.digest, size=desc.size)
        entries = [Descriptor.from_json(m) for m in index["manifests"]]
        desc = next(d for d in entries if d.platform and d.platform["architecture"] == arch)
    manifest = layout.read_json_blob(desc.digest, size=desc.size)
    config_desc = Descriptor.from_json(manifest["config"])
    return manifest, desc, layout.read_json_blob(config_desc.digest, size=config_desc.size)


def write_json(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_helper(bin_dir: Path, name: str, answers: dict[str, tuple[str, str]], log: Path) -> Path:
    """A real ``docker-credential-<name>`` program: logs the server URL it is asked for, answers from ``answers``
    or says "credentials not found" (exit 1), as docker's helpers do."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text(f"""#!{sys.executable}
import json, sys
if sys.argv[1:] != ["get"]:
    sys.exit(2)
server = sys.stdin.read().strip()
with open({str(log)!r}, "a") as f:
    f.write(server + "\\n")
answers = {answers!r}
if server in answers:
    user, secret = answers[server]
    print(json.dumps({{"ServerURL": server, "Username": user, "Secret": secret}}))
else:
    print("credentials not found in native keychain")
    sys.exit(1)
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path
