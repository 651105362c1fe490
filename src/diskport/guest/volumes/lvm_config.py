"""A bounded parser for LVM2's text configuration format, the language of its on-disk metadata.

LVM2 writes a volume group's metadata as text (lvm2 ``lib/config/config.c`` reads it; ``vgcfgbackup`` prints the
same text): ``key = value`` assignments and ``name { ... }`` sections, values being double-quoted strings (with
backslash escapes), integers, floats, or ``[ ... ]`` lists of those separated by commas; ``#`` starts a comment
running to the end of the line. Identifiers are letters, digits and ``_ . - + @ :`` (LV and VG names use
``_ . - +``).

Written by hand because no permissively licensed Python library parses this format (it is neither JSON, TOML,
INI nor libconfig, although it looks like each), and because the text comes from the image: it must be refused
in bounded time and memory when hostile. Hence the limits: :data:`MAX_TEXT` characters, :data:`MAX_DEPTH`
nested sections, :data:`MAX_NODES` values in all, :data:`MAX_DIGITS` digits in a number. Duplicate keys in one
section are refused (LVM never writes them; a second copy could only hide the first).
"""

from __future__ import annotations

from typing import Union

from diskport.errors import CorruptImage

#: Largest metadata text parsed (LVM's default metadata area is 1 MiB; a VG of thousands of LVs fits in 4).
MAX_TEXT = 8 * 1024 * 1024
#: Sections nested in one another (LVM uses 4: VG, logical_volumes, the LV, its segment).
MAX_DEPTH = 16
#: Values, sections and list items in one text.
MAX_NODES = 500_000
#: Digits in one number (2^64 has 20).
MAX_DIGITS = 20

Scalar = int | float | str
Value = Union[Scalar, list[Scalar], "Section"]
Section = dict[str, Value]

_IDENT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-+@:")
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"'}


class _Parser:
    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.pos = 0
        self.path = path
        self.nodes = 0

    def fail(self, what: str) -> CorruptImage:
        line = self.text.count("\n", 0, self.pos) + 1
        return CorruptImage(f"LVM metadata text, line {line}: {what}", path=self.path, fmt="LVM2")

    def skip(self) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n:
            ch = text[self.pos]
            if ch in " \t\r\n\0":
                self.pos += 1
            elif ch == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end + 1
            else:
                return

    def count(self) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(f"more than {MAX_NODES} values")

    def ident(self) -> str:
        start = self.pos
        text, n = self.text, len(self.text)
        while self.pos < n and text[self.pos] in _IDENT:
            self.pos += 1
        if self.pos == start:
            ch = text[self.pos] if self.pos < n else "end of text"
            raise self.fail(f"expected a name, found {ch!r}")
        return text[start:self.pos]

    def section(self, depth: int, top: bool) -> Section:
        if depth > MAX_DEPTH:
            raise self.fail(f"sections nested more than {MAX_DEPTH} deep")
        out: Section = {}
        while True:
            self.skip()
            if self.pos >= len(self.text):
                if top:
                    return out
                raise self.fail("a section is not closed")
            if self.text[self.pos] == "}":
                if top:
                    raise self.fail("'}' without a section")
                self.pos += 1
                return out
            key = self.ident()
            if key in out:
                raise self.fail(f"{key!r} appears twice in one section")
            self.count()
            self.skip()
            ch = self.text[self.pos] if self.pos < len(self.text) else ""
            if ch == "{":
                self.pos += 1
                out[key] = self.section(depth + 1, False)
            elif ch == "=":
                self.pos += 1
                self.skip()
                out[key] = self.value()
            else:
                raise self.fail(f"expected '=' or '{{' after {key!r}")

    def value(self) -> Scalar | list[Scalar]:
        if self.pos < len(self.text) and self.text[self.pos] == "[":
            self.pos += 1
            items: list[Scalar] = []
            while True:
                self.skip()
                if self.pos < len(self.text) and self.text[self.pos] == "]":
                    self.pos += 1
                    return items
                if items:
                    if self.pos >= len(self.text) or self.text[self.pos] != ",":
                        raise self.fail("expected ',' or ']' in a list")
                    self.pos += 1
                    self.skip()
                self.count()
                items.append(self.scalar())
        return self.scalar()

    def scalar(self) -> Scalar:
        text, n = self.text, len(self.text)
        if self.pos >= n:
            raise self.fail("a value is missing at the end of the text")
        if text[self.pos] == '"':
            return self.string()
        start = self.pos
        if text[self.pos] in "+-":
            self.pos += 1
        digits = self.pos
        while self.pos < n and ((text[self.pos].isascii() and text[self.pos].isdigit()) or text[self.pos] == "."):
            self.pos += 1
        word = text[start:self.pos]
        if self.pos == digits:
            raise self.fail(f"expected a value, found {text[start:start + 20]!r}")
        if self.pos - digits > MAX_DIGITS:
            raise self.fail(f"a number of more than {MAX_DIGITS} digits")
        try:
            return float(word) if "." in word else int(word)
        except ValueError:
            raise self.fail(f"{word!r} is not a number") from None

    def string(self) -> str:
        text, n = self.text, len(self.text)
        self.pos += 1
        parts: list[str] = []
        start = self.pos
        while True:
            end = text.find('"', self.pos)
            slash = text.find("\\", self.pos, end if end >= 0 else n)
            if end < 0:
                raise self.fail("a string is not closed")
            if slash < 0:
                parts.append(text[start:end])
                self.pos = end + 1
                return "".join(parts)
            parts.append(text[start:slash])
            if slash + 1 >= n:
                raise self.fail("a string is not closed")
            esc = text[slash + 1]
            parts.append(_ESCAPES.get(esc, esc))
            self.pos = start = slash + 2


def parse_config(text: str, path: str) -> Section:
    """The sections and values of an LVM text configuration (``path`` names the volume in errors)."""
    if len(text) > MAX_TEXT:
        raise CorruptImage(f"LVM metadata text of {len(text)} characters (more than {MAX_TEXT})", path=path,
                           fmt="LVM2")
    return _Parser(text, path).section(0, True)


__all__ = ["MAX_DEPTH", "MAX_NODES", "MAX_TEXT", "Scalar", "Section", "Value", "parse_config"]
