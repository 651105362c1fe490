"""VHDX log replay (2.3): finding the active sequence of the circular log and replaying it into an in-memory
:class:`Overlay` of 4 KiB file sectors and zeroed ranges (the file itself is never written)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import google_crc32c

from diskport.errors import CorruptImage, UnsupportedImage
from diskport.formats.base import DiskImage
from diskport.formats.vhdx.spec import (
    DATA_DESCRIPTOR_SIGNATURE,
    DATA_SECTOR_SIGNATURE,
    DESCRIPTOR_FIELDS,
    DESCRIPTOR_SIZE,
    FMT,
    HEADER_SECTION_SIZE,
    LOG_ENTRY_HEADER,
    LOG_ENTRY_SIGNATURE,
    LOG_READ_CHUNK,
    LOG_SECTOR,
    MAX_DESCRIPTORS_PER_ENTRY,
    MAX_FILE_OFFSET,
    MAX_LOG_LENGTH,
    MAX_OVERLAY_BYTES,
    MAX_ZERO_RANGES,
    STRUCTURE_ALIGNMENT,
    ZERO_DESCRIPTOR_SIGNATURE,
    ZERO_GUID,
    Header,
    LogEntryHeader,
    MiB,
    Region,
)
from diskport.sources.base import Source

if TYPE_CHECKING:
    import numpy as np

# numpy is imported by the log search and replay, which run only for an image whose log must be replayed.


@dataclass(frozen=True)
class LogEntry:
    """A log entry whose header, checksum, descriptors and data sectors are valid (2.3.1)."""

    position: int  # byte offset inside the log
    length: int
    sequence: int
    tail: int
    descriptor_count: int
    flushed_file_offset: int
    last_file_offset: int


class Overlay:
    """What the replayed log wrote: whole 4 KiB file sectors and zeroed ranges, kept disjoint."""

    def __init__(self) -> None:
        self.sectors: dict[int, bytes] = {}
        self.zero_starts: list[int] = []
        self.zero_ends: list[int] = []

    def write_sector(self, offset: int, data: bytes) -> None:
        self._unzero(offset, offset + LOG_SECTOR)
        self.sectors[offset] = data

    def write_zeros(self, start: int, end: int) -> None:
        if end <= start:
            return
        if (end - start) // LOG_SECTOR <= len(self.sectors):
            for offset in range(start, end, LOG_SECTOR):
                self.sectors.pop(offset, None)
        else:
            for offset in [o for o in self.sectors if start <= o < end]:
                del self.sectors[offset]
        first = bisect.bisect_left(self.zero_ends, start)
        last = bisect.bisect_right(self.zero_starts, end)
        if first < last:
            start = min(start, self.zero_starts[first])
            end = max(end, self.zero_ends[last - 1])
        self.zero_starts[first:last] = [start]
        self.zero_ends[first:last] = [end]

    def _unzero(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self.zero_ends, start)
        while i < len(self.zero_starts) and self.zero_starts[i] < end:
            zs, ze = self.zero_starts[i], self.zero_ends[i]
            pieces = [(s, e) for s, e in ((zs, start), (end, ze)) if s < e]
            self.zero_starts[i: i + 1] = [s for s, _ in pieces]
            self.zero_ends[i: i + 1] = [e for _, e in pieces]
            i += len(pieces)

    def apply(self, offset: int, buf: bytearray) -> None:
        """Lay the overlay over ``buf``, which holds the file's bytes from ``offset``."""
        end = offset + len(buf)
        i = bisect.bisect_right(self.zero_ends, offset)
        while i < len(self.zero_starts) and self.zero_starts[i] < end:
            s, e = max(self.zero_starts[i], offset), min(self.zero_ends[i], end)
            buf[s - offset: e - offset] = bytes(e - s)
            i += 1
        if not self.sectors:
            return
        first = offset - offset % LOG_SECTOR
        if (end - first) // LOG_SECTOR <= len(self.sectors):
            candidates: list[int] = list(range(first, end, LOG_SECTOR))
        else:
            candidates = [o for o in self.sectors if first <= o < end]
        for sector in candidates:
            data = self.sectors.get(sector)
            if data is None:
                continue
            s, e = max(sector, offset), min(sector + LOG_SECTOR, end)
            buf[s - offset: e - offset] = data[s - sector: e - sector]

    def segments(self, source_size: int, file_end: int) -> list[tuple[int, int, bool]]:
        """(start, end, is_zero) file ranges that are not plain source bytes, sorted and disjoint.

        Sector ranges (is_zero False) hold replayed data; zero ranges are what the log zeroed plus
        everything from the source's end to ``file_end`` that no replayed sector covers.
        """
        sector_runs = merge([(o, o + LOG_SECTOR) for o in sorted(self.sectors)])
        zero_runs = merge(sorted([*zip(self.zero_starts, self.zero_ends, strict=True),
                                   (source_size, max(source_size, file_end))]))
        zero_runs = subtract(zero_runs, sector_runs)
        return sorted([(a, b, True) for a, b in zero_runs if a < b] + [(a, b, False) for a, b in sector_runs])


def merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans joined where they touch or overlap."""
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        elif a < b:
            merged.append((a, b))
    return merged


def subtract(spans: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted disjoint ``spans`` minus sorted disjoint ``holes``."""
    out: list[tuple[int, int]] = []
    h = 0
    for a, b in spans:
        while h < len(holes) and holes[h][1] <= a:
            h += 1
        k = h
        while k < len(holes) and holes[k][0] < b:
            if holes[k][0] > a:
                out.append((a, holes[k][0]))
            a = max(a, holes[k][1])
            k += 1
        if a < b:
            out.append((a, b))
    return out



class LogReader:
    """Finds the active sequence of a circular log (2.3.3) and replays its entries into an overlay."""

    def __init__(self, source: Source, region: Region, log_guid: bytes) -> None:
        self.source = source
        self.region = region
        self.log_guid = log_guid
        # Entries in a sane log do not overlap, so checksumming reads about the log once; stale or hostile
        # headers claiming long, overlapping entries must not turn the search quadratic.
        self.checksum_budget = 8 * region.length + 64 * MiB

    def _read(self, position: int, length: int) -> bytes:
        """``length`` log bytes from ``position``, wrapping at the end of the circular log."""
        position %= self.region.length
        first = min(length, self.region.length - position)
        data = self.source.read_exact(self.region.offset + position, first, "log", FMT)
        if first < length:
            data += self.source.read_exact(self.region.offset, length - first, "log", FMT)
        return data

    def _candidates(self) -> list[int]:
        """Log positions whose sector starts like an entry header for this log."""
        import numpy as np

        found: list[int] = []
        signature = np.frombuffer(LOG_ENTRY_SIGNATURE, dtype=np.uint8)
        guid = np.frombuffer(self.log_guid, dtype=np.uint8)
        for chunk_at in range(0, self.region.length, LOG_READ_CHUNK):
            size = min(LOG_READ_CHUNK, self.region.length - chunk_at)
            sectors = np.frombuffer(self._read(chunk_at, size), dtype=np.uint8).reshape(-1, LOG_SECTOR)
            match = np.all(sectors[:, 0:4] == signature, axis=1) & np.all(sectors[:, 32:48] == guid, axis=1)
            found.extend((chunk_at + LOG_SECTOR * np.flatnonzero(match)).tolist())
        return found

    def _descriptors(self, position: int, count: int) -> tuple[np.ndarray, bytes]:
        import numpy as np

        raw = self._read(position + LOG_ENTRY_HEADER.size, count * DESCRIPTOR_SIZE)
        return np.frombuffer(raw, dtype=np.dtype(DESCRIPTOR_FIELDS)), raw

    @staticmethod
    def _descriptor_sectors(count: int) -> int:
        """Sectors holding the entry header and ``count`` descriptors (2.3.1: 64 + 32 * count bytes)."""
        return -(-(LOG_ENTRY_HEADER.size + DESCRIPTOR_SIZE * count) // LOG_SECTOR)

    def _entry(self, position: int) -> LogEntry | None:
        """The entry at ``position`` if it is valid (2.3.1), else None."""
        header = LogEntryHeader.unpack(self._read(position, LOG_ENTRY_HEADER.size))
        length, tail, sequence, count = header.length, header.tail, header.sequence, header.descriptor_count
        if (header.signature != LOG_ENTRY_SIGNATURE or header.log_guid != self.log_guid or sequence == 0
                or length % LOG_SECTOR or not LOG_SECTOR <= length <= self.region.length
                or tail % LOG_SECTOR or tail >= self.region.length):
            return None
        desc_sectors = self._descriptor_sectors(count)
        if desc_sectors * LOG_SECTOR > length:
            return None
        if count > MAX_DESCRIPTORS_PER_ENTRY:
            raise UnsupportedImage(f"log entry at {position:#x} has {count} descriptors, more than the "
                                   f"{MAX_DESCRIPTORS_PER_ENTRY} diskport replays", path=self.source.name,
                                   fmt=FMT)
        import numpy as np

        descriptors, _ = self._descriptors(position, count)
        is_data = descriptors["signature"] == DATA_DESCRIPTOR_SIGNATURE
        is_zero = descriptors["signature"] == ZERO_DESCRIPTOR_SIGNATURE
        if not np.all((is_data | is_zero)
                      & (descriptors["sequence"] == sequence)
                      & (descriptors["file_offset"] % LOG_SECTOR == 0)
                      & (~is_zero | (descriptors["leading_or_length"] % LOG_SECTOR == 0))):
            return None
        data_sectors = int(np.count_nonzero(is_data))
        if (desc_sectors + data_sectors) * LOG_SECTOR > length:
            return None
        # The checksum covers the whole entry with its checksum field zero; data sectors carry the
        # entry's sequence number split in two halves (2.3.1.4).
        self.checksum_budget -= length
        if self.checksum_budget < 0:
            raise UnsupportedImage("the log holds too many overlapping entries to search", path=self.source.name,
                                   fmt=FMT, hint="replay the log with Hyper-V or 'qemu-img check -r all' first")
        crc = 0
        high = np.uint32(sequence >> 32)
        low = np.uint32(sequence & 0xFFFFFFFF)
        for done in range(0, length, LOG_READ_CHUNK):
            chunk = self._read(position + done, min(LOG_READ_CHUNK, length - done))
            if done == 0:
                chunk = chunk[:4] + bytes(4) + chunk[8:]
            crc = google_crc32c.extend(crc, chunk)
            first_sector = done // LOG_SECTOR
            lo = max(desc_sectors - first_sector, 0)
            hi = min(desc_sectors + data_sectors - first_sector, len(chunk) // LOG_SECTOR)
            if lo < hi:
                sectors = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, LOG_SECTOR)[lo:hi]
                words = np.ascontiguousarray(sectors[:, [*range(0, 8), *range(4092, 4096)]]).view("<u4")
                if not (np.all(words[:, 0] == int.from_bytes(DATA_SECTOR_SIGNATURE, "little"))
                        and np.all(words[:, 1] == high) and np.all(words[:, 2] == low)):
                    return None
        if crc != header.checksum:
            return None
        return LogEntry(position, length, sequence, tail, count, header.flushed_file_offset,
                        header.last_file_offset)

    def active_sequence(self) -> list[LogEntry]:
        """The entries of the active sequence, tail first; empty when the log holds none (2.3.3)."""
        entries: dict[int, LogEntry] = {}
        for position in self._candidates():
            entry = self._entry(position)
            if entry is not None:
                entries[position] = entry
        log_length = self.region.length
        successor: dict[int, int] = {}
        for position, entry in entries.items():
            after = (position + entry.length) % log_length
            follower = entries.get(after)
            if follower is not None and follower.sequence == entry.sequence + 1:
                successor[position] = after
        # A sequence runs as far as valid entries follow one another; its last entry is its head. Try heads
        # from the highest sequence number down: the first whose Tail lies in its own sequence is active.
        heads = [e for e in entries.values() if e.position not in successor]
        budget = 4 * len(entries) + 64
        for head in sorted(heads, key=lambda e: e.sequence, reverse=True):
            tail = entries.get(head.tail)
            if tail is None or tail.sequence > head.sequence:
                continue
            chain = [tail]
            position = tail.position
            while position != head.position and len(chain) <= head.sequence - tail.sequence:
                budget -= 1
                if budget < 0:
                    raise UnsupportedImage("the log holds too many overlapping sequences to find the active "
                                           "one", path=self.source.name, fmt=FMT)
                next_position = successor.get(position)
                if next_position is None:
                    break
                position = next_position
                chain.append(entries[position])
            if position == head.position:
                return chain
        return []

    def replay(self, entry: LogEntry, overlay: Overlay) -> int:
        """Apply one entry's descriptors to the overlay; returns the file end its writes reach."""
        descriptors, raw = self._descriptors(entry.position, entry.descriptor_count)
        data_position = entry.position + self._descriptor_sectors(entry.descriptor_count) * LOG_SECTOR
        reach = 0
        for i, descriptor in enumerate(descriptors):
            target = int(descriptor["file_offset"])
            if descriptor["signature"] == DATA_DESCRIPTOR_SIGNATURE:
                sector = self._read(data_position, LOG_SECTOR)
                data_position += LOG_SECTOR
                at = i * DESCRIPTOR_SIZE
                # The descriptor keeps the sector's first 8 and last 4 bytes (2.3.1.3, 2.3.1.4).
                overlay.write_sector(target, raw[at + 8: at + 16] + sector[8:4092] + raw[at + 4: at + 8])
                end = target + LOG_SECTOR
                if len(overlay.sectors) * LOG_SECTOR > MAX_OVERLAY_BYTES:
                    raise UnsupportedImage(f"replaying the log needs more than {MAX_OVERLAY_BYTES // MiB} MiB "
                                           "of memory", path=self.source.name, fmt=FMT,
                                           hint="replay the log with Hyper-V or 'qemu-img check -r all' first")
            else:
                end = target + int(descriptor["leading_or_length"])
                if end > MAX_FILE_OFFSET:
                    raise CorruptImage(f"log zeroes up to file offset {end}, which is implausible",
                                       path=self.source.name, fmt=FMT)
                overlay.write_zeros(target, end)
                if len(overlay.zero_starts) > MAX_ZERO_RANGES:
                    raise UnsupportedImage(f"replaying the log needs more than {MAX_ZERO_RANGES} zero ranges",
                                           path=self.source.name, fmt=FMT)
            reach = max(reach, end)
        return reach


@dataclass(frozen=True)
class Replayed:
    """What replaying the log left: the log region (if the file has one), the overlay (if anything was
    replayed), the file size the log implies and the number of entries replayed."""

    log: Region | None
    overlay: Overlay | None
    file_size: int
    entries: int


def replay_log(image: DiskImage, header: Header) -> Replayed:
    """Replay the active log sequence of ``header`` into an overlay (2.3.3); the source is never written."""
    source = image.source
    if header.log_length == 0:
        if header.log_guid != ZERO_GUID:
            raise image.corrupt("header names a log (non-zero LogGuid) but the log length is 0")
        return Replayed(None, None, source.size, 0)
    log = Region(header.log_offset, header.log_length)
    if log.offset % STRUCTURE_ALIGNMENT or log.offset < HEADER_SECTION_SIZE:
        raise image.corrupt(f"log offset {log.offset:#x} is not a multiple of 1 MiB past the header section")
    if log.length % STRUCTURE_ALIGNMENT:
        raise image.corrupt(f"log length {log.length} is not a multiple of 1 MiB")
    if log.end > source.size:
        raise image.corrupt(f"log at {log.offset:#x}+{log.length:#x} lies beyond the end of the file "
                            f"({source.size} bytes)")
    if header.log_guid == ZERO_GUID:
        return Replayed(log, None, source.size, 0)
    if log.length > MAX_LOG_LENGTH:
        raise image.unsupported(f"log of {log.length} bytes exceeds the {MAX_LOG_LENGTH} byte limit",
                                hint="replay the log with Hyper-V or 'qemu-img check -r all' first")
    reader = LogReader(source, log, header.log_guid)
    sequence = reader.active_sequence()
    if not sequence:
        return Replayed(log, None, source.size, 0)
    flushed = sequence[-1].flushed_file_offset
    if flushed > source.size:
        raise image.corrupt(f"the log says the file was at least {flushed} bytes long but it is "
                            f"{source.size}: the file was truncated")
    overlay = Overlay()
    file_end = max(source.size, sequence[-1].last_file_offset)
    for entry in sequence:
        file_end = max(file_end, reader.replay(entry, overlay))
    if file_end > MAX_FILE_OFFSET:
        raise image.corrupt(f"the log extends the file to {file_end} bytes, which is implausible")
    return Replayed(log, overlay, file_end, len(sequence))
