"""The bench's report compares each general-purpose baseline with vae-serve at the same threads and scenario."""

from __future__ import annotations

from typing import Any

from bench.report import baselines_table, markdown


def run(server: str | None, concurrency: int, images_per_s: float, p50_ms: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": "faces", "request": "sample n=1", "concurrency": concurrency, "images_per_s": images_per_s,
        "latency_ms": {"p50": p50_ms, "p99": 2 * p50_ms}, "non_2xx": 0,
        "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}, "server_cpu_cores": 1.5,
    }
    if server:
        out |= {"server": server, "ready_s": 1.5, "memory_mib": {"rss": 400.0}}
    return out


def results() -> dict[str, Any]:
    service_at = {  # the 1-thread service must be ignored: the baselines run at torch's default (2 here)
        1: [run(None, 64, 100.0, 9.0)],
        2: [run(None, 64, 700.0, 80.0), run(None, 64, 760.0, 85.0), run(None, 64, 740.0, 90.0), run(None, 1, 200.0, 5.0)],
    }
    return {
        "machine": {"torch_default_threads": 2},
        "service": [{"threads_setting": t, "runs": runs} for t, runs in service_at.items()],
        "baselines": [
            run("fastapi", 64, 370.0, 170.0), run("litserve", 8, 300.0, 26.0),
            run("asgi", 1, 500.0, 2.6) | {"paired_ceiling": {"mode": "decode+png", "batch": 1, "median_s": 0.002}},
        ],
    }


def test_each_baseline_sits_beside_the_services_median_at_torchs_default_threads() -> None:
    header, _, fastapi, litserve, _ = baselines_table(results())
    assert header.startswith("| server | model | request | conc. | images/s | p50 ms | p50 vs in-process |")
    assert fastapi.startswith("| fastapi | faces | sample n=1 | 64 | 370.0 | 170.0 | - |")
    assert "| 740.0 | 85.0 | 2.0x |" in fastapi  # the median of the three 2-thread runs; 740 / 370
    assert "| 300.0 | 26.0 | - | 52.0 | 0 | - | - | - |" in litserve  # no vae-serve run at 8 connections: no comparison


def test_a_lone_baseline_run_is_judged_against_its_paired_in_process_time_as_vae_serve_s_is() -> None:
    *_, floor = baselines_table(results())
    assert floor.startswith("| asgi | faces | sample n=1 | 1 | 500.0 | 2.6 | 1.30x |")  # 2.6 ms over 2.0 in-process


def test_the_report_has_a_baselines_section_only_when_they_ran() -> None:
    data = results() | {
        "started": "2026-11-26 12:00:00 UTC", "ceiling": [], "targets": [],
        "machine": {"torch_default_threads": 2, "host": "h", "cpu_model": "cpu", "cpus_usable": 2, "cpus": 2,
                    "memory_gib": 8.0, "device": "cpu", "torch": "2.13.0", "python": "3.11", "commit": None,
                    "load_average_start": [0.1, 0.1, 0.1]},
        "options": {"wrk": None, "command": "python -m bench --only baselines", "duration_s": 3.0,
                    "models_dir": "models", "env": []},
        "service": [],
    }
    text = markdown(data)
    assert "## General-purpose servers" in text and "## Ceiling" not in text
    assert "## General-purpose servers" not in markdown(data | {"baselines": []})
