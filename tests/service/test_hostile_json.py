"""Hostile JSON and bodies: every malformed, mistyped, absurd or oversized request gets a clear 4xx, never a 500."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.conftest import png, serve
from tests.service.tools import peak_memory_growth

JSON = {"content-type": "application/json"}
WANTS_JSON = {"accept": "application/json"}
VALID: dict[str, dict[str, Any]] = {
    "/sample": {"model": "mnist", "n": 2},
    "/decode": {"model": "mnist", "z": [[0.0, 0.0]]},
    "/interpolate": {"model": "mnist", "start": {"z": [0.0, 0.0]}, "end": {"z": [1.0, 1.0]}, "steps": 3},
    "/encode": {"model": "mnist", "images": [base64.b64encode(png()).decode()]},
}
ENDPOINTS = list(VALID)


def issues(r: httpx.Response) -> list[dict[str, Any]]:
    """The 422 detail of a schema violation: [{type, loc, msg}, ...]."""
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    assert all(set(issue) == {"type", "loc", "msg"} for issue in detail)  # never the input itself
    return detail


@pytest.fixture(scope="module")
async def client(tiny_models: Path) -> AsyncIterator[httpx.AsyncClient]:
    """One app for the module: these requests change nothing, and loading the models per test adds up."""
    async with serve(Settings(model_dir=tiny_models, max_wait_ms=1.0)) as c:
        yield c


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_every_valid_example_is_served(client: httpx.AsyncClient, path: str) -> None:
    r = await client.post(path, json=VALID[path])
    assert r.status_code == 200, r.text  # the baseline the hostile variants below are made from


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("body", [b'{"model": "mnist",', b"{'model': 'mnist'}", b"model=mnist", b"\x00\x01",
                                  b"", b"null", b"[]", b'"mnist"', b"42"])
async def test_malformed_or_non_object_json_is_422(client: httpx.AsyncClient, path: str, body: bytes) -> None:
    r = await client.post(path, content=body, headers=JSON)
    assert issues(r)[0]["type"] in {"json_invalid", "model_attributes_type", "model_type", "missing", "dict_type"}


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_a_body_that_is_not_utf8_is_a_clear_4xx(client: httpx.AsyncClient, path: str) -> None:
    r = await client.post(path, content=b'{"model": "\xff\xfe"}', headers=JSON)
    assert r.status_code in (400, 422)
    assert "utf-8" in str(r.json()["detail"]).lower() or "unicode" in str(r.json()["detail"]).lower()  # what to fix


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_missing_fields_are_named(client: httpx.AsyncClient, path: str) -> None:
    for field in VALID[path]:
        body = {k: v for k, v in VALID[path].items() if k != field}
        r = await client.post(path, json=body)
        if field in ("n", "steps"):  # these have defaults
            assert r.status_code == 200
            continue
        assert {"type": "missing", "loc": ["body", field]} in [{k: i[k] for k in ("type", "loc")} for i in issues(r)]


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_extra_fields_are_refused_by_name(client: httpx.AsyncClient, path: str) -> None:
    r = await client.post(path, json={**VALID[path], "temperatur": 0.5})
    assert {"type": "extra_forbidden", "loc": ["body", "temperatur"]} in [
        {k: i[k] for k in ("type", "loc")} for i in issues(r)
    ]


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/sample", "model", 5),
        ("/sample", "model", ["mnist"]),
        ("/sample", "n", "many"),
        ("/sample", "n", 1.5),
        ("/sample", "seed", "abc"),
        ("/sample", "columns", {}),
        ("/decode", "z", "0,0"),
        ("/decode", "z", [0.0, 0.0]),
        ("/decode", "z", [["0", "zero"]]),
        ("/decode", "z", [[None, None]]),
        ("/interpolate", "start", [0.0, 0.0]),
        ("/interpolate", "method", "cubic"),
        ("/interpolate", "steps", [8]),
        ("/encode", "images", "iVBORw0KGgo"),
        ("/encode", "images", [1, 2]),
        ("/encode", "invert", "sometimes"),
    ],
)
async def test_wrong_types_are_422_at_their_location(client: httpx.AsyncClient, path: str, field: str,
                                                     value: object) -> None:
    r = await client.post(path, json={**VALID[path], field: value})
    assert issues(r)[0]["loc"][:2] == ["body", field]


@pytest.mark.parametrize(("n", "message"), [(0, "greater than or equal to 1"), (-5, "greater than or equal to 1"),
                                            (10**9, "at most 256"), (10**30, "at most 256")])
async def test_n_out_of_range_is_422_saying_the_bound(client: httpx.AsyncClient, n: int, message: str) -> None:
    r = await client.post("/sample", json={"model": "mnist", "n": n})
    assert r.status_code == 422
    assert message in str(r.json()["detail"])


@pytest.mark.parametrize("temperature", ["0", "-1", "-0.0", "1e-400", "11", "NaN", "Infinity", "-Infinity", "1e999"])
async def test_a_temperature_that_is_not_a_positive_finite_number_up_to_10_is_422(
    client: httpx.AsyncClient, temperature: str
) -> None:
    r = await client.post("/sample", content=f'{{"model": "mnist", "temperature": {temperature}}}', headers=JSON)
    assert issues(r)[0]["loc"] == ["body", "temperature"]
    if temperature in ("NaN", "Infinity", "-Infinity"):
        assert "finite" in issues(r)[0]["msg"]  # not "should be less than or equal to 10", which NaN is not either


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_non_finite_latents_are_422_in_decode_and_interpolate(client: httpx.AsyncClient, token: str) -> None:
    decode = await client.post("/decode", content=f'{{"model": "mnist", "z": [[0, {token}]]}}', headers=JSON)
    start = f'{{"model": "mnist", "start": {{"z": [{token}, 0]}}, "end": {{"z": [0, 0]}}}}'
    interpolate = await client.post("/interpolate", content=start, headers=JSON)
    assert issues(decode)[0]["loc"] == ["body", "z", 0, 1] and "finite" in issues(decode)[0]["msg"]
    assert issues(interpolate)[0]["loc"] == ["body", "start", "z", 0]


@pytest.mark.parametrize("value", [1e39, -1e39, 1e30, 3e4])
async def test_finite_but_absurd_latents_are_422_not_an_overflow(client: httpx.AsyncClient, value: float) -> None:
    # 1e39 overflows float32 to inf, and slerp's norms overflow long before: both once answered 500.
    decode = await client.post("/decode", json={"model": "mnist", "z": [[value, 0.0]]}, headers=WANTS_JSON)
    slerp = await client.post(
        "/interpolate", headers=WANTS_JSON,
        json={"model": "mnist", "start": {"z": [value, value]}, "end": {"z": [-value, value]}, "method": "slerp"},
    )
    for r in (decode, slerp):
        assert "than or equal to" in issues(r)[0]["msg"] and "10000" in issues(r)[0]["msg"]


async def test_the_largest_accepted_latents_still_give_valid_json(client: httpx.AsyncClient) -> None:
    body = {"model": "faces", "start": {"z": [1e4] * 8}, "end": {"z": [-1e4] * 8}, "method": "slerp", "steps": 4}
    r = await client.post("/interpolate", json=body, headers=WANTS_JSON)
    assert r.status_code == 200
    assert len(r.json()["images"]) == 4


@pytest.mark.parametrize(("model", "body"), [
    ("mnist", {"z": [[0.0, 0.0, 0.0]]}),
    ("faces", {"z": [[0.0] * 8, [0.0] * 7]}),
    ("mnist", {"start": {"z": [0.0]}, "end": {"z": [0.0, 0.0]}}),
    ("mnist", {"start": {"z": [0.0, 0.0]}, "end": {"z": [0.0] * 4096}}),
])
async def test_latents_of_the_wrong_size_are_422_naming_the_row_and_the_size(
    client: httpx.AsyncClient, model: str, body: dict[str, Any]
) -> None:
    path = "/decode" if "z" in body else "/interpolate"
    r = await client.post(path, json={"model": model, **body})
    assert r.status_code == 422
    assert "takes latents of size" in r.json()["detail"]


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_deeply_nested_arrays_are_a_clear_4xx(client: httpx.AsyncClient, path: str) -> None:
    depth = 100_000
    field = {"/sample": "n", "/decode": "z", "/interpolate": "start", "/encode": "images"}[path]
    body = f'{{"model": "mnist", "{field}": ' + "[" * depth + "]" * depth + "}"
    r = await client.post(path, content=body, headers=JSON)
    assert r.status_code in (400, 422)  # FastAPI's parser gives up with 400, pydantic's with 422
    assert len(r.content) < 1000
    assert "nested" in str(r.json()["detail"]) or "recursion" in str(r.json()["detail"])  # not only "an error"


async def test_a_very_long_latent_row_is_422_without_decoding(client: httpx.AsyncClient) -> None:
    r = await client.post("/decode", json={"model": "mnist", "z": [[0.5] * 1_000_000]})
    assert issues(r)[0]["type"] == "too_long"


async def test_too_many_latent_rows_is_422_with_the_limit(client: httpx.AsyncClient) -> None:
    r = await client.post("/decode", json={"model": "mnist", "z": [[0.0, 0.0]] * 100_000})
    assert r.status_code == 422
    assert "at most 256" in r.json()["detail"]


@pytest.mark.parametrize("path", ["/decode", "/encode"])
async def test_millions_of_wrong_values_give_one_error_in_bounded_time_and_memory(
    client: httpx.AsyncClient, path: str
) -> None:
    rows = ",".join(["[" + ",".join(['"x"'] * 4000) + "]"] * 300)  # 1.2 million bad numbers, 4.8 MB
    body = f'{{"model": "mnist", "z": [{rows}]}}' if path == "/decode" else f'{{"model": "mnist", "images": [{rows}]}}'
    started = time.perf_counter()
    with peak_memory_growth() as growth:
        r = await client.post(path, content=body, headers=JSON)
    assert len(issues(r)) == 1
    assert time.perf_counter() - started < 5
    assert growth[0] < 300 * 2**20  # one error per value took 1.5 GB for 4 million of them


async def test_an_unknown_model_is_404_naming_the_served_ones(client: httpx.AsyncClient) -> None:
    for path in ENDPOINTS:
        r = await client.post(path, json={**VALID[path], "model": "cats"})
        assert r.status_code == 404, path
        assert "'cats'" in r.json()["detail"] and "faces, mnist" in r.json()["detail"]


async def test_a_model_name_over_100_characters_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/sample", json={"model": "m" * 101})
    assert issues(r)[0]["type"] == "string_too_long"


@pytest.fixture
async def small_limit(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings.model_copy(update={"max_body_bytes": 64 * 1024})) as client:
        yield client


class Chunks:
    """A streamed body (chunked, no Content-Length) that counts how much of it was read."""

    def __init__(self, first: bytes, filler: bytes = b"0", chunk_bytes: int = 16 * 1024, total_bytes: int = 2**22):
        self.first, self.filler, self.chunk_bytes, self.total_bytes = first, filler, chunk_bytes, total_bytes
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.first
        self.sent += len(self.first)
        while self.sent < self.total_bytes:
            yield self.filler * self.chunk_bytes
            self.sent += self.chunk_bytes


async def test_a_body_over_the_limit_with_a_content_length_is_413_before_it_is_read(
    small_limit: httpx.AsyncClient,
) -> None:
    body = Chunks(b'{"model": "mnist", "z": [[')
    r = await small_limit.post("/decode", content=body, headers={**JSON, "content-length": str(2**22)})
    assert r.status_code == 413
    assert r.json()["detail"] == "the request body is over the 65536-byte limit"
    assert body.sent <= 16 * 1024 + 100  # the app read nothing beyond what the transport had buffered


@pytest.mark.parametrize("path", ["/sample", "/decode", "/interpolate", "/encode"])
async def test_a_streamed_body_over_the_limit_is_413_before_it_is_all_read(
    small_limit: httpx.AsyncClient, path: str
) -> None:
    body = Chunks(b'{"model": "mnist", "images": ["' if path == "/encode" else b'{"model": "mnist", "z": [[')
    r = await small_limit.post(path, content=body, headers=JSON)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413, r.text
    assert "65536-byte limit" in r.json()["detail"]
    assert body.sent < 64 * 1024 + 2 * 16 * 1024  # stopped at the limit, not at 4 MB


async def test_a_streamed_multipart_upload_over_the_limit_is_413(small_limit: httpx.AsyncClient) -> None:
    head = (b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nmnist\r\n'
            b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    body = Chunks(head)
    r = await small_limit.post("/encode", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413, r.text
    assert body.sent < 64 * 1024 + 2 * 16 * 1024


async def test_a_body_just_under_the_limit_is_read(small_limit: httpx.AsyncClient) -> None:
    padding = " " * (64 * 1024 - 200)
    r = await small_limit.post("/sample", content=f'{{"model": "mnist",{padding}"n": 1}}', headers=JSON)
    assert r.status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml",
                                          "image/png", "multipart/mixed; boundary=x"])
async def test_encode_with_an_unsupported_content_type_is_415(client: httpx.AsyncClient, content_type: str) -> None:
    r = await client.post("/encode", content=json.dumps(VALID["/encode"]), headers={"content-type": content_type})
    assert r.status_code == 415
    assert "multipart/form-data" in r.json()["detail"] and "JSON" in r.json()["detail"]


@pytest.mark.parametrize("path", ["/sample", "/decode", "/interpolate"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])  # curl -d's default
async def test_a_json_endpoint_given_another_content_type_is_415_naming_the_header_to_send(
    client: httpx.AsyncClient, path: str, content_type: str
) -> None:
    r = await client.post(path, content=json.dumps(VALID[path]), headers={"content-type": content_type})
    assert r.status_code == 415  # not a guess at JSON
    assert "Content-Type: application/json" in r.json()["detail"] and content_type in r.json()["detail"]


async def test_a_json_body_without_a_content_type_is_415_saying_the_header_is_missing(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/sample", content=json.dumps(VALID["/sample"]))
    assert r.status_code == 415
    assert r.json()["detail"].endswith("(it was missing)")


async def test_a_json_media_type_of_its_own_is_read_as_json(client: httpx.AsyncClient) -> None:
    r = await client.post("/sample", content=json.dumps(VALID["/sample"]),
                          headers={"content-type": "application/vnd.api+json"})
    assert r.status_code == 200, r.text


async def test_a_body_of_another_content_type_with_invalid_fields_is_still_415(client: httpx.AsyncClient) -> None:
    r = await client.post("/sample", content=b"n=2", headers={"content-type": "text/plain; charset=utf-8"})
    assert r.status_code == 415


@pytest.mark.parametrize(("body", "loc"), [
    ({"model": "mnist", "seed": -1}, "seed"),
    ({"model": "mnist", "seed": 2**64}, "seed"),
    ({"model": "mnist", "n": 4, "columns": 0}, "columns"),
    ({"model": "mnist", "n": 4, "columns": 10**6}, "columns"),
])
async def test_seed_and_columns_out_of_range_are_422(client: httpx.AsyncClient, body: dict[str, Any], loc: str) -> None:
    assert issues(await client.post("/sample", json=body))[0]["loc"] == ["body", loc]


@pytest.mark.parametrize(("steps", "status"), [(1, 422), (0, 422), (-3, 422), (64, 200), (65, 422), (10**9, 422)])
async def test_interpolation_steps_out_of_range_are_422(client: httpx.AsyncClient, steps: int, status: int) -> None:
    body = {**VALID["/interpolate"], "steps": steps}
    assert (await client.post("/interpolate", json=body)).status_code == status


async def test_after_all_that_the_service_still_serves(client: httpx.AsyncClient) -> None:
    await client.post("/decode", content=b'{"model": "mnist", "z": [[NaN, 1e999]]}', headers=JSON)
    await client.post("/sample", content=b"[" * 50_000, headers=JSON)
    r = await client.post("/sample", json={"model": "faces", "n": 4, "seed": 1})
    assert r.status_code == 200
    assert (await client.get("/readyz")).status_code == 200
