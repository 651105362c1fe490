"""The disks the boot tests boot, inspected through other image formats and over HTTP: the verdict a boot
proved must not change with the container or the transport, and over HTTP inspection must read little of the
disk (the kernel, initramfs and modules on the root are stat'ed, never read).

No boots here: the boots in test_boot.py tie these very layouts to their verdicts.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from diskport.guest import inspect_guest
from tests.guest.support import convert

MiB = 1024 * 1024
LAYOUTS = ["gpt_both_disk", "mbr_gap_disk", "gpt_signed_disk", "gpt_novirtio_disk", "hybrid_zeroed_disk"]
#: Fields that depend on where and how the disk was read, not on what is in it.
TRANSPORT = ("filename", "format", "read", "virtual-size", "access")


def facts(report_json: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report_json.items() if k not in TRANSPORT}


def inspection_requests(nginx: Any) -> list[dict[str, Any]]:
    """The access log lines of the inspection: everything logged before a marker request sent after it (nginx
    logs a request when it has finished it, a moment after the client has its bytes)."""
    with contextlib.suppress(urllib.error.HTTPError):
        urllib.request.urlopen(nginx.url("end-of-inspection"), timeout=10).close()
    deadline = time.monotonic() + 10
    while True:
        entries: list[dict[str, Any]] = nginx.access_entries()
        uris = [e["uri"] for e in entries]
        if "/end-of-inspection" in uris:
            return entries[:uris.index("/end-of-inspection")]
        assert time.monotonic() < deadline, f"the marker request was never logged: {entries}"
        time.sleep(0.05)


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vpc", "vdi"])
def test_booted_layout_gets_the_same_verdict_in_every_format(gpt_both_disk: Path, tmp_path: Path,
                                                             fmt: str) -> None:
    raw = tmp_path / "disk.raw"
    os.link(gpt_both_disk, raw)  # convert() writes beside its input: here, not in the shared session folder
    expected = facts(inspect_guest(raw).to_json())
    got = facts(inspect_guest(convert(raw, fmt)).to_json())
    if fmt == "vpc":  # the VHD's CHS-rounded size moves the backup GPT; everything inside is the same
        got["partition-table"]["notes"] = expected["partition-table"]["notes"]
    assert got == expected
    assert got["firmware"]["verdict"] == "bios+efi"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_booted_layout_over_http_reads_little(request: pytest.FixtureRequest, layout: str, tmp_path: Path,
                                              nginx: Any, record_property: Any) -> None:
    disk: Path = request.getfixturevalue(layout)
    raw = tmp_path / "disk.raw"
    os.link(disk, raw)
    expected = inspect_guest(raw)
    image = convert(raw, "qcow2")
    os.link(image, Path(nginx.root) / "disk.qcow2")
    report = inspect_guest(nginx.url("disk.qcow2"))
    assert facts(report.to_json()) == facts(expected.to_json())
    entries = inspection_requests(nginx)
    body = sum(e["body_bytes_sent"] for e in entries)
    record_property("http", {"image_bytes": image.stat().st_size, "bytes_read": report.bytes_read,
                             "reads": report.reads, "requests": len(entries), "body_bytes_sent": body})
    assert entries and all(e["status"] in (200, 206) for e in entries), entries
    assert all(e["range"] for e in entries), "every request is a range request"
    assert report.bytes_read < 4 * MiB and body < 8 * MiB, (report.bytes_read, body)
