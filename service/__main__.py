"""vae-serve / python -m service: run the HTTP service on the model repository."""

from __future__ import annotations

import os

# Before torch loads: libgomp, torch's OpenMP runtime, reads this once. Its default lets idle workers spin for
# 300 000 rounds after every op, and under load those spinning cores are the ones the PNG and HTTP
# threads need. Measured on 2 cores (bench/README.md): 3000 lifts faces n=1 at 64 connections by ~6% and leaves a
# lone request's latency as it was; sleeping at once (OMP_WAIT_POLICY=passive) slows every batch-1 decode by a third.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

import argparse
import logging
import math
import signal
import sys
from pathlib import Path

import uvicorn

from service.app import create_app, log_format
from service.settings import Settings


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return log_format(record)


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, turn /readyz to 503 at once, then let uvicorn stop accepting and drain."""

    def handle_exit(self, sig: int, frame: object) -> None:
        runtime = getattr(self.config.app.state, "runtime", None)  # type: ignore[union-attr]
        if runtime is not None:
            runtime.draining = True
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        # uvicorn re-raises a caught signal once it has shut down, which would end the process with -15 although
        # the drain finished: a drained stop on SIGTERM is a clean exit (0). SIGINT keeps its KeyboardInterrupt.
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vae-serve", description=__doc__)
    parser.add_argument("--model-dir", type=Path, help="model repository (VAE_MODEL_DIR)")
    parser.add_argument("--host", help="bind address (VAE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (VAE_PORT, default 8000)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (VAE_DEVICE)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)

    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our JSON handler above
        access_log=False,  # our own access line carries the model and the duration
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),  # int(0.5) or None would wait forever
        # uvicorn answers 503 once the open connections, this one included, reach the limit: + 1 lets max_connections in
        limit_concurrency=settings.max_connections + 1,
        workers=1,  # one process: several would load several copies of the models and split batches
    )
    server = _DrainingServer(config)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
