"""One read-ahead thread: a producer fills page-aligned buffers from a small pool while the caller consumes.

Used twice: by the engine (extents of a disk image into windows, :class:`diskport.engine._Prefetcher`) and by
the containerDisk layer (the layer tar as windows, :class:`diskport.oci.tarstream.TarStream`). A subclass
writes :meth:`ReadAhead.produce`, which takes buffers with :meth:`~ReadAhead.take_buffer` and hands items to the
consumer with :meth:`~ReadAhead.emit`; the consumer iterates :meth:`~ReadAhead.items` and gives each buffer
back with :meth:`~ReadAhead.recycle` once it is done with it. The buffers are anonymous mappings (page-aligned,
so they can be written with ``O_DIRECT``); preadv, pwrite, hashlib, the codecs and numpy release the GIL, so the
producer's reads overlap the consumer's work. An exception of the producer is handed to the consumer, which
raises it from :meth:`~ReadAhead.items`; the end of the items is a ``None`` on the queue.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ReadAhead(Generic[T]):
    """A producer thread, ``depth`` buffers of ``window`` bytes, and an ordered queue of items for the consumer.

    ``bound`` limits the items waiting (0: no limit; items that carry no buffer, such as a run of zeros, are
    otherwise free to make and could pile up). ``unwind_wait`` is how long leaving on an exception waits for
    the producer (None: until it ends): it may be stuck in a read from a stalled server, and closing the
    source, which the caller does next, is what ends that read; the thread is a daemon.
    """

    def __init__(self, *, window: int, depth: int, name: str, bound: int = 0,
                 unwind_wait: float | None = None) -> None:
        self.window = window
        self.depth = depth
        self.unwind_wait = unwind_wait
        self.free: queue.Queue[mmap.mmap | None] = queue.Queue()
        self.ready: queue.Queue[T | BaseException | None] = queue.Queue(maxsize=bound)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def produce(self) -> None:
        """Make the items (in the producer thread): :meth:`emit` each; return early once :attr:`stop` is set."""
        raise NotImplementedError

    def __enter__(self) -> ReadAhead[T]:
        for _ in range(self.depth):
            self.free.put(mmap.mmap(-1, self.window))
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop.set()
        for _ in range(self.depth):
            self.free.put(None)  # wakes a producer waiting for a free buffer
        self.thread.join(None if exc_type is None else self.unwind_wait)

    def take_buffer(self) -> mmap.mmap | None:
        """A free buffer, waiting for one; None once the consumer has gone (the producer should return)."""
        buf = self.free.get()
        return None if self.stop.is_set() else buf

    def recycle(self, buf: mmap.mmap) -> None:
        """Give a buffer back to the pool (the consumer, when it is done with an item's buffer)."""
        self.free.put(buf)

    def emit(self, item: T | BaseException | None) -> bool:
        """Queue ``item`` for the consumer; False once the consumer has gone (the producer should return)."""
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            self.produce()
            self.emit(None)
        except BaseException as e:  # handed to the consumer, which raises it
            self.emit(e)

    def items(self) -> Iterator[T]:
        """The producer's items in order, until it ends; raises what the producer raised."""
        while True:
            item = self.ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
