"""Coverage-guided fuzzing of diskport's readers with atheris (libFuzzer), one target a run.

    python fuzz/harness.py TARGET CORPUS_DIR [libFuzzer flags: -max_total_time=N -rss_limit_mb=N ...]

Targets: the disk-format readers (each image opened from memory and read in full through ``extents`` with a
read budget, as the engine reads it), guest inspection of a whole disk, and the registry-hive reader. A
:class:`~diskport.errors.DiskportError` is the expected answer to a bad input; anything else, a hang (libFuzzer's
``-timeout``) or memory past ``-rss_limit_mb`` is a finding, written by libFuzzer as ``crash-*``/``timeout-*``/
``oom-*`` in the working folder. tests/test_fuzz.py runs every target for a bounded time and replays the findings
kept in fuzz/findings/ as ordinary tests.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["diskport"]):
    from targets import one_input, target


def main() -> None:
    name = sys.argv.pop(1)
    run = target(name)
    atheris.Setup(sys.argv, lambda data: one_input(run, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
