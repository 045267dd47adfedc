"""
deploy/grafana: the dashboard loads, is laid out, and reads real metrics.

Grafana is not installed here; what can be checked without it is checked:
the JSON and the provisioning file parse, every panel has a title, a
description and the dashboard's data-source variable, panels fit the
24-column grid without overlapping, and every metric an expression names is
one policyd exports (a renamed metric would leave a panel empty).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from helpers import exported_metric_names

GRAFANA = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
DASHBOARD = GRAFANA / "policyd.json"
PROVISIONING = GRAFANA / "provisioning" / "dashboards" / "policyd.yml"


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana reads it."""
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions() -> list[str]:
    """Every PromQL expression of every panel and variable."""
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def test_every_expression_reads_exported_metrics() -> None:
    """Each policyd_* name in an expression is a metric policyd exports."""
    exported = exported_metric_names()
    for expr in expressions():
        used = set(re.findall(r"\b(policyd_[a-z_]+)", expr))
        assert used, expr
        assert used <= exported, (expr, used - exported)


def test_panels() -> None:
    """Every panel: a title, a description, the datasource variable, a target."""
    board = dashboard()
    assert (board["uid"], board["title"]) == ("policyd", "policyd")
    titles = [p["title"] for p in board["panels"]]
    assert len(titles) == len(set(titles))
    for panel in board["panels"]:
        assert panel["description"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    names = {v["name"] for v in board["templating"]["list"]}
    assert names == {"datasource", "instance"}


def test_what_the_issue_asks_for() -> None:
    """Level, requests and actions, refusals by reason, busy processes, latency."""
    joined = "\n".join(expressions())
    for metric in (
        "policyd_host_stress_level",
        "policyd_requests_total",
        "policyd_decisions_total",
        "policyd_busy_processes",
        "policyd_request_duration_seconds_bucket",
    ):
        assert metric in joined
    assert 'outcome=~"defer|reject' in joined  # refusals, by reason


def test_grid() -> None:
    """Panels fit the 24 columns and do not overlap."""
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def test_provisioning() -> None:
    """The provisioning file names a file provider for the dashboard's folder."""
    config = yaml.safe_load(PROVISIONING.read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].endswith("/policyd")
