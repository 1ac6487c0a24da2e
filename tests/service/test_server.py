"""The uvicorn server as vae-serve runs it tells the app how many client connections are open, for its batchers."""

from __future__ import annotations

from typing import Any

import uvicorn

from service.app import create_app
from service.server import DrainingServer
from service.settings import Settings


def test_the_app_learns_how_many_client_connections_are_open(tmp_path: Any) -> None:
    app = create_app(Settings(model_dir=tmp_path))
    server = DrainingServer(uvicorn.Config(app))
    assert app.state.open_connections() == 0
    server.server_state.connections.update(object() for _ in range(3))  # type: ignore[misc]  # three clients
    assert app.state.open_connections() == 3
