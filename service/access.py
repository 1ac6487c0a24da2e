"""What an answered request leaves behind besides its answer: its reason in `vae_failures_total`, if it failed, and
one access line. The app's middleware (`app.LimitsAndAccessLog`) records the requests that reach the app, the HTTP
protocol (`http_protocol.GuardedHttpProtocol`) those it answers itself, before any route: both through here, so that
the two keep one line format and one set of reasons."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

from service.metrics import Metrics

access_log = logging.getLogger("vae_serve.access")
# nginx's status for a request whose client closed its connection before the answer: not the server's error (5xx) nor
# the client's mistake (4xx), and counted apart (`vae_failures_total{reason="disconnected"}`)
CLIENT_CLOSED_REQUEST = 499
_REASONS = {429: "rejected", 503: "rejected", 504: "timeout", CLIENT_CLOSED_REQUEST: "disconnected"}
# Seeded from os.urandom once (as routes' seeds; workers are spawned, each seeds its own). secrets.token_hex read
# os.urandom for every id: a system call that lets go of the GIL, on the event loop a hand-over to a busy lane and a wait
# to get it back (7% of the loop's busy samples, faces at 64 connections; requests/s the same, the cores were full
# anyway). An id names a request among others; it guards nothing.
_IDS = random.Random()


def count_failure(metrics: Metrics, status: int) -> None:
    """Count a failed answer by its reason: rejected (429, 503), timeout (504), disconnected (499), invalid (any other
    4xx but 404), internal (5xx). Successes and 404s are not failures."""
    reason = _REASONS.get(status)
    if reason is None and 400 <= status < 500 and status != 404:
        reason = "invalid"
    if reason is None and status >= 500:
        reason = "internal"
    if reason:
        metrics.failures.labels(reason).inc()


def request_id_from(sent: bytes | None) -> bytes:
    """A request's X-Request-ID, echoed in its answer and written in its access line: the one its client (or a proxy)
    sent, if that is 1-200 printable ASCII characters, else 16 random hex digits of the server's own."""
    if sent and len(sent) <= 200 and sent.isascii() and sent.decode("ascii").isprintable():
        return sent
    return b"%016x" % _IDS.getrandbits(64)


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """`request_id_from` the first X-Request-ID among a request's headers (names in lower case, as ASGI has them), on
    every path a request can take: the app's, a direct answer's, a refused WebSocket's."""
    return request_id_from(next((value for name, value in headers if name == b"x-request-id"), None))


def log_request(method: str, path: str, model: str, status: int, seconds: float, request_id: bytes) -> None:
    access_log.info("request", extra={
        "method": method, "path": path[:200], "model": model, "status": status, "duration_ms": round(seconds * 1000, 2),
        "request_id": request_id.decode("ascii"),  # its line among many
    })
