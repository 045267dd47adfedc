"""PolicyFactory and PolicyServer: shared state, listening, graceful stop.

The reactor is a `MemoryReactorClock`: listening records the call instead of
binding, and time only moves when a test advances it.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import pytest
from helpers import (
    DUNNO_REPLY,
    IDLE_SNAPSHOT,
    MINIMAL,
    TYPICAL,
    Client,
    DeferredDecider,
    FixedDecider,
    FlushingTransport,
    Harness,
    RecordingTracker,
    RecordingTransport,
    capture_logs,
    encode_request,
    events_named,
)
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import ServerFactory
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from policyd.actions import DUNNO, Action
from policyd.config import Config, load
from policyd.decision import Decider, PolicyDecider, TrackingDecider
from policyd.load import ELEVATED, NORMAL, OVERLOAD, LoadSettings, MemoryLoadTracker
from policyd.policy import SIGNALS, PolicySettings
from policyd.protocol import Limits
from policyd.request import PolicyRequest
from policyd.server import (
    CLOSE_TIMEOUT,
    SWEEP_INTERVAL,
    CannotListen,
    PolicyServer,
    load_settings,
    policy_settings,
)

T = TypeVar("T")

BUSY_REPLY = b"action=DEFER_IF_PERMIT Service busy\n\n"


@pytest.fixture
def logs() -> Iterator[EventLoggingObserver]:
    """Every log event emitted during the test."""
    with capture_logs() as observer:
        yield observer


def fired(d: Deferred[T]) -> bool:
    """Whether *d* has fired (a call, so mypy does not narrow it between asserts)."""
    return d.called


def result_of(d: Deferred[T]) -> T:
    """The result *d* has already fired with (re-raising a failure)."""
    results: list[T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "the Deferred has not fired"
    return results[0]


def failure_of(d: Deferred[T]) -> Failure:
    """The failure *d* has already fired with."""
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the Deferred has not failed"
    return failures[0]


@implementer(IListeningPort)
class RecordingPort:
    """A listening port that remembers whether it was stopped.

    *stop_result* is what ``stopListening`` returns: None (as a port that
    stops at once may) or a Deferred (as a real port does).
    """

    def __init__(self, address: IAddress, stop_result: Deferred[None] | None) -> None:
        self.address = address
        self.stop_result = stop_result
        self.stopped = False

    def startListening(self) -> None:
        """Nothing to do: the reactor 'listened' already."""

    def stopListening(self) -> Deferred[None] | None:
        """Record the stop."""
        self.stopped = True
        return self.stop_result

    def getHost(self) -> IAddress:
        """The address it pretends to listen on."""
        return self.address


class RecordingReactor(MemoryReactorClock):
    """A memory reactor whose ports record stops, and that can refuse to listen."""

    def __init__(
        self, stop_result: Callable[[], Deferred[None] | None] = lambda: None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.stop_result = stop_result
        self.ports: list[RecordingPort] = []
        self.refuse: set[int | str] = set()

    def _port(self, address: IAddress) -> RecordingPort:
        port = RecordingPort(address, self.stop_result())
        self.ports.append(port)
        return port

    def listenTCP(
        self, port: int, factory: ServerFactory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        """Record the call; refuse ports in `refuse` as if already in use."""
        if port in self.refuse:
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "busy"))
        super().listenTCP(port, factory, backlog, interface)  # type: ignore[no-untyped-call]
        return self._port(IPv4Address("TCP", interface or "0.0.0.0", port))

    def listenUNIX(
        self,
        address: str,
        factory: ServerFactory,
        backlog: int = 50,
        mode: int = 0o666,
        wantPID: int = 0,
    ) -> IListeningPort:
        """Record the call; refuse paths in `refuse`."""
        if address in self.refuse:
            raise CannotListenError(address, 0, OSError(errno.EACCES, "denied"))
        super().listenUNIX(address, factory, backlog, mode, wantPID)  # type: ignore[no-untyped-call]
        return self._port(UNIXAddress(address))


def make_config(**settings: str) -> Config:
    """A Config with TCP policy and metrics listeners, plus *settings*."""
    env = {
        "POLICYD_LISTEN": "tcp:10040:interface=127.0.0.1",
        "POLICYD_METRICS_LISTEN": "tcp:10041:interface=127.0.0.1",
    }
    env.update({f"POLICYD_{name.upper()}": value for name, value in settings.items()})
    return load(env)


def started(
    reactor: MemoryReactorClock,
    decider: Decider | None = None,
    **settings: str,
) -> PolicyServer:
    """A PolicyServer on *reactor*, started."""
    server = PolicyServer(
        make_config(**settings), reactor, CollectorRegistry(), decider
    )
    result_of(Deferred.fromCoroutine(server.start()))
    return server


# --------------------------------------------------------------------------


class TestPolicyFactory:
    """The factory tracks its connections and knows when they are all answered."""

    def test_tracks_connections(self) -> None:
        """Each connection gets a new id and is tracked until it is lost."""
        harness = Harness()
        a, b = harness.connect(), harness.connect()
        assert (a.protocol.connection_id, b.protocol.connection_id) == (1, 2)
        assert harness.factory.protocols == {a.protocol, b.protocol}
        a.drop()
        assert harness.factory.protocols == {b.protocol}

    def test_drain_when_quiet(self) -> None:
        """drain() fires at once when nothing is in flight."""
        harness = Harness()
        harness.connect().send(MINIMAL)
        assert result_of(harness.factory.drain()) is None

    def test_drain_waits(self) -> None:
        """drain() fires only when the last decision in flight is answered."""
        decider = DeferredDecider()
        harness = Harness(decider)
        a, b = harness.connect(), harness.connect()
        a.send(MINIMAL)
        b.send(MINIMAL * 2)
        drained = harness.factory.drain()
        decider.pending[0].callback(DUNNO)
        decider.pending[1].callback(DUNNO)
        assert not fired(drained)  # b's second request is now in flight
        decider.pending[2].callback(DUNNO)
        assert fired(drained)
        assert (a.writes, b.writes) == ([DUNNO_REPLY], [DUNNO_REPLY] * 2)

    def test_drain_on_connection_lost(self) -> None:
        """A busy connection that goes away no longer holds up drain()."""
        decider = DeferredDecider()
        harness = Harness(decider)
        client = harness.connect()
        client.send(MINIMAL)
        drained = harness.factory.drain()
        client.drop()
        assert fired(drained)

    def test_drain_on_timeout(self) -> None:
        """A decision that times out still lets drain() fire."""
        decider = DeferredDecider()
        harness = Harness(decider, decision_timeout=1.0)
        harness.connect().send(MINIMAL)
        drained = harness.factory.drain()
        harness.clock.advance(1.0)
        assert fired(drained)

    def test_closed(self) -> None:
        """closed() fires once every closing connection has gone.

        A connection that is not closing (here: busy) does not hold it up.
        """
        harness = Harness(DeferredDecider())
        first, second = FlushingTransport(), FlushingTransport()
        a = Client(harness.factory, first)
        b = Client(harness.factory, second)
        busy = harness.connect()
        busy.send(MINIMAL)
        assert fired(harness.factory.closed())  # nothing is closing yet
        harness.factory.close_idle()
        closed = harness.factory.closed()
        assert not fired(closed)
        first.flushed()
        assert not fired(closed)
        second.flushed()
        assert fired(closed)
        assert (a.is_closed(), b.is_closed(), busy.is_closed()) == (True, True, False)

    def test_close_idle(self) -> None:
        """close_idle() closes connections with nothing in flight, and only those."""
        decider = DeferredDecider()
        harness = Harness(decider)
        answered, partial, never, busy = (harness.connect() for _ in range(4))
        answered.send(MINIMAL)
        decider.pending[0].callback(DUNNO)
        partial.send(MINIMAL[:5])
        busy.send(MINIMAL)
        harness.factory.close_idle()
        assert [c.is_closed() for c in (answered, partial, never, busy)] == [
            True,
            True,
            True,
            False,
        ]

    def test_sweep_closes_several(self) -> None:
        """One sweep closes every stalled or idle connection, whatever their number."""
        harness = Harness(request_timeout=10, idle_timeout=20)
        stalled = [harness.connect() for _ in range(3)]
        for client in stalled:
            client.send(MINIMAL[:5])
        harness.clock.advance(10)
        fresh = harness.connect()
        harness.factory.sweep()
        assert all(c.is_closed() for c in stalled)
        assert not fresh.is_closed()
        assert harness.factory.protocols == {fresh.protocol}


class TestWiring:
    """PolicyServer builds its factory from the configuration."""

    def test_from_config(self) -> None:
        """Limits, timeouts and the fallback come from the Config."""
        config = make_config(
            max_line_length="100",
            max_attributes="9",
            max_request_bytes="1000",
            decision_timeout="250ms",
            request_timeout="5s",
            idle_timeout="2m",
            fallback_action="DEFER_IF_PERMIT Service busy",
        )
        server = PolicyServer(config, MemoryReactorClock(), CollectorRegistry())
        factory = server.factory
        assert factory.limits == Limits(100, 9, 1000)
        assert (
            factory.decision_timeout,
            factory.request_timeout,
            factory.idle_timeout,
        ) == (0.25, 5.0, 120.0)
        assert factory.fallback == Action.parse("DEFER_IF_PERMIT Service busy")
        # Without a decider passed in, policyd decides (TestPolicyWiring).
        assert isinstance(factory.decider, PolicyDecider)
        assert factory.decider.tracker is server.tracker
        assert factory.log_requests is False

    @pytest.mark.parametrize(
        ("level", "expected"), [("debug", True), ("info", False), ("warn", False)]
    )
    def test_log_requests(self, level: str, expected: bool) -> None:
        """Requests are logged one by one only at log level debug."""
        server = PolicyServer(
            make_config(log_level=level), MemoryReactorClock(), CollectorRegistry()
        )
        assert server.factory.log_requests is expected

    def test_decider_used(self) -> None:
        """The decider passed in answers the requests."""
        reactor = MemoryReactorClock()
        server = started(reactor, FixedDecider(Action.parse("REJECT no")))
        client = Client(server.factory)
        client.send(MINIMAL)
        assert client.writes == [b"action=REJECT no\n\n"]

    def test_metrics_registry(self) -> None:
        """The server's metrics live on the registry passed in."""
        registry = CollectorRegistry()
        server = PolicyServer(make_config(), MemoryReactorClock(), registry)
        Client(server.factory).send(MINIMAL)
        assert registry.get_sample_value("policyd_requests_total", {"action": "DUNNO"})
        assert registry.get_sample_value("policyd_active_connections") == 1


class TestStart:
    """start(): every listener, or none."""

    def test_listens(self, logs: EventLoggingObserver) -> None:
        """Each configured endpoint and the metrics endpoint are listened on."""
        reactor = MemoryReactorClock()
        server = started(
            reactor,
            listen="tcp:10040:interface=127.0.0.1 unix:/run/policyd/p.sock:mode=660",
        )
        assert reactor.tcpServers == [
            (10040, server.factory, 50, "127.0.0.1"),
            (10041, server.site, 50, "127.0.0.1"),
        ]
        assert isinstance(server.site, Site)
        assert [(a, f, m) for a, f, _, m, _ in reactor.unixServers] == [
            ("/run/policyd/p.sock", server.factory, 0o660)
        ]
        listening = events_named(logs, "listening")
        assert [(e["endpoint"], e["address"], e["port"]) for e in listening] == [
            ("tcp:10040:interface=127.0.0.1", "0.0.0.0", 10040),
            ("unix:/run/policyd/p.sock:mode=660", "/run/policyd/p.sock", None),
        ]
        assert all(e["log_level"] == LogLevel.info for e in listening)
        [metrics] = events_named(logs, "metrics_listening")
        assert metrics["endpoint"] == "tcp:10041:interface=127.0.0.1"
        assert server.health() == (True, "ok")

    def test_no_metrics(self, logs: EventLoggingObserver) -> None:
        """With metrics_listen=none only the policy endpoints are listened on."""
        reactor = MemoryReactorClock()
        server = started(reactor, metrics_listen="none")
        assert reactor.tcpServers == [(10040, server.factory, 50, "127.0.0.1")]
        assert server.metrics_port is None
        assert events_named(logs, "metrics_listening") == []
        assert server.health() == (True, "ok")

    def test_health_before_start(self) -> None:
        """A server that is not listening yet is not healthy."""
        server = PolicyServer(make_config(), MemoryReactorClock(), CollectorRegistry())
        assert server.health() == (False, "not listening")

    def test_sweeper(self) -> None:
        """Once started, stalled requests are swept without any explicit call."""
        reactor = MemoryReactorClock()
        server = started(reactor, request_timeout="3s")
        client = Client(server.factory)
        client.send(MINIMAL[:5])
        reactor.advance(2 * SWEEP_INTERVAL)
        assert not client.is_closed()
        reactor.advance(SWEEP_INTERVAL)
        assert client.is_closed()

    @pytest.mark.parametrize(
        ("refused", "listen", "stopped", "variable"),
        [
            (
                "/run/p.sock",
                "tcp:10040:interface=127.0.0.1 unix:/run/p.sock",
                1,
                "POLICYD_LISTEN",
            ),
            (10050, "tcp:10040:interface=127.0.0.1 tcp:10050", 1, "POLICYD_LISTEN"),
            (10040, "tcp:10040:interface=127.0.0.1 tcp:10050", 0, "POLICYD_LISTEN"),
            (
                10041,
                "tcp:10040:interface=127.0.0.1 tcp:10050",
                2,
                "POLICYD_METRICS_LISTEN",
            ),
        ],
        ids=["second unix", "second tcp", "first", "metrics"],
    )
    def test_listen_failure(
        self, refused: int | str, listen: str, stopped: int, variable: str
    ) -> None:
        """A listener that fails closes the ones already open and raises.

        The error names the variable whose endpoint failed, and keeps
        Twisted's own reason.
        """
        reactor = RecordingReactor()
        reactor.refuse.add(refused)
        server = PolicyServer(make_config(listen=listen), reactor, CollectorRegistry())
        d = Deferred.fromCoroutine(server.start())
        failure = failure_of(d)
        assert failure.check(CannotListen)
        assert str(failure.value).startswith(f"{variable}: cannot listen on ")
        assert failure.value is not None
        assert isinstance(failure.value.__cause__, CannotListenError)
        assert len(reactor.ports) == stopped
        assert all(p.stopped for p in reactor.ports)
        assert (server.ports, server.metrics_port) == ([], None)
        assert server.health() == (False, "not listening")
        assert reactor.getDelayedCalls() == []  # no sweeper left behind


class TestStop:
    """stop(): stop listening, answer what is in flight, close."""

    @pytest.mark.parametrize(
        "kind", ["memory reactor", "stopListening returns None", "returns a Deferred"]
    )
    def test_idle(self, kind: str, logs: EventLoggingObserver) -> None:
        """With nothing in flight, stop() stops listening and closes at once.

        A port's stopListening may return None or a Deferred (both are
        IListeningPort); MemoryReactor's own fake ports return None.
        """
        reactor: MemoryReactorClock
        if kind == "memory reactor":
            reactor = MemoryReactorClock()
        elif kind == "stopListening returns None":
            reactor = RecordingReactor()
        else:
            reactor = RecordingReactor(lambda: succeed(None))
        server = started(reactor)
        answered, never = Client(server.factory), Client(server.factory)
        answered.send(MINIMAL)
        d = Deferred.fromCoroutine(server.stop())
        result_of(d)
        assert answered.is_closed()
        assert never.is_closed()
        assert answered.writes == [DUNNO_REPLY]
        if isinstance(reactor, RecordingReactor):
            assert [p.stopped for p in reactor.ports] == [True, True]
        assert server.health() == (False, "stopping")
        assert reactor.getDelayedCalls() == []  # the sweeper is stopped
        assert [
            e["event"] for e in logs if e.get("event") in ("stopping", "stopped")
        ] == [
            "stopping",
            "stopped",
        ]

    def test_waits_for_stop_listening(self) -> None:
        """stop() does not finish before the ports have stopped listening."""
        stopping: Deferred[None] = Deferred()
        reactor = RecordingReactor(lambda: stopping)
        server = started(reactor)
        d = Deferred.fromCoroutine(server.stop())
        assert not fired(d)
        stopping.callback(None)
        assert fired(d)
        result_of(d)

    def test_answers_in_flight(self) -> None:
        """stop() answers requests in flight before it closes their connections."""
        decider = DeferredDecider()
        reactor = RecordingReactor()
        server = started(reactor, decider)
        client = Client(server.factory)
        client.send(MINIMAL)
        d = Deferred.fromCoroutine(server.stop())
        assert not fired(d)
        policy_port, metrics_port = reactor.ports
        assert policy_port.stopped  # no new connections while draining
        assert not client.is_closed()
        assert server.health() == (False, "stopping")
        decider.pending[0].callback(DUNNO)
        assert client.writes == [DUNNO_REPLY]
        assert client.is_closed()
        assert metrics_port.stopped
        result_of(d)

    def test_in_flight_times_out(self) -> None:
        """A decision that never fires gets the fallback at decision_timeout."""
        decider = DeferredDecider()
        reactor = MemoryReactorClock()
        server = started(
            reactor,
            decider,
            decision_timeout="1s",
            fallback_action="DEFER_IF_PERMIT Service busy",
        )
        client = Client(server.factory)
        client.send(MINIMAL)
        d = Deferred.fromCoroutine(server.stop())
        reactor.advance(0.999)
        assert not fired(d)
        reactor.advance(0.001)
        assert client.writes == [BUSY_REPLY]
        assert client.is_closed()
        result_of(d)

    def test_bounded(self, logs: EventLoggingObserver) -> None:
        """stop() gives up waiting after decision_timeout + 1 s.

        Four pipelined requests that each hang take four decision timeouts to
        answer; stop() does not wait for them all.
        """
        decider = DeferredDecider()
        reactor = MemoryReactorClock()
        server = started(reactor, decider, decision_timeout="1s")
        client = Client(server.factory)
        client.send(MINIMAL * 4)
        d = Deferred.fromCoroutine(server.stop())
        reactor.advance(1.0)
        reactor.advance(0.999)
        assert not fired(d)
        reactor.advance(0.001)
        assert fired(d)
        result_of(d)
        [event] = events_named(logs, "drain_timeout")
        assert event["log_level"] == LogLevel.warn
        assert events_named(logs, "stopped") != []

    def test_waits_for_replies_to_go_out(self) -> None:
        """stop() finishes only once closed connections have sent what they had.

        A TCP transport closes after its write buffer is flushed; if stop()
        returned earlier, the reactor's shutdown would drop the last replies.
        """
        reactor = MemoryReactorClock()
        server = started(reactor)
        transport = FlushingTransport()
        client = Client(server.factory, transport)
        client.send(MINIMAL)
        d = Deferred.fromCoroutine(server.stop())
        assert transport.disconnecting
        assert not fired(d)
        transport.flushed()
        assert fired(d)
        assert client.writes == [DUNNO_REPLY]
        result_of(d)

    def test_close_bounded(self, logs: EventLoggingObserver) -> None:
        """A connection that never finishes closing delays stop() by CLOSE_TIMEOUT."""
        reactor = MemoryReactorClock()
        server = started(reactor)
        Client(server.factory, FlushingTransport())
        d = Deferred.fromCoroutine(server.stop())
        reactor.advance(CLOSE_TIMEOUT - 0.001)
        assert not fired(d)
        reactor.advance(0.001)
        result_of(d)
        [event] = events_named(logs, "close_timeout")
        assert event["log_level"] == LogLevel.warn

    def test_twice(self) -> None:
        """A second stop() returns at once and does nothing more."""
        reactor = RecordingReactor()
        server = started(reactor)
        result_of(Deferred.fromCoroutine(server.stop()))
        result_of(Deferred.fromCoroutine(server.stop()))
        assert [p.stopped for p in reactor.ports] == [True, True]


class TestStartMessages:
    """What start() tells the admin about endpoints that cannot work."""

    def test_systemd_without_socket(self) -> None:
        """A systemd endpoint with no inherited socket says how to start policyd."""
        reactor = RecordingReactor()
        server = PolicyServer(
            make_config(listen="systemd:domain=INET:index=7"),
            reactor,
            CollectorRegistry(),
        )
        failure = failure_of(Deferred.fromCoroutine(server.start()))
        assert failure.check(CannotListen)
        assert "POLICYD_LISTEN" in str(failure.value)
        assert ".socket unit" in str(failure.value)

    def test_idle_timeout_below_postfix_max_idle_warns(
        self, logs: EventLoggingObserver
    ) -> None:
        """An idle timeout below Postfix's 300 s max_idle is warned about at start."""
        started(RecordingReactor(), idle_timeout="120s")
        warnings = [e for e in logs if e.get("event") == "config_warning"]
        assert len(warnings) == 1
        assert warnings[0]["log_level"] == LogLevel.warn

    def test_default_idle_timeout_does_not_warn(
        self, logs: EventLoggingObserver
    ) -> None:
        """The default idle timeout (600 s) is above max_idle: no warning."""
        started(RecordingReactor())
        assert not [e for e in logs if e.get("event") == "config_warning"]


# Each stress variable (without POLICYD_), a value, the LoadSettings field it
# sets, and the value it sets it to.
LOAD_SETTINGS: list[tuple[str, str, str, Any]] = [
    ("smtpd_capacity", "250", "capacity", 250),
    ("host_capacities", "mx1=7 mx2=9", "host_capacities", (("mx1", 7), ("mx2", 9))),
    ("host_from", "policy_context", "host_from", "policy_context"),
    ("busy_window", "5s", "busy_window", 5.0),
    ("transaction_timeout", "2m", "transaction_timeout", 120.0),
    ("close_linger", "2s", "close_linger", 2.0),
    ("elevated_enter", "0.6", "elevated_enter", 0.6),
    ("elevated_exit", "0.4", "elevated_exit", 0.4),
    ("postfix_stress_min_load", "0", "postfix_stress_min_load", 0.0),
    ("overload_enter", "0.95", "overload_enter", 0.95),
    ("overload_exit", "0.8", "overload_exit", 0.8),
    ("level_min_dwell", "1m", "min_dwell", 60.0),
    ("rate_capacity", "500", "rate_capacity", 500.0),
    ("rate_window", "30s", "rate_window", 30),
    ("rate_window", "2.4", "rate_window", 2),  # whole seconds
    ("rate_window", "2.6", "rate_window", 3),
    ("postfix_stress_hold", "15m", "postfix_stress_hold", 900.0),
    ("postfix_stress_level", "overload", "postfix_stress_level", OVERLOAD),
    ("postfix_stress_level", "elevated", "postfix_stress_level", ELEVATED),
    ("postfix_stress_level", "ignore", "postfix_stress_level", NORMAL),
    ("client_ipv4_prefix", "24", "ipv4_prefix", 24),
    ("client_ipv6_prefix", "48", "ipv6_prefix", 48),
    ("max_tracked_clients", "5000", "max_tracked_clients", 5000),
    ("client_rate_window", "5m", "client_rate_window", 300.0),
    ("hold_grace", "2s", "hold_grace", 2.0),
    ("hold_window", "1h", "hold_window", 3600.0),
    ("bar_step", "30s", "pressure_step", 30.0),
    # How far the bar can fall: from the suspicious score to the overload one.
    ("overload_suspicious_score", "1", "max_pressure", 2),
    ("overload_suspicious_score", "3", "max_pressure", 0),
    ("suspicious_score", "5", "max_pressure", 3),
    ("suspicious_score", "1", "max_pressure", 0),
]


class TestLoadWiring:
    """The factory keeps the load tracker informed; the server builds it."""

    def test_connections_reported(self) -> None:
        """Each connection is reported opened, then closed, under its id."""
        tracker = RecordingTracker()
        harness = Harness(tracker=tracker)
        first, second = harness.connect(), harness.connect()
        second.drop()
        first.drop()
        assert tracker.calls == [
            ("opened", 1),
            ("opened", 2),
            ("closed", 2),
            ("closed", 1),
        ]

    def test_closed_by_policyd_reported(self) -> None:
        """A connection policyd closes itself (idle, stalled) is reported closed."""
        tracker = RecordingTracker()
        harness = Harness(tracker=tracker, idle_timeout=20, request_timeout=10)
        idle, stalled = harness.connect(), harness.connect()
        stalled.send(MINIMAL[:5])
        harness.clock.advance(20)
        harness.factory.sweep()
        assert (idle.is_closed(), stalled.is_closed()) == (True, True)
        assert sorted(c for c in tracker.calls if c[0] == "closed") == [
            ("closed", 1),
            ("closed", 2),
        ]

    def test_sweep_ticks(self) -> None:
        """Every sweep ticks the tracker once, after closing what timed out."""
        tracker = RecordingTracker()
        harness = Harness(tracker=tracker, idle_timeout=1)
        harness.connect()
        harness.clock.advance(1)
        harness.factory.sweep()
        assert tracker.calls == [("opened", 1), ("closed", 1), ("tick", None)]
        harness.factory.sweep()
        harness.factory.sweep()
        assert tracker.calls[3:] == [("tick", None), ("tick", None)]

    def test_requests_observed_with_connection(self) -> None:
        """TrackingDecider observes every request, tagged with its connection id."""
        tracker = RecordingTracker()
        harness = Harness(TrackingDecider(tracker), tracker=tracker)
        first, second = harness.connect(), harness.connect()
        second.send(encode_request(TYPICAL))
        first.send(MINIMAL)
        observed = [
            (request.connection, request.client_address)
            for kind, request in tracker.calls
            if kind == "observe" and isinstance(request, PolicyRequest)
        ]
        assert observed == [(2, "192.0.2.10"), (1, "")]
        assert (first.writes, second.writes) == ([DUNNO_REPLY], [DUNNO_REPLY])

    @pytest.mark.parametrize("level", [NORMAL, ELEVATED, OVERLOAD])
    def test_tracking_decider(self, level: int) -> None:
        """TrackingDecider observes the request and answers DUNNO at any level."""
        tracker = RecordingTracker(attrs.evolve(IDLE_SNAPSHOT, level=level))
        request = PolicyRequest.from_attributes(TYPICAL, 7)
        assert TrackingDecider(tracker).decide(request) == DUNNO
        assert tracker.calls == [("observe", request)]

    def test_server_tracks_its_connections(self) -> None:
        """A PolicyServer's own tracker sees its connections and requests."""
        reactor = MemoryReactorClock()
        server = PolicyServer(make_config(), reactor, CollectorRegistry())
        assert isinstance(server.tracker, MemoryLoadTracker)
        assert server.factory.tracker is server.tracker
        client = Client(server.factory)
        client.send(encode_request(TYPICAL))
        snapshot = server.tracker.snapshot()
        assert (snapshot.connections, snapshot.busy_connections) == (1, 1)
        assert snapshot.transactions == 1
        request = PolicyRequest.from_attributes(TYPICAL)
        assert server.tracker.client(request).concurrency == 1
        client.drop()
        snapshot = server.tracker.snapshot()
        # Closed: no longer open, its transaction over; still busy for the
        # close linger (master may be swapping processes at saturation).
        assert (snapshot.connections, snapshot.busy_connections) == (0, 1)
        assert snapshot.transactions == 0
        reactor.advance(5.0)
        server.factory.sweep()
        assert server.tracker.snapshot().busy_connections == 0
        assert server.tracker.client(request).concurrency == 0

    def test_sweeper_lets_level_fall(self) -> None:
        """
        Once started, the sweeper ticks the tracker: the level falls unasked.

        One busy connection against a capacity of 1 is overload; with no
        further request the level is normal again after the busy window
        (10 s) and the dwell (30 s), within a sweep.
        """
        reactor = MemoryReactorClock()
        server = started(
            reactor, smtpd_capacity="1", busy_window="10s", level_min_dwell="30s"
        )
        client = Client(server.factory)
        client.send(MINIMAL)
        assert server.tracker.level == OVERLOAD
        for _ in range(38):
            reactor.advance(SWEEP_INTERVAL)
        assert server.tracker.level == OVERLOAD
        for _ in range(3):
            reactor.advance(SWEEP_INTERVAL)
        assert server.tracker.level == NORMAL
        assert not client.is_closed()  # an idle smtpd keeps its connection
        assert server.tracker.snapshot().connections == 1

    def test_tracker_settings_from_config(self) -> None:
        """The server's tracker runs on the settings the Config gives."""
        config = make_config(smtpd_capacity="7", postfix_stress_level="ignore")
        server = PolicyServer(config, MemoryReactorClock(), CollectorRegistry())
        assert isinstance(server.tracker, MemoryLoadTracker)
        assert server.tracker.settings == load_settings(config)
        assert server.tracker.settings.capacity == 7

    def test_default_settings(self) -> None:
        """The default Config gives LoadSettings' own defaults: one set of numbers."""
        assert load_settings(load({})) == LoadSettings()

    def test_table_covers_every_setting(self) -> None:
        """The table below sets every LoadSettings field."""
        assert {field for _, _, field, _ in LOAD_SETTINGS} == set(
            attrs.fields_dict(LoadSettings)
        )

    @pytest.mark.parametrize(("variable", "raw", "field", "value"), LOAD_SETTINGS)
    def test_load_settings(
        self, variable: str, raw: str, field: str, value: Any
    ) -> None:
        """Each stress variable sets its LoadSettings field, and nothing else."""
        settings = load_settings(make_config(**{variable: raw}))
        assert getattr(settings, field) == value
        default = getattr(LoadSettings(), field)
        assert attrs.evolve(settings, **{field: default}) == LoadSettings()


# Each decision variable (without POLICYD_) other than the weights, a value,
# the PolicySettings field it sets, and the value it sets it to.
POLICY_SETTINGS: list[tuple[str, str, str, Any]] = [
    ("suspicious_score", "4", "suspicious_score", 4),
    ("overload_suspicious_score", "1", "overload_suspicious_score", 1),
    ("hold_limit", "1m", "hold_limit", 60.0),
    ("reject_score", "12", "reject_score", 12),
    ("client_concurrency_limit", "20", "client_concurrency_limit", 20),
    ("client_message_rate_limit", "90", "client_message_rate_limit", 90.0),
    ("client_session_rate_limit", "7.5", "client_session_rate_limit", 7.5),
    ("quick_retry_window", "2m", "quick_retry_window", 120.0),
    ("my_hostnames", "MX.example.org.", "my_hostnames", ("mx.example.org",)),
    (
        "allow_networks",
        "192.0.2.0/24 2001:db8::/32",
        "allow_networks",
        (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")),
    ),
    ("allow_domains", "example.com", "allow_domains", ("example.com",)),
    ("elevated_action", "DEFER busy", "elevated_action", "DEFER busy"),
    (
        "elevated_reject_action",
        "554 5.7.1 no",
        "elevated_reject_action",
        "554 5.7.1 no",
    ),
    ("overload_action", "421 4.7.0 later", "overload_action", "421 4.7.0 later"),
    (
        "overload_reject_action",
        "REJECT {reasons}",
        "overload_reject_action",
        "REJECT {reasons}",
    ),
]


class TestPolicyWiring:
    """Without a decider passed in, the server decides with `PolicyDecider`."""

    def test_default_decider(self) -> None:
        """The decider uses the server's tracker, metrics and configured policy."""
        config = make_config(suspicious_score="5", weight_no_helo="7")
        server = PolicyServer(config, MemoryReactorClock(), CollectorRegistry())
        decider = server.factory.decider
        assert isinstance(decider, PolicyDecider)
        assert decider.tracker is server.tracker
        assert decider.metrics is server.metrics
        assert decider.settings == policy_settings(config)
        assert (decider.dry_run, decider.dry_run_warn) == (False, False)

    @pytest.mark.parametrize(
        ("dry_run", "warn", "expected"),
        [
            ("1", "0", (True, False)),
            ("yes", "on", (True, True)),
            ("0", "1", (False, True)),
        ],
    )
    def test_dry_run(
        self, dry_run: str, warn: str, expected: tuple[bool, bool]
    ) -> None:
        """POLICYD_DRY_RUN and POLICYD_DRY_RUN_WARN reach the decider."""
        config = make_config(dry_run=dry_run, dry_run_warn=warn)
        decider = PolicyServer(
            config, MemoryReactorClock(), CollectorRegistry()
        ).factory.decider
        assert isinstance(decider, PolicyDecider)
        assert (decider.dry_run, decider.dry_run_warn) == expected

    def test_default_settings(self) -> None:
        """The default Config gives PolicySettings' own defaults: one set of numbers."""
        assert policy_settings(load({})) == PolicySettings()

    def test_table_covers_every_setting(self) -> None:
        """The tables set every PolicySettings field, and a weight for every signal."""
        assert {field for _, _, field, _ in POLICY_SETTINGS} | {"weights"} == set(
            attrs.fields_dict(PolicySettings)
        )
        assert set(policy_settings(load({})).weights) == set(SIGNALS)

    @pytest.mark.parametrize(("variable", "raw", "field", "value"), POLICY_SETTINGS)
    def test_policy_settings(
        self, variable: str, raw: str, field: str, value: Any
    ) -> None:
        """Each decision variable sets its PolicySettings field, and nothing else."""
        settings = policy_settings(make_config(**{variable: raw}))
        assert getattr(settings, field) == value
        default = getattr(PolicySettings(), field)
        assert attrs.evolve(settings, **{field: default}) == PolicySettings()

    @pytest.mark.parametrize("signal", SIGNALS)
    def test_weight_reaches_its_signal(self, signal: str) -> None:
        """POLICYD_WEIGHT_<SIGNAL> sets that signal's weight, and no other."""
        settings = policy_settings(make_config(**{f"weight_{signal}": "-17"}))
        expected = {**PolicySettings().weights, signal: -17}
        assert settings.weights == expected

    def test_decides_under_stress(self, logs: EventLoggingObserver) -> None:
        """
        A server at overload refuses a bot on the wire and logs the refusal.

        With a capacity of one smtpd process, the bot's own connection is
        full load.
        """
        server = PolicyServer(
            make_config(smtpd_capacity="1"), MemoryReactorClock(), CollectorRegistry()
        )
        client = Client(server.factory)
        bot = {
            **TYPICAL,
            "client_address": "203.0.113.45",
            "client_name": "unknown",
            "reverse_client_name": "unknown",
            "helo_name": "user-pc",
        }
        client.send(encode_request(bot))
        reasons = "no_client_name no_reverse_name helo_not_fqdn"
        assert client.writes == [
            f"action=421 4.7.0 Overloaded; try again later ({reasons})\n\n".encode()
        ]
        (event,) = events_named(logs, "refusal")
        assert (event["client"], event["stress_level"]) == ("203.0.113.45", "overload")
        registry_value = server.metrics.registry.get_sample_value(
            "policyd_decisions_total", {"outcome": "defer", "reason": "helo_not_fqdn"}
        )
        assert registry_value == 1.0


class TestAllowPeers:
    """POLICYD_ALLOW_PEERS: who may connect, and what happens to the others."""

    LOOPBACK_ONLY = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )

    def factory(self, allow: Any = LOOPBACK_ONLY) -> Any:
        """A harness whose factory admits *allow*."""
        harness = Harness()
        harness.factory.allow_peers = allow
        return harness

    def test_refuses_peer_outside(self, logs: EventLoggingObserver) -> None:
        """A peer outside gets no protocol (closed at once); counted, logged."""
        harness = self.factory()
        peer = IPv4Address("TCP", "192.0.2.7", 40000)
        assert harness.factory.buildProtocol(peer) is None
        assert harness.registry.get_sample_value("policyd_peers_refused_total") == 1
        refused = [e for e in logs if e.get("event") == "peer_refused"]
        assert [e["peer"] for e in refused] == ["192.0.2.7"]
        assert refused[0]["log_level"] == LogLevel.warn
        assert harness.factory.protocols == set()

    def test_logs_each_address_once_a_minute(self, logs: EventLoggingObserver) -> None:
        """Refusals of one address are all counted, but logged once per minute."""
        harness = self.factory()
        peer = IPv4Address("TCP", "192.0.2.7", 40000)
        other = IPv4Address("TCP", "198.51.100.1", 40000)
        for _ in range(5):
            harness.factory.buildProtocol(peer)
        harness.factory.buildProtocol(other)
        harness.clock.advance(60.0)
        harness.factory.buildProtocol(peer)
        assert harness.registry.get_sample_value("policyd_peers_refused_total") == 7
        refused = [e["peer"] for e in logs if e.get("event") == "peer_refused"]
        assert refused == ["192.0.2.7", "198.51.100.1", "192.0.2.7"]

    @pytest.mark.parametrize(
        "address",
        [
            IPv4Address("TCP", "127.0.0.1", 40000),
            IPv4Address("TCP", "127.8.9.10", 40000),
            IPv6Address("TCP", "::1", 40000),
            # A dual-stack IPv6 socket shows IPv4 peers as IPv4-mapped.
            IPv6Address("TCP", "::ffff:127.0.0.1", 40000),
            UNIXAddress(b"/run/policyd.sock"),
            None,
        ],
    )
    def test_admits(self, address: IAddress | None) -> None:
        """Loopback peers (also IPv4-mapped), unix sockets and unknown peers connect."""
        harness = self.factory()
        assert harness.factory.buildProtocol(address) is not None
        assert harness.registry.get_sample_value("policyd_peers_refused_total") == 0

    def test_networks(self) -> None:
        """A peer inside a listed network connects, IPv4 and IPv6 alike."""
        harness = self.factory(
            (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("2001:db8::/32"))
        )
        build = harness.factory.buildProtocol
        assert build(IPv4Address("TCP", "10.1.200.3", 1)) is not None
        assert build(IPv6Address("TCP", "2001:db8::25", 1)) is not None
        assert build(IPv6Address("TCP", "fe80::1%eth0", 1)) is None
        assert build(IPv4Address("TCP", "10.2.0.1", 1)) is None
        assert build(IPv4Address("TCP", "127.0.0.1", 1)) is None

    def test_none_admits_everyone(self) -> None:
        """Without a list (the factory's default) every peer connects."""
        harness = self.factory(None)
        assert harness.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1))

    def test_server_wires_config(self) -> None:
        """PolicyServer passes POLICYD_ALLOW_PEERS to its factory."""
        server = PolicyServer(
            make_config(allow_peers="192.0.2.0/24"),
            MemoryReactorClock(),
            CollectorRegistry(),
        )
        assert server.factory.allow_peers == (ipaddress.ip_network("192.0.2.0/24"),)
        assert server.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)) is None

    @pytest.mark.parametrize(
        ("listen", "allow", "warned"),
        [
            ("tcp:10040:interface=0.0.0.0", "127.0.0.0/8 ::1", True),
            ("tcp:10040:interface=192.0.2.1", "127.0.0.1", True),
            ("tcp:10040:interface=0.0.0.0", "127.0.0.0/8 192.0.2.0/24", False),
            ("tcp:10040:interface=0.0.0.0", "any", False),
            ("tcp:10040:interface=127.0.0.1", "127.0.0.0/8 ::1", False),
            ("unix:/tmp/policyd-test.sock", "127.0.0.0/8 ::1", False),
        ],
    )
    def test_warns_when_listening_beyond_loopback(
        self, logs: EventLoggingObserver, listen: str, allow: str, warned: bool
    ) -> None:
        """Listening beyond loopback while admitting only loopback is warned of."""
        started(RecordingReactor(), listen=listen, allow_peers=allow)
        warnings = [
            e
            for e in logs
            if e.get("event") == "config_warning"
            and "POLICYD_ALLOW_PEERS" in e.get("log_format", "")
        ]
        assert len(warnings) == (1 if warned else 0)


class TestTrackerLifecycle:
    """The server starts, ticks and stops the tracker it is given."""

    def serve(self, tracker: RecordingTracker) -> tuple[MemoryReactorClock, Any]:
        """A server on *tracker*, not yet started."""
        reactor = MemoryReactorClock()
        server = PolicyServer(
            make_config(), reactor, CollectorRegistry(), tracker=tracker
        )
        return reactor, server

    def test_injected_tracker_used(self) -> None:
        """An injected tracker is the one connections and decisions report to."""
        tracker = RecordingTracker()
        _, server = self.serve(tracker)
        assert server.tracker is tracker
        assert server.factory.tracker is tracker
        Client(server.factory).send(MINIMAL)
        assert [name for name, _ in tracker.calls] == ["opened", "observe"]

    def test_start_before_listening(self) -> None:
        """start() listens only once the tracker's start has fired."""
        tracker = RecordingTracker()
        tracker.start_result = Deferred()
        reactor, server = self.serve(tracker)
        starting = Deferred.fromCoroutine(server.start())
        assert tracker.calls == [("start", None)]
        assert not fired(starting)
        assert reactor.tcpServers == []
        tracker.start_result.callback(None)
        assert fired(starting)
        assert [port for port, *_ in reactor.tcpServers] == [10040, 10041]

    def test_stop_stops_tracker(self) -> None:
        """stop() stops the tracker after the connections are closed."""
        tracker = RecordingTracker()
        _, server = self.serve(tracker)
        result_of(Deferred.fromCoroutine(server.start()))
        result_of(Deferred.fromCoroutine(server.stop()))
        assert tracker.calls[-1] == ("stop", None)

    def test_failed_start_stops_tracker(self) -> None:
        """When a listener fails, the tracker started for it is stopped again."""
        tracker = RecordingTracker()
        reactor = RecordingReactor()
        reactor.refuse.add(10040)
        server = PolicyServer(
            make_config(), reactor, CollectorRegistry(), tracker=tracker
        )
        failure_of(Deferred.fromCoroutine(server.start()))
        assert [name for name, _ in tracker.calls] == ["start", "stop"]

    def test_tick_errors_logged_sweeps_go_on(self, logs: EventLoggingObserver) -> None:
        """A failing tick is logged once a minute; the sweeps go on."""
        tracker = RecordingTracker()
        tracker.tick_result = RuntimeError("store gone")
        reactor, server = self.serve(tracker)
        result_of(Deferred.fromCoroutine(server.start()))
        for _ in range(61):
            reactor.advance(SWEEP_INTERVAL)
        ticks = [name for name, _ in tracker.calls if name == "tick"]
        assert len(ticks) == 61
        errors = events_named(logs, "tick_error")
        assert [e["failures"] for e in errors] == [1, 60]
        assert errors[0]["log_level"] == LogLevel.critical
        assert "store gone" in errors[0]["log_failure"].getErrorMessage()

    def test_tick_deferred_waited_for(self, logs: EventLoggingObserver) -> None:
        """A tick's Deferred is waited for (no overlap); its failure is logged."""
        tracker = RecordingTracker()
        pending: Deferred[None] = Deferred()
        tracker.tick_result = pending
        reactor, server = self.serve(tracker)
        result_of(Deferred.fromCoroutine(server.start()))
        for _ in range(3):
            reactor.advance(SWEEP_INTERVAL)
        assert [name for name, _ in tracker.calls].count("tick") == 1
        tracker.tick_result = None
        pending.errback(RuntimeError("sync failed"))
        [error] = events_named(logs, "tick_error")
        assert "sync failed" in error["log_failure"].getErrorMessage()
        reactor.advance(SWEEP_INTERVAL)
        assert [name for name, _ in tracker.calls].count("tick") == 2


class TestHostsWiring:
    """The factory tells the tracker which Postfix host a connection is from."""

    @pytest.mark.parametrize(
        ("peer", "host"),
        [
            (IPv4Address("TCP", "192.0.2.21", 40000), "192.0.2.21"),
            (IPv6Address("TCP", "2001:db8::25", 40000), "2001:db8::25"),
            (IPv6Address("TCP", "::ffff:192.0.2.21", 40000), "192.0.2.21"),
            (IPv4Address("TCP", "127.0.0.1", 40000), "local"),
            (IPv6Address("TCP", "::1", 40000), "local"),
            (UNIXAddress(b"/var/spool/postfix/private/policyd"), "local"),
        ],
    )
    def test_host_by_peer(self, peer: IAddress, host: str) -> None:
        """A connection's host is its peer address; loopback and unix are local."""
        tracker = RecordingTracker()
        harness = Harness(tracker=tracker)
        Client(harness.factory, RecordingTransport(peer))
        assert tracker.hosts_opened == [host]

    def test_two_hosts_two_levels(self) -> None:
        """Through the server: a flood from one MX leaves the other's clients alone."""
        reactor = MemoryReactorClock()
        server = started(
            reactor,
            smtpd_capacity="4",
            host_capacities="192.0.2.22=10",
            allow_peers="any",
        )
        flooded = []
        for n in range(4):
            peer = IPv4Address("TCP", "192.0.2.21", 40000 + n)
            flooded.append(Client(server.factory, RecordingTransport(peer)))
        for client in flooded:
            client.send(MINIMAL)
        quiet = RecordingTransport(IPv4Address("TCP", "192.0.2.22", 40000))
        Client(server.factory, quiet).send(MINIMAL)
        tracker = server.tracker
        assert tracker.snapshot("192.0.2.21").level == OVERLOAD
        assert tracker.snapshot("192.0.2.22").level == NORMAL
        assert tracker.snapshot("192.0.2.22").capacity == 10
        assert tracker.level == OVERLOAD
