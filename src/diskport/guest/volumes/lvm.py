"""LVM2 volume groups and logical volumes, read from the physical volumes found on a disk.

On-disk facts (lvm2 ``lib/label/label.h``, ``lib/format_text/layout.h`` and ``format-text.c``; libyal's libvslvm
"Logical Volume Manager (LVM) format" describes the same), all little-endian:

* **PV label**: in one of sectors 0-3, "LABELONE", then ``sector_xl`` (u64, the sector it is in), ``crc_xl``
  (u32, LVM's CRC over bytes 20-511), ``offset_xl`` (u32, the PV header's offset from the label) and the type
  "LVM2 001" (identified by :mod:`diskport.guest.filesystems.lvm`).
* **PV header**: the PV UUID (32 characters), ``device_size_xl`` (u64 bytes), then two lists of ``disk_locn``
  (u64 offset, u64 size; bytes from the start of the PV), each ended by an all-zero entry: the data areas (the
  first's offset is where extents start) and the metadata areas.
* **Metadata area**: a 512-byte ``mda_header``: ``checksum_xl`` (u32, LVM's CRC over bytes 4-511), the magic
  ``" LVM2 x[5A%r0N*>"``, ``version`` (u32, 1), ``start`` (u64, the area's own offset), ``size`` (u64), then
  ``raw_locn`` entries (u64 offset from the area's start, u64 size, u32 checksum of the text, u32 flags; bit 0
  "ignored"), ended by a zero entry. The rest of the area is a circular buffer: a text running past its end
  continues at byte 512 of the area. The text is the VG in LVM's configuration language
  (:mod:`~diskport.guest.volumes.lvm_config`); its ``seqno`` counts commits. Of every copy found on every PV,
  the one with the highest seqno whose checksum is right and whose text parses is used; a bad copy is noted,
  not trusted.
* **VG metadata**: ``extent_size`` (sectors), ``physical_volumes`` (``pvN { id, pe_start, pe_count, dev_size
  }``; a PV of the disk is matched by its UUID, never by the device hint) and ``logical_volumes``, each with
  ``segmentN { start_extent, extent_count, type, ... }``. Type ``striped`` with ``stripe_count`` 1 is a linear
  segment (``stripes = ["pv0", first_pe]``), with more a striped one (``stripe_size`` sectors, the segment's
  extents spread evenly over the stripes). A stripe's bytes lie at ``pe_start + pe * extent_size`` of its PV.

An LV is read when every segment is linear or striped over PVs of this disk, each inside its PV. Others are
reported with their kind and not read: thin pools and thin volumes (their mapping is in the pool's B-tree
metadata), snapshots (a hidden COW volume holding exceptions, never a filesystem: reading it raw would misread it,
and a visible ``snapshotN`` definition naming it and its origin; reported under the COW volume's name, as
``lvs`` shows it), raid, mirror, cache, writecache, vdo, integrity. Hidden sub-volumes (``VISIBLE`` not in the status:
``_tdata``, ``_rimage_0``, ``_cdata``...) are not reported.

Written here because the one LVM reader in Python (libvslvm's bindings, LGPL) is not permissive, and because
``lvextend`` leaves several segments per LV that a reader must follow. Everything read is bounded: at most
:data:`MAX_MDA` metadata areas per PV, :data:`MAX_TEXT` bytes of text per copy, :data:`MAX_LVS` LVs and
:data:`MAX_SEGMENTS` segments per LV.
"""

from __future__ import annotations

import bisect
import re
import struct
import zlib
from dataclasses import dataclass, field

from diskport.errors import CorruptImage, DiskportError
from diskport.guest.filesystems.lvm import CRC_INIT, LABEL, LVM2, format_uuid
from diskport.guest.view import GuestView, Readable, read_exact
from diskport.guest.volumes.lvm_config import MAX_TEXT, Section, Value, parse_config

SECTOR = 512
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER = 512
RAW_LOCN_IGNORED = 1
#: Data and metadata areas listed in one PV header, and copies of the text in one area.
MAX_MDA = 8
MAX_LOCN = 8
MAX_LVS = 4096
MAX_SEGMENTS = 10_000
MAX_STRIPES = 128
_NAME = re.compile(r"[A-Za-z0-9_.+\-]{1,128}")

READ_KINDS = ("linear", "striped")


def lvm_crc(data: bytes, crc: int = CRC_INIT) -> int:
    """LVM's calc_crc, continued from ``crc`` (the standard CRC-32 table, no final inversion)."""
    return zlib.crc32(data, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


@dataclass(frozen=True)
class PvLabel:
    uuid: str                              # as LVM prints it, 6-4-4-4-4-4-6
    device_size: int
    data_areas: tuple[tuple[int, int], ...]
    metadata_areas: tuple[tuple[int, int], ...]


@dataclass
class PhysicalVolume:
    """A PV found on the disk: the volume holding it, its label, the metadata copies read from it."""

    where: str                             # "partition 3", for messages
    volume: GuestView
    label: PvLabel
    copies: list[tuple[int, str, Section]] = field(default_factory=list)  # (seqno, VG name, VG section)


@dataclass(frozen=True)
class Stripe:
    pv: str                                # the metadata's PV name, "pv0"
    first_pe: int


@dataclass(frozen=True)
class Segment:
    start_extent: int
    extent_count: int
    type: str                              # "striped", "thin-pool", "thin", "snapshot", "raid1", ...
    stripes: tuple[Stripe, ...] = ()
    stripe_size: int = 0                   # bytes, striped with more than one stripe

    @property
    def kind(self) -> str:
        if self.type == "striped":
            return "linear" if len(self.stripes) == 1 else "striped"
        return self.type


@dataclass
class LogicalVolume:
    vg: str
    name: str
    uuid: str | None
    visible: bool
    segments: list[Segment]
    size: int                              # bytes
    kind: str = "linear"                   # "linear", "striped", "thin", "thin-pool", "snapshot", "raid1", ...
    #: Why it is not read (a kind diskport does not map, a PV missing from the disk, a segment past its PV).
    problem: str | None = None
    origin: str | None = None              # a snapshot's origin LV
    pool: str | None = None                # a thin LV's pool

    @property
    def full_name(self) -> str:
        return f"{self.vg}/{self.name}"


@dataclass
class VolumeGroup:
    name: str
    uuid: str | None
    seqno: int
    extent_size: int                       # bytes
    pvs: dict[str, str]                    # metadata PV name -> PV UUID
    pe_start: dict[str, int]               # metadata PV name -> bytes
    pe_count: dict[str, int]
    lvs: list[LogicalVolume]
    found: dict[str, PhysicalVolume] = field(default_factory=dict)  # metadata PV name -> the PV on this disk

    def missing(self) -> list[str]:
        return sorted(name for name in self.pvs if name not in self.found)


# ---- the label and metadata areas ---------------------------------------------------------------------------
def read_label(volume: Readable) -> PvLabel | None:
    """The PV label and header, or None when the volume holds no valid LVM2 label."""
    if volume.size < 4 * SECTOR:
        return None
    head = volume.pread(0, 4 * SECTOR)
    for sector in range(4):
        raw = head[sector * SECTOR:(sector + 1) * SECTOR]
        if len(raw) < SECTOR or raw[:8] != LABEL:
            continue
        sector_xl, crc, offset = struct.unpack_from("<QII", raw, 8)
        if sector_xl != sector or raw[24:32] != LVM2 or lvm_crc(raw[20:]) != crc or not 32 <= offset <= 440:
            continue
        uuid = raw[offset:offset + 32]
        if not uuid.isascii() or not uuid.isalnum():
            continue
        (device_size,) = struct.unpack_from("<Q", raw, offset + 32)
        at = offset + 40
        lists: list[tuple[tuple[int, int], ...]] = []
        for _ in range(2):
            items: list[tuple[int, int]] = []
            while True:
                if at + 16 > SECTOR:
                    break
                off, size = struct.unpack_from("<QQ", raw, at)
                at += 16
                if off == 0:
                    break
                if len(items) < MAX_LOCN:
                    items.append((off, size))
            lists.append(tuple(items))
        return PvLabel(format_uuid(uuid.decode()), device_size, lists[0], lists[1])
    return None


def read_copies(volume: Readable, label: PvLabel, notes: list[str], where: str) -> list[tuple[int, str, Section]]:
    """Every valid metadata copy on the PV: ``(seqno, vg name, vg section)``; bad ones are noted."""
    out = []
    for mda_offset, _size in label.metadata_areas[:MAX_MDA]:
        try:
            header = read_exact(volume, mda_offset, MDA_HEADER, "LVM metadata area header", "LVM2")
        except CorruptImage as e:
            notes.append(f"{where}: {e.message}")
            continue
        if header[4:20] != MDA_MAGIC or lvm_crc(header[4:]) != struct.unpack_from("<I", header, 0)[0]:
            notes.append(f"{where}: the LVM metadata area at {mda_offset} has a bad header (magic or checksum)")
            continue
        version, start, size = struct.unpack_from("<IQQ", header, 20)
        if version != 1 or start != mda_offset or size <= MDA_HEADER or mda_offset + size > volume.size:
            notes.append(f"{where}: the LVM metadata area at {mda_offset} says version {version}, start {start}, "
                         f"size {size}")
            continue
        for i in range(MAX_LOCN):
            at = 40 + 24 * i
            off, length, checksum, flags = struct.unpack_from("<QQII", header, at)
            if off == 0:
                break
            if flags & RAW_LOCN_IGNORED:
                continue
            if not MDA_HEADER <= off < size or length == 0 or length > min(size - MDA_HEADER, MAX_TEXT):
                notes.append(f"{where}: an LVM metadata copy at {off}+{length} lies outside its area")
                continue
            first = min(length, size - off)
            text = read_exact(volume, mda_offset + off, first, "LVM metadata text", "LVM2")
            if first < length:
                text += read_exact(volume, mda_offset + MDA_HEADER, length - first, "LVM metadata text", "LVM2")
            if lvm_crc(text) != checksum:
                notes.append(f"{where}: an LVM metadata copy has a bad checksum (ignored)")
                continue
            try:
                config = parse_config(text.rstrip(b"\0").decode("utf-8", "surrogateescape"), volume.name)
            except CorruptImage as e:
                notes.append(f"{where}: an LVM metadata copy cannot be parsed (ignored): {e.message}")
                continue
            for name, value in config.items():
                if isinstance(value, dict) and "seqno" in value and "physical_volumes" in value:
                    seqno = value["seqno"]
                    if isinstance(seqno, int):
                        out.append((seqno, name, value))
                    break
            else:
                notes.append(f"{where}: an LVM metadata copy holds no volume group")
    return out


# ---- the VG from its metadata ------------------------------------------------------------------------------
def _get(section: Section, key: str, kind: type, where: str, path: str) -> Value:
    value = section.get(key)
    if value is None or not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptImage(f"LVM metadata of {where}: {key!r} is missing or not a {kind.__name__}", path=path,
                           fmt="LVM2")
    return value


def _int(section: Section, key: str, where: str, path: str, limit: int = 1 << 64) -> int:
    value = _get(section, key, int, where, path)
    assert isinstance(value, int)
    if not 0 <= value < limit:
        raise CorruptImage(f"LVM metadata of {where}: {key} = {value} is out of range", path=path, fmt="LVM2")
    return value


def parse_vg(name: str, vg: Section, seqno: int, path: str) -> VolumeGroup:
    """The VG a metadata section describes; structures that make no sense raise :class:`CorruptImage`."""
    extent_sectors = _int(vg, "extent_size", f"VG {name}", path, 1 << 32)
    if extent_sectors == 0:
        raise CorruptImage(f"LVM metadata of VG {name}: extent_size is 0", path=path, fmt="LVM2")
    extent = extent_sectors * SECTOR
    pvs_section = _get(vg, "physical_volumes", dict, f"VG {name}", path)
    assert isinstance(pvs_section, dict)
    pvs, pe_start, pe_count = {}, {}, {}
    for pv_name, pv in pvs_section.items():
        if not isinstance(pv, dict):
            continue
        uuid = pv.get("id")
        pvs[pv_name] = uuid if isinstance(uuid, str) else ""
        pe_start[pv_name] = _int(pv, "pe_start", f"PV {pv_name}", path, 1 << 55) * SECTOR
        pe_count[pv_name] = _int(pv, "pe_count", f"PV {pv_name}", path, 1 << 40)
    lvs: list[LogicalVolume] = []
    lvs_section = vg.get("logical_volumes", {})
    if not isinstance(lvs_section, dict):
        raise CorruptImage(f"LVM metadata of VG {name}: logical_volumes is not a section", path=path, fmt="LVM2")
    if len(lvs_section) > MAX_LVS:
        raise CorruptImage(f"VG {name} has {len(lvs_section)} logical volumes (more than {MAX_LVS})", path=path,
                           fmt="LVM2")
    for lv_name, lv in lvs_section.items():
        if isinstance(lv, dict):
            lvs.append(_parse_lv(name, lv_name, lv, extent, pvs, path))
    uuid = vg.get("id")
    group = VolumeGroup(name, uuid if isinstance(uuid, str) else None, seqno, extent, pvs, pe_start, pe_count, lvs)
    _classify(group)
    return group


def _parse_lv(vg: str, name: str, lv: Section, extent: int, pvs: dict[str, str], path: str) -> LogicalVolume:
    where = f"LV {vg}/{name}"
    status = lv.get("status", [])
    visible = isinstance(status, list) and "VISIBLE" in status
    segments: list[Segment] = []
    extra: dict[str, str] = {}
    seg_sections = [(k, v) for k, v in lv.items() if k.startswith("segment") and isinstance(v, dict)]
    if len(seg_sections) > MAX_SEGMENTS:
        raise CorruptImage(f"{where} has {len(seg_sections)} segments (more than {MAX_SEGMENTS})", path=path,
                           fmt="LVM2")
    for seg_name, seg_value in seg_sections:
        assert isinstance(seg_value, dict)
        seg = seg_value
        seg_where = f"{where} {seg_name}"
        start = _int(seg, "start_extent", seg_where, path, 1 << 40)
        count = _int(seg, "extent_count", seg_where, path, 1 << 40)
        seg_type = _get(seg, "type", str, seg_where, path)
        assert isinstance(seg_type, str)
        stripes: list[Stripe] = []
        stripe_size = 0
        if seg_type == "striped":
            raw = _get(seg, "stripes", list, seg_where, path)
            assert isinstance(raw, list)
            if not 2 <= len(raw) <= 2 * MAX_STRIPES or len(raw) % 2:
                raise CorruptImage(f"{seg_where} lists {len(raw)} stripe values", path=path, fmt="LVM2")
            for pv, pe in zip(raw[::2], raw[1::2], strict=True):
                if not isinstance(pv, str) or not isinstance(pe, int) or not 0 <= pe < 1 << 40:
                    raise CorruptImage(f"{seg_where} has a stripe that is not a PV name and an extent", path=path,
                                       fmt="LVM2")
                stripes.append(Stripe(pv, pe))
            if len(stripes) > 1:
                stripe_size = _int(seg, "stripe_size", seg_where, path, 1 << 32) * SECTOR
                if stripe_size == 0 or stripe_size > extent or extent % stripe_size or count % len(stripes):
                    raise CorruptImage(f"{seg_where}: stripe size {stripe_size} over {len(stripes)} stripes does "
                                       f"not divide {count} extents of {extent} bytes", path=path, fmt="LVM2")
        for key in ("origin", "cow_store", "thin_pool", "pool"):
            value = seg.get(key)
            if isinstance(value, str):
                extra[key] = value
        segments.append(Segment(start, count, seg_type, tuple(stripes), stripe_size))
    segments.sort(key=lambda s: s.start_extent)
    at = 0
    for piece in segments:
        if piece.start_extent != at:
            raise CorruptImage(f"{where}'s segments leave a gap or overlap at extent {at}", path=path, fmt="LVM2")
        at += piece.extent_count
    kinds = sorted({s.kind for s in segments})
    kind = "linear" if kinds == ["linear"] else ("striped" if set(kinds) <= set(READ_KINDS) else
                                                  "+".join(k for k in kinds if k not in READ_KINDS))
    volume = LogicalVolume(vg, name, lv["id"] if isinstance(lv.get("id"), str) else None,  # type: ignore[arg-type]
                           visible, segments, at * extent, kind or "empty")
    volume.origin = extra.get("origin")
    volume.pool = extra.get("thin_pool")
    if extra.get("cow_store"):
        volume.problem = f"cow:{extra['cow_store']}"  # resolved by _classify
    if not segments:
        volume.problem = "it has no segments"
    return volume


def _classify(group: VolumeGroup) -> None:
    """Mark what is not read and why: a snapshot's visible COW store, kinds that are not linear or striped."""
    by_name = {lv.name: lv for lv in group.lvs}
    for lv in group.lvs:
        if lv.problem and lv.problem.startswith("cow:"):  # a hidden "snapshotN" LV naming its COW store
            cow = by_name.get(lv.problem[4:])
            lv.problem = "the definition of a snapshot (LVM shows it as its COW volume)"
            if cow is not None:  # LVM writes the COW volume hidden and the definition visible; lvs shows the COW
                cow.visible, lv.visible = cow.visible or lv.visible, False
                cow.kind = "snapshot"
                cow.origin = lv.origin
                cow.problem = (f"a snapshot of {group.name}/{lv.origin}: its volume holds copy-on-write "
                               "exceptions, not a filesystem")
    for lv in group.lvs:
        if lv.problem is None and lv.kind not in READ_KINDS:
            lv.problem = f"a {lv.kind} volume, which diskport reports but does not read"
        for seg in lv.segments:
            for stripe in seg.stripes:
                if stripe.pv not in group.pvs and lv.problem is None:
                    lv.problem = f"segment at extent {seg.start_extent} names an unknown PV {stripe.pv!r}"


# ---- reading an LV ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Piece:
    start: int                             # byte in the LV
    length: int
    stripes: tuple[tuple[Readable, int], ...]  # (PV volume, byte where this segment's area starts on it)
    stripe_size: int                       # 0 when linear


class LvVolume:
    """A logical volume of several segments (or stripes) as one :class:`Readable`: offsets are mapped segment by
    segment onto the PVs' views (one linear segment is simply a :meth:`GuestView.slice`)."""

    def __init__(self, name: str, pieces: list[_Piece]) -> None:
        self.name = name
        self.pieces = pieces
        self.starts = [p.start for p in pieces]
        self.size = pieces[-1].start + pieces[-1].length if pieces else 0

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"read {offset}+{length}")
        end = min(offset + length, self.size)
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            piece = self.pieces[bisect.bisect_right(self.starts, pos) - 1]
            within = pos - piece.start
            span = min(end, piece.start + piece.length) - pos
            if not piece.stripe_size:
                pv, base = piece.stripes[0]
                parts.append(read_exact(pv, base + within, span, f"LV {self.name}", "LVM2"))
            else:
                chunk, at = divmod(within, piece.stripe_size)
                span = min(span, piece.stripe_size - at)
                row, column = divmod(chunk, len(piece.stripes))
                pv, base = piece.stripes[column]
                parts.append(read_exact(pv, base + row * piece.stripe_size + at, span, f"LV {self.name}", "LVM2"))
            pos += span
        return b"".join(parts)


def open_lv(group: VolumeGroup, lv: LogicalVolume) -> Readable:
    """The LV's bytes. Raises :class:`CorruptImage` when a segment lies outside its PV, or the LV is not
    readable (``lv.problem``)."""
    if lv.problem:
        raise CorruptImage(f"LV {lv.full_name} is not read: {lv.problem}", fmt="LVM2")
    pieces: list[_Piece] = []
    for seg in lv.segments:
        per_stripe = seg.extent_count // len(seg.stripes)
        stripes = []
        for stripe in seg.stripes:
            pv = group.found.get(stripe.pv)
            if pv is None:
                raise CorruptImage(f"LV {lv.full_name} lies partly on PV {group.pvs.get(stripe.pv)}, which is not "
                                   "on this disk", fmt="LVM2")
            if stripe.first_pe + per_stripe > group.pe_count[stripe.pv]:
                raise CorruptImage(f"LV {lv.full_name}: a segment runs to extent {stripe.first_pe + per_stripe} "
                                   f"of PV {stripe.pv}, which has {group.pe_count[stripe.pv]}", path=pv.volume.name,
                                   fmt="LVM2")
            base = group.pe_start[stripe.pv] + stripe.first_pe * group.extent_size
            if base + per_stripe * group.extent_size > pv.volume.size:
                raise CorruptImage(f"LV {lv.full_name}: a segment at {base}+{per_stripe * group.extent_size} lies "
                                   f"beyond its PV ({pv.where}, {pv.volume.size} bytes)", path=pv.volume.name,
                                   fmt="LVM2")
            stripes.append((pv.volume, base))
        pieces.append(_Piece(seg.start_extent * group.extent_size, seg.extent_count * group.extent_size,
                             tuple(stripes), seg.stripe_size))
    name = f"{pieces[0].stripes[0][0].name}:{lv.full_name}" if pieces else lv.full_name
    if len(pieces) == 1 and not pieces[0].stripe_size:
        pv_view, base = pieces[0].stripes[0]
        assert isinstance(pv_view, GuestView)
        return pv_view.slice(base, pieces[0].length, name=name)
    return LvVolume(name, pieces)


def assemble(pvs: list[PhysicalVolume], notes: list[str]) -> list[VolumeGroup]:
    """The VGs the disk's PVs make up, each from its newest valid metadata copy, its PVs matched by UUID."""
    by_uuid = {pv.label.uuid: pv for pv in pvs}
    newest: dict[str, tuple[int, str, Section]] = {}
    for pv in pvs:
        for seqno, name, section in pv.copies:
            key = section.get("id") if isinstance(section.get("id"), str) else name
            assert isinstance(key, str)
            if key not in newest or seqno > newest[key][0]:
                newest[key] = (seqno, name, section)
    groups = []
    for seqno, name, section in newest.values():
        path = next((pv.volume.name for pv in pvs), "")
        try:
            group = parse_vg(name, section, seqno, path)
        except DiskportError as e:
            notes.append(f"VG {name}: {e}")
            continue
        for pv_name, uuid in group.pvs.items():
            if uuid in by_uuid:
                group.found[pv_name] = by_uuid[uuid]
        for missing in group.missing():
            notes.append(f"VG {name}: PV {group.pvs[missing]} ({missing}) is not on this disk")
        stale = [pv for pv in group.found.values() if pv.copies and max(c[0] for c in pv.copies) < seqno]
        for pv in stale:
            notes.append(f"VG {name}: {pv.where} holds older metadata (seqno {max(c[0] for c in pv.copies)} < "
                         f"{seqno}); the newest is used")
        groups.append(group)
    return groups


def find_pv(volume: GuestView, where: str, notes: list[str]) -> PhysicalVolume | None:
    """The PV on ``volume`` with its metadata copies, or None when it has no LVM2 label."""
    label = read_label(volume)
    if label is None:
        return None
    pv = PhysicalVolume(where, volume, label)
    pv.copies = read_copies(volume, label, notes, where)
    return pv


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name))


__all__ = ["LogicalVolume", "LvVolume", "PhysicalVolume", "PvLabel", "Segment", "VolumeGroup", "assemble",
           "find_pv", "lvm_crc", "open_lv", "parse_vg", "read_copies", "read_label"]
