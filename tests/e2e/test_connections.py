"""VAE_MAX_CONNECTIONS: a flood of connections gets 503 at once instead of exhausting the server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import eventually, running_server

pytestmark = pytest.mark.e2e


def test_requests_beyond_the_connection_limit_get_503_and_the_others_are_served(tiny_models: Path) -> None:
    with running_server(tiny_models, VAE_MAX_CONNECTIONS="2") as (url, _):
        held = [httpx.Client(base_url=url, timeout=10) for _ in range(3)]  # one connection each, kept alive
        try:
            first, second, third = (client.get("/models") for client in held)
            assert first.status_code == second.status_code == 200
            assert third.status_code == 503
            assert "VAE_MAX_CONNECTIONS" in third.json()["detail"]
            assert third.headers["connection"] == "close"  # so that it no longer counts
            held[1].close()  # once the server has seen a connection close, the next one is served
            deadline = time.monotonic() + 5
            while (status := httpx.get(f"{url}/models", timeout=10).status_code) == 503 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert status == 200
        finally:
            for client in held:
                client.close()


def test_clients_up_to_the_connection_limit_are_all_served_while_batches_answer_them_together(tiny_models: Path) -> None:
    # A batch answers its requests in one pass of the event loop and their clients send again at once: the connection
    # count must not see a request answered and its client's next one as two
    clients = 8

    def client_statuses() -> list[int]:
        with httpx.Client(base_url=url, timeout=30) as client:
            return [client.post("/sample", json={"model": "faces", "n": 1}).status_code for _ in range(60)]

    with running_server(tiny_models, VAE_MAX_CONNECTIONS=str(clients)) as (url, _):
        with ThreadPoolExecutor(clients) as pool:
            statuses = [status for statuses in pool.map(lambda _: client_statuses(), range(clients)) for status in statuses]
        # the clients' connections are closed; once the server has seen it, there is room for one more
        metrics = eventually(lambda: (answer := httpx.get(f"{url}/metrics", timeout=10)).status_code == 200 and answer.text)
    assert set(statuses) == {200}
    images, batches = (
        float(line.split()[-1]) for name in ("sum", "count") for line in metrics.splitlines()
        if line.startswith(f'vae_batch_size_images_{name}{{model="faces",op="decode"')
    )
    assert images / batches > 1  # batches answered several clients at once
