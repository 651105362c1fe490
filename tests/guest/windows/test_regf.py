"""The regf reader against hivex (hivexsh, hivexget, ``hivexregedit --export``) on the same hives.

Hives are written by hivex itself (tests/guest/windows/hives.py); the ``ri``, ``lf``, ``li`` and ``db`` structures
that hivex never writes are rewritten by hand there, and hivex still reads them back as the oracle. Hostile
hives are hivex's hives with one field changed; each must be refused with one CorruptImage line, reading only a
few pages (counted by :class:`Counted`, so boundedness is asserted without timing anything).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from diskport.errors import CorruptImage, DiskportError, UnsupportedImage
from diskport.guest.windows import regf
from diskport.guest.windows.regf import Hive, Key
from tests.guest.windows import hives as H

PREFIX = "HKEY_LOCAL_MACHINE\\TEST"
MANY = 1500
BIG = bytes((i * 31 + i // 251) & 0xFF for i in range(40000))


class Counted:
    """A hive file read at random, counting the reads and bytes (a :class:`~diskport.guest.view.Readable`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = os.fspath(path)
        self.size = path.stat().st_size
        self.reads = 0
        self.bytes_read = 0

    def pread(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        self.reads += 1
        self.bytes_read += len(data)
        return data


def walk(key: Key, path: str = "") -> dict[str, dict[str, tuple[int, bytes]]]:
    """Every key below ``key`` as path -> value name -> (type, data), the shape of hives.parse_export."""
    out = {path: {v.name: (v.type, v.data) for v in key.values()}}
    for sub in key.subkeys():
        out.update(walk(sub, f"{path}\\{sub.name}" if path else sub.name))
    return out


VALUES: dict[str, H.RegValue] = {
    "": "the default value",
    "Sz": "C:\\Program Files\\Ünïcødé 日本語",
    "Expand": H.expand_sz("%SystemRoot%\\system32"),
    "Multi": ["first", "second", "dritte Zeichenkette"],
    "EmptyMulti": H.multi_sz([]),
    "Dword": 0xDEADBEEF,
    "Qword": H.qword(0x0123456789ABCDEF),
    "Binary": bytes(range(256)) * 3,
    "Tiny": b"\x01\x02",              # resident in the value cell's offset field (<= 4 bytes)
    "Empty": b"",
    "Big": BIG,                       # > 16344 bytes
    "Wert mit Ümlaut": 7,
    "値": "non-ASCII value name",
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("regf") / "sample.hive"
    H.build_hive(path, PREFIX, {
        "Software\\Vendor\\Product": VALUES,
        "Software\\Ünïcødé\\日本語": {"Name": "unicode key"},
        "Software\\Short": {"A": 1},
        "Empty": {},
    })
    return path


def test_every_key_and_value_matches_hivex_export(sample: Path) -> None:
    ours = walk(Hive(Counted(sample)).root)
    theirs = H.parse_export(H.export(sample, "\\"))
    assert ours.keys() == theirs.keys()
    assert ours == theirs
    product = ours["Software\\Vendor\\Product"]
    assert set(product) == set(VALUES)   # the oracle and the test agree on what was written, too
    assert product["Big"] == (regf.REG_BINARY, BIG)


def test_typed_accessors_agree_with_hivexget(sample: Path) -> None:
    key = Hive(Counted(sample)).open_key("Software\\Vendor\\Product")
    assert key is not None
    path = "Software\\Vendor\\Product"

    def get(name: str) -> regf.Value:
        v = key.value(name)
        assert v is not None, name
        return v

    assert get("Sz").as_str() == H.hivexget(sample, path, "Sz").rstrip("\n") == VALUES["Sz"]
    assert get("Expand").as_str() == H.hivexget(sample, path, "Expand").rstrip("\n")
    assert get("Expand").type_name == "REG_EXPAND_SZ"
    assert get("Dword").as_int() == int(H.hivexget(sample, path, "Dword")) & 0xFFFFFFFF == 0xDEADBEEF
    assert get("Qword").as_int() == int(H.hivexget(sample, path, "Qword")) == 0x0123456789ABCDEF
    # hivexget prints the empty string that ends a REG_MULTI_SZ as a last empty line
    assert get("Multi").as_strings() == H.hivexget(sample, path, "Multi").splitlines()[:-1] == VALUES["Multi"]
    assert get("EmptyMulti").as_strings() == []
    assert get("").as_str() == get(None).as_str() == H.hivexget(sample, path, "@").rstrip("\n")  # type: ignore[arg-type]
    assert get("Tiny").data == b"\x01\x02" and get("Empty").data == b""
    assert get("Binary").as_str() is None and get("Binary").as_int() is None
    assert get("Wert mit Ümlaut").as_int() == 7


def test_names_match_hivexsh_and_lookup_ignores_case(sample: Path) -> None:
    hive = Hive(Counted(sample))
    software = hive.open_key("Software")
    assert software is not None
    assert sorted(k.name for k in software.subkeys()) == sorted(H.hivex_subkeys(sample, "Software"))
    assert [k.name for k in hive.root.subkeys()] == H.hivex_subkeys(sample, "")
    for spelling in ("software\\VENDOR\\product", "\\Software\\Vendor\\Product\\", "SOFTWARE\\\\vendor\\Product"):
        key = hive.open_key(spelling)
        assert key is not None and key.name == "Product", spelling
    unicode_key = hive.open_key("software\\ÜNÏCØDÉ\\日本語")
    assert unicode_key is not None and unicode_key.name == "日本語"
    assert H.hivex_subkeys(sample, "Software\\Ünïcødé") == ["日本語"]
    assert unicode_key.value("NAME") is not None
    key = hive.open_key("Software\\Vendor\\Product")
    assert key is not None
    v = key.value("WERT MIT ümlaut")
    assert v is not None and v.name == "Wert mit Ümlaut"
    assert key.value("値") is not None
    assert hive.open_key("Software\\Vendor\\Nope") is None and hive.open_key("Nope\\Deeper") is None
    assert key.value("Nope") is None


def test_non_ascii_key_names_are_stored_as_utf16(sample: Path) -> None:
    """hivex stores a name it cannot write in Latin-1 as UTF-16LE (no 0x20 flag): both forms are read."""
    key = Hive(Counted(sample)).open_key("Software\\Ünïcødé\\日本語")
    assert key is not None and not key.flags & 0x20
    parent = Hive(Counted(sample)).open_key("Software\\Vendor")
    assert parent is not None and parent.flags & 0x20


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key with 1500 subkeys, in one list as hivex writes it (and 9 MB of the lists it outgrew)."""
    path = tmp_path_factory.mktemp("regf") / "many.hive"
    H.build_hive(path, PREFIX, {"Top\\Other": {"X": 1}})
    H.pad_hive(path, PREFIX, "Top\\Many", MANY, 0, group=0)
    return path


def test_hivex_writes_only_lh_lists_and_plain_big_cells(many: Path, sample: Path) -> None:
    """What hivex writes decides what must be built by hand: one lh list however many subkeys, and a value
    larger than a db segment in one plain cell."""
    kinds = H.cell_kinds(many)
    assert kinds["lh"] >= 2 and not {"lf", "li", "ri", "db"} & kinds.keys(), kinds
    assert "db" not in H.cell_kinds(sample)
    assert any(size > regf.BIG_SEGMENT + 8 for _at, size, _head in H.cells(sample))


@pytest.mark.parametrize("kind,pieces", [("lh", 1), ("lf", 1), ("li", 1), ("lh", 4), ("lf", 3), ("li", 7)])
def test_subkey_lists_of_every_kind(many: Path, tmp_path: Path, kind: str, pieces: int) -> None:
    path = tmp_path / "many.hive"
    path.write_bytes(many.read_bytes())
    H.rewrite_subkey_list(path, "Many", kind, pieces)
    kinds = H.cell_kinds(path)
    assert kind in kinds and ("ri" in kinds) == (pieces > 1)
    expected = H.hivex_subkeys(path, "Top\\Many")
    assert len(expected) == MANY
    source = Counted(path)
    hive = Hive(source)
    many_key = hive.open_key("Top\\Many")
    assert many_key is not None and many_key.subkey_count == MANY
    assert [k.name for k in many_key.subkeys()] == expected
    for i in (0, 1, 500, 777, 1234, MANY - 1):
        child = many_key.subkey(f".EXT{i:06d}")
        assert child is not None and child.name == f".ext{i:06d}"
        assert child.value("") is not None and child.value("").as_str() == f"file{i}"  # type: ignore[union-attr]
        assert H.hivexget(path, f"Top\\Many\\.ext{i:06d}", "@").rstrip("\n") == f"file{i}"
    assert many_key.subkey(".ext999999") is None


def test_big_data_cells(sample: Path, tmp_path: Path) -> None:
    path = tmp_path / "big.hive"
    path.write_bytes(sample.read_bytes())
    H.make_big_data(path, "Product", "Big")
    assert H.cell_kinds(path).get("db") == 1
    theirs = H.parse_export(H.export(path, "Software\\Vendor\\Product"))["Software\\Vendor\\Product"]
    assert theirs["Big"] == (regf.REG_BINARY, BIG)     # hivex reads the db cell as the same bytes
    key = Hive(Counted(path)).open_key("Software\\Vendor\\Product")
    assert key is not None
    value = key.value("Big")
    assert value is not None and value.size == len(BIG) and value.data == BIG


def test_value_larger_than_the_limit_is_refused(sample: Path) -> None:
    key = Hive(Counted(sample), max_value=30000).open_key("Software\\Vendor\\Product")
    assert key is not None
    big = key.value("Big")
    assert big is not None
    with pytest.raises(UnsupportedImage, match="exceeds the 30000-byte limit"):
        assert big.data


def test_unclean_hive_is_read_and_reported_dirty(sample: Path, tmp_path: Path) -> None:
    path = tmp_path / "dirty.hive"
    data = bytearray(sample.read_bytes())
    struct.pack_into("<I", data, 4, 7)
    path.write_bytes(bytes(data))
    H.reseal(path)
    hive = Hive(Counted(path))
    assert hive.dirty and hive.open_key("Software\\Vendor\\Product") is not None
    assert not Hive(Counted(sample)).dirty


# --- hostile hives ---------------------------------------------------------------------------------------------


def hostile(sample: Path, tmp_path: Path, edits: list[tuple[int, str, int]], *, seal: bool = True,
            size: int | None = None) -> Path:
    """A copy of ``sample`` with fields changed: (file offset, struct format, value); resealed unless not."""
    data = bytearray(sample.read_bytes())
    for at, fmt, value in edits:
        struct.pack_into(fmt, data, at, value)
    path = tmp_path / "hostile.hive"
    path.write_bytes(bytes(data[:size] if size is not None else data))
    if seal:
        H.reseal(path)
    return path


def refused(path: Path, match: str, lookup: str = "Software\\Vendor\\Product", value: str | None = None,
            subkeys: bool = False, budget: int = 64 * regf.PAGE) -> CorruptImage:
    """Opening the hive (and looking up ``lookup``, a value, all subkeys) raises one clear CorruptImage line,
    having read at most ``budget`` bytes (a walk of all subkeys: at most the file once, never round a loop)."""
    source = Counted(path)
    with pytest.raises(CorruptImage) as info:
        hive = Hive(source)
        key = hive.open_key(lookup)
        if key is not None and subkeys:
            key.subkeys()
        if key is not None and value is not None:
            v = key.value(value)
            assert v is not None
            assert v.data is not None
    err = info.value
    assert isinstance(err, DiskportError) and err.fmt == "regf" and err.path == os.fspath(path)
    text = str(err)
    assert "\n" not in text and text.startswith(os.fspath(path) + ": regf: ")
    assert match in text, text
    assert source.bytes_read <= (path.stat().st_size if subkeys else budget), source.bytes_read
    return err


def nk_field(path: Path, name: str, at: int) -> int:
    """File offset of the field at ``at`` in the data of key node ``name``."""
    return H.BASE + H.find_key(path, name) + 4 + at


def test_bad_base_block_checksum(sample: Path, tmp_path: Path) -> None:
    refused(hostile(sample, tmp_path, [(48, "<H", 0x4141)], seal=False), "base block checksum")


def test_bad_signature_and_version(sample: Path, tmp_path: Path) -> None:
    refused(hostile(sample, tmp_path, [(0, "<I", 0x46474552)]), "no 'regf' signature")
    source = Counted(hostile(sample, tmp_path, [(20, "<I", 2)]))
    with pytest.raises(UnsupportedImage, match=r"hive version 2\.5"):
        Hive(source)


def test_truncated_file(sample: Path, tmp_path: Path) -> None:
    refused(hostile(sample, tmp_path, [], size=sample.stat().st_size - regf.PAGE), "does not fit")
    refused(hostile(sample, tmp_path, [], size=6000), "too small for a hive")


def test_bins_size_beyond_the_file(sample: Path, tmp_path: Path) -> None:
    refused(hostile(sample, tmp_path, [(40, "<I", 0x7FFFF000)]), "hive bins size")
    refused(hostile(sample, tmp_path, [(40, "<I", 0x1234)]), "hive bins size")


def test_hbin_size_and_offset_outside(sample: Path, tmp_path: Path) -> None:
    refused(hostile(sample, tmp_path, [(H.BASE + 8, "<I", 0x40000000)]), "bad size")
    refused(hostile(sample, tmp_path, [(H.BASE + 8, "<I", 0x1001)]), "bad size")
    refused(hostile(sample, tmp_path, [(H.BASE + 4, "<I", 0x3000)]), "in no hive bin")
    refused(hostile(sample, tmp_path, [(H.BASE, "<I", 0)]), "in no hive bin")


def test_cell_offsets_outside_the_hive(sample: Path, tmp_path: Path) -> None:
    refused(hostile(sample, tmp_path, [(36, "<I", 0x7FFFFFF8)]), "outside the hive bins")
    refused(hostile(sample, tmp_path, [(36, "<I", 0x21)]), "outside the hive bins")      # misaligned
    refused(hostile(sample, tmp_path, [(nk_field(sample, "Vendor", 28), "<I", 0xFFFFFFF0)]),
            "outside the hive bins")
    refused(hostile(sample, tmp_path, [(nk_field(sample, "Product", 40), "<I", 0x7FFFFFF0)]),
            "outside the hive bins", value="Sz")


def test_cell_sizes(sample: Path, tmp_path: Path) -> None:
    root = H.BASE + 0x20
    refused(hostile(sample, tmp_path, [(root, "<i", 88)]), "is free")
    refused(hostile(sample, tmp_path, [(root, "<i", -0x7FFFFFF0)]), "beyond its bin")
    refused(hostile(sample, tmp_path, [(root + 4, "<H", 0x4141)]), "not a key node")
    refused(hostile(sample, tmp_path, [(nk_field(sample, "Product", 72), "<H", 0xFFFF)]), "name beyond its cell")


def test_subkey_list_that_loops(many: Path, tmp_path: Path) -> None:
    path = tmp_path / "loop.hive"
    path.write_bytes(many.read_bytes())
    ri = H.rewrite_subkey_list(path, "Many", "lh", 3)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, H.BASE + ri + 4 + 4 + 4, ri)     # the ri's second entry is the ri itself
    path.write_bytes(bytes(data))
    refused(path, "a cycle", lookup="Top\\Many\\.ext001499")
    refused(path, "a cycle", lookup="Top\\Many", subkeys=True)
    struct.pack_into("<I", data, H.BASE + ri + 4 + 4 + 4, struct.unpack_from("<I", data, H.BASE + ri + 8)[0])
    path.write_bytes(bytes(data))                                    # the ri lists its first lh list twice
    refused(path, "a cycle", lookup="Top\\Many", subkeys=True)


def test_ri_nested_too_deep(many: Path, tmp_path: Path) -> None:
    path = tmp_path / "deep.hive"
    path.write_bytes(many.read_bytes())
    ri = H.rewrite_subkey_list(path, "Many", "lh", 2)
    hive = H.Appender(path)
    outer = ri
    for _ in range(regf.MAX_RI_DEPTH + 1):
        outer = hive.add(struct.pack("<2sHI", b"ri", 1, outer))
    struct.pack_into("<I", hive.data, nk_field(path, "Many", 28), outer)
    hive.close()
    refused(path, "nests too deep", lookup="Top\\Many\\.ext000001")


def test_key_whose_subkey_is_its_parent(sample: Path, tmp_path: Path) -> None:
    """Product's one subkey list entry made to point at Vendor, its parent: a loop in the tree."""
    path = hostile(sample, tmp_path, [])
    vendor = H.find_key(path, "Vendor")
    hive = H.Appender(path)
    child = hive.add(struct.pack("<2sHII", b"lh", 1, vendor, regf.lh_hash("Vendor")))
    product = H.find_key(path, "Product")
    struct.pack_into("<II", hive.data, H.BASE + product + 4 + 20, 1, 0)
    struct.pack_into("<I", hive.data, H.BASE + product + 4 + 28, child)
    hive.close()
    refused(path, "parent", lookup="Software\\Vendor\\Product\\Vendor\\Product\\Vendor")
    refused(path, "parent", lookup="Software\\Vendor\\Product", subkeys=True)


def test_subkey_counts_that_lie(many: Path, tmp_path: Path) -> None:
    count = nk_field(many, "Many", 20)
    refused(hostile(many, tmp_path, [(count, "<I", 0xFFFFFFFF)]), "subkey", lookup="Top\\Many", subkeys=True)
    refused(hostile(many, tmp_path, [(count, "<I", 10)]), "more entries than the key counts",
            lookup="Top\\Many", subkeys=True)
    lh = H.BASE + struct.unpack_from("<I", many.read_bytes(), count + 8)[0]
    refused(hostile(many, tmp_path, [(lh + 6, "<H", 0xFFFF)]), "beyond its cell", lookup="Top\\Many",
            subkeys=True)


def test_value_sizes_that_lie(sample: Path, tmp_path: Path) -> None:
    product = H.find_key(sample, "Product")
    sz = H.BASE + H.find_value(sample, product, "Sz") + 4
    source = Counted(hostile(sample, tmp_path, [(sz + 4, "<I", 0x7FFFFFFF)]))
    key = Hive(source).open_key("Software\\Vendor\\Product")
    assert key is not None and key.value("Sz") is not None
    with pytest.raises(UnsupportedImage, match="exceeds"):
        assert key.value("Sz").data  # type: ignore[union-attr]
    assert source.bytes_read < 64 * regf.PAGE
    source = Counted(hostile(sample, tmp_path, [(sz + 4, "<I", 0x80000000)]))   # bit 31: resident, 0 bytes
    key = Hive(source).open_key("Software\\Vendor\\Product")
    assert key is not None and key.value("Sz").data == b""  # type: ignore[union-attr]
    path = hostile(sample, tmp_path, [(sz + 4, "<I", 0x80000000 | 0x7FFFFFFF)])
    refused(path, "resident bytes", value="Sz")
    path = hostile(sample, tmp_path, [(sz + 4, "<I", 5000)])
    refused(path, "overruns its", value="Sz")
    vcount = nk_field(sample, "Product", 36)
    refused(hostile(sample, tmp_path, [(vcount, "<I", 0x80000000)]), "values beyond its value list", value="Sz")
    refused(hostile(sample, tmp_path, [(sz + 2, "<H", 0xFFFF)]), "name beyond its cell", value="Sz")


def test_big_data_that_lies(sample: Path, tmp_path: Path) -> None:
    path = tmp_path / "big.hive"
    path.write_bytes(sample.read_bytes())
    db = H.make_big_data(path, "Product", "Big")
    clean = path.read_bytes()
    refused(hostile(path, tmp_path, [(H.BASE + db + 4 + 2, "<H", 1)]), "big-data segments", value="Big")
    refused(hostile(path, tmp_path, [(H.BASE + db + 4 + 2, "<H", 0xFFFF)]), "big-data segments", value="Big")
    seglist = struct.unpack_from("<I", clean, H.BASE + db + 4 + 4)[0]
    refused(hostile(path, tmp_path, [(H.BASE + seglist + 4, "<I", 0xFFFFFF00)]), "outside", value="Big")


# --- bounded reads ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SOFTWARE hive of about 16 MB: CurrentVersion, then 10000 keys with 1 KiB values under Classes."""
    return H.software_hive(tmp_path_factory.mktemp("regf") / "SOFTWARE", pad_keys=10000, pad_value_bytes=1024)


def test_lookup_reads_a_small_part_of_a_large_hive(large: Path) -> None:
    size = large.stat().st_size
    assert size > 10 * 1024 * 1024
    source = Counted(large)
    hive = Hive(source)
    current = hive.open_key("Microsoft\\Windows NT\\CurrentVersion")
    assert current is not None and current.value("ProductName").as_str() == "Windows 10 Pro"  # type: ignore[union-attr]
    key = hive.open_key(H.padded_key("Classes", 7777))
    assert key is not None and key.value("").as_str() == "file7777"  # type: ignore[union-attr]
    assert H.hivexget(large, H.padded_key("Classes", 7777), "@").rstrip("\n") == "file7777"
    assert source.bytes_read < 256 * 1024 < size // 40, (source.bytes_read, size)
    assert source.reads < 64, source.reads
