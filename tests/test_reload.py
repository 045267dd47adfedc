"""
Allow-lists in files, read at start-up and again on SIGHUP (a reload).

A reload changes who is never refused without a restart: connections, the
load and what is known of clients stay.  A file that cannot be read or has a
bad line keeps the lists in use and says why in the log.
"""

from __future__ import annotations

import ipaddress
import signal
from pathlib import Path

import pytest
from helpers import capture_logs, events_named
from prometheus_client import CollectorRegistry
from twisted.internet.testing import MemoryReactorClock

from policyd import config
from policyd.decision import PolicyDecider
from policyd.lists import ListFileError, read_domains, read_networks
from policyd.server import PolicyServer
from policyd.testing.daemon import PolicydProcess


class TestListFiles:
    """One entry a line, comments and blank lines allowed; bad lines named."""

    def test_networks(self, tmp_path: Path) -> None:
        """CIDR networks and addresses, with comments, in order."""
        path = tmp_path / "networks"
        path.write_text(
            "# partners\n198.51.100.0/24   # relay\n\n2001:db8::/32\n192.0.2.7\n"
        )
        assert read_networks(str(path)) == (
            ipaddress.ip_network("198.51.100.0/24"),
            ipaddress.ip_network("2001:db8::/32"),
            ipaddress.ip_network("192.0.2.7/32"),
        )

    def test_domains(self, tmp_path: Path) -> None:
        """Domains, lower-cased; several on a line are fine too."""
        path = tmp_path / "domains"
        path.write_text("Partner.Example\nbank.example, mail.example.org # ok\n")
        assert read_domains(str(path)) == (
            "partner.example",
            "bank.example",
            "mail.example.org",
        )

    def test_bad_line_named(self, tmp_path: Path) -> None:
        """A line that is not a network names the file and the line number."""
        path = tmp_path / "networks"
        path.write_text("198.51.100.0/24\nnot-a-network\n")
        with pytest.raises(ListFileError, match=r"networks, line 2: "):
            read_networks(str(path))

    def test_start_up_error(self, tmp_path: Path) -> None:
        """At start-up a bad file is a configuration error naming the variable."""
        path = tmp_path / "domains"
        path.write_text("bad domain!\n")
        with pytest.raises(config.ConfigError) as caught:
            config.load({"POLICYD_ALLOW_DOMAINS_FILE": str(path)})
        assert caught.value.variable == "POLICYD_ALLOW_DOMAINS_FILE"
        assert "line 1" in caught.value.problem


def server_with(tmp_path: Path, networks: str) -> tuple[PolicyServer, Path]:
    """A PolicyServer whose networks file holds *networks*."""
    path = tmp_path / "networks"
    path.write_text(networks)
    env = {
        "POLICYD_ALLOW_NETWORKS": "192.0.2.0/24",
        "POLICYD_ALLOW_NETWORKS_FILE": str(path),
    }
    server = PolicyServer(config.load(env), MemoryReactorClock(), CollectorRegistry())
    return server, path


class TestReload:
    """PolicyServer.reload: new lists apply everywhere, bad ones never."""

    def test_file_and_variable_together(self, tmp_path: Path) -> None:
        """The variable's networks and the file's both apply."""
        server, _ = server_with(tmp_path, "198.51.100.0/24\n")
        assert [str(n) for n in server.settings.allow_networks] == [
            "192.0.2.0/24",
            "198.51.100.0/24",
        ]

    def test_reload_applies(self, tmp_path: Path) -> None:
        """After a reload the decider and the metrics use the new lists."""
        server, path = server_with(tmp_path, "198.51.100.0/24\n")
        path.write_text("203.0.113.0/24\n")
        with capture_logs() as logs:
            assert server.reload() is True
        decider = server.factory.decider
        assert isinstance(decider, PolicyDecider)
        expected = (
            ipaddress.ip_network("192.0.2.0/24"),
            ipaddress.ip_network("203.0.113.0/24"),
        )
        assert decider.settings.allow_networks == expected
        assert server._holders.settings.allow_networks == expected
        (reloaded,) = events_named(logs, "reloaded")
        assert reloaded["networks"] == 2

    def test_bad_file_keeps_the_lists(self, tmp_path: Path) -> None:
        """A bad line: the lists in use stay, and the log says why."""
        server, path = server_with(tmp_path, "198.51.100.0/24\n")
        before = server.settings
        path.write_text("198.51.100.0/24\n999.1.1.1\n")
        with capture_logs() as logs:
            assert server.reload() is False
        assert server.settings is before
        decider = server.factory.decider
        assert isinstance(decider, PolicyDecider)
        assert decider.settings is before
        (failed,) = events_named(logs, "reload_failed")
        assert "line 2" in failed["error"]

    def test_missing_file_keeps_the_lists(self, tmp_path: Path) -> None:
        """A file removed since start-up: the lists in use stay."""
        server, path = server_with(tmp_path, "198.51.100.0/24\n")
        path.unlink()
        with capture_logs() as logs:
            assert server.reload() is False
        assert "cannot read" in events_named(logs, "reload_failed")[0]["error"]


def test_sighup_reloads_a_running_policyd(tmp_path: Path) -> None:
    """SIGHUP makes a running policyd read its files again, and it keeps serving."""
    path = tmp_path / "domains"
    path.write_text("partner.example\n")
    with PolicydProcess({"POLICYD_ALLOW_DOMAINS_FILE": str(path)}) as policyd:
        path.write_text("partner.example\nbank.example\n")
        policyd.signal(signal.SIGHUP)
        reloaded = policyd.wait_for_event("reloaded")
        assert reloaded["domains"] == 2
        path.write_text("not a domain!\n")
        policyd.signal(signal.SIGHUP)
        policyd.wait_for_event("reload_failed")
        assert policyd.running
        status, _ = policyd.healthz()
        assert status == 200
