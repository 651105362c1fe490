"""The zero scan (diskport.zeros) finds exactly the blocks that hold a nonzero byte, wherever that byte is."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from diskport.zeros import DATA_RUN, ZERO_RUN, zero_blocks, zero_runs

GRANULARITIES = [512, 4096, 65536, 131072]  # the last: larger than the 64 KiB compared at once


def _byte_scan(buf: bytes | bytearray, granularity: int) -> list[bool]:
    """Which blocks are all zero, one byte at a time: the reference the scan must agree with."""
    return [not any(buf[i: i + granularity]) for i in range(0, len(buf), granularity)]


def _as_flags(runs: list[tuple[int, int]], blocks: int) -> list[bool]:
    flags = [False] * blocks
    for first, end in runs:
        assert first < end
        flags[first:end] = [True] * (end - first)
    return flags


@settings(max_examples=80, deadline=None)
@given(granularity=st.sampled_from(GRANULARITIES), blocks=st.integers(1, 40),
       data=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 65535), st.integers(1, 255)), max_size=60))
def test_zero_blocks_match_a_byte_by_byte_scan(granularity: int, blocks: int,
                                               data: list[tuple[int, int, int]]) -> None:
    buf = bytearray(granularity * blocks)
    for block, within, value in data:
        buf[(block % blocks) * granularity + within % granularity] = value
    runs = zero_blocks(memoryview(buf), granularity)
    assert _as_flags(runs, blocks) == _byte_scan(buf, granularity)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(runs))  # maximal: runs never touch


def test_zero_blocks_find_a_last_byte_and_straddling_zero_words() -> None:
    # A block whose only nonzero byte is its last must count as data, inside a long zero run (compared a chunk
    # at a time) and alone; first words ending and starting with zero bytes make unaligned zero words that must
    # not be taken for a zero first word.
    g = 4096
    rng = np.random.default_rng(5)
    for zero_first_words in (3, 60):
        buf = bytearray(rng.integers(1, 256, 64 * g, dtype=np.uint8).tobytes())
        for i in range(zero_first_words):
            buf[i * g: (i + 1) * g] = bytes(g)
        buf[g - 1] = 1  # block 0: only its last byte
        buf[(zero_first_words - 2) * g - 1] = 1  # the last byte of a block deep in the zero run
        expected = _byte_scan(buf, g)
        assert _as_flags(zero_blocks(memoryview(buf), g), 64) == expected
        assert expected[0] is False and expected[zero_first_words - 3] is False
    buf = bytearray(16 * g)
    for i in range(16):
        buf[i * g: i * g + 8] = (1 << 63).to_bytes(8, "little") if i % 2 else (1).to_bytes(8, "little")
    assert zero_blocks(memoryview(buf), g) == []


@settings(max_examples=40, deadline=None)
@given(granularity=st.sampled_from(GRANULARITIES), offset=st.integers(0, 70000), length=st.integers(0, 300000),
       zero_spans=st.lists(st.tuples(st.integers(0, 300000), st.integers(1, 200000)), max_size=6))
def test_zero_runs_cover_the_view_and_only_mark_aligned_zero_blocks(granularity: int, offset: int, length: int,
                                                                    zero_spans: list[tuple[int, int]]) -> None:
    buf = bytearray(np.random.default_rng(length).integers(1, 256, length, dtype=np.uint8).tobytes())
    for start, n in zero_spans:
        buf[start: start + n] = bytes(len(buf[start: start + n]))
    runs = zero_runs(memoryview(buf), offset, granularity)
    assert runs[0][0] == 0 and runs[-1][1] == length
    assert all(a[1] == b[0] and a[2] != b[2] for a, b in itertools.pairwise(runs))
    for start, end, zero in runs:
        if zero:
            assert (offset + start) % granularity == 0 and (end - start) % granularity == 0
            assert not any(buf[start:end])
    # Every aligned whole block of zeros is found.
    first = (-offset) % granularity
    for a in range(first, length - granularity + 1, granularity):
        if not any(buf[a: a + granularity]):
            assert any(s <= a and a + granularity <= e and z for s, e, z in runs)


def test_zero_runs_cover_the_window_with_unaligned_edges() -> None:
    g = 4096
    buf = bytearray(10 * g)
    buf[5 * g + 100] = 7
    runs = zero_runs(memoryview(buf)[100:], 100, g)  # head of g - 100 bytes, then whole blocks, then a tail
    assert runs[0] == (0, g - 100, DATA_RUN)
    assert runs[-1][1] == len(buf) - 100
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
    assert [(s + 100, e + 100, z) for s, e, z in runs[1:3]] == [(g, 5 * g, ZERO_RUN), (5 * g, 6 * g, DATA_RUN)]
