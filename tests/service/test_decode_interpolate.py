"""POST /decode and POST /interpolate."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from tests.conftest import decode_png, png


async def test_decode_returns_one_image_per_row(client: httpx.AsyncClient) -> None:
    r = await client.post("/decode", json={"model": "mnist", "z": [[0, 0], [1, -1], [2, 2]]},
                          headers={"accept": "application/json"})
    assert r.status_code == 200
    assert len(r.json()["images"]) == 3
    assert r.json()["latents"] == [[0, 0], [1, -1], [2, 2]]


async def test_decode_png_is_a_grid(client: httpx.AsyncClient) -> None:
    r = await client.post("/decode", json={"model": "faces", "z": [[0.0] * 8] * 4, "columns": 4})
    assert r.headers["content-type"] == "image/png"
    assert decode_png(r.content).size == (4 * 34 + 2, 34 + 2)


async def test_decode_is_deterministic(client: httpx.AsyncClient) -> None:
    body = {"model": "faces", "z": [[0.5] * 8]}
    first, second = (await client.post("/decode", json=body)), (await client.post("/decode", json=body))
    assert first.content == second.content


@pytest.mark.parametrize(
    ("z", "message"),
    [([[0.0] * 3], "size 2"), ([], "at least 1"), ([[0, "x"]], "number")],
)
async def test_bad_latents_are_422_saying_what_is_wrong(client: httpx.AsyncClient, z: object, message: str) -> None:
    r = await client.post("/decode", json={"model": "mnist", "z": z})
    assert r.status_code == 422
    assert message in str(r.json()["detail"])


async def test_non_finite_latents_are_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/decode", content=b'{"model": "mnist", "z": [[NaN, 0]]}',
                          headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "finite" in str(r.json()["detail"])


async def test_interpolation_includes_both_ends(client: httpx.AsyncClient) -> None:
    body = {"model": "mnist", "start": {"z": [-2, 0]}, "end": {"z": [2, 1]}, "steps": 5}
    r = await client.post("/interpolate", json=body, headers={"accept": "application/json"})
    latents = np.array(r.json()["latents"])
    assert latents.shape == (5, 2)
    np.testing.assert_allclose(latents[0], [-2, 0])
    np.testing.assert_allclose(latents[-1], [2, 1])
    np.testing.assert_allclose(latents[2], [0, 0.5])


async def test_slerp_keeps_the_norm_between_equal_norm_ends(client: httpx.AsyncClient) -> None:
    body = {"model": "mnist", "start": {"z": [1, 0]}, "end": {"z": [0, 1]}, "steps": 4, "method": "slerp"}
    r = await client.post("/interpolate", json=body, headers={"accept": "application/json"})
    np.testing.assert_allclose(np.linalg.norm(r.json()["latents"], axis=1), 1.0, atol=1e-5)


async def test_interpolation_between_images_starts_at_their_means(client: httpx.AsyncClient) -> None:
    a, b = png(size=(40, 40)), png(np.zeros((40, 40, 3), dtype=np.uint8))
    encoded = await client.post("/encode", json={"model": "faces", "images": [base64.b64encode(a).decode(), base64.b64encode(b).decode()]})
    body = {
        "model": "faces",
        "start": {"image": base64.b64encode(a).decode()},
        "end": {"image": base64.b64encode(b).decode()},
        "steps": 3,
    }
    r = await client.post("/interpolate", json=body, headers={"accept": "application/json"})
    latents = np.array(r.json()["latents"])
    np.testing.assert_allclose(latents[[0, -1]], encoded.json()["mu"], atol=1e-5)


async def test_interpolation_png_is_one_strip(client: httpx.AsyncClient) -> None:
    body = {"model": "mnist", "start": {"z": [0, 0]}, "end": {"z": [1, 1]}, "steps": 8}
    r = await client.post("/interpolate", json=body)
    assert decode_png(r.content).size == (8 * 30 + 2, 30 + 2)


async def test_an_endpoint_needs_exactly_one_of_z_or_image(client: httpx.AsyncClient) -> None:
    body = {"model": "mnist", "start": {"z": [0, 0], "image": "x"}, "end": {"z": [1, 1]}}
    r = await client.post("/interpolate", json=body)
    assert r.status_code == 422
    assert "exactly one" in str(r.json()["detail"])


async def test_too_many_steps_is_422_with_the_limit(client: httpx.AsyncClient) -> None:
    body = {"model": "mnist", "start": {"z": [0, 0]}, "end": {"z": [1, 1]}, "steps": 1000}
    r = await client.post("/interpolate", json=body)
    assert r.status_code == 422 and "64" in r.json()["detail"]
