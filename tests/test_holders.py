"""Tests for policyd.holders: who holds the processes, the level-change line."""

from __future__ import annotations

import attrs
import pytest
from helpers import capture_logs, events_named
from load_contract import BASE, START
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from policyd.holders import (
    ADVICE,
    BOTNET,
    CALM,
    SURGE,
    LevelChangeLog,
    cause,
    count_holders,
)
from policyd.levels import ELEVATED, NORMAL, OVERLOAD
from policyd.load import LoadSettings, MemoryLoadTracker
from policyd.metrics import HoldersCollector
from policyd.policy import CLEAN, EXEMPT, SUSPICIOUS, PolicySettings
from policyd.request import PolicyRequest

SETTINGS = PolicySettings()


def ask(
    tracker: MemoryLoadTracker, connection: int, address: str, **attributes: str
) -> None:
    """One CONNECT request from *address* with *attributes* on *connection*."""
    fields = {
        "request": "smtpd_access_policy",
        "protocol_state": "CONNECT",
        "client_address": address,
        "client_name": f"mx{address.rsplit('.', 1)[-1]}.sender.example",
        "reverse_client_name": f"mx{address.rsplit('.', 1)[-1]}.sender.example",
        **attributes,
    }
    tracker.observe(PolicyRequest.from_attributes(fields, connection))


def rig(
    settings: LoadSettings = BASE,
) -> tuple[MemoryLoadTracker, Clock, LevelChangeLog]:
    """A memory tracker logging its level changes through `LevelChangeLog`."""
    clock = Clock()
    clock.advance(START)
    line = LevelChangeLog(SETTINGS, settings.capacity)
    tracker = MemoryLoadTracker(clock, settings, line.level_changed)
    line.tracker = tracker
    return tracker, clock, line


class TestCountHolders:
    """`count_holders` classifies the latest request of each busy process."""

    def test_classes(self) -> None:
        """Clean names, an unverified name, and an authenticated client."""
        tracker, _, _ = rig()
        ask(tracker, 1, "192.0.2.1")
        ask(tracker, 2, "192.0.2.2", client_name="unknown")
        ask(tracker, 3, "192.0.2.3", client_name="unknown", sasl_username="alice")
        ask(tracker, 4, "192.0.2.4")
        assert count_holders(tracker, SETTINGS) == {
            CLEAN: 2,
            SUSPICIOUS: 1,
            EXEMPT: 1,
        }

    def test_latest_request_counts(self) -> None:
        """A process that moved on to another client counts under the new one."""
        tracker, _, _ = rig()
        ask(tracker, 1, "192.0.2.1", client_name="unknown")
        ask(tracker, 1, "192.0.2.9")
        assert count_holders(tracker, SETTINGS) == {CLEAN: 1, SUSPICIOUS: 0, EXEMPT: 0}


class TestCause:
    """`cause`: a botnet when suspicious clients hold half or more."""

    @pytest.mark.parametrize(
        ("level", "counts", "expected"),
        [
            (NORMAL, {SUSPICIOUS: 10, CLEAN: 0, EXEMPT: 0}, CALM),
            (OVERLOAD, {SUSPICIOUS: 5, CLEAN: 5, EXEMPT: 0}, BOTNET),
            (OVERLOAD, {SUSPICIOUS: 4, CLEAN: 5, EXEMPT: 1}, SURGE),
            (ELEVATED, {SUSPICIOUS: 0, CLEAN: 9, EXEMPT: 0}, SURGE),
            (OVERLOAD, {SUSPICIOUS: 0, CLEAN: 0, EXEMPT: 0}, SURGE),
        ],
    )
    def test_cause(self, level: int, counts: dict[str, int], expected: str) -> None:
        """Half the holders suspicious or more: botnet; otherwise a surge."""
        assert cause(level, counts) == expected


class TestLevelChangeLine:
    """One ``stress_level`` event per change, with its cause and advice."""

    def test_botnet(self) -> None:
        """Suspicious holders: the line says so and advises CONNECT wiring."""
        tracker, _, _ = rig()
        with capture_logs() as logs:
            for n in range(18):
                ask(tracker, n, f"203.0.113.{n}", client_name="unknown")
        changes = events_named(logs, "stress_level")
        assert [(e["old_level"], e["new_level"]) for e in changes] == [
            ("normal", "elevated"),
            ("elevated", "overload"),
        ]
        last = changes[-1]
        assert (last["suspicious"], last["clean"], last["exempt"]) == (18, 0, 0)
        assert last["cause"] == BOTNET
        assert "CONNECT" in last["advice"]

    def test_surge(self) -> None:
        """Clean holders: a legitimate surge; advice to raise the process limit."""
        tracker, _, _ = rig()
        with capture_logs() as logs:
            for n in range(18):
                ask(tracker, n, f"198.51.100.{n}")
        last = events_named(logs, "stress_level")[-1]
        assert (last["new_level"], last["cause"]) == ("overload", SURGE)
        assert (last["suspicious"], last["clean"]) == (0, 18)
        assert last["advice"] == ADVICE[SURGE]
        assert "process limit" in last["advice"]

    def test_back_to_normal(self) -> None:
        """Falling back to normal says nobody is refused."""
        tracker, clock, _ = rig(attrs.evolve(BASE, min_dwell=0.0))
        with capture_logs() as logs:
            for n in range(18):
                ask(tracker, n, f"198.51.100.{n}")
            for n in range(18):
                tracker.connection_closed(n)
            clock.advance(1)
            tracker.tick()
        last = events_named(logs, "stress_level")[-1]
        assert (last["new_level"], last["cause"]) == ("normal", CALM)

    def test_one_line_per_change(self) -> None:
        """With the callback, the tracker itself logs nothing more."""
        tracker, _, _ = rig()
        with capture_logs() as logs:
            for n in range(18):
                ask(tracker, n, f"198.51.100.{n}")
        assert len([e for e in logs if e.get("event") == "stress_level"]) == 2


class TestCollector:
    """`HoldersCollector`: busy processes by class and the bar, at scrape time."""

    def test_metrics(self) -> None:
        """The gauges read the tracker when scraped."""
        tracker, clock, _ = rig(
            attrs.evolve(BASE, busy_window=3600.0, pressure_step=10.0)
        )
        registry = CollectorRegistry()
        registry.register(HoldersCollector(tracker, SETTINGS))
        for n in range(19):
            ask(tracker, n, f"203.0.113.{n}", client_name="unknown")
        ask(tracker, 19, "198.51.100.1")

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        assert value("policyd_busy_processes", **{"class": "suspicious"}) == 19
        assert value("policyd_busy_processes", **{"class": "clean"}) == 1
        assert value("policyd_busy_processes", **{"class": "exempt"}) == 0
        assert value("policyd_refusal_bar") == 3
        for _ in range(11):
            clock.advance(1)
            tracker.tick()
        assert value("policyd_refusal_bar") == 2


def hosts_rig() -> tuple[MemoryLoadTracker, Clock]:
    """A tracker of two Postfix hosts, mx1 and mx2, each of capacity 20."""
    tracker, clock, _ = rig(attrs.evolve(BASE, busy_window=3600.0))
    return tracker, clock


def on_host(
    tracker: MemoryLoadTracker, host: str, connections: range, **bot: str
) -> None:
    """One request on each of *connections*, all of Postfix host *host*."""
    for n in connections:
        tracker.connection_opened(n, host)
        ask(tracker, n, f"203.0.113.{n}", **bot)


class TestPerHost:
    """Holders and the bar of one Postfix host are that host's own."""

    def test_count_on_one_host(self) -> None:
        """count_holders(host=...) counts that host's busy processes only."""
        tracker, _ = hosts_rig()
        on_host(tracker, "mx1", range(3), client_name="unknown")
        on_host(tracker, "mx2", range(10, 15))
        assert count_holders(tracker, SETTINGS, "mx1") == {
            CLEAN: 0,
            SUSPICIOUS: 3,
            EXEMPT: 0,
        }
        assert count_holders(tracker, SETTINGS, "mx2")[CLEAN] == 5
        assert count_holders(tracker, SETTINGS)[CLEAN] == 5

    def test_level_line_counts_its_hosts_holders(self) -> None:
        """
        A botnet on mx1 is called a botnet, whatever clean clients hold mx2.

        Counting every host's holders would see 18 suspicious of 38, less
        than half, and call mx1's overload a legitimate surge.
        """
        tracker, _ = hosts_rig()
        on_host(tracker, "mx2", range(100, 120))
        with capture_logs() as logs:
            on_host(tracker, "mx1", range(18), client_name="unknown")
        last = [e for e in events_named(logs, "stress_level") if e["host"] == "mx1"][-1]
        assert last["new_level"] == "overload"
        assert (last["suspicious"], last["clean"]) == (18, 0)
        assert last["cause"] == BOTNET

    def test_metrics_per_host(self) -> None:
        """policyd_host_busy_processes and policyd_host_refusal_bar, per host."""
        tracker, clock = hosts_rig()
        registry = CollectorRegistry()
        registry.register(HoldersCollector(tracker, SETTINGS))
        on_host(tracker, "mx1", range(19), client_name="unknown")
        on_host(tracker, "mx2", range(100, 102))
        for _ in range(11):
            clock.advance(1)
            tracker.tick()

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        busy = "policyd_host_busy_processes"
        assert value(busy, host="mx1", **{"class": "suspicious"}) == 19
        assert value(busy, host="mx2", **{"class": "clean"}) == 2
        assert value(busy, host="mx2", **{"class": "suspicious"}) == 0
        # mx1's overload has lasted a step: its bar fell; mx2 is at normal.
        assert value("policyd_host_refusal_bar", host="mx1") == 2
        assert value("policyd_host_refusal_bar", host="mx2") == 3
        assert value("policyd_refusal_bar") == 2
