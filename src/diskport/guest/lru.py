"""A bounded map that forgets the least recently used entry: the caches of the guest readers (inodes, tree
nodes, extent blocks) are bounded this way, whatever the sizes written in a hostile filesystem."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A dict of at most ``limit`` entries that forgets the least recently used."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> V:
        self.items[key] = value
        if len(self.items) > self.limit:
            self.items.popitem(last=False)
        return value
