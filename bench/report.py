"""The targets and the markdown report (bench/results/latest.md), both read from one results dict."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

TARGET_MODEL = "faces"
READY_LIMIT_S = 5.0
RSS_LIMIT_MIB = 1024.0
QUIET_OTHER_CPU = 0.25  # above this many cores busy elsewhere, a verdict says more about the machine
# (request, concurrency) of the faces runs the targets judge -> the in-process (mode, batch) each is compared with.
# The bench measures that work again just before and just after the run: the ceiling table was taken minutes
# earlier, and a shared machine drifts by 20% or more in that time.
TARGET_REFERENCES = {
    ("sample n=1", 64): ("decode+png", 64),
    ("sample n=1", 1): ("decode+png", 1),
    ("sample n=64 json", 1): ("decode+png", 64),
}


@dataclass(frozen=True)
class Target:
    name: str
    threads_setting: int
    measured: float | None  # None: not measured in this run (e.g. no faces model)
    limit: float
    higher_is_better: bool
    detail: str
    other_cpu: float = 0.0  # the most CPU other processes used during the measurements compared

    @property
    def passed(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed, "quiet": self.other_cpu <= QUIET_OTHER_CPU}


def verdict(target: dict[str, Any], bold: bool = False) -> str:
    """PASS, FAIL or SKIP; marked when the machine was busy, because then it is not a verdict on the service."""
    word = {True: "PASS", False: "FAIL", None: "SKIP"}[target["passed"]]
    if bold and target["passed"] is False:
        word = f"**{word}**"
    if target["passed"] is not None and not target["quiet"]:
        word += f" (busy machine: other CPU {target['other_cpu']:.2f})"
    return word


def find_ceiling(
    ceiling: list[dict[str, Any]], model: str, mode: str, batch: int, threads_setting: int
) -> dict[str, Any] | None:
    for row in ceiling:
        if (row["model"], row["mode"], row["batch"], row["threads_setting"]) == (model, mode, batch, threads_setting):
            return row
    return None


def find_runs(service: dict[str, Any], model: str, request: str, concurrency: int) -> list[dict[str, Any]]:
    """Every run of one scenario: target scenarios run --repeat times."""
    return [run for run in service["runs"] if (run["model"], run["request"], run["concurrency"]) == (model, request, concurrency)]


def paired(before: Any, after: Any) -> dict[str, Any]:
    """The in-process reference of one run from its measurements (CeilingRow) just before and just after it."""
    median_s = (before.median_s + after.median_s) / 2
    return {
        "mode": before.mode, "batch": before.batch, "median_s": median_s, "images_per_s": before.batch / median_s,
        "before_median_s": before.median_s, "after_median_s": after.median_s,
        "other_cores": max(before.other_cores, after.other_cores),
    }


def reference(run: dict[str, Any] | None, mode: str, batch: int, fallback: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's paired measurement of (mode, batch) when it has one, else the ceiling table's row."""
    pair = run.get("paired_ceiling") if run else None
    return pair if pair and (pair["mode"], pair["batch"]) == (mode, batch) else fallback


def latency_ratio(run: dict[str, Any], reference: dict[str, Any]) -> float:
    """A run's p50 over an in-process time per batch: what the lone-request target judges."""
    return float(run["latency_ms"]["p50"] / (1000 * reference["median_s"]))


def lone_ratio(run: dict[str, Any]) -> float | None:
    """A one-connection run's p50 over its paired in-process batch-1 time."""
    pair = run.get("paired_ceiling")
    return latency_ratio(run, pair) if pair else None


def add_ratios(service: dict[str, Any], ceiling: list[dict[str, Any]]) -> None:
    """Each run's images/s over the in-process ceiling named in it (same model and thread setting), paired where
    the run has a paired measurement of it."""
    for run in service["runs"]:
        ref = run["ceiling"]
        row = reference(run, ref["mode"], ref["batch"],
                        find_ceiling(ceiling, run["model"], ref["mode"], ref["batch"], service["threads_setting"]))
        ref["images_per_s"] = row["images_per_s"] if row else None
        ref["paired"] = row is not None and row is run.get("paired_ceiling")
        run["ratio"] = run["images_per_s"] / row["images_per_s"] if row else None


def _other(*rows: dict[str, Any] | None) -> float:
    return max((r["other_cores"] for r in rows if r is not None), default=0.0)


def _paired_note(run: dict[str, Any], reference: dict[str, Any]) -> str:
    if reference is not run.get("paired_ceiling"):
        return ""
    before, after = (1000 * reference[f"{k}_median_s"] for k in ("before", "after"))
    return f"; in-process {before:.1f} ms per batch just before the run, {after:.1f} ms just after"


def _judged(service: dict[str, Any], ceiling: list[dict[str, Any]], request: str, concurrency: int,
            ratio: Callable[[dict[str, Any], dict[str, Any]], float]) -> tuple[dict[str, Any], dict[str, Any], float, str] | None:
    """(run, its reference, ratio, note) for one judged faces scenario: the run with the median ratio when it ran
    --repeat times, against its paired in-process timing (else the ceiling table's). None: not measured."""
    mode, batch = TARGET_REFERENCES[(request, concurrency)]
    fallback = find_ceiling(ceiling, TARGET_MODEL, mode, batch, service["threads_setting"])
    scored: list[tuple[float, int, dict[str, Any], dict[str, Any]]] = []
    for run in find_runs(service, TARGET_MODEL, request, concurrency):
        ref = reference(run, mode, batch, fallback)
        if ref is not None:
            scored.append((ratio(run, ref), len(scored), run, ref))
    if not scored:
        return None
    scored.sort(key=lambda item: item[:2])
    value, _, run, ref = scored[(len(scored) - 1) // 2]  # the lower middle one of an even count
    note = _paired_note(run, ref)
    if len(scored) > 1:
        note += f"; the median of {len(scored)} runs: {', '.join(f'{v:.2f}' for v, *_ in scored)}"
    return run, ref, value, note


def _throughput_target(name: str, service: dict[str, Any], ceiling: list[dict[str, Any]], request: str,
                       concurrency: int, limit: float) -> Target:
    t = service["threads_setting"]
    judged = _judged(service, ceiling, request, concurrency, lambda run, ref: run["images_per_s"] / ref["images_per_s"])
    if judged is None:
        return Target(name, t, None, limit, True, "not measured")
    run, ref, ratio, note = judged
    detail = f"{run['images_per_s']:.1f} vs {ref['images_per_s']:.1f} images/s{note}"
    return Target(name, t, ratio, limit, True, detail, _other(run, ref))


def targets(service: dict[str, Any], ceiling: list[dict[str, Any]]) -> list[Target]:
    """The five targets for one service run (one thread setting); each compares like with like on `faces`."""
    t, m = service["threads_setting"], TARGET_MODEL
    latency = Target(f"{m} n=1 c=1 p50 latency <= 1.25x in-process batch-1 decode+PNG", t, None, 1.25, False,
                     "not measured")
    judged = _judged(service, ceiling, "sample n=1", 1, latency_ratio)
    if judged is not None:
        run, ref, ratio, note = judged
        detail = f"{run['latency_ms']['p50']:.1f} vs {1000 * ref['median_s']:.1f} ms{note}"
        latency = replace(latency, measured=ratio, detail=detail, other_cpu=_other(run, ref))
    peak, busiest = service["memory_mib"]["peak"], _other(*service["runs"])
    return [
        _throughput_target(f"{m} n=1 c=64 images/s >= 0.9x ceiling (decode+PNG, batch 64)", service, ceiling,
                           "sample n=1", 64, 0.9),
        latency,
        _throughput_target(f"{m} n=64 c=1 images/s >= 1.0x ceiling (decode+PNG, batch 64)", service, ceiling,
                           "sample n=64 json", 1, 1.0),
        Target(f"ready < {READY_LIMIT_S:g} s ({', '.join(service['models'])})", t, service["ready_s"], READY_LIMIT_S,
               False, "; ".join(filter(None, (f"{service['ready_s']:.2f} s", _ready_starts(service)))), busiest),
        Target(f"RSS < {RSS_LIMIT_MIB:.0f} MiB (peak over the whole run)", t, peak, RSS_LIMIT_MIB, False,
               f"{peak:.0f} MiB"),  # memory does not depend on how busy the machine is
    ]


def _ready_starts(service: dict[str, Any]) -> str:
    """"the median of 3 starts: 1.85, 1.90, 2.10 s", or "" for one start (and for results from before there were more)."""
    runs = service.get("ready_runs_s") or []
    return f"the median of {len(runs)} starts: {', '.join(f'{r:.2f}' for r in runs)} s" if len(runs) > 1 else ""


def num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _errors(run: dict[str, Any]) -> str:
    socket = {k: v for k, v in run["socket_errors"].items() if v}
    parts = ([f"{run['non_2xx']} non-2xx"] if run["non_2xx"] else []) + [f"{v} {k}" for k, v in socket.items()]
    return ", ".join(parts) or "0"


def _table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """`align`: one letter per column, l or r."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in (header, rule, *rows)]


def ceiling_table(ceiling: list[dict[str, Any]]) -> list[str]:
    groups: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    for row in ceiling:
        groups.setdefault((row["model"], row["threads_setting"], row["batch"]), {})[row["mode"]] = row
    rows = []
    for (model, setting, batch), modes in sorted(groups.items()):
        threads = next(iter(modes.values()))["threads"]
        png, single = modes.get("decode+png"), groups.get((model, setting, 1), {}).get("decode")
        lift = f"{modes['decode']['images_per_s'] / single['images_per_s']:.1f}x" if single and "decode" in modes else "-"
        rows.append([
            model, f"{threads}" if setting else f"default ({threads})", str(batch),
            *(num(modes[mode]["images_per_s"]) if mode in modes else "-" for mode in ("decode", "decode+png")), lift,
            num(1000 * png["median_s"], 2) if png else "-",
            num(modes["upload+encode"]["images_per_s"]) if "upload+encode" in modes else "-",
            num(max(r["other_cores"] for r in modes.values()), 2),
        ])
    header = ["model", "torch threads", "batch", "decode", "decode+PNG", "decode vs batch 1",
              "ms per batch (decode+PNG)", "upload+encode", "other CPU"]
    return _table(header, "llrrrrrrr", rows)


def service_table(service: dict[str, Any]) -> list[str]:
    rows = []
    for run in service["runs"]:
        ref = run["ceiling"]
        label = "decode+PNG" if ref["mode"] == "decode+png" else ref["mode"]
        latency = run["latency_ms"]
        rows.append([
            run["model"], run["request"], str(run["concurrency"]), num(run["requests_per_s"]), num(run["images_per_s"]),
            num(latency["p50"]), num(latency["p99"]), _errors(run),
            f"{run['ratio']:.2f}x {label}@{ref['batch']}{' paired' if ref.get('paired') else ''}"
            if run.get("ratio") is not None else "-",
            num(run["mean_batch"]), num(run["server_cpu_cores"], 2), num(run["loop_cpu_cores"], 2),
            num(run["other_cores"], 2),
        ])
    header = ["model", "request", "conc.", "req/s", "images/s", "p50 ms", "p99 ms", "errors", "vs ceiling",
              "mean batch", "server CPU", "loop CPU", "other CPU"]
    return _table(header, "llrrrrrllrrrr", rows)


def _default_threads_service(results: dict[str, Any]) -> dict[str, Any] | None:
    """The service run at its default threads: what the baselines, which set none, are compared with. On a CPU that
    is torch's default, as theirs; on a GPU the service's one thread against their torch default."""
    default = results["machine"]["torch_default_threads"]
    return next((s for s in results["service"] if s["threads_setting"] in (0, default)), None)


def baselines_table(results: dict[str, Any]) -> list[str]:
    service = _default_threads_service(results)
    rows = []
    for run in results.get("baselines", []):
        ours = find_runs(service, run["model"], run["request"], run["concurrency"]) if service else []
        ours_ips = statistics.median(r["images_per_s"] for r in ours) if ours else None
        ours_p50 = statistics.median(r["latency_ms"]["p50"] for r in ours) if ours else None
        lone = lone_ratio(run)
        rows.append([
            run["server"], run["model"], run["request"], str(run["concurrency"]), num(run["images_per_s"]),
            num(run["latency_ms"]["p50"]), f"{lone:.2f}x" if lone is not None else "-",
            num(run["latency_ms"]["p99"]), _errors(run), num(ours_ips), num(ours_p50),
            f"{ours_ips / run['images_per_s']:.1f}x" if ours_ips and run["images_per_s"] else "-",
            num(run["server_cpu_cores"], 2), num(run["ready_s"], 2), num(run["memory_mib"]["rss"], 0),
        ])
    header = ["server", "model", "request", "conc.", "images/s", "p50 ms", "p50 vs in-process", "p99 ms", "errors",
              "vae-serve images/s", "vae-serve p50 ms", "vae-serve vs it", "server CPU", "ready s", "RSS MiB"]
    return _table(header, "lllrrrrrlrrrrrr", rows)


def target_table(items: list[dict[str, Any]]) -> list[str]:
    rows = []
    for t in items:
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f} ({t['detail']})"
        limit = f"{'>=' if t['higher_is_better'] else '<='} {t['limit']:g}"
        rows.append([t["name"], str(t["threads_setting"] or "default"), measured, limit, verdict(t, bold=True)])
    return _table(["target", "VAE_TORCH_THREADS", "measured", "limit", "result"], "lllll", rows)


def _busiest_other(results: dict[str, Any]) -> float:
    return _other(*results["ceiling"], *(run for s in results["service"] for run in s["runs"]))


def markdown(results: dict[str, Any]) -> str:
    m, o = results["machine"], results["options"]
    device = f"`{m['device']}`" + (f" ({m['device_name']})" if m.get("device_name") else "")
    busiest = _busiest_other(results)
    lines = [
        f"# vae-serve benchmark, {results['started']}, {m['host']}",
        "",
        f"- Machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs ({m['cpus']} in all), "
        f"{m['memory_gib']:.0f} GiB; device {device}.",
        f"- Software: torch {m['torch']} (default {m['torch_default_threads']} intra-op threads), Python {m['python']}"
        + (f", {o['wrk']} ({o['wrk_threads']} thread)" if o["wrk"] else "") + f"; commit {m['commit'] or 'unknown'}.",
        f"- Command: `{o['command']}`: {o['duration_s']:g} s per load run, models from `{o['models_dir']}`"
        + (f", service settings {' '.join(o['env'])}" if o["env"] else "") + ".",
        f"- Models in {o.get('precision', 'auto')} precision"
        + (", with CUDA graphs" if o.get("cuda_graphs", "on") == "on" and m["device"].startswith("cuda") else "")
        + ("; PNGs stored, not deflated (VAE_PNG_COMPRESSION=none)" if o.get("png_compression") == "none" else "") + ".",
        f"- Load average at the start {m['load_average_start'][0]:.2f}; other processes (and the hypervisor, taking the "
        f"VM's CPUs: steal) used up to {busiest:.2f} CPUs during a measurement (`other CPU`)"
        + (": **the machine was not quiet; rerun before comparing or judging a target**." if busiest > QUIET_OTHER_CPU
           else "."),
    ]
    if results["ceiling"]:
        lines += ["", "## Ceiling: in-process images/s (one Python thread, no HTTP)", "", *ceiling_table(results["ceiling"])]
    for service in results["service"]:
        mem = service["memory_mib"]
        default = " (the service's default: torch's on a CPU, 1 on a GPU)" if not service["threads_setting"] else ""
        starts = f" ({detail})" if (detail := _ready_starts(service)) else ""
        lines += [
            "",
            f"## Service, VAE_TORCH_THREADS={service['threads_setting']}{default}",
            "",
            f"Ready {service['ready_s']:.2f} s after the process started{starts}. RSS {mem['after_warm_up']:.0f} MiB "
            f"after warm-up, {mem['after_load']:.0f} MiB after the load, peak {mem['peak']:.0f} MiB.",
            "",
            *service_table(service),
        ]
    if results["targets"]:
        lines += ["", "## Targets", "", *target_table(results["targets"])]
    if results.get("baselines"):
        lines += [
            "", "## General-purpose servers, same model, same PNGs (bench/baselines.py)", "",
            "Each started fresh with torch's default threads; `vae-serve` columns: the service at its default, the "
            "same threads on a CPU, one on a GPU (the median where a scenario ran more than once). `p50 vs in-process`: "
            "a one-connection run's p50 over the in-process batch-1 decode+PNG time (torch's default threads) measured "
            "just before and just after it, as the lone-request target judges vae-serve.", "",
            *baselines_table(results),
        ]
    return "\n".join(lines) + "\n"
