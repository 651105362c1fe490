"""YAML with comments, written by PyYAML (MIT) and commented here.

PyYAML writes block-style YAML in the order the dicts were built, but has no comments. ruamel.yaml has them
but round-trip machinery we do not need; instead the YAML PyYAML wrote is walked line by line and a comment line
is put before the key it is about. That walk is sound because every key is one we chose (plain identifiers,
never quoted), every scalar is on one line (``width`` is unlimited) and sequences are indented under their key.
The result is loaded back and compared with the data, so a comment can never change what the YAML says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from diskport.errors import safe_text

Path = tuple[str | int, ...]
_KEY = re.compile(r"^( *)(- )?([A-Za-z0-9_.\-/]+):(?: |$)")
_ITEM = re.compile(r"^( *)- ")


class _Dumper(yaml.SafeDumper):
    """Sequences indented under their key (``  - name: x``), so indentation alone gives each line's path."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


@dataclass
class Document:
    data: dict[str, Any]
    comments: dict[Path, list[str]] = field(default_factory=dict)
    header: list[str] = field(default_factory=list)

    def note(self, path: Path, text: str) -> None:
        self.comments.setdefault(path, []).append(text)


def comment_line(text: str) -> str:
    """One comment line: what came from the image is escaped, never a new line."""
    return safe_text(text, 400)


def dump(doc: Document) -> str:
    body = yaml.dump(doc.data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1 << 16,
                     allow_unicode=False)
    out = [f"# {comment_line(h)}" for h in doc.header]
    frames: list[tuple[int, str | int]] = []
    counters: dict[Path, int] = {}
    used: set[Path] = set()
    for line in body.splitlines():
        key = _KEY.match(line)
        item = _ITEM.match(line)
        if item is not None:
            dash = len(item.group(1))
            while frames and frames[-1][0] >= dash:
                frames.pop()
            parent = tuple(c for _, c in frames)
            index = counters.get(parent, 0)
            counters[parent] = index + 1
            frames.append((dash, index))
        if key is not None:
            column = len(key.group(1)) + (2 if key.group(2) else 0)
            while frames and frames[-1][0] >= column and not (key.group(2) and frames[-1][0] == column - 2):
                frames.pop()
            path = (*(c for _, c in frames), key.group(3))
            frames.append((column, key.group(3)))
            notes = doc.comments.get(path)
            if notes:
                used.add(path)
                indent = " " * len(key.group(1))
                out.extend(f"{indent}# {comment_line(n)}" for n in notes)
        out.append(line)
    missing = set(doc.comments) - used
    if missing:
        raise AssertionError(f"comments for paths not in the YAML: {sorted(map(str, missing))}")
    text = "\n".join(out) + "\n"
    if yaml.safe_load(text) != doc.data:
        raise AssertionError("the commented YAML does not load back to the data")
    return text
