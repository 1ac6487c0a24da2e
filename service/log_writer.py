"""Log lines formatted and written in bulk by a thread of their own, off the event loop."""

from __future__ import annotations

import collections
import logging
import threading

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
