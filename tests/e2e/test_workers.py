"""VAE_WORKERS: several server processes on one port, counted as one service, stopped as one."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import running_server

pytestmark = pytest.mark.e2e


def children(pid: int) -> list[int]:
    """The worker processes whose parent is `pid` (from /proc; multiprocessing's resource tracker is not one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                after_name = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                worker = b"spawn_main" in (entry / "cmdline").read_bytes()
            except OSError:  # it exited meanwhile
                continue
            if int(after_name[1]) == pid and worker:
                found.append(int(entry.name))
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(after_name[11]) + int(after_name[12])) / os.sysconf("SC_CLK_TCK")


def eventually(check: Callable[[], bool], timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def loaded(pids: list[int]) -> None:
    """Wait until every worker has loaded its models: /readyz answers as soon as one has. Loading keeps a
    worker busy; a loaded worker, with no requests, is idle."""
    def idle() -> bool:
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(0.5)
        return [cpu_seconds(pid) for pid in pids] == before

    assert eventually(idle, timeout_s=60)


def requests_counted(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    line = next(line for line in text.splitlines() if line.startswith('vae_requests_total{endpoint="/sample"'))
    return float(line.rsplit(" ", 1)[1])


def test_two_workers_share_the_port_and_the_metrics_add_up_across_them(tiny_models: Path) -> None:
    with running_server(tiny_models, VAE_WORKERS="2") as (url, process):
        workers = children(process.pid)
        assert len(workers) == 2
        loaded(workers)
        busy = {pid: cpu_seconds(pid) for pid in workers}
        sent = 0

        async def load() -> list[int]:  # 100 requests on 32 new connections, each accepted by one worker or the other
            limits = httpx.Limits(max_connections=32)
            async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
                answers = await asyncio.gather(*(client.post("/sample", json={"model": "mnist"}) for _ in range(100)))
            return [r.status_code for r in answers]

        def both_served() -> bool:
            nonlocal sent
            assert asyncio.run(load()) == [200] * 100
            sent += 100
            return all(cpu_seconds(pid) - busy[pid] > 0.02 for pid in workers)

        assert eventually(both_served)
        # whichever worker answers /metrics (a request is counted just after its answer is sent: hence eventually)
        assert eventually(lambda: [requests_counted(url) for _ in range(4)] == [float(sent)] * 4, timeout_s=5)
        text = httpx.get(f"{url}/metrics", timeout=10).text
        memory = float(next(line for line in text.splitlines() if line.startswith("process_resident_memory_bytes ")).split()[1])
        assert memory > 2 * 100 * 2**20  # both workers' memory, added up
        assert "process_cpu_seconds_total " in text and 'vae_model_ready{model="faces"} 1.0' in text


def test_a_worker_that_dies_is_replaced_and_sigterm_stops_them_all(tiny_models: Path) -> None:
    with running_server(tiny_models, VAE_WORKERS="2") as (url, process):
        first = children(process.pid)[0]
        loaded(children(process.pid))
        os.kill(first, signal.SIGKILL)
        assert eventually(lambda: len(children(process.pid)) == 2 and first not in children(process.pid))
        assert eventually(lambda: httpx.post(f"{url}/sample", json={"model": "faces"}, timeout=10).status_code == 200)
        workers = children(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_workers_stop_when_their_parent_is_killed(tiny_models: Path) -> None:
    with running_server(tiny_models, VAE_WORKERS="2") as (_, process):
        workers = children(process.pid)
        process.kill()
        process.wait()
        assert eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout_s=30)
