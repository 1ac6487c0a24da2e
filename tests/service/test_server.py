"""The uvicorn server as vae-serve runs it tells the app what its batchers need to know of the connections."""

from __future__ import annotations

from typing import Any

import uvicorn

from service.app import create_app
from service.server import DrainingServer
from service.settings import Settings


def test_the_app_learns_how_many_connections_have_no_request_in_progress(tmp_path: Any) -> None:
    app = create_app(Settings(model_dir=tmp_path))
    server = DrainingServer(uvicorn.Config(app))
    state = server.server_state
    state.connections.update(object() for _ in range(3))  # type: ignore[misc]  # three clients connected
    state.tasks.add(object())  # type: ignore[arg-type]  # one request read and not yet answered
    assert app.state.idle_connections() == 2
    state.tasks.update(object() for _ in range(3))  # type: ignore[misc]
    assert app.state.idle_connections() == 0
