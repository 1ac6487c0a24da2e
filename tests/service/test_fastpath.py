"""POST /sample, /decode and /interpolate with a JSON body, and POST /encode, take a lean path past FastAPI's layers
(service/fastpath.py). Every answer on it is the one FastAPI gives; whatever it does not take as it is goes to FastAPI
unchanged."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from service import fastpath
from service.app import VaeServe
from service.schemas import SampleRequest
from service.settings import Settings
from tests.conftest import png, serve

JSON = {"content-type": "application/json"}
VIA_FASTAPI = {"content-type": "application/vnd.test+json"}  # FastAPI reads it as JSON; the lean path leaves it

CASES: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    ("/sample", {"model": "mnist", "n": 3, "seed": 7}, {}),
    ("/sample", {"model": "mnist", "n": 2, "seed": 7, "temperature": 0.5}, {"accept": "application/json"}),
    ("/sample", {"model": "mnist", "n": 100_000}, {}),  # over the server's limit: the route's 422
    ("/sample", {"model": "no-such-model"}, {}),  # 404 from the app's exception handler
    ("/sample", {"model": "mnist", "n": 0}, {}),  # invalid: the validation error
    ("/decode", {"model": "mnist", "z": [[0.5, -0.5], [0, 1]]}, {}),
    ("/decode", {"model": "mnist", "z": [[0, 0, 0]]}, {}),  # wrong latent size
    ("/interpolate", {"model": "mnist", "start": {"z": [0, 0]}, "end": {"z": [1, 1]}, "steps": 3}, {}),
]


@pytest.mark.parametrize(("path", "body", "headers"), CASES)
async def test_the_lean_path_answers_exactly_as_fastapi_does(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    lean = await client.post(path, content=json.dumps(body), headers=JSON | headers)
    full = await client.post(path, content=json.dumps(body), headers=VIA_FASTAPI | headers)
    assert (lean.status_code, lean.headers["content-type"], lean.content) == (
        full.status_code, full.headers["content-type"], full.content
    )


@pytest.fixture
def lean_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Models of the /sample requests the lean path answered."""
    calls: list[str] = []
    route = fastpath.ROUTES["/sample"][1]

    async def spy(body: SampleRequest, *args: Any) -> Any:
        calls.append(body.model)
        return await route(body, *args)

    monkeypatch.setitem(fastpath.ROUTES, "/sample", (SampleRequest, spy))
    return calls


async def test_valid_json_requests_take_the_lean_path_and_the_rest_goes_to_fastapi(
    client: httpx.AsyncClient, lean_calls: list[str]
) -> None:
    assert (await client.post("/sample", json={"model": "mnist"})).status_code == 200
    assert (await client.post("/sample", content='{"model": "mnist"}', headers=VIA_FASTAPI)).status_code == 200
    assert (await client.post("/sample", json={"model": "mnist", "n": "many"})).status_code == 422
    assert (await client.post("/sample", content=b'{"model": "mnist"', headers=JSON)).status_code == 422
    assert lean_calls == ["mnist"]


async def test_lean_requests_are_answered_in_front_of_fastapis_stack_and_the_rest_go_through_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered: list[str] = []
    behind_front = VaeServe.behind_front

    async def spy(app: VaeServe, scope: Scope, receive: Receive, send: Send) -> None:
        entered.append(scope["path"])
        await behind_front(app, scope, receive, send)

    monkeypatch.setattr(VaeServe, "behind_front", spy)
    async with serve(settings) as client:
        assert (await client.post("/sample", json={"model": "mnist"})).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/metrics")).text.count('endpoint="/sample"') > 0  # counted and logged all the same
    assert entered == ["/healthz", "/metrics"]


async def test_with_an_api_key_only_requests_that_carry_it_take_the_lean_path(
    settings: Settings, lean_calls: list[str]
) -> None:
    async with serve(settings.model_copy(update={"api_key": SecretStr("k")})) as client:
        assert (await client.post("/sample", json={"model": "mnist"})).status_code == 401
        assert (await client.post("/sample", json={"model": "mnist"}, headers={"authorization": "Bearer x"})).status_code == 401
        assert (await client.post("/sample", json={"model": "mnist"}, headers={"authorization": "Bearer k"})).status_code == 200
    assert lean_calls == ["mnist"]


async def test_a_client_that_leaves_before_its_body_arrived_gets_no_answer_and_breaks_nothing(
    client: httpx.AsyncClient,
) -> None:
    app = client.app  # type: ignore[attr-defined]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/sample", "raw_path": b"/sample", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"20")],
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }
    await app(scope, receive, send)
    assert sent == []
    assert (await client.post("/sample", json={"model": "mnist"})).status_code == 200


def form(*images: bytes, model: str = "faces") -> dict[str, Any]:
    return {"data": {"model": model}, "files": [("image", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]}


ENCODE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("one image", form(png())),
    ("two images, one a digit for mnist", form(png(), png(mode="L"), model="mnist")),
    ("base64 JSON", {"json": {"model": "faces", "images": [base64.b64encode(png()).decode()]}}),
    ("not an image", form(b"not a png")),  # the route's 422
    ("unknown model", form(png(), model="no-such-model")),  # 404 from the app's exception handler
    ("no image field", {"data": {"model": "faces"}, "files": [("other", ("x.png", png(), "image/png"))]}),
    ("too many images", form(*[png()] * 65)),
    ("invalid JSON", {"content": b'{"model": "faces", "images": 3}', "headers": {"content-type": "application/json"}}),
    ("another content type", {"content": b"faces", "headers": {"content-type": "text/plain"}}),  # 415
]


@pytest.mark.parametrize(("case", "request_args"), ENCODE_CASES, ids=[c for c, _ in ENCODE_CASES])
async def test_encode_on_the_lean_path_answers_exactly_as_fastapi_does(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, case: str, request_args: dict[str, Any]
) -> None:
    lean = await client.post("/encode", **request_args)
    monkeypatch.delitem(fastpath.MODEL_ROUTES, "/encode")
    full = await client.post("/encode", **request_args)
    assert (lean.status_code, lean.headers["content-type"], lean.content) == (
        full.status_code, full.headers["content-type"], full.content
    )


async def test_encode_takes_the_lean_path(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    route = fastpath.MODEL_ROUTES["/encode"]

    async def spy(request: Any, runtime: Any) -> Any:
        calls.append(request.url.path)
        return await route(request, runtime)

    monkeypatch.setitem(fastpath.MODEL_ROUTES, "/encode", spy)
    assert (await client.post("/encode", **form(png()))).status_code == 200
    assert calls == ["/encode"]
