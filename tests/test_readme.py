"""The README is the first thing a newcomer runs: its commands and tables must stay true."""

from __future__ import annotations

import re

from service.settings import Settings
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_the_first_two_commands_are_serve_and_test_and_ci_runs_the_test_one() -> None:
    commands = re.findall(r"^(make \w+)", README, flags=re.MULTILINE)
    assert commands[:2] == ["make serve", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`VAE_{name.upper()}`" in README, name


def test_every_metric_is_documented() -> None:
    from service.metrics import Metrics

    families = [m for m in Metrics().collect() if m.name.startswith("vae_")]
    suffix = {"counter": "_total", "info": "_info"}
    for family in families:
        exposed = family.name + suffix.get(family.type, "")
        assert f"`{exposed}`" in README, exposed
