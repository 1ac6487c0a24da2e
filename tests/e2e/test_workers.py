"""VAE_WORKERS: several server processes on one port, counted as one service, stopped as one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.server import proc_children, proc_cpu_seconds
from tests.e2e.server import eventually, running_server

pytestmark = pytest.mark.e2e


def children(pid: int) -> list[int]:
    """The worker processes of `pid` (multiprocessing's resource tracker is a child too, not a worker)."""
    workers = []
    for child in proc_children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
        except OSError:  # it exited meanwhile
            continue
    return sorted(workers)


def loaded(pids: list[int]) -> None:
    """Wait until every worker has loaded its models: /readyz answers as soon as one has. Loading keeps a
    worker busy; a loaded worker, with no requests, is idle."""
    def idle() -> bool:
        before = [proc_cpu_seconds(pid) for pid in pids]
        time.sleep(0.5)
        return [proc_cpu_seconds(pid) for pid in pids] == before

    assert eventually(idle, timeout_s=60)


def requests_counted(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    line = next(line for line in text.splitlines() if line.startswith('vae_requests_total{endpoint="/sample"'))
    return float(line.rsplit(" ", 1)[1])


def test_the_supervisor_loads_neither_torch_nor_the_app() -> None:
    """It binds the port, starts the workers and replaces those that die: 38 MiB resident, where the app's imports
    took 254 MiB beside every set of workers."""
    heavy = "{'torch', 'fastapi', 'uvicorn', 'service.app', 'service.server'}"
    code = f"import sys, service.__main__, service.workers; print(sorted({heavy} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_two_workers_share_the_port_and_the_metrics_add_up_across_them(tiny_models: Path) -> None:
    with running_server(tiny_models, VAE_WORKERS="2") as (url, process):
        workers = children(process.pid)
        assert len(workers) == 2
        loaded(workers)
        busy = {pid: proc_cpu_seconds(pid) for pid in workers}
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
            return all(proc_cpu_seconds(pid) - busy[pid] > 0.02 for pid in workers)

        assert eventually(both_served, timeout_s=20)
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
        assert eventually(lambda: len(children(process.pid)) == 2 and first not in children(process.pid), timeout_s=20)
        assert eventually(lambda: httpx.post(f"{url}/sample", json={"model": "faces"}, timeout=10).status_code == 200,
                          timeout_s=20)
        workers = children(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_workers_stop_when_their_parent_is_killed_and_leave_no_metrics_folder(tiny_models: Path) -> None:
    with running_server(tiny_models, VAE_WORKERS="2") as (_, process):
        workers = children(process.pid)
        environ = Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0")
        metrics = Path(next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).split(b"=", 1)[1].decode())
        assert metrics.is_dir()
        process.kill()
        process.wait()
        assert eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout_s=30)
        assert not metrics.exists()  # a supervisor killed outright cannot remove it; its workers do
