"""The zero scan (diskport.zeros) finds exactly the blocks that hold a nonzero byte, wherever that byte is."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from diskport.zeros import DATA_RUN, ZERO_RUN, nonzero_blocks, zero_runs

GRANULARITIES = [512, 4096, 65536]


@settings(max_examples=60, deadline=None)
@given(granularity=st.sampled_from(GRANULARITIES), blocks=st.integers(1, 40),
       data=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 65535), st.integers(1, 255)), max_size=60))
def test_nonzero_blocks_matches_a_byte_by_byte_scan(granularity: int, blocks: int,
                                                    data: list[tuple[int, int, int]]) -> None:
    buf = bytearray(granularity * blocks)
    for block, within, value in data:
        buf[(block % blocks) * granularity + within % granularity] = value
    rows = np.frombuffer(buf, dtype=np.uint64).reshape(blocks, granularity // 8)
    expected = [any(buf[i * granularity: (i + 1) * granularity]) for i in range(blocks)]
    assert nonzero_blocks(rows).tolist() == expected


def test_nonzero_blocks_both_paths_find_a_last_byte() -> None:
    # Few open blocks (copied out and scanned) and many (every block scanned): a block whose only nonzero byte
    # is its last must count as data either way.
    g = 4096
    for zero_first_words in (3, 60):
        buf = bytearray(np.random.default_rng(zero_first_words).integers(1, 256, 64 * g, dtype=np.uint8))
        for i in range(zero_first_words):
            buf[i * g: (i + 1) * g] = bytes(g)
        buf[g - 1] = 1  # block 0: only its last byte
        got = nonzero_blocks(np.frombuffer(buf, dtype=np.uint64).reshape(64, g // 8)).tolist()
        assert got == [True] + [False] * (zero_first_words - 1) + [True] * (64 - zero_first_words)


def test_zero_runs_cover_the_window_with_unaligned_edges() -> None:
    g = 4096
    buf = bytearray(10 * g)
    buf[5 * g + 100] = 7
    runs = zero_runs(memoryview(buf)[100:], 100, g)  # head of g - 100 bytes, then whole blocks, then a tail
    assert runs[0] == (0, g - 100, DATA_RUN)
    assert runs[-1][1] == len(buf) - 100
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
    assert [(s + 100, e + 100, z) for s, e, z in runs[1:3]] == [(g, 5 * g, ZERO_RUN), (5 * g, 6 * g, DATA_RUN)]
