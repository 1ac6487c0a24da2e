"""Security: the optional API key, an API that cannot change what is served, a loopback default bind, and
errors that never echo stack traces or unbounded client input."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

import service.__main__
import service.server
from service.log_writer import log_format
from service.settings import Settings
from tests.conftest import png, serve

KEY = "correct-horse-battery-staple"
AUTH = {"authorization": f"Bearer {KEY}"}
OPEN = {"/healthz", "/readyz", "/metrics"}  # probes and metrics answer without the key
BODIES: dict[str, dict[str, Any]] = {
    "/sample": {"model": "mnist"},
    "/decode": {"model": "mnist", "z": [[0.0, 0.0]]},
    "/encode": {"model": "mnist", "images": [base64.b64encode(png()).decode()]},
    "/interpolate": {"model": "mnist", "start": {"z": [0, 0]}, "end": {"z": [1, 1]}},
}


@pytest.fixture
async def secured(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings.model_copy(update={"api_key": SecretStr(KEY)})) as client:
        yield client


async def operations(client: httpx.AsyncClient) -> list[tuple[str, str]]:
    """(method, path) of every documented operation, path parameters filled in."""
    spec = (await client.get("/openapi.json")).json()
    return [(method.upper(), path.replace("{name}", "mnist")) for path, ops in spec["paths"].items() for method in ops]


async def call(client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str] | None = None,
               body: Any = None) -> httpx.Response:
    if method == "POST":
        return await client.post(path, json=BODIES[path] if body is None else body, headers=headers)
    return await client.request(method, path, headers=headers)


async def test_every_api_endpoint_but_the_probes_and_metrics_needs_the_key(secured: httpx.AsyncClient) -> None:
    guarded = [(m, p) for m, p in await operations(secured) if p not in OPEN]
    assert {p for _, p in guarded} == {"/sample", "/decode", "/encode", "/interpolate", "/models", "/models/mnist"}
    for method, path in guarded:
        r = await call(secured, method, path)
        assert r.status_code == 401, (method, path)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["detail"] == "missing or wrong API key: send 'Authorization: Bearer <key>'"
        assert (await call(secured, method, path, AUTH)).status_code == 200, (method, path)


async def test_probes_and_metrics_answer_without_the_key(secured: httpx.AsyncClient) -> None:
    for path in sorted(OPEN):
        assert (await secured.get(path)).status_code == 200, path


async def test_metrics_can_require_the_key_too(settings: Settings) -> None:
    async with serve(settings.model_copy(update={"api_key": SecretStr(KEY), "metrics_require_key": True})) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=AUTH)).status_code == 200
        assert (await client.get("/readyz")).status_code == 200


@pytest.mark.parametrize("header", [
    f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer", "Bearer ", f"Basic {base64.b64encode(KEY.encode()).decode()}",
    f"Token {KEY}", KEY, f"Bearer{KEY}", "Bearer " + "k" * 100_000,
])
async def test_a_wrong_key_or_scheme_is_401_and_not_echoed(secured: httpx.AsyncClient, header: str) -> None:
    r = await secured.post("/sample", json={"model": "mnist"}, headers={"authorization": header})
    assert r.status_code == 401
    assert len(r.content) < 200 and KEY not in r.text


@pytest.mark.parametrize("header", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER  {KEY} "])
async def test_the_scheme_is_case_insensitive_and_spaces_around_the_key_are_ignored(
    secured: httpx.AsyncClient, header: str
) -> None:
    r = await secured.post("/sample", json={"model": "mnist"}, headers={"authorization": header})
    assert r.status_code == 200


async def test_the_key_is_not_accepted_from_the_query_string_or_a_cookie(secured: httpx.AsyncClient) -> None:
    assert (await secured.get("/models", params={"api_key": KEY})).status_code == 401
    assert (await secured.get("/models", headers={"cookie": f"authorization=Bearer {KEY}"})).status_code == 401


async def test_without_the_key_an_invalid_body_is_401_not_a_validation_error(secured: httpx.AsyncClient) -> None:
    r = await secured.post("/decode", json={"model": "mnist", "z": "not latents"})
    assert r.status_code == 401  # an unauthenticated client learns nothing about the API from its mistakes
    assert (await secured.post("/encode", content=b"x", headers={"content-type": "text/plain"})).status_code == 401


def test_the_key_can_come_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "api_key"
    secret.write_text(f"{KEY}\n")  # as mounted secrets usually end
    from_file = Settings(api_key_file=secret)
    assert from_file.api_key is not None and from_file.api_key.get_secret_value() == KEY
    monkeypatch.setenv("VAE_API_KEY", KEY)
    from_env = Settings()
    assert from_env.api_key is not None and from_env.api_key.get_secret_value() == KEY
    assert KEY not in repr(from_env) and KEY not in str(from_env.model_dump())  # a SecretStr stays out of logs
    monkeypatch.setenv("VAE_API_KEY", "")
    assert Settings().api_key is None  # an empty variable means no key, never "the empty key"


def test_an_empty_key_file_stops_the_service_from_starting(tmp_path: Path) -> None:
    (tmp_path / "api_key").write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        Settings(api_key_file=tmp_path / "api_key")


def fingerprint(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


async def test_no_endpoint_changes_what_is_served(client: httpx.AsyncClient, tiny_models: Path) -> None:
    files, listed = fingerprint(tiny_models), (await client.get("/models")).json()
    methods = {m for m, _ in await operations(client)}
    assert methods == {"GET", "POST"}  # the POSTs compute; nothing creates, replaces or deletes (HEAD, undocumented,
    # answers the probes as GET does: test_models_and_probes.py)
    for method, path in await operations(client):
        for verb in ("PUT", "PATCH", "DELETE"):
            assert (await client.request(verb, path)).status_code == 405, (verb, path)
        await call(client, method, path)
    for name in ("../mnist", "mnist/../faces", "/etc/passwd", "..", "mnist/model.pt"):
        assert (await client.post("/sample", json={"model": name})).status_code == 404, name
    assert (await client.get("/models/..%2F..%2Fetc%2Fpasswd")).status_code == 404
    assert (await client.get("/models")).json() == listed
    assert fingerprint(tiny_models) == files


def test_the_server_binds_to_loopback_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VAE_HOST", "VAE_PORT"):
        monkeypatch.delenv(name, raising=False)
    bound: list[tuple[str, int]] = []
    monkeypatch.setattr(service.server.DrainingServer, "run", lambda self: bound.append((self.config.host,
                                                                                             self.config.port)))
    monkeypatch.setattr(logging, "basicConfig", lambda **_: None)  # leave the test run's logging alone
    assert Settings().host == "127.0.0.1"
    assert service.__main__.main([]) == 0
    assert bound == [("127.0.0.1", 8000)]


HUGE = "x" * 1_000_000


async def test_errors_and_the_log_never_echo_a_huge_input(client: httpx.AsyncClient,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    answers = [
        await client.post("/sample", json={"model": HUGE}),
        await client.post("/sample", json={"model": "mnist", HUGE: 1}),  # an unexpected field is named in `loc`
        await client.post("/decode", json={"model": "mnist", "z": [[HUGE]]}),
        await client.post("/interpolate", json={"model": "mnist", "start": {"z": [0, 0]}, "end": {HUGE: 1}}),
        await client.post("/encode", json={"model": HUGE, "images": ["AAAA"]}),
        await client.post("/encode", json={"model": "mnist", "images": [HUGE]}),
        await client.post("/encode", data={"model": HUGE[:900_000]}, files={"image": ("x.png", png(), "image/png")}),
        await client.post("/encode", data={"model": "mnist"}, files={"image": (HUGE[:1000], png(), "image/png")}),
        await client.get("/models/" + HUGE[:60_000]),
        await client.get("/" + HUGE[:60_000]),
    ]
    assert [r.status_code for r in answers] == [422, 422, 422, 422, 422, 422, 404, 200, 404, 404]
    for r in answers:
        assert len(r.content) < 2000, (r.status_code, r.text[:300])
        assert "x" * 200 not in r.text
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # not the client's
    assert any(r.name == "vae_serve.access" for r in server_side)
    for record in server_side:
        line = log_format(record)  # as the server writes it
        assert len(line) < 3000 and "x" * 250 not in line, line[:300]
