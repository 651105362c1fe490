"""Registry hives for the tests, written by hivex (``hivexregedit --merge``) and read back by hivex.

hivex cannot create a hive, only change one, so :func:`empty_hive` writes the smallest one hivex accepts by
hand: a base block (``regf``, version 1.5, root at 0x20, XOR checksum of its first 508 bytes), one 4 KiB hive bin
holding the root key node, the security cell hivex copies into every key it adds, and one free cell. Everything
else in these hives is hivex's doing: :func:`merge` feeds it a regedit file listing every parent key before its
children (hivexregedit adds one level at a time).

hivex writes only ``lh`` subkey lists and one plain cell per value however large, never an ``ri`` index or a
``db`` big-data cell (checked by :func:`cell_kinds`): :func:`rewrite_subkey_list` and :func:`make_big_data`
rewrite such parts of a hivex hive by hand, in a new hive bin appended to it, so the reader meets the
structures Windows writes; hivex reads both and stays the oracle.

:func:`software_hive` and :func:`system_hive` build the two hives Windows inspection reads, with the values
:mod:`diskport.guest.windows.facts` looks for.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.clients import require_tool

BASE = 4096
HBIN = 4096
NONE = 0xFFFFFFFF
SOFTWARE_PREFIX = "HKEY_LOCAL_MACHINE\\SOFTWARE"
SYSTEM_PREFIX = "HKEY_LOCAL_MACHINE\\SYSTEM"
REG_SZ, REG_EXPAND_SZ, REG_BINARY, REG_DWORD, REG_MULTI_SZ, REG_QWORD = 1, 2, 3, 4, 7, 11


@dataclass(frozen=True)
class Reg:
    """A typed value for :func:`reg_text`: ``data`` as the hive stores it (strings already UTF-16LE)."""

    type: int
    data: bytes


RegValue = str | int | bytes | Reg | list[str]


def sz(text: str) -> Reg:
    return Reg(REG_SZ, (text + "\0").encode("utf-16-le"))


def expand_sz(text: str) -> Reg:
    return Reg(REG_EXPAND_SZ, (text + "\0").encode("utf-16-le"))


def multi_sz(items: Sequence[str]) -> Reg:
    return Reg(REG_MULTI_SZ, "".join(i + "\0" for i in items).encode("utf-16-le") + b"\0\0")


def dword(n: int) -> Reg:
    return Reg(REG_DWORD, struct.pack("<I", n))


def qword(n: int) -> Reg:
    return Reg(REG_QWORD, struct.pack("<Q", n))


def binary(data: bytes) -> Reg:
    return Reg(REG_BINARY, data)


def checksum(base: bytes) -> int:
    """The base block's checksum: XOR of its first 127 little-endian words, 0 and -1 avoided."""
    x = 0
    for (w,) in struct.iter_unpack("<I", base[:508]):
        x ^= w
    return 1 if x == 0 else 0xFFFFFFFE if x == 0xFFFFFFFF else x


def reseal(path: Path) -> None:
    """Recompute the checksum of the base block of the hive at ``path`` (after a test changed it)."""
    with open(path, "r+b") as f:
        base = bytearray(f.read(512))
        struct.pack_into("<I", base, 508, checksum(bytes(base)))
        f.seek(0)
        f.write(base)


def empty_hive(path: Path, root_name: str = "ROOT") -> Path:
    """The smallest hive hivex opens and adds keys to (see the module docstring)."""
    name = root_name.encode("ascii")
    root_at, filetime = 0x20, 0x01D9_0000_0000_0000
    sk_at = root_at + ((4 + 76 + len(name) + 7) & ~7)
    # security descriptor: revision 1, control SE_SELF_RELATIVE, no owner, group, SACL or DACL
    descriptor = struct.pack("<BBHIIII", 1, 0, 0x8000, 0, 0, 0, 0)
    sk = struct.pack("<2sHIIII", b"sk", 0, sk_at, sk_at, 1, len(descriptor)) + descriptor
    sk_cell = struct.pack("<i", -((4 + len(sk) + 7) & ~7)) + sk
    sk_cell = sk_cell.ljust((len(sk_cell) + 7) & ~7, b"\0")
    nk = struct.pack("<2sHQIIIIIIIIIIIIIIIHH", b"nk", 0x2C, filetime, 0, NONE, 0, 0, NONE, NONE, 0, NONE, sk_at,
                     NONE, 0, 0, 0, 0, 0, len(name), 0) + name
    nk_cell = struct.pack("<i", -((4 + len(nk) + 7) & ~7)) + nk
    nk_cell = nk_cell.ljust((len(nk_cell) + 7) & ~7, b"\0")
    used = 0x20 + len(nk_cell) + len(sk_cell)
    free = struct.pack("<i", HBIN - used)
    hbin = struct.pack("<4sIIQQI", b"hbin", 0, HBIN, 0, filetime, 0) + nk_cell + sk_cell + free
    hbin = hbin.ljust(HBIN, b"\0")
    base = bytearray(BASE)
    struct.pack_into("<4sIIQIIIIIII", base, 0, b"regf", 1, 1, filetime, 1, 5, 0, 1, root_at, HBIN, 1)
    base[48:48 + 16] = "diskport".encode("utf-16-le")
    struct.pack_into("<I", base, 508, checksum(bytes(base)))
    path.write_bytes(bytes(base) + hbin)
    return path


def _reg_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _reg_value(value: RegValue) -> str:
    if isinstance(value, str):
        value = sz(value)
    elif isinstance(value, int):
        value = dword(int(value))
    elif isinstance(value, bytes):
        value = binary(value)
    elif isinstance(value, list):
        value = multi_sz(value)
    if value.type == REG_DWORD and len(value.data) == 4:
        return f"dword:{struct.unpack('<I', value.data)[0]:08x}"
    hexed = ",".join(f"{b:02x}" for b in value.data)
    return f"hex:{hexed}" if value.type == REG_BINARY else f"hex({value.type:x}):{hexed}"


def reg_text(prefix: str, keys: Mapping[str, Mapping[str, RegValue]]) -> str:
    """A regedit file setting ``keys`` (path below the hive -> value name -> value; "" is the default value),
    each missing parent listed before its children as hivexregedit needs."""
    lines = ["Windows Registry Editor Version 5.00", ""]
    done: set[str] = set()
    for path, values in keys.items():
        parts = [p for p in path.split("\\") if p]
        for depth in range(1, len(parts) + 1):
            sub = "\\".join(parts[:depth])
            if sub.lower() in done and depth < len(parts):
                continue
            done.add(sub.lower())
            lines.append(f"[{prefix}\\{sub}]")
            if depth == len(parts):
                for name, value in values.items():
                    label = "@" if name == "" else f'"{_reg_escape(name)}"'
                    lines.append(f"{label}={_reg_value(value)}")
            lines.append("")
    return "\n".join(lines) + "\n"


def merge(hive: Path, prefix: str, keys: Mapping[str, Mapping[str, RegValue]]) -> Path:
    """``hivexregedit --merge`` the keys into the hive."""
    reg = hive.with_name(hive.name + ".reg")
    reg.write_text(reg_text(prefix, keys), encoding="utf-8")
    subprocess.run([require_tool("hivexregedit"), "--merge", "--prefix", prefix, os.fspath(hive), os.fspath(reg)],
                   check=True, capture_output=True)
    reg.unlink()
    return hive


def build_hive(path: Path, prefix: str, keys: Mapping[str, Mapping[str, RegValue]]) -> Path:
    return merge(empty_hive(path), prefix, keys)


# --- the oracle ----------------------------------------------------------------------------------------------


def hivexsh(hive: Path, *commands: str) -> str:
    """Run hivexsh commands (one a line) on the hive; its output."""
    out = subprocess.run([require_tool("hivexsh"), os.fspath(hive)], input="\n".join(commands) + "\n",
                         check=True, capture_output=True, text=True, encoding="utf-8")
    return out.stdout


def hivex_subkeys(hive: Path, path: str) -> list[str]:
    """The names hivexsh ``ls`` lists under ``path`` (in the hive's order)."""
    return [line for line in hivexsh(hive, f"cd \\{path.strip(chr(92))}" if path.strip("\\") else "cd \\",
                                     "ls").splitlines() if line]


def hivexget(hive: Path, path: str, value: str | None = None) -> str:
    """``hivexget HIVE PATH [VALUE]`` (printing strings as text and numbers in decimal)."""
    args = [require_tool("hivexget"), os.fspath(hive), "\\" + path.strip("\\")] + ([value] if value is not None
                                                                                    else [])
    return subprocess.run(args, check=True, capture_output=True, text=True, encoding="utf-8").stdout


def export(hive: Path, path: str, prefix: str = "") -> str:
    """``hivexregedit --export`` of ``path``, recursively."""
    args = [require_tool("hivexregedit"), "--export"] + (["--prefix", prefix] if prefix else []) + [
        os.fspath(hive), "\\" + path.strip("\\")]
    raw = subprocess.run(args, check=True, capture_output=True).stdout
    return "\n".join(_perl_line(line) for line in raw.split(b"\n"))


def _perl_line(line: bytes) -> str:
    """Perl prints a string holding only Latin-1 characters as Latin-1 bytes and any other as UTF-8."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("latin-1")


def parse_export(text: str) -> dict[str, dict[str, tuple[int, bytes]]]:
    """An exported regedit file as key path -> value name ("" default) -> (type, data bytes)."""
    keys: dict[str, dict[str, tuple[int, bytes]]] = {}
    current: dict[str, tuple[int, bytes]] = {}
    lines = iter(text.replace("\\\n  ", "").splitlines())
    for line in lines:
        if line.startswith("[") and line.endswith("]"):
            current = keys.setdefault(line[1:-1].lstrip("\\"), {})
        elif "=" in line and (line.startswith('"') or line.startswith("@")):
            name, data = _split_value_line(line)
            current[name] = _parse_data(data)
    return keys


def _split_value_line(line: str) -> tuple[str, str]:
    if line.startswith("@="):
        return "", line[2:]
    i, out = 1, []
    while line[i] != '"':
        if line[i] == "\\":
            i += 1
        out.append(line[i])
        i += 1
    return "".join(out), line[i + 2:]


def _parse_data(data: str) -> tuple[int, bytes]:
    if data.startswith("dword:"):
        return REG_DWORD, struct.pack("<I", int(data[6:], 16))
    if data.startswith("hex:"):
        return REG_BINARY, _hex(data[4:])
    if data.startswith("hex("):
        kind, _, rest = data[4:].partition("):")
        return int(kind, 16), _hex(rest)
    if data.startswith('"'):
        return REG_SZ, (data[1:-1].replace('\\"', '"').replace("\\\\", "\\") + "\0").encode("utf-16-le")
    raise AssertionError(f"unknown exported value {data!r}")


def _hex(text: str) -> bytes:
    text = text.replace("\\", "").replace(" ", "").strip(",")
    return bytes(int(b, 16) for b in text.split(",")) if text else b""


# --- what the hive holds, read by hand (to say which structures hivex wrote) -------------------------------------


def cells(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(offset relative to the first bin, size, first bytes) of every allocated cell of the hive."""
    data = path.read_bytes()
    bins = struct.unpack_from("<I", data, 40)[0]
    page = 0
    while page < bins:
        assert data[BASE + page: BASE + page + 4] == b"hbin", page
        size = struct.unpack_from("<I", data, BASE + page + 8)[0]
        at = page + 0x20
        while at < page + size:
            (n,) = struct.unpack_from("<i", data, BASE + at)
            if n < 0:
                yield at, -n, data[BASE + at + 4: BASE + at + 12]
            at += abs(n)
        page += size


def cell_kinds(path: Path) -> dict[str, int]:
    """How many allocated cells of each signature (nk, vk, lh, lf, li, ri, db, sk) the hive holds."""
    kinds: dict[str, int] = {}
    for _at, _size, head in cells(path):
        sig = head[:2].decode("latin-1")
        if sig in ("nk", "vk", "lh", "lf", "li", "ri", "db", "sk"):
            kinds[sig] = kinds.get(sig, 0) + 1
    return kinds


# --- structures hivex does not write, added by hand ------------------------------------------------------------


class Appender:
    """New cells in one hive bin appended to the end of a hive; :meth:`close` writes the bin and reseals."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = bytearray(path.read_bytes())
        self.bins = struct.unpack_from("<I", self.data, 40)[0]
        self.cells: list[bytes] = []
        self.used = 0x20

    def add(self, body: bytes) -> int:
        """A new allocated cell holding ``body``; its offset relative to the first bin."""
        size = (4 + len(body) + 7) & ~7
        offset = self.bins + self.used
        self.cells.append(struct.pack("<i", -size) + body.ljust(size - 4, b"\0"))
        self.used += size
        return offset

    def poke(self, offset: int, fmt: str, *values: int) -> None:
        """Change bytes of an existing cell's data (``offset`` relative to the first bin, past the size)."""
        struct.pack_into(fmt, self.data, BASE + offset + 4, *values)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[BASE + offset + 4: BASE + offset + 4 + length])

    def close(self) -> None:
        size = -(-(self.used + 8) // HBIN) * HBIN
        body = b"".join(self.cells)
        hbin = struct.pack("<4sIIQQI", b"hbin", self.bins, size, 0, 0, 0) + body
        hbin += struct.pack("<i", size - len(hbin))
        hbin = hbin.ljust(size, b"\0")
        self.data[BASE + self.bins:] = hbin
        struct.pack_into("<I", self.data, 40, self.bins + size)
        struct.pack_into("<I", self.data, 508, checksum(bytes(self.data[:512])))
        self.path.write_bytes(bytes(self.data))


def find_key(path: Path, name: str) -> int:
    """The cell offset of the (first) key node named ``name`` (ASCII), found by scanning the cells."""
    data = path.read_bytes()
    for at, _size, head in cells(path):
        if head[:2] == b"nk":
            length = struct.unpack_from("<H", data, BASE + at + 4 + 72)[0]
            if data[BASE + at + 4 + 76: BASE + at + 4 + 76 + length] == name.encode("ascii"):
                return at
    raise AssertionError(f"no key {name} in {path}")


def find_value(path: Path, key: int, name: str) -> int:
    """The cell offset of the value ``name`` (ASCII) of the key node at ``key``."""
    data = path.read_bytes()
    nk = BASE + key + 4
    count, vlist = struct.unpack_from("<II", data, nk + 36)
    for (vk,) in struct.iter_unpack("<I", data[BASE + vlist + 4: BASE + vlist + 4 + 4 * count]):
        length = struct.unpack_from("<H", data, BASE + vk + 4 + 2)[0]
        if data[BASE + vk + 4 + 20: BASE + vk + 4 + 20 + length] == name.encode("ascii"):
            return int(vk)
    raise AssertionError(f"no value {name}")


def rewrite_subkey_list(path: Path, key_name: str, kind: str = "lh", pieces: int = 1) -> int:
    """Replace the ``lh`` list hivex wrote for key ``key_name`` by ``kind`` lists (``lh``, ``lf`` with name
    hints, or ``li`` with offsets only), split in order into ``pieces`` lists under an ``ri`` index when
    ``pieces`` > 1, as Windows splits a long list. Returns the new list's offset (the ri when there is one)."""
    key = find_key(path, key_name)
    hive = Appender(path)
    (sublist,) = struct.unpack_from("<I", hive.read(key, 32), 28)
    head = hive.read(sublist, 4)
    assert head[:2] == b"lh", head
    (count,) = struct.unpack_from("<H", head, 2)
    entries = [struct.unpack_from("<II", hive.read(sublist, 4 + 8 * count), 4 + 8 * i) for i in range(count)]

    def entry(nk: int, lh_hash: int) -> bytes:
        if kind == "li":
            return struct.pack("<I", nk)
        if kind == "lh":
            return struct.pack("<II", nk, lh_hash)
        length = struct.unpack_from("<H", hive.read(nk, 76), 72)[0]
        return struct.pack("<I", nk) + hive.read(nk, 76 + min(length, 4))[76:].ljust(4, b"\0")

    step = -(-count // pieces)
    lists = []
    for i in range(0, count, step):
        part = entries[i: i + step]
        lists.append(hive.add(struct.pack("<2sH", kind.encode(), len(part)) + b"".join(entry(*e) for e in part)))
    new = lists[0]
    if pieces > 1:
        new = hive.add(struct.pack("<2sH", b"ri", len(lists)) + b"".join(struct.pack("<I", x) for x in lists))
    struct.pack_into("<I", hive.data, BASE + key + 4 + 28, new)
    hive.close()
    return new


def make_big_data(path: Path, key_name: str, value_name: str, segment: int = 16344) -> int:
    """Move the data of a value into a ``db`` big-data cell of ``segment``-byte segments, as Windows stores a
    value larger than 16344 bytes in a version 1.4+ hive. Returns the db cell's offset."""
    key = find_key(path, key_name)
    vk = find_value(path, key, value_name)
    hive = Appender(path)
    size, data_at = struct.unpack_from("<II", hive.read(vk, 12), 4)
    assert not size & 0x80000000
    data = hive.read(data_at, size)
    segments = [hive.add(data[i: i + segment]) for i in range(0, size, segment)]
    seglist = hive.add(b"".join(struct.pack("<I", s) for s in segments))
    db = hive.add(struct.pack("<2sHI", b"db", len(segments), seglist))
    struct.pack_into("<I", hive.data, BASE + vk + 4 + 8, db)
    hive.close()
    return db


# --- the two hives inspection reads -----------------------------------------------------------------------------

CURRENT_VERSION = "Microsoft\\Windows NT\\CurrentVersion"


def software_hive(path: Path, *, product: str = "Windows 10 Pro", edition: str = "Professional",
                  installation_type: str = "Client", build: str = "22631", display_version: str = "23H2",
                  use_current_build: bool = False, pad_keys: int = 0, pad_value_bytes: int = 0) -> Path:
    """A SOFTWARE hive with ``CurrentVersion`` as Windows writes it (``CurrentBuild`` only, not
    ``CurrentBuildNumber``, when ``use_current_build``), and ``pad_keys`` keys of ``pad_value_bytes`` each under
    ``Classes`` to give it a realistic size."""
    current: dict[str, RegValue] = {
        "ProductName": product, "EditionID": edition, "InstallationType": installation_type,
        "CurrentBuild": build, "DisplayVersion": display_version, "CurrentVersion": "6.3",
        "CurrentMajorVersionNumber": 10, "CurrentMinorVersionNumber": 0,
        "SystemRoot": "C:\\Windows", "PathName": "C:\\Windows", "InstallDate": 1700000000,
        "DigitalProductId": bytes(range(164)),
    }
    if not use_current_build:
        current["CurrentBuildNumber"] = build
    keys: dict[str, Mapping[str, RegValue]] = {"Microsoft\\Windows\\CurrentVersion": {"ProgramFilesDir":
                                                                                       "C:\\Program Files"},
                                               CURRENT_VERSION: current}
    build_hive(path, SOFTWARE_PREFIX, keys)
    if pad_keys:
        pad_hive(path, SOFTWARE_PREFIX, "Classes", pad_keys, pad_value_bytes)
    return path


def pad_hive(path: Path, prefix: str, under: str, count: int, value_bytes: int, *, group: int = 100,
             batch: int = 5000) -> None:
    """``count`` keys ``under\\gNNN\\.extNNNNNN`` (``group`` to a folder; all in ``under`` itself when 0), each
    with a default value and, if ``value_bytes``, a binary one of that size, merged in batches.

    hivex writes a key's grown subkey list anew and leaves the old one as garbage, so n subkeys of one key cost
    about 4 n**2 bytes: grouping keeps a padded hive as compact as Windows keeps its own."""
    blob = bytes((i * 7) & 0xFF for i in range(value_bytes))
    for start in range(0, count, batch):
        keys: dict[str, Mapping[str, RegValue]] = {}
        for i in range(start, min(count, start + batch)):
            folder = f"{under}\\g{i // group:03d}" if group else under
            keys[f"{folder}\\.ext{i:06d}"] = {"": f"file{i}", "Data": blob} if value_bytes else {"": f"file{i}"}
        merge(path, prefix, keys)


def padded_key(under: str, i: int, group: int = 100) -> str:
    """The path :func:`pad_hive` gave its ``i``-th key."""
    return f"{under}\\g{i // group:03d}\\.ext{i:06d}" if group else f"{under}\\.ext{i:06d}"


def system_hive(path: Path, *, current: int = 2, drivers: Mapping[str, int | None] | None = None,
                hiberboot: int = 0, architecture: str = "AMD64", decoy: bool = True) -> Path:
    """A SYSTEM hive whose ``Select\\Current`` is ``current``: ``ControlSet{current:03d}`` holds the Services keys
    of ``drivers`` (name -> Start, None for no Start value), the architecture and HiberbootEnabled; the
    decoy control set (ControlSet001, or 002 when 001 is current) says the opposite of every one (all drivers
    boot-start, another architecture, Fast Startup flipped), so reading the wrong set fails the tests."""
    drivers = {"viostor": 0, "vioscsi": 0, "netkvm": 3} if drivers is None else drivers
    keys: dict[str, Mapping[str, RegValue]] = {
        "Select": {"Current": current, "Default": current, "Failed": 0, "LastKnownGood": current},
    }

    def control_set(n: int, real: bool) -> None:
        cs = f"ControlSet{n:03d}"
        keys[f"{cs}\\Control\\Session Manager\\Environment"] = {
            "PROCESSOR_ARCHITECTURE": architecture if real else "ARM64", "OS": "Windows_NT",
            "Path": expand_sz("%SystemRoot%\\system32;%SystemRoot%")}
        keys[f"{cs}\\Control\\Session Manager\\Power"] = {"HiberbootEnabled": hiberboot if real else 1 - hiberboot}
        keys[f"{cs}\\Services\\disk"] = {"Start": 0, "Type": 1, "ImagePath": expand_sz(
            "System32\\drivers\\disk.sys")}
        names = drivers if real else {"viostor": 0, "vioscsi": 0, "netkvm": 0}
        for name, start in names.items():
            if not real and name in drivers and drivers[name] == 0:
                continue   # the decoy differs only where it can
            values: dict[str, RegValue] = {"Type": 1, "ErrorControl": 1, "ImagePath": expand_sz(
                f"System32\\drivers\\{name}.sys"), "Group": "SCSI miniport" if name != "netkvm" else "NDIS"}
            if start is not None:
                values["Start"] = start
            keys[f"{cs}\\Services\\{name}"] = values

    control_set(current, True)
    if decoy:
        control_set(1 if current != 1 else 2, False)
    return build_hive(path, SYSTEM_PREFIX, keys)
