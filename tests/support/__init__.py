"""What the tests share, in one package: nothing here is a test, and no test module imports another.

- ``clients``: the command-line tools the tests drive or ask as oracles (``run``, ``require_tool``,
  ``qemu_img``, ``qemu_io``, ``skopeo``, ``umoci``) and ``run_cli`` for diskport itself.
- ``images``: image builders and checks (``make_image``, ``write_pattern_raw``, the qemu-img oracle's sha256,
  ``BytesSource``, ``mutate`` for fuzz loops, the extent-contract check, and ``CountingSource``/``ReadCount``/
  ``counting_opens`` to bound a reader's work by the reads it makes, never by the clock).
- ``vmdk``, ``vhdx``: those formats' builders and patchers, shared by ``test_<format>.py`` and
  ``test_<format>_bad.py``.
- ``servers``: nginx, plain HTTP, TLS (a test CA), fault-injecting and proxy servers on loopback, with fixtures.
- ``registry``: Debian's docker-registry (plain, TLS + htpasswd, token auth), the token server and the fault proxy.
- ``host``: the host as ``--cache`` sees it: fake /proc and /sys trees, a real cgroup v1 memory group to run
  diskport in, and ``resident`` (fincore: what the page cache holds of a file).

``tests/conftest.py`` loads ``servers`` and ``registry`` as pytest plugins, so their fixtures are everywhere.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
TESTDATA = REPO.parent / "shared" / "testdata"  # the external test images live beside the repo
MiB = 1024 * 1024
