"""
The Redis backend: the contract, two trackers on one Redis, failures.

The shared contract runs against a real redis-server, then two trackers
share one Redis, then Redis fails.

The contract (tests/load_contract.py) and the two-tracker tests talk to a
real ``redis-server`` (tests/run installs Debian's) through
`BlockingEndpoint`, whose replies arrive before ``write`` returns: time is a
`Clock`, and the scripts, keys and TTLs are Redis's own.  The failure tests
drive the protocol by hand over a `StringTransport` (a reply that never
comes, comes late, or is an error), and, with a server of their own, kill
and restart it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, cast

import attrs
import pytest
from helpers import capture_logs, events_named
from load_contract import BASE, CLIENT, START, LoadTrackerContract, Smtpd, request
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from policyd.load import ELEVATED, ClientStats, LoadSettings, LoadTracker
from policyd.resp import RedisProtocol, RedisURL, encode
from policyd.shared import (
    EPOCH_SHA,
    HOSTS_SHA,
    UPDATE_SHA,
    RedisLoadTracker,
    RedisSettings,
)
from policyd.testing.redis import BlockingEndpoint, RedisServer

_prefixes = itertools.count(1)


def fresh_prefix() -> str:
    """A key prefix no other test uses: trackers on one server stay apart."""
    return f"test{next(_prefixes)}:"


class Connected:
    """Trackers connected to the session's redis-server, closed at the end."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.endpoints: list[BlockingEndpoint] = []

    def tracker(
        self,
        clock: Clock,
        settings: LoadSettings = BASE,
        prefix: str | None = None,
        **redis: Any,
    ) -> RedisLoadTracker:
        """A started tracker on *clock*, sharing clients under *prefix*."""
        endpoint = BlockingEndpoint(self.server.socket)
        self.endpoints.append(endpoint)
        tracker = RedisLoadTracker(
            clock,
            settings,
            RedisSettings(
                url=self.server.url, prefix=prefix or fresh_prefix(), **redis
            ),
            endpoint=endpoint,
        )
        tracker.start()
        assert tracker.state == "up"
        return tracker

    def close(self) -> None:
        """Close every connection made."""
        for endpoint in self.endpoints:
            endpoint.close()


@pytest.fixture
def connected(redis_server: RedisServer) -> Iterator[Connected]:
    """Make trackers on the session's redis-server; close them afterwards."""
    made = Connected(redis_server)
    yield made
    made.close()


class TestRedisLoadTracker(LoadTrackerContract):
    """`RedisLoadTracker` on a real redis-server keeps the load tracker contract."""

    shared = True

    @pytest.fixture(autouse=True)
    def _connected(self, connected: Connected) -> None:
        self.connected = connected

    def make_tracker(self, clock: Clock, settings: LoadSettings) -> LoadTracker:
        """A `RedisLoadTracker` under a prefix of its own."""
        return self.connected.tracker(clock, settings)


def pair(
    connected: Connected, skew: float = 0.0, **overrides: Any
) -> tuple[Smtpd, Smtpd]:
    """Two MX hosts' trackers on one Redis prefix; B's clock *skew* s ahead."""
    settings = attrs.evolve(BASE, **overrides)
    prefix = fresh_prefix()
    clock_a = Clock()
    clock_a.advance(START)
    clock_b = Clock()
    clock_b.advance(START + skew)
    a = Smtpd(connected.tracker(clock_a, settings, prefix), clock_a)
    b = Smtpd(connected.tracker(clock_b, settings, prefix), clock_b)
    return a, b


def both_wait(a: Smtpd, b: Smtpd, seconds: float) -> None:
    """Let *seconds* pass on both hosts (their updates are written meanwhile)."""
    a.wait(seconds)
    b.wait(seconds)


class TestTwoTrackersOneRedis:
    """What one policyd writes to Redis, another reads."""

    def test_refusal_seen_by_the_other(self, connected: Connected) -> None:
        """A client refused on MX1 is, on MX2, a client refused seconds ago."""
        a, b = pair(connected)
        a.refuse()
        both_wait(a, b, 3)
        seen = b.stats()
        assert seen.refusals == pytest.approx(1.0, rel=0.1)
        assert seen.since_refusal == pytest.approx(3.0, abs=0.1)
        # MX2's own memory never saw it: the record came from Redis.
        assert isinstance(b.tracker, RedisLoadTracker)
        assert b.tracker.local.client(request(0, CLIENT)).since_refusal is None

    def test_counts_add_up(self, connected: Connected) -> None:
        """Sessions opened on both hosts add up in the rate both hosts read."""
        a, b = pair(connected)
        for host in (a, b, a):
            host.ask(host.connect(), state="CONNECT")
        both_wait(a, b, 1)
        per_minute = 3 * 60.0 / BASE.client_rate_window
        assert a.stats().session_rate == pytest.approx(per_minute, rel=0.1)
        assert b.stats().session_rate == pytest.approx(per_minute, rel=0.1)

    def test_held_time_shared(self, connected: Connected) -> None:
        """Process time held without progress on MX1 counts on MX2."""
        a, b = pair(connected)
        connection = a.connect()
        a.ask(connection, state="CONNECT")
        a.later(15)
        a.ask(connection, state="HELO")
        both_wait(a, b, 1)
        assert b.stats().held == pytest.approx(10.0, rel=0.1)

    def test_concurrency_is_each_hosts(self, connected: Connected) -> None:
        """Processes held are per host: MX2 does not count MX1's."""
        a, b = pair(connected)
        a.busy(3)
        both_wait(a, b, 1)
        assert a.stats().concurrency == 3
        assert b.stats().concurrency == 0

    def test_load_is_each_hosts(self, connected: Connected) -> None:
        """A flood on MX1 does not raise MX2's level."""
        a, b = pair(connected)
        a.busy(15)
        assert a.level == ELEVATED
        assert b.level == 0

    def test_clock_skew(self, connected: Connected) -> None:
        """A host whose clock is an hour ahead still reads "3 s ago" as 3 s."""
        a, b = pair(connected, skew=3600.0)
        a.refuse()
        both_wait(a, b, 3)
        assert b.stats().since_refusal == pytest.approx(3.0, abs=0.1)
        b.refuse("192.0.2.99")
        both_wait(a, b, 2)
        assert a.stats("192.0.2.99").since_refusal == pytest.approx(2.0, abs=0.1)

    def test_prefixes_keep_apart(self, connected: Connected) -> None:
        """Trackers under different prefixes share nothing."""
        a, _ = pair(connected)
        _, other = pair(connected)
        a.refuse()
        a.wait(1)
        other.wait(1)
        assert other.stats().since_refusal is None

    def test_keys_have_a_ttl(self, connected: Connected) -> None:
        """Every key written has a TTL; IPv6 clients are keyed by /64."""
        prefix = fresh_prefix()
        clock = Clock()
        clock.advance(START)
        smtpd = Smtpd(connected.tracker(clock, BASE, prefix), clock)
        smtpd.refuse("2001:db8:1:2::25")
        smtpd.refuse("2001:db8:1:2::26")
        smtpd.refuse("192.0.2.7")
        smtpd.wait(1)
        server = connected.server
        keys = sorted(server.command("KEYS", prefix + "*"))
        assert keys == [
            f"{prefix}c:192.0.2.7".encode(),
            f"{prefix}c:2001:db8:1:2::/64".encode(),
            f"{prefix}epoch".encode(),
        ]
        for key in keys:
            assert server.command("TTL", key) > 0

    def test_ttl_outlasts_the_windows(self, connected: Connected) -> None:
        """The TTL is four times the longest window: what expires is ~2% of it."""
        prefix = fresh_prefix()
        clock = Clock()
        clock.advance(START)
        tracker = connected.tracker(clock, BASE, prefix)
        assert tracker.ttl == 4 * max(BASE.client_rate_window, BASE.hold_window)
        Smtpd(tracker, clock).refuse()
        clock.advance(1)
        ttl = connected.server.command("TTL", f"{prefix}c:{CLIENT}")
        assert tracker.ttl - 5 <= ttl <= tracker.ttl


def serve(smtpd: Smtpd, host: str, busy: int) -> None:
    """*busy* smtpd processes of Postfix host *host* ask *smtpd*'s policyd."""
    for n in range(busy):
        connection = 1000 + n
        smtpd.tracker.connection_opened(connection, host)
        smtpd.ask(connection, f"198.51.100.{n + 1}")


class TestSharedHostLoad:
    """Two policyd serving one Postfix host add up its load through Redis."""

    def test_load_adds_up(self, connected: Connected) -> None:
        """8 + 8 busy processes of mx1's 20 make elevated on both policyd."""
        a, b = pair(connected)
        serve(a, "mx1", 8)
        serve(b, "mx1", 8)
        assert (a.level, b.level) == (0, 0)
        # Each writes its count and reads the other's, once a second.
        both_wait(a, b, 1)
        a.wait(1)
        assert (a.level, b.level) == (ELEVATED, ELEVATED)
        assert a.tracker.snapshot("mx1").busy_connections == 16

    def test_local_host_is_each_policyds(self, connected: Connected) -> None:
        """Each MX's own Postfix ("local") is not added to another's."""
        a, b = pair(connected)
        a.busy(8)
        b.busy(8)
        both_wait(a, b, 2)
        assert (a.level, b.level) == (0, 0)
        assert a.snapshot().busy_connections == 8

    def test_stopped_instance_forgotten(self, connected: Connected) -> None:
        """A policyd that stops writing its counts drops out within seconds."""
        a, b = pair(connected)
        serve(a, "mx1", 8)
        serve(b, "mx1", 8)
        both_wait(a, b, 1)
        a.wait(1)
        assert a.tracker.snapshot("mx1").busy_connections == 16
        a.wait(6)
        assert a.tracker.snapshot("mx1").busy_connections == 8


# --------------------------------------------------------------------------
# Failures, with the protocol driven by hand
# --------------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """Connects a RedisProtocol to a StringTransport the test answers for."""

    def __init__(self) -> None:
        self.protocols: list[RedisProtocol] = []
        self.transports: list[StringTransport] = []
        #: What the next connect attempt does: None to succeed, or an error.
        self.refuse: Exception | None = None
        self.attempts = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """A connected protocol (or the failure set in `refuse`)."""
        self.attempts += 1
        if self.refuse is not None:
            failed: Deferred[IProtocol] = Deferred()
            failed.errback(self.refuse)
            return failed
        protocol = cast(Any, factory.buildProtocol(UNIXAddress(None)))
        assert isinstance(protocol, RedisProtocol)
        transport = StringTransport()
        protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
        self.protocols.append(protocol)
        self.transports.append(transport)
        return succeed(protocol)

    @property
    def protocol(self) -> RedisProtocol:
        """The latest connection's protocol."""
        return self.protocols[-1]

    def sent(self) -> bytes:
        """What was written on the latest connection since the last call."""
        transport = self.transports[-1]
        data = bytes(transport.value())
        transport.clear()
        return data

    def reply(self, *replies: bytes) -> None:
        """Feed RESP *replies* to the latest connection."""
        self.protocol.dataReceived(b"".join(replies))


def fired(waiting: Deferred[Any]) -> bool:
    """Whether *waiting* has fired (a call: mypy would narrow an attribute)."""
    return bool(waiting.called)


def dropped(transport: StringTransport) -> bool:
    """Whether the tracker closed or aborted *transport*."""
    return bool(transport.disconnecting)


def bulk(value: bytes) -> bytes:
    """*value* as a RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def records(*values: tuple[float, float, float, float, float]) -> bytes:
    """The update script's reply: five numbers per record, in one string."""
    return bulk(b" ".join(repr(float(v)).encode() for r in values for v in r))


class Scripted:
    """A tracker on a `Clock` whose Redis the test plays."""

    def __init__(self, epoch: bytes = b"e1", **redis: Any) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.endpoint = ScriptedEndpoint()
        self.tracker = RedisLoadTracker(
            self.clock,
            BASE,
            RedisSettings(url=RedisURL("unix", path="/nonexistent"), **redis),
            endpoint=self.endpoint,
        )
        self.smtpd = Smtpd(self.tracker, self.clock)
        self.started = self.tracker.start()
        self.handshake(epoch)

    def handshake(self, epoch: bytes = b"e1") -> None:
        """Answer the connection's SCRIPT LOADs, the epoch and TIME."""
        sent = self.endpoint.sent()
        assert sent.count(b"SCRIPT") == 1  # one at a time: the first so far
        self.endpoint.reply(bulk(UPDATE_SHA))
        self.endpoint.reply(bulk(EPOCH_SHA))
        self.endpoint.reply(bulk(HOSTS_SHA))
        self.endpoint.reply(bulk(epoch))
        self.endpoint.reply(b"*2\r\n" + bulk(b"%d" % START) + bulk(b"0"))
        self.endpoint.sent()
        assert self.tracker.state == "up"

    def lookup(self, client: str = CLIENT) -> Deferred[ClientStats | None]:
        """A decision's fetch of *client*'s record, sent (this reactor turn)."""
        waiting = self.tracker.lookup(request(0, client))
        assert waiting is not None
        self.clock.advance(0)
        return waiting


class TestDeadline:
    """A decision never waits on Redis longer than the deadline."""

    def test_answer_in_time(self) -> None:
        """A reply within the deadline is what the client is scored with."""
        s = Scripted()
        waiting = s.lookup()
        assert b"EVALSHA" in s.endpoint.sent()
        s.endpoint.reply(records((2.0, 1.0, 7.0, 1.0, 4.0)))
        shared: list[ClientStats | None] = []
        waiting.addCallback(shared.append)
        (stats,) = shared
        assert stats is not None
        per_minute = 60.0 / BASE.client_rate_window
        assert stats.session_rate == pytest.approx(2.0 * per_minute)
        assert stats.message_rate == pytest.approx(1.0 * per_minute)
        assert (stats.held, stats.refusals, stats.since_refusal) == (7.0, 1.0, 4.0)
        assert s.tracker.backend().fallbacks == 0

    def test_no_reply_in_time(self) -> None:
        """After the deadline the decision goes on, on the local view."""
        s = Scripted(deadline=0.02)
        waiting = s.lookup()
        s.clock.advance(0.019)
        assert not fired(waiting)
        s.clock.advance(0.002)
        assert fired(waiting)
        assert waiting.result is None  # the local view decides
        status = s.tracker.backend()
        assert (status.up, status.fallbacks) == (False, 1)
        assert dict(status.errors)["timeout"] == 1

    def test_slow_redis_is_not_waited_for(self) -> None:
        """While a reply is late, decisions do not wait at all."""
        s = Scripted()
        s.lookup()
        s.clock.advance(0.05)
        assert s.tracker.state == "slow"
        assert s.tracker.lookup(request(0, CLIENT)) is None
        assert s.tracker.backend().fallbacks == 2

    def test_late_reply_ends_the_outage(self) -> None:
        """The late reply arrives: Redis is up again, logged once each way."""
        s = Scripted()
        with capture_logs() as events:
            s.lookup()
            s.clock.advance(0.05)
            s.endpoint.sent()
            s.endpoint.reply(records((0, 0, 0, 0, -1)))
        assert s.tracker.state == "up"
        assert len(events_named(events, "backend_down")) == 1
        assert len(events_named(events, "backend_up")) == 1

    def test_updates_during_an_outage_are_sent_after(self) -> None:
        """What clients did while Redis was slow is written once it answers."""
        s = Scripted()
        s.lookup()
        s.clock.advance(0.05)
        s.endpoint.sent()
        s.smtpd.refuse("192.0.2.50")
        s.clock.advance(1)
        assert b"192.0.2.50" not in s.endpoint.sent()
        s.endpoint.reply(records((0, 0, 0, 0, -1)))
        s.clock.advance(0)
        assert b"192.0.2.50" in s.endpoint.sent()

    def test_hung_redis_is_dropped(self) -> None:
        """No reply for POLICYD_REDIS_TIMEOUT: the connection is made again."""
        s = Scripted(timeout=2.0)
        s.lookup()
        s.clock.advance(0.05)
        assert not dropped(s.endpoint.transports[-1])
        s.clock.advance(2.0)
        assert dropped(s.endpoint.transports[-1])
        s.endpoint.protocol.connectionLost()
        assert s.tracker.state == "down"
        s.clock.advance(0.25)
        assert s.endpoint.attempts == 2
        s.handshake()
        assert s.tracker.state == "up"


def unreachable(
    why: str = "connection refused",
) -> tuple[Clock, ScriptedEndpoint, RedisLoadTracker]:
    """A tracker (not started) whose every connection attempt is refused."""
    clock = Clock()
    clock.advance(START)
    endpoint = ScriptedEndpoint()
    endpoint.refuse = ConnectionRefusedError(why)
    tracker = RedisLoadTracker(
        clock,
        BASE,
        RedisSettings(url=RedisURL("unix", path="/nonexistent")),
        endpoint=endpoint,
    )
    return clock, endpoint, tracker


class TestSlowLinks:
    """Only decisions are held to the deadline; updates may take the timeout."""

    def test_update_not_held_to_the_deadline(self) -> None:
        """A batch nobody waits for may take longer than the deadline."""
        s = Scripted(deadline=0.02, timeout=2.0)
        s.smtpd.refuse("192.0.2.90")
        s.clock.advance(0.02)  # the flush delay: the batch goes
        assert b"192.0.2.90" in s.endpoint.sent()
        s.clock.advance(0.5)
        assert s.tracker.state == "up"
        s.endpoint.reply(records())
        s.clock.advance(2.0)
        assert s.tracker.state == "up"

    def test_update_late_by_the_timeout(self) -> None:
        """An update without a reply for the whole timeout means Redis is slow."""
        s = Scripted(timeout=2.0)
        s.smtpd.refuse("192.0.2.90")
        s.clock.advance(0.02)
        s.clock.advance(2.0)
        assert s.tracker.state == "slow"
        assert s.tracker.lookup(request(0, CLIENT)) is None

    def test_queued_decisions_bounded_too(self) -> None:
        """Decisions queued behind four batches in flight wait the deadline only."""
        s = Scripted(deadline=0.02, timeout=2.0, max_batch=1)
        for n in range(4):
            s.smtpd.refuse(f"192.0.2.{n + 100}")
        s.clock.advance(0.02)
        assert s.endpoint.sent().count(b"EVALSHA") == 4
        waiting = s.tracker.lookup(request(0, CLIENT))
        assert waiting is not None
        s.clock.advance(0.019)
        assert not fired(waiting)
        s.clock.advance(0.002)
        assert fired(waiting)
        assert s.tracker.state == "slow"
        assert s.tracker.backend().fallbacks == 1


class TestOutage:
    """Redis down: fail open, log once, back off, resynchronise."""

    def test_no_shared_host_load_while_down(self) -> None:
        """Without Redis, a host's load is what this policyd counts itself."""
        s = Scripted()
        s.tracker.connection_opened(1, "mx1")
        s.smtpd.ask(1)
        s.tracker.tick()
        assert b"EVALSHA" in s.endpoint.sent()
        s.endpoint.reply(bulk(b"e1"), b"*1\r\n*2\r\n" + bulk(b"5") + bulk(b"2.5"))
        assert s.tracker.snapshot("mx1").busy_connections == 6
        s.endpoint.protocol.connectionLost()
        s.tracker.tick()
        assert s.tracker.snapshot("mx1").busy_connections == 1

    def test_unreachable_at_start(self) -> None:
        """start() fires anyway; policyd decides on its own view meanwhile."""
        _, _, tracker = unreachable("connection refused")
        with capture_logs() as events:
            started = tracker.start()
        assert started.called
        assert tracker.state == "down"
        assert tracker.lookup(request(0, CLIENT)) is None
        (down,) = events_named(events, "backend_down")
        assert "connection refused" in down["reason"]

    def test_backoff_grows_and_logs_once(self) -> None:
        """Retries come after 0.25, 0.5, 1, 2... s (at most 5 s), logged once."""
        clock, endpoint, tracker = unreachable()
        with capture_logs() as events:
            tracker.start()
            attempts = []
            for _ in range(400):
                clock.advance(0.25)
                attempts.append(endpoint.attempts)
        times = [
            (i + 1) * 0.25
            for i in range(len(attempts))
            if i == 0 or attempts[i] != attempts[i - 1]
        ]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps[:5] == [0.5, 1.0, 2.0, 4.0, 5.0]
        assert max(gaps) == 5.0
        assert len(events_named(events, "backend_down")) == 1
        assert dict(tracker.backend().errors)["connect"] == endpoint.attempts

    def test_refused_command_keeps_the_updates(self) -> None:
        """An error reply (READONLY, OOM...) loses no update: they go again later."""
        s = Scripted()
        s.smtpd.refuse("192.0.2.60")
        s.clock.advance(0.05)
        assert b"192.0.2.60" in s.endpoint.sent()
        s.endpoint.reply(b"-READONLY You can't write against a read only replica.\r\n")
        assert s.tracker.state == "down"
        s.endpoint.protocol.connectionLost()
        s.clock.advance(0.25)
        s.handshake()
        s.clock.advance(0)
        assert b"192.0.2.60" in s.endpoint.sent()
        assert dict(s.tracker.backend().errors)["error"] == 1

    def test_restarted_empty_gets_the_local_view(self) -> None:
        """A new epoch after reconnecting: this policyd writes back what it knows."""
        s = Scripted(epoch=b"e1")
        s.smtpd.refuse("192.0.2.70")
        s.smtpd.busy(1, "192.0.2.71")
        s.clock.advance(0.05)
        s.endpoint.sent()
        s.endpoint.reply(records())
        s.endpoint.protocol.connectionLost()
        with capture_logs() as events:
            s.clock.advance(0.25)
            s.handshake(epoch=b"e2")
            s.clock.advance(0)
        sent = s.endpoint.sent()
        assert b"192.0.2.70" in sent
        (resync,) = events_named(events, "backend_resync")
        assert resync["count"] == 2

    def test_same_epoch_sends_only_what_is_new(self) -> None:
        """Reconnecting to a Redis that kept its data resends nothing old."""
        s = Scripted(epoch=b"e1")
        s.smtpd.refuse("192.0.2.70")
        s.clock.advance(0.05)
        s.endpoint.sent()
        s.endpoint.reply(records())
        s.endpoint.protocol.connectionLost()
        s.clock.advance(0.25)
        s.handshake(epoch=b"e1")
        s.clock.advance(1)
        assert b"192.0.2.70" not in s.endpoint.sent()

    def test_stop_sends_everything_pending(self) -> None:
        """At stop, every pending update goes, beyond the in-flight limit."""
        s = Scripted(max_batch=2)
        for n in range(20):
            s.smtpd.refuse(f"198.51.100.{n + 1}")
        s.tracker.stop()
        sent = s.endpoint.sent()
        assert sent.count(b"EVALSHA") == 10
        for n in range(20):
            assert f"198.51.100.{n + 1}".encode() in sent

    def test_refused_login(self) -> None:
        """A wrong password is said as such, not as an unreachable Redis."""
        clock = Clock()
        clock.advance(START)
        endpoint = ScriptedEndpoint()
        tracker = RedisLoadTracker(
            clock,
            BASE,
            RedisSettings(url=RedisURL("unix", path="/x", password="wrong")),  # noqa: S106 - a test value
            endpoint=endpoint,
        )
        with capture_logs() as events:
            tracker.start()
            assert b"AUTH" in endpoint.sent()
            endpoint.reply(b"-WRONGPASS invalid username-password pair\r\n")
        (down,) = events_named(events, "backend_down")
        assert "refused to set up" in down["reason"]
        assert "WRONGPASS" in down["reason"]
        assert dict(tracker.backend().errors)["error"] == 1
        assert tracker.state == "down"

    def test_host_load_refused_is_logged_once(self) -> None:
        """A refused host-load script is logged (once a minute), not silent."""
        s = Scripted()
        s.tracker.connection_opened(1, "mx1")
        s.smtpd.ask(1)
        with capture_logs() as events:
            for _ in range(3):
                s.tracker.tick()
                s.endpoint.sent()
                s.endpoint.reply(bulk(b"e1"), b"-NOPERM no permission\r\n")
                s.clock.advance(1)
        (error,) = events_named(events, "backend_error")
        assert "NOPERM" in error["error"]
        assert dict(s.tracker.backend().errors)["error"] == 3

    def test_stop_closes(self) -> None:
        """stop() writes what is pending, then closes the connection."""
        s = Scripted()
        s.smtpd.refuse("192.0.2.80")
        stopped = s.tracker.stop()
        sent = s.endpoint.sent()
        assert b"192.0.2.80" in sent
        assert sent.endswith(encode([b"PING"]))
        s.endpoint.reply(records(), b"+PONG\r\n")
        assert s.endpoint.transports[-1].disconnecting
        s.endpoint.protocol.connectionLost()
        assert stopped.called
