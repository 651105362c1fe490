"""Finding zero blocks inside data, at a writer's granularity, with the standard library only.

A block of data almost always has a nonzero first word, so the first words settle most blocks: they are
gathered with one strided copy (8 bytes a block) and searched for an aligned zero word with ``bytes.find``, in
C. A window of data with no such word (the usual case) costs a few microseconds and no Python loop. Only the
blocks whose first word is zero are compared whole against zeros, 64 KiB at a time (``memcmp`` speed), and a
zero block is extended chunk by chunk, so a long run of zeros costs one comparison per 64 KiB, not one per
block. No numpy: the copy path does not pay its import (about 75 ms a job).
"""

from __future__ import annotations

ZERO_RUN, DATA_RUN = True, False

#: Bytes compared against zeros at once.
CHUNK = 64 * 1024
_ZERO8 = bytes(8)
_zeros: dict[int, bytes] = {CHUNK: bytes(CHUNK)}


def _zero_bytes(n: int) -> bytes:
    z = _zeros.get(n)
    if z is None:
        z = bytes(n)
        if len(_zeros) < 64:
            _zeros[n] = z
    return z


def is_zero(view: memoryview, start: int, end: int) -> bool:
    """Whether ``view[start:end]`` is all zero bytes (compared a chunk at a time)."""
    while start < end:
        n = min(CHUNK, end - start)
        if view[start: start + n].tobytes() != _zero_bytes(n):
            return False
        start += n
    return True


def zero_blocks(body: memoryview, granularity: int) -> list[tuple[int, int]]:
    """``(first, end)`` block indexes of the runs of all-zero blocks in ``body``.

    ``body`` is bytes (format ``B``) whose length is a multiple of ``granularity``, itself a multiple of 8.
    """
    nblocks = len(body) // granularity
    if nblocks == 0:
        return []
    firsts = body.cast("Q")[:: granularity // 8].tobytes()
    per = max(1, CHUNK // granularity)  # blocks compared at once while extending a zero run
    runs: list[tuple[int, int]] = []
    pos = firsts.find(_ZERO8)
    while pos >= 0:
        if pos & 7:  # a zero word straddling two first words: look again from the next aligned one
            pos = firsts.find(_ZERO8, (pos | 7) + 1)
            continue
        i = j = pos >> 3
        while j < nblocks:
            k = min(j + per, nblocks)
            if is_zero(body, j * granularity, k * granularity):
                j = k
                continue
            # Data somewhere in [j, k): walk it block by block up to the first data block.
            while j < k and firsts[j * 8: j * 8 + 8] == _ZERO8 and is_zero(body, j * granularity,
                                                                            (j + 1) * granularity):
                j += 1
            break
        if j > i:
            runs.append((i, j))
        pos = firsts.find(_ZERO8, (j + 1) * 8) if j + 1 < nblocks else -1
    return runs


def zero_runs(view: memoryview, offset: int, granularity: int) -> list[tuple[int, int, bool]]:
    """Split ``view`` (guest bytes starting at ``offset``) into ``(start, end, is_zero)`` runs.

    Only whole blocks of ``granularity`` bytes aligned to guest offsets can be zero runs; partial blocks at
    either edge count as data.
    """
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    n = len(view)
    head = min((-offset) % granularity, n)
    body = (n - head) // granularity * granularity
    if body == 0:
        return [(0, n, DATA_RUN)]
    runs: list[tuple[int, int, bool]] = []
    pos = 0
    for s, e in zero_blocks(view[head: head + body], granularity):
        a, b = head + s * granularity, head + e * granularity
        if a > pos:
            runs.append((pos, a, DATA_RUN))
        runs.append((a, b, ZERO_RUN))
        pos = b
    if pos < n:
        runs.append((pos, n, DATA_RUN))
    return runs
