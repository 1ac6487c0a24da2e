"""The uvicorn server as vae-serve runs it: limits, and a drain on SIGTERM. Its log lines: log_writer.configure_logging."""

from __future__ import annotations

import asyncio
import math
import signal

import uvicorn
from fastapi import FastAPI

from service.http_protocol import GuardedHttpProtocol, guarded_protocol
from service.settings import Settings


def config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our JSON handler (log_writer.configure_logging)
        access_log=False,  # our own access line carries the model and the duration
        # X-Forwarded-* would only change a request's client address and scheme, which nothing here reads: without
        # uvicorn's middleware for them every request takes one pass less (app.VaeServe)
        proxy_headers=False,
        server_header=False,  # "server: uvicorn" on every answer tells a scanner what to try, and a client nothing
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),  # int(0.5) or None would wait forever
        # No limit_concurrency: uvicorn counts its request tasks against it too, and a task answered stays in that count
        # until the next pass of the event loop. A batch answers many requests in one pass and their clients send again
        # at once, so 990 connections with a limit of 1,000 got thousands of 503s, answered by uvicorn, past the access
        # log and the metrics. VAE_MAX_CONNECTIONS counts open connections alone, as each opens (the protocol below),
        # and app.LimitsAndAccessLog answers the requests of those beyond it.
        workers=1,  # several processes: VAE_WORKERS (service/workers.py), not uvicorn's
        # VAE_MAX_CONNECTIONS, VAE_READ_TIMEOUT_S and a limit on request heads (service/http_protocol.py)
        http=guarded_protocol(settings, app.state.metrics),
    )


# A connection answered longer ago than this, with no request since, is idle (a proxy's pool, a client gone quiet): its
# client is not counted on to send a request soon. A client that sends its next request as soon as it is answered
# does so within a fraction of a millisecond (wrk on loopback, 2 cores).
IDLE_AFTER_S = 0.005


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, turn /readyz to 503 at once, then let uvicorn stop accepting and drain. Tells the app how many
    client connections are active (`active_connections`, for the batchers' waits for company)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        config.app.state.active_connections = self.active_connections  # type: ignore[union-attr]

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick (every 0.1 s), and about once a second (more often for a timeout under 4 s) the protocol's
        sweep of connections whose request did not come, or whose answer was not read, in time."""
        protocol = self.config.http_protocol_class
        if issubclass(protocol, GuardedHttpProtocol) and counter % max(1, min(10, int(protocol.read_timeout_s * 2.5))) == 0:
            protocol.sweep(self.server_state.connections, asyncio.get_running_loop().time())
        return await super().on_tick(counter)

    def active_connections(self) -> int:
        """Open client connections, less those idle for IDLE_AFTER_S or more. From the event loop. A connection is idle
        while uvicorn's keep-alive timer runs (`timeout_keep_alive_task`), which it arms as it answers a request and
        cancels when the next one comes; one without it (a request in progress, a new connection) is active.
        tests/service/test_server.py holds uvicorn to this. A scan: 58 us at 1,000 open connections, 1 us at one."""
        answered_before = asyncio.get_running_loop().time() - IDLE_AFTER_S + self.config.timeout_keep_alive
        active = 0
        for connection in self.server_state.connections:
            timer = getattr(connection, "timeout_keep_alive_task", None)
            if timer is None or timer.when() > answered_before:  # armed at its answer, to fire timeout_keep_alive later
                active += 1
        return active

    def handle_exit(self, sig: int, frame: object) -> None:
        runtime = getattr(self.config.app.state, "runtime", None)  # type: ignore[union-attr]
        if runtime is not None:
            runtime.draining = True
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        # uvicorn re-raises a caught signal once it has shut down, which would end the process with -15 although
        # the drain finished: a drained stop on SIGTERM is a clean exit (0). SIGINT keeps its KeyboardInterrupt.
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)
