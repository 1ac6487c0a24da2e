"""CORS: pages of the origins in VAE_CORS_ORIGINS may call the API from a browser; without it, no CORS headers."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from service.settings import Settings
from tests.conftest import serve

PAGE = "https://latents.example.org"
PREFLIGHT = {"origin": PAGE, "access-control-request-method": "POST",
             "access-control-request-headers": "content-type, authorization"}


async def test_a_page_of_an_allowed_origin_may_post_with_a_key_and_read_the_answer_and_its_seed(settings: Settings) -> None:
    async with serve(settings.model_copy(update={"cors_origins": f"{PAGE}, http://localhost:5173",
                                                 "api_key": SecretStr("k")})) as client:
        preflight = await client.options("/sample", headers=PREFLIGHT)  # carries no key: answered before the check
        answer = await client.post("/sample", json={"model": "mnist"}, headers={"origin": PAGE, "authorization": "Bearer k"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == PAGE
    assert {"authorization", "content-type"} <= set(preflight.headers["access-control-allow-headers"].lower().split(", "))
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == PAGE
    assert {"x-seed", "x-request-id"} <= set(answer.headers["access-control-expose-headers"].lower().split(", "))


async def test_errors_are_readable_by_the_page_too(settings: Settings) -> None:
    async with serve(settings.model_copy(update={"cors_origins": PAGE})) as client:
        r = await client.post("/sample", json={"model": "nope"}, headers={"origin": PAGE})
        form = await client.post("/encode", data={"model": "mnist"}, files={"x": ("x", b"x")}, headers={"origin": PAGE})
    assert r.status_code == 404 and r.headers["access-control-allow-origin"] == PAGE
    assert form.status_code == 422 and form.headers["access-control-allow-origin"] == PAGE


async def test_another_origin_gets_no_leave_to_read(settings: Settings) -> None:
    async with serve(settings.model_copy(update={"cors_origins": PAGE})) as client:
        preflight = await client.options("/sample", headers={**PREFLIGHT, "origin": "https://elsewhere.example"})
        answer = await client.post("/sample", json={"model": "mnist"}, headers={"origin": "https://elsewhere.example"})
    assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers  # the browser hides it


async def test_without_the_setting_there_are_no_cors_headers(client: httpx.AsyncClient) -> None:
    preflight = await client.options("/sample", headers=PREFLIGHT)
    answer = await client.post("/sample", json={"model": "mnist"}, headers={"origin": PAGE})
    assert preflight.status_code == 405
    assert not [h for h in answer.headers if h.startswith("access-control-")]


def test_any_origin_and_origins_in_any_case_are_taken(tiny_models) -> None:  # type: ignore[no-untyped-def]
    assert Settings(model_dir=tiny_models, cors_origins="*").cors_origin_list == ["*"]
    assert Settings(model_dir=tiny_models, cors_origins=" HTTPS://App.Example.com:8443 ,").cors_origin_list == [
        "https://app.example.com:8443"
    ]


@pytest.mark.parametrize("origin", ["https://app.example.com/", "https://app.example.com/ui", "app.example.com", "https://"])
def test_an_origin_with_a_path_or_without_a_scheme_is_refused_at_start(tiny_models, origin: str) -> None:  # type: ignore[no-untyped-def]
    """A browser sends scheme://host[:port]: an origin written otherwise would never match, and every call from the
    page would fail in the browser alone."""
    with pytest.raises(ValidationError, match="is not an origin"):
        Settings(model_dir=tiny_models, cors_origins=origin)
