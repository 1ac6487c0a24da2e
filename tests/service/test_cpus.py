"""The CPUs the service sizes its threads by: the affinity mask, capped by a container's CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from service import cpus, runtime
from service.metrics import Metrics
from service.runtime import Runtime
from service.settings import Settings

AFFINITY = len(os.sched_getaffinity(0))


def cgroup_v2(root: Path, cpu_max: str) -> Path:
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(root: Path, quota_us: int, period_us: int = 100_000) -> Path:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period_us}\n")
    return root


@pytest.mark.parametrize(("cpu_max", "limit"), [("200000 100000", 2.0), ("150000 100000", 1.5), ("max 100000", None)])
def test_a_cgroup_v2_quota_is_read_as_cpus(tmp_path: Path, cpu_max: str, limit: float | None) -> None:
    assert cpus.cgroup_cpu_limit(cgroup_v2(tmp_path, cpu_max)) == limit


@pytest.mark.parametrize(("quota_us", "limit"), [(50_000, 0.5), (400_000, 4.0), (-1, None)])
def test_a_cgroup_v1_quota_is_read_as_cpus(tmp_path: Path, quota_us: int, limit: float | None) -> None:
    assert cpus.cgroup_cpu_limit(cgroup_v1(tmp_path, quota_us)) == limit


@pytest.mark.parametrize("cpu_max", ["", "garbage", "100000 0"])
def test_no_cgroup_files_or_unreadable_ones_mean_no_known_quota(tmp_path: Path, cpu_max: str) -> None:
    assert cpus.cgroup_cpu_limit(tmp_path) is None
    assert cpus.cgroup_cpu_limit(cgroup_v2(tmp_path, cpu_max)) is None
    assert cpus.usable_cpus(tmp_path) == AFFINITY


def test_a_quota_caps_the_affinity_mask_rounded_up_and_never_raises_it(tmp_path: Path) -> None:
    assert cpus.usable_cpus(cgroup_v1(tmp_path, 50_000)) == 1  # half a CPU still runs one thread
    assert cpus.usable_cpus(cgroup_v2(tmp_path, f"{100_000 * (AFFINITY + 8)} 100000")) == AFFINITY


def test_torch_default_threads_are_capped_at_the_usable_cpus_unless_chosen(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "USABLE_CPUS", 1)  # as in a container with a quota of one CPU
    try:
        for chosen, expected in ((0, 1), (3, 3)):  # VAE_TORCH_THREADS set by hand is obeyed, even above
            rt = Runtime.load(settings.model_copy(update={"torch_threads": chosen, "device": "cpu"}), Metrics())
            try:
                assert rt.lanes.model_thread.submit(torch.get_num_threads).result() == expected  # where models run
            finally:
                rt.lanes.shutdown()
                rt.image_threads.shutdown()
            torch.set_num_threads(2)  # torch's default on a host with more cores
    finally:
        torch.set_num_threads(before)
