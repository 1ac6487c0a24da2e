"""The uvicorn server as vae-serve runs it tells the app how many client connections are active, for its batchers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from service import server
from service.app import create_app
from service.http_protocol import IDLE_AFTER_S
from service.settings import Settings
from tests.service.tools import healthz_status, read_answer, running

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def serving(tmp_path: Any) -> AsyncIterator[tuple[FastAPI, int]]:
    """A real uvicorn with vae-serve's protocol on a free port, with no models (its keep-alive timer is what tells an
    idle connection from an active one): the app and the port."""
    async with running(Settings(model_dir=tmp_path, port=0)) as (port, served):
        yield served.config.app, port  # type: ignore[misc]


async def settled(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)  # for the server's loop to take what the clients did


async def test_a_new_connection_is_active_until_it_closes(tmp_path: Any) -> None:
    async with serving(tmp_path) as (app, port):
        assert app.state.active_connections() == 0
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await settled()
        assert app.state.active_connections() == 3  # their first requests may come at any moment
        connections[0][1].close()
        await settled()
        assert app.state.active_connections() == 2


async def test_a_connection_answered_a_moment_ago_is_active_one_idle_since_is_not_and_a_new_request_wakes_it(
    tmp_path: Any,
) -> None:
    async with serving(tmp_path) as (app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await healthz_status(reader, writer) == b"200"
        assert app.state.active_connections() == 1  # its client may send again at once
        await asyncio.sleep(IDLE_AFTER_S * 4)
        assert app.state.active_connections() == 0  # idle: a wait for company would wait for nobody
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # the next request, begun
        await settled()
        assert app.state.active_connections() == 1
        writer.close()
        await settled()
        assert app.state.active_connections() == 0


async def test_the_count_follows_many_connections_answered_idle_closed_and_woken(tmp_path: Any) -> None:
    async with serving(tmp_path) as (app, port):
        connections: list[Connection] = [await asyncio.open_connection("127.0.0.1", port) for _ in range(12)]
        for reader, writer in connections:
            assert await healthz_status(reader, writer) == b"200"
        await asyncio.sleep(IDLE_AFTER_S * 4)
        assert app.state.active_connections() == 0  # all idle
        for _, writer in connections[:4]:
            writer.close()  # closed while idle
        for _, writer in connections[4:7]:
            writer.write(b"GET /healthz HTTP/1.1\r\n")  # woken, their requests not all in yet
        await settled()
        assert app.state.active_connections() == 3
        for _, writer in connections[4:6]:
            writer.close()  # closed in a request
        await settled()
        assert app.state.active_connections() == 1
        reader, writer = connections[7]
        assert await healthz_status(reader, writer) == b"200"  # answered just now: active for a moment
        assert app.state.active_connections() == 2
        await asyncio.sleep(IDLE_AFTER_S * 4)
        assert app.state.active_connections() == 1


async def test_requests_pipelined_on_one_connection_count_it_once(tmp_path: Any) -> None:
    async with serving(tmp_path) as (app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n" * 3)  # sent before any answer
        for _ in range(3):
            assert (await read_answer(reader))[0] == 200
        assert app.state.active_connections() == 1
        await asyncio.sleep(IDLE_AFTER_S * 4)
        assert app.state.active_connections() == 0
        writer.close()
        await settled()
        assert app.state.active_connections() == 0


async def test_the_metrics_show_the_open_connections_against_their_limit(tmp_path: Any) -> None:
    async with serving(tmp_path) as (app, port):
        registry = app.state.metrics.registry
        assert registry.get_sample_value("vae_connections_max") == Settings().max_connections
        assert registry.get_sample_value("vae_connections_open") == 0
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await settled()
        assert registry.get_sample_value("vae_connections_open") == 3
        connections[0][1].close()
        await settled()
        assert registry.get_sample_value("vae_connections_open") == 2


async def test_a_connection_handed_to_websockets_is_no_longer_counted(tmp_path: Any) -> None:
    async with serving(tmp_path) as (app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nhost: test\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 403")  # no WebSocket routes
        writer.close()
        await settled()
        assert app.state.active_connections() == 0  # else every lone request would wait for a client that is gone
        assert app.state.metrics.registry.get_sample_value("vae_connections_open") == 0


async def test_a_websocket_upgrade_is_refused_counted_and_logged_as_any_refused_request(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(tmp_path) as (app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /sample HTTP/1.1\r\nhost: test\r\nupgrade: websocket\r\nconnection: upgrade\r\nx-request-id: ws-1\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        )
        with caplog.at_level(logging.INFO, logger="vae_serve.access"):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 403")
            writer.close()
            await settled()
        registry = app.state.metrics.registry
        assert registry.get_sample_value("vae_requests_total", {"endpoint": "unmatched", "model": "", "status": "403"}) == 1
        assert registry.get_sample_value("vae_failures_total", {"reason": "invalid"}) == 1
    (line,) = [r for r in caplog.records if r.name == "vae_serve.access"]
    assert (line.method, line.path, line.status, line.request_id) == ("GET", "/sample", 403, "ws-1")  # type: ignore[attr-defined]


async def test_the_app_is_told_nothing_on_another_protocol(tmp_path: Any) -> None:
    # its batchers then wait for company only where other requests were queued with theirs
    app = create_app(Settings(model_dir=tmp_path))
    server.DrainingServer(uvicorn.Config(app))
    assert not hasattr(app.state, "active_connections")
