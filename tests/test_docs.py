"""The docs and deploy files say only what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from twisted.internet.testing import MemoryReactorClock

from policyd import config
from policyd.cli import config_reference
from policyd.load import LoadSettings
from policyd.protocol import DECISION_FAILURE_REASONS, PROTOCOL_ERROR_REASONS
from policyd.resp import parse_url
from policyd.server import PolicyServer
from policyd.shared import RedisLoadTracker, RedisSettings

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

    def test_links_resolve(self) -> None:
        """Every relative link in the README and docs/ names a file (and heading)."""
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
            for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
                if re.match(r"[a-z]+:", target):
                    continue
                name, _, anchor = target.partition("#")
                linked = path.parent / name if name else path
                assert linked.is_file(), f"{path.name} links to missing {target}"
                if anchor:
                    assert anchor in _anchors(linked), f"{path.name}: no {target}"


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of *path* (fenced code left out)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    headings = re.findall(r"^#+ (.*)$", text, flags=re.M)
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings
    }


class TestClusterDoc:
    """docs/cluster.md covers the settings and failures of several MX hosts."""

    cluster = (ROOT / "docs" / "cluster.md").read_text()

    def test_variables_exist(self) -> None:
        """Every POLICYD_* name in docs/cluster.md is a variable policyd reads."""
        named = set(re.findall(r"\bPOLICYD_[A-Z0-9_]*[A-Z0-9]\b", self.cluster))
        assert named
        assert named <= set(config.variables())

    def test_sharing_variables_documented(self) -> None:
        """Every backend, Redis and host variable is in docs/cluster.md."""
        wanted = [
            name
            for name in config.variables()
            if name.startswith(("POLICYD_REDIS_", "POLICYD_HOST_"))
            or name in ("POLICYD_BACKEND", "POLICYD_ALLOW_PEERS")
        ]
        assert len(wanted) >= 8
        for name in wanted:
            assert re.search(rf"\b{name}\b", self.cluster), name

    def test_backend_errors_documented(self) -> None:
        """Each reason of policyd_backend_errors_total is in cluster and operations."""
        tracker = RedisLoadTracker(
            MemoryReactorClock(),
            LoadSettings(),
            RedisSettings(url=parse_url("redis://192.0.2.30")),
        )
        operations = (ROOT / "docs" / "operations.md").read_text()
        for reason, _ in tracker.backend().errors:
            assert f"`{reason}`" in self.cluster
            assert f"`{reason}`" in operations

    def test_backend_events_documented(self) -> None:
        """Every event the Redis backend logs is in operations.md's log table."""
        source = (ROOT / "policyd" / "shared.py").read_text()
        events = set(re.findall(r'event="(backend_[a-z_]+)"', source))
        assert "backend_down" in events
        operations = (ROOT / "docs" / "operations.md").read_text()
        for event in events:
            assert f"| `{event}` |" in operations, event
