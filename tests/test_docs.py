"""The docs and deploy files say only what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from twisted.internet.testing import MemoryReactorClock

from policyd import config
from policyd.cli import config_reference
from policyd.protocol import DECISION_FAILURE_REASONS, PROTOCOL_ERROR_REASONS
from policyd.server import PolicyServer

ROOT = Path(__file__).resolve().parent.parent
PROSE = sorted(
    [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "deploy").rglob("*")]
)


def _texts() -> dict[Path, str]:
    return {path: path.read_text() for path in PROSE if path.is_file()}


class TestConfigurationReference:
    """docs/configuration.md is generated from the configuration class."""

    def test_up_to_date(self) -> None:
        """The checked-in reference equals `policyd config --markdown`."""
        assert (ROOT / "docs" / "configuration.md").read_text() == config_reference()

    def test_every_variable_documented(self) -> None:
        """Every variable policyd reads has a section in the reference."""
        reference = config_reference()
        for name in config.variables():
            assert f"## `{name}`" in reference


class TestNoDrift:
    """Names used in prose and deploy files exist in the code."""

    def test_variables_exist(self) -> None:
        """Every POLICYD_* name in the docs or deploy files is a real variable."""
        known = set(config.variables())
        for path, text in _texts().items():
            for name in re.findall(r"\bPOLICYD_[A-Z_]+[A-Z]\b", text):
                assert name in known, f"{path.name} mentions unknown {name}"

    def test_metrics_exist(self) -> None:
        """Every policyd_* metric named in the docs is exported by the server."""
        registry = CollectorRegistry()
        PolicyServer(config.load({}), MemoryReactorClock(), registry)
        families = {family.name for family in registry.collect()}
        suffixes = ("", "_total", "_info", "_bucket", "_count", "_sum")
        exported = {family + suffix for family in families for suffix in suffixes}
        for path, text in _texts().items():
            for name in re.findall(r"\bpolicyd_[a-z_]+[a-z]\b", text):
                assert name in exported, f"{path.name} mentions unknown metric {name}"

    def test_reasons_documented(self) -> None:
        """Every protocol-error and decision-failure reason is in operations.md."""
        operations = (ROOT / "docs" / "operations.md").read_text()
        for reason in (*PROTOCOL_ERROR_REASONS, *DECISION_FAILURE_REASONS):
            assert f"`{reason}`" in operations

    def test_readme_has_the_two_commands(self) -> None:
        """The README's run and test commands are the ones CI and users rely on."""
        readme = (ROOT / "README.md").read_text()
        ci = (ROOT / ".ci" / "run").read_text()
        assert "tests/run" in readme
        assert "./tests/run" in ci
        assert ".venv/bin/policyd serve" in readme
