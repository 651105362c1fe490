"""Progress of a job, and its three renderings: a terminal bar, JSON lines, a Prometheus endpoint.

:class:`JobProgress` holds the state (phase, bytes converted of the virtual size, bytes downloaded of the
download's size). The engine calls it as its progress callback, a download source counts bytes into it, and the
renderers show it:

* a rich bar on stderr when stderr is a terminal (two lines when there is a download);
* ``--progress=json``: one JSON object per line on stderr, at most twice a second and once at the end (that
  last one also carries ``cache: {mode, reason}``, the page-cache policy used, when the job reported it);
* ``--metrics-port``: a Prometheus text endpoint (``/metrics``), so diskport can run as the importer in a
  Kubernetes Job and be watched the way CDI's importer pod is.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class JobProgress:
    """Callable ``(done, total)`` for the engine; ``on_download(n)`` for a source. Thread safe."""

    def __init__(self, label: str, *, bar: bool = False, json_lines: bool = False,
                 metrics_port: int | None = None, download_total: int | None = None) -> None:
        self.label = label
        self.phase = "starting"
        self.converted = 0
        self.total = 0
        self.downloaded = 0
        self.download_total = download_total
        #: ``{"mode": ..., "reason": ...}`` of the page-cache policy, set by the command once the job has it.
        self.cache: dict[str, str] | None = None
        self._lock = threading.Lock()
        self._bar = _Bar(label) if bar and sys.stderr.isatty() else None
        self._json = json_lines
        self._json_last = 0.0
        self._metrics = _MetricsServer(self, metrics_port) if metrics_port is not None else None

    @property
    def metrics_port(self) -> int | None:
        return self._metrics.port if self._metrics else None

    def __enter__(self) -> JobProgress:
        if self._bar is not None:
            self._bar.start(self.download_total is not None)
        self.phase = "running"
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.phase = "failed" if exc_type is not None else "done"
        if self._bar is not None:
            self._bar.stop()
        if self._json:
            self._emit_json(force=True)
        if self._metrics is not None:
            self._metrics.close()

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        if self._json:
            self._emit_json(force=True)

    def on_download(self, n: int) -> None:
        with self._lock:
            self.downloaded += n

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            self.converted = done
            self.total = total
        if self._bar is not None:
            self._bar.update(self)
        if self._json:
            self._emit_json()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            snap: dict[str, Any] = {"phase": self.phase, "converted": self.converted, "total": self.total or None,
                                    "downloaded": self.downloaded, "download_total": self.download_total or None}
            if self.cache is not None:
                snap["cache"] = self.cache
            return snap

    def _emit_json(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._json_last < 0.5:
            return
        self._json_last = now
        import json  # only --progress json pays for it

        sys.stderr.write(json.dumps(self.snapshot()) + "\n")
        sys.stderr.flush()

    def prometheus(self) -> str:
        s = self.snapshot()
        total = s["total"] or 0
        ratio = s["converted"] / total if total else 0.0
        lines = []
        for name, kind, help_text, value in (
            ("diskport_progress_ratio", "gauge", "Fraction of the disk converted, 0 to 1.", ratio),
            ("diskport_converted_bytes_total", "counter", "Guest bytes converted so far.", s["converted"]),
            ("diskport_virtual_size_bytes", "gauge", "Virtual size of the disk (0 until known).", total),
            ("diskport_downloaded_bytes_total", "counter", "Bytes downloaded so far.", s["downloaded"]),
            ("diskport_download_size_bytes", "gauge", "Size of the download (0 if unknown).",
             s["download_total"] or 0),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP diskport_phase The job's phase (1 for the current one).", "# TYPE diskport_phase gauge"]
        lines += [f'diskport_phase{{phase="{p}"}} {int(p == s["phase"])}'
                  for p in ("starting", "running", "verifying", "done", "failed")]
        return "\n".join(lines) + "\n"


class _Bar:
    """The rich bar; rich is imported only when a bar is drawn (it is a noticeable share of start-up)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.progress: Progress | None = None
        self.convert_task: TaskID | None = None
        self.download_task: TaskID | None = None
        self._last = 0.0

    def start(self, with_download: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                 TransferSpeedColumn(), TimeRemainingColumn(), transient=True,
                                 console=Console(stderr=True))
        self.progress.start()
        if with_download:
            self.download_task = self.progress.add_task("downloaded", total=None)
        self.convert_task = self.progress.add_task(self.label, total=None)

    def update(self, job: JobProgress) -> None:
        if self.progress is None or self.convert_task is None:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and job.converted < job.total:
            return
        self._last = now
        self.progress.update(self.convert_task, completed=job.converted, total=job.total or None)
        if self.download_task is not None:
            self.progress.update(self.download_task, completed=job.downloaded, total=job.download_total)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class _MetricsServer:
    """``GET /metrics`` in Prometheus text format, on a thread, for the life of the job."""

    def __init__(self, job: JobProgress, port: int) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # 25-30 ms: only with --metrics-port

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = job.prometheus().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="diskport-metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
