"""Finding zero blocks inside data, at a writer's granularity, without a Python loop per block."""

from __future__ import annotations

import numpy as np

from diskport.runs import split_runs

ZERO_RUN, DATA_RUN = True, False


def nonzero_blocks(rows: np.ndarray) -> np.ndarray:
    """Which rows (blocks of unsigned words) hold a nonzero word.

    A block of data almost always has a nonzero first word, so the first words settle most blocks at the cost
    of one cache line each; only the blocks they leave open are scanned whole, with ``max`` (``any`` casts every
    word to bool first and is several times slower). When many are open (zero clusters interleaved with data),
    scanning every block beats copying the open ones out.
    """
    nonzero: np.ndarray = rows[:, 0] != 0
    open_ = np.flatnonzero(~nonzero)
    if len(open_) > len(rows) // 4:
        return np.asarray(rows.max(axis=1) != 0)
    if len(open_):
        nonzero[open_] = rows[open_].max(axis=1) != 0
    return nonzero


def zero_runs(view: memoryview, offset: int, granularity: int) -> list[tuple[int, int, bool]]:
    """Split ``view`` (guest bytes starting at ``offset``) into ``(start, end, is_zero)`` runs.

    Only whole blocks of ``granularity`` bytes aligned to guest offsets can be zero runs; partial blocks at
    either edge count as data.
    """
    n = len(view)
    head = min((-offset) % granularity, n)
    body = (n - head) // granularity * granularity
    if body == 0:
        return [(0, n, DATA_RUN)]
    blocks = np.frombuffer(view, dtype=np.uint8, count=body, offset=head).view(np.uint64)
    nonzero = nonzero_blocks(blocks.reshape(-1, granularity // 8))
    runs: list[tuple[int, int, bool]] = []
    if head:
        runs.append((0, head, DATA_RUN))
    for s, e in split_runs(nonzero):
        run = (head + s * granularity, head + e * granularity, not bool(nonzero[s]))
        if runs and runs[-1][2] == run[2]:
            runs[-1] = (runs[-1][0], run[1], run[2])
        else:
            runs.append(run)
    if head + body < n:
        if runs[-1][2] == DATA_RUN:
            runs[-1] = (runs[-1][0], n, DATA_RUN)
        else:
            runs.append((head + body, n, DATA_RUN))
    return runs
