"""Progress rendering for the command line: a rich bar on a terminal, nothing otherwise."""

from __future__ import annotations

import json
import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class ProgressBar:
    """Callable ``(done, total)`` that draws a bar on stderr when it is a terminal and ``enabled``."""

    def __init__(self, label: str, *, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._label = label
        self._last = 0.0

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            # rich is imported only when a bar is drawn: it costs a noticeable share of a short job's start-up.
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                TransferSpeedColumn(), TimeRemainingColumn(), transient=True,
                console=Console(stderr=True))
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._progress is None or self._task is None:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        self._progress.update(self._task, completed=done, total=total or None)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()


class JsonProgress:
    """Progress as JSON lines on stderr, for a platform to read (at most twice a second, and once at the end).

    Each line: ``{"phase": ..., "converted": bytes, "total": virtual size or null, "downloaded": bytes,
    "download_total": bytes or null}``.
    """

    def __init__(self, phase: str, download_total: int | None = None) -> None:
        self.phase = phase
        self.downloaded = 0
        self.download_total = download_total
        self._last = 0.0
        self._lock = threading.Lock()

    def on_download(self, n: int) -> None:
        with self._lock:
            self.downloaded += n

    def __call__(self, done: int, total: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < 0.5:
            return
        self._last = now
        line = {"phase": self.phase, "converted": done, "total": total or None, "downloaded": self.downloaded,
                "download_total": self.download_total}
        sys.stderr.write(json.dumps(line) + "\n")
        sys.stderr.flush()
