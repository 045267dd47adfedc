"""
deploy/prometheus: the alert rules load, fire when due, read real metrics.

Every metric a rule reads is one policyd exports.

``promtool`` (Debian's prometheus package; tests/run installs it) checks the
rules and runs their unit tests (deploy/prometheus/policyd-alerts.test.yml).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from helpers import exported_metric_names, required_program

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = RULES_DIR / "policyd-alerts.yml"
RULE_TESTS = RULES_DIR / "policyd-alerts.test.yml"


def promtool() -> str:
    """The promtool program (Debian's prometheus)."""
    return required_program("promtool", "prometheus")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Promtool with *args*, in the rules' directory."""
    return subprocess.run(
        [promtool(), *args],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_rules_valid() -> None:
    """Promtool check rules accepts every rule."""
    result = run("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_unit_tests() -> None:
    """Promtool test rules: each alert fires (and stays quiet) as its tests say."""
    result = run("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_tested() -> None:
    """Every alert of the rules file has a unit test that expects it to fire."""
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert alerts == fired


def test_rules_name_exported_metrics() -> None:
    """Every policyd_* metric a rule reads is one policyd exports."""
    exported = exported_metric_names()
    used = set(re.findall(r"\b(policyd_[a-z_]+)", RULES.read_text()))
    assert used
    assert used <= exported, used - exported
