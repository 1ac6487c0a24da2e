"""How many CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (`docker run --cpus`, a
Kubernetes CPU limit).

torch sizes its thread pool by the host's cores, and neither it nor `os.sched_getaffinity` sees a quota: in a
container limited to 2 CPUs on a 64-core host torch would start 32 OpenMP threads, which the quota then throttles
in turn, and every parallel op waits for the slowest of them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """CPUs the cgroup's quota allows (quota / period), or None where there is no quota. cgroup v2 (`cpu.max`) or v1
    (`cpu/cpu.cfs_quota_us` and `cpu/cpu.cfs_period_us`), as a container sees its own."""
    try:
        v2 = root / "cpu.max"
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None  # no cgroup files (macOS, a bare host) or unreadable ones: no quota known


def affinity_mask() -> set[int] | None:
    """The CPUs in this process's affinity mask, or None where the OS has no such mask (macOS)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def affinity_cpus() -> int:
    """The CPUs in this process's affinity mask (all of the host's where the OS has no such mask)."""
    mask = affinity_mask()
    return len(mask) if mask is not None else os.cpu_count() or 1


def usable_cpus(root: Path = CGROUP) -> int:
    """The CPUs in the affinity mask, or fewer where a quota allows fewer (rounded up: 1.5 CPUs is 2 threads)."""
    affinity = affinity_cpus()
    limit = cgroup_cpu_limit(root)
    return max(1, min(affinity, math.ceil(limit))) if limit else affinity
