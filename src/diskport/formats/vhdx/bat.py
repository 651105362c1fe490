"""The VHDX block allocation table (2.5): payload entries decoded a window at a time into (kind, host offset)
arrays, validated (states, placement, no two blocks sharing file bytes) when the image opens.

Opening validates the whole BAT with the standard library; numpy is imported by :meth:`Bat.window`, when
the mapping first decodes a window."""

from __future__ import annotations

import bisect
import itertools
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from diskport.formats.base import DiskImage, uint_table
from diskport.formats.vhdx.header import ReadFile
from diskport.formats.vhdx.log import Overlay
from diskport.formats.vhdx.metadata import Metadata
from diskport.formats.vhdx.spec import (
    BAT_CACHE_WINDOWS,
    BAT_OFFSET_SHIFT,
    BAT_STATE_MASK,
    BAT_WINDOW_BLOCKS,
    HEADER_SECTION_SIZE,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_PARTIALLY_PRESENT,
    ZERO_STATES,
    MiB,
    Region,
)
from diskport.runs import RunKind

if TYPE_CHECKING:
    from array import array

    import numpy as np

# Block kinds while decoding the BAT: zeros, data in place, data the log replay touched (read through it).
ZERO, DATA, OVERLAID = RunKind.ZERO, RunKind.DATA, RunKind.MAPPED

#: A BAT entry's low byte to its state (the low three bits), and the states a payload entry may have.
_STATE_OF_BYTE = bytes(b & BAT_STATE_MASK for b in range(256))
_KNOWN_STATES = bytes([*ZERO_STATES, PAYLOAD_FULLY_PRESENT])


class Bat:
    """The BAT of an opened image: ``window(i)`` is (kind, host offset) for the payload blocks of window ``i``.

    ``segments`` are the file ranges that are not plain source bytes (what the log replay wrote or zeroed,
    and anything past the source's end), sorted and disjoint: blocks that meet one are OVERLAID.
    """

    def __init__(self, image: DiskImage, read_file: ReadFile, meta: Metadata, region: Region,
                 reserved: list[tuple[str, Region]], overlay: Overlay | None, file_size: int) -> None:
        self.image = image
        self.read_file = read_file
        self.block_size = meta.block_size
        self.chunk_ratio = meta.chunk_ratio
        self.virtual_size = meta.virtual_size
        self.bat_region = region
        self.file_size = file_size
        # File ranges a payload block must not overlap; the header section is excluded by the 1 MiB minimum.
        self._reserved = reserved
        self._bat_cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.segments = (overlay or Overlay()).segments(image.source.size, file_size)
        self.segment_ends = [end for _, end, _ in self.segments]
        self._segment_arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._validate()

    def _validate(self) -> None:
        """Sizes checked against the region and file, then every payload entry of the BAT checked once, a window
        at a time, so corruption shows at open: its state, where its block lies, and that no two payload blocks
        share file bytes (a small file must not expand into a huge disk).

        Done without numpy, so opening a VHDX does not import it: a window's states are one byte slice and
        ``translate`` (C speed), and only the FULLY_PRESENT blocks, found with ``bytes.find``, are looked at one
        by one; their number is bounded by the file's size in MiB before they are sorted for the overlap check.
        """
        self.payload_blocks = -(-self.virtual_size // self.block_size)
        self.bat_entries = (self.payload_blocks + (self.payload_blocks - 1) // self.chunk_ratio
                            if self.payload_blocks else 0)
        if self.bat_entries * 8 > self.bat_region.length:
            raise self.image.corrupt(f"BAT region of {self.bat_region.length} bytes cannot hold the "
                             f"{self.bat_entries} entries the virtual size needs")
        if self.bat_region.offset + self.bat_entries * 8 > self.file_size:
            raise self.image.corrupt(f"BAT at {self.bat_region.offset:#x} ({self.bat_entries} entries) lies beyond the "
                             f"end of the file ({self.file_size} bytes)")
        placed: list[tuple[int, int, int]] = []  # (host, bytes used, block) of every block in the file
        max_blocks = self.file_size // MiB + 1
        for window in range(-(-self.payload_blocks // BAT_WINDOW_BLOCKS)):
            first = window * BAT_WINDOW_BLOCKS
            entries = self._payload_entries(first, min(BAT_WINDOW_BLOCKS, self.payload_blocks - first))
            present = self._check_states(first, entries)
            placed.extend(self._check_block_hosts(first, entries, present))
            if len(placed) > max_blocks:
                raise self.image.corrupt(f"BAT maps more payload blocks than the {self.file_size} byte file can hold "
                                 "without overlapping")
        if len(placed) > 1:
            placed.sort(key=lambda block: block[0])  # stable: equal hosts keep block order
            for (host, used, block), (next_host, _, next_block) in itertools.pairwise(placed):
                if next_host < host + used:
                    raise self.image.corrupt(f"payload blocks {block} and {next_block} overlap in the file at "
                                     f"{next_host:#x}")

    def _payload_entries(self, first: int, count: int) -> array[int]:
        """The BAT entries of payload blocks ``first .. first + count - 1`` (the sector bitmap entries between
        them dropped, at C speed)."""
        last = first + count - 1
        bat_first = first + first // self.chunk_ratio
        bat_last = last + last // self.chunk_ratio
        raw = self.read_file(self.bat_region.offset + bat_first * 8, (bat_last - bat_first + 1) * 8, "BAT")
        entries = uint_table(raw, "Q", "little")
        period = self.chunk_ratio + 1  # every period-th entry of the BAT (from index chunk_ratio) is a bitmap's
        del entries[(self.chunk_ratio - bat_first % period) % period::period]
        return entries

    def _entry_at(self, block: int) -> int:
        """File offset of the BAT entry of payload ``block``."""
        return self.bat_region.offset + 8 * (block + block // self.chunk_ratio)

    def _check_states(self, first: int, entries: array[int]) -> list[int]:
        """Indexes (in the window) of the FULLY_PRESENT entries; any state but those and the zero states is
        corrupt."""
        low_byte = 0 if sys.byteorder == "little" else 7
        states = entries.tobytes()[low_byte::8].translate(_STATE_OF_BYTE)
        unknown = states.translate(None, _KNOWN_STATES)
        if unknown:
            i = min(states.find(bytes([state])) for state in set(unknown))
            state = states[i]
            if state == PAYLOAD_PARTIALLY_PRESENT:
                raise self.image.corrupt(f"payload block {first + i} is PARTIALLY_PRESENT, a state only differencing "
                                 "images may use", self._entry_at(first + i))
            raise self.image.corrupt(f"payload block {first + i} has the reserved state {state}",
                                     self._entry_at(first + i))
        present = []
        i = states.find(PAYLOAD_FULLY_PRESENT)
        while i >= 0:
            present.append(i)
            i = states.find(PAYLOAD_FULLY_PRESENT, i + 1)
        return present

    def _used(self, block: int) -> int:
        """Bytes of ``block`` the virtual disk uses (the last block may be cut short)."""
        return min(self.block_size, self.virtual_size - block * self.block_size)

    def _check_block_hosts(self, first: int, entries: array[int], present: list[int]) -> list[tuple[int, int, int]]:
        """FULLY_PRESENT blocks must lie past the header section, inside the file, clear of the log, BAT and
        metadata regions (compared in MiB units, as the BAT stores them). Returns (host, used, block) of the
        blocks read from the file (not those a zero range of the replayed log covers)."""
        blocks = [(first + i, entries[i] >> BAT_OFFSET_SHIFT) for i in present]

        def limit_mb(used: int) -> int:
            return (self.file_size - used) // MiB if self.file_size >= used else -1

        checks: list[tuple[Callable[[int, int, int], bool], str]] = [
            (lambda _b, mb, _u: mb < HEADER_SECTION_SIZE // MiB, "inside the header section"),
            (lambda _b, mb, used: mb > limit_mb(used), f"past the end of the file ({self.file_size} bytes)")]
        for name, region in self._reserved:
            # block [h, h+used) meets [start, end) when h < end and h + used > start
            def meets(_b: int, mb: int, used: int, region: Region = region) -> bool:
                return -(-region.end // MiB) > mb > (region.offset - used) // MiB

            checks.append((meets, f"overlapping the {name} region"))
        for bad, reason in checks:
            hit = next(((block, mb) for block, mb in blocks if bad(block, mb, self._used(block))), None)
            if hit is not None:
                block, mb = hit
                raise self.image.corrupt(f"BAT maps payload block {block} to {mb * MiB:#x}, {reason}",
                                         self._entry_at(block))
        placed = []
        for block, mb in blocks:
            host, used = mb << BAT_OFFSET_SHIFT, self._used(block)
            if not self._zeroed(host, used):
                placed.append((host, used, block))
        return placed

    def _zeroed(self, host: int, used: int) -> bool:
        """Whether one zero range of the replayed log covers the file bytes ``[host, host + used)``."""
        i = bisect.bisect_right(self.segment_ends, host)
        if i >= len(self.segments):
            return False
        start, end, zero = self.segments[i]
        return zero and start <= host and end >= host + used

    def window(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(kind, host offset) for the payload blocks of one window (their entries were checked at open)."""
        import numpy as np

        cached = self._bat_cache.get(window)
        if cached is not None:
            self._bat_cache.move_to_end(window)
            return cached
        first = window * BAT_WINDOW_BLOCKS
        count = min(BAT_WINDOW_BLOCKS, self.payload_blocks - first)
        last = first + count - 1
        bat_first = first + first // self.chunk_ratio
        bat_last = last + last // self.chunk_ratio
        raw = self.read_file(self.bat_region.offset + bat_first * 8, (bat_last - bat_first + 1) * 8, "BAT")
        entries = np.frombuffer(raw, dtype="<u8")
        blocks = np.arange(first, first + count, dtype=np.int64)
        payload = entries[blocks + blocks // self.chunk_ratio - bat_first]
        states = (payload & np.uint64(BAT_STATE_MASK)).astype(np.int8)
        host_mb = (payload >> np.uint64(BAT_OFFSET_SHIFT)).astype(np.int64)  # < 2^44, fits
        kinds = np.full(count, ZERO, dtype=np.int8)
        present = states == PAYLOAD_FULLY_PRESENT
        kinds[present] = DATA
        hosts = np.where(present, host_mb, 0) << BAT_OFFSET_SHIFT  # checked at open: no overflow
        if np.any(present):
            # Blocks the log replay touched (or that lie past the source's end) are read through the overlay,
            # or are zeros when a zero range covers all of them.
            used = self.used_lengths(first, count)
            if self._segment_arrays is None:
                self._segment_arrays = (np.array([a for a, _, _ in self.segments], dtype=np.int64),
                                        np.array(self.segment_ends, dtype=np.int64),
                                        np.array([z for _, _, z in self.segments], dtype=bool))
            segment_starts, segment_ends, segment_zero = self._segment_arrays
            idx = np.searchsorted(segment_ends, hosts, side="right")
            near = present & (idx < len(self.segments))
            rows = np.flatnonzero(near)
            seg = idx[rows]
            touched = segment_starts[seg] < hosts[rows] + used[rows]
            covered = (touched & segment_zero[seg] & (segment_starts[seg] <= hosts[rows])
                       & (segment_ends[seg] >= hosts[rows] + used[rows]))
            kinds[rows[touched]] = OVERLAID
            kinds[rows[covered]] = ZERO
        result = (kinds, hosts)
        self._bat_cache[window] = result
        if len(self._bat_cache) > BAT_CACHE_WINDOWS:
            self._bat_cache.popitem(last=False)
        return result

    def used_lengths(self, first: int, count: int) -> np.ndarray:
        """Bytes of each block the virtual disk uses (the last block may be cut short)."""
        import numpy as np

        used = np.full(count, self.block_size, dtype=np.int64)
        if first + count == self.payload_blocks:
            used[-1] = self.virtual_size - (self.payload_blocks - 1) * self.block_size
        return used
