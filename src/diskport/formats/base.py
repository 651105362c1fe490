"""The contract between format readers and the engine.

A :class:`DiskImage` has a ``virtual_size`` and yields :class:`Extent` runs in guest order that cover
``[start, end)`` with no gap and no overlap. A DATA extent whose bytes lie contiguously in the source carries
``host`` (the source offset), so the engine reads it with one large positional read; other DATA extents
(compressed clusters, bitmapped sectors) are read through :meth:`DiskImage.read_mapped`.

**Malformed input is a CorruptImage, for every reader, decided here.** Readers check what they parse, but a
check a reader lacks lets bad bytes reach Python's own errors (``struct.error`` from a short buffer, an
``IndexError`` from a table index, ``OverflowError`` from a huge count...). :class:`DiskImage` wraps the entry
points of every subclass (``__init__``, which is the opening, ``_guest_runs``, ``extents`` and ``read_mapped``)
so that such an error leaves them as a :class:`~diskport.errors.CorruptImage` naming the file, the format and
what was being done, with the Python error quoted; a :class:`~diskport.errors.DiskportError` passes unchanged.
The cost is that a bug in a reader also shows as "malformed structure" rather than a traceback: the quoted
Python error says which, and the fuzz targets and mutation tests are what find them.
"""

from __future__ import annotations

import functools
import struct
import sys
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from diskport.errors import CorruptImage, DiskportError, UnsupportedImage
from diskport.sources.base import Source

if TYPE_CHECKING:
    from diskport.ova.package import OvaPackage


class Extent(NamedTuple):
    start: int
    length: int
    zero: bool
    host: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


def coalesce(runs: Iterable[Extent], *, merge_unmapped: bool = False) -> Iterator[Extent]:
    """Merge adjacent zero runs, and data runs that continue each other in the source.

    With ``merge_unmapped``, adjacent data runs without ``host`` merge too (for readers whose ``read_mapped``
    serves any range, such as qcow2's compressed clusters).
    """
    pending: Extent | None = None
    for ext in runs:
        if pending is None:
            pending = ext
        elif pending.zero and ext.zero:
            pending = Extent(pending.start, pending.length + ext.length, True, None)
        elif not pending.zero and not ext.zero and (
                (pending.host is not None and ext.host is not None and pending.host + pending.length == ext.host)
                or (merge_unmapped and pending.host is None and ext.host is None)):
            pending = Extent(pending.start, pending.length + ext.length, False, pending.host)
        else:
            yield pending
            pending = ext
    if pending is not None:
        yield pending


AccessKind = Literal["direct", "stream", "spooled"]


@dataclass
class Access:
    """How an image's bytes are read, and why.

    ``kind`` is what code tests: ``direct`` (random access in place), ``stream`` (read once, in order, straight
    from a decompressing or sequential source) or ``spooled`` (copied to scratch first). ``reason`` says why, and
    ``notes`` carry what was learnt on the way (an OVA's member and manifest). ``origin`` names where the disk
    was found before it was opened (a registry image's layer). ``str()`` is the one sentence users see, in
    messages and in the JSON ``access`` fields: ``origin; kind: reason; note; note``.
    """

    kind: AccessKind = "direct"
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    origin: str = ""

    def plain(self) -> bool:
        """Direct, with nothing more to say (the case the command line does not report)."""
        return self.kind == "direct" and not (self.reason or self.notes or self.origin)

    def with_note(self, note: str) -> Access:
        """A copy with ``note`` added last."""
        return replace(self, notes=[*self.notes, note])

    def __str__(self) -> str:
        how = f"{self.kind}: {self.reason}" if self.reason else self.kind
        return "; ".join([self.origin, how, *self.notes] if self.origin else [how, *self.notes])


#: Holes smaller than this are read as data: a filesystem's holes are at least a block anyway, and splitting
#: extents finer only costs calls.
MIN_HOLE = 4096


def file_runs(source: Source, start: int, stop: int, offset: int = 0) -> Iterator[Extent]:
    """Guest ``[start, stop)`` stored as the bytes of ``source`` from ``offset``: holes of a sparse file (of
    :data:`MIN_HOLE` or more) are zero extents, the rest data at its own place."""
    for pos, length, is_data in source.allocated_extents(offset + start, stop - start):
        zero = not is_data and length >= MIN_HOLE
        yield Extent(pos - offset, length, zero, None if zero else pos)


def uint_table(raw: bytes, typecode: str, byteorder: str) -> array[int]:
    """A table of unsigned ``byteorder`` integers (``typecode`` "I" for 32 bits, "Q" for 64) as an array of ints,
    in one C pass: what a reader's opener checks its tables with, so that opening needs no numpy. The bulk
    paths (mapping extents) take a numpy view of it (``np.frombuffer(table, dtype=np.uint64)``) when they run."""
    table = array(typecode, raw)
    if byteorder != sys.byteorder:
        table.byteswap()
    return table


def clip(ext: Extent, start: int, end: int) -> Extent | None:
    """The part of ``ext`` inside ``[start, end)``, or None."""
    s = max(ext.start, start)
    e = min(ext.end, end)
    if s >= e:
        return None
    host = None if ext.host is None else ext.host + (s - ext.start)
    return Extent(s, e - s, ext.zero, host)


#: What malformed bytes can make Python raise on the way to a check a reader lacks.
MALFORMED_ERRORS: tuple[type[BaseException], ...] = (
    struct.error, IndexError, KeyError, ValueError, ArithmeticError, zlib.error, MemoryError)
#: The reader methods guarded by :func:`_malformed_is_corrupt`, and what each is doing, for the message.
_GUARDED = {"__init__": "opening it", "_guest_runs": "mapping its guest extents",
            "extents": "mapping its guest extents", "read_mapped": "reading guest data"}


_CO_GENERATOR = 0x20


def _corrupt_from(image: DiskImage, args: tuple[Any, ...], doing: str, e: BaseException) -> CorruptImage:
    source = image.__dict__.get("source") or (args[0] if args else None)
    ext = args[0] if doing == "reading guest data" and args and isinstance(args[0], Extent) else None
    where = f" at {ext.start:#x}+{ext.length:#x}" if ext is not None else ""
    return CorruptImage(f"malformed structure found while {doing}{where} ({type(e).__name__}: {e})",
                        path=getattr(source, "name", None), fmt=getattr(image, "format", None))


def _malformed_is_corrupt(method: Callable[..., Any], doing: str) -> Callable[..., Any]:
    """``method`` with the Python errors of :data:`MALFORMED_ERRORS` raised as a CorruptImage."""
    if method.__code__.co_flags & _CO_GENERATOR:  # inspect.isgeneratorfunction, without importing inspect
        @functools.wraps(method)
        def runs(self: DiskImage, *args: Any, **kwargs: Any) -> Iterator[Extent]:
            try:
                yield from method(self, *args, **kwargs)
            except DiskportError:
                raise
            except MALFORMED_ERRORS as e:
                raise _corrupt_from(self, args, doing, e) from None
        guarded: Callable[..., Any] = runs
    else:
        @functools.wraps(method)
        def call(self: DiskImage, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except DiskportError:
                raise
            except MALFORMED_ERRORS as e:
                raise _corrupt_from(self, args, doing, e) from None
        guarded = call
    guarded.__dict__["malformed_is_corrupt"] = True
    return guarded


class DiskImage:
    """A disk image opened over a :class:`Source`.

    Subclasses set ``format``, ``virtual_size`` and ``cluster_size`` (the allocation unit, or None) and
    implement :meth:`extents`; those that yield DATA extents without ``host`` implement :meth:`read_mapped`.
    Their ``__init__``, ``_guest_runs``, ``extents`` and ``read_mapped`` are wrapped so that malformed input
    is a CorruptImage (see the module's docstring).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, doing in _GUARDED.items():
            method = cls.__dict__.get(name)
            if callable(method) and not method.__dict__.get("malformed_is_corrupt"):
                setattr(cls, name, _malformed_is_corrupt(method, doing))

    format: str = "raw"
    virtual_size: int = 0
    cluster_size: int | None = None
    #: False while the size is still being learned (a raw disk streaming out of gzip).
    size_known: bool = True

    def __init__(self, source: Source) -> None:
        self.source = source
        #: Compression layers the image was found inside, outermost first.
        self.compression: list[str] = []
        #: How the bytes are read, and why.
        self.access = Access()
        self._closers: list[Callable[[], None]] = []
        #: The file as the user named it, when ``source`` is a spooled copy of what is inside it.
        self.outer: Source | None = None
        #: Run after the last byte is written and before the destination is committed (an OVA's manifest).
        self.checks: list[Callable[[], None]] = []
        #: The appliance (OVA) this disk was found in, with its descriptor's facts.
        self.appliance: OvaPackage | None = None
        self.appliance_vm: str | None = None

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """Extents covering ``[start, min(end, virtual_size))`` in guest order: the reader's
        :meth:`_guest_runs`, coalesced. Readers that can only be read once, in order, override this."""
        stop = self.virtual_size if end is None else min(end, self.virtual_size)
        start = max(start, 0)
        if start < stop:
            yield from coalesce(self._guest_runs(start, stop), merge_unmapped=True)

    def _guest_runs(self, start: int, stop: int) -> Iterator[Extent]:
        """Uncoalesced extents over ``[start, stop)`` (both within the disk), in guest order."""
        raise NotImplementedError(f"{type(self).__name__} maps no extents")

    def read_mapped(self, ext: Extent, buf: memoryview) -> None:
        """Fill ``buf`` (exactly ``ext.length`` bytes) with the guest data of a DATA extent without host."""
        raise NotImplementedError(f"{type(self).__name__} yields no unmapped data extents")

    def read_extent(self, ext: Extent, buf: memoryview) -> None:
        """Fill ``buf`` (``ext.length`` bytes) with the guest bytes of ``ext``, whatever its kind."""
        if ext.zero:
            buf[:] = bytes(len(buf))
        elif ext.host is not None:
            n = self.source.readinto(ext.host, buf)
            if n != len(buf):
                raise CorruptImage(f"data at {ext.host:#x}+{len(buf):#x} lies beyond the end of the file",
                                   path=self.source.name, fmt=self.format)
        else:
            if len(buf) != ext.length or ext.start < 0 or (self.size_known and ext.end > self.virtual_size):
                raise ValueError(f"extent {ext.start:#x}+{ext.length:#x} does not fit the image or the buffer")
            self.read_mapped(ext, buf)

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Guest read of ``len(buf)`` bytes at ``offset``."""
        end = offset + len(buf)
        if offset < 0 or end > self.virtual_size:
            raise ValueError(f"read {offset:#x}+{len(buf):#x} outside the virtual size {self.virtual_size}")
        for ext in self.extents(offset, end):
            part = clip(ext, offset, end)
            if part is not None:
                self.read_extent(part, buf[part.start - offset: part.end - offset])

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def allocated_size(self) -> int | None:
        return (self.outer or self.source).allocated_bytes()

    def corrupt(self, message: str, offset: int | None = None, hint: str | None = None) -> CorruptImage:
        """The error for bad structure in this image, naming its file and format: ``raise self.corrupt(...)``."""
        return CorruptImage(message, path=self.source.name, fmt=self.format, offset=offset, hint=hint)

    def unsupported(self, message: str, offset: int | None = None, hint: str | None = None) -> UnsupportedImage:
        """The error for a valid feature this reader does not take, naming the file and format."""
        return UnsupportedImage(message, path=self.source.name, fmt=self.format, offset=offset, hint=hint)

    def data_in_other_files(self) -> bool:
        """Whether some of the disk's data lies in files beside this one (a VMDK descriptor's extents), so that
        the one file alone is not the disk."""
        return False

    def info(self) -> dict[str, Any]:
        """Facts for ``inspect``; keys follow ``qemu-img info --output=json`` where the fact is the same."""
        facts: dict[str, Any] = {
            "filename": self.source.name,
            "format": self.format,
            "virtual-size": self.virtual_size,
        }
        actual = self.allocated_size()
        if actual is not None:
            facts["actual-size"] = actual
        if self.cluster_size:
            facts["cluster-size"] = self.cluster_size
        specific = self.format_specific()
        if specific:
            facts["format-specific"] = {"type": self.format, "data": specific}
        facts["compression"] = list(self.compression)
        if self.appliance is not None:
            facts["ova"] = self.appliance.facts(self.appliance_vm)
        return facts

    def format_specific(self) -> dict[str, Any]:
        return {}

    def close_with(self, closer: Callable[[], None]) -> None:
        """Also call ``closer`` when the image closes (the compressed file under a spooled copy)."""
        self._closers.append(closer)

    def close(self) -> None:
        self.source.close()
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
