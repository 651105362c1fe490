"""NTFS on-disk records: the boot sector, update-sequence fixups, MFT records, attributes and runlists.

The structures (offsets and magic numbers) follow the Linux-NTFS project's "NTFS Documentation" (Richard Russon
and Yuval Fledel: *Boot sector*, *File record*, *Attribute header*, *Data runs*, *$ATTRIBUTE_LIST*, *Update
sequence*) and Microsoft's [MS-FSCC] 2.1 (reparse tags) and its published ``FILE_RECORD_SEGMENT_HEADER`` /
``ATTRIBUTE_RECORD_HEADER`` layouts. :mod:`diskport.guest.filesystems.ntfs` builds the filesystem on these.

Written here because the one complete Python NTFS reader (dissect.ntfs) is AGPL-3.0 and libyal's libfsntfs is
LGPL C; neither can ship in an Apache-2.0 import service (see issue 11). Everything read is bounded: a record's
attributes must lie inside the record's bytes in use, a runlist's runs are counted and each cluster range is
checked against the volume, and a mismatched update-sequence number is corruption.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field

from diskport.errors import CorruptImage
from diskport.guest.view import Readable, read_exact

FMT = "ntfs"

#: Update-sequence stride: every 512 bytes of a multi-sector record ends with the sequence number.
FIXUP_STRIDE = 512
#: Runs one attribute may have over all its extents (a 150 MB hive in 4 KiB fragments is ~37,000).
MAX_RUNS = 1 << 17
#: Bytes of an $ATTRIBUTE_LIST (Windows caps it at 256 KiB).
MAX_ATTRIBUTE_LIST = 256 * 1024
#: Attributes one MFT record may hold (a 4 KiB record has room for ~170 of the smallest).
MAX_ATTRIBUTES_PER_RECORD = 512
#: Bytes of a resident value or a metadata stream read whole ($UpCase is 128 KiB).
MAX_RESIDENT = 64 * 1024

AT_STANDARD_INFORMATION = 0x10
AT_ATTRIBUTE_LIST = 0x20
AT_FILE_NAME = 0x30
AT_VOLUME_NAME = 0x60
AT_VOLUME_INFORMATION = 0x70
AT_DATA = 0x80
AT_INDEX_ROOT = 0x90
AT_INDEX_ALLOCATION = 0xA0
AT_BITMAP = 0xB0
AT_REPARSE_POINT = 0xC0
AT_END = 0xFFFFFFFF

ATTR_COMPRESSED = 0x0001
ATTR_ENCRYPTED = 0x4000
ATTR_SPARSE = 0x8000

MFT_IN_USE = 0x0001
MFT_DIRECTORY = 0x0002


def corrupt(message: str, name: str, offset: int | None = None) -> CorruptImage:
    return CorruptImage(message, path=name, fmt=FMT, offset=offset)


@dataclass(frozen=True)
class BootSector:
    """The BPB fields that locate everything else."""

    bytes_per_sector: int
    cluster_size: int
    total_sectors: int
    mft_lcn: int
    mftmirr_lcn: int
    record_size: int
    index_block_size: int
    serial: int

    @property
    def size(self) -> int:
        return self.total_sectors * self.bytes_per_sector

    @property
    def clusters(self) -> int:
        return self.size // self.cluster_size


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _record_size(code: int, cluster: int) -> int | None:
    """Decode the BPB's "clusters per record" byte: positive counts clusters, negative is ``2**-code`` bytes."""
    if code > 127:
        code -= 256
    if code < 0:
        return 1 << -code if -code <= 31 else None
    return code * cluster if code else None


def parse_boot_sector(data: bytes) -> BootSector | None:
    """The boot sector's geometry, or None when it is not a sane NTFS boot sector (as blkid decides)."""
    if len(data) < 512 or data[3:11] != b"NTFS    ":
        return None
    bps = struct.unpack_from("<H", data, 0x0B)[0]
    spc_code = data[0x0D]
    if not (256 <= bps <= 4096 and _power_of_two(bps)):
        return None
    if spc_code > 0x80:
        shift = 256 - spc_code
        if shift > 20:
            return None
        cluster = bps << shift  # the negative-exponent form: 2**-n sectors per cluster, for clusters > 64 KiB
    elif _power_of_two(spc_code):
        cluster = spc_code * bps
    else:
        return None
    if cluster < bps or cluster > 2 * 1024 * 1024:
        return None
    total, mft, mirr = struct.unpack_from("<QQQ", data, 0x28)
    record = _record_size(data[0x40], cluster)
    index = _record_size(data[0x44], cluster)
    if record is None or index is None:
        return None
    if not (_power_of_two(record) and 512 <= record <= 64 * 1024 and record >= bps):
        return None
    if not (_power_of_two(index) and 512 <= index <= 64 * 1024):
        return None
    clusters = total * bps // cluster
    if total == 0 or mft >= clusters or mirr >= clusters:
        return None
    serial = struct.unpack_from("<Q", data, 0x48)[0]
    return BootSector(bps, cluster, total, mft, mirr, record, index, serial)


def apply_fixups(buf: bytearray, magic: bytes, name: str, what: str) -> None:
    """Check and undo the update-sequence array of a FILE or INDX record in place."""
    if bytes(buf[:4]) != magic:
        raise corrupt(f"{what} does not start with {magic.decode()!r}", name)
    usa_off, usa_count = struct.unpack_from("<HH", buf, 4)
    sectors = len(buf) // FIXUP_STRIDE
    if usa_count != sectors + 1 or usa_off < 8 or usa_off % 2 or usa_off + 2 * usa_count > FIXUP_STRIDE - 2:
        raise corrupt(f"{what} has an update-sequence array of {usa_count} entries at {usa_off:#x}"
                      f" (expected {sectors + 1})", name)
    usn = buf[usa_off: usa_off + 2]
    for i in range(sectors):
        end = (i + 1) * FIXUP_STRIDE - 2
        if buf[end: end + 2] != usn:
            raise corrupt(f"{what}: update-sequence mismatch in its sector {i} (a torn or corrupt write)", name)
        buf[end: end + 2] = buf[usa_off + 2 + 2 * i: usa_off + 4 + 2 * i]


@dataclass(frozen=True)
class Run:
    vcn: int
    lcn: int | None  # None: sparse
    length: int


def decode_runlist(data: bytes, start_vcn: int, end_vcn: int, clusters: int, name: str, what: str,
                   budget: int = MAX_RUNS) -> list[Run]:
    """Mapping pairs into runs from ``start_vcn``; every run lies inside the volume's ``clusters``."""
    runs: list[Run] = []
    pos, vcn, lcn = 0, start_vcn, 0
    while True:
        if pos >= len(data):
            raise corrupt(f"{what}: runlist runs past its attribute", name)
        header = data[pos]
        if header == 0:
            break
        len_size, off_size = header & 0x0F, header >> 4
        if not 1 <= len_size <= 8 or off_size > 8 or pos + 1 + len_size + off_size > len(data):
            raise corrupt(f"{what}: malformed runlist header {header:#x}", name)
        length = int.from_bytes(data[pos + 1: pos + 1 + len_size], "little", signed=True)
        if length <= 0 or vcn + length > end_vcn + 1:
            raise corrupt(f"{what}: a run of {length} clusters at VCN {vcn} exceeds the attribute", name)
        if off_size:
            delta = int.from_bytes(data[pos + 1 + len_size: pos + 1 + len_size + off_size], "little", signed=True)
            lcn += delta
            if lcn < 0 or lcn + length > clusters:
                raise corrupt(f"{what}: a run of clusters {lcn}+{length} lies outside the volume"
                              f" ({clusters} clusters)", name)
            runs.append(Run(vcn, lcn, length))
        else:
            runs.append(Run(vcn, None, length))
        if len(runs) > budget:
            raise corrupt(f"{what}: more than {MAX_RUNS} runs", name)
        vcn += length
        pos += 1 + len_size + off_size
    return runs


@dataclass
class Attribute:
    """One attribute record (one extent of a non-resident attribute)."""

    type: int
    name: str
    flags: int
    resident: bool
    record: int                 # the MFT record holding it
    value: bytes = b""          # resident value
    lowest_vcn: int = 0
    highest_vcn: int = -1
    mapping: bytes = b""        # non-resident mapping pairs
    compression_unit: int = 0
    allocated_size: int = 0
    data_size: int = 0
    initialized_size: int = 0


@dataclass
class FileRecord:
    number: int
    sequence: int
    flags: int
    base: int                   # base record number (0 for a base record)
    links: int
    attributes: list[Attribute] = field(default_factory=list)


def _utf16(raw: bytes) -> str:
    return raw.decode("utf-16-le", "surrogatepass")


def parse_record(buf: bytearray, number: int, name: str) -> FileRecord:
    """A FILE record (fixups already applied) with its attribute headers, each bounded inside the record."""
    what = f"MFT record {number}"
    seq, links, attr_off, flags, used, alloc = struct.unpack_from("<HHHHII", buf, 0x10)
    base = struct.unpack_from("<Q", buf, 0x20)[0] & 0xFFFFFFFFFFFF
    if alloc != len(buf) or not 0x30 <= used <= len(buf) or not 0x18 <= attr_off < used or attr_off % 8:
        raise corrupt(f"{what}: header sizes are inconsistent (used {used}, allocated {alloc},"
                      f" attributes at {attr_off})", name)
    usa_off = struct.unpack_from("<H", buf, 4)[0]
    if usa_off >= 0x30 and struct.unpack_from("<I", buf, 0x2C)[0] != number & 0xFFFFFFFF:
        raise corrupt(f"{what} says it is record {struct.unpack_from('<I', buf, 0x2C)[0]}", name)
    rec = FileRecord(number, seq, flags, base, links)
    pos = attr_off
    while True:
        if pos + 4 > used:
            raise corrupt(f"{what}: attributes run past the bytes in use without an end marker", name)
        atype = struct.unpack_from("<I", buf, pos)[0]
        if atype == AT_END:
            break
        if pos + 0x18 > used:
            raise corrupt(f"{what}: attribute header at {pos:#x} runs past the record", name)
        length, nonres, name_len, name_off, aflags = struct.unpack_from("<IBBHH", buf, pos + 4)
        if length < 0x18 or length % 8 or pos + length > used:
            raise corrupt(f"{what}: attribute of type {atype:#x} at {pos:#x} has length {length}"
                          f" past the record ({used} bytes in use)", name)
        if name_len and (name_off + 2 * name_len > length):
            raise corrupt(f"{what}: attribute name lies outside its attribute", name)
        aname = _utf16(bytes(buf[pos + name_off: pos + name_off + 2 * name_len])) if name_len else ""
        if nonres > 1:
            raise corrupt(f"{what}: attribute {atype:#x} has a bad non-resident flag {nonres}", name)
        if not nonres:
            vlen, voff = struct.unpack_from("<IH", buf, pos + 0x10)
            if voff + vlen > length:
                raise corrupt(f"{what}: resident value of attribute {atype:#x} lies outside it", name)
            attr = Attribute(atype, aname, aflags, True, number, value=bytes(buf[pos + voff: pos + voff + vlen]))
        else:
            if length < 0x40:
                raise corrupt(f"{what}: non-resident attribute {atype:#x} is too short", name)
            low, high, map_off, cu = struct.unpack_from("<qqHB", buf, pos + 0x10)
            asize, dsize, isize = struct.unpack_from("<qqq", buf, pos + 0x28)
            if (not 0x40 <= map_off <= length or low < 0 or high < low - 1 or high >= 1 << 48
                    or min(asize, dsize, isize) < 0 or isize > dsize):
                raise corrupt(f"{what}: non-resident attribute {atype:#x} has inconsistent VCNs or sizes", name)
            attr = Attribute(atype, aname, aflags, False, number, lowest_vcn=low, highest_vcn=high,
                             mapping=bytes(buf[pos + map_off: pos + length]), compression_unit=cu,
                             allocated_size=asize, data_size=dsize, initialized_size=isize)
        rec.attributes.append(attr)
        if len(rec.attributes) > MAX_ATTRIBUTES_PER_RECORD:
            raise corrupt(f"{what}: more than {MAX_ATTRIBUTES_PER_RECORD} attributes", name)
        pos += length
    return rec


@dataclass(frozen=True)
class ListEntry:
    """One $ATTRIBUTE_LIST entry: which record holds which attribute (extent)."""

    type: int
    name: str
    lowest_vcn: int
    record: int
    sequence: int
    instance: int


def parse_attribute_list(data: bytes, name: str, what: str) -> list[ListEntry]:
    entries = []
    pos = 0
    while pos + 0x1A <= len(data):
        atype, length, name_len, name_off = struct.unpack_from("<IHBB", data, pos)
        if length == 0 and atype in (0, AT_END):
            break  # padding after the last entry
        low, ref, inst = struct.unpack_from("<QQH", data, pos + 8)
        if length < 0x1A or pos + length > len(data) or name_off + 2 * name_len > length:
            raise corrupt(f"{what}: attribute list entry at {pos:#x} has a bad length {length}", name)
        aname = _utf16(data[pos + name_off: pos + name_off + 2 * name_len]) if name_len else ""
        entries.append(ListEntry(atype, aname, low, ref & 0xFFFFFFFFFFFF, ref >> 48, inst))
        pos += length
    return entries


class RunReader:
    """A non-resident stream read at random: file offsets mapped through its runs to volume reads."""

    def __init__(self, volume: Readable, cluster: int, runs: list[Run], size: int, initialized: int,
                 name: str) -> None:
        self.volume = volume
        self.cluster = cluster
        self.runs = runs
        self.starts = [r.vcn for r in runs]
        self.size = size
        self.initialized = min(initialized, size)
        self.name = name

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"read {offset}+{length}")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        out = bytearray()
        pos = offset
        data_end = min(end, self.initialized)
        while pos < data_end:
            vcn = pos // self.cluster
            i = bisect.bisect_right(self.starts, vcn) - 1
            if i < 0 or vcn >= self.runs[i].vcn + self.runs[i].length:
                raise corrupt(f"{self.name}: no run maps byte {pos} of the stream", self.volume.name)
            run = self.runs[i]
            run_end = (run.vcn + run.length) * self.cluster
            n = min(data_end, run_end) - pos
            if run.lcn is None:
                out += bytes(n)
            else:
                at = run.lcn * self.cluster + (pos - run.vcn * self.cluster)
                out += read_exact(self.volume, at, n, f"{self.name} data", FMT)
            pos += n
        if end > pos:
            out += bytes(end - pos)  # past the initialized size reads as zeros
        return bytes(out)


class BytesReadable:
    """A resident value as a :class:`Readable`."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.size = len(data)
        self.name = name

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"read {offset}+{length}")
        return self.data[offset: offset + length]
