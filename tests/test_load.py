"""
The load tracker in memory: the shared contract, and what is its own.

The contract (tests/load_contract.py) is what any backend must do; the
classes below pin choices of this backend: how addresses become keys, which
client goes when every one holds an smtpd process, the whole-second buckets
of the rate window, and the ``on_level_change`` callback.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from helpers import capture_logs, events_named
from load_contract import BASE, CLIENT, START, LoadTrackerContract, Smtpd, request
from twisted.internet.task import Clock

from policyd.clients import UNKNOWN_CLIENT, ClientKeys
from policyd.load import (
    ELEVATED,
    NORMAL,
    OVERLOAD,
    LoadSettings,
    LoadSnapshot,
    LoadTracker,
    MemoryLoadTracker,
)
from policyd.request import PolicyRequest


class TestMemoryLoadTracker(LoadTrackerContract):
    """`MemoryLoadTracker` keeps the load tracker contract."""

    def make_tracker(self, clock: Clock, settings: LoadSettings) -> LoadTracker:
        """A `MemoryLoadTracker`."""
        return MemoryLoadTracker(clock, settings)


class TestLifecycle:
    """start() and stop() of the in-memory tracker."""

    def test_start_stop_fire_at_once(self) -> None:
        """Nothing to connect to: both fire at once, and the state survives."""
        tracker, smtpd = memory()
        started = tracker.start()
        assert started.called
        smtpd.busy(1)
        stopped = tracker.stop()
        assert stopped.called
        assert tracker.snapshot().busy_connections == 1


def memory(**overrides: Any) -> tuple[MemoryLoadTracker, Smtpd]:
    """A `MemoryLoadTracker` with `BASE` settings changed by *overrides*."""
    clock = Clock()
    clock.advance(START)
    tracker = MemoryLoadTracker(clock, attrs.evolve(BASE, **overrides))
    return tracker, Smtpd(tracker, clock)


class TestClientKeys:
    """`ClientKeys` turns addresses into integer keys, grouped by prefix."""

    @pytest.mark.parametrize(
        ("ipv4", "ipv6", "address", "described"),
        [
            (32, 64, "192.0.2.7", "192.0.2.7"),
            (31, 64, "192.0.2.7", "192.0.2.6/31"),
            (24, 64, "192.0.2.200", "192.0.2.0/24"),
            (8, 64, "10.20.30.40", "10.0.0.0/8"),
            (32, 64, "0.0.0.0", "0.0.0.0"),
            (32, 64, "255.255.255.255", "255.255.255.255"),
            (32, 64, "2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
            (32, 16, "2001:db8:1:2:3:4:5:6", "2001::/16"),
            (32, 128, "2001:db8::1", "2001:db8::1"),
            (32, 64, "::", "::/64"),
            (32, 64, "unknown", "unknown"),
            (32, 64, "", "unknown"),
        ],
    )
    def test_describe(self, ipv4: int, ipv6: int, address: str, described: str) -> None:
        """A key is described as the prefix it stands for (no /32, no /128)."""
        keys = ClientKeys(ipv4, ipv6)
        assert keys.describe(keys.key(address)) == described

    @pytest.mark.parametrize(
        "address", ["unknown", "", "x", "1.2.3.4.5", "999.0.0.1", "2001:db8::g"]
    )
    def test_unknown(self, address: str) -> None:
        """What is not an IP address is the one key `UNKNOWN_CLIENT`."""
        assert ClientKeys().key(address) == UNKNOWN_CLIENT

    def test_families_apart(self) -> None:
        """An IPv4 and an IPv6 address with the same bits get different keys."""
        keys = ClientKeys(32, 128)
        assert keys.key("0.0.0.1") != keys.key("::1")
        assert keys.key("0.0.0.0") != keys.key("::")
        assert UNKNOWN_CLIENT not in {keys.key("0.0.0.0"), keys.key("::")}

    def test_keys_are_small(self) -> None:
        """Keys are ints (cheap to hash and store), equal within one prefix."""
        keys = ClientKeys(24, 64)
        key = keys.key("192.0.2.1")
        assert isinstance(key, int)
        assert key == keys.key("192.0.2.254")
        assert keys.key("2001:db8::1") == keys.key("2001:db8::ffff:1")


class TestEviction:
    """Which client goes when the table is full."""

    def test_busy_clients_skipped_idle_in_order(self) -> None:
        """Idle clients go least recently seen first; busy ones are skipped."""
        tracker, p = memory(max_tracked_clients=3, busy_window=3600.0)
        holder, first, second = p.connect(), p.connect(), p.connect()
        p.ask(holder, "192.0.2.1", state="CONNECT")  # holds its process
        p.ask(first, "192.0.2.2", state="CONNECT")
        p.ask(second, "192.0.2.3", state="CONNECT")
        p.close([first, second])  # .2 and .3 are idle now
        p.ask(p.connect(), "192.0.2.4", state="CONNECT")
        p.ask(p.connect(), "192.0.2.5", state="CONNECT")
        remembered = [p.stats(f"192.0.2.{n}").session_rate > 0 for n in range(1, 6)]
        assert remembered == [True, False, False, True, True]
        assert tracker.snapshot().evictions == 2

    def test_all_busy_evicts_least_recently_seen(self) -> None:
        """
        When every client holds a process, the least recently seen one goes.

        That happens only when POLICYD_MAX_TRACKED_CLIENTS is below the
        number of smtpd processes.  The newcomer is never the one forgotten:
        its request must be accounted to it.  What is forgotten is what the
        client did (here its session rate); the processes it holds are the
        host's live count, and stay counted.
        """
        tracker, p = memory(max_tracked_clients=3, busy_window=3600.0)
        for n in range(1, 4):
            p.ask(p.connect(), f"192.0.2.{n}", state="CONNECT")
        p.ask(1, "192.0.2.1")  # seen again: .2 is now the least recent
        for n in range(4, 7):
            p.ask(p.connect(), f"192.0.2.{n}", state="CONNECT")
        remembered = [p.stats(f"192.0.2.{n}").session_rate > 0 for n in range(1, 7)]
        assert remembered == [False, False, False, True, True, True]
        assert [p.stats(f"192.0.2.{n}").concurrency for n in range(1, 7)] == [1] * 6
        assert tracker.snapshot().busy_connections == 6
        p.ask(p.connect(), "192.0.2.7", state="CONNECT")
        remembered = [p.stats(f"192.0.2.{n}").session_rate > 0 for n in range(4, 8)]
        assert remembered == [False, True, True, True]
        assert tracker.snapshot().evictions == 4


class TestBoundaries:
    """Where this backend puts the edges of its windows, to the tick."""

    def test_busy_window_ends_exactly(self) -> None:
        """A tick exactly busy_window after the request releases the connection."""
        tracker, p = memory(busy_window=10.0)
        p.ask(p.connect())
        p.clock.advance(9.75)
        tracker.tick()
        assert tracker.snapshot().busy_connections == 1
        p.clock.advance(0.25)
        tracker.tick()
        assert tracker.snapshot().busy_connections == 0

    def test_dwell_counts_from_last_evaluation_above_exit(self) -> None:
        """
        The dwell runs from the last time the load was seen at or above exit.

        Busy connections are released by ticks, so with a tick a second the
        level falls up to one tick before busy_window + min_dwell: the last
        tick that still saw the load high.
        """
        tracker, p = memory(busy_window=10.0, min_dwell=30.0)
        p.busy(20)
        assert p.levels(38) == {OVERLOAD}  # released at 10, last high at 9
        p.wait(1)
        assert tracker.level == NORMAL


class TestRateBuckets:
    """The request rate is kept in whole-second buckets over rate_window."""

    def test_counts_by_whole_second(self) -> None:
        """A request counts until its whole second leaves the window."""
        tracker, p = memory(rate_window=10)
        p.clock.advance(0.5)
        p.ask(p.connect())
        p.clock.advance(9.25)  # START + 9.75: second 0 is still in the window
        assert tracker.request_rate() == pytest.approx(0.1)
        p.clock.advance(0.25)  # START + 10.0
        assert tracker.request_rate() == 0.0

    @pytest.mark.parametrize(
        ("gap", "rate"), [(1, 2.0), (9, 2.0), (10, 1.0), (500, 1.0)]
    )
    def test_gaps(self, gap: int, rate: float) -> None:
        """After a quiet gap, only requests still inside the window count."""
        tracker, p = memory(rate_window=10)
        connection = p.connect()
        for _ in range(10):
            p.ask(connection)
        p.clock.advance(gap)
        for _ in range(10):
            p.ask(connection)
        assert tracker.request_rate() == pytest.approx(rate)

    def test_read_without_tick(self) -> None:
        """request_rate() and load_ratio() are current without a tick."""
        tracker, p = memory(rate_window=10, rate_capacity=1.0, capacity=100)
        connection = p.connect()
        for _ in range(5):
            p.ask(connection)
        assert tracker.load_ratio() == pytest.approx(0.5)
        p.clock.advance(10)
        assert tracker.request_rate() == 0.0
        assert tracker.load_ratio() == pytest.approx(0.01)  # busy until tick

    def test_one_second_window(self) -> None:
        """A one-second window counts the current second only."""
        tracker, p = memory(rate_window=1)
        connection = p.connect()
        for _ in range(7):
            p.ask(connection)
        assert tracker.request_rate() == 7.0
        p.clock.advance(1)
        assert tracker.request_rate() == 0.0


class TestLevelChange:
    """The constructor's callback and the fields of the log event."""

    def test_callback(self) -> None:
        """on_level_change gets (old, new, snapshot) for every change, in order."""
        changes: list[tuple[int, int, LoadSnapshot]] = []
        clock = Clock()
        tracker = MemoryLoadTracker(
            clock,
            LoadSettings(
                capacity=10, busy_window=3600.0, min_dwell=30.0, close_linger=0.0
            ),
            on_level_change=lambda old, new, snap: changes.append((old, new, snap)),
        )
        p = Smtpd(tracker, clock)
        connections = p.busy(7)
        connections += p.busy(3)
        for _ in range(5):
            p.ask(connections[0])
        p.shed(connections)
        p.wait(31)
        assert [(old, new) for old, new, _ in changes] == [
            (NORMAL, ELEVATED),
            (ELEVATED, OVERLOAD),
            (OVERLOAD, NORMAL),
        ]
        assert [snap.level for _, _, snap in changes] == [ELEVATED, OVERLOAD, NORMAL]
        assert [snap.busy_connections for _, _, snap in changes] == [7, 9, 0]

    def test_no_callback_needed(self) -> None:
        """Without a callback the level still changes (the callback is optional)."""
        tracker, p = memory()
        p.busy(20)
        assert tracker.level == OVERLOAD

    def test_log_fields(self) -> None:
        """The stress_level event carries the load, busy, capacity, rate, stress."""
        tracker, p = memory(capacity=10, rate_window=10)
        with capture_logs() as logs:
            p.busy(6)
            p.ask(p.connect(), stress=True)
        [event] = events_named(logs, "stress_level")
        assert (event["old_level"], event["new_level"]) == ("normal", "overload")
        assert event["load"] == pytest.approx(0.7)
        assert (event["busy"], event["capacity"]) == (7, 10)
        assert event["rate"] == pytest.approx(0.7)
        assert event["postfix_stress"] == "yes"
        assert tracker.level == OVERLOAD


class TestConnections:
    """Connections the tracker was not told about."""

    def test_request_on_unopened_connection(self) -> None:
        """A request on a connection never opened is counted; closing releases it."""
        tracker, p = memory()
        p.ask(0, instance="x")
        snapshot = tracker.snapshot()
        assert (snapshot.connections, snapshot.busy_connections) == (1, 1)
        assert snapshot.transactions == 1
        p.close([0])
        snapshot = tracker.snapshot()
        assert (snapshot.connections, snapshot.busy_connections) == (0, 0)
        assert snapshot.transactions == 0

    def test_opened_twice(self) -> None:
        """Opening a connection id again does not forget what it holds."""
        tracker, p = memory()
        connection = p.connect()
        p.ask(connection, instance="x")
        tracker.connection_opened(connection)
        p.close([connection])
        snapshot = tracker.snapshot()
        assert (snapshot.busy_connections, snapshot.transactions) == (0, 0)
        assert p.stats().concurrency == 0

    def test_tick_when_empty(self) -> None:
        """Ticking a tracker with nothing in it changes nothing."""
        tracker, p = memory()
        p.wait(100)
        assert tracker.snapshot() == MemoryLoadTracker(Clock(), BASE).snapshot()


class TestHosts:
    """Each Postfix host's load is its own (connections opened with a host)."""

    @staticmethod
    def open(
        tracker: MemoryLoadTracker, host: str, count: int, start: int
    ) -> list[int]:
        """*count* connections of *host*, ids from *start*."""
        connections = list(range(start, start + count))
        for connection in connections:
            tracker.connection_opened(connection, host)
        return connections

    def test_flood_on_one_host_leaves_another_normal(self) -> None:
        """Host A at 18 of 20 busy is at overload; host B, 1 busy, stays normal."""
        tracker, _ = memory()
        a = self.open(tracker, "mx1", 18, 1)
        b = self.open(tracker, "mx2", 1, 100)
        levels_a = {tracker.observe(request(c, f"192.0.2.{c}")) for c in a}
        assert tracker.observe(request(b[0], "198.51.100.1")) == NORMAL
        assert levels_a >= {OVERLOAD}
        assert tracker.snapshot("mx1").level == OVERLOAD
        assert tracker.snapshot("mx2").level == NORMAL
        assert tracker.level == OVERLOAD  # the highest
        together = tracker.snapshot()
        assert (together.host, together.busy_connections) == ("all", 19)
        assert tracker.snapshot("mx1").host == "mx1"
        assert sorted(tracker.hosts()) == ["local", "mx1", "mx2"]

    def test_concurrency_per_host(self) -> None:
        """A client's concurrency is what it holds on the host asking about it."""
        tracker, _ = memory()
        a = self.open(tracker, "mx1", 3, 1)
        b = self.open(tracker, "mx2", 2, 100)
        for connection in a + b:
            tracker.observe(request(connection, CLIENT))
        assert tracker.client(request(a[0], CLIENT)).concurrency == 3
        assert tracker.client(request(b[0], CLIENT)).concurrency == 2

    def test_hangup_discount_per_host(self) -> None:
        """A client hung up on one host still counts in full where it is served."""
        tracker, _ = memory()
        a = self.open(tracker, "mx1", 2, 1)
        b = self.open(tracker, "mx2", 1, 100)
        for connection in a + b:
            tracker.observe(request(connection, CLIENT))
        for connection in a:
            tracker.record_refusal(request(connection, CLIENT), hangup=True)
        # On mx1 its two hung-up connections count once; mx2 is untouched.
        assert tracker.snapshot("mx1").busy_connections == 1
        assert tracker.snapshot("mx2").busy_connections == 1

    def test_idle_host_forgotten(self) -> None:
        """A host with no connection left, back at normal, is forgotten."""
        tracker, p = memory(close_linger=0.0)
        connections = self.open(tracker, "mx9", 2, 1)
        for connection in connections:
            tracker.observe(request(connection, CLIENT))
        assert "mx9" in tracker.hosts()
        p.close(connections)
        p.watch(2.0, lambda: None)
        assert tracker.hosts() == ["local"]
        with pytest.raises(KeyError):
            tracker.snapshot("mx9")

    def test_counters_survive_forgotten_host(self) -> None:
        """Level changes and stress=yes counted by a forgotten host stay counted."""
        tracker, p = memory(
            close_linger=0.0, min_dwell=0.0, postfix_stress_min_load=0.5
        )
        connections = self.open(tracker, "mx9", 14, 1)
        for connection in connections:
            tracker.observe(request(connection, f"192.0.2.{connection}", stress=True))
        before = tracker.snapshot()
        assert before.transitions["overload"] == 1
        assert before.postfix_stress_seen == 14
        p.close(connections)
        p.watch(2.0, lambda: None)
        assert tracker.hosts() == ["local"]
        after = tracker.snapshot()
        assert after.postfix_stress_seen == 14
        for level, count in before.transitions.items():
            assert after.transitions[level] >= count

    def test_level_change_names_host(self) -> None:
        """The level-change callback gets the snapshot of the host that changed."""
        changes: list[tuple[int, int, str]] = []
        clock = Clock()
        clock.advance(START)
        tracker = MemoryLoadTracker(
            clock, BASE, lambda old, new, snap: changes.append((old, new, snap.host))
        )
        for connection in self.open(tracker, "mx1", 14, 1):
            tracker.observe(request(connection, f"192.0.2.{connection}"))
        assert changes == [(NORMAL, ELEVATED, "mx1")]

    def test_policy_context_names_host(self) -> None:
        """With host_from=policy_context, a connection's first request places it."""
        tracker, _ = memory(host_from="policy_context")
        tracker.connection_opened(1)
        tracker.connection_opened(2)
        contexts = {1: "mx1", 2: ""}
        for connection, context in contexts.items():
            tracker.observe(
                PolicyRequest.from_attributes(
                    {
                        "request": "smtpd_access_policy",
                        "protocol_state": "RCPT",
                        "client_address": CLIENT,
                        "policy_context": context,
                    },
                    connection,
                )
            )
        assert sorted(tracker.hosts()) == ["local", "mx1"]
        assert tracker.snapshot("mx1").busy_connections == 1
        assert tracker.snapshot("local").busy_connections == 1
        assert tracker.snapshot("mx1").connections == 1
        assert tracker.snapshot("local").connections == 1

    def test_policy_context_ignored_by_peer(self) -> None:
        """With host_from=peer (the default), policy_context changes nothing."""
        tracker, _ = memory()
        tracker.connection_opened(1)
        tracker.observe(
            PolicyRequest.from_attributes(
                {
                    "protocol_state": "RCPT",
                    "client_address": CLIENT,
                    "policy_context": "mx1",
                },
                1,
            )
        )
        assert tracker.hosts() == ["local"]

    def test_host_capacity(self) -> None:
        """A host named in host_capacities is measured against its own limit."""
        tracker, _ = memory(host_capacities=(("mx1", 2),))
        self.open(tracker, "mx1", 2, 1)
        self.open(tracker, "mx2", 2, 10)
        for connection in (1, 2, 10, 11):
            tracker.observe(request(connection, f"192.0.2.{connection}"))
        assert tracker.snapshot("mx1").level == OVERLOAD  # 2 of 2
        assert tracker.snapshot("mx2").level == NORMAL  # 2 of BASE's 20
        assert (tracker.snapshot("mx1").capacity, tracker.snapshot("mx2").capacity) == (
            2,
            BASE.capacity,
        )

    def test_pressure_per_host(self) -> None:
        """A request gets its own host's pressure, not a longer overload elsewhere."""
        tracker, p = memory(pressure_step=10.0, max_pressure=1, busy_window=3600.0)
        long = self.open(tracker, "mx1", 18, 1)
        for connection in long:
            tracker.observe(request(connection, f"192.0.2.{connection}"))
        p.watch(10.0, lambda: None)  # mx1: 10 s of overload, one step
        fresh = self.open(tracker, "mx2", 18, 100)
        for connection in fresh:
            tracker.observe(request(connection, f"198.51.100.{connection - 99}"))
        assert tracker.snapshot("mx2").level == OVERLOAD
        assert tracker.pressure_at(request(long[0], "192.0.2.1")) == 1
        assert tracker.pressure_at(request(fresh[0], "198.51.100.1")) == 0
        assert tracker.pressure == 1  # the highest, for the gauge
