"""python -m bench (make bench): the in-process ceiling, then the real service under wrk; see bench/README.md."""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench import baselines, ceiling, load, provenance, report
from bench.server import Server, env_item, running_server
from service import cpus, graphs, imaging
from service.artifact import ArtifactError, read_artifact
from service.repository import discover, pick_device, pick_dtype
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 32, 64)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def comma_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--models-dir", type=Path, default=REPO / "models", help="model repository (default: models/)")
    p.add_argument("--models", type=lambda s: [v for v in s.split(",") if v],
                   help="comma-separated models to measure (default: every model in --models-dir)")
    p.add_argument("--threads", type=comma_ints, default=[0],
                   help="VAE_TORCH_THREADS values to measure, e.g. 1,2 (0: the service's default; default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... for the ceiling and the service (VAE_DEVICE)")
    p.add_argument("--precision", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="the models' dtype for the ceiling and the service (VAE_PRECISION; default auto)")
    p.add_argument("--png-compression", default="fast", choices=("fast", "none"),
                   help="the PNGs' deflate in the ceiling, the service and the baselines (VAE_PNG_COMPRESSION; default fast)")
    p.add_argument("--cuda-graphs", default="on", choices=("on", "off"),
                   help="on a GPU, replay batches from CUDA graphs, in the ceiling and the service (VAE_CUDA_GRAPHS)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per wrk run (default 6)")
    p.add_argument("--quick", action="store_true", help="3 s wrk runs and shorter in-process timings")
    p.add_argument("--only", choices=("ceiling", "service", "baselines"),
                   help="measure only one part (baselines: the same model on general-purpose servers)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each scenario a target judges, and the server's start-up, this many times; the verdict takes "
                        "the median (default 1)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an extra variable for the service, e.g. --env VAE_MAX_WAIT_MS=1 or --env OMP_WAIT_POLICY=active "
                        "(repeatable)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk's threads (default 1: the cores are the server's)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder (bench/results)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 3.0)
    args.min_time = 0.3 if args.quick else 1.0  # seconds per in-process timing
    if args.repeat < 1:
        p.error("--repeat takes a count of 1 or more")
    if any(t < 0 for t in args.threads):
        p.error("--threads takes counts of 0 or more (0: torch's default)")
    try:
        args.extra_env = dict(env_item(item) for item in args.env)  # for the service and the baselines alike
    except argparse.ArgumentTypeError as exc:
        p.error(f"--env {exc}")
    return args


def machine(device: torch.device) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else []
    memory_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    return {
        "host": socket.gethostname(),
        "cpu_model": names[0] if names else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_usable": cpus.affinity_cpus(),  # the mask alone, as before: a CPU quota is not recorded
        "memory_gib": memory_kib / 2**20,
        "torch": torch.__version__,
        "torch_default_threads": ceiling.DEFAULT_THREADS,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "commit": provenance.git_commit(REPO),
        "load_average_start": list(os.getloadavg()),
    }


def measure_service(args: argparse.Namespace, models: list[str], workloads: dict[str, ceiling.Workload],
                    threads_setting: int, workdir: Path) -> dict[str, Any]:
    """Start the service at one thread setting, warm it up, run every scenario, stop it. The in-process work a
    target compares with is measured again just before and just after its scenario: a shared machine drifts. With
    --repeat N the server is then started N-1 more times, to time its start-up alone."""
    env = {"VAE_TORCH_THREADS": str(threads_setting), "VAE_DEVICE": args.device, "VAE_PRECISION": args.precision,
           "VAE_CUDA_GRAPHS": "true" if args.cuda_graphs == "on" else "false", "VAE_PNG_COMPRESSION": args.png_compression}
    env |= args.extra_env
    uploads = {name: w.upload for name, w in workloads.items()}
    bodies = {s: load.write_body(s, uploads[s.model], workdir) for s in load.scenarios(models)}
    bodies |= {s: load.write_body(s, uploads[s.model], workdir) for s in load.warm_up_scenarios(models)}
    with running_server(args.models_dir.resolve(), env, workdir / f"server-{threads_setting}.log") as server:
        say(f"service VAE_TORCH_THREADS={threads_setting}: ready in {server.ready_s:.2f} s (pid {server.pid})")
        for s in load.warm_up_scenarios(models):
            body, content_type = bodies[s]
            load.run_wrk(f"{server.url}/{s.endpoint}", body, content_type, s.accept, s.concurrency, 1.0)
        after_warm_up = server.memory_mb()["rss"]
        runs = []
        for s in load.scenarios(models):
            ref = report.TARGET_REFERENCES.get((s.request, s.concurrency)) if s.model == report.TARGET_MODEL else None
            for _ in range(args.repeat if ref else 1):
                time.sleep(0.5)  # let the previous run's last answers drain, before the in-process timing too
                body, content_type = bodies[s]
                run = paired_run(
                    workloads[s.model], ref, threads_setting, args.min_time,
                    functools.partial(load.measure, server, s, body, content_type, args.duration, args.wrk_threads),
                )
                runs.append(run)
                errors = run["non_2xx"] + sum(run["socket_errors"].values())
                say(f"  {s.model:6} {s.request:17} c={s.concurrency:<3} {run['images_per_s']:9.1f} images/s  "
                    f"p50 {run['latency_ms']['p50']:8.1f} ms  p99 {run['latency_ms']['p99']:8.1f} ms  errors {errors}  "
                    f"mean batch {report.num(run['mean_batch'])}  other CPU {run['other_cores']:.2f}")
        memory = server.memory_mb()
        failed = any(r["non_2xx"] or any(r["socket_errors"].values()) for r in runs)
        log_tail = server.log_tail() if failed else None  # the server's own account of the errors
    ready = [server.ready_s]
    for i in range(args.repeat - 1):  # start-up alone, again: judged like the load runs, by the median
        with running_server(args.models_dir.resolve(), env, workdir / f"server-{threads_setting}-start{i}.log") as again:
            ready.append(again.ready_s)
    return {
        "threads_setting": threads_setting,
        "env": env,
        "models": [d.name for d in discover(args.models_dir)],  # the server loads them all, measured or not
        "ready_s": statistics.median(ready),
        "ready_runs_s": ready,  # the first start is the one the load runs used
        "memory_mib": {"after_warm_up": after_warm_up, "after_load": memory["rss"], "peak": memory["peak"]},
        "runs": runs,
        "log_tail": log_tail,
    }


def paired_run(
    workload: ceiling.Workload, ref: tuple[str, int] | None, threads: int, min_time: float,
    measure_load: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """One load run; where `ref` (mode, batch) is given, paired with in-process timings of it just before and just after
    (`paired_ceiling`), so that the ratio judged is of the same minutes."""
    if ref is None:
        return measure_load()
    before = workload.measure(*ref, threads, min_time)
    run = measure_load()
    run["paired_ceiling"] = report.paired(before, workload.measure(*ref, threads, min_time))
    return run


def measure_baselines(args: argparse.Namespace, model: str, workdir: Path, workload: ceiling.Workload) -> list[dict[str, Any]]:
    """The same `sample n=1` scenarios as the service, against each general-purpose baseline (bench/baselines.py),
    each started fresh with torch's default threads and warmed up like the service. A one-connection run is paired
    with in-process batch-1 timings just before and after it, as the service's lone-request target is: whether a
    bare server (the floor) meets that target on the machine, measured in the same minutes."""
    model_dir = (args.models_dir / model).resolve()
    env = dict(args.extra_env)  # OMP_NUM_THREADS and the like apply to them too
    env["VAE_PNG_COMPRESSION"] = args.png_compression  # the same PNGs as the service's (baselines.png_level)
    bodies = {s: load.write_body(s, b"", workdir) for s in load.baseline_scenarios(model)}  # no uploads: /sample
    runs = []
    for name in baselines.BASELINES:
        def command(port: int, name: str = name) -> list[str]:
            return baselines.command(name, model_dir, args.device, port, sys.executable)

        log_path = workdir / f"baseline-{name}.log"
        try:
            with running_server(model_dir, env, log_path, command=command, ready_path=baselines.HEALTH_PATH) as server:
                say(f"baseline {name}: ready in {server.ready_s:.2f} s (pid {server.pid})")
                for s, (body, content_type) in bodies.items():  # warm-up, as the service's
                    load.run_wrk(f"{server.url}/{s.endpoint}", body, content_type, s.accept, s.concurrency, 1.0)
                for s, (body, content_type) in bodies.items():
                    time.sleep(0.5)  # a server that cannot tell a client has gone works off the last run's backlog
                    run = paired_run(
                        workload, ("decode+png", 1) if s.concurrency == 1 else None, 0, args.min_time,
                        functools.partial(_baseline_run, args, name, server, s, body, content_type),
                    )
                    runs.append(run)
                    lone = report.lone_ratio(run)
                    say(f"  {name:8} {s.request:12} c={s.concurrency:<3} {run['images_per_s']:9.1f} images/s  "
                        f"p50 {run['latency_ms']['p50']:8.1f} ms  p99 {run['latency_ms']['p99']:8.1f} ms  "
                        f"errors {run['non_2xx'] + sum(run['socket_errors'].values())}"
                        + (f"  p50 {lone:.2f}x in-process" if lone is not None else ""))
        except (RuntimeError, OSError) as exc:  # LitServe not installed, say: the others still count
            say(f"baseline {name} did not run: {str(exc)[-600:]}")
    return runs


def _baseline_run(
    args: argparse.Namespace, name: str, server: Server, s: load.Scenario, body: Path, content_type: str
) -> dict[str, Any]:
    """One load run against a baseline server, with the server's name, start-up time and memory right after it."""
    run = load.measure(server, s, body, content_type, args.duration, args.wrk_threads)
    return run | {"server": name, "ready_s": server.ready_s, "memory_mib": server.memory_mb()}


def results_name(results: dict[str, Any]) -> str:
    """<timestamp>-<host>, and the GPU's name where the run used one: a GPU host's runs stand apart from its CPU runs
    (both machines this project measures on call themselves `vm`)."""
    machine = results["machine"]
    host = "-".join(filter(None, (machine["host"], machine.get("device_name"))))
    stamp = results["started"].replace("-", "").replace(":", "").replace(" UTC", "Z").replace(" ", "T")
    return f"{stamp}-" + provenance.file_name_part(host)


def write_results(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """bench/results/<timestamp>-<host>[-<gpu>].json and latest.md, each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{results_name(results)}.json", out / "latest.md")
    for path, text in zip(paths, (json.dumps(results, indent=2) + "\n", report.markdown(results)), strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models_dir: Path = args.models_dir
    models = args.models or [d.name for d in discover(models_dir)]
    if not models:
        raise SystemExit(f"no models in {models_dir}")
    try:
        artifacts = {name: read_artifact(models_dir / name) for name in models}
    except ArtifactError as exc:
        raise SystemExit(f"cannot measure {models_dir}: {exc}") from None
    device = pick_device(args.device)
    results: dict[str, Any] = {
        "schema": 1,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine(device),
        "options": {
            "command": " ".join(["python -m bench", shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
            "models_dir": str(models_dir),
            "models": models,
            "threads": args.threads,
            "precision": args.precision,
            "cuda_graphs": args.cuda_graphs,
            "png_compression": args.png_compression,
            "duration_s": args.duration,
            "quick": args.quick,
            "repeat": args.repeat,
            "env": args.env,
            "wrk": load.wrk_version() if args.only != "ceiling" else None,
            "wrk_threads": args.wrk_threads,
        },
        "ceiling": [],
        "service": [],
        "targets": [],
        "baselines": [],
    }
    if "faces" not in models:
        say("no faces model: the targets, which are about faces, are skipped")

    # The models as the service loads them: the same dtype, the same CUDA graphs (on a GPU).
    dtype, max_batch = pick_dtype(args.precision), Settings.model_fields["max_batch_size"].default
    sizes = graphs.batch_sizes(max_batch) if args.cuda_graphs == "on" else ()
    png_level = imaging.png_level(args.png_compression)
    workloads = {name: ceiling.Workload.load(artifact, device, dtype, sizes, png_level)
                 for name, artifact in artifacts.items() if args.only != "baselines"}
    if args.only not in ("service", "baselines"):
        for threads_setting in args.threads:
            for name, workload in workloads.items():
                rows = ceiling.measure_model(workload, BATCHES, threads_setting, args.min_time)
                results["ceiling"] += [asdict(r) for r in rows]
                say(f"ceiling {name} threads={rows[0].threads}: " + ", ".join(
                    f"{r.mode}@{r.batch} {r.images_per_s:.0f}/s" for r in rows if r.batch in (1, 64)))

    with tempfile.TemporaryDirectory(prefix="vae-bench-") as tmp:
        if args.only in (None, "service"):
            for threads_setting in args.threads:
                service = measure_service(args, models, workloads, threads_setting, Path(tmp))
                report.add_ratios(service, results["ceiling"])
                results["service"].append(service)
                results["targets"] += [t.as_dict() for t in report.targets(service, results["ceiling"])]
        if args.only in (None, "baselines"):
            model = report.TARGET_MODEL if report.TARGET_MODEL in models else models[0]
            workload = workloads.get(model) or ceiling.Workload.load(artifacts[model], device, dtype, sizes, png_level)
            results["baselines"] = measure_baselines(args, model, Path(tmp), workload)

    results["machine"]["load_average_end"] = list(os.getloadavg())
    json_path, md_path = write_results(results, args.out)
    print(report.markdown(results))
    for t in results["targets"]:
        print(f"{report.verdict(t)}  [VAE_TORCH_THREADS={t['threads_setting']}] {t['name']}: {t['detail']}")
    say(f"wrote {json_path} and {md_path}")
    return 1 if args.check and any(t["passed"] is False for t in results["targets"]) else 0


if __name__ == "__main__":
    sys.exit(main())
