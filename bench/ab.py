"""python -m bench.ab A B: two versions of the service up at once, taking turns under the same wrk load.

A shared machine's speed drifts by a tenth or more within minutes (bench/README.md, *Reading the numbers*), more
than most changes are worth, so two full runs minutes apart cannot tell two versions apart. Here both servers are up
at once and serve the same load in alternate runs, each round in the other order, and halfway through both are
started again in the other order: the server started second measured 2-3% faster at 64 connections for its place
alone (bench/README.md, *Why the targets stay open*). It prints each round and the medians (images/s, p50, p99,
the event loop's CPU per request) with the rounds B won, and writes them to bench/results/ab/.

A and B are each a git revision (checked out into a temporary worktree) or a directory holding a source tree (`.`:
the working tree, uncommitted changes and all). Both serve the same model repository (--models-dir).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import load, provenance
from bench.server import Server, env_item, running_server

REPO = Path(__file__).resolve().parents[1]
SIDES = ("a", "b")


def header_item(text: str) -> str:
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or name != name.strip() or any(c in text for c in "\r\n"):
        raise argparse.ArgumentTypeError(f"takes 'NAME: VALUE', not {text!r}")
    return f"{name}: {value.strip()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="the version measured against: a git revision, or a directory holding a source tree")
    p.add_argument("b", help="the version measured: a git revision, or a directory (`.`: the working tree)")
    p.add_argument("--model", default="faces", help="the model asked for (default faces)")
    p.add_argument("--endpoint", default="sample", choices=("sample", "encode"),
                   help="POST /sample, or POST /encode of images the model drew (default sample)")
    p.add_argument("--n", type=int, default=1, help="images per request: /sample's n, or /encode's uploads (default 1)")
    p.add_argument("--json", action="store_true", help="ask for JSON (Accept: application/json) instead of a PNG")
    p.add_argument("--header", action="append", default=[], type=header_item, metavar="'NAME: VALUE'",
                   help="a request header wrk sends on every request (repeatable), e.g. 'Origin: https://app.example.com'")
    p.add_argument("--concurrency", type=int, default=64, help="wrk's connections (default 64)")
    p.add_argument("--rounds", type=int, default=8, help="rounds, each server once in each; even (default 8)")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of load per server per round (default 4)")
    p.add_argument("--models-dir", type=Path, default=REPO / "models", help="model repository (default: models/)")
    p.add_argument("--env", action="append", default=[], type=env_item, metavar="KEY=VALUE",
                   help="a variable for both servers, repeatable")
    p.add_argument("--env-a", action="append", default=[], type=env_item, metavar="KEY=VALUE",
                   help="a variable for A only, repeatable (A and B may then be the same revision)")
    p.add_argument("--env-b", action="append", default=[], type=env_item, metavar="KEY=VALUE",
                   help="a variable for B only, repeatable")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ab", help="where the JSON goes")
    args = p.parse_args(argv)
    if args.rounds < 2 or args.rounds % 2:
        p.error("--rounds must be even and at least 2: half the rounds with each server started first")
    return args


@contextmanager
def source_tree(ref: str) -> Iterator[tuple[Path, str | None]]:
    """(a directory holding the service's source for `ref`, its commit): the directory itself where `ref` is one,
    else the revision checked out into a temporary git worktree, removed afterwards."""
    directory = Path(ref)
    if directory.is_dir():
        yield directory.resolve(), provenance.git_commit(directory)
        return
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "--verify", f"{ref}^{{commit}}"],
                           capture_output=True, text=True, check=False)
    commit = found.stdout.strip()
    if found.returncode or not commit:
        raise SystemExit(f"{ref!r} is neither a directory nor a git revision of {REPO}")
    with tempfile.TemporaryDirectory(prefix=f"vae-serve-ab-{commit}-") as parent:
        tree = Path(parent) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), commit], check=True)
        try:
            yield tree, commit
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def check_imports_from(tree: Path) -> None:
    """The service a server started in `tree` with it first on PYTHONPATH imports is the tree's, not the installed
    one (an editable install's finder comes after PYTHONPATH): else A and B would run the same code."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", "import service; print(service.__file__)"], cwd=tree, env=env,
                         capture_output=True, text=True, check=False)
    found = Path(out.stdout.strip()).resolve() if out.returncode == 0 else None
    if found is None or tree.resolve() not in found.parents:
        raise SystemExit(f"{tree} does not hold the service the server would import ({found or out.stderr.strip()})")


def schedule(rounds: int) -> list[tuple[tuple[str, str], list[tuple[str, str]]]]:
    """(the order the two servers are started in, the order they are loaded in each round): half the rounds with A
    started first, half with B; within each half the loading order alternates."""
    orders = [SIDES if r % 2 == 0 else SIDES[::-1] for r in range(rounds // 2)]
    return [(SIDES, orders), (SIDES[::-1], orders)]


def loop_us_per_request(run: dict[str, Any]) -> float | None:
    """The event loop's CPU per request over a run, from `load.measure`'s figures."""
    return run["loop_cpu_cores"] * run["duration_s"] / run["requests"] * 1e6 if run["requests"] else None


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per side, B's images/s over A's, and the rounds B served more images in (also by start order)."""

    def median(side: str, key: str) -> float | None:
        values = [v for r in rounds if (v := r[side][key]) is not None]
        return statistics.median(values) if values else None

    out: dict[str, Any] = {
        side: {key: median(side, key) for key in ("images_per_s", "p50_ms", "p99_ms", "loop_us_per_request")}
        for side in SIDES
    }
    a, b = out["a"]["images_per_s"], out["b"]["images_per_s"]
    out["b_over_a"] = b / a if a and b else None
    b_won = [r for r in rounds if r["b"]["images_per_s"] > r["a"]["images_per_s"]]
    out["b_faster_rounds"] = len(b_won)
    out["rounds"] = len(rounds)
    for first in SIDES:
        out[f"b_faster_rounds_{first}_started_first"] = sum(r["started"][0] == first for r in b_won)
    out["errors"] = sum(r[side]["errors"] for r in rounds for side in SIDES)
    return out


def brief(run: dict[str, Any]) -> dict[str, Any]:
    latency = run["latency_ms"]
    return {
        "images_per_s": run["images_per_s"], "requests_per_s": run["requests_per_s"], "p50_ms": latency["p50"],
        "p99_ms": latency["p99"], "loop_us_per_request": loop_us_per_request(run),
        "errors": run["non_2xx"] + sum(run["socket_errors"].values()),
    }


def drawn_image(server: Server, model: str) -> bytes:
    """A PNG the model drew (seed 0), the upload an /encode run sends: a realistic image of the model's size."""
    r = httpx.post(f"{server.url}/sample", json={"model": model, "n": 1, "seed": 0}, timeout=30)
    r.raise_for_status()
    return r.content


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load.wrk_version()  # exits with how to install wrk where it is missing
    scenario = load.Scenario(args.model, args.endpoint, args.n, args.concurrency,
                             "application/json" if args.json else "image/png", tuple(args.header))
    envs = {side: dict([*args.env, *getattr(args, f"env_{side}")]) for side in SIDES}
    refs = {"a": args.a, "b": args.b}
    rounds: list[dict[str, Any]] = []
    with ExitStack() as trees, tempfile.TemporaryDirectory(prefix="vae-serve-ab-") as workdir:
        sources = {side: trees.enter_context(source_tree(refs[side])) for side in SIDES}
        for tree, _ in sources.values():
            check_imports_from(tree)
        for side in SIDES:
            print(f"{side.upper()}: {refs[side]} ({sources[side][1] or 'no commit'}) {envs[side] or ''}", file=sys.stderr)
        body: tuple[Path, str] | None = None
        for started, orders in schedule(args.rounds):
            with ExitStack() as servers:
                up = {}
                for side in started:  # one after the other: the second starts on a machine the first has settled on
                    tree = sources[side][0]
                    up[side] = servers.enter_context(running_server(
                        args.models_dir.resolve(), {"PYTHONPATH": str(tree), **envs[side]},
                        Path(workdir) / f"server-{side}-{started[0]}.log", cwd=tree,
                    ))
                if body is None:
                    upload = drawn_image(up["a"], args.model) if args.endpoint == "encode" else b""
                    body = load.write_body(scenario, upload, Path(workdir))
                for side in SIDES:  # TorchScript's first runs and the allocator's growth, before anything counts
                    load.run_wrk(f"{up[side].url}/{args.endpoint}", *body, scenario.accept, args.concurrency, 1.0,
                                 headers=scenario.headers)
                for order in orders:
                    result: dict[str, Any] = {"started": list(started), "order": list(order)}
                    for side in order:
                        result[side] = brief(load.measure(up[side], scenario, *body, args.seconds, 1))
                    rounds.append(result)
                    print(f"round {len(rounds):2}  started {''.join(started).upper()}  "
                          + "  ".join(f"{s.upper()} {result[s]['images_per_s']:8.1f} images/s p50 {result[s]['p50_ms']:6.2f} ms"
                                      for s in SIDES), file=sys.stderr)
    summary = summarize(rounds)
    results = {
        "schema": 1, "started": datetime.now(UTC).isoformat(), "command": " ".join(["python -m bench.ab", *(argv or sys.argv[1:])]),
        "sides": {side: {"ref": refs[side], "commit": sources[side][1], "env": envs[side]} for side in SIDES},
        "scenario": {"model": scenario.model, "endpoint": f"/{scenario.endpoint}", "request": scenario.request,
                     "concurrency": scenario.concurrency, "headers": list(scenario.headers), "seconds": args.seconds},
        "rounds": rounds, "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{provenance.file_name_part(socket.gethostname())}-ab.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(report_text(results), end="")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def report_text(results: dict[str, Any]) -> str:
    s, scenario = results["summary"], results["scenario"]
    headers = "".join(f", {header}" for header in scenario.get("headers", ()))
    lines = [f"{scenario['model']} {scenario['request']} at {scenario['concurrency']} connections{headers}, "
             f"{s['rounds']} rounds of {scenario['seconds']:g} s each way (medians):"]
    for side in SIDES:
        m, about = s[side], results["sides"][side]
        loop = m["loop_us_per_request"]
        lines.append(f"  {side.upper()} {about['ref']} ({about['commit'] or '-'}): {m['images_per_s']:,.1f} images/s, "
                     f"p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms, event loop "
                     + (f"{loop:.0f} us a request" if loop is not None else "-"))
    ratio = f"{s['b_over_a']:.3f}x" if s["b_over_a"] is not None else "-"
    lines.append(f"  B/A {ratio}; B faster in {s['b_faster_rounds']} of {s['rounds']} rounds "
                 f"({s['b_faster_rounds_a_started_first']} with A started first, "
                 f"{s['b_faster_rounds_b_started_first']} with B started first); errors {s['errors']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
