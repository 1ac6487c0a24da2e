"""The access line of a request carries its X-Request-ID, the one its client (or a proxy) sent or else one the server
made, and the answer echoes it."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest

from service.log_writer import log_format


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "vae_serve.access"]


async def test_a_request_id_is_echoed_and_in_the_request_s_access_line(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vae_serve.access"):
        busy = await client.post("/sample", json={"model": "mnist"}, headers={"x-request-id": "abc-123"})
        other = await client.get("/models/nope", headers={"x-request-id": "req 9/b"})  # through FastAPI's own stack
    assert busy.headers["x-request-id"] == "abc-123" and other.headers["x-request-id"] == "req 9/b"
    assert [json.loads(log_format(r)).get("request_id") for r in access_records(caplog)] == ["abc-123", "req 9/b"]


def is_the_server_s(request_id: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{16}", request_id) is not None


async def test_without_one_the_server_makes_one_of_its_own_for_each_request(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vae_serve.access"):
        answers = [await client.post("/sample", json={"model": "mnist"}), await client.get("/models/nope")]
    ids = [r.headers["x-request-id"] for r in answers]
    assert all(map(is_the_server_s, ids)) and ids[0] != ids[1]
    assert [json.loads(log_format(r))["request_id"] for r in access_records(caplog)] == ids


@pytest.mark.parametrize("value", [b"x" * 201, b"", b"tab\there", "\u00e9t\u00e9".encode()], ids=["too long", "empty", "a control character", "not ASCII"])
async def test_a_request_id_too_long_or_not_printable_ascii_is_replaced_by_one_of_the_server_s(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, value: bytes
) -> None:
    with caplog.at_level(logging.INFO, logger="vae_serve.access"):
        r = await client.post("/sample", json={"model": "mnist"}, headers={"x-request-id": value})
    assert r.status_code == 200 and is_the_server_s(r.headers["x-request-id"])
    assert json.loads(log_format(access_records(caplog)[0]))["request_id"] == r.headers["x-request-id"]
