"""Start the real server (`python -m service`) as a subprocess, as users start it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(model_dir: Path, ready_timeout_s: float = 60, **env: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yield (base URL, process) once /readyz answers 200; always stop the process afterwards."""
    port = free_port()
    environment = {**os.environ, "VAE_MODEL_DIR": str(model_dir), "VAE_PORT": str(port), **env}
    url = f"http://127.0.0.1:{port}"
    # The log goes to a file, not a pipe: nobody reads a pipe while the tests run, and a full one blocks the server.
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen([sys.executable, "-m", "service"], env=environment, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                if process.poll() is not None:
                    output.seek(0)
                    raise RuntimeError(f"server exited with {process.returncode}: {output.read().decode()[-2000:]}")
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become ready in time")
                time.sleep(0.1)
            yield url, process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def eventually(check: Callable[[], Any], timeout_s: float = 15) -> Any:
    """The first truthy value of `check()`, polled until `timeout_s`; the last value if none came."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)
