"""VAE_WORKERS > 1: several server processes on one port, for hosts where one Python process is the limit.

On a GPU the model is rarely what limits the service: one process answers some 1,000-1,400 small requests/s,
its event loop and the GIL busy, while the GPU idles (bench/README.md, *On a GPU*). Each worker is a whole
server: it loads every model (onto the same GPU), batches its own requests, and drains on SIGTERM. It accepts
connections only once its models are loaded, so a worker that is starting never answers 503 "still loading".
The parent binds the socket, starts the workers, replaces one that dies, and on SIGTERM or SIGINT stops them
all and waits for their drains.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from typing import Any

from prometheus_client import multiprocess

from service.log_writer import configure_logging
from service.settings import Settings

log = logging.getLogger("vae_serve.workers")

STARTUP_TIMEOUT_S = 300.0  # a worker not serving by then is stopped, and the service with it
RESTART_DELAY_S = 1.0  # between a worker's death and its replacement: no busy loop if it keeps dying


def supervise(settings: Settings, overrides: dict[str, Any]) -> int:
    """Run settings.workers server processes until SIGTERM or SIGINT; 0 once they drained, 1 if one failed to start."""
    # Workers are fresh interpreters (spawn: a process cannot fork with CUDA or OpenMP threads running) that read
    # their settings from the environment, so the command line's go there. prometheus_client reads
    # PROMETHEUS_MULTIPROC_DIR when it is imported: it must be set before any worker starts.
    for name, value in overrides.items():
        os.environ[f"VAE_{name.upper()}"] = str(value)
    metrics_dir = tempfile.mkdtemp(prefix="vae-serve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.create_server((settings.host, settings.port), family=family, backlog=2048)
    log.info("serving on %s:%d with %d workers", settings.host, sock.getsockname()[1], settings.workers)

    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda sig, frame: stop.append(sig))
    context = multiprocessing.get_context("spawn")

    def start() -> _Worker:
        ready = context.Event()
        process = context.Process(target=_serve, args=(sock, ready, os.getpid()), name="vae-serve-worker")
        process.start()
        return _Worker(process, ready, time.monotonic())

    workers = [start() for _ in range(settings.workers)]
    failed = False
    try:
        while not stop and not failed:
            time.sleep(0.2)
            for i, worker in enumerate(workers):
                if stop or failed:
                    break
                if worker.process.is_alive():
                    if not worker.ready.is_set() and time.monotonic() - worker.started > STARTUP_TIMEOUT_S:
                        log.error("worker %d did not serve within %.0f s: stopping", worker.process.pid, STARTUP_TIMEOUT_S)
                        failed = True
                    continue
                _forget(worker.process.pid)
                code = worker.process.exitcode
                if not worker.ready.is_set() and code is not None and code > 0:  # its own error: a new one would fail alike
                    log.error("worker %d failed before it served (exit code %s): stopping", worker.process.pid, code)
                    failed = True
                    continue
                log.error("worker %d exited with %s: starting another", worker.process.pid, code)
                time.sleep(RESTART_DELAY_S)
                workers[i] = start()
    finally:
        for worker in workers:
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, signal.SIGTERM)  # each drains (VAE_DRAIN_TIMEOUT_S), then exits 0
        for worker in workers:
            worker.process.join(settings.drain_timeout_s + 10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    codes = [w.process.exitcode for w in workers]
    log.info("stopped %d workers (exit codes %s)", len(workers), codes)
    if failed:
        return 1
    return 130 if signal.SIGINT in stop else 0


@dataclass
class _Worker:
    process: SpawnProcess
    ready: Event  # set by the worker once it accepts connections
    started: float  # time.monotonic()


def _forget(pid: int | None) -> None:
    """A dead worker's gauges leave the sums (live modes); its counters stay, as a counter must."""
    if pid is not None:
        multiprocess.mark_process_dead(pid)


def _serve(sock: socket.socket, ready: Event, parent: int) -> None:
    """One server process: load the models, then accept connections on the shared socket until SIGTERM or until
    `parent`, the supervisor, is gone (it may die before this process has even started)."""
    os.setpgid(0, 0)  # Ctrl-C in a terminal reaches the parent alone, which stops every worker the same way
    from service import server
    from service.app import create_app

    settings = Settings()
    configure_logging(settings.log_level)
    worker = server.DrainingServer(server.config(create_app(settings, wait_for_models=True), settings))

    def watch() -> None:
        while os.getppid() == parent:  # a parent killed outright (SIGKILL) must not leave workers behind
            if worker.started and not ready.is_set():  # the lifespan has loaded the models: serving from now on
                ready.set()
            time.sleep(1 if ready.is_set() else 0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()
    try:
        worker.run(sockets=[sock])
    finally:
        logging.shutdown()  # a spawned process ends with os._exit, without atexit: write the kept log lines now
    if os.getppid() != parent:  # the supervisor died without cleaning up: its workers remove the metrics folder
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
