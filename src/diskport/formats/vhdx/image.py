"""The VHDX disk as one :class:`~diskport.formats.base.DiskImage`: opening runs the steps of the package
docstring in order (header, log replay, region table, metadata, BAT), and mapping turns BAT windows into
extents."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from diskport.formats.base import DiskImage, Extent
from diskport.formats.vhdx.bat import DATA, ZERO, Bat
from diskport.formats.vhdx.header import current_header, read_region_table
from diskport.formats.vhdx.log import Overlay, replay_log
from diskport.formats.vhdx.metadata import read_metadata
from diskport.formats.vhdx.spec import (
    BAT_WINDOW_BLOCKS,
    CREATOR_OFFSET,
    CREATOR_SIZE,
    FMT,
    HEADER_SECTION_SIZE,
    SIGNATURE,
    Region,
)
from diskport.runs import split_runs
from diskport.sources.base import Source

if TYPE_CHECKING:
    import numpy as np


class VhdxImage(DiskImage):
    format = FMT

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.file_size = source.size
        self._overlay: Overlay | None = None
        self.log_entries_replayed = 0
        if source.size < HEADER_SECTION_SIZE:
            raise self.corrupt(f"file is {source.size} bytes, too short for the 1 MiB VHDX header section")
        ident = source.read_exact(0, CREATOR_OFFSET + CREATOR_SIZE, "file type identifier", FMT)
        if ident[:8] != SIGNATURE:
            raise self.corrupt("file type identifier signature 'vhdxfile' is missing", 0)
        self.creator = ident[CREATOR_OFFSET:].decode("utf-16-le", "replace").split("\0")[0]
        replayed = replay_log(self, current_header(self))
        self.log_region = replayed.log
        self._overlay = replayed.overlay
        self.file_size = replayed.file_size
        self.log_entries_replayed = replayed.entries
        self.bat_region, self.metadata_region = read_region_table(self, self._read_file, self.log_region)
        meta = read_metadata(self, self._read_file, self.metadata_region)
        self.leave_blocks_allocated = meta.leave_blocks_allocated
        self.logical_sector_size = meta.logical_sector_size
        self.physical_sector_size = meta.physical_sector_size
        self.virtual_disk_id = meta.virtual_disk_id
        self.block_size = self.cluster_size = meta.block_size
        self.virtual_size = meta.virtual_size
        self.chunk_ratio = meta.chunk_ratio
        reserved: list[tuple[str, Region]] = [
            (name, r) for name, r in (("log", self.log_region), ("BAT", self.bat_region),
                                      ("metadata", self.metadata_region)) if r is not None]
        self.bat = Bat(self, self._read_file, meta, self.bat_region, reserved, self._overlay, self.file_size)
        self.payload_blocks = self.bat.payload_blocks

    # -- reading the file (through the replayed log) ----------------------------------------------------
    def _read_file(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes of the file at ``offset`` as the replayed log left them."""
        if offset < 0 or length < 0 or offset + length > self.file_size:
            raise self.corrupt(f"{what} at {offset:#x}+{length:#x} lies beyond the end of the file "
                               f"({self.file_size} bytes)")
        if self._overlay is None:
            return self.source.read_exact(offset, length, what, FMT)
        buf = bytearray(length)
        present = min(length, max(0, self.source.size - offset))
        if present:
            got = self.source.readinto(offset, memoryview(buf)[:present])
            if got != present:
                raise self.corrupt(f"{what} is truncated ({got} of {present} bytes)", offset)
        self._overlay.apply(offset, buf)
        return bytes(buf)

    # -- mapping ----------------------------------------------------------------------------------------
    def _guest_runs(self, start: int, stop: int) -> Iterator[Extent]:
        """Uncoalesced extents over ``[start, stop)``: runs of blocks, and pieces of overlaid blocks."""
        bs = self.block_size
        block = start // bs
        last_block = (stop - 1) // bs
        while block <= last_block:
            window = block // BAT_WINDOW_BLOCKS
            base = window * BAT_WINDOW_BLOCKS
            kinds, hosts = self.bat.window(window)
            lo = block - base
            hi = min(last_block + 1 - base, len(kinds))
            for kind, b0, b1, host in self._runs(kinds[lo:hi], hosts[lo:hi]):
                run_start = (base + lo + b0) * bs
                g0 = max(run_start, start)
                g1 = min((base + lo + b1) * bs, stop)
                if kind == DATA:
                    yield Extent(g0, g1 - g0, False, host + (g0 - run_start))
                elif kind == ZERO:
                    yield Extent(g0, g1 - g0, True, None)
                else:
                    for b in range(base + lo + b0, base + lo + b1):
                        block_host = int(hosts[b - base])
                        used = min(bs, self.virtual_size - b * bs)
                        for piece in self._overlaid_block(b * bs, block_host, used):
                            g0, g1 = max(piece.start, start), min(piece.end, stop)
                            if g0 < g1:
                                host_at = None if piece.host is None else piece.host + (g0 - piece.start)
                                yield Extent(g0, g1 - g0, piece.zero, host_at)
            block = base + hi

    def _overlaid_block(self, guest: int, host: int, used: int) -> Iterator[Extent]:
        """A block the log replay touched, split into source bytes (host set), zeros and replayed sectors."""
        pos = host
        end = host + used
        i = bisect.bisect_right(self.bat.segment_ends, host)
        while pos < end:
            if i < len(self.bat.segments) and self.bat.segments[i][0] <= pos:
                _, seg_end, is_zero = self.bat.segments[i]
                piece_end = min(seg_end, end)
                yield Extent(guest + pos - host, piece_end - pos, is_zero, None)
                i += 1
            else:
                piece_end = min(self.bat.segments[i][0], end) if i < len(self.bat.segments) else end
                yield Extent(guest + pos - host, piece_end - pos, False, pos)
            pos = piece_end

    def _runs(self, kinds: np.ndarray, hosts: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
        """(kind, first, end, host of first) for runs of blocks of one kind, DATA runs contiguous in the file."""
        for s, e in split_runs(kinds, hosts, self.block_size):
            yield int(kinds[s]), s, e, int(hosts[s])

    def read_mapped(self, ext: Extent, buf: memoryview) -> None:
        """Blocks whose bytes the log replay changed: read them through the overlay."""
        bs = self.block_size
        pos = ext.start
        while pos < ext.end:
            block = pos // bs
            kinds, hosts = self.bat.window(block // BAT_WINDOW_BLOCKS)
            i = block % BAT_WINDOW_BLOCKS
            take = min(ext.end, (block + 1) * bs) - pos
            out = buf[pos - ext.start: pos - ext.start + take]
            if kinds[i] == ZERO:
                out[:] = bytes(take)
            else:
                out[:] = self._read_file(int(hosts[i]) + pos - block * bs, take, "payload block")
            pos += take

    # -- facts ------------------------------------------------------------------------------------------
    def format_specific(self) -> dict[str, Any]:
        return {
            "vhdx-type": "fixed" if self.leave_blocks_allocated else "dynamic",
            "block-size": self.block_size,
            "logical-sector-size": self.logical_sector_size,
            "physical-sector-size": self.physical_sector_size,
            "virtual-disk-id": self.virtual_disk_id,
            "log": {"replayed": self.log_entries_replayed > 0, "entries": self.log_entries_replayed},
            "creator": self.creator,
        }


def open_vhdx(source: Source) -> VhdxImage:
    return VhdxImage(source)
