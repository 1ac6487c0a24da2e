"""What the service tests share: stand-in models that are slow, block or fail on cue, a memory probe, a reading of
the numbers in a JSON answer, and the server as `python -m service` runs it."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import service.runtime
from service.app import create_app
from service.repository import ServedModel
from service.runtime import Runtime
from service.server import DrainingServer, config
from service.settings import Settings
from tests.conftest import serve


def most_significant_digits(json_text: str) -> int:
    """The most significant digits any number in `json_text` is written with: 9 at most for float32's shortest
    decimals, 16-17 for the float64 a float32 becomes in Python."""
    mantissas = (m.split("e")[0].split("E")[0] for m in re.findall(r"-?\d[\d.eE+-]*", json_text))
    return max((len(m.lstrip("-").replace(".", "").lstrip("0").rstrip("0")) for m in mantissas), default=0)


# hook(model, op, inputs) runs on the model thread before the real call: it may sleep, block or raise.
Hook = Callable[[str, str, torch.Tensor], None]


class StandIn:
    """A loaded model whose encode and decode call `hook` first, then the real TorchScript module."""

    def __init__(self, name: str, module: Any, hook: Hook) -> None:
        self.name, self.module, self.hook = name, module, hook

    def encode(self, x: torch.Tensor) -> Any:
        self.hook(self.name, "encode", x)
        return self.module.encode(x)

    def decode(self, z: torch.Tensor) -> Any:
        self.hook(self.name, "decode", z)
        return self.module.decode(z)


def wrap_models(monkeypatch: pytest.MonkeyPatch, hook: Hook) -> None:
    """From now on, every model that loads (and passes its warm-up) is served through a StandIn calling `hook`."""
    load_model = service.runtime.load_model

    def load_and_wrap(directory: Path, device: torch.device, *args: Any) -> ServedModel:
        served = load_model(directory, device, *args)
        served.graphs = {}  # on CUDA: calls go through the module, where the hook sees them
        if served.ready:
            served.module = StandIn(served.name, served.module, hook)
        return served

    monkeypatch.setattr(service.runtime, "load_model", load_and_wrap)


@asynccontextmanager
async def serve_with_hook(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, hook: Hook
) -> AsyncIterator[httpx.AsyncClient]:
    """`serve(settings)` with its models wrapped in StandIns calling `hook`."""
    wrap_models(monkeypatch, hook)
    async with serve(settings) as client:
        yield client


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:  # Linux: size, resident, ... in pages
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory_growth() -> Iterator[list[int]]:
    """Samples this process's resident memory every few ms; the yielded list ends up holding the peak growth."""
    start, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], resident_bytes() - start)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


def post_scope(path: str, content_type: str, content_length: int) -> dict[str, Any]:
    """The ASGI scope of a POST as uvicorn passes it, for a test that plays the client's side of `receive` itself."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [
            (b"host", b"test"), (b"content-type", content_type.encode()), (b"content-length", str(content_length).encode())
        ],
        "client": ("127.0.0.1", 5000), "server": ("test", 80),
    }


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    """The next answer on a kept-alive connection to a real server: its status, headers (names in lower case) and
    body."""
    lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
    headers = {name.lower(): value for name, value in (line.split(b": ", 1) for line in lines[1:] if line)}
    return int(lines[0].split(b" ")[1]), headers, await reader.readexactly(int(headers[b"content-length"]))


async def healthz_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """GET /healthz on a kept-alive connection to a real server; the answer's status code, its body read."""
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
    status, _, _ = await read_answer(reader)
    return b"%d" % status


@asynccontextmanager
async def running(settings: Settings, *, direct: bool = True) -> AsyncIterator[tuple[int, DrainingServer]]:
    """The server as `python -m service` runs it, in this event loop: (its port, the server). `direct=False`: without
    the protocol's direct answers (fastpath.DirectAnswers), every request through uvicorn's ASGI cycle and the app."""
    app = create_app(settings, wait_for_models=True)
    if not direct:
        app.state.direct = None
    served = DrainingServer(config(app, settings))
    serving = asyncio.create_task(served.serve())
    while not served.started:
        await asyncio.sleep(0.01)
    try:
        yield served.servers[0].sockets[0].getsockname()[1], served
    finally:
        served.should_exit = True
        await serving


def images_on_batch_thread(monkeypatch: pytest.MonkeyPatch, value: bool) -> None:
    """`Runtime.images_on_batch_thread` made `value`, whatever lanes and cores this machine gives the test app."""
    monkeypatch.setattr(Runtime, "images_on_batch_thread", property(lambda self: value))
