"""Runs of equal kind in a reader's table of units (clusters, blocks, sectors), found with numpy.

numpy is imported by :func:`split_runs` when it first runs: mapping extents is bulk work, opening a reader
(``inspect``) must not pay for numpy's import.

Every reader maps a table (an L2 table, a BAT, a block map, a sector bitmap) to one kind per unit and then
wants the maximal runs of one kind, a DATA run also ending where the units stop being contiguous in the file.
This is that split, once, with one vocabulary of kinds; a run becomes one :class:`~diskport.formats.base.Extent`.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


class RunKind(IntEnum):
    """What a unit holds: nothing (reads as zeros), bytes at a host offset, compressed bytes, or bytes that
    only the reader's ``read_mapped`` can produce (a VHDX block the log replay changed)."""

    ZERO = 0
    DATA = 1
    COMPRESSED = 2
    MAPPED = 3


def split_runs(kinds: np.ndarray, hosts: np.ndarray | None = None, step: int | np.integer = 0,
               contiguous: np.ndarray | None = None) -> Iterator[tuple[int, int]]:
    """``(first, end)`` unit indexes of the maximal runs of equal ``kinds``.

    With ``hosts``, a run of units that must be contiguous in the file (``contiguous``; by default the DATA
    units) also ends where the next unit's host is not the previous one's plus ``step``.
    """
    import numpy as np

    n = len(kinds)
    if n == 0:
        return iter(())
    brk = np.ones(n, dtype=bool)
    if n > 1:
        brk[1:] = kinds[1:] != kinds[:-1]
        if hosts is not None:
            follow = (kinds == RunKind.DATA) if contiguous is None else contiguous
            brk[1:] |= follow[1:] & (hosts[1:] != hosts[:-1] + step)
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], n)
    return zip(starts.tolist(), ends.tolist(), strict=True)
