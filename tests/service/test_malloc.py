"""The service keeps memory a batch freed for the next batch instead of handing it back to the kernel."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from service import malloc

# In a fresh interpreter: allocate and touch 64 MiB in four blocks as a batch's activations would be, free them,
# and print how much of it is still resident.
_BATCH = """
import numpy as np, sys
from service import malloc
if sys.argv[1] == "reuse":
    assert malloc.reuse_freed_memory()
def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
before = rss_mib()
blocks = [np.ones(4 * 1024 * 1024, dtype=np.float32) for _ in range(4)]
del blocks
print(rss_mib() - before)
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallopt"), reason="glibc only")


def _kept_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _BATCH, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


@glibc
def test_memory_a_batch_freed_stays_resident_for_the_next_batch() -> None:
    assert _kept_mib("reuse") > 60
    assert _kept_mib("default") < 4  # glibc's default: large blocks go back to the kernel when freed


def test_without_glibc_malloc_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda _: object())  # a C library without mallopt (macOS, musl-like)
    assert malloc.reuse_freed_memory() is False
