"""`make demo`: the main job end to end on a sample disk that diskport itself generates.

1. Writes a 1 GiB sample disk (an MBR partition table, text and random data, zeros elsewhere) as a compressed
   qcow2 with diskport's own qcow2 writer.
2. Inspects it.
3. Converts it to raw (the format a platform's persistent disk holds) and back to qcow2, and checks that the raw
   bytes are exactly the bytes that were generated.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import sys
import time
from pathlib import Path

from diskport import convert
from diskport.destination import Destination
from diskport.inspect import inspect_image, render_text
from diskport.units import human_size
from diskport.writers import Qcow2Writer

OUT = Path("demo-out")
SIZE = 1024 ** 3
CHUNK = 1024 * 1024


def mbr() -> bytes:
    """A boot sector with one Linux partition from 1 MiB to the end."""
    sector = bytearray(512)
    start, count = 2048, SIZE // 512 - 2048
    sector[446:462] = struct.pack("<B3sB3sII", 0x80, b"\x00\x02\x00", 0x83, b"\xfe\xff\xff", start, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def sample_chunks() -> list[tuple[int, bytes]]:
    rng = random.Random(2026)
    text = b"".join(b"diskport demo line %06d: the quick brown fox\n" % i for i in range(CHUNK // 48 + 1))
    chunks = [(0, mbr())]
    for i in range(24):
        offset = (i * 41 + 1) * CHUNK
        chunks.append((offset, rng.randbytes(CHUNK) if i % 2 else text[:CHUNK]))
    return chunks


def generate(path: Path) -> str:
    """Write the sample disk as qcow2; return the sha256 of its guest bytes."""
    digest = hashlib.sha256()
    zeros = bytes(CHUNK)
    chunks = sample_chunks()
    with Destination(path, force=True) as dest:
        writer = Qcow2Writer(dest.fd, SIZE, name=str(path), compression="zstd")
        pos = 0
        for offset, data in chunks:
            while pos < offset:
                n = min(CHUNK, offset - pos)
                digest.update(zeros[:n])
                pos += n
            writer.write(offset, data)
            digest.update(data)
            pos = offset + len(data)
        while pos < SIZE:
            n = min(CHUNK, SIZE - pos)
            digest.update(zeros[:n])
            pos += n
        writer.finish(SIZE)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * CHUNK):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    sample = OUT / "sample.qcow2"
    print(f"1. generating a {human_size(SIZE)} sample disk with diskport's qcow2 writer (zstd) -> {sample}")
    expected = generate(sample)
    print(f"   {human_size(sample.stat().st_size)} on disk; guest sha256 {expected[:16]}...")

    print(f"\n2. diskport inspect {sample}")
    facts = inspect_image(sample)
    print("   " + render_text(facts).replace("\n", "\n   "))

    raw = OUT / "disk.raw"
    print(f"\n3. diskport convert {sample} {raw}")
    t = time.monotonic()
    result = convert(sample, raw, output_format="raw")
    print(f"   {human_size(result.data_bytes)} of data written, {human_size(result.zero_bytes)} left as holes, "
          f"{time.monotonic() - t:.2f} s; {human_size(os.stat(raw).st_blocks * 512)} allocated of "
          f"{human_size(raw.stat().st_size)}")
    actual = sha256(raw)
    if actual != expected:
        print(f"   MISMATCH: raw sha256 {actual} != generated {expected}", file=sys.stderr)
        return 1
    print(f"   raw bytes match the generated disk (sha256 {actual[:16]}...)")

    back = OUT / "disk.qcow2"
    print(f"\n4. diskport convert -O qcow2 {raw} {back}")
    result = convert(raw, back, output_format="qcow2")
    print(f"   {human_size(back.stat().st_size)} qcow2; inspect --json says:")
    facts = inspect_image(back)
    print("   " + json.dumps({k: facts[k] for k in ("format", "virtual-size", "cluster-size")}))
    print(f"\ndone: outputs in {OUT}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
