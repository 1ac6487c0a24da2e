"""The HTTP protocol vae-serve runs on uvicorn: uvicorn's httptools protocol, with guards against clients that would hold
the server's connections or its memory.

- **Requests that do not come in time.** A connection that sends nothing, or a request a byte at a time (slowloris),
  would otherwise hold a place for good: one client could take every connection the server serves (VAE_MAX_CONNECTIONS)
  and every other client would get 503. uvicorn closes a connection idle after an answer (its keep-alive timeout), but
  neither a new one that sends nothing nor one whose request never ends. The rule is that of Apache's mod_reqtimeout:
  a request's head must be in within VAE_READ_TIMEOUT_S of its first byte (of the connection opening, for a
  connection's first request), and its body within VAE_READ_TIMEOUT_S of the head, plus a second for every
  MIN_BODY_BYTES_PER_S bytes that came: a slow upload that keeps coming is served, a trickle is not. Such a connection
  gets 408 (where no answer is being written on it) and is closed.
- **Answers that are not read.** An answer the client does not read, left in the server's write buffer with none of it
  taken for VAE_READ_TIMEOUT_S, is dropped with its connection. Else a client that asks for 256 images as JSON and
  never reads holds 2.4 MB of memory for good, and enough of them hold gigabytes.
- **Heads too large.** httptools sets no limit on a request's head (uvicorn's h11 protocol does: 16 KiB): 200 MB of
  headers sent in 0.4 s took 195 MB of the server's memory. A head (request line and headers) over MAX_HEAD_BYTES gets
  431 and its connection is closed, as soon as the parser has read that much.
- **Requests that are not HTTP.** What httptools cannot parse gets 400 with the parser's reason, and is closed.

- **Connections beyond VAE_MAX_CONNECTIONS.** A connection opened while the server already has that many is marked, and
  its requests get 503 from the app (`app.LimitsAndAccessLog`, which logs and counts them) and close it. The
  connections opened before it are served as ever: a flood of new connections does not take the server from the
  clients it serves. (uvicorn's own limit answered every request with 503 while the count was over.)

The answers given here (400, 408, 431) are JSON `{"detail": ...}` as the app's are, with an X-Request-ID of the
server's own, and are logged and counted as the app's are (the access line; `vae_requests_total` with the endpoint
"unparsed", `vae_failures_total`): uvicorn answered its 400 in plain text, seen only in a warning (which says less than
the access line, and is now left out of the log).
`sweep`, from the server's tick, checks every connection for the first two about once a second.

The protocol also keeps count of the connections that are active (`Activity`), for the batchers' waits for company,
and answers the commonest requests itself (`fastpath.DirectAnswers`), past uvicorn's request cycle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.access import count_failure, log_request, request_id_from, request_id_of
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.fastpath import DirectAnswers

MIN_BODY_BYTES_PER_S = 1024
MAX_HEAD_BYTES = 64 * 1024  # nginx reads up to 32 KiB of headers by default, Apache about 800 KiB, uvicorn's h11 16 KiB
UNPARSED = "unparsed"  # the endpoint label of what is answered here: no route was matched
TIMED_OUT = "vae_serve.read_timed_out"  # set in the request's scope["state"] when its connection is closed for it
OVER_LIMIT = "vae_serve.connections_open"  # in the scope["state"] of a request on a connection beyond the limit


# A connection answered longer ago than this, with no request since, is idle (a proxy's pool, a client gone quiet): its
# client is not counted on to send a request soon. A client that sends its next request as soon as it is answered
# does so within a fraction of a millisecond (wrk on loopback, 2 cores).
IDLE_AFTER_S = 0.005


class _HeadTooLarge(Exception):
    pass


class _Answering:
    """What uvicorn reads of a request's RequestResponseCycle, for one answered directly."""

    response_complete = False
    response_started = False
    disconnected = False  # set by uvicorn's connection_lost
    keep_alive = True  # cleared by uvicorn's shutdown: close after the answer

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope
        self.message_event = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        """The ASGI `receive` after the request's body, as uvicorn's cycle gives it: a disconnect once the connection
        is lost."""
        await self.message_event.wait()  # set by uvicorn's connection_lost
        return {"type": "http.disconnect"}


class Activity:
    """How many of a server's connections are active: open, and not idle for IDLE_AFTER_S or more. A connection is idle
    from its answer (uvicorn then arms its keep-alive timer) until its client sends again; a new one, or one reading
    or answering a request, is active. The batchers ask for it on a lone request (and while a batch waits for company),
    so it is kept as connections change rather than found by a scan of them all: 70 us at 900 open connections. Beside
    900 quiet clients that each ask every 3 s, a lone `mnist` client: 540 -> 692 requests/s, p50 1.34 -> 0.85 ms
    (alternating servers, faster in 8 of 8 rounds; bench/README.md).

    A connection's own state lives on it: `_busy` (open and not waiting for its next request) and `_answer` (its entry
    in `_answers` while it was answered less than IDLE_AFTER_S ago and nothing came since). tests/service/test_server.py
    holds uvicorn to the callbacks this relies on."""

    def __init__(self, idle_after_s: float = IDLE_AFTER_S) -> None:
        self.idle_after_s = idle_after_s
        self.busy = 0
        self.recent = 0  # connections answered less than idle_after_s ago, quiet since
        self._answers: deque[tuple[float, GuardedHttpProtocol]] = deque()  # oldest first; stale ones skipped

    def count(self, now: float) -> int:
        self._forget_answers_before(now - self.idle_after_s)
        return self.busy + self.recent

    def opened(self, connection: GuardedHttpProtocol) -> None:
        connection._busy = True
        self.busy += 1

    def answered(self, connection: GuardedHttpProtocol, now: float) -> None:
        """It waits for its client's next request now."""
        if connection._busy:
            connection._busy = False
            self.busy -= 1
            connection._answer = entry = (now, connection)
            self._answers.append(entry)
            self.recent += 1
        self._forget_answers_before(now - self.idle_after_s)  # keeps the queue short where nothing asks for the count

    def woke(self, connection: GuardedHttpProtocol) -> None:
        """Its client sent something after an answer."""
        self._unanswer(connection)
        connection._busy = True
        self.busy += 1

    def closed(self, connection: GuardedHttpProtocol) -> None:
        if connection._busy:
            connection._busy = False
            self.busy -= 1
        self._unanswer(connection)

    def _unanswer(self, connection: GuardedHttpProtocol) -> None:
        if connection._answer is not None:
            connection._answer = None  # its entry stays queued until it is old, then is skipped
            self.recent -= 1

    def _forget_answers_before(self, when: float) -> None:
        answers = self._answers
        while answers and answers[0][0] <= when:
            entry = answers.popleft()
            connection = entry[1]
            if connection._answer is entry:
                connection._answer = None
                self.recent -= 1


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, noting when the request being read began, the size of its head and when it was in,
    how many bytes of its body have come, and whether it opened beyond the limit. tests/service/test_http_protocol.py
    holds uvicorn to the callbacks it relies on. `guarded_protocol` makes one for a server's limits."""

    max_connections = 1000
    read_timeout_s = 10.0
    metrics: Metrics | None = None
    activity = Activity()  # one per server: guarded_protocol makes a class of its own for each
    _counted = False  # in `activity` and vae_connections_open
    direct: DirectAnswers | None = None  # requests answered past uvicorn's ASGI cycle (fastpath.DirectAnswers)
    _held: list[bytes] | None = None  # the body so far of a request `direct` may answer, held back from uvicorn
    _answering = False  # a request is being answered directly
    _busy = False
    _answer: tuple[float, GuardedHttpProtocol] | None = None
    opened_over_limit = 0  # the open connections when this one opened, where that was over max_connections; else 0
    reading_since: float | None = None  # loop time; None while no request is being read
    head_at: float | None = None
    head_bytes = 0
    head_too_large = False
    body_bytes = 0
    unread_since: float | None = None  # since when the write buffer has not shrunk; None while it is empty
    unread_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.activity.opened(self)
        self._counted = True
        if self.metrics is not None:
            self.metrics.connections_open.inc()
        self.reading_since = self.loop.time()  # its first request is due from now
        if len(self.connections) > self.max_connections:  # this one included
            self.opened_over_limit = len(self.connections)

    def connection_lost(self, exc: Exception | None) -> None:
        self._uncount()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        """uvicorn hands the connection to its WebSocket protocol (which refuses it: the app has no WebSocket routes),
        and this protocol hears nothing of it again: no longer counted here."""
        self._uncount()
        super().handle_websocket_upgrade()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.activity.closed(self)
            if self.metrics is not None:
                self.metrics.connections_open.dec()

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            self.activity.woke(self)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.reading_since is None:
            self.reading_since = self.loop.time()
        self.head_at, self.head_bytes, self.body_bytes = None, 0, 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES:
            self.head_too_large = True
            raise _HeadTooLarge  # stops the parser; uvicorn then answers 400 (send_400_response) and closes

    def send_400_response(self, msg: str) -> None:
        """What httptools could not parse (uvicorn calls this in its handler of the parser's error), or a head over the
        limit: answered and closed."""
        if self.head_too_large:
            self.close_with(431, f"the request's head (its line and headers) is over {MAX_HEAD_BYTES} bytes")
            return
        reason = sys.exc_info()[1]  # httptools' own, e.g. "Invalid header token"
        self.close_with(400, f"the request is not valid HTTP/1.1: {reason or msg}")

    def close_with(self, status: int, detail: str) -> None:
        """Answer a request the app never saw, log and count it as the app does its answers, and close."""
        request_id = self.answer_and_close(status, detail)
        if self.metrics is not None:
            self.metrics.requests.labels(UNPARSED, "", str(status)).inc()
            count_failure(self.metrics, status)
        method = (self.scope or {}).get("method", "")  # what of the head was parsed: its method once all of it was
        log_request(method, getattr(self, "url", b"")[:200].decode("latin-1"), "", status, 0.0, request_id)

    def answer_and_close(self, status: int, detail: str) -> bytes:
        """`status` with `detail` as JSON, as the app answers its errors, and the connection closed after it; its
        X-Request-ID is returned."""
        body = json.dumps({"detail": detail}).encode()
        request_id = request_id_from(None)  # the request's own header may not have been read
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        self._write_answer(status, headers, body, request_id, close=True)
        self.transport.close()
        return request_id

    def _write_answer(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes | memoryview, request_id: bytes, *, close: bool
    ) -> None:
        """An answer's head, uvicorn's default headers first (its date), and body, in one write."""
        head = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers, (b"x-request-id", request_id)]:
            head.extend([name, b": ", value, b"\r\n"])
        if close:
            head.append(b"connection: close\r\n")
        self.transport.write(b"".join(head) + b"\r\n" + body)

    def on_headers_complete(self) -> None:
        self.head_at = self.loop.time()
        direct = self.direct
        if (
            direct is not None and not self._answering and (self.cycle is None or self.cycle.response_complete)
            and not self.opened_over_limit and not self.expect_100_continue and self.parser.should_keep_alive()
            and self.parser.get_http_version() == "1.1" and not self.parser.should_upgrade()
            and direct.takes(self.parser.get_method(), self.url, self.headers)
        ):
            self._held = []  # uvicorn hears of it once its body is in, if at all
            return
        self._held = None
        self._to_uvicorn()

    def _to_uvicorn(self) -> None:
        super().on_headers_complete()
        if self.opened_over_limit:
            self.scope.setdefault("state", {})[OVER_LIMIT] = self.opened_over_limit  # the request's scope

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self._held is None:
            super().on_body(body)
            return
        self._held.append(body)
        if self.direct is not None and self.body_bytes > self.direct.max_body:  # more than it declared: uvicorn's
            self._release()

    def shutdown(self) -> None:
        """uvicorn's, on a graceful shutdown: it lets a request in progress finish, one held for a direct answer too."""
        if self._held is not None:
            self._release()
        super().shutdown()

    def _release(self, body: bytes | None = None) -> None:
        """Hand a held request to uvicorn after all, as if it had never been held: its ASGI task has not run yet.
        `body`: what is held, where the caller has already joined it."""
        if body is None:
            body = b"".join(self._held or ())
        self._held = None
        self._to_uvicorn()
        if body:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.reading_since = None
        if self._held is None:
            super().on_message_complete()
            return
        body = b"".join(self._held)
        parsed = self.direct.parse(self.url, body) if self.direct is not None else None
        if parsed is None:
            self._release(body)
            super().on_message_complete()
            return
        self._held = None
        self._answering = True
        # In uvicorn's place while it is answered: a request pipelined behind it waits in uvicorn's pipeline, and a
        # lost connection or a shutdown is noted on it.
        self.cycle = answering = _Answering(self.scope)  # type: ignore[assignment,arg-type]
        # timed from its head, as the app times a request from the moment uvicorn hands it over
        now = self.loop.time()
        started = time.perf_counter() - (now - (self.head_at or now))
        task = self.loop.create_task(self._answer_directly(answering, parsed, started))
        task.add_done_callback(self.tasks.discard)  # as uvicorn keeps its own: a graceful shutdown waits for them
        self.tasks.add(task)

    async def _answer_directly(self, answering: _Answering, parsed: Any, started: float) -> None:
        assert self.direct is not None
        scope = answering.scope
        request_id = request_id_of(scope["headers"])
        try:
            response = await self.direct.answer(scope, parsed, answering.receive)
        finally:
            self._answering = False
        if not answering.disconnected and not self.transport.is_closing():
            close = not answering.keep_alive
            self._write_answer(response.status_code, response.raw_headers, response.body, request_id, close=close)
        answering.response_complete = True
        if not answering.keep_alive:
            self.transport.close()
        self.on_response_complete()
        self.direct.observe(scope, response.status_code, time.perf_counter() - started, request_id)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # armed: no request pipelined behind this one, none begun
            self.activity.answered(self, self.loop.time())

    @classmethod
    def sweep(cls, connections: Iterable[object], now: float) -> None:
        """Close the connections whose request did not come, or whose answer was not read, in time."""
        closed = 0
        for connection in list(connections):
            if not isinstance(connection, GuardedHttpProtocol):
                continue
            if connection.answer_unread(now):
                connection.transport.abort()  # close() would wait for the client to read it first
                closed += 1
            elif connection.overdue(now):
                connection.time_out()
                closed += 1
        if closed and cls.metrics is not None:
            cls.metrics.connections_timed_out.inc(closed)

    def overdue(self, now: float) -> bool:
        """Whether the request being read (if any) is late by the rule above."""
        if self.reading_since is None or self.transport.is_closing():
            return False
        if self.head_at is None:
            return now > self.reading_since + self.read_timeout_s
        return now > self.head_at + self.read_timeout_s + self.body_bytes / MIN_BODY_BYTES_PER_S

    def answer_unread(self, now: float) -> bool:
        """Whether the answer in the write buffer (what the kernel's socket buffer could not take) has not been read
        from for `read_timeout_s`: the buffer has not shrunk since."""
        size = self.transport.get_write_buffer_size()
        if size == 0:
            self.unread_since = None
            return False
        if self.unread_since is None or size < self.unread_bytes:  # new, or some of it was read: it moves
            self.unread_since, self.unread_bytes = now, size
            return False
        self.unread_bytes = size
        return now > self.unread_since + self.read_timeout_s

    def time_out(self) -> None:
        """Answer 408 unless an answer is already on its way, and close the connection."""
        if self._held is not None:  # a body late for a direct answer: the app answers and logs it, as any other
            self._release()
        cycle = self.cycle
        answering = cycle is not None and not cycle.response_complete
        if self.head_at is not None and answering:
            cycle.scope.setdefault("state", {})[TIMED_OUT] = True  # type: ignore[union-attr]  # its app reads the body
        if (answering and not cycle.response_started) or (self.head_at is None and not answering):  # type: ignore[union-attr]
            self.answer_and_close(408, (
                f"the request did not come in time: its head is due within {self.read_timeout_s:g} s, its body within "
                f"{self.read_timeout_s:g} s more and 1 s per {MIN_BODY_BYTES_PER_S} bytes (VAE_READ_TIMEOUT_S)"
            ))
        else:
            self.transport.close()


def _not_uvicorns_400_warning(record: logging.LogRecord) -> bool:
    """uvicorn logs "Invalid HTTP request received." before it answers what httptools cannot parse; the answer's access
    line (`close_with`) says more: the method and path, where parsed, and the status."""
    return record.msg != "Invalid HTTP request received."


def guarded_protocol(
    settings: Settings, metrics: Metrics, direct: DirectAnswers | None = None
) -> type[GuardedHttpProtocol]:
    """The protocol class for a server with these limits (VAE_MAX_CONNECTIONS, VAE_READ_TIMEOUT_S), counting in
    `metrics`."""
    logging.getLogger("uvicorn.error").addFilter(_not_uvicorns_400_warning)  # once: the same filter is not added twice
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {
        "max_connections": settings.max_connections, "read_timeout_s": settings.read_timeout_s, "metrics": metrics,
        "activity": Activity(), "direct": direct,
    })
