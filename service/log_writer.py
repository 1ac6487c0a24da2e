"""The service's log: one JSON object per line on stderr, formatted and written in bulk by a thread of its own, off the
event loop. Light to import: the VAE_WORKERS supervisor logs with it and loads neither torch nor the app (38 MiB
resident instead of 254)."""

from __future__ import annotations

import collections
import json
import logging
import threading
from typing import Any

_LINES_PER_WRITE = 256  # the writer lets go of the GIL at each write: a long backlog does not hold it in one go


class BulkWriter(logging.Handler):
    """Keeps each record, and has a thread of its own format and write what is kept every `interval_s`, or at once
    after a warning or worse. On the caller's thread (the event loop, for access lines) a line costs a record and an
    append: no formatting, no system call, no thread woken. A `QueueListener` woke its thread for every line, which then
    took the GIL from the event loop: at 64 connections on 2 cores, mnist n=1 1,748 -> 2,145 images/s and faces 694 ->
    744 (alternating servers, faster in every round), a lone faces request 4.47 -> 3.86 ms p50 (6 of 8 rounds;
    bench/README.md). `logging.shutdown`, which runs at exit, and `logging.basicConfig(force=True)` close it:
    everything kept is written then."""

    def __init__(self, out: logging.StreamHandler, interval_s: float = 0.05) -> None:
        super().__init__()
        self._out, self._interval_s = out, interval_s
        self._kept: collections.deque[logging.LogRecord] = collections.deque()  # append and popleft are thread-safe
        self._writing = threading.Lock()  # one writer at a time, so lines keep their order
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        self._kept.append(record)
        if self._closing:  # no writer thread any more (a line logged during shutdown): write it now
            self.flush()
        elif record.levelno >= logging.WARNING:
            self._wake.set()

    def flush(self) -> None:
        """Format and write every kept line, in order, on the calling thread."""
        with self._writing:
            while self._kept:
                records = [self._kept.popleft() for _ in range(min(len(self._kept), _LINES_PER_WRITE))]
                lines: list[str] = []
                for record in records:
                    try:
                        lines.append(self._out.format(record) + "\n")
                    except Exception:
                        self._out.handleError(record)
                try:
                    self._out.stream.write("".join(lines))
                    self._out.flush()
                except Exception:
                    self._out.handleError(records[-1])

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()
        super().close()

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(self._interval_s)
            self._wake.clear()
            self.flush()


def log_format(record: logging.LogRecord) -> str:
    """One JSON object per line: easy to grep, easy to ship."""
    payload: dict[str, Any] = {
        "ts": round(record.created, 3),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key in ("method", "path", "model", "status", "duration_ms", "request_id", "ready", "models"):
        if hasattr(record, key):
            payload[key] = getattr(record, key)
    if record.exc_info:
        payload["error"] = logging.Formatter().formatException(record.exc_info)[-2000:]
    return json.dumps(payload, default=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return log_format(record)


def configure_logging(level: str) -> None:
    """JSON lines on stderr, formatted and written by a thread of their own (BulkWriter): on the event loop,
    formatting and writing every request's access line took ~4% of its time (py-spy, /sample at one connection)."""
    # Nothing in a line (log_format) comes from the caller's frame, thread or process: leave them out of every record,
    # as the logging HOWTO's "Optimization" table shows. An access record then costs the event loop 7.7 us, not 11.1.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    out = logging.StreamHandler()
    out.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[BulkWriter(out)], force=True)
