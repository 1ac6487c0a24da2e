"""deploy/grafana: the provisioned data source and a dashboard whose every query reads the service's metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import DEPLOY, PROMETHEUS_SERIES, defined_metric_names, metric_names, run, tool

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "vae-serve.json"


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def test_the_dashboard_is_json_with_panels_and_a_stable_uid() -> None:
    board = dashboard()
    assert board["uid"] == "vae-serve" and board["title"] == "vae-serve"
    assert len(panels()) >= 8
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


@pytest.mark.parametrize("expr", expressions())
def test_every_query_reads_metrics_the_service_defines(expr: str) -> None:
    names = metric_names(expr)
    assert names, f"no metric found in {expr!r}"
    unknown = names - defined_metric_names() - PROMETHEUS_SERIES
    assert not unknown, f"{sorted(unknown)} are not defined in service/metrics.py: {expr}"


def test_the_template_variables_read_defined_metrics() -> None:
    for variable in dashboard()["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match, f"unexpected variable query {query!r}"
        assert match.group(1) in defined_metric_names(), query


def test_the_dashboard_shows_what_an_operator_asks_first() -> None:
    """Traffic, p50/p95/p99 latency, batch sizes, queue depth, errors by reason and status, queue vs compute."""
    text = "\n".join(expressions())
    for needle in (
        "rate(vae_requests_total",
        "histogram_quantile(0.5, sum by (le) (rate(vae_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(vae_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(vae_request_duration_seconds_bucket",
        "vae_batch_size_images_bucket",
        "vae_queue_depth_images",
        "sum by (reason) (rate(vae_failures_total",
        "sum by (status) (rate(vae_requests_total",
        "vae_queue_wait_seconds_bucket",
        "vae_compute_seconds_bucket",
    ):
        assert needle in text, needle


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule: promtool checks the PromQL."""
    promtool = tool("promtool")
    variables = r"\$(instance|model|endpoint)\b"
    filled = [re.sub(variables, ".*", e.replace("$__rate_interval", "1m")) for e in expressions()]
    assert "$" not in "".join(filled), "a Grafana variable this test does not fill in"
    records = [{"record": f"dashboard:q{i}", "expr": expr} for i, expr in enumerate(filled)]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    assert "SUCCESS" in run(promtool, "check", "rules", str(path))


def test_the_data_source_is_the_one_the_dashboard_names() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    used = {json.dumps(p["datasource"], sort_keys=True) for p in panels()}
    used |= {json.dumps(t["datasource"], sort_keys=True) for p in panels() for t in p["targets"]}
    assert used == {json.dumps({"type": "prometheus", "uid": source["uid"]}, sort_keys=True)}


def test_the_dashboard_provider_loads_the_mounted_folder() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "vae-serve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
