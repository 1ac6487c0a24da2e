"""python -m bench.ab: two versions of the service compared in alternate rounds, each started first in half of them."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.ab import REPO, check_imports_from, parse_args, report_text, schedule, source_tree, summarize


def test_each_server_is_started_first_in_half_the_rounds_and_loaded_first_in_half_of_those() -> None:
    assert schedule(4) == [
        (("a", "b"), [("a", "b"), ("b", "a")]),
        (("b", "a"), [("a", "b"), ("b", "a")]),
    ]


@pytest.mark.parametrize("rounds", ["3", "0"])
def test_an_odd_or_empty_number_of_rounds_is_refused(rounds: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(["HEAD", ".", "--rounds", rounds])


def test_a_header_is_taken_as_name_colon_value_and_anything_else_is_refused() -> None:
    assert parse_args(["HEAD", ".", "--header", "Origin:https://a.example"]).header == ["Origin: https://a.example"]
    for wrong in ("Origin", ": x", " Origin: x", "Origin: x\r\nHost: y"):
        with pytest.raises(SystemExit):
            parse_args(["HEAD", ".", "--header", wrong])


def side(images_per_s: float, p50: float = 1.0, errors: int = 0) -> dict[str, Any]:
    return {"images_per_s": images_per_s, "requests_per_s": images_per_s, "p50_ms": p50, "p99_ms": 2 * p50,
            "loop_us_per_request": 100.0, "errors": errors}


def test_the_summary_gives_medians_the_ratio_and_the_rounds_b_won_by_start_order() -> None:
    rounds = [
        {"started": ["a", "b"], "a": side(100), "b": side(90)},
        {"started": ["a", "b"], "a": side(100), "b": side(110, errors=1)},
        {"started": ["b", "a"], "a": side(100), "b": side(120)},
        {"started": ["b", "a"], "a": side(80, p50=3.0), "b": side(130)},
    ]
    summary = summarize(rounds)
    assert summary["a"]["images_per_s"] == 100 and summary["b"]["images_per_s"] == 115
    assert summary["a"]["p50_ms"] == 1.0
    assert summary["b_over_a"] == pytest.approx(1.15)
    assert summary["b_faster_rounds"] == 3
    assert (summary["b_faster_rounds_a_started_first"], summary["b_faster_rounds_b_started_first"]) == (1, 2)
    assert summary["errors"] == 1
    text = report_text({
        "summary": summary, "scenario": {"model": "faces", "request": "sample n=1", "concurrency": 64, "seconds": 4},
        "sides": {"a": {"ref": "HEAD~1", "commit": "abc1234"}, "b": {"ref": ".", "commit": None}},
    })
    assert "B/A 1.150x; B faster in 3 of 4 rounds (1 with A started first, 2 with B started first)" in text


def test_a_directory_is_measured_as_it_is(tmp_path: Path) -> None:
    with source_tree(str(tmp_path)) as (tree, _):
        assert tree == tmp_path.resolve()


def test_a_directory_without_the_service_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not hold the service"):
        check_imports_from(tmp_path)


def test_a_revision_is_checked_out_into_a_worktree_whose_service_is_the_one_imported_and_removed_after() -> None:
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, check=False).returncode:
        pytest.skip("not a git checkout")
    with source_tree("HEAD") as (tree, commit):
        assert (tree / "service" / "app.py").is_file() and commit
        check_imports_from(tree)
    assert not tree.exists()
    worktrees = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    assert str(tree) not in worktrees
