"""End to end: the real server scraped by a real Prometheus with the shipped alert rules."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import make_tiny_models
from tests.deploy.test_dockerfile import healthcheck_passes
from tests.deploy.tools import DEPLOY, tool
from tests.e2e.server import eventually, free_port, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@contextmanager
def running_prometheus(target: str, workdir: Path, ready_timeout_s: float = 15) -> Iterator[str]:
    """A Prometheus scraping `target` every second with deploy/prometheus/alerts.yml; always stopped afterwards."""
    binary = tool("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "scrape_configs": [{"job_name": "vae-serve", "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=1).status_code == 200, ready_timeout_s, process, workdir)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_for(check: Callable[[], bool], timeout_s: float, process: subprocess.Popen[bytes], workdir: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            log = (workdir / "prometheus.log").read_text()[-2000:]
            raise RuntimeError(f"prometheus exited with {process.returncode}: {log}")
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s} s")
        time.sleep(0.25)


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_prometheus_scrapes_the_running_service(tmp_path: Path) -> None:
    tool("prometheus")  # skip before starting the server when there is no Prometheus
    models = make_tiny_models(tmp_path / "models")
    env = {"VAE_HOST": "127.0.0.1", "VAE_DEVICE": "cpu", "VAE_TORCH_THREADS": "1"}
    with running_server(models, ready_timeout_s=30, **env) as (service, _):
        port = int(service.rsplit(":", 1)[1])
        assert healthcheck_passes(port), "the Dockerfile's HEALTHCHECK fails against a healthy server"
        (tmp_path / "prometheus").mkdir()
        with running_prometheus(f"127.0.0.1:{port}", tmp_path / "prometheus") as prometheus:
            for seed in range(3):
                r = httpx.post(f"{service}/sample", json={"model": "mnist", "n": 2, "seed": seed}, timeout=10)
                assert r.status_code == 200, r.text

            up = eventually(lambda: query(prometheus, 'up{job="vae-serve"} == 1'))
            assert up, "Prometheus never scraped the service"
            sample_requests = 'vae_requests_total{endpoint="/sample"} >= 3'
            samples = eventually(lambda: query(prometheus, sample_requests))
            assert samples, "vae_requests_total for /sample never reached 3 in Prometheus"
            assert {(s["metric"]["model"], s["metric"]["status"]) for s in samples} == {("mnist", "200")}
            assert query(prometheus, 'vae_model_ready{model="mnist"} == 1')

            rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
            alerts = {r["name"]: r["state"] for g in rules for r in g["rules"]}
            assert "VaeServeDown" in alerts and "VaeServeHigh5xxRate" in alerts, "alerts.yml did not load"
            assert alerts["VaeServeDown"] == "inactive" and alerts["VaeServeModelNotReady"] == "inactive"
