"""POST /sample, /decode and /interpolate answered from the HTTP protocol (fastpath.DirectAnswers): the same answers,
metrics and access lines as through uvicorn's ASGI cycle and the app, in order behind and before other requests on a
connection, and every request it does not take answered by the app as ever. Against real servers, one with direct
answers and one without."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace

from service.server import DrainingServer
from service.settings import Settings
from tests.conftest import png
from tests.service.tools import read_answer, running

Answer = tuple[int, dict[bytes, bytes], bytes]
FORM = b"multipart/form-data; boundary=xyz"


def post(
    body: bytes, *, path: bytes = b"/sample", content_type: bytes = b"application/json", headers: bytes = b""
) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nhost: test\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n%s"
        % (path, content_type, len(body), headers, body)
    )


def chunked(
    body: bytes, *, path: bytes = b"/sample", content_type: bytes = b"application/json", headers: bytes = b""
) -> bytes:
    """`post` with its body in chunks of 1,000 bytes (Transfer-Encoding: chunked), as a client streaming it sends."""
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[i : i + 1000] for i in range(0, len(body), 1000)))
    return (
        b"POST %s HTTP/1.1\r\nhost: test\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n%s\r\n%s0\r\n\r\n"
        % (path, content_type, headers, chunks)
    )


def form(model: bytes, image: bytes) -> bytes:
    """A multipart form (boundary FORM's) with `model`, where given, and `image` as its one file."""
    model_part = b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\n%s\r\n' % model if model else b""
    return model_part + (
        b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        b"%s\r\n--xyz--\r\n" % image
    )


async def ask(port: int, *requests: bytes) -> list[Answer]:
    """`requests` sent in one write on one connection; their answers in the order they came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(requests))
    try:
        return [await read_answer(reader) for _ in requests]
    finally:
        writer.close()


def comparable(answer: Answer) -> tuple[int, dict[bytes, bytes], bytes]:
    status, headers, body = answer
    return status, {k: v for k, v in headers.items() if k not in (b"date", b"x-request-id")}, body


def count_direct(served: DrainingServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many requests the server answers directly, as they come."""
    direct = served.config.http.direct  # type: ignore[union-attr]
    answered = [0]
    original: Callable[..., Awaitable[Any]] = direct.answer

    async def counted(*args: Any) -> Any:
        answered[0] += 1
        return await original(*args)

    monkeypatch.setattr(direct, "answer", counted)
    return answered


@pytest.fixture
async def servers(tiny_models: Path) -> AsyncIterator[tuple[tuple[int, DrainingServer], int]]:
    """(a server with direct answers, its port; the port of one without)."""
    settings = Settings(model_dir=tiny_models, port=0)
    async with running(settings) as direct, running(settings, direct=False) as through_the_app:
        yield direct, through_the_app[0]


REQUESTS = {
    "one image": (post(b'{"model": "faces", "seed": 3}'), True),
    "a grid": (post(b'{"model": "mnist", "n": 4, "seed": 1, "temperature": 0.5}'), True),
    "images as JSON": (post(b'{"model": "mnist", "n": 3, "seed": 2}', headers=b"accept: application/json\r\n"), True),
    "an unknown model": (post(b'{"model": "nope"}'), True),
    "too many images": (post(b'{"model": "faces", "n": 100000}'), True),
    "an invalid field": (post(b'{"model": "faces", "n": "x"}'), False),
    "not JSON": (post(b"model=faces", content_type=b"application/x-www-form-urlencoded"), False),
    "a body over 64 KiB": (post(b'{"model": "faces", "seed": 3}' + b" " * 66000), False),
    "a query string, which no route reads": (
        post(b'{"model": "faces", "seed": 3}').replace(b"/sample", b"/sample?cache=no&x=%20", 1), True
    ),
    "a path only like a route's": (post(b'{"model": "faces", "seed": 3}').replace(b"/sample", b"/sample/", 1), False),
    "latents decoded": (post(b'{"model": "mnist", "z": [[0.5, -1], [0, 0]], "columns": 1}', path=b"/decode"), True),
    "a latent of the wrong size": (post(b'{"model": "faces", "z": [[0.5, -1]]}', path=b"/decode"), True),
    "a latent that is not finite": (post(b'{"model": "faces", "z": [[NaN]]}', path=b"/decode"), False),
    "latents as JSON": (
        post(b'{"model": "mnist", "z": [[1, 2]]}', path=b"/decode", headers=b"accept: application/json\r\n"), True
    ),
    "a walk between latents": (
        post(b'{"model": "mnist", "start": {"z": [-1, 0]}, "end": {"z": [1, 0.5]}, "steps": 5, "method": "slerp"}',
             path=b"/interpolate"), True,
    ),
    "a walk from an image": (
        post(b'{"model": "mnist", "start": {"image": "%s"}, "end": {"z": [1, 0.5]}, "steps": 3}'
             % base64.b64encode(png(size=(28, 28), mode="L")), path=b"/interpolate"), True,
    ),
    "a walk with both ends at once": (
        post(b'{"model": "mnist", "start": {"z": [0, 0], "image": "x"}, "end": {"z": [1, 1]}}', path=b"/interpolate"),
        False,
    ),
    "a digit uploaded": (post(form(b"mnist", png(size=(28, 28), mode="L")), path=b"/encode", content_type=FORM), True),
    "a face uploaded": (post(form(b"faces", png(size=(60, 50))), path=b"/encode", content_type=FORM), True),
    "an upload that is not an image": (post(form(b"mnist", b"GIF89a"), path=b"/encode", content_type=FORM), True),
    "a form without a model": (post(form(b"", png()), path=b"/encode", content_type=FORM), True),
    "images as base64 JSON": (
        post(b'{"model": "mnist", "images": ["%s"]}' % base64.b64encode(png()), path=b"/encode"), True
    ),
    "an upload as text": (post(b"hello", path=b"/encode", content_type=b"text/plain"), True),
    "an upload over 64 KiB": (post(form(b"mnist", png(size=(300, 300)) + b"\0" * 66000), path=b"/encode",
                                   content_type=FORM), False),
    "a chunked body": (chunked(b'{"model": "faces", "seed": 3}' + b" " * 2500), True),
    "a chunked upload": (chunked(form(b"faces", png(size=(60, 50))), path=b"/encode", content_type=FORM), True),
    "a chunked body over 64 KiB": (chunked(b'{"model": "faces", "seed": 3}' + b" " * 66000), False),
    "chunked, said twice": (chunked(b'{"model": "faces", "seed": 3}', headers=b"transfer-encoding: chunked\r\n"), False),
    "chunked, and a Content-Length too": (
        chunked(b'{"model": "faces", "seed": 3}', headers=b"content-length: 31\r\n"), False
    ),
}


@pytest.mark.parametrize("name", REQUESTS)
async def test_an_answer_is_the_app_s_whether_direct_or_not(
    servers: tuple[tuple[int, DrainingServer], int], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    (port, served), app_port = servers
    request, taken = REQUESTS[name]
    answered = count_direct(served, monkeypatch)
    (direct,) = await ask(port, request)
    (through_the_app,) = await ask(app_port, request)
    assert comparable(direct) == comparable(through_the_app)
    assert direct[1][b"x-request-id"]
    assert answered[0] == (1 if taken else 0)


async def test_pipelined_requests_are_answered_in_order(
    servers: tuple[tuple[int, DrainingServer], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    (port, served), _ = servers
    answered = count_direct(served, monkeypatch)
    answers = await ask(
        port,
        post(b'{"model": "faces", "seed": 1}'),
        b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n",
        post(b'{"model": "faces", "seed": 2}'),
        post(b'{"model": "faces", "seed": 3}'),
    )
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    assert [a[1].get(b"x-seed") for a in answers] == [b"1", None, b"2", b"3"]
    assert json.loads(answers[1][2])["status"] == "ok"
    assert answered[0] >= 1  # the first; those behind another request wait in uvicorn's pipeline


async def test_a_direct_answer_is_counted_logged_and_carries_the_client_s_request_id(
    servers: tuple[tuple[int, DrainingServer], int], caplog: pytest.LogCaptureFixture
) -> None:
    (port, served), _ = servers
    metrics = served.config.http.metrics  # type: ignore[union-attr]
    with caplog.at_level(logging.INFO, logger="vae_serve.access"):
        ((status, headers, _),) = await ask(port, post(b'{"model": "faces"}', headers=b"x-request-id: abc-1\r\n"))
    assert status == 200 and headers[b"x-request-id"] == b"abc-1"
    (line,) = [r for r in caplog.records if r.name == "vae_serve.access"]
    assert (line.method, line.path, line.model, line.status, line.request_id) == ("POST", "/sample", "faces", 200, "abc-1")
    labels = {"endpoint": "/sample", "model": "faces", "status": "200"}
    assert metrics.registry.get_sample_value("vae_requests_total", labels) == 1
    assert metrics.registry.get_sample_value("vae_images_generated_total", {"model": "faces"}) == 1


async def test_of_two_request_ids_the_first_is_echoed_whether_answered_directly_or_not(
    servers: tuple[tuple[int, DrainingServer], int],
) -> None:
    (port, _), app_port = servers
    request = post(b'{"model": "faces"}', headers=b"x-request-id: first\r\nx-request-id: second\r\n")
    for answer in (*await ask(port, request), *await ask(app_port, request)):
        assert answer[0] == 200 and answer[1][b"x-request-id"] == b"first"


async def test_a_direct_answer_is_timed_from_its_request_s_head_as_the_app_s_are(
    servers: tuple[tuple[int, DrainingServer], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    (port, served), _ = servers
    answered = count_direct(served, monkeypatch)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = post(b'{"model": "mnist", "z": [[0, 1]]}', path=b"/decode")
    writer.write(request[:-5])
    await asyncio.sleep(0.3)  # a body slow to come
    writer.write(request[-5:])
    status, _, _ = await read_answer(reader)
    writer.close()
    seconds = served.config.http.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "vae_request_duration_seconds_sum", {"endpoint": "/decode"}
    )
    assert (status, answered[0]) == (200, 1)
    assert seconds is not None and seconds >= 0.3


@pytest.mark.parametrize(("key", "status", "taken"), [(b"wrong", 401, 0), (b"s3cret", 200, 1)])
async def test_with_an_api_key_only_a_request_that_has_it_is_answered_directly(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch, key: bytes, status: int, taken: int
) -> None:
    async with running(Settings(model_dir=tiny_models, port=0, api_key="s3cret")) as (port, served):
        answered = count_direct(served, monkeypatch)
        ((got, _, _),) = await ask(port, post(b'{"model": "mnist"}', headers=b"authorization: Bearer %s\r\n" % key))
    assert (got, answered[0]) == (status, taken)


@pytest.mark.parametrize(
    "origin",
    [b"origin: https://app.example.com\r\n", b"origin: https://elsewhere.example.com\r\n", b""],
    ids=["an allowed page", "another page", "no page"],
)
async def test_where_the_server_answers_cors_a_page_s_request_is_answered_directly_with_the_app_s_cors_headers(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch, origin: bytes
) -> None:
    settings = Settings(model_dir=tiny_models, port=0, cors_origins="https://app.example.com")
    async with running(settings) as (port, served), running(settings, direct=False) as (app_port, _):
        answered = count_direct(served, monkeypatch)
        for request in (post(b'{"model": "mnist", "seed": 1}', headers=origin), post(b'{"model": "nope"}', headers=origin)):
            (direct,) = await ask(port, request)
            (through_the_app,) = await ask(app_port, request)
            assert comparable(direct) == comparable(through_the_app)
    assert answered[0] == 2
    if b"app.example.com" in origin:  # its pages may read the answers, a 404 too
        assert direct[1][b"access-control-allow-origin"] == b"https://app.example.com"


async def test_where_fastapi_s_opentelemetry_hook_records_requests_none_is_answered_directly_and_each_gets_its_span(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracer provider set in the process (an OpenTelemetry SDK set up, `opentelemetry-instrument`): a deployment
    that traces sees every request, the busy routes' too."""
    spans: list[str] = []

    class Recording(trace.NoOpTracer):
        def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
            spans.append(name)
            return super().start_span(name, *args, **kwargs)

    class Provider(trace.TracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
            return Recording()

    provider = Provider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    async with running(Settings(model_dir=tiny_models, port=0)) as (port, served):
        answered = count_direct(served, monkeypatch)
        encode = post(form(b"mnist", png(size=(28, 28))), path=b"/encode", content_type=FORM)
        answers = await ask(port, post(b'{"model": "mnist", "seed": 1}'), encode, post(b'{"model": "nope"}'))
    assert [status for status, _, _ in answers] == [200, 200, 404]
    assert answered[0] == 0
    assert [name for name in spans if name.startswith("POST")] == ["POST"] * 3


async def test_a_client_that_leaves_before_its_answer_takes_nothing_down(
    servers: tuple[tuple[int, DrainingServer], int],
) -> None:
    (port, served), _ = servers
    for _ in range(5):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(b'{"model": "faces", "n": 16}'))
        await writer.drain()
        writer.close()
    await asyncio.sleep(0.3)
    ((status, _, _),) = await ask(port, post(b'{"model": "faces"}'))
    assert status == 200
    await asyncio.sleep(0.05)
    assert served.config.http.activity.count(asyncio.get_running_loop().time() + 1) == 0  # type: ignore[union-attr]


async def test_a_request_whose_body_is_still_coming_at_a_shutdown_is_answered(tiny_models: Path) -> None:
    async with running(Settings(model_dir=tiny_models, port=0)) as (port, served):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = post(b'{"model": "faces", "seed": 3}')
        writer.write(request[:-5])  # held back for a direct answer until its body is in
        await asyncio.sleep(0.1)
        served.should_exit = True
        await asyncio.sleep(0.3)  # uvicorn's shutdown has reached the connection
        writer.write(request[-5:])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head
