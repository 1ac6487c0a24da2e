"""Start the service as users start it (`vae-serve` with VAE_* variables) and read what it costs: start-up
time, resident memory and CPU from /proc, and its own Prometheus counters."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command() -> list[str]:
    """The `vae-serve` script next to this interpreter (what `make serve` runs), else `python -m service`."""
    script = Path(sys.executable).parent / "vae-serve"  # not resolved: a venv's python is a symlink
    return [str(script)] if script.exists() else [sys.executable, "-m", "service"]


def proc_memory_mb(pid: int) -> dict[str, float]:
    """Resident memory now (VmRSS) and its peak so far (VmHWM), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[name].split()[0]) / 1024 for key, name in (("rss", "VmRSS"), ("peak", "VmHWM"))}


def proc_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of every thread of the process, or of its thread `tid`."""
    path = Path(f"/proc/{pid}/stat") if tid is None else Path(f"/proc/{pid}/task/{tid}/stat")
    after_name = path.read_text().rsplit(")", 1)[1].split()
    return (int(after_name[11]) + int(after_name[12])) / _CLOCK_TICKS  # utime, stime (fields 14 and 15)


def proc_children(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent on anything but idling (first line of /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / _CLOCK_TICKS  # user..steal; guest time is already in user


# The counters whose change over a load run says how the batcher behaved.
_WATCHED = ("vae_batch_size_images", "vae_queue_wait_seconds", "vae_compute_seconds")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    ready_s: float
    log_path: Path
    metrics: bool = True  # serves vae-serve's /metrics (the baselines do not)

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """The server process and its children: the worker processes with VAE_WORKERS > 1."""
        return [self.pid, *proc_children(self.pid)]

    def memory_mb(self) -> dict[str, float]:
        """Summed over the server's processes (the peaks too: an upper bound of the peak of the sum)."""
        per_process = [proc_memory_mb(pid) for pid in self.pids()]
        return {key: sum(m[key] for m in per_process) for key in ("rss", "peak")}

    def cpu_seconds(self) -> tuple[float, float]:
        """(the whole server, its main threads: the event loops that run HTTP, routing and validation)."""
        pids = self.pids()
        return sum(proc_cpu_seconds(p) for p in pids), sum(proc_cpu_seconds(p, p) for p in pids)

    def counters(self) -> dict[tuple[str, str, str], float]:
        """(metric sample name, model, op) -> value for the batcher's histograms' _sum and _count."""
        if not self.metrics:
            return {}
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out: dict[tuple[str, str, str], float] = {}
        for family in text_string_to_metric_families(text):
            if family.name not in _WATCHED:
                continue
            for s in family.samples:
                if s.name.endswith(("_sum", "_count")):
                    key = (s.name, s.labels.get("model", ""), s.labels.get("op", ""))
                    out[key] = out.get(key, 0.0) + s.value
        return out

    def log_tail(self) -> str:
        return _tail(self.log_path)


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def batcher_stats(
    before: dict[tuple[str, str, str], float], after: dict[tuple[str, str, str], float], model: str, op: str,
) -> dict[str, float | None]:
    """Mean batch size, queue wait and compute time per batch between two `counters()` readings."""

    def delta(name: str, op_label: str) -> float:
        key = (name, model, op_label)
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches = delta("vae_batch_size_images_count", op)
    waits = delta("vae_queue_wait_seconds_count", "")  # queue wait is per model, both ops together
    return {
        "batches": batches,
        "mean_batch": delta("vae_batch_size_images_sum", op) / batches if batches else None,
        "mean_queue_ms": 1000 * delta("vae_queue_wait_seconds_sum", "") / waits if waits else None,
        "mean_compute_ms": 1000 * delta("vae_compute_seconds_sum", op) / batches if batches else None,
    }


def env_item(text: str) -> tuple[str, str]:
    """A command line's NAME=VALUE (--env): the variable's name and value for `running_server`'s environment."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", text):
        raise argparse.ArgumentTypeError(f"takes NAME=VALUE, not {text!r}")
    name, value = text.split("=", 1)
    return name, value


@contextmanager
def running_server(
    model_dir: Path, env: dict[str, str], log_path: Path, ready_timeout_s: float = 120,
    command: Callable[[int], list[str]] | None = None, ready_path: str = "/readyz", cwd: Path | None = None,
) -> Iterator[Server]:
    """Start the server (vae-serve, or `command(port)`, in `cwd`); yield it once `ready_path` answers 200 (ready_s
    counts from just before the process starts).

    The bench's own VAE_* variables replace any in the caller's environment, so a stray VAE_API_KEY or
    VAE_MAX_BATCH_SIZE cannot change what is measured without being recorded."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    environment |= {"VAE_MODEL_DIR": str(model_dir), "VAE_HOST": "127.0.0.1", "VAE_PORT": str(port), **env}
    url = f"http://127.0.0.1:{port}"
    log = log_path.open("wb")
    started = time.perf_counter()
    argv = server_command() if command is None else command(port)
    # A session of its own: what the server started (LitServe's worker processes) is stopped with it below.
    process = subprocess.Popen(
        argv, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
    )
    try:
        with httpx.Client(timeout=1) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited with {process.returncode}:\n{_tail(log_path)}")
                try:
                    if client.get(url + ready_path).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() - started > ready_timeout_s:
                    raise RuntimeError(f"the server was not ready within {ready_timeout_s:g} s:\n{_tail(log_path)}")
                time.sleep(0.01)
        yield Server(process=process, url=url, ready_s=time.perf_counter() - started, log_path=log_path,
                     metrics=command is None)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the server drains and exits on its own
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(ProcessLookupError):  # none left: vae-serve's workers stop with it
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
