"""VAE_MAX_CONNECTIONS: a flood of connections gets 503 at once instead of exhausting the server."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import running_server

pytestmark = pytest.mark.e2e


def test_requests_beyond_the_connection_limit_get_503_and_the_others_are_served(tiny_models: Path) -> None:
    with running_server(tiny_models, VAE_MAX_CONNECTIONS="2") as (url, _):
        held = [httpx.Client(base_url=url, timeout=10) for _ in range(3)]  # one connection each, kept alive
        try:
            first, second, third = (client.get("/models") for client in held)
            assert first.status_code == second.status_code == 200
            assert third.status_code == 503
            held[1].close()  # once the server has seen a connection close, the next one is served
            deadline = time.monotonic() + 5
            while (status := httpx.get(f"{url}/models", timeout=10).status_code) == 503 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert status == 200
        finally:
            for client in held:
                client.close()
