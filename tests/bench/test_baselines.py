"""The general-purpose baselines the bench measures vae-serve against do the same work per image as vae-serve."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bench.baselines import asgi_app, fastapi_app

APPS = {"fastapi": fastapi_app, "asgi": asgi_app}


def client(models: Path, server: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=APPS[server](models / "faces", "cpu"))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.mark.parametrize("server", APPS)
async def test_the_in_process_baselines_answer_one_png_of_the_models_size(tiny_models: Path, server: str) -> None:
    async with client(tiny_models, server) as c:
        assert (await c.get("/health")).status_code == 200
        r = await c.post("/sample", json={"model": "faces", "n": 1})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)


@pytest.mark.parametrize("server", APPS)
async def test_the_in_process_baselines_serve_one_image_per_request_only(tiny_models: Path, server: str) -> None:
    async with client(tiny_models, server) as c:
        assert (await c.post("/sample", json={"model": "faces", "n": 2})).status_code == 422


def test_the_litserve_baseline_turns_a_batch_of_requests_into_one_png_each(tiny_models: Path) -> None:
    pytest.importorskip("litserve", reason="the bench extra installs LitServe")
    from bench.baselines import SampleRequest
    from bench.litserve_baseline import LitVAE

    api = LitVAE(tiny_models / "faces", max_batch_size=4, batch_timeout=0.002, api_path="/sample")
    api.setup("cpu")
    z = api.batch([api.decode_request(SampleRequest(model="faces")) for _ in range(3)])
    assert z.shape == (3, 8) and not torch.equal(z[0], z[1])  # each request draws its own latents
    pngs = [api.encode_response(pixels).body for pixels in api.unbatch(api.predict(z))]
    assert [np.asarray(Image.open(io.BytesIO(data))).shape for data in pngs] == [(32, 32, 3)] * 3
