"""The VHDX block allocation table (2.5): payload entries decoded a window at a time into (kind, host offset)
arrays, validated (states, placement, no two blocks sharing file bytes) when the image opens.

numpy is imported when a VHDX image opens (the whole BAT is decoded then), not when this module loads."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from diskport.formats.base import DiskImage
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
    import numpy as np

# Block kinds while decoding the BAT: zeros, data in place, data the log replay touched (read through it).
ZERO, DATA, OVERLAID = RunKind.ZERO, RunKind.DATA, RunKind.MAPPED


class Bat:
    """The BAT of an opened image: ``window(i)`` is (kind, host offset) for the payload blocks of window ``i``.

    ``segments`` are the file ranges that are not plain source bytes (what the log replay wrote or zeroed,
    and anything past the source's end), sorted and disjoint: blocks that meet one are OVERLAID.
    """

    def __init__(self, image: DiskImage, read_file: ReadFile, meta: Metadata, region: Region,
                 reserved: list[tuple[str, Region]], overlay: Overlay | None, file_size: int) -> None:
        import numpy as np

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
        self.segment_starts = np.array([a for a, _, _ in self.segments], dtype=np.int64)
        self.segment_ends = np.array([b for _, b, _ in self.segments], dtype=np.int64)
        self.segment_zero = np.array([z for _, _, z in self.segments], dtype=bool)
        self._validate()

    def _validate(self) -> None:
        """Sizes checked against the region and file, then the whole BAT decoded (and so validated) once."""
        import numpy as np

        self.payload_blocks = -(-self.virtual_size // self.block_size)
        self.bat_entries = (self.payload_blocks + (self.payload_blocks - 1) // self.chunk_ratio
                            if self.payload_blocks else 0)
        if self.bat_entries * 8 > self.bat_region.length:
            raise self.image.corrupt(f"BAT region of {self.bat_region.length} bytes cannot hold the "
                             f"{self.bat_entries} entries the virtual size needs")
        if self.bat_region.offset + self.bat_entries * 8 > self.file_size:
            raise self.image.corrupt(f"BAT at {self.bat_region.offset:#x} ({self.bat_entries} entries) lies beyond the "
                             f"end of the file ({self.file_size} bytes)")
        # Decode (and so validate) the whole BAT once, a window at a time, so corruption shows at open, and
        # make sure no two payload blocks share file bytes (a small file must not expand into a huge disk).
        placed: list[np.ndarray] = []
        placed_count = 0
        max_blocks = self.file_size // MiB + 1
        for window in range(-(-self.payload_blocks // BAT_WINDOW_BLOCKS)):
            kinds, hosts = self.window(window)
            first = window * BAT_WINDOW_BLOCKS
            in_file = np.flatnonzero(kinds != ZERO)
            in_file = in_file[hosts[in_file] != 0]
            placed_count += len(in_file)
            if placed_count > max_blocks:
                raise self.image.corrupt(f"BAT maps more payload blocks than the {self.file_size} byte file can hold "
                                 "without overlapping")
            placed.append(np.stack([hosts[in_file], self.used_lengths(first, len(kinds))[in_file],
                                    in_file + first]))
        if placed_count > 1:
            table = np.concatenate(placed, axis=1)
            table = table[:, np.argsort(table[0], kind="stable")]
            overlap = np.flatnonzero(table[0, 1:] < table[0, :-1] + table[1, :-1])
            if overlap.size:
                k = int(overlap[0])
                raise self.image.corrupt(f"payload blocks {int(table[2, k])} and {int(table[2, k + 1])} overlap in the "
                                 f"file at {int(table[0, k + 1]):#x}")

    def window(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(kind, host offset) for the payload blocks of one window, validated."""
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
        unknown = ~present & ~np.isin(states, ZERO_STATES)
        if np.any(unknown):
            i = int(np.flatnonzero(unknown)[0])
            state = int(states[i])
            at = self.bat_region.offset + 8 * (first + i + (first + i) // self.chunk_ratio)
            if state == PAYLOAD_PARTIALLY_PRESENT:
                raise self.image.corrupt(f"payload block {first + i} is PARTIALLY_PRESENT, a state only differencing "
                                 "images may use", at)
            raise self.image.corrupt(f"payload block {first + i} has the reserved state {state}", at)
        if np.any(present):
            self._check_block_hosts(first, count, host_mb, present)
        hosts = np.where(present, host_mb, 0) << BAT_OFFSET_SHIFT  # checked above: no overflow
        if np.any(present):
            # Blocks the log replay touched (or that lie past the source's end) are read through the overlay,
            # or are zeros when a zero range covers all of them.
            used = self.used_lengths(first, count)
            idx = np.searchsorted(self.segment_ends, hosts, side="right")
            near = present & (idx < len(self.segments))
            rows = np.flatnonzero(near)
            seg = idx[rows]
            touched = self.segment_starts[seg] < hosts[rows] + used[rows]
            covered = (touched & self.segment_zero[seg] & (self.segment_starts[seg] <= hosts[rows])
                       & (self.segment_ends[seg] >= hosts[rows] + used[rows]))
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

    def _check_block_hosts(self, first: int, count: int, host_mb: np.ndarray, present: np.ndarray) -> None:
        """FULLY_PRESENT blocks must lie past the header section, inside the file, clear of the log, BAT and
        metadata regions. Compared in MiB units so nothing overflows."""
        import numpy as np

        bad_reason: list[tuple[np.ndarray, str]] = []
        last_used = self.virtual_size - (self.payload_blocks - 1) * self.block_size
        used = self.used_lengths(first, count)
        limit_mb = np.where(used == self.block_size,
                            (self.file_size - self.block_size) // MiB if self.file_size >= self.block_size else -1,
                            (self.file_size - last_used) // MiB if self.file_size >= last_used else -1)
        bad_reason.append((present & (host_mb < HEADER_SECTION_SIZE // MiB), "inside the header section"))
        bad_reason.append((present & (host_mb > limit_mb), f"past the end of the file ({self.file_size} bytes)"))
        for name, region in self._reserved:
            # block [h, h+used) meets [start, end) when h < end and h + used > start
            end_mb = -(-region.end // MiB)
            after_start_mb = np.floor_divide(region.offset - used, MiB)
            hit = present & (host_mb < end_mb) & (host_mb > after_start_mb)
            bad_reason.append((hit, f"overlapping the {name} region"))
        for bad, reason in bad_reason:
            if np.any(bad):
                i = int(np.flatnonzero(bad)[0])
                at = self.bat_region.offset + 8 * (first + i + (first + i) // self.chunk_ratio)
                raise self.image.corrupt(f"BAT maps payload block {first + i} to {int(host_mb[i]) * MiB:#x}, "
                                 f"{reason}", at)
