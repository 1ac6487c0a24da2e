"""deploy/prometheus: a valid configuration, alert rules that promtool accepts and that fire when they should."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy.tools import DEPLOY, PROMETHEUS_SERIES, defined_metric_names, metric_names, run, tool

PROMETHEUS = DEPLOY / "prometheus"


def test_promtool_accepts_the_configuration_and_its_rule_files() -> None:
    out = run(tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert "SUCCESS" in out


def test_promtool_accepts_the_alert_rules() -> None:
    assert "SUCCESS" in run(tool("promtool"), "check", "rules", str(PROMETHEUS / "alerts.yml"))


def test_the_alerts_fire_on_their_unit_test_series() -> None:
    """deploy/prometheus/alerts_test.yml: each alert, its labels and its rendered annotations."""
    assert "SUCCESS" in run(tool("promtool"), "test", "rules", str(PROMETHEUS / "alerts_test.yml"), cwd=PROMETHEUS)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r.get("alert") or r.get("record"))
def test_each_alert_uses_metrics_the_service_defines(rule: dict[str, Any]) -> None:
    unknown = metric_names(rule["expr"]) - defined_metric_names() - PROMETHEUS_SERIES
    assert not unknown, f"{rule.get('alert')} uses {sorted(unknown)}, which service/metrics.py does not define"


def test_every_alert_names_a_severity_and_explains_itself() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_tested_alerts_are_all_the_alerts() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    assert tested == {rule["alert"] for rule in rules()}


def test_prometheus_scrapes_the_service_by_its_compose_name() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["vae-serve"]["static_configs"][0]["targets"] == ["vae-serve:8000"]
    assert jobs["vae-serve"].get("metrics_path", "/metrics") == "/metrics"
    assert config["rule_files"] == ["alerts.yml"]
