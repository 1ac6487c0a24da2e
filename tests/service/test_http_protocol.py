"""The guarded HTTP protocol. VAE_READ_TIMEOUT_S: a connection that sends nothing, or its request too slowly, gets 408
and is closed, so that no client can hold the server's connections, and an answer its client does not read is dropped;
a slow request that keeps coming is served. A request head over 64 KiB gets 431. Against a real uvicorn, whose protocol
callbacks http_protocol.GuardedHttpProtocol relies on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn

from service.app import create_app
from service.http_protocol import MAX_HEAD_BYTES
from service.server import DrainingServer, config
from service.settings import Settings
from tests.service.tools import healthz_status, running

TIMEOUT_S = 0.3


@pytest.fixture
async def server(tiny_models: Path) -> AsyncIterator[tuple[int, DrainingServer]]:
    async with running(Settings(model_dir=tiny_models, port=0, read_timeout_s=TIMEOUT_S)) as started:
        yield started


async def exchange(port: int, *chunks: bytes, gap_s: float = 0.0) -> tuple[bytes, float]:
    """Send `chunks` `gap_s` apart; (all the server answered until it closed, seconds from the first byte to the end)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    started, answer = loop.time(), bytearray()

    async def read_all() -> None:  # as the answer comes: a write after the server closed fails the reader too
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                answer.extend(data)

    reading = asyncio.create_task(read_all())
    try:
        for chunk in chunks:
            if reading.done():
                break
            writer.write(chunk)
            await asyncio.sleep(gap_s)
        await asyncio.wait_for(reading, timeout=10)
    finally:
        writer.close()
    return bytes(answer), loop.time() - started


def detail(answer: bytes) -> str:
    """The detail of an error answered as the app answers its errors: JSON {"detail": ...}."""
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"content-type: application/json" in head
    return str(json.loads(body)["detail"])


def sample_request(body: bytes) -> bytes:
    return (
        b"POST /sample HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )


@pytest.mark.parametrize(
    "chunks",
    [
        (),  # a connection that never sends anything
        (b"POST /sample HTTP/1.1\r\nhost: test\r\n",),  # a head that never ends
        (sample_request(b'{"model": "faces"}'),),  # a body that never comes
        # the same on a kept-alive connection, held back for a direct answer (fastpath.DirectAnswers) until its body
        (sample_request(b'{"model": "faces"}').replace(b"connection: close\r\n", b""),),
    ],
    ids=["silent", "head unfinished", "body missing", "body missing, direct"],
)
async def test_a_request_that_does_not_come_in_time_gets_408_and_its_connection_is_closed(
    server: tuple[int, DrainingServer], chunks: tuple[bytes, ...]
) -> None:
    port, served = server
    answer, seconds = await exchange(port, *chunks)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer
    assert "VAE_READ_TIMEOUT_S" in detail(answer)
    assert TIMEOUT_S <= seconds < TIMEOUT_S + 1
    metrics = served.config.app.state.metrics  # type: ignore[union-attr]
    assert metrics.connections_timed_out._value.get() == 1


async def test_a_slow_body_that_keeps_coming_is_served_and_a_trickle_is_not(
    server: tuple[int, DrainingServer], caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = server
    body = json.dumps({"model": "faces", "n": 1}).encode().ljust(2048)  # 2 KiB: 2 s more than the timeout allows
    parts = [body[i : i + 512] for i in range(0, len(body), 512)]
    answer, seconds = await exchange(port, sample_request(body), *parts, gap_s=0.15)
    assert answer.startswith(b"HTTP/1.1 200 ") and seconds > TIMEOUT_S
    with caplog.at_level(logging.INFO):
        trickle = [body[i : i + 16] for i in range(0, len(body), 16)]  # 16 bytes every 0.15 s: 107 bytes/s
        answer, _ = await exchange(port, sample_request(body), *trickle[:20], gap_s=0.15)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert [record.status for record in caplog.records if record.name == "vae_serve.access"] == [408]  # type: ignore[attr-defined]


async def test_connections_that_send_their_requests_in_time_are_kept(server: tuple[int, DrainingServer]) -> None:
    port, served = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(3):  # keep-alive requests, each sent at once but after longer than the timeout in all
            assert await healthz_status(reader, writer) == b"200"
            await asyncio.sleep(TIMEOUT_S * 0.6)
    finally:
        writer.close()
    assert served.config.app.state.metrics.connections_timed_out._value.get() == 0  # type: ignore[union-attr]


async def test_an_answer_the_client_does_not_read_is_dropped_with_its_connection(server: tuple[int, DrainingServer]) -> None:
    port, served = server
    body = json.dumps({"model": "faces", "n": 256}).encode()  # about 60 KB of JSON from the tiny model
    # small kernel buffers on both ends (an accepted socket takes the listener's), so that the answer stays in uvicorn's
    served.servers[0].sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: it sets the window offered
    client.connect(("127.0.0.1", port))
    try:
        client.sendall(sample_request(body).replace(b"connection: close", b"accept: application/json") + body)
        metrics = served.config.app.state.metrics  # type: ignore[union-attr]
        deadline = asyncio.get_running_loop().time() + 10
        while metrics.connections_timed_out._value.get() == 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)  # the client reads nothing
        assert metrics.connections_timed_out._value.get() == 1
        await asyncio.sleep(0.1)
        assert not served.server_state.connections  # aborted: its buffer is gone, not waiting to be flushed
    finally:
        client.close()


async def test_a_request_head_over_the_limit_gets_431_before_the_rest_is_read(server: tuple[int, DrainingServer]) -> None:
    port, _ = server
    padding = b"x-padding: " + b"a" * 1000 + b"\r\n"
    answer, _ = await exchange(port, b"POST /sample HTTP/1.1\r\nhost: test\r\n", *[padding * 100] * 20)  # 2 MB
    assert answer.startswith(b"HTTP/1.1 431 ") and f"over {MAX_HEAD_BYTES} bytes" in detail(answer)
    headers = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 100) for i in range(100))  # 10 KB of headers: served
    answer, _ = await exchange(port, b"GET /healthz HTTP/1.1\r\nhost: test\r\nconnection: close\r\n" + headers + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"GARBAGE\r\n\r\n", "Invalid method"),
        (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", "Invalid header"),
        (b"POST /sample HTTP/1.1\r\nhost: test\r\ncontent-length: ten\r\n\r\n", "Content-Length"),
    ],
    ids=["method", "header", "content-length"],
)
async def test_what_is_not_http_gets_400_that_says_why_and_is_logged_and_counted(
    server: tuple[int, DrainingServer], caplog: pytest.LogCaptureFixture, request_bytes: bytes, reason: str
) -> None:
    port, served = server
    with caplog.at_level(logging.INFO):
        answer, _ = await exchange(port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close" in answer
    assert "not valid HTTP/1.1" in detail(answer) and reason in detail(answer)
    (line,) = [record for record in caplog.records if record.name == "vae_serve.access"]
    assert line.status == 400 and f"x-request-id: {line.request_id}\r\n".encode() in answer  # type: ignore[attr-defined]
    assert [record.name for record in caplog.records if record.levelno >= logging.WARNING] == []  # not uvicorn's as well
    metrics = served.config.app.state.metrics  # type: ignore[union-attr]
    assert metrics.requests.labels("unparsed", "", "400")._value.get() == 1
    assert metrics.failures.labels("invalid")._value.get() == 1


async def test_connections_beyond_the_limit_get_503_and_those_before_them_are_still_served(tiny_models: Path) -> None:
    async with running(Settings(model_dir=tiny_models, port=0, max_connections=2)) as (port, _):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]  # kept alive
        try:
            assert [await healthz_status(*connection) for connection in held] == [b"200", b"200"]
            flood = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            await asyncio.sleep(0.05)  # the server has them all: 5 open
            assert [await healthz_status(*connection) for connection in held] == [b"200", b"200"]  # not taken from them
            assert [await healthz_status(*connection) for connection in flood] == [b"503"] * 3
            for _, writer in flood:
                writer.close()
        finally:
            for _, writer in held:
                writer.close()


def test_the_server_reads_requests_with_the_guarded_protocol() -> None:
    loaded = config(create_app(Settings()), Settings())
    loaded.load()
    assert loaded.http_protocol_class.__name__ == "GuardedHttpProtocol"
    assert issubclass(loaded.http_protocol_class, uvicorn.protocols.http.httptools_impl.HttpToolsProtocol)


async def test_an_answer_carries_its_date_and_its_request_id_but_names_no_server_software(
    server: tuple[int, DrainingServer],
) -> None:
    port, _ = server
    answer, _ = await exchange(port, sample_request(b'{"model": "faces"}') + b'{"model": "faces"}')
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200 ") and b"\r\ndate: " in head and b"\r\nx-request-id: " in head
    assert b"\r\nserver:" not in head
