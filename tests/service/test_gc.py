"""What the service loads at start-up is left out of Python's garbage collections while it serves."""

from __future__ import annotations

import gc

from service.settings import Settings
from tests.conftest import serve


async def test_objects_loaded_at_start_up_are_frozen_while_serving_and_thawed_at_shutdown(settings: Settings) -> None:
    async with serve(settings) as client:
        assert (await client.get("/readyz")).status_code == 200
        assert gc.get_freeze_count() > 0  # the models, the app, the libraries: a full collection skips them
        assert gc.isenabled()
        assert (await client.post("/sample", json={"model": "mnist", "n": 1})).status_code == 200
    assert gc.get_freeze_count() == 0  # a process that goes on (an embedding app, these tests) collects them again
