"""Overload: far more requests than the queue holds. Excess requests get 429 at once (with Retry-After), admitted
ones complete with 200, memory stays bounded, and a request past its deadline gets 504."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter

import httpx
import pytest
import torch

from service import imaging
from service.http_protocol import OVER_LIMIT
from service.settings import Settings
from tests.conftest import png, serve
from tests.service.tools import peak_memory_growth, post_scope, serve_with_hook

MODEL_SECONDS = 0.02  # a stand-in model that takes this long per batch, whatever its size


def slow_model(model: str, op: str, inputs: torch.Tensor) -> None:
    time.sleep(MODEL_SECONDS)


@pytest.fixture
def overload_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"queue_size": 8, "max_batch_size": 4})


async def timed_post(client: httpx.AsyncClient, path: str, **kwargs: object) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = await client.post(path, **kwargs)  # type: ignore[arg-type]
    return response, time.perf_counter() - started


async def test_a_burst_of_400_requests_gets_429_at_once_for_the_excess_and_200_for_the_admitted(
    overload_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_with_hook(overload_settings, monkeypatch, slow_model) as client:
        with peak_memory_growth() as growth:
            results = await asyncio.gather(
                *(timed_post(client, "/sample", json={"model": "faces", "seed": i}) for i in range(400))
            )
        statuses = Counter(r.status_code for r, _ in results)
        assert set(statuses) == {200, 429}, statuses
        assert statuses[200] >= 8  # at least a queue's worth was admitted
        admitted = [seconds for r, seconds in results if r.status_code == 200]
        for r, seconds in results:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert "images queued (limit 8)" in r.json()["detail"]
                assert seconds < max(admitted)  # refused before the admitted work was done, not after it
        assert growth[0] < 200 * 2**20
        assert (await client.post("/sample", json={"model": "faces"})).status_code == 200


async def client_loop(client: httpx.AsyncClient, until: float, statuses: Counter[int], slowest_429: list[float],
                      body: dict[str, object]) -> None:
    while time.monotonic() < until:
        r, seconds = await timed_post(client, "/sample", json=body)
        statuses[r.status_code] += 1
        if r.status_code == 429:
            assert r.headers["retry-after"]
            slowest_429[0] = max(slowest_429[0], seconds)


async def test_sustained_overload_from_300_clients_keeps_the_service_up_with_bounded_memory(
    overload_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_with_hook(overload_settings, monkeypatch, slow_model) as client:
        statuses: Counter[int] = Counter()
        slowest_429 = [0.0]
        until = time.monotonic() + 3
        with peak_memory_growth() as growth:
            bodies: list[dict[str, object]] = [{"model": ("faces", "mnist")[i % 2], "n": 1 + i % 3} for i in range(300)]
            await asyncio.gather(*(client_loop(client, until, statuses, slowest_429, body) for body in bodies))
        assert set(statuses) == {200, 429}, statuses
        assert statuses[200] >= 8 and statuses[429] > statuses[200]  # admitted ones complete, the excess is refused
        assert slowest_429[0] < 3  # a refusal never waits for the model (0.6 s here: 300 clients on one event loop)
        assert growth[0] < 300 * 2**20
        # Afterwards: ready, nothing left queued, and every refusal counted as such.
        assert (await client.get("/readyz")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'vae_queue_depth_images{model="faces",op="decode"} 0.0' in metrics
        assert f'vae_failures_total{{reason="rejected"}} {float(statuses[429])}' in metrics
        assert (await client.post("/sample", json={"model": "faces", "n": 4})).status_code == 200


async def test_encode_under_overload_also_answers_only_200_or_429(
    overload_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = base64.b64encode(png(size=(32, 32))).decode()
    async with serve_with_hook(overload_settings, monkeypatch, slow_model) as client:
        results = await asyncio.gather(
            *(timed_post(client, "/encode", json={"model": "faces", "images": [image]}) for _ in range(200))
        )
        statuses = Counter(r.status_code for r, _ in results)
        assert set(statuses) == {200, 429}, statuses
        assert all(r.headers["retry-after"] == "1" for r, _ in results if r.status_code == 429)


async def test_a_request_past_its_deadline_gets_504_at_the_deadline_and_is_never_computed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    calls: list[int] = []

    def stuck_model(model: str, op: str, z: torch.Tensor) -> None:
        calls.append(len(z))
        release.wait(10)  # holds the one model thread until the test lets go

    async with serve_with_hook(settings.model_copy(update={"request_timeout_s": 0.3}), monkeypatch, stuck_model) as c:
        running = asyncio.create_task(timed_post(c, "/sample", json={"model": "faces", "n": 1}))
        await asyncio.sleep(0.05)
        queued, seconds = await timed_post(c, "/sample", json={"model": "faces", "n": 2})
        assert queued.status_code == 504
        assert queued.json()["detail"] == "no answer from model 'faces' within 0.3s"
        assert 0.25 < seconds < 2
        first, _ = await running
        assert first.status_code == 504
        release.set()
        ok, _ = await timed_post(c, "/sample", json={"model": "faces", "n": 3})
        assert ok.status_code == 200
        assert calls == [1, 3]  # the expired request of 2 images was dropped from the queue, not computed
        assert 'vae_failures_total{reason="timeout"} 2.0' in (await c.get("/metrics")).text


async def test_a_full_encode_queue_refuses_uploads_before_decoding_them(
    overload_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = []
    decode = imaging._decoded

    def counting(*args: object) -> object:
        decoded.append(1)
        return decode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(imaging, "_decoded", counting)
    upload = png(size=(32, 32))
    async with serve_with_hook(overload_settings, monkeypatch, slow_model) as client:
        responses = await asyncio.gather(
            *(client.post("/encode", data={"model": "faces"}, files={"image": upload}) for _ in range(40))
        )
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 429} and statuses[200] >= 8, statuses
    assert len(decoded) == statuses[200]  # every refused upload was refused before it was decoded


async def test_a_request_on_a_connection_beyond_the_limit_gets_503_closes_it_and_is_counted(settings: Settings) -> None:
    answers: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b'{"model": "faces"}', "more_body": False}

    async def send(message: dict[str, object]) -> None:
        answers.append(message)

    async with serve(settings.model_copy(update={"max_connections": 2})) as client:
        scope = post_scope("/sample", "application/json", 18)
        scope["state"] = {OVER_LIMIT: 3}  # as the server's protocol marks a connection that opened third
        await client.app(scope, receive, send)  # type: ignore[attr-defined]
        served = await client.post("/sample", json={"model": "faces"})
        metrics = (await client.get("/metrics")).text
    head, body = answers
    assert head["status"] == 503
    assert (b"connection", b"close") in head["headers"] and (b"retry-after", b"1") in head["headers"]  # type: ignore[operator]
    detail = json.loads(body["body"])["detail"]  # type: ignore[arg-type]
    assert "3 connections open when this one opened, and serves at most 2 (VAE_MAX_CONNECTIONS)" in detail
    assert served.status_code == 200
    assert 'vae_failures_total{reason="rejected"} 1.0' in metrics
    assert 'vae_requests_total{endpoint="unmatched",model="",status="503"} 1.0' in metrics


async def test_bodies_over_the_budget_held_at_once_get_503_until_the_held_ones_are_done(settings: Settings) -> None:
    body = json.dumps({"model": "faces", "n": 1}).encode().ljust(4000)  # valid JSON padded to 4 KB
    limits = {"max_body_bytes": 4096, "max_body_bytes_in_flight": 6000}  # room for one such body at a time
    async with serve(settings.model_copy(update=limits)) as client:
        rest_sent, answers, parts = asyncio.Event(), [], [body[:100], body[100:]]

        async def receive() -> dict[str, object]:  # a client that sends the first 100 bytes, then the rest later
            if len(parts) == 1:
                await rest_sent.wait()
            return {"type": "http.request", "body": parts.pop(0), "more_body": len(parts) == 1}

        async def send(message: dict[str, object]) -> None:
            answers.append(message)

        scope = post_scope("/sample", "application/json", len(body))
        held = asyncio.create_task(client.app(scope, receive, send))  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        refused = await client.post("/sample", content=body, headers={"content-type": "application/json"})
        rest_sent.set()
        await held
        served = await client.post("/sample", content=body, headers={"content-type": "application/json"})
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
    assert "VAE_MAX_BODY_BYTES_IN_FLIGHT" in refused.json()["detail"]
    assert answers[0]["status"] == 200 and served.status_code == 200
