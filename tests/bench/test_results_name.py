"""A run's results file is named after when and where it ran: the host, and the GPU's name where it used one."""

from __future__ import annotations

from typing import Any

from bench.__main__ import results_name


def run_on(host: str, device_name: str | None) -> dict[str, Any]:
    return {"started": "2026-11-27 11:24:52 UTC", "machine": {"host": host, "device_name": device_name}}


def test_a_cpu_run_is_named_after_its_host() -> None:
    assert results_name(run_on("vm", None)) == "20261127T112452Z-vm"


def test_a_gpu_run_adds_the_gpu_s_name_in_characters_safe_for_any_file_system() -> None:
    assert results_name(run_on("GPU box_1", "NVIDIA H200")) == "20261127T112452Z-gpu-box-1-nvidia-h200"
