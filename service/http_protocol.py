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

- **Connections beyond VAE_MAX_CONNECTIONS.** A connection opened while the server already has that many is marked, and
  its requests get 503 from the app (`app.LimitsAndAccessLog`, which logs and counts them) and close it. The
  connections opened before it are served as ever: a flood of new connections does not take the server from the
  clients it serves. (uvicorn's own limit answered every request with 503 while the count was over.)

The server's sweep (`server.DrainingServer.on_tick`) checks every connection for the first two about once a second.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MIN_BODY_BYTES_PER_S = 1024
MAX_HEAD_BYTES = 64 * 1024  # nginx reads up to 32 KiB of headers by default, Apache about 800 KiB, uvicorn's h11 16 KiB
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
# What a request that took too long is answered, where nothing else is being written on its connection. The request's
# own answer, if its app is still reading it, is logged as 408 too (app.LimitsAndAccessLog reads TIMED_OUT).
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)
TIMED_OUT = "vae_serve.read_timed_out"  # set in the request's scope["state"] when its connection is closed for it
OVER_LIMIT = "vae_serve.connections_open"  # in the scope["state"] of a request on a connection beyond the limit


class _HeadTooLarge(Exception):
    pass


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, noting when the request being read began, the size of its head and when it was in,
    how many bytes of its body have come, and whether it opened beyond the limit. tests/service/test_http_protocol.py
    holds uvicorn to the callbacks it relies on. `guarded_protocol` makes one for a server's limits."""

    max_connections = 1000
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
        self.reading_since = self.loop.time()  # its first request is due from now
        if len(self.connections) > self.max_connections:  # this one included
            self.opened_over_limit = len(self.connections)

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
        if not self.head_too_large:
            super().send_400_response(msg)
            return
        message = f"the request's head (its line and headers) is over {MAX_HEAD_BYTES} bytes".encode()
        self.transport.write(_HEAD_TOO_LARGE % (len(message), message))
        self.transport.close()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.head_at = self.loop.time()
        if self.opened_over_limit:
            self.scope.setdefault("state", {})[OVER_LIMIT] = self.opened_over_limit  # the request's scope

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.reading_since = None

    def overdue(self, now: float, timeout_s: float) -> bool:
        """Whether the request being read (if any) is late by the rule above."""
        if self.reading_since is None or self.transport.is_closing():
            return False
        if self.head_at is None:
            return now > self.reading_since + timeout_s
        return now > self.head_at + timeout_s + self.body_bytes / MIN_BODY_BYTES_PER_S

    def answer_unread(self, now: float, timeout_s: float) -> bool:
        """Whether the answer in the write buffer (what the kernel's socket buffer could not take) has not been read
        from for `timeout_s`: the buffer has not shrunk since."""
        size = self.transport.get_write_buffer_size()
        if size == 0:
            self.unread_since = None
            return False
        if self.unread_since is None or size < self.unread_bytes:  # new, or some of it was read: it moves
            self.unread_since, self.unread_bytes = now, size
            return False
        self.unread_bytes = size
        return now > self.unread_since + timeout_s

    def time_out(self, timeout_s: float) -> None:
        """Answer 408 unless an answer is already on its way, and close the connection."""
        cycle = self.cycle
        answering = cycle is not None and not cycle.response_complete
        if self.head_at is not None and answering:
            cycle.scope.setdefault("state", {})[TIMED_OUT] = True  # type: ignore[union-attr]  # its app reads the body
        if (answering and not cycle.response_started) or (self.head_at is None and not answering):  # type: ignore[union-attr]
            message = (
                f"the request did not come in time: its head is due within {timeout_s:g} s, its body within "
                f"{timeout_s:g} s more and 1 s per {MIN_BODY_BYTES_PER_S} bytes (VAE_READ_TIMEOUT_S)"
            ).encode()
            self.transport.write(_REQUEST_TIMEOUT % (len(message), message))
        self.transport.close()


def guarded_protocol(max_connections: int) -> type[GuardedHttpProtocol]:
    """The protocol class for a server that serves at most `max_connections` connections at once."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"max_connections": max_connections})
