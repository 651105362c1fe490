"""The tar of a containerDisk layer: hand-made PAX headers for ``disk/`` and the one file ``disk/<name>``.

A KubeVirt containerDisk is an image ``FROM scratch`` whose single layer holds the directory ``disk/`` (mode 0555)
and the disk file ``disk/<name>`` (mode 0444), both owned by uid and gid 107 (the ``qemu`` user of virt-launcher).

The headers are written by hand rather than with :mod:`tarfile` (which can only copy a member from a file object
into a stream; see :mod:`diskport.oci.layer` for why the layer needs more). They are small and fixed (the
POSIX.1-2008 pax interchange format: ustar header blocks, and an extended header of typeflag ``x`` whose records
override ustar fields), which also keeps the bytes, and so the digests, independent of the Python version. Every
time field is the caller's ``mtime`` (``SOURCE_DATE_EPOCH`` or 0) and owners are numeric with empty names.

Layout of the layer tar (offsets in bytes)::

    0     ustar header  "disk/"       directory, 0555, 107:107
    512   ustar header  typeflag 'x'  extended header: ``size`` when the disk is 8 GiB or more (ustar's 11 octal
    1024  pax records                 digits stop just below 8 GiB), ``path`` for long or non-ASCII names, and a
                                      ``comment`` record that pads the records so the disk data starts at 4096
    3584  ustar header  "disk/<name>" regular file, 0444, 107:107
    4096  the disk's bytes, padded with zeros to a multiple of 512
    ...   two zero blocks (end of archive)

The length is known before anything is written (:func:`tar_size`), which lets a docker-archive place the layer
inside an outer tar whose header comes first.
"""

from __future__ import annotations

import unicodedata

from diskport.errors import UsageError

BLOCK = 512
#: The disk's bytes start at this offset of the tar (and at this alignment inside a docker-archive).
DATA_ALIGN = 4096
END_OF_ARCHIVE = bytes(2 * BLOCK)

DISK_DIR = "disk"
DISK_UID = DISK_GID = 107
DIR_MODE = 0o555
FILE_MODE = 0o444
#: Longest disk file name, in UTF-8 bytes (NAME_MAX of Linux filesystems).
MAX_NAME = 255

REGTYPE, DIRTYPE, PAXTYPE = b"0", b"5", b"x"
_OCTAL_LIMIT = {8: 8**7, 12: 8**11}  # values a NUL-terminated octal field of that width holds
MAX_MTIME = 8**11 - 1

def padded(size: int) -> int:
    """``size`` rounded up to whole 512-byte tar blocks."""
    return -(-size // BLOCK) * BLOCK


def check_disk_name(name: str) -> str:
    """The disk's file name inside ``disk/``: one path component a person can read; UsageError otherwise."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise UsageError(f"'{name}' cannot be the disk's file name in the image")
    if "/" in name or any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise UsageError(f"{name!r} cannot be the disk's file name in the image (no '/' or control characters)")
    if len(name.encode()) > MAX_NAME:
        raise UsageError(f"the disk's file name '{name[:40]}...' is longer than {MAX_NAME} bytes")
    return name


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def ustar_header(name: bytes, *, typeflag: bytes, size: int, mode: int, uid: int, gid: int, mtime: int) -> bytes:
    """One 512-byte ustar header (POSIX.1-2008, pax "ustar Interchange Format"). ``name`` must fit its 100
    bytes, and ``size``/``mtime`` their fields; larger values go in a pax record and are given here as 0."""
    if len(name) > 100:
        raise ValueError("ustar name longer than 100 bytes")
    head = b"".join((
        name.ljust(100, b"\0"), _octal(mode, 8), _octal(uid, 8), _octal(gid, 8), _octal(size, 12),
        _octal(mtime, 12), b" " * 8, typeflag, bytes(100), b"ustar\x0000", bytes(32 + 32 + 8 + 8 + 155),
    ))
    checksum = b"%06o\0 " % sum(head)
    return (head[:148] + checksum + head[156:]).ljust(BLOCK, b"\0")


def pax_record(key: str, value: str) -> bytes:
    """``"<length> <key>=<value>\\n"``, where length counts the whole record, its own digits included."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


_PAD_TEXT = "diskport pads this header so that the file's data starts on a 4096-byte boundary of the archive"


def _comment_record(length: int) -> bytes:
    """A pax ``comment`` record of exactly ``length`` bytes (at least 16): readers ignore comments."""
    digits = len(str(length))
    room = length - digits - len(" comment=\n")
    text = (_PAD_TEXT + " " * room)[:room] if room > 0 else ""
    record = f"{length} comment={text}\n".encode()
    if len(record) != length:  # a length on the edge of a digit count; never for the sizes used here
        raise ValueError(f"cannot make a comment record of {length} bytes")
    return record


def member_header(name: str, *, size: int, mode: int, uid: int, gid: int, mtime: int,
                  typeflag: bytes = REGTYPE, start: int = 0, align: int | None = None) -> bytes:
    """The header blocks of one member whose header begins at tar offset ``start`` (a multiple of 512).

    Values ustar cannot hold (a size of 8 GiB or more, a name longer than 100 bytes or not ASCII) go in a pax
    extended header. With ``align``, an extended header is always written and padded with a ``comment``
    record so that the member's data begins at a multiple of ``align`` (a multiple of 512) of the tar.
    """
    if start % BLOCK or (align is not None and align % BLOCK):
        raise ValueError("tar offsets are multiples of 512")
    if not 0 <= mtime <= MAX_MTIME:
        raise ValueError(f"mtime {mtime} does not fit a tar header")
    records = b""
    raw_name = name.encode()
    if len(raw_name) > 100 or not name.isascii():
        records += pax_record("path", name)
        raw_name = name.encode("ascii", "replace")[:100]
    ustar_size = size
    if size >= _OCTAL_LIMIT[12]:
        records += pax_record("size", str(size))
        ustar_size = 0
    member = ustar_header(raw_name, typeflag=typeflag, size=ustar_size, mode=mode, uid=uid, gid=gid, mtime=mtime)
    if align is None and not records:
        return member
    if align is None:
        pax_size = padded(len(records))
    else:
        pax_size = (-(start + 2 * BLOCK)) % align
        while pax_size < len(records) + 16:
            pax_size += align
        records += _comment_record(pax_size - len(records))
    extended = ustar_header(b"././@PaxHeader", typeflag=PAXTYPE, size=len(records), mode=0o644, uid=0, gid=0,
                            mtime=mtime)
    return extended + records.ljust(pax_size, b"\0") + member


def layer_header(name: str, disk_size: int, mtime: int) -> bytes:
    """Everything of the layer tar before the disk's bytes: ``disk/`` and the header of ``disk/<name>``."""
    check_disk_name(name)
    directory = member_header(f"{DISK_DIR}/", size=0, mode=DIR_MODE, uid=DISK_UID, gid=DISK_GID, mtime=mtime,
                              typeflag=DIRTYPE)
    return directory + member_header(f"{DISK_DIR}/{name}", size=disk_size, mode=FILE_MODE, uid=DISK_UID,
                                     gid=DISK_GID, mtime=mtime, start=len(directory), align=DATA_ALIGN)


def tar_size(disk_size: int, name: str) -> int:
    """The exact length of the uncompressed layer tar of a disk of ``disk_size`` bytes."""
    return len(layer_header(name, disk_size, 0)) + padded(disk_size) + len(END_OF_ARCHIVE)
