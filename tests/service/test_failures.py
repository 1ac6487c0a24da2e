"""Failures inside the service: a model that raises, runs out of memory or answers garbage, an internal bug,
requests while loading. Every request gets a clear answer without a stack trace, and the service carries on."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
from collections.abc import AsyncIterator
from typing import Never

import httpx
import pytest
import torch

import service.imaging
import service.runtime
from service.app import create_app
from service.settings import Settings
from tests.conftest import png
from tests.service.tools import StandIn, post_scope, serve_with_hook

POISON = 13.0  # a latent coordinate the stand-in model chokes on


def assert_clean_error(r: httpx.Response, status: int) -> str:
    """The answer is `status` with a one-line JSON detail: no stack trace, no source paths."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    assert "Traceback" not in r.text and 'File "' not in r.text and ".py" not in r.text
    return detail


async def test_a_model_that_raises_fails_every_request_of_that_batch_and_only_those(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    release, batches = threading.Event(), []

    def choking_model(model: str, op: str, z: torch.Tensor) -> None:
        batches.append(len(z))
        release.wait(5)
        if (z == POISON).any():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    async with serve_with_hook(settings, monkeypatch, choking_model) as client:
        def decode(first: float) -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(client.post("/decode", json={"model": "mnist", "z": [[first, 0.0]]}))

        blocker = decode(0.0)  # holds the model thread, so that the next three queue up and share one batch
        await asyncio.sleep(0.05)
        shared = [decode(1.0), decode(POISON), decode(2.0)]
        await asyncio.sleep(0.05)
        release.set()
        assert (await blocker).status_code == 200
        for r in await asyncio.gather(*shared):
            assert assert_clean_error(r, 500) == "model 'mnist' failed on this batch: RuntimeError"
        assert batches == [1, 3]
        later = await asyncio.gather(decode(1.0), decode(2.0))  # the next batches run normally
        assert [r.status_code for r in later] == [200, 200]
        assert (await client.get("/readyz")).status_code == 200
        assert 'vae_failures_total{reason="internal"} 3.0' in (await client.get("/metrics")).text
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR and "failed" in r.getMessage()]
    assert len(failed) == 1  # one line per failed batch, with the exception for the operator
    assert "a batch of 3 images failed" in failed[0].getMessage() and failed[0].exc_info is not None


async def test_an_encoder_that_raises_gives_500_to_encode_and_to_interpolate_between_images(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_encoder(model: str, op: str, x: torch.Tensor) -> None:
        if op == "encode":
            raise ValueError("bad input")

    async with serve_with_hook(settings, monkeypatch, broken_encoder) as client:
        image = base64.b64encode(png()).decode()
        encode = await client.post("/encode", json={"model": "faces", "images": [image]})
        body = {"model": "faces", "start": {"image": image}, "end": {"z": [0] * 8}}
        strip = await client.post("/interpolate", json=body)
        assert assert_clean_error(encode, 500) == "model 'faces' failed on this batch: ValueError"
        assert assert_clean_error(strip, 500) == "model 'faces' failed on this batch: ValueError"
        assert (await client.post("/sample", json={"model": "faces"})).status_code == 200  # decode is unaffected


async def test_non_finite_model_output_is_a_500_not_nulls_or_black_images(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nan_encode(self: StandIn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_var = self.module.encode(x)
        return mu * float("nan"), log_var

    def inf_decode(self: StandIn, z: torch.Tensor) -> torch.Tensor:
        return self.module.decode(z) / 0.0

    monkeypatch.setattr(StandIn, "encode", nan_encode)
    monkeypatch.setattr(StandIn, "decode", inf_decode)
    async with serve_with_hook(settings, monkeypatch, lambda *_: None) as client:
        encode = await client.post("/encode", json={"model": "faces", "images": [base64.b64encode(png()).decode()]})
        sample = await client.post("/sample", json={"model": "faces"})
        assert assert_clean_error(encode, 500) == "model 'faces' failed on this batch: InvalidOutput"
        assert assert_clean_error(sample, 500) == "model 'faces' failed on this batch: InvalidOutput"


async def test_out_of_memory_splits_the_batch_and_gives_the_same_images(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fits: list[int | None] = [None]  # the largest batch that "fits in memory"; None: any
    sizes: list[int] = []

    def small_gpu(model: str, op: str, z: torch.Tensor) -> None:
        sizes.append(len(z))
        if fits[0] is not None and len(z) > fits[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    async with serve_with_hook(settings, monkeypatch, small_gpu) as client:
        request = {"model": "faces", "n": 8, "seed": 3}
        roomy = await client.post("/sample", json=request)
        fits[0], sizes[:] = 2, []
        cramped = await client.post("/sample", json=request)
        assert cramped.status_code == 200
        assert cramped.content == roomy.content
        assert sizes == [8, 4, 2, 2, 4, 2, 2]
        fits[0] = 0  # not even one image fits: a clear error, and the service goes on
        assert assert_clean_error(await client.post("/sample", json=request), 500).endswith(": OutOfMemoryError")
        fits[0] = None
        assert (await client.post("/sample", json=request)).content == roomy.content
    assert any("ran out of memory on a batch of 8" in r.getMessage() for r in caplog.records)


async def test_an_internal_bug_is_a_500_that_points_to_the_log_without_details(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_png(*_: object, **__: object) -> Never:
        raise KeyError("secret internal state")

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.loading
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # answer as a real server would
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            monkeypatch.setattr(service.imaging, "png_bytes", broken_png)  # one image's PNG, or a batch's
            monkeypatch.setattr(service.imaging, "png_files", broken_png)
            r = await client.post("/sample", json={"model": "faces"})
            assert assert_clean_error(r, 500) == "internal error; the server log has the details"
            assert "secret" not in r.text
            monkeypatch.undo()
            assert (await client.post("/sample", json={"model": "faces"})).status_code == 200
    logged = [rec for rec in caplog.records if rec.getMessage() == "unhandled error"]
    assert len(logged) == 1 and logged[0].exc_info is not None


@pytest.fixture
async def loading_client(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        tuple[httpx.AsyncClient, threading.Event]]:
    """A client whose app is still loading its models until the event is set."""
    loaded = threading.Event()
    load_model = service.runtime.load_model

    def slow_load(*args: object) -> object:
        loaded.wait(10)
        return load_model(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(service.runtime, "load_model", slow_load)
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client, loaded
        loaded.set()
        await app.state.loading


async def test_requests_while_the_models_load_get_503_with_retry_after_not_500(
    loading_client: tuple[httpx.AsyncClient, threading.Event],
) -> None:
    client, loaded = loading_client
    for r in (await client.post("/sample", json={"model": "faces"}), await client.get("/models"),
              await client.post("/encode", json={"model": "faces", "images": [base64.b64encode(png()).decode()]})):
        assert assert_clean_error(r, 503) == "the models are still loading"
        assert r.headers["retry-after"] == "5"
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).json()["status"] == "loading"
    loaded.set()
    for _ in range(200):
        if (await client.get("/readyz")).status_code == 200:
            break
        await asyncio.sleep(0.02)
    assert (await client.post("/sample", json={"model": "faces"})).status_code == 200


@pytest.mark.parametrize(
    ("path", "content_type", "partial_body"),
    [
        ("/sample", "application/json", b'{"model": "fa'),
        ("/encode", "multipart/form-data; boundary=b", b'--b\r\ncontent-disposition: form-data; name="model"\r\n\r\nfaces'),
        ("/encode", "application/json", b'{"model": "faces", "images": ["iVBO'),
        ("/sample", "text/plain", b'{"model": "fa'),  # a JSON route's body sent as text
    ],
)
async def test_a_client_gone_before_its_body_is_in_is_logged_499_and_counted_apart_from_server_errors(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, path: str, content_type: str, partial_body: bytes
) -> None:
    messages = iter([
        {"type": "http.request", "body": partial_body, "more_body": True},
        {"type": "http.disconnect"},
    ])

    async def receive() -> dict[str, object]:
        return next(messages)

    async def send(message: dict[str, object]) -> None:
        pass

    with caplog.at_level(logging.INFO):
        await client.app(post_scope(path, content_type, 1000), receive, send)  # type: ignore[attr-defined]
    metrics = (await client.get("/metrics")).text
    assert [record.status for record in caplog.records if record.name == "vae_serve.access"] == [499]  # type: ignore[attr-defined]
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]  # no "unhandled error"
    assert 'vae_failures_total{reason="disconnected"} 1.0' in metrics
    assert 'vae_failures_total{reason="internal"}' not in metrics
