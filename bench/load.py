"""Load the running service with wrk: one fixed request body per scenario, a fixed number of connections."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.server import Server, batcher_stats, machine_busy_seconds

LUA = Path(__file__).with_name("post.lua")
_BOUNDARY = "vae-serve-bench-boundary"


@dataclass(frozen=True)
class Scenario:
    """One wrk run: `concurrency` connections, each sending the same request back to back."""

    model: str
    endpoint: str  # "sample" or "encode"
    n: int  # images per request
    concurrency: int
    accept: str = "image/png"  # /sample: one PNG (a grid for n > 1); application/json: one PNG per image
    headers: tuple[str, ...] = ()  # more request headers, "Name: value" (bench.ab --header: a page's Origin, say)

    @property
    def op(self) -> str:
        """The batcher that does the work: /sample decodes."""
        return "encode" if self.endpoint == "encode" else "decode"

    @property
    def request(self) -> str:
        if self.endpoint == "encode":
            return f"encode {self.n} image" + ("s" if self.n > 1 else "")
        grid = " grid" if self.n > 1 and self.accept == "image/png" else ""
        return f"sample n={self.n}{' json' if self.accept == 'application/json' else grid}"

    @property
    def ceiling(self) -> tuple[str, int]:
        """The in-process mode and batch size this scenario's images/s is compared with."""
        if self.endpoint == "encode":
            return "upload+encode", min(64, self.concurrency * self.n)
        return "decode+png", 64


def scenarios(models: list[str]) -> list[Scenario]:
    """What `make bench` runs for each model."""
    out = []
    for model in models:
        out += [Scenario(model, "sample", 1, c) for c in (1, 8, 32, 64)]
        # n=64 as JSON: 64 separate PNGs, the same work as the decode+png ceiling at batch 64.
        out += [Scenario(model, "sample", 64, c, "application/json") for c in (1, 2)]
        out.append(Scenario(model, "sample", 64, 1))  # the default answer: one PNG of an 8x8 grid
        out.append(Scenario(model, "encode", 1, 32))
        out.append(Scenario(model, "encode", 64, 1))  # a bulk encode: 64 uploads a request, against upload+encode at 64
    return out


def baseline_scenarios(model: str) -> list[Scenario]:
    """What the general-purpose baselines (bench/baselines.py) serve: one PNG per request."""
    return [Scenario(model, "sample", 1, c) for c in (1, 8, 64)]


def warm_up_scenarios(models: list[str]) -> list[Scenario]:
    """Short runs before anything is timed: between them they produce every batch size from 1 to 64, so
    TorchScript's first-run specialisation and the allocator's growth are paid up front."""
    return [s for m in models for s in (Scenario(m, "sample", 1, 64), Scenario(m, "sample", 64, 2, "application/json"),
                                        Scenario(m, "encode", 1, 32))]


def write_body(scenario: Scenario, upload: bytes, directory: Path) -> tuple[Path, str]:
    """The request body, built once, and its content type."""
    path = directory / f"{scenario.model}-{scenario.endpoint}-{scenario.n}.body"
    if scenario.endpoint == "sample":
        path.write_text(json.dumps({"model": scenario.model, "n": scenario.n}))
        return path, "application/json"
    parts = [f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{scenario.model}\r\n'.encode()]
    for i in range(scenario.n):
        parts.append(
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{i}.png"\r\n'
            "Content-Type: image/png\r\n\r\n".encode() + upload + b"\r\n"
        )
    path.write_bytes(b"".join(parts) + f"--{_BOUNDARY}--\r\n".encode())
    return path, f"multipart/form-data; boundary={_BOUNDARY}"


def wrk_version() -> str:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get update && apt-get install -y wrk (or brew install wrk)")
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).split("\n", 1)[0].split(" [")[0].strip()


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    url: str, body: Path, content_type: str, accept: str, concurrency: int, duration_s: float, threads: int = 1,
    headers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One wrk run; what post.lua's `done` printed. The timeout is the service's own (30 s), so a slow answer
    counts as slow, not as a wrk error. `headers`: more request headers, "Name: value"."""
    command = [
        "wrk", f"-t{min(threads, concurrency)}", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s",
        "--timeout", "30s", *(arg for header in headers for arg in ("-H", header)),
        "-s", str(LUA), url, "--", str(body), content_type, accept,
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 90, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
            return result
    raise RuntimeError(f"wrk printed no result (exit {out.returncode}):\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}")


def measure(server: Server, scenario: Scenario, body: Path, content_type: str, duration_s: float,
            wrk_threads: int) -> dict[str, Any]:
    """Run one scenario against the server: throughput, latency, errors, and how the server behaved."""
    counters = server.counters()
    (cpu, loop_cpu), busy, wrk_cpu = server.cpu_seconds(), machine_busy_seconds(), _children_cpu_seconds()
    started = time.perf_counter()
    wrk = run_wrk(f"{server.url}/{scenario.endpoint}", body, content_type, scenario.accept, scenario.concurrency,
                  duration_s, wrk_threads, scenario.headers)
    wall = time.perf_counter() - started
    (cpu_after, loop_cpu_after), busy = server.cpu_seconds(), machine_busy_seconds() - busy
    cpu, loop_cpu = cpu_after - cpu, loop_cpu_after - loop_cpu
    wrk_cpu = _children_cpu_seconds() - wrk_cpu  # the server is a child too, but counts only once reaped
    stats = batcher_stats(counters, server.counters(), scenario.model, scenario.op)
    seconds = wrk["duration_us"] / 1e6
    requests, errors, latency = wrk["requests"], wrk["errors"], wrk["latency_us"]
    return {
        "model": scenario.model,
        "endpoint": f"/{scenario.endpoint}",
        "request": scenario.request,
        "n": scenario.n,
        "concurrency": scenario.concurrency,
        "accept": scenario.accept,
        "duration_s": round(seconds, 3),
        "requests": requests,
        "requests_per_s": requests / seconds,
        "images_per_s": requests * scenario.n / seconds,
        "latency_ms": {k: v / 1000 for k, v in latency.items()},
        "non_2xx": errors["status"],  # wrk counts answers with a status above 399
        "socket_errors": {k: errors[k] for k in ("connect", "read", "write", "timeout")},
        "ceiling": dict(zip(("mode", "batch"), scenario.ceiling, strict=True)),  # what `ratio` divides by
        "server_cpu_cores": cpu / wall,  # CPU seconds the server used per second of the run
        "loop_cpu_cores": loop_cpu / wall,  # of which its event loop: near 1.0, HTTP handling is the limit
        "wrk_cpu_cores": wrk_cpu / wall,
        "other_cores": max(0.0, busy - cpu - wrk_cpu) / wall,  # everything else on the machine, the bench included
        **stats,
    }
