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
        http=guarded_protocol(settings, app.state.metrics, app.state.direct),
    )


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, turn /readyz to 503 at once, then let uvicorn stop accepting and drain. On vae-serve's protocol
    (`config`), tells the app how many client connections are active (`active_connections`, for the batchers' waits
    for company)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        if isinstance(config.http, type) and issubclass(config.http, GuardedHttpProtocol):
            self.activity = config.http.activity
            config.app.state.active_connections = self.active_connections  # type: ignore[union-attr]

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick (every 0.1 s), and about once a second (more often for a timeout under 4 s) the protocol's
        sweep of connections whose request did not come, or whose answer was not read, in time."""
        protocol = self.config.http_protocol_class
        if issubclass(protocol, GuardedHttpProtocol) and counter % max(1, min(10, int(protocol.read_timeout_s * 2.5))) == 0:
            protocol.sweep(self.server_state.connections, asyncio.get_running_loop().time())
        return await super().on_tick(counter)

    def active_connections(self) -> int:
        """Open client connections, less those idle for IDLE_AFTER_S or more (`http_protocol.Activity`). From the event
        loop."""
        return self.activity.count(asyncio.get_running_loop().time())

    def handle_exit(self, sig: int, frame: object) -> None:
        runtime = getattr(self.config.app.state, "runtime", None)  # type: ignore[union-attr]
        if runtime is not None:
            runtime.draining = True
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        # uvicorn re-raises a caught signal once it has shut down, which would end the process with -15 although
        # the drain finished: a drained stop on SIGTERM is a clean exit (0). SIGINT keeps its KeyboardInterrupt.
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)
