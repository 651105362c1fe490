"""The interface every filesystem reader offers, and the one path walk they share.

A reader implements a handful of node operations (:class:`Filesystem`'s abstract methods) over its own node
type; path lookup, symlink following (bounded), case folding and the bounded whole-file read are written once
here. Readers are read-only, never trust a count or offset they read (bound it by the volume and by the
limits below before use), and raise :class:`~diskport.errors.CorruptImage` with ``fmt`` set to their type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from diskport.errors import CorruptImage
from diskport.guest.view import Readable

#: Symlinks followed in one lookup before it is called a loop (Linux's limit is 40).
MAX_SYMLINKS = 40
#: Path components in one lookup.
MAX_DEPTH = 256
#: Entries one directory listing returns before it is called hostile.
MAX_DIR_ENTRIES = 100_000

Kind = Literal["file", "dir", "symlink", "other"]


@dataclass(frozen=True)
class FsInfo:
    """What a superblock says: enough to name a volume in a report, whether or not diskport can read it."""

    type: str                      # "ext4", "xfs", "btrfs", "ntfs", "vfat", "exfat", "iso9660", "udf", "swap",
    #                                "LVM2_member", "crypto_LUKS", "BitLocker", "linux_raid_member" (blkid's names)
    label: str | None = None
    uuid: str | None = None
    size: int | None = None        # bytes the filesystem says it spans
    version: str | None = None     # "FAT32", "ext4", "LUKS2", "v5", ...
    readable: bool = False         # whether diskport can read files from it
    details: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Stat:
    kind: Kind
    size: int


N = TypeVar("N")


class Filesystem(ABC, Generic[N]):
    """A read-only filesystem over a :class:`Readable` volume. Paths are ``/``-separated from its root."""

    #: Whether names compare without case (FAT, NTFS, exFAT): lookups fold case, listings keep it.
    case_insensitive: bool = False

    def __init__(self, volume: Readable, info: FsInfo) -> None:
        self.volume = volume
        self.info = info

    @property
    def type(self) -> str:
        return self.info.type

    # ---- what a reader implements -------------------------------------------------------------------
    @abstractmethod
    def root(self) -> N:
        """The root directory's node."""

    @abstractmethod
    def stat_node(self, node: N) -> Stat: ...

    @abstractmethod
    def entries(self, node: N) -> Iterator[tuple[str, N]]:
        """``(name, node)`` for each entry of a directory, without ``.`` and ``..``, in on-disk order."""

    @abstractmethod
    def open_node(self, node: N) -> Readable:
        """The contents of a regular file, read at random without reading it whole."""

    def readlink_node(self, node: N) -> str:
        raise CorruptImage("symbolic links are not part of this filesystem", path=self.volume.name,
                           fmt=self.type)

    def find_entry(self, node: N, name: str) -> N | None:
        """The entry ``name`` of directory ``node``; readers with indexed directories may override."""
        want = name.casefold() if self.case_insensitive else name
        for count, (entry, child) in enumerate(self.entries(node)):
            if count >= MAX_DIR_ENTRIES:
                raise CorruptImage(f"a directory holds more than {MAX_DIR_ENTRIES} entries",
                                   path=self.volume.name, fmt=self.type)
            if (entry.casefold() if self.case_insensitive else entry) == want:
                return child
        return None

    # ---- what inspection uses ---------------------------------------------------------------------------
    def lookup(self, path: str, *, follow: bool = True) -> N | None:
        """The node at ``path`` (absolute or relative to the root), following symlinks, or None if absent."""
        node = self.root()
        stack: list[N] = []  # parents, for ".."
        parts = [p for p in path.split("/") if p and p != "."]
        if len(parts) > MAX_DEPTH:
            raise CorruptImage(f"path has more than {MAX_DEPTH} components", path=self.volume.name,
                               fmt=self.type)
        links = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                node = stack.pop() if stack else self.root()
                continue
            if self.stat_node(node).kind != "dir":
                return None
            child = self.find_entry(node, part)
            if child is None:
                return None
            if self.stat_node(child).kind == "symlink" and (parts or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise CorruptImage(f"more than {MAX_SYMLINKS} symbolic links in one path (a loop)",
                                       path=self.volume.name, fmt=self.type)
                target = self.readlink_node(child)
                new = [p for p in target.split("/") if p and p != "."]
                if len(new) + len(parts) > MAX_DEPTH:
                    raise CorruptImage(f"path has more than {MAX_DEPTH} components", path=self.volume.name,
                                       fmt=self.type)
                parts = new + parts
                if target.startswith("/"):
                    node, stack = self.root(), []
                continue
            stack.append(node)
            node = child
        return node

    def stat(self, path: str, *, follow: bool = True) -> Stat | None:
        node = self.lookup(path, follow=follow)
        return None if node is None else self.stat_node(node)

    def listdir(self, path: str) -> list[str]:
        """Names in the directory at ``path`` ([] if it is absent or not a directory)."""
        node = self.lookup(path)
        if node is None or self.stat_node(node).kind != "dir":
            return []
        names = []
        for count, (name, _) in enumerate(self.entries(node)):
            if count >= MAX_DIR_ENTRIES:
                raise CorruptImage(f"a directory holds more than {MAX_DIR_ENTRIES} entries",
                                   path=self.volume.name, fmt=self.type)
            names.append(name)
        return names

    def open(self, path: str) -> Readable | None:
        """The regular file at ``path`` for random reads, or None if absent or not a regular file."""
        node = self.lookup(path)
        if node is None or self.stat_node(node).kind != "file":
            return None
        return self.open_node(node)

    def read(self, path: str, limit: int) -> bytes | None:
        """The first ``limit`` bytes at most of the regular file at ``path``, or None if it is absent."""
        handle = self.open(path)
        if handle is None:
            return None
        return handle.pread(0, min(limit, handle.size))

    def readlink(self, path: str) -> str | None:
        node = self.lookup(path, follow=False)
        if node is None or self.stat_node(node).kind != "symlink":
            return None
        return self.readlink_node(node)


@dataclass(frozen=True)
class FilesystemSpec:
    """One line of the filesystem table: a type's name, how to recognise it, and its reader if it has one.

    ``types`` names the other types the same ``identify`` reports and ``open`` reads (ext2 and ext3 beside
    ext4: one superblock, one reader)."""

    name: str
    identify: Callable[[Readable], FsInfo | None]
    open: Callable[[Readable, FsInfo], Filesystem[Any]] | None = None
    types: tuple[str, ...] = ()

    def reads(self, fs_type: str) -> bool:
        """Whether this line opens volumes that ``identify`` called ``fs_type``."""
        return self.open is not None and (fs_type == self.name or fs_type in self.types)
