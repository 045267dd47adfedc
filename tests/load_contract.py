"""
The contract every `LoadTracker` keeps, whatever keeps its state.

`LoadTrackerContract` holds tests that use only the `LoadTracker` interface
(``level``, ``connection_opened``/``connection_closed``, ``observe``,
``client``, ``record_refusal``, ``tick``, ``snapshot``) and a `Clock`.  A
test module subclasses it and implements `LoadTrackerContract.make_tracker`:
tests/test_load.py runs it for `MemoryLoadTracker`, and a backend shared by
several MX hosts (Redis) runs the very same tests.  Nothing here reaches into
a backend's private state; what belongs to one backend (how keys are encoded,
the granularity of the rate window, which client goes when every client holds
an smtpd process, the constructor's callback) is tested in that backend's own
module.

Time moves only through `Clock.advance`, and the tracker is ticked after every
step, as `PolicyFactory.sweep` does once a second.  Where a backend may
reasonably put a boundary at either end of a tick (when a busy window, a rate
window or a dwell runs out), the tests look half a second before and after it:
they pin the behaviour without pinning one implementation's rounding.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
import pytest
from helpers import capture_logs, events_named
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel

from policyd.load import (
    ELEVATED,
    LEVEL_NAMES,
    LOCAL_HOST,
    NORMAL,
    OVERLOAD,
    ClientStats,
    LoadSettings,
    LoadSnapshot,
    LoadTracker,
)
from policyd.request import PolicyRequest

H = TypeVar("H", bound=Hashable)

# A real reactor's clock reads about this; starting there (not at 0) catches
# a backend that treats time 0 as "never".
START = 1_700_000_000.0

CLIENT = "192.0.2.10"
A, B = "192.0.2.1", "192.0.2.2"

# Round numbers, so that the thresholds fall on whole connections: with
# capacity 20, elevated is entered at 14 busy and left below 10, overload is
# entered at 18 and left below 15.
BASE = LoadSettings(
    capacity=20,
    busy_window=10.0,
    transaction_timeout=60.0,
    # Most tests shed load by closing connections and expect it gone at once;
    # the linger has tests of its own.
    close_linger=0.0,
    elevated_enter=0.7,
    elevated_exit=0.5,
    overload_enter=0.9,
    overload_exit=0.75,
    min_dwell=30.0,
    rate_capacity=0.0,
    rate_window=10,
    postfix_stress_hold=60.0,
    postfix_stress_level=OVERLOAD,
    # The floor's own tests below; corroboration by the load has its tests.
    postfix_stress_min_load=0.0,
    ipv4_prefix=32,
    ipv6_prefix=64,
    max_tracked_clients=1000,
    client_rate_window=60.0,
    hold_grace=5.0,
    hold_window=600.0,
    pressure_step=10.0,
    max_pressure=1,
)

NO_LOAD = {"normal": 0, "elevated": 0, "overload": 0}


def request(
    connection: int,
    client: str = CLIENT,
    *,
    instance: str = "",
    state: str = "RCPT",
    stress: bool = False,
) -> PolicyRequest:
    """A request as smtpd sends it, trimmed to what the tracker reads."""
    return PolicyRequest.from_attributes(
        {
            "request": "smtpd_access_policy",
            "protocol_state": state,
            "client_address": client,
            "instance": instance,
            "stress": "yes" if stress else "",
        },
        connection,
    )


def level_changes(events: Iterable[LogEvent]) -> list[tuple[str, str]]:
    """``(old, new)`` level names of every ``stress_level`` log event."""
    return [
        (e["old_level"], e["new_level"]) for e in events_named(events, "stress_level")
    ]


class Smtpd:
    """Plays Postfix's smtpd processes against a tracker, on a `Clock`."""

    def __init__(self, tracker: LoadTracker, clock: Clock) -> None:
        self.tracker = tracker
        self.clock = clock
        self._ids = itertools.count(1)

    @property
    def level(self) -> int:
        """The tracker's level now."""
        return self.tracker.level

    def snapshot(self) -> LoadSnapshot:
        """The tracker's snapshot now."""
        return self.tracker.snapshot()

    def connect(self) -> int:
        """A new smtpd process opens its policy connection; return its id."""
        connection = next(self._ids)
        self.tracker.connection_opened(connection)
        return connection

    def ask(
        self,
        connection: int,
        client: str = CLIENT,
        *,
        instance: str = "",
        state: str = "RCPT",
        stress: bool = False,
    ) -> int:
        """One request on *connection*; the level it is decided at."""
        return self.tracker.observe(
            request(connection, client, instance=instance, state=state, stress=stress)
        )

    def busy(self, count: int, client: str = CLIENT) -> list[int]:
        """*count* new connections that each send one request (no transaction)."""
        connections = []
        for _ in range(count):
            connection = self.connect()
            self.ask(connection, client)
            connections.append(connection)
        return connections

    def close(self, connections: Iterable[int]) -> None:
        """The smtpd processes behind *connections* exit."""
        for connection in connections:
            self.tracker.connection_closed(connection)

    def shed(self, connections: Sequence[int]) -> None:
        """
        Close *connections* now, with a tick on either side.

        The tracker thus sees the load high and then low at this very moment,
        so the time below an exit threshold counts from now, for any backend.
        """
        self.tracker.tick()
        self.close(connections)
        self.tracker.tick()

    def wait(self, seconds: float, step: float = 1.0) -> None:
        """Let *seconds* pass, ticking after every *step*."""
        self.watch(seconds, lambda: None, step)

    def watch(self, seconds: float, read: Callable[[], H], step: float = 1.0) -> set[H]:
        """Let *seconds* pass, ticking after every *step*; what *read* saw."""
        steps = round(seconds / step)
        assert math.isclose(steps * step, seconds), "whole steps only"
        seen = set()
        for _ in range(steps):
            self.clock.advance(step)
            self.tracker.tick()
            seen.add(read())
        return seen

    def levels(self, seconds: float, step: float = 1.0) -> set[int]:
        """The levels seen after each tick while *seconds* pass."""
        return self.watch(seconds, lambda: self.tracker.level, step)

    def stats(self, client: str = CLIENT, connection: int = 0) -> ClientStats:
        """
        What the tracker knows about *client*, as a decision reads it.

        A tracker that shares clients with other policyd instances fetches
        the shared record first (`LoadTracker.lookup`): it sends in this
        reactor turn, and the backend's test module gives it a transport
        that has the reply before the turn ends.
        """
        asked = request(connection, client)
        waiting = self.tracker.lookup(asked)
        if waiting is not None:
            shared: list[ClientStats | None] = []
            waiting.addCallback(shared.append)
            self.clock.advance(0)
            assert shared, "the shared record did not arrive"
            if shared[0] is not None:
                return shared[0]
        return self.tracker.client(asked)

    def refuse(self, client: str = CLIENT, connection: int = 0) -> None:
        """Tell the tracker that *client* was refused just now (on *connection*)."""
        self.tracker.record_refusal(request(connection, client))

    def later(self, seconds: float) -> None:
        """Let *seconds* pass without a tick (one smtpd session's pace)."""
        self.clock.advance(seconds)


# Sequences of instances on one connection (state RCPT when an instance is
# set, MAIL when not: the next MAIL FROM of a session is asked before its
# instance exists), and the transactions and messages they leave.
TRANSACTIONS = [
    pytest.param(["A"], 1, 1, id="one RCPT"),
    pytest.param(["A", "A", "A"], 1, 1, id="RCPTs of one message count once"),
    pytest.param(["A", "B"], 1, 2, id="a new instance ends the previous"),
    pytest.param(["A", "B", "C"], 1, 3, id="three messages in one session"),
    pytest.param(["A", ""], 0, 1, id="an empty instance ends it"),
    pytest.param(["", "A", "A", "", "B", "B"], 1, 2, id="MAIL, RCPTs, MAIL, RCPTs"),
    pytest.param(["", ""], 0, 0, id="no transaction"),
]

# (ipv4 prefix, ipv6 prefix, one address, another, counted as one client?)
GROUPS = [
    (32, 64, "192.0.2.1", "192.0.2.1", True),
    (32, 64, "192.0.2.1", "192.0.2.2", False),
    (24, 64, "192.0.2.1", "192.0.2.200", True),
    (24, 64, "192.0.2.1", "192.0.3.1", False),
    (16, 64, "192.0.2.1", "192.0.255.254", True),
    (32, 64, "2001:db8:1:2::1", "2001:db8:1:2:ffff::1", True),
    (32, 64, "2001:db8:1:2::1", "2001:db8:1:3::1", False),
    (32, 64, "2001:DB8:1:2::1", "2001:db8:1:2:0:0:0:1", True),
    (32, 48, "2001:db8:1:2::1", "2001:db8:1:3::1", True),
    (32, 128, "2001:db8:1:2::1", "2001:db8:1:2::2", False),
    (8, 16, "0.0.0.1", "::1", False),
    (32, 64, "unknown", "not-an-address", True),
    (32, 64, "unknown", "", True),
    (32, 64, "unknown", "192.0.2.1", False),
    (32, 64, "unknown", "2001:db8::1", False),
]

# (ipv4 prefix, ipv6 prefix, address, how ClientStats.key shows it)
KEYS = [
    (32, 64, "192.0.2.7", "192.0.2.7"),
    (24, 64, "192.0.2.200", "192.0.2.0/24"),
    (8, 64, "10.20.30.40", "10.0.0.0/8"),
    (32, 64, "2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
    (32, 48, "2001:db8:1:2::1", "2001:db8:1::/48"),
    (32, 128, "2001:db8::1", "2001:db8::1"),
    (32, 64, "unknown", "unknown"),
]

# What Postfix may send where there is no usable address; all one client.
NOT_ADDRESSES = [
    "unknown",
    "",
    "not-an-address",
    "999.1.1.1",
    "1.2.3.4.5",
    "[192.0.2.1]",
    "192.0.2.1/24",
    "2001:db8::g",
    "fe80::1%eth0",
]

# Protocol states, and whether a request at that state starts a session.
SESSION_STATES = [
    ("CONNECT", True),
    ("XCLIENT", True),
    ("connect", True),
    ("HELO", False),
    ("EHLO", False),
    ("MAIL", False),
    ("RCPT", False),
    ("DATA", False),
    ("END-OF-MESSAGE", False),
    ("VRFY", False),
    ("ETRN", False),
]

# Operations for the property test: (kind, connection, client, instance,
# state, seconds).
_OPERATION = st.tuples(
    st.sampled_from(["ask", "ask", "ask", "close", "wait", "refuse", "hangup"]),
    st.integers(1, 6),
    st.sampled_from(["192.0.2.1", "192.0.2.2", "192.0.2.200", "2001:db8::1", ""]),
    st.sampled_from(["", "", "A", "B", "C"]),
    st.sampled_from(["CONNECT", "MAIL", "RCPT", "DATA"]),
    st.sampled_from([0.0, 0.5, 1.0, 5.0, 11.0, 61.0]),
)


class ProcessHolderContract:
    """
    Process time held without progress (`ClientStats.held`).

    Mixed into `LoadTrackerContract`'s subclasses through it; kept apart so
    that the rules read together.  A wait between two requests of one
    session is charged beyond `LoadSettings.hold_grace` (5 s in `BASE`); a
    session that ends before any recipient and was not refused is charged
    from its last request to its end, at most the busy window (10 s).
    """

    smtpd: Callable[..., Smtpd]

    def test_wait_before_recipient_charged(self) -> None:
        """CONNECT, then RCPT 12 s later: 7 s beyond the grace are held."""
        p = self.smtpd()
        c = p.connect()
        p.ask(c, state="CONNECT")
        p.later(12)
        p.ask(c, instance="X")
        assert p.stats().held == pytest.approx(7.0, rel=1e-3)

    def test_slow_link_within_grace_is_free(self) -> None:
        """Requests 4.9 s apart (a slow link) never add up to anything held."""
        p = self.smtpd()
        c = p.connect()
        p.ask(c, state="CONNECT")
        for state in ("RCPT", "RCPT", "DATA", "END-OF-MESSAGE", "RCPT"):
            p.later(4.9)
            p.ask(c, instance="X", state=state)
        assert p.stats().held == 0.0

    def test_message_transfer_never_charged(self) -> None:
        """Two minutes from DATA to END-OF-MESSAGE (a big message) are free."""
        p = self.smtpd()
        c = p.connect()
        p.ask(c, state="CONNECT")
        p.later(1)
        p.ask(c, instance="X", state="RCPT")
        p.later(1)
        p.ask(c, instance="X", state="DATA")
        p.later(120)
        p.ask(c, instance="X", state="END-OF-MESSAGE")
        assert p.stats().held == 0.0
        p.later(8)  # then dawdling before the next recipient is charged
        p.ask(c, instance="Y", state="RCPT")
        assert p.stats().held == pytest.approx(3.0, rel=1e-3)

    @pytest.mark.parametrize(
        ("after", "held"),
        [(3.0, 0.0), (8.0, 3.0), (10.0, 5.0), (100.0, 5.0)],
    )
    def test_session_without_recipient(self, after: float, held: float) -> None:
        """
        A session that ends before RCPT is charged until the next one starts.

        At most the busy window (10 s): a later CONNECT may follow a time the
        process sat idle, which is nobody's fault.
        """
        p = self.smtpd()
        c = p.connect()
        p.ask(c, A, state="CONNECT")
        p.later(after)
        p.ask(c, B, state="CONNECT")
        assert p.stats(A).held == pytest.approx(held, rel=1e-3)
        assert p.stats(B).held == 0.0

    def test_refused_session_not_charged(self) -> None:
        """A session policyd refused did not hold its process by choice."""
        p = self.smtpd()
        c = p.connect()
        p.ask(c, A, state="CONNECT")
        p.refuse(A, connection=c)
        p.later(9)
        p.ask(c, B, state="CONNECT")
        assert p.stats(A).held == 0.0

    def test_close_ends_the_session(self) -> None:
        """The smtpd process exiting ends a session that named no recipient."""
        p = self.smtpd()
        c = p.connect()
        p.ask(c, A, state="CONNECT")
        p.later(9)
        p.close([c])
        assert p.stats(A).held == pytest.approx(4.0, rel=1e-3)

    def test_session_with_recipient_not_charged_at_its_end(self) -> None:
        """A session that named a recipient made progress: its end is free."""
        p = self.smtpd()
        c = p.connect()
        p.ask(c, A, state="CONNECT")
        p.ask(c, A, instance="X")
        p.later(9)
        p.ask(c, B, state="CONNECT")
        p.close([c])
        assert p.stats(A).held == 0.0

    def test_without_connect_only_inside_a_transaction(self) -> None:
        """
        With RCPT-only wiring, only waits inside one transaction count.

        Between two transactions (new instance) the process may have sat
        idle between two sessions of the same client: not charged.
        """
        p = self.smtpd()
        c = p.connect()
        p.ask(c, instance="X")
        p.later(30)
        p.ask(c, instance="X")
        assert p.stats().held == pytest.approx(25.0, rel=1e-3)
        p.later(300)
        p.ask(c, instance="Y")
        assert p.stats().held == pytest.approx(25.0 * math.exp(-300 / 600), rel=1e-3)

    def test_other_client_on_the_process_starts_afresh(self) -> None:
        """Without CONNECT, another client on the process is a new session."""
        p = self.smtpd()
        c = p.connect()
        p.ask(c, A, instance="X")
        p.later(30)
        p.ask(c, B, instance="X")
        assert (p.stats(A).held, p.stats(B).held) == (0.0, 0.0)

    def test_held_adds_up_and_decays(self) -> None:
        """Held seconds add over sessions and fade with the hold window."""
        p = self.smtpd(hold_window=600.0)
        c = p.connect()
        for _ in range(3):
            p.ask(c, state="CONNECT")
            p.later(15)
            p.ask(c, instance="X")
        assert p.stats().held == pytest.approx(
            10 * (1 + math.exp(-15 / 600) + math.exp(-30 / 600)), rel=1e-3
        )
        before = p.stats().held
        p.wait(600)
        assert p.stats().held == pytest.approx(before / math.e, rel=1e-3)

    @pytest.mark.parametrize("grace", [0.0, 5.0, 20.0])
    def test_grace_is_a_setting(self, grace: float) -> None:
        """The free part of each wait is `LoadSettings.hold_grace`."""
        p = self.smtpd(hold_grace=grace)
        c = p.connect()
        p.ask(c, state="CONNECT")
        p.later(12)
        p.ask(c, instance="X")
        assert p.stats().held == pytest.approx(max(0.0, 12 - grace), abs=1e-6)

    def test_held_grouped_by_prefix(self) -> None:
        """Held time is kept per client prefix, like the other counts."""
        p = self.smtpd(ipv4_prefix=24)
        for address in ("192.0.2.1", "192.0.2.77"):
            c = p.connect()
            p.ask(c, address, state="CONNECT")
            p.later(15)
            p.ask(c, address, instance="X")
        assert p.stats("192.0.2.200").held == pytest.approx(
            10 * (1 + math.exp(-15 / 600)), rel=1e-3
        )
        assert p.stats("192.0.3.1").held == 0.0


class PressureContract:
    """
    `LoadTracker.pressure`: how long the overload has lasted, in steps.

    Boundaries are checked half a second either side of a step, as the
    module docstring explains.
    """

    steady: Callable[..., Smtpd]

    def test_zero_below_overload(self) -> None:
        """At normal and elevated the pressure stays 0, however long."""
        p = self.steady(max_pressure=3)
        p.busy(15)  # elevated
        assert p.level == ELEVATED
        assert p.watch(60, lambda: p.tracker.pressure) == {0}

    @pytest.mark.parametrize("top", [1, 3])
    def test_rises_one_step_at_a_time(self, top: int) -> None:
        """One step per pressure_step of overload, up to max_pressure."""
        p = self.steady(max_pressure=top, pressure_step=10.0)
        p.busy(19)
        assert (p.level, p.tracker.pressure) == (OVERLOAD, 0)
        for step in range(1, top + 2):
            p.wait(9.5 if step == 1 else 9.0, step=0.5)  # half a second before
            assert p.tracker.pressure == min(step - 1, top)
            p.wait(1, step=0.5)  # half a second after
            assert p.tracker.pressure == min(step, top)

    def test_falls_as_load_falls(self) -> None:
        """Below overload_exit (still overload for the dwell) it steps down."""
        p = self.steady(max_pressure=2, pressure_step=10.0, min_dwell=300.0)
        connections = p.busy(19)
        p.wait(25)
        assert p.tracker.pressure == 2
        p.shed(connections[:6])  # 13 of 20: below the exit of 15
        assert p.level == OVERLOAD  # the dwell keeps the level
        p.wait(9.5, step=0.5)
        assert p.tracker.pressure == 2
        p.wait(1, step=0.5)
        assert p.tracker.pressure == 1
        p.wait(10)
        assert p.tracker.pressure == 0
        assert p.level == OVERLOAD

    def test_load_returning_restarts_the_step(self) -> None:
        """A new rise counts its step from when the load came back."""
        p = self.steady(max_pressure=1, pressure_step=10.0, min_dwell=300.0)
        connections = p.busy(19)
        p.shed(connections[:6])
        p.wait(7)
        p.busy(6)
        p.wait(9, step=0.5)
        assert p.tracker.pressure == 0
        p.wait(1.5, step=0.5)
        assert p.tracker.pressure == 1

    def test_no_step_jumps(self) -> None:
        """pressure_step 0: the whole way at once, and back at once."""
        p = self.steady(max_pressure=4, pressure_step=0.0, min_dwell=300.0)
        connections = p.busy(19)
        assert p.tracker.pressure == 4
        p.shed(connections[:6])
        assert p.tracker.pressure == 0

    def test_no_pressure_allowed(self) -> None:
        """max_pressure 0 (a fixed bar): always 0."""
        p = self.steady(max_pressure=0, pressure_step=1.0)
        p.busy(20)
        assert p.watch(30, lambda: p.tracker.pressure) == {0}


class HoldersContract:
    """`LoadTracker.busy_requests`: the latest request of each busy process."""

    smtpd: Callable[..., Smtpd]

    def test_latest_request_of_each_busy_connection(self) -> None:
        """One request per busy connection, the latest; idle ones drop out."""
        p = self.smtpd(busy_window=10.0)
        first, second = p.connect(), p.connect()
        p.ask(first, A, state="CONNECT")
        p.ask(first, A, state="HELO")
        p.ask(second, B, state="CONNECT")
        held = sorted(
            (r.client_address, r.protocol_state) for r in p.tracker.busy_requests()
        )
        assert held == [(A, "HELO"), (B, "CONNECT")]
        p.wait(11)
        assert p.tracker.busy_requests() == []

    def test_of_one_host(self) -> None:
        """busy_requests(host) holds the busy connections of that host only."""
        p = self.smtpd()
        p.tracker.connection_opened(101, "mx1")
        p.tracker.connection_opened(102, "mx2")
        p.ask(101, A)
        p.ask(102, B)
        p.ask(p.connect(), CLIENT)
        assert [r.client_address for r in p.tracker.busy_requests("mx1")] == [A]
        assert [r.client_address for r in p.tracker.busy_requests("mx2")] == [B]
        assert [r.client_address for r in p.tracker.busy_requests(LOCAL_HOST)] == [
            CLIENT
        ]
        assert len(p.tracker.busy_requests()) == 3


class LoadTrackerContract(ProcessHolderContract, PressureContract, HoldersContract):
    """
    The behaviour every `LoadTracker` backend shares.

    Subclass it in a ``test_*.py`` module (with a name starting with
    ``Test``) and implement `make_tracker`.  It is called once per test, and
    once per example of the property test: each call must return a tracker
    that shares nothing with earlier ones (for a shared backend, a fresh
    namespace).  The settings may lie outside what the configuration allows
    (a table of 5 clients, a capacity of 2): the backend takes them as given.
    """

    #: Whether clients outlive this process's table: a shared store keeps
    #: every client until its TTL, so one forgotten here (the table bounds
    #: this process's memory) is still known through the store.
    shared = False

    def make_tracker(self, clock: Clock, settings: LoadSettings) -> LoadTracker:
        """A new, empty tracker reading *clock*, configured by *settings*."""
        raise NotImplementedError

    def smtpd(self, **overrides: Any) -> Smtpd:
        """A fresh tracker with `BASE` settings changed by *overrides*."""
        clock = Clock()
        clock.advance(START)
        return Smtpd(self.make_tracker(clock, attrs.evolve(BASE, **overrides)), clock)

    def steady(self, **overrides: Any) -> Smtpd:
        """Like `smtpd`, but busy connections stay busy until closed."""
        return self.smtpd(busy_window=86400.0, **overrides)

    # -- the level -----------------------------------------------------------

    def test_starts_normal(self) -> None:
        """A new tracker is at normal, with nothing counted."""
        p = self.smtpd()
        assert p.level == NORMAL
        assert p.snapshot() == LoadSnapshot(
            level=NORMAL,
            load_ratio=0.0,
            connections=0,
            busy_connections=0,
            transactions=0,
            request_rate=0.0,
            postfix_stress=False,
            tracked_clients=0,
            postfix_stress_seen=0,
            evictions=0,
            transitions=NO_LOAD,
            host=LOCAL_HOST,
            capacity=BASE.capacity,
        )

    @pytest.mark.parametrize(
        ("busy", "level"),
        [
            (0, NORMAL),
            (1, NORMAL),
            (13, NORMAL),
            (14, ELEVATED),
            (17, ELEVATED),
            (18, OVERLOAD),
            (20, OVERLOAD),
            (30, OVERLOAD),
        ],
    )
    def test_level_from_busy_share(self, busy: int, level: int) -> None:
        """
        The level is entered when busy / capacity reaches its enter threshold.

        The thresholds are inclusive (14 of 20 is exactly 0.7), and more
        busy connections than the capacity is still overload.
        """
        p = self.smtpd()
        p.busy(busy)
        snapshot = p.snapshot()
        assert (p.level, snapshot.level) == (level, level)
        assert snapshot.load_ratio == pytest.approx(busy / 20)
        assert snapshot.busy_connections == busy

    def test_rising_is_immediate(self) -> None:
        """Each request is decided at the level that its own load gives."""
        p = self.smtpd()
        decided = [p.ask(p.connect()) for _ in range(20)]
        assert decided == [NORMAL] * 13 + [ELEVATED] * 4 + [OVERLOAD] * 3

    def test_normal_to_overload_directly(self) -> None:
        """A jump past both enter thresholds goes to overload in one change."""
        p = self.smtpd(capacity=2)
        with capture_logs() as logs:
            assert p.ask(p.connect()) == NORMAL  # 0.5
            assert p.ask(p.connect()) == OVERLOAD  # 1.0
        assert level_changes(logs) == [("normal", "overload")]
        assert p.snapshot().transitions == {"normal": 0, "elevated": 0, "overload": 1}

    def test_every_transition(self) -> None:
        """
        Up one level at a time, then down one level at a time.

        12 of 20 busy is below overload's exit but above elevated's: overload
        falls to elevated, not to normal.  Each change is counted under the
        level entered.
        """
        p = self.steady()
        with capture_logs() as logs:
            connections = p.busy(14)
            assert p.level == ELEVATED
            connections += p.busy(4)
            assert p.level == OVERLOAD
            p.shed(connections[12:])
            p.wait(31)
            assert p.level == ELEVATED
            p.shed(connections[:12])
            p.wait(31)
            assert p.level == NORMAL
        assert level_changes(logs) == [
            ("normal", "elevated"),
            ("elevated", "overload"),
            ("overload", "elevated"),
            ("elevated", "normal"),
        ]
        assert p.snapshot().transitions == {"normal": 1, "elevated": 2, "overload": 1}

    def test_overload_collapses_to_normal(self) -> None:
        """When the load falls below both exits, overload goes straight to normal."""
        p = self.steady()
        p.shed(p.busy(18))
        assert p.levels(29.5, step=0.5) == {OVERLOAD}
        p.wait(1.0, step=0.5)
        assert p.level == NORMAL
        assert p.snapshot().transitions == {"normal": 1, "elevated": 1, "overload": 1}

    @pytest.mark.parametrize(
        ("peak", "then", "kept"),
        [
            pytest.param(14, 12, ELEVATED, id="elevated, between exit and enter"),
            pytest.param(14, 10, ELEVATED, id="elevated, at its exit"),
            pytest.param(14, 9, NORMAL, id="elevated, below its exit"),
            pytest.param(18, 16, OVERLOAD, id="overload, between exit and enter"),
            pytest.param(18, 15, OVERLOAD, id="overload, at its exit"),
            pytest.param(18, 14, ELEVATED, id="overload, below its exit"),
            pytest.param(18, 10, ELEVATED, id="overload, at elevated's exit"),
            pytest.param(18, 9, NORMAL, id="overload, below both exits"),
            pytest.param(13, 13, NORMAL, id="normal, just below elevated's enter"),
            pytest.param(17, 17, ELEVATED, id="elevated, just below overload's enter"),
        ],
    )
    def test_hysteresis(self, peak: int, then: int, kept: int) -> None:
        """
        A level is kept while the load stays at or above its exit threshold.

        A load between the exit and the enter threshold keeps whatever level
        reached it: it neither raises normal nor lowers elevated, however
        long it lasts.
        """
        p = self.steady()
        connections = p.busy(peak)
        p.shed(connections[then:])
        p.wait(300)
        assert p.level == kept

    @pytest.mark.parametrize("dwell", [1.0, 30.0, 300.0])
    def test_drop_waits_for_min_dwell(self, dwell: float) -> None:
        """A level falls only once the load has stayed below its exit for min_dwell."""
        p = self.steady(min_dwell=dwell)
        p.shed(p.busy(18))
        assert p.levels(dwell - 0.5, step=0.5) == {OVERLOAD}
        p.wait(1.0, step=0.5)
        assert p.level == NORMAL

    def test_no_dwell(self) -> None:
        """With min_dwell 0 the level falls as soon as the load is seen below exit."""
        p = self.steady(min_dwell=0.0)
        connections = p.busy(18)
        p.shed(connections)
        assert p.level == NORMAL

    @pytest.mark.parametrize(
        ("peak", "dip", "level"),
        [(18, 8, OVERLOAD), (18, 12, OVERLOAD), (14, 8, ELEVATED)],
    )
    def test_brief_dips_do_not_lower(self, peak: int, dip: int, level: int) -> None:
        """
        Dips shorter than min_dwell keep the level, however many there are.

        Each return above the exit threshold starts the dwell again: three
        dips of 20 s within 75 s are not a 30 s dwell.  A full dwell then
        lowers the level.
        """
        p = self.steady()
        connections = p.busy(peak)
        for _ in range(3):
            p.shed(connections[dip:])
            assert p.levels(20) == {level}
            connections[dip:] = p.busy(peak - dip)
            assert p.levels(5) == {level}
        p.shed(connections[dip:])
        assert p.levels(29.5, step=0.5) == {level}
        p.wait(1.0, step=0.5)
        assert p.level < level

    def test_rising_during_dwell_is_immediate(self) -> None:
        """While a level waits out its dwell, a rising load still raises it at once."""
        p = self.steady()
        connections = p.busy(14)
        p.shed(connections[8:])
        p.wait(25)
        assert p.level == ELEVATED
        decided = [p.ask(p.connect()) for _ in range(10)]
        assert decided == [ELEVATED] * 9 + [OVERLOAD]

    # -- busy connections ----------------------------------------------------

    @pytest.mark.parametrize("window", [1.0, 10.0, 120.0])
    def test_busy_window(self, window: float) -> None:
        """A connection is busy for busy_window after its request, then released."""
        p = self.smtpd(busy_window=window)
        connection = p.connect()
        p.ask(connection)
        busy = p.watch(window - 0.5, lambda: p.snapshot().busy_connections, 0.5)
        assert busy == {1}
        p.wait(1.0, step=0.5)
        snapshot = p.snapshot()
        assert (snapshot.connections, snapshot.busy_connections) == (1, 0)

    def test_each_request_restarts_busy_window(self) -> None:
        """The busy window counts from a connection's latest request."""
        p = self.smtpd(busy_window=10.0)
        connection = p.connect()
        p.ask(connection)
        p.wait(8)
        p.ask(connection)
        assert p.watch(9.5, lambda: p.snapshot().busy_connections, 0.5) == {1}
        p.wait(1.0, step=0.5)
        assert p.snapshot().busy_connections == 0

    def test_level_falls_when_busy_window_passes(self) -> None:
        """
        A Postfix that was busy and then went quiet returns to normal.

        Its connections stay open; they stop counting after busy_window, and
        the level falls min_dwell later.
        """
        p = self.smtpd(busy_window=10.0, min_dwell=30.0)
        p.busy(18)
        assert p.level == OVERLOAD
        assert p.levels(10 + 30 - 1.5, step=0.5) == {OVERLOAD}
        p.wait(2.0, step=0.5)
        snapshot = p.snapshot()
        assert (snapshot.level, snapshot.connections) == (NORMAL, 18)
        assert (snapshot.busy_connections, snapshot.load_ratio) == (0, 0.0)

    def test_idle_postfix_is_normal(self) -> None:
        """Many open connections that send nothing are not load."""
        p = self.smtpd()
        for _ in range(200):
            p.connect()
        assert p.levels(120) == {NORMAL}
        snapshot = p.snapshot()
        assert snapshot.connections == 200
        assert (snapshot.busy_connections, snapshot.transactions) == (0, 0)
        assert snapshot.load_ratio == 0.0

    # -- transactions --------------------------------------------------------

    @pytest.mark.parametrize(("instances", "transactions", "messages"), TRANSACTIONS)
    def test_transactions_by_instance(
        self, instances: list[str], transactions: int, messages: int
    ) -> None:
        """A connection is in a transaction while its requests carry an instance."""
        p = self.smtpd()
        connection = p.connect()
        for instance in instances:
            p.ask(connection, instance=instance, state="RCPT" if instance else "MAIL")
        snapshot = p.snapshot()
        assert (snapshot.transactions, snapshot.busy_connections) == (transactions, 1)
        assert p.stats().message_rate == pytest.approx(messages)

    def test_transactions_add_across_connections(self) -> None:
        """Each connection holds at most one transaction; connections add up."""
        p = self.smtpd()
        for n in range(3):
            connection = p.connect()
            for _ in range(3):
                p.ask(connection, instance=f"{n}.1")
        assert p.snapshot().transactions == 3

    def test_transaction_timeout(self) -> None:
        """
        A connection in a transaction stays busy until transaction_timeout.

        smtpd asks nothing during DATA, so the busy window alone would drop a
        process that is receiving a message.
        """
        p = self.smtpd(busy_window=10.0, transaction_timeout=60.0)
        connection = p.connect()
        p.ask(connection, instance="A")

        def read() -> tuple[int, int]:
            snapshot = p.snapshot()
            return snapshot.busy_connections, snapshot.transactions

        assert p.watch(59.5, read, 0.5) == {(1, 1)}
        p.wait(1.0, step=0.5)
        assert read() == (0, 0)

    def test_transaction_request_restarts_timeout(self) -> None:
        """The transaction timeout counts from the transaction's latest request."""
        p = self.smtpd(transaction_timeout=60.0)
        connection = p.connect()
        p.ask(connection, instance="A")
        p.wait(30)
        p.ask(connection, instance="A", state="DATA")
        assert p.watch(59.5, lambda: p.snapshot().transactions, 0.5) == {1}
        p.wait(1.0, step=0.5)
        assert p.snapshot().transactions == 0

    def test_ended_transaction_uses_busy_window(self) -> None:
        """After a request without instance only the busy window keeps it busy."""
        p = self.smtpd(busy_window=10.0, transaction_timeout=60.0)
        connection = p.connect()
        p.ask(connection, instance="A")
        p.wait(5)
        p.ask(connection, state="MAIL")
        assert p.snapshot().transactions == 0
        assert p.watch(9.5, lambda: p.snapshot().busy_connections, 0.5) == {1}
        p.wait(1.0, step=0.5)
        assert p.snapshot().busy_connections == 0

    def test_closed_busy_connection_lingers(self) -> None:
        """
        A busy connection that closes still counts as busy for close_linger.

        At saturation master asks every smtpd to exit after its session and
        starts fresh ones: the load must not dip while processes are swapped.
        Its transaction ends at once, and it no longer counts as open.
        """
        p = self.smtpd(close_linger=5.0, busy_window=10.0)
        connection = p.connect()
        p.ask(connection, instance="A")
        p.tracker.connection_closed(connection)
        snapshot = p.snapshot()
        assert (snapshot.connections, snapshot.transactions) == (0, 0)
        assert p.watch(4.5, lambda: p.snapshot().busy_connections, 0.5) == {1}
        p.wait(1.0, step=0.5)
        assert p.snapshot().busy_connections == 0
        assert p.stats(connection=connection).concurrency == 0

    def test_closed_idle_connection_does_not_linger(self) -> None:
        """A connection closed after its busy window ended stops counting at once."""
        p = self.smtpd(close_linger=5.0, busy_window=10.0)
        connection = p.connect()
        p.ask(connection)
        p.wait(11)
        p.tracker.connection_closed(connection)
        assert p.snapshot().busy_connections == 0
        assert p.snapshot().connections == 0

    def test_linger_never_outlasts_busy_window(self) -> None:
        """A connection closed near the end of its busy window lingers only to it."""
        p = self.smtpd(close_linger=5.0, busy_window=10.0)
        connection = p.connect()
        p.ask(connection)
        p.wait(8)
        p.tracker.connection_closed(connection)
        assert p.snapshot().busy_connections == 1
        p.wait(2.5, step=0.5)
        assert p.snapshot().busy_connections == 0

    def test_end_of_message_ends_transaction(self) -> None:
        """
        An END-OF-MESSAGE request ends its transaction at once.

        Wired into smtpd_end_of_data_restrictions, Postfix says when the
        message is complete; the process then counts only for the busy
        window, not for the transaction timeout.  The message counts once.
        """
        p = self.smtpd(busy_window=10.0, transaction_timeout=60.0)
        connection = p.connect()
        p.ask(connection, instance="A")
        p.ask(connection, instance="A", state="END-OF-MESSAGE")
        assert p.snapshot().transactions == 0
        assert p.watch(9.5, lambda: p.snapshot().busy_connections, 0.5) == {1}
        p.wait(1.0, step=0.5)
        assert p.snapshot().busy_connections == 0
        assert p.stats(connection=connection).message_rate == pytest.approx(
            1.0
            * 60.0
            / BASE.client_rate_window
            * math.exp(-10.5 / BASE.client_rate_window),
            rel=0.05,
        )

    @pytest.mark.parametrize("instance", ["", "A"])
    def test_close_releases(self, instance: str) -> None:
        """A closed connection stops counting at once: busy, transaction, client."""
        p = self.smtpd()
        closing, staying = p.connect(), p.connect()
        p.ask(closing, A, instance=instance)
        p.ask(staying, B)
        p.close([closing])
        p.tracker.tick()
        snapshot = p.snapshot()
        assert (snapshot.connections, snapshot.busy_connections) == (1, 1)
        assert snapshot.transactions == 0
        assert (p.stats(A).concurrency, p.stats(B).concurrency) == (0, 1)

    def test_close_twice_or_unknown(self) -> None:
        """Closing a connection twice, or one never seen, changes nothing."""
        p = self.smtpd()
        closing, staying = p.connect(), p.connect()
        p.ask(closing, instance="A")
        p.ask(staying, instance="B")
        p.close([closing, closing, 999])
        p.tracker.tick()
        snapshot = p.snapshot()
        assert (snapshot.connections, snapshot.busy_connections) == (1, 1)
        assert snapshot.transactions == 1
        assert p.stats().concurrency == 1

    # -- request rate --------------------------------------------------------

    def test_rate_ignored_without_rate_capacity(self) -> None:
        """With rate_capacity 0 the rate is measured but is not load."""
        p = self.smtpd(capacity=100, rate_capacity=0.0, rate_window=10)
        connection = p.connect()
        assert {p.ask(connection) for _ in range(1000)} == {NORMAL}
        snapshot = p.snapshot()
        assert snapshot.request_rate == pytest.approx(100.0)
        assert snapshot.load_ratio == pytest.approx(0.01)

    @pytest.mark.parametrize(
        ("requests", "level"),
        [(1, NORMAL), (69, NORMAL), (70, ELEVATED), (89, ELEVATED), (90, OVERLOAD)],
    )
    def test_rate_raises_level(self, requests: int, level: int) -> None:
        """
        With rate_capacity set, rate / rate_capacity is load too.

        One busy connection of 100 is no load to speak of; 70 requests in a
        10 s window against 10 per second is 0.7.
        """
        p = self.smtpd(capacity=100, rate_capacity=10.0, rate_window=10)
        connection = p.connect()
        decided = [p.ask(connection) for _ in range(requests)]
        assert decided[-1] == p.level == level
        assert p.snapshot().load_ratio == pytest.approx(max(0.01, requests / 100))

    def test_rate_window_slides(self) -> None:
        """The rate counts the requests of the last rate_window seconds only."""
        p = self.smtpd(rate_window=10)
        connection = p.connect()
        for _ in range(50):
            p.ask(connection)
        p.wait(5)
        for _ in range(50):
            p.ask(connection)
        rate = p.watch(4.5, lambda: round(p.snapshot().request_rate, 9), 0.5)
        assert rate == {10.0}
        p.wait(1.0, step=0.5)
        assert p.snapshot().request_rate == pytest.approx(5.0)
        p.wait(5.0, step=0.5)
        assert p.snapshot().request_rate == 0.0

    def test_rate_level_falls_after_window(self) -> None:
        """A burst raises the level; it falls min_dwell after leaving the window."""
        p = self.smtpd(capacity=100, rate_capacity=10.0, rate_window=10)
        connection = p.connect()
        for _ in range(100):
            p.ask(connection)
        assert p.level == OVERLOAD
        assert p.levels(10 + 30 - 1.5, step=0.5) == {OVERLOAD}
        p.wait(2.0, step=0.5)
        assert p.level == NORMAL

    # -- Postfix's stress=yes ------------------------------------------------

    @pytest.mark.parametrize(
        ("floor", "hold", "level", "active"),
        [
            pytest.param(OVERLOAD, 60.0, OVERLOAD, True, id="overload"),
            pytest.param(ELEVATED, 60.0, ELEVATED, True, id="elevated"),
            pytest.param(NORMAL, 60.0, NORMAL, True, id="ignore"),
            pytest.param(OVERLOAD, 0.0, NORMAL, False, id="no hold"),
        ],
    )
    def test_postfix_stress_floor(
        self, floor: int, hold: float, level: int, active: bool
    ) -> None:
        """
        stress=yes lifts the level at once to postfix_stress_level.

        The floor ``normal`` (POLICYD_POSTFIX_STRESS_LEVEL=ignore) lifts
        nothing; a zero hold holds nothing.  The request is counted either
        way, and it does not change the load ratio.
        """
        p = self.smtpd(postfix_stress_level=floor, postfix_stress_hold=hold)
        assert p.ask(p.connect(), stress=True) == level
        snapshot = p.snapshot()
        assert (snapshot.level, snapshot.postfix_stress) == (level, active)
        assert snapshot.postfix_stress_seen == 1
        assert snapshot.load_ratio == pytest.approx(1 / 20)

    @pytest.mark.parametrize("hold", [1.0, 60.0, 1000.0])
    def test_postfix_stress_hold(self, hold: float) -> None:
        """The floor lasts postfix_stress_hold after the last stress=yes."""
        p = self.smtpd(postfix_stress_hold=hold, min_dwell=0.0)
        p.ask(p.connect(), stress=True)

        def read() -> tuple[int, bool]:
            return p.level, p.snapshot().postfix_stress

        assert p.watch(hold - 0.5, read, 0.5) == {(OVERLOAD, True)}
        p.wait(1.0, step=0.5)
        assert read() == (NORMAL, False)

    def test_postfix_stress_hold_restarts(self) -> None:
        """Each stress=yes request starts the hold again."""
        p = self.smtpd(postfix_stress_hold=60.0, min_dwell=0.0)
        connection = p.connect()
        p.ask(connection, stress=True)
        p.wait(50)
        p.ask(connection, stress=True)
        assert p.levels(59.5, step=0.5) == {OVERLOAD}
        p.wait(1.0, step=0.5)
        assert p.level == NORMAL

    def test_postfix_stress_then_dwell(self) -> None:
        """Once the hold ends the level falls like any other: after min_dwell."""
        p = self.smtpd(postfix_stress_hold=60.0, min_dwell=30.0)
        p.ask(p.connect(), stress=True)
        assert p.levels(60 + 30 - 1.5, step=0.5) == {OVERLOAD}
        p.wait(2.0, step=0.5)
        assert p.level == NORMAL

    def test_postfix_stress_is_a_floor(self) -> None:
        """
        Under an elevated floor the load still decides above it.

        The load raises the level to overload; when the load goes, the level
        falls back to the floor, not below it, while the hold lasts.
        """
        p = self.steady(postfix_stress_level=ELEVATED, postfix_stress_hold=600.0)
        assert p.ask(p.connect(), stress=True) == ELEVATED
        connections = p.busy(18)
        assert p.level == OVERLOAD
        p.shed(connections)
        assert p.levels(120) == {OVERLOAD, ELEVATED}
        assert p.level == ELEVATED

    @pytest.mark.parametrize(
        ("busy", "level"),
        [(1, NORMAL), (9, NORMAL), (10, OVERLOAD), (13, OVERLOAD)],
    )
    def test_postfix_stress_needs_load(self, busy: int, level: int) -> None:
        """
        With postfix_stress_min_load, stress=yes counts only under that load.

        After a flood, master keeps starting processes with stress=yes for
        1000 s; with the processes idle that must not hold the level up.
        Capacity 20, minimum 0.5: the floor needs 10 busy processes.
        """
        p = self.steady(postfix_stress_min_load=0.5)
        connections = p.busy(busy - 1)
        assert p.ask(p.connect(), stress=True) == level
        assert p.snapshot().postfix_stress  # seen, whether it counted or not
        assert len(connections) == busy - 1

    def test_postfix_stress_lapses_with_the_load(self) -> None:
        """The floor holds while the load does, and falls with it."""
        p = self.steady(postfix_stress_min_load=0.5, min_dwell=0.0)
        connections = p.busy(11)
        p.ask(connections[0], stress=True)
        assert p.level == OVERLOAD
        p.shed(connections[:5])  # 6 of 20: below 0.5
        p.wait(1)
        assert p.level == NORMAL
        assert p.snapshot().postfix_stress

    # -- sessions hung up by a refusal -----------------------------------------

    def test_hung_up_sessions_count_once_per_client(self) -> None:
        """
        Processes whose session a 421 ended count once per refused client.

        One client hammering at its refusal over every process is one
        client's demand, not a full house; distinct clients each count.
        """
        p = self.steady()
        for connection in p.busy(12, A):
            p.tracker.record_refusal(request(connection, A), hangup=True)
        assert p.snapshot().busy_connections == 1
        assert p.stats(A).concurrency == 1
        assert [r.client_address for r in p.tracker.busy_requests()] == [A]
        for n, connection in enumerate(p.busy(12, B)):
            p.tracker.record_refusal(request(connection, f"198.51.100.{n}"), True)
        # The refusals named other clients than the ones asking: not hung up.
        assert p.snapshot().busy_connections == 13

    def test_distinct_refused_clients_are_load(self) -> None:
        """Eighteen bots refused with a hang-up on eighteen processes: overload."""
        p = self.steady()
        for n in range(18):
            bot = f"203.0.113.{n}"
            connection = p.connect()
            p.ask(connection, bot, state="CONNECT")
            p.tracker.record_refusal(request(connection, bot), hangup=True)
        assert p.snapshot().busy_connections == 18
        assert p.level == OVERLOAD

    def test_next_request_counts_in_full(self) -> None:
        """
        A hung-up process that asks again serves someone: it counts again.

        The client's other hung-up connections then count for nothing: it
        is one client in one session, retrying.
        """
        p = self.steady()
        connections = p.busy(4, A)
        for connection in connections:
            p.tracker.record_refusal(request(connection, A), hangup=True)
        assert p.snapshot().busy_connections == 1
        p.ask(connections[0], B, state="CONNECT")
        assert p.snapshot().busy_connections == 2
        p.ask(connections[1], A, state="CONNECT")
        assert p.snapshot().busy_connections == 2
        assert (p.stats(A).concurrency, p.stats(B).concurrency) == (1, 1)
        p.ask(connections[2], A, state="CONNECT")
        assert p.snapshot().busy_connections == 3
        assert p.stats(A).concurrency == 2

    def test_refusal_without_hangup_counts_in_full(self) -> None:
        """A 450 leaves the session on: the process is still held."""
        p = self.steady()
        for connection in p.busy(4, A):
            p.tracker.record_refusal(request(connection, A), hangup=False)
        assert p.snapshot().busy_connections == 4

    def test_hammering_refused_clients_let_the_level_fall(self) -> None:
        """
        Two clients retrying at once after each 421 do not hold overload up.

        They touch every process within the busy window, but each is one
        client: the load is theirs, 2 of 20, and the level falls after the
        dwell.  (Without the hang-up rule, every process read busy forever.)
        """
        p = self.smtpd(min_dwell=30.0, busy_window=10.0)
        connections = [p.connect() for _ in range(20)]
        for connection in connections[:18]:
            p.ask(connection, f"203.0.113.{connection}", state="CONNECT")
        assert p.level == OVERLOAD
        for second in range(60):
            for n, connection in enumerate(connections):
                client = (A, B)[n % 2]
                p.ask(connection, client, state="CONNECT")
                p.tracker.record_refusal(request(connection, client), hangup=True)
            p.wait(1)
            if second >= 42:
                assert p.level == NORMAL, second

    def test_postfix_stress_seen_counts_requests(self) -> None:
        """postfix_stress_seen counts each request with stress=yes, and only those."""
        p = self.smtpd()
        first, second = p.connect(), p.connect()
        for connection, stress in [(first, True), (second, False), (second, True)]:
            p.ask(connection, stress=stress)
            p.ask(connection)
        p.ask(first, stress=True)
        assert p.snapshot().postfix_stress_seen == 3

    # -- per client ----------------------------------------------------------

    def test_concurrency_counts_busy_connections(self) -> None:
        """A client's concurrency is the busy connections it holds, not requests."""
        p = self.smtpd()
        a1, a2, b1 = p.connect(), p.connect(), p.connect()
        for _ in range(5):
            p.ask(a1, A, instance="x")
        p.ask(a2, A)
        p.ask(b1, B)
        assert (p.stats(A).concurrency, p.stats(B).concurrency) == (2, 1)

    def test_concurrency_moves_with_the_process(self) -> None:
        """When an smtpd process serves its next client, the previous one lets go."""
        p = self.smtpd()
        first, second = p.connect(), p.connect()
        p.ask(first, A)
        p.ask(second, A)
        p.ask(first, B, state="CONNECT")
        assert (p.stats(A).concurrency, p.stats(B).concurrency) == (1, 1)
        p.ask(first, A, state="CONNECT")
        assert (p.stats(A).concurrency, p.stats(B).concurrency) == (2, 0)
        assert p.snapshot().busy_connections == 2

    def test_concurrency_released(self) -> None:
        """A client lets go of a process when it goes idle and when it closes."""
        p = self.smtpd(busy_window=10.0, transaction_timeout=60.0)
        quick, sending = p.connect(), p.connect()
        p.ask(quick, A)
        p.ask(sending, A, instance="x")
        p.wait(10.5, step=0.5)
        assert p.stats(A).concurrency == 1
        p.close([sending])
        p.tracker.tick()
        assert p.stats(A).concurrency == 0

    @pytest.mark.parametrize(("state", "starts_session"), SESSION_STATES)
    def test_session_rate(self, state: str, starts_session: bool) -> None:
        """
        Requests at CONNECT or XCLIENT start a session; no other state does.

        With client_rate_window 60, three sessions just now are three per
        minute.
        """
        p = self.smtpd(client_rate_window=60.0)
        connection = p.connect()
        for _ in range(3):
            p.ask(connection, state=state)
        stats = p.stats()
        assert stats.session_rate == pytest.approx(3.0 if starts_session else 0.0)
        assert stats.message_rate == 0.0

    def test_message_rate(self) -> None:
        """Every new instance of a client is a message, on any connection."""
        p = self.smtpd(client_rate_window=60.0)
        first, second = p.connect(), p.connect()
        for instance in ["1", "1", "2", "3"]:
            p.ask(first, A, instance=instance)
        for instance in ["9", "8"]:
            p.ask(second, A, instance=instance)
        p.ask(second, B, instance="7")
        assert p.stats(A).message_rate == pytest.approx(5.0)
        assert p.stats(B).message_rate == pytest.approx(1.0)
        assert p.stats(A).session_rate == 0.0

    @pytest.mark.parametrize(
        ("window", "after"),
        [(60.0, 0.0), (60.0, 30.0), (60.0, 60.0), (60.0, 120.0), (10.0, 10.0)],
    )
    def test_rates_decay(self, window: float, after: float) -> None:
        """
        Sessions, messages and refusals decay by e^(-t / client_rate_window).

        The rates are per minute, so one session just now with a 10 s window
        reads 6 per minute; refusals are a decayed count.
        """
        p = self.smtpd(client_rate_window=window)
        connection = p.connect()
        p.ask(connection, state="CONNECT")
        p.ask(connection, instance="x")
        p.refuse()
        p.wait(after)
        decay = math.exp(-after / window)
        stats = p.stats()
        assert stats.session_rate == pytest.approx(decay * 60 / window)
        assert stats.message_rate == pytest.approx(decay * 60 / window)
        assert stats.refusals == pytest.approx(decay)
        assert stats.since_refusal == pytest.approx(after)

    @pytest.mark.parametrize(
        ("window", "per_minute"),
        [(10.0, 10.0), (10.0, 60.0), (60.0, 2.0), (60.0, 10.0), (300.0, 60.0)],
    )
    def test_rates_per_minute(self, window: float, per_minute: float) -> None:
        """A client at a steady N sessions and messages a minute reads about N."""
        p = self.smtpd(client_rate_window=window)
        connection = p.connect()
        interval = 60 / per_minute
        for n in range(math.ceil(10 * window / interval) + 1):
            if n:
                p.clock.advance(interval)
            p.ask(connection, state="CONNECT")
            p.ask(connection, instance=str(n))
        p.clock.advance(interval / 2)  # half way to the next session
        stats = p.stats()
        assert stats.session_rate == pytest.approx(per_minute, rel=0.05)
        assert stats.message_rate == pytest.approx(per_minute, rel=0.05)

    def test_refusals(self) -> None:
        """
        record_refusal starts since_refusal at 0; refusals add up and decay.

        A client never refused has since_refusal None, whether it was seen or
        not; a refusal is remembered for a client never seen.
        """
        p = self.smtpd(client_rate_window=60.0)
        assert p.stats(A).since_refusal is None
        p.ask(p.connect(), A)
        assert (p.stats(A).since_refusal, p.stats(A).refusals) == (None, 0.0)
        p.refuse(A)
        assert (p.stats(A).since_refusal, p.stats(A).refusals) == (0.0, 1.0)
        p.wait(5)
        assert p.stats(A).since_refusal == 5.0
        assert p.stats(A).refusals == pytest.approx(math.exp(-5 / 60))
        p.refuse(A)
        assert p.stats(A).since_refusal == 0.0
        assert p.stats(A).refusals == pytest.approx(1 + math.exp(-5 / 60))
        p.refuse(B)
        assert (p.stats(B).since_refusal, p.stats(B).concurrency) == (0.0, 0)
        assert p.snapshot().tracked_clients == 2

    def test_unknown_client_reads_zero(self) -> None:
        """Asking about a client never seen reads zeros and remembers nothing."""
        p = self.smtpd()
        p.ask(p.connect(), A)
        assert p.stats("198.51.100.7") == ClientStats(
            key="198.51.100.7",
            concurrency=0,
            session_rate=0.0,
            message_rate=0.0,
            refusals=0.0,
            since_refusal=None,
        )
        assert p.snapshot().tracked_clients == 1

    @pytest.mark.parametrize(("ipv4", "ipv6", "one", "other", "same"), GROUPS)
    def test_grouped_by_prefix(
        self, ipv4: int, ipv6: int, one: str, other: str, same: bool
    ) -> None:
        """Clients are counted per address prefix; IPv4 and IPv6 never mix."""
        p = self.smtpd(ipv4_prefix=ipv4, ipv6_prefix=ipv6)
        p.ask(p.connect(), one, state="CONNECT")
        p.ask(p.connect(), other, state="CONNECT")
        stats = p.stats(one)
        assert stats.concurrency == (2 if same else 1)
        assert stats.session_rate == pytest.approx(2.0 if same else 1.0)
        assert (stats.key == p.stats(other).key) is same
        assert p.snapshot().tracked_clients == (1 if same else 2)

    @pytest.mark.parametrize(("ipv4", "ipv6", "address", "key"), KEYS)
    def test_client_key(self, ipv4: int, ipv6: int, address: str, key: str) -> None:
        """ClientStats.key names the prefix a client is counted under."""
        p = self.smtpd(ipv4_prefix=ipv4, ipv6_prefix=ipv6)
        assert p.stats(address).key == key
        p.ask(p.connect(), address)
        assert p.stats(address).key == key

    @pytest.mark.parametrize("address", NOT_ADDRESSES)
    def test_not_an_address_is_unknown(self, address: str) -> None:
        """Anything but an IP address is counted as the one client ``unknown``."""
        p = self.smtpd()
        p.refuse("unknown")
        p.ask(p.connect(), address)
        stats = p.stats(address)
        assert (stats.key, stats.concurrency, stats.since_refusal) == (
            "unknown",
            1,
            0.0,
        )
        assert p.snapshot().tracked_clients == 1

    # -- the bounded client table --------------------------------------------

    def test_botnet_stays_within_bound(self) -> None:
        """
        10 times max_tracked_clients addresses never grow the table past it.

        Every client forgotten is counted, the most recent are remembered,
        the first are forgotten (here; a shared store still knows them).
        """
        p = self.smtpd(max_tracked_clients=20)
        connection = p.connect()
        bots = [f"198.18.{n // 250}.{n % 250 + 1}" for n in range(200)]
        for bot in bots:
            p.ask(connection, bot, state="CONNECT")
            assert p.snapshot().tracked_clients <= 20
        snapshot = p.snapshot()
        assert (snapshot.tracked_clients, snapshot.evictions) == (20, 180)
        remembered = [p.stats(bot).session_rate > 0 for bot in bots]
        if self.shared:
            assert remembered == [True] * 200
        else:
            assert remembered == [False] * 180 + [True] * 20

    def test_least_recently_seen_forgotten_first(self) -> None:
        """
        A client seen again moves to the back of the line for eviction.

        All clients share one smtpd process, so only the latest holds it.
        """
        p = self.smtpd(max_tracked_clients=5)
        connection = p.connect()
        clients = [f"192.0.2.{n}" for n in range(1, 8)]
        again = [clients[0], clients[4]]  # the first is seen again, then let go
        for client in [*clients[:5], *again, clients[5], clients[6]]:
            p.ask(connection, client, state="CONNECT")
        remembered = [p.stats(client).session_rate > 0 for client in clients]
        if self.shared:
            assert remembered == [True] * 7
        else:
            assert remembered == [True, False, False, True, True, True, True]
        assert p.snapshot().evictions == 2

    def test_clients_holding_a_process_are_kept(self) -> None:
        """A client that holds an smtpd process is not forgotten while others can be."""
        p = self.steady(max_tracked_clients=5)
        holder = p.connect()
        p.ask(holder, A, state="CONNECT")
        connection = p.connect()
        for n in range(50):
            p.ask(connection, f"198.51.100.{n + 1}", state="CONNECT")
        stats = p.stats(A)
        assert stats.concurrency == 1
        assert stats.session_rate > 0
        snapshot = p.snapshot()
        assert (snapshot.tracked_clients, snapshot.evictions) == (5, 46)

    def test_botnet_holding_processes(self) -> None:
        """
        The bound holds even when every client holds an smtpd process.

        Each request is still accounted to its own client, and the load
        counts every busy connection whichever clients were forgotten.  When
        the connections go idle, no remembered client is left holding any.
        """
        p = self.smtpd(max_tracked_clients=10, capacity=100, busy_window=10.0)
        bots = [f"198.18.0.{n + 1}" for n in range(100)]
        for bot in bots:
            p.ask(p.connect(), bot, state="CONNECT")
            assert p.snapshot().tracked_clients <= 10
            assert p.stats(bot).concurrency == 1
        snapshot = p.snapshot()
        assert (snapshot.busy_connections, snapshot.level) == (100, OVERLOAD)
        assert snapshot.evictions == 90
        p.wait(10.5, step=0.5)
        assert p.snapshot().busy_connections == 0
        assert {p.stats(bot).concurrency for bot in bots} == {0}

    # -- snapshot and log ----------------------------------------------------

    def test_snapshot(self) -> None:
        """snapshot() reports every count at one moment, as a value."""
        p = self.smtpd(capacity=20, rate_window=10)
        first, second, _idle = p.connect(), p.connect(), p.connect()
        p.ask(first, A, state="CONNECT")
        p.ask(second, B, instance="x", stress=True)
        snapshot = p.snapshot()
        assert snapshot.load_ratio == pytest.approx(2 / 20)
        assert snapshot.request_rate == pytest.approx(2 / 10)
        assert attrs.evolve(snapshot, load_ratio=0.1, request_rate=0.2) == LoadSnapshot(
            level=OVERLOAD,
            load_ratio=0.1,
            connections=3,
            busy_connections=2,
            transactions=1,
            request_rate=0.2,
            postfix_stress=True,
            tracked_clients=2,
            postfix_stress_seen=1,
            evictions=0,
            transitions={"normal": 0, "elevated": 0, "overload": 1},
            host=LOCAL_HOST,
            capacity=BASE.capacity,
        )
        assert LEVEL_NAMES[snapshot.level] == "overload"
        p.busy(20)
        p.wait(100)
        assert snapshot.transitions == {"normal": 0, "elevated": 0, "overload": 1}
        assert snapshot.connections == 3

    def test_level_changes_logged(self) -> None:
        """Each change of level, and nothing else, logs one stress_level event."""
        p = self.steady()
        with capture_logs() as logs:
            connections = p.busy(18)
            for _ in range(10):
                p.ask(connections[0])
            p.wait(10)
            p.shed(connections)
            p.wait(40)
        assert level_changes(logs) == [
            ("normal", "elevated"),
            ("elevated", "overload"),
            ("overload", "normal"),
        ]
        events = events_named(logs, "stress_level")
        assert {e["log_level"] for e in events} == {LogLevel.info}

    # -- invariants ----------------------------------------------------------

    @settings(
        max_examples=150,
        deadline=None,
        # Every backend's test class runs this same method: several
        # executors are the point of a contract.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
    )
    @given(operations=st.lists(_OPERATION, max_size=60))
    def test_counts_stay_consistent(
        self, operations: list[tuple[str, int, str, str, str, float]]
    ) -> None:
        """
        Whatever Postfix does, the counts stay consistent.

        Transactions never exceed busy connections, which never exceed open
        ones; the clients' concurrency adds up to the busy connections (no
        client is forgotten here); nothing goes negative; and once every
        connection has closed, nothing is busy.
        """
        p = self.smtpd(ipv4_prefix=24)
        clients = ["192.0.2.1", "192.0.2.2", "192.0.2.200", "2001:db8::1", ""]
        groups = ["192.0.2.1", "2001:db8::1", ""]  # one address per prefix
        open_connections: set[int] = set()
        for kind, connection, client, instance, state, seconds in operations:
            if kind == "ask":
                if connection not in open_connections:
                    p.tracker.connection_opened(connection)
                    open_connections.add(connection)
                p.ask(connection, client, instance=instance, state=state)
            elif kind == "close":
                p.tracker.connection_closed(connection)
                open_connections.discard(connection)
            elif kind == "refuse":
                p.refuse(client)
            elif kind == "hangup":
                p.tracker.record_refusal(request(connection, client), hangup=True)
            else:
                p.clock.advance(seconds)
                p.tracker.tick()
            snapshot = p.snapshot()
            assert snapshot.level in (NORMAL, ELEVATED, OVERLOAD)
            assert 0 <= snapshot.transactions <= snapshot.busy_connections
            assert snapshot.busy_connections <= snapshot.connections
            assert snapshot.connections == len(open_connections)
            concurrency = [p.stats(group).concurrency for group in groups]
            assert min(concurrency) >= 0
            assert sum(concurrency) == snapshot.busy_connections
            assert snapshot.tracked_clients <= len(groups)
            assert {p.stats(c).key for c in clients} == {p.stats(g).key for g in groups}
        p.close(sorted(open_connections))
        p.tracker.tick()
        snapshot = p.snapshot()
        assert (snapshot.busy_connections, snapshot.transactions) == (0, 0)
        assert [p.stats(group).concurrency for group in groups] == [0, 0, 0]
