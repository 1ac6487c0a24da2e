"""The uvicorn server as vae-serve runs it tells the app how many client connections are active, for its batchers."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

from service.app import create_app
from service.server import IDLE_AFTER_S, DrainingServer
from service.settings import Settings
from tests.service.tools import healthz_status


async def test_the_app_learns_how_many_client_connections_are_active(tmp_path: Any) -> None:
    app = create_app(Settings(model_dir=tmp_path))
    server = DrainingServer(uvicorn.Config(app))
    assert app.state.active_connections() == 0
    server.server_state.connections.update(object() for _ in range(3))  # type: ignore[misc]  # three, in requests
    assert app.state.active_connections() == 3


async def test_a_connection_answered_a_moment_ago_is_active_one_idle_since_is_not_and_a_new_request_wakes_it(
    tmp_path: Any,
) -> None:
    # a real uvicorn: its keep-alive timer is what tells an idle connection from an active one
    app = create_app(Settings(model_dir=tmp_path))
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await healthz_status(reader, writer) == b"200"
        assert app.state.active_connections() == 1  # its client may send again at once
        await asyncio.sleep(IDLE_AFTER_S * 4)
        assert app.state.active_connections() == 0  # idle: a wait for company would wait for nobody
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # the next request, begun
        await asyncio.sleep(0.05)
        assert app.state.active_connections() == 1
    finally:
        writer.close()
        server.should_exit = True
        await serving
