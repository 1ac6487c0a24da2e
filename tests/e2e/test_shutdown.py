"""Graceful shutdown: on SIGTERM the server turns unready, refuses new work, finishes what it admitted (within
VAE_DRAIN_TIMEOUT_S) and exits with 0. The e2e tests drive `python -m service` under load; the in-process ones
check the same steps where their timing can be controlled."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import torch
import uvicorn

from service import imaging
from service.app import create_app
from service.runtime import IMAGE_THREADS
from service.server import DrainingServer
from service.settings import Settings
from tests.conftest import REPO, serve
from tests.e2e.server import free_port
from tests.service.tools import wrap_models

_T = TypeVar("_T")

# --- the real server ---------------------------------------------------------------------------------------------


@contextmanager
def server_process(model_dir: Path, log: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`python -m service` on 127.0.0.1 logging to a file (a pipe nobody reads would block it under load);
    yields (base URL, process) once ready, and kills the process at the end whatever happened."""
    port = free_port()
    environment = {**os.environ, "VAE_MODEL_DIR": str(model_dir), "VAE_PORT": str(port), "VAE_HOST": "127.0.0.1",
                   "VAE_TORCH_THREADS": "1", **env}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service"], env=environment, cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not ready(url):
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not become ready in 30 s"
            time.sleep(0.05)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class Outcome:
    started: float  # time.monotonic(); relative to the SIGTERM once the run is over
    ended: float
    result: int | str  # the status code, or the name of the transport error


async def keep_sending(url: str, path: str, body: dict[str, object] | None, into: list[Outcome],
                       stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = await (client.post(path, json=body) if body else client.get(path))
                result: int | str = r.status_code
            except httpx.TransportError as exc:
                result = type(exc).__name__
            into.append(Outcome(started, time.monotonic(), result))
            await asyncio.sleep(0.005)


async def sigterm_under_load(url: str, process: subprocess.Popen[bytes], clients: int,
                             exit_within_s: float) -> tuple[list[Outcome], list[Outcome], float]:
    """Send slow requests from `clients` clients and poll /readyz; SIGTERM the server after a second and go on
    until it has exited. Returns the requests and the probes (times relative to the SIGTERM) and the exit time."""
    requests: list[Outcome] = []
    probes: list[Outcome] = []
    stop = asyncio.Event()
    body = {"model": "faces", "n": 256}
    senders = [keep_sending(url, "/sample", body, requests, stop) for _ in range(clients)]
    tasks = [asyncio.create_task(s) for s in [*senders, keep_sending(url, "/readyz", None, probes, stop)]]
    try:
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, exit_within_s)
        exited = time.monotonic() - killed
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert returncode == 0, returncode

    def relative(outcomes: list[Outcome]) -> list[Outcome]:
        return [Outcome(o.started - killed, o.ended - killed, o.result) for o in outcomes]

    return relative(requests), relative(probes), exited


@pytest.mark.e2e
async def test_sigterm_under_load_finishes_admitted_requests_refuses_new_ones_and_exits_0(
    tiny_models: Path, tmp_path: Path
) -> None:
    # One image per model call: a request for 256 images from one of six clients takes about a second.
    log = tmp_path / "server.log"
    with server_process(tiny_models, log, VAE_MAX_BATCH_SIZE="1", VAE_DRAIN_TIMEOUT_S="10") as (url, process):
        requests, probes, exited = await sigterm_under_load(url, process, clients=6, exit_within_s=20)
    before = [o for o in requests if o.started < -0.1]  # surely admitted before the SIGTERM
    assert any(o.ended > 0.05 for o in before), "no request was in flight at the SIGTERM"
    assert all(o.result == 200 for o in before), [o.result for o in before]  # every one answered, none cut
    after = [o.result for o in requests if o.started > 0.05]
    assert all(r == 503 or isinstance(r, str) for r in after)  # refused (503), or not accepted at all
    assert "ConnectError" in after  # the listening socket closed while the admitted requests finished
    assert all(o.result != 200 for o in probes if o.started > 0.05)  # /readyz turned unready at once
    assert exited < 12
    text = log.read_text()
    assert "Application shutdown complete" in text and "Traceback" not in text


@pytest.mark.e2e
async def test_sigterm_with_more_work_than_the_drain_timeout_exits_0_in_bounded_time(
    tiny_models: Path, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with server_process(tiny_models, log, VAE_MAX_BATCH_SIZE="1", VAE_DRAIN_TIMEOUT_S="1") as (url, process):
        requests, _, exited = await sigterm_under_load(url, process, clients=16, exit_within_s=15)
    assert exited < 1 + 1 + 3  # the HTTP drain, the batchers' drain, the model call that was running, slack
    assert any(o.started < -0.1 and o.result != 200 for o in requests)  # admitted work past the timeout was cut


# --- the same steps in-process -----------------------------------------------------------------------------------


async def test_on_sigterm_readyz_turns_503_at_once_and_new_work_is_refused(settings: Settings) -> None:
    async with serve(settings) as client:
        server = DrainingServer(uvicorn.Config(client.app))  # type: ignore[attr-defined]
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit
        readyz = await client.get("/readyz")
        assert readyz.status_code == 503
        assert readyz.json() == {"status": "draining", "models": {"mnist": "ready", "faces": "ready"}}
        r = await client.post("/sample", json={"model": "faces"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["detail"] == "the service is shutting down"
        assert (await client.get("/healthz")).status_code == 200  # alive: do not restart it, let it finish


def model_taking(seconds: float, calls: list[int]) -> object:
    def hook(model: str, op: str, inputs: torch.Tensor) -> None:
        calls.append(len(inputs))
        time.sleep(seconds)

    return hook


async def test_draining_lets_every_admitted_request_finish(settings: Settings,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    wrap_models(monkeypatch, model_taking(0.05, calls))  # type: ignore[arg-type]
    app = create_app(settings.model_copy(update={"max_batch_size": 1, "drain_timeout_s": 10}))
    async with app.router.lifespan_context(app):
        await app.state.loading
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            admitted = [asyncio.create_task(client.post("/sample", json={"model": "faces", "n": 4})) for _ in range(5)]
            await asyncio.sleep(0.1)
            draining = asyncio.create_task(app.state.runtime.drain())
            await asyncio.sleep(0)
            late = await client.post("/sample", json={"model": "faces"})
            assert late.status_code == 503
            assert [r.status_code for r in await asyncio.gather(*admitted)] == [200] * 5
            await draining
    assert len(calls) == 20  # every admitted image was computed


async def test_draining_waits_for_requests_whose_pngs_are_still_queued(settings: Settings,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Event()

    def slow(encode: Callable[..., _T]) -> Callable[..., _T]:
        def slow_png(*args: object, **kwargs: object) -> _T:
            started.set()
            time.sleep(0.2)
            return encode(*args, **kwargs)

        return slow_png

    for name in ("png_bytes", "png_files"):  # one image's, or a batch's
        monkeypatch.setattr(imaging, name, slow(getattr(imaging, name)))
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.loading
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            # more requests than image threads: some PNGs wait in the pool's queue while the batchers are idle
            admitted = [asyncio.create_task(client.post("/sample", json={"model": "faces"}))
                        for _ in range(IMAGE_THREADS + 2)]
            assert await asyncio.to_thread(started.wait, 10)
            await app.state.runtime.drain()
            assert [r.status_code for r in await asyncio.gather(*admitted)] == [200] * (IMAGE_THREADS + 2)


async def test_a_drain_past_its_timeout_still_answers_every_waiting_request_at_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, calls = threading.Event(), []

    def stuck(model: str, op: str, inputs: torch.Tensor) -> None:
        calls.append(len(inputs))
        release.wait(10)

    wrap_models(monkeypatch, stuck)
    app = create_app(settings.model_copy(update={"drain_timeout_s": 0.2, "request_timeout_s": 30}))
    async with app.router.lifespan_context(app):
        await app.state.loading
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            running = asyncio.create_task(client.post("/sample", json={"model": "faces"}))
            await asyncio.sleep(0.05)
            queued = [asyncio.create_task(client.post("/sample", json={"model": "faces"})) for _ in range(3)]
            await asyncio.sleep(0.05)
            started = time.monotonic()
            await app.state.runtime.drain()
            answers = await asyncio.wait_for(asyncio.gather(running, *queued), timeout=5)  # none waits for 30 s
            release.set()
    assert time.monotonic() - started < 3
    for r in answers:
        assert r.status_code == 503 and r.json()["detail"] == "the service is shutting down"
    assert calls == [1]
