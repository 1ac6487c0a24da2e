"""POST /sample: images from the prior, reproducible by seed."""

from __future__ import annotations

import asyncio
import base64
import json
import math

import httpx
import numpy as np
import pytest
import torch

from service.schemas import ImagesResponse, float32_json, images_json
from service.settings import Settings
from tests.conftest import decode_png, serve
from tests.service.tools import most_significant_digits


async def test_one_image_is_a_png_of_the_model_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/sample", json={"model": "faces", "seed": 1})
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "1"
    image = decode_png(r.content)
    assert image.size == (32, 32) and image.mode == "RGB"


async def test_several_images_come_as_one_grid(client: httpx.AsyncClient) -> None:
    r = await client.post("/sample", json={"model": "mnist", "n": 6, "columns": 3})
    image = decode_png(r.content)
    assert image.mode == "L"
    assert image.size == (3 * 30 + 2, 2 * 30 + 2)  # 28 px tiles, 2 px gaps and border


async def test_json_gives_latents_images_and_the_seed_used(client: httpx.AsyncClient) -> None:
    r = await client.post("/sample", json={"model": "mnist", "n": 3}, headers={"accept": "application/json"})
    body = r.json()
    assert r.headers["content-type"] == "application/json"
    assert body["model"] == "mnist" and isinstance(body["seed"], int)
    assert r.headers["x-seed"] == str(body["seed"])
    assert len(body["latents"]) == 3 and all(len(z) == 2 for z in body["latents"])
    assert [decode_png(base64.b64decode(i)).size for i in body["images"]] == [(28, 28)] * 3


async def test_json_answer_is_what_its_schema_reads_with_the_seeds_latents_as_float32(client: httpx.AsyncClient) -> None:
    r = await client.post("/sample", json={"model": "faces", "n": 2, "seed": 7}, headers={"accept": "application/json"})
    body = ImagesResponse.model_validate_json(r.content)
    assert body.model == "faces" and body.seed == 7 and len(body.images) == 2
    drawn = torch.randn(2, 8, generator=torch.Generator().manual_seed(7)).numpy()
    assert np.array_equal(np.array(body.latents, np.float32), drawn)  # to the bit, read back as float32


@pytest.mark.parametrize("seed", [None, 0, 2**31 - 1])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_images_json_writes_what_its_schema_reads(seed: int | None, n: int) -> None:
    pngs = [bytes(range(i, 40 + 7 * i)) for i in range(n)]
    latents = torch.randn(n, 5, generator=torch.Generator().manual_seed(n)).numpy()
    body = ImagesResponse.model_validate_json(images_json('fa"ces', seed, latents, [base64.b64encode(p) for p in pngs]))
    assert (body.model, body.seed, [base64.b64decode(i) for i in body.images]) == ('fa"ces', seed, pngs)
    assert np.array_equal(np.array(body.latents, np.float32).reshape(n, 5), latents)


def test_numbers_are_float32s_shortest_decimals_and_read_back_to_the_same_float32() -> None:
    values = np.array([[0.1, 0.8032760620117188, -1.5, 0.0, 1e-45, 3.4e38]], np.float32)
    assert float32_json({"z": values}) == b'{"z":[[0.1,0.80327606,-1.5,0.0,1e-45,3.4e+38]]}'
    many = (torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 6, 128)).numpy()
    text = float32_json({"z": many}).decode()
    assert np.array_equal(np.array(json.loads(text)["z"], np.float32), many)
    assert most_significant_digits(text) <= 9


async def test_same_seed_same_bytes_even_under_concurrent_load(client: httpx.AsyncClient) -> None:
    request = {"model": "faces", "n": 3, "seed": 42}
    alone = (await client.post("/sample", json=request)).content
    noise = [client.post("/sample", json={"model": "faces", "n": k % 5 + 1}) for k in range(20)]
    results = await asyncio.gather(*noise, *(client.post("/sample", json=request) for _ in range(5)))
    assert all(r.status_code == 200 for r in results)
    assert all(r.content == alone for r in results[-5:])


async def assert_json_images_are_the_grids_tiles(client: httpx.AsyncClient, request: dict[str, object]) -> None:
    """The JSON answer's images, each once and in order, are the tiles of the grid PNG the same request gives."""
    grid = np.asarray(decode_png((await client.post("/sample", json=request)).content))
    answer = await client.post("/sample", json=request, headers={"accept": "application/json"})
    images = [np.asarray(decode_png(base64.b64decode(i))) for i in answer.json()["images"]]
    n, columns, size = len(images), math.ceil(math.sqrt(len(images))), 32  # the tiny faces model: 32x32
    assert n == request["n"]
    assert grid.shape == (math.ceil(n / columns) * (size + 2) + 2, columns * (size + 2) + 2, 3)
    for i, image in enumerate(images):
        top, left = 2 + (i // columns) * (size + 2), 2 + (i % columns) * (size + 2)
        assert np.array_equal(grid[top : top + size, left : left + size], image), i


async def test_a_grid_holds_the_images_the_same_seed_gives_as_json(client: httpx.AsyncClient) -> None:
    """256 tiles of 32x32 RGB: a PNG large enough to be compressed in parts on several threads."""
    await assert_json_images_are_the_grids_tiles(client, {"model": "faces", "n": 256, "seed": 3})


@pytest.mark.parametrize("spare_core", [False, True], ids=["PNGs on the lanes", "PNGs on the image threads"])
async def test_a_json_answer_decoded_in_parts_holds_every_image_once_in_order(settings: Settings, spare_core: bool) -> None:
    """With two lanes, a request of more images than a lane's batch is decoded in parts. Where the lanes share every
    core, each encodes its own part's PNGs (`Runtime.images_on_batch_thread`); with a core to spare, the image threads
    encode them, a lone request's in parts of half a batch. Either way the answer is whole and in order."""
    async with serve(settings.model_copy(update={"cpu_lanes": 2, "torch_threads": 2, "device": "cpu"})) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        runtime.spare_core = spare_core  # as on a machine with more cores than torch threads
        assert runtime.images_on_batch_thread is not spare_core
        request = {"model": "faces", "n": 2 * runtime.max_batch_size + 3, "seed": 4}
        await assert_json_images_are_the_grids_tiles(client, request)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
async def test_one_image_is_the_same_whichever_thread_draws_its_latents(
    client: httpx.AsyncClient, temperature: float
) -> None:
    """A one-image PNG answer draws its latents on the batch's thread, a JSON answer on the event loop (it returns
    them): the seed's own generator gives the same latents, so the same image, on either."""
    request = {"model": "faces", "seed": 9, "temperature": temperature}
    png = (await client.post("/sample", json=request)).content
    body = (await client.post("/sample", json=request, headers={"accept": "application/json"})).json()
    z = torch.randn(1, len(body["latents"][0]), generator=torch.Generator().manual_seed(9)) * temperature
    assert torch.tensor(body["latents"]).allclose(z) and base64.b64decode(body["images"][0]) == png


async def test_temperature_zero_is_rejected(client: httpx.AsyncClient) -> None:
    r = await client.post("/sample", json={"model": "faces", "temperature": 0})
    assert r.status_code == 422
    assert "temperature" in str(r.json()["detail"])


async def test_n_over_the_limit_says_the_limit(client: httpx.AsyncClient) -> None:
    r = await client.post("/sample", json={"model": "mnist", "n": 10**9})
    assert r.status_code == 422
    assert "256" in r.json()["detail"]


async def test_unknown_model_is_404_naming_the_served_ones(client: httpx.AsyncClient) -> None:
    r = await client.post("/sample", json={"model": "cats"})
    assert r.status_code == 404
    assert "faces" in r.json()["detail"] and "mnist" in r.json()["detail"]


async def test_pngs_stored_without_deflate_are_larger_and_show_the_same_pixels(settings: Settings) -> None:
    """VAE_PNG_COMPRESSION=none: more images a second where bandwidth is cheaper than CPU."""
    answers: dict[str, list[bytes]] = {}
    for compression in ("fast", "none"):
        async with serve(settings.model_copy(update={"png_compression": compression})) as client:
            one = await client.post("/sample", json={"model": "faces", "n": 1, "seed": 5})
            grid = await client.post("/sample", json={"model": "faces", "n": 4, "seed": 5})
            as_json = await client.post("/sample", json={"model": "faces", "n": 3, "seed": 5}, headers={"accept": "application/json"})
            assert one.status_code == grid.status_code == as_json.status_code == 200
            answers[compression] = [one.content, grid.content] + [base64.b64decode(i) for i in as_json.json()["images"]]
    for fast, stored in zip(answers["fast"], answers["none"], strict=True):
        assert len(stored) > len(fast)
        difference = np.asarray(decode_png(stored), dtype=int) - np.asarray(decode_png(fast), dtype=int)
        assert np.abs(difference).max() <= 1  # a seed reproduces to within one level
