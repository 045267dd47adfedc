"""
The shared measure of connection load, and what policyd remembers per client.

Postfix is overloaded when more SMTP clients want an smtpd process than there
are processes.  policyd cannot see master(8)'s process table, but every live
smtpd process that has used the policy service holds one policy connection,
so connections approximate processes, and *busy* connections (one that sent
a request within `LoadSettings.busy_window`, or whose SMTP transaction is
still open) approximate busy processes.  An idle Postfix holding many open
connections is therefore not load.

The tracker combines, into one load ratio and a stress level:

1. busy connections / `LoadSettings.capacity` (the smtpd process limit);
2. the request rate over a short window / `LoadSettings.rate_capacity`
   (optional: off when the capacity is 0);
3. Postfix's own ``stress=yes``, a late signal, held for
   `LoadSettings.postfix_stress_hold` and used as a floor for the level.

Levels move up at once when the load crosses an *enter* threshold, and down
only after the load has stayed below the *exit* threshold for
`LoadSettings.min_dwell`, so they do not flap.

Per client (grouped by address prefix: IPv4 /32 and IPv6 /64 by default) it
keeps the number of smtpd processes the client holds (its busy connections),
its recent rate of new sessions and new messages, and its recent refusals, in
an LRU-bounded table: memory stays bounded however many addresses a botnet
uses, and the cost of a request does not grow with the number of clients.

`LoadTracker` is the interface; `MemoryLoadTracker` keeps everything in this
process.  A backend shared by several MX hosts implements the same interface
and passes the same contract tests (tests/load_contract.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Final, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from policyd.clients import ClientKeys
from policyd.counting import NEVER, NO_EVENTS, RateWindow, add_event, decay, events
from policyd.levels import (
    ELEVATED,
    LEVEL_NAMES,
    NORMAL,
    OVERLOAD,
    ClientStats,
    LevelMachine,
)
from policyd.request import (
    DATA,
    END_OF_MESSAGE,
    SESSION_STATES,
    TRANSACTION_STATES,
    PolicyRequest,
)

__all__ = [
    "ALL_HOSTS",
    "ELEVATED",
    "LEVEL_NAMES",
    "LOCAL_HOST",
    "NORMAL",
    "OVERLOAD",
    "BackendStatus",
    "ClientKeys",
    "ClientStats",
    "HostLoad",
    "LoadSettings",
    "LoadSnapshot",
    "LoadTracker",
    "MemoryLoadTracker",
]

log = Logger()


# A session that gets as far as a transaction stage (a recipient, or beyond)
# made progress; one that never gets there and is not refused held its smtpd
# process for nothing.
PROGRESS_STATES: Final = TRANSACTION_STATES

#: The host of connections whose Postfix host is not told apart: policyd
#: serving the Postfix of its own machine.
LOCAL_HOST: Final = "local"
#: What a snapshot of several hosts together names as its host.
ALL_HOSTS: Final = "all"

# What a client did, as a tracker's journal reports it (`MemoryLoadTracker`'s
# *journal*): a new session, a new message, seconds of process time held
# without progress, a refusal.
SESSIONS: Final = 0
MESSAGES: Final = 1
HELD: Final = 2
REFUSALS: Final = 3

#: journal(client key, what, how much, when): one thing a client did.
Journal = Callable[[int, int, float, float], None]


@attrs.frozen
class BackendStatus:
    """Where a tracker keeps what it shares, and how that is going (metrics)."""

    #: ``memory`` or ``redis``.
    name: str
    #: Whether the shared store answers (always, in memory).
    up: bool = True
    #: Failures talking to the store, by reason.
    errors: tuple[tuple[str, int], ...] = ()
    #: Decisions taken on this process's own view because the store was
    #: down, slow or late.
    fallbacks: int = 0
    #: Clients whose updates wait to be written to the store.
    pending: int = 0


@attrs.frozen
class LoadSettings:
    """The thresholds and windows of the load tracker (see docs/stress.md)."""

    #: The smtpd process limit of a Postfix host, unless `host_capacities`
    #: names it.
    capacity: int = 100
    host_capacities: tuple[tuple[str, int], ...] = ()
    #: How hosts are told apart: "peer" (as `connection_opened` says) or
    #: "policy_context" (the attribute, where a request carries it).
    host_from: str = "peer"
    busy_window: float = 10.0
    transaction_timeout: float = 30.0
    close_linger: float = 5.0
    elevated_enter: float = 0.7
    elevated_exit: float = 0.5
    overload_enter: float = 0.9
    overload_exit: float = 0.75
    min_dwell: float = 30.0
    rate_capacity: float = 0.0
    rate_window: int = 10
    postfix_stress_hold: float = 60.0
    postfix_stress_level: int = OVERLOAD
    # Postfix's stress=yes counts only while the load ratio is at least this:
    # master marks new smtpd processes for 1000 s after the last saturation.
    postfix_stress_min_load: float = 0.5
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    max_tracked_clients: int = 100_000
    client_rate_window: float = 60.0
    # Process holders: the first hold_grace seconds of every wait between two
    # requests of a session are free; the rest is charged to the client and
    # decays with the time constant hold_window.
    hold_grace: float = 5.0
    hold_window: float = 600.0
    # Overload pressure: one step per pressure_step seconds of overload with
    # the load above overload_exit (down one per pressure_step below it),
    # from 0 to max_pressure; 0 s jumps at once.
    pressure_step: float = 10.0
    max_pressure: int = 1


@attrs.frozen
class LoadSnapshot:
    """The load as the metrics and the logs show it, at one moment."""

    level: int
    load_ratio: float
    connections: int
    busy_connections: int
    transactions: int
    request_rate: float
    postfix_stress: bool
    tracked_clients: int
    postfix_stress_seen: int
    evictions: int
    transitions: dict[str, int]
    #: The Postfix host this is the load of; ``all`` for several together.
    host: str = LOCAL_HOST
    #: Its smtpd process limit (the sum, for several hosts together).
    capacity: int = 0
    #: How far a lasting overload has lowered its bar (the highest, for
    #: several hosts together; see `LoadTracker.pressure`).
    pressure: int = 0


class LoadTracker(Protocol):
    """
    The shared counter of connection load.

    Every method is synchronous and cheap: it runs on the path of every
    request.  A backend that shares state between hosts keeps a local view and
    synchronises it in the background (from `tick`).
    """

    @property
    def level(self) -> int:
        """The current stress level: `NORMAL`, `ELEVATED` or `OVERLOAD`.

        With several Postfix hosts, the highest of theirs; each request is
        decided at its own host's level (what `observe` returns).
        """

    @property
    def pressure(self) -> int:
        """
        How long the current overload has lasted, in steps.

        0 outside overload; one more per `LoadSettings.pressure_step` while
        the load stays above `LoadSettings.overload_exit`, up to
        `LoadSettings.max_pressure`; one less per step once it falls.  The
        policy lowers its bar by this much (`policyd.policy.bar`).  With
        several Postfix hosts, the highest of theirs.
        """

    def pressure_at(self, request: PolicyRequest) -> int:
        """The pressure of the Postfix host *request* came from (see `pressure`).

        A request is decided with its own host's pressure, as at its own
        host's level: one host's long overload does not lower the bar for
        another's clients.
        """

    def busy_requests(self, host: str | None = None) -> list[PolicyRequest]:
        """The latest request of each busy connection (who holds the processes).

        Of Postfix host *host* only, if given.
        """

    def connection_opened(self, connection: int, host: str = LOCAL_HOST) -> None:
        """A policy connection (an smtpd process of Postfix host *host*) arrived."""

    def connection_closed(self, connection: int) -> None:
        """A policy connection went away."""

    def observe(self, request: PolicyRequest) -> int:
        """Account for *request*; return the stress level it is decided at."""

    def client(self, request: PolicyRequest) -> ClientStats:
        """What is known about the client of *request*."""

    def record_refusal(self, request: PolicyRequest, hangup: bool = False) -> None:
        """
        Remember that the client of *request* was refused just now.

        With *hangup* (a 421 or 521: Postfix hangs up at once), the session
        is over and its smtpd process free: until the process asks again,
        it counts towards the load once per refused client, not once per
        process, so that clients hammering at a refusal do not keep the
        level up on their own.
        """

    def tick(self) -> Deferred[None] | None:
        """
        Expire what is stale and re-evaluate the level (about once a second).

        A backend with background work (synchronising a shared store) may
        return a Deferred: the next tick waits for it, and its failure is
        logged, never raised into the request path.
        """

    def snapshot(self, host: str | None = None) -> LoadSnapshot:
        """
        The current load of *host*, or of every host together, for metrics and logs.

        Together: the highest level and load ratio, the sums of the counts.
        """

    def hosts(self) -> list[str]:
        """The Postfix hosts whose load is tracked."""

    def start(self) -> Deferred[None]:
        """
        Get ready (connect to a shared store); fires before policyd listens.

        It must fire within a bounded time even if a store is unreachable:
        policyd then starts on its local view.
        """

    def stop(self) -> Deferred[None]:
        """Let go of what `start` took; fires once done (policyd is exiting)."""

    def set_capacity(self, capacity: int) -> None:
        """
        Make *capacity* the process limit of hosts not named in host_capacities.

        From now on (POLICYD_SMTPD_CAPACITY=auto, read again on a reload).
        """

    def lookup(self, request: PolicyRequest) -> Deferred[ClientStats | None] | None:
        """
        Fetch what every policyd sharing the store knows of *request*'s client.

        ``None`` when there is nothing to wait for (the state is all here, or
        the store is down): `client` has it.  Otherwise a Deferred that
        fires, never fails, with the shared `ClientStats`, or with None once
        the store's deadline passed (`client` then answers from this
        process's own view).
        """

    def backend(self) -> BackendStatus:
        """Where the shared state lives and whether it answers."""


def _discount(busy: int, hung: int) -> int:
    """
    How many of a client's busy connections the load does not count.

    *busy* connections, *hung* of them hung up by a refusal.  A connection
    whose session policyd hung up (421, 521) is free until its smtpd process
    asks again; it stays counted as the refused client's demand,
    but once per client, and not at all while the client holds another
    process: a client hammering at its refusals is one client, however many
    processes it touches.
    """
    if not hung:
        return 0
    return hung if busy > hung else hung - 1


class HostLoad:
    """
    The load of one Postfix host: its smtpd processes, as policy connections.

    Busy connections (and which client holds each), the transactions open on
    them, the request rate, and the stress level that all of it gives
    against the host's own capacity.  A tracker keeps one per Postfix host it
    serves; a flood on one host does not raise another's level.
    """

    __slots__ = (
        "busy",
        "capacity",
        "discounted",
        "holding",
        "hung",
        "levels",
        "name",
        "open",
        "rate",
        "remote_busy",
        "remote_rate",
        "settings",
        "transactions",
    )

    def __init__(
        self,
        name: str,
        capacity: int,
        settings: LoadSettings,
        now: float,
        on_change: Callable[[HostLoad, int, int], None],
    ) -> None:
        self.name = name
        self.capacity = capacity
        self.settings = settings
        #: Open policy connections (closed ones still lingering not counted).
        self.open = 0
        self.busy = 0
        # How many busy connections the load does not count: a client's
        # connections hung up by a refusal count once, and not at all while
        # it holds another process (`_discount`).
        self.discounted = 0
        self.transactions = 0
        #: Per client key, the processes it holds here (only holders), and
        #: how many of those a refusal hung up (only clients with one).
        self.holding: dict[int, int] = {}
        self.hung: dict[int, int] = {}
        # Requests per second over rate_window one-second buckets.
        self.rate = RateWindow(settings.rate_window, now)
        #: What other policyd instances serving this host count (busy
        #: connections, requests per second), as a shared store last said.
        self.remote_busy = 0
        self.remote_rate = 0.0
        self.levels = LevelMachine(
            settings, now, lambda old, new: on_change(self, old, new)
        )

    def occupy(self, key: int) -> None:
        """Client *key* now holds one more process."""
        holding = self.holding
        busy = holding.get(key, 0)
        holding[key] = busy + 1
        # Most clients have no hung-up connection: no discount to move.
        hung = self.hung.get(key, 0) if self.hung else 0
        if hung:
            self.discounted += _discount(busy + 1, hung) - _discount(busy, hung)

    def vacate(self, key: int) -> None:
        """Client *key* holds one process less."""
        holding = self.holding
        busy = holding.get(key)
        if busy is None:
            return
        if busy > 1:
            holding[key] = busy - 1
        else:
            del holding[key]
        hung = self.hung.get(key, 0) if self.hung else 0
        if hung:
            self.discounted += _discount(busy - 1, hung) - _discount(busy, hung)

    def hang(self, key: int) -> None:
        """One of client *key*'s busy connections was hung up by a refusal."""
        busy = self.holding.get(key, 0)
        hung = self.hung.get(key, 0)
        if hung >= busy:
            return
        self.hung[key] = hung + 1
        self.discounted += _discount(busy, hung + 1) - _discount(busy, hung)

    def unhang(self, key: int) -> None:
        """A hung-up connection of client *key* is asked on again, or idle."""
        hung = self.hung.get(key, 0)
        if hung <= 0:
            return
        if hung > 1:
            self.hung[key] = hung - 1
        else:
            del self.hung[key]
        busy = self.holding.get(key, 0)
        self.discounted += _discount(busy, hung - 1) - _discount(busy, hung)

    def concurrency(self, key: int) -> int:
        """Processes client *key* holds here, hung-up ones once in all."""
        busy = self.holding.get(key, 0)
        hung = self.hung.get(key, 0) if self.hung else 0
        return busy - _discount(busy, hung)

    def busy_now(self) -> int:
        """Busy connections, those hung up by a refusal once per client.

        With other policyd instances serving this host, theirs too.
        """
        return self.busy - self.discounted + self.remote_busy

    def load_ratio(self, now: float) -> float:
        """The load as a fraction of capacity (1.0 = every smtpd process busy)."""
        settings = self.settings
        load = (self.busy - self.discounted + self.remote_busy) / self.capacity
        if settings.rate_capacity > 0:
            load = max(
                load,
                (self.rate.rate(now) + self.remote_rate) / settings.rate_capacity,
            )
        return load

    @property
    def idle(self) -> bool:
        """No connection, nothing busy, back at normal: nothing to remember."""
        return not self.open and not self.busy and self.levels.level == NORMAL


class _Client:
    """Mutable per-client counters; slots keep a client to a few hundred bytes.

    Only what a client did, decayed over time, which a store shared by
    several hosts can share; which processes it holds now is each host's
    (`HostLoad.holding`).
    """

    __slots__ = (
        "held",
        "messages",
        "refusals",
        "refused_at",
        "sessions",
    )

    def __init__(self) -> None:
        # Decayed counts in one float each (see NO_EVENTS); shared constant
        # until the first event, so an idle client costs no float objects.
        self.sessions = NO_EVENTS
        self.messages = NO_EVENTS
        # Seconds of smtpd process time held without progress (decayed).
        self.held = NO_EVENTS
        self.refusals = 0.0
        self.refused_at = NEVER  # shared: one float object for all clients


class _Connection:
    """What the tracker knows about one policy connection (one smtpd process)."""

    __slots__ = (
        "busy",
        "busy_until",
        "client",
        "closed",
        "host",
        "hung",
        "in_data",
        "instance",
        "last_at",
        "progress",
        "refused",
        "request",
        "session_known",
    )

    def __init__(self, host: HostLoad) -> None:
        # The Postfix host whose smtpd process this is.
        self.host = host
        self.busy = False
        self.closed = False
        # Busy, but its session was hung up by a refusal (see record_refusal).
        self.hung = False
        self.busy_until = 0.0
        self.client: int | None = None
        self.instance = ""
        # The latest request, and when it came: who holds the process now.
        self.request: PolicyRequest | None = None
        self.last_at = 0.0
        # The current session began with a CONNECT (or XCLIENT) request we
        # saw, so we know where it starts and that it is still the same one.
        self.session_known = False
        # It named a recipient (or got further); policyd refused it.
        self.progress = False
        self.refused = False
        # The latest request was DATA: the message is being transferred.
        self.in_data = False


_MEMORY: Final = BackendStatus("memory")


class MemoryLoadTracker:
    """A `LoadTracker` that keeps its state in this process."""

    def __init__(
        self,
        clock: IReactorTime,
        settings: LoadSettings = LoadSettings(),
        on_level_change: Callable[[int, int, LoadSnapshot], None] | None = None,
        journal: Journal | None = None,
    ) -> None:
        """
        Track load on *clock*'s time.

        *on_level_change(old, new, snapshot)* is called for every level change
        (instead of the default log line); *journal* hears of everything a
        client does, as it is counted here (a backend sharing the counts
        writes them on).
        """
        self.clock = clock
        self.settings = settings
        self._journal = journal
        self.keys = ClientKeys(settings.ipv4_prefix, settings.ipv6_prefix)
        self._on_level_change = on_level_change
        self._connections: dict[int, _Connection] = {}
        self._clients: OrderedDict[int, _Client] = OrderedDict()
        self._hosts: dict[str, HostLoad] = {}
        self._capacities = dict(settings.host_capacities)
        self._by_context = settings.host_from == "policy_context"
        self._evictions = 0
        # What hosts forgotten since counted (level changes, stress=yes), so
        # that the counters of all hosts together never go back.
        self._retired_transitions = dict.fromkeys(LEVEL_NAMES, 0)
        self._retired_stress_seen = 0
        # Connections that name no host belong to this one.
        self._local = self._host(LOCAL_HOST)

    def _host(self, name: str) -> HostLoad:
        """The load of Postfix host *name*, created on first sight."""
        host = self._hosts.get(name)
        if host is None:
            host = self._hosts[name] = HostLoad(
                name,
                self._capacities.get(name, self.settings.capacity),
                self.settings,
                self.clock.seconds(),
                self._change,
            )
        return host

    # -- connections -------------------------------------------------------

    @property
    def level(self) -> int:
        """The current stress level (the highest of the hosts')."""
        return max(host.levels.level for host in self._hosts.values())

    @property
    def pressure(self) -> int:
        """How far a lasting overload has lowered the bar (0 to max_pressure)."""
        return max(host.levels.pressure for host in self._hosts.values())

    def pressure_at(self, request: PolicyRequest) -> int:
        """The pressure of the host *request* came from."""
        return self._host_of(request).levels.pressure

    def _host_of(self, request: PolicyRequest) -> HostLoad:
        """The host of *request*'s connection (`LOCAL_HOST` if not tracked)."""
        state = self._connections.get(request.connection)
        return state.host if state is not None else self._local

    def hosts(self) -> list[str]:
        """The Postfix hosts whose load is tracked (`LOCAL_HOST` always)."""
        return list(self._hosts)

    def loads(self) -> list[HostLoad]:
        """The load of each Postfix host tracked (`LOCAL_HOST` first)."""
        return list(self._hosts.values())

    def busy_requests(self, host: str | None = None) -> list[PolicyRequest]:
        """
        The latest request of every busy connection: who holds the processes.

        Of Postfix host *host* only, if given.  Counted as the load counts
        them: connections hung up by a refusal once per client, and not at
        all for a client holding another.
        """
        held: list[PolicyRequest] = []
        holding: set[tuple[str, int | None]] = set()
        hung: dict[tuple[str, int | None], PolicyRequest] = {}
        for state in self._connections.values():
            if not state.busy or state.request is None:
                continue
            if host is not None and state.host.name != host:
                continue
            holder = (state.host.name, state.client)
            if state.hung:
                hung.setdefault(holder, state.request)
            else:
                held.append(state.request)
                holding.add(holder)
        return held + [r for c, r in hung.items() if c not in holding]

    def connection_opened(self, connection: int, host: str = LOCAL_HOST) -> None:
        """Start tracking a connection from Postfix host *host*."""
        if connection not in self._connections:
            self._open(connection, self._host(host))

    def _open(self, connection: int, host: HostLoad) -> _Connection:
        """A connection of *host*, tracked from now on."""
        state = self._connections[connection] = _Connection(host)
        host.open += 1
        return state

    def connection_closed(self, connection: int) -> None:
        """
        Stop tracking a connection; its smtpd process has gone.

        Its transaction ends at once.  If it was busy, it still counts as busy
        for up to `LoadSettings.close_linger`: when Postfix hits its process
        limit, master asks every smtpd process to exit after its session and
        starts fresh ones, so busy processes close their connections at the
        very moment of saturation.  Dropping them at once would make the load
        dip just when it peaks.
        """
        state = self._connections.get(connection)
        if state is None or state.closed:
            return
        host = state.host
        host.open -= 1
        if state.instance:
            state.instance = ""
            host.transactions -= 1
        now = self.clock.seconds()
        self._end_session(state, now)
        linger_until = min(state.busy_until, now + self.settings.close_linger)
        if state.busy and linger_until > now:
            state.closed = True
            state.busy_until = linger_until
            return
        del self._connections[connection]
        if state.busy:
            self._release(state)

    def _release(self, state: _Connection) -> None:
        """A busy connection becomes idle."""
        host = state.host
        if state.hung:
            self._unhang(state)
        state.busy = False
        host.busy -= 1
        if state.instance:
            state.instance = ""
            host.transactions -= 1
        if state.client is not None:
            host.vacate(state.client)

    # -- requests ----------------------------------------------------------

    def observe(self, request: PolicyRequest) -> int:
        """Account for one request and return the level to decide it at."""
        now = self.clock.seconds()
        settings = self.settings
        state = self._connections.get(request.connection)
        if state is None:
            state = self._open(request.connection, self._local)
        elif state.hung:
            # The process asks again: it serves someone, and counts in full.
            self._unhang(state)
        if self._by_context and state.request is None:
            self._place(state, request)
        host = state.host
        host.rate.count(now)
        if request.stress:
            host.levels.postfix_stress(now)
        key = self.keys.key(request.client_address)
        client = self._touch(key)
        self._account_hold(state, request, key, client, now)

        instance = request.instance
        if instance:
            if instance != state.instance:
                # A new instance on a connection: the previous transaction on
                # it has ended, and the client starts a new message.
                client.messages = add_event(
                    client.messages, now, settings.client_rate_window
                )
                if self._journal is not None:
                    self._journal(key, MESSAGES, 1.0, now)
                if not state.instance:
                    host.transactions += 1
                state.instance = instance
            if request.protocol_state == END_OF_MESSAGE:
                # Wired into smtpd_end_of_data_restrictions, Postfix tells us
                # when the message is complete: the transaction ends here.
                state.instance = ""
                host.transactions -= 1
                busy_until = now + settings.busy_window
            else:
                busy_until = now + settings.transaction_timeout
        else:
            if state.instance:
                state.instance = ""
                host.transactions -= 1
            if request.protocol_state in SESSION_STATES:
                client.sessions = add_event(
                    client.sessions, now, settings.client_rate_window
                )
                if self._journal is not None:
                    self._journal(key, SESSIONS, 1.0, now)
            busy_until = now + settings.busy_window

        if not state.busy:
            state.busy = True
            host.busy += 1
            host.occupy(key)
        elif state.client != key:
            # Same smtpd process, next session: a different client holds it.
            if state.client is not None:
                host.vacate(state.client)
            host.occupy(key)
        state.client = key
        state.busy_until = busy_until
        return host.levels.evaluate(now, host.load_ratio(now))

    def _place(self, state: _Connection, request: PolicyRequest) -> None:
        """Put a connection's first request's host where its policy_context says.

        Postfix sends the same policy_context on every request of one
        check_policy_service connection, so the first request decides.
        """
        context = request.raw.get(b"policy_context")
        if not context:
            return
        name = context.decode("utf-8", "replace")
        if name != state.host.name:
            state.host.open -= 1
            state.host = self._host(name)
            state.host.open += 1

    def _account_hold(
        self,
        state: _Connection,
        request: PolicyRequest,
        key: int,
        client: _Client,
        now: float,
    ) -> None:
        """Charge the wait before *request* to whoever kept the process waiting.

        Only waits that are surely inside one session are charged: after a
        CONNECT we saw (until the next one), or inside one transaction (same
        `instance`).  Without the CONNECT request the gap between two
        sessions of the same client on one smtpd process would look like a
        wait, and include the time the process sat idle.  The wait between
        DATA and END-OF-MESSAGE is the message being transferred, which a
        slow link is entitled to; it is never charged.
        """
        state_name = request.protocol_state
        last = state.request
        if state_name in SESSION_STATES:
            self._end_session(state, now)
            state.session_known = True
            state.progress = state.refused = False
        elif last is not None and state.client != key:
            # Another client on this process: a new session whose start we
            # did not see (no CONNECT wiring).
            self._end_session(state, now)
            state.session_known = False
            state.progress = state.refused = False
        elif (
            last is not None
            and now - state.last_at > self.settings.hold_grace
            and not state.in_data
            and (
                state.session_known
                or (request.instance and request.instance == last.instance)
            )
        ):
            self._charge(key, client, now - state.last_at, now)
        if state_name in PROGRESS_STATES:
            state.progress = True
            state.in_data = state_name == DATA
        else:
            state.in_data = False
        state.last_at = now
        state.request = request

    def _end_session(self, state: _Connection, now: float) -> None:
        """The session on *state* ended; charge it if it held for nothing.

        A session that began with a CONNECT we saw and ended before naming a
        recipient, without being refused, is charged the time from its last
        request to its end, at most `LoadSettings.busy_window` (the same
        assumption the load count makes: when the next request on the
        process comes much later, the process may have sat idle meanwhile).
        """
        if not state.session_known or state.progress or state.refused:
            return
        if state.client is None:
            return
        record = self._clients.get(state.client)
        if record is not None:
            self._charge(
                state.client,
                record,
                min(now - state.last_at, self.settings.busy_window),
                now,
            )

    def _charge(self, key: int, record: _Client, waited: float, now: float) -> None:
        excess = waited - self.settings.hold_grace
        if excess > 0:
            record.held = add_event(record.held, now, self.settings.hold_window, excess)
            if self._journal is not None:
                self._journal(key, HELD, excess, now)

    def _unhang(self, state: _Connection) -> None:
        state.hung = False
        if state.client is not None:
            state.host.unhang(state.client)

    def _touch(self, key: int) -> _Client:
        clients = self._clients
        client = clients.get(key)
        if client is None:
            # Make room first: evicting after the insert could forget the
            # newcomer itself (it holds no process yet), losing this request.
            if len(clients) >= self.settings.max_tracked_clients:
                self._evict()
            client = clients[key] = _Client()
        else:
            clients.move_to_end(key)
        return client

    def _evict(self) -> None:
        """Forget the least recently seen client that holds no smtpd process."""
        clients = self._clients
        # Clients holding a process are skipped (their counts are live); there
        # are at most as many as connections, so this loop is bounded.  It
        # goes round the table at most once, so that if every client holds a
        # process the order is back as it was and the least recent one goes.
        hosts = self._hosts.values()
        for _ in range(min(len(clients), len(self._connections) + 1)):
            key, record = clients.popitem(last=False)
            if not any(key in host.holding for host in hosts):
                break
            clients[key] = record
        else:
            # Every candidate holds a process: the table is smaller than the
            # number of smtpd processes.  Evict anyway to stay bounded (what
            # it holds stays counted by its hosts).
            clients.popitem(last=False)
        self._evictions += 1

    def request_rate(self) -> float:
        """Requests per second over `LoadSettings.rate_window`, all hosts."""
        now = self.clock.seconds()
        return sum(host.rate.rate(now) for host in self._hosts.values())

    def client(self, request: PolicyRequest) -> ClientStats:
        """The counters of the client of *request* (zeros if unknown)."""
        key = self.keys.key(request.client_address)
        now = self.clock.seconds()
        settings = self.settings
        window = settings.client_rate_window
        record = self._clients.get(key)
        host = self._host_of(request)
        if record is None:
            return ClientStats(
                self.keys.describe(key), host.concurrency(key), 0.0, 0.0, 0.0, None
            )
        per_minute = 60.0 / window
        # Positional, in the order of the fields: keywords make building the
        # frozen class ~0.2 µs slower, and this runs for every scored request.
        return ClientStats(
            self.keys.describe(key),
            # concurrency on the request's host: connections hung up by a
            # refusal hold nothing, and count once in all.
            host.concurrency(key),
            # session_rate, message_rate
            events(record.sessions, now, window) * per_minute,
            events(record.messages, now, window) * per_minute,
            # refusals, since_refusal
            decay(record.refusals, record.refused_at, now, window),
            None if record.refused_at == NEVER else now - record.refused_at,
            # held
            events(record.held, now, settings.hold_window),
        )

    def record_refusal(self, request: PolicyRequest, hangup: bool = False) -> None:
        """Remember a refusal of the client of *request* (see `LoadTracker`)."""
        now = self.clock.seconds()
        key = self.keys.key(request.client_address)
        record = self._touch(key)
        state = self._connections.get(request.connection)
        if state is not None:
            # A refused session did not hold its process by choice.
            state.refused = True
            if hangup and state.busy and not state.hung and state.client == key:
                state.hung = True
                if state.instance:
                    # Postfix hung up: the transaction is over too.
                    state.instance = ""
                    state.host.transactions -= 1
                state.host.hang(key)
        if record.refused_at == NEVER:
            record.refusals = 1.0
        else:
            record.refusals = (
                decay(
                    record.refusals,
                    record.refused_at,
                    now,
                    self.settings.client_rate_window,
                )
                + 1.0
            )
        record.refused_at = now
        if self._journal is not None:
            self._journal(key, REFUSALS, 1.0, now)

    def lookup(self, request: PolicyRequest) -> None:
        """Nothing to fetch: everything is in this process."""
        return None

    def set_capacity(self, capacity: int) -> None:
        """The process limit of hosts not named in host_capacities, from now on."""
        self.settings = attrs.evolve(self.settings, capacity=capacity)
        for host in self._hosts.values():
            if host.name not in self._capacities:
                host.capacity = capacity

    def holding(self, request: PolicyRequest) -> tuple[str, int]:
        """
        *request*'s client as text, and the processes it holds on its host.

        What a shared record lacks: which processes a client holds is each
        host's own.
        """
        key = self.keys.key(request.client_address)
        return self.keys.describe(key), self._host_of(request).concurrency(key)

    def backend(self) -> BackendStatus:
        """The memory of this process: always up."""
        return _MEMORY

    def records(self) -> Iterator[tuple[int, float, float, float, float, float]]:
        """
        What each tracked client did: its counts, decayed to now.

        Tuples of (key, sessions, messages, held, refusals, refused_at), with
        NEVER for a client never refused; least recently seen first.  A
        shared store that lost its data is sent this, so that it holds again
        what this process counted.
        """
        now = self.clock.seconds()
        settings = self.settings
        window = settings.client_rate_window
        for key, record in list(self._clients.items()):
            yield (
                key,
                events(record.sessions, now, window),
                events(record.messages, now, window),
                events(record.held, now, settings.hold_window),
                decay(record.refusals, record.refused_at, now, window),
                record.refused_at,
            )

    # -- the level ---------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Nothing to start: everything is in this process."""
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """Nothing to stop."""
        return succeed(None)

    def tick(self) -> None:
        """Release connections whose busy window or transaction ran out."""
        now = self.clock.seconds()
        gone = []
        for connection, state in self._connections.items():
            if state.busy and state.busy_until <= now:
                self._release(state)
                if state.closed:
                    gone.append(connection)
        for connection in gone:
            del self._connections[connection]
        for name, host in list(self._hosts.items()):
            host.levels.evaluate(now, host.load_ratio(now))
            if host is not self._local and host.idle:
                self._retire(name)

    def _retire(self, name: str) -> None:
        """Forget host *name*; keep what it counted in the totals."""
        levels = self._hosts.pop(name).levels
        for level, count in levels.transitions.items():
            self._retired_transitions[level] += count
        self._retired_stress_seen += levels.stress_seen

    def load_ratio(self) -> float:
        """The load as a fraction of capacity (1.0 = every smtpd process busy).

        With several hosts, the highest of theirs.
        """
        now = self.clock.seconds()
        return max(host.load_ratio(now) for host in self._hosts.values())

    def _change(self, host: HostLoad, old: int, new: int) -> None:
        """A host's level machine changed its level: the callback, or a log line."""
        snapshot = self.snapshot(host.name)
        if self._on_level_change is not None:
            # The callback logs the change (policyd.holders.LevelChangeLog
            # adds who holds the processes and what to do).
            self._on_level_change(old, new, snapshot)
            return
        log.info(
            "Stress level {old_level} -> {new_level} (load {load:.2f}, "
            "{busy} busy of {capacity}, {rate:.1f} requests/s, Postfix stress "
            "{postfix_stress})",
            event="stress_level",
            host=host.name,
            old_level=LEVEL_NAMES[old],
            new_level=LEVEL_NAMES[new],
            load=snapshot.load_ratio,
            busy=snapshot.busy_connections,
            capacity=host.capacity,
            rate=snapshot.request_rate,
            postfix_stress="yes" if snapshot.postfix_stress else "no",
        )

    def snapshot(self, host: str | None = None) -> LoadSnapshot:
        """The current load of Postfix host *host*, or of all hosts together.

        Together: the highest level and load ratio, the sums of the counts
        (counters include the hosts forgotten since).  A host not tracked
        (never seen, or forgotten) is a KeyError.
        """
        now = self.clock.seconds()
        together = host is None
        hosts = list(self._hosts.values()) if host is None else [self._hosts[host]]
        transitions = (
            dict(self._retired_transitions)
            if together
            else dict.fromkeys(LEVEL_NAMES, 0)
        )
        stress_seen = self._retired_stress_seen if together else 0
        for load in hosts:
            for name, count in load.levels.transitions.items():
                transitions[name] += count
        return LoadSnapshot(
            level=max(load.levels.level for load in hosts),
            load_ratio=max(load.load_ratio(now) for load in hosts),
            connections=sum(load.open for load in hosts),
            busy_connections=sum(load.busy_now() for load in hosts),
            transactions=sum(load.transactions for load in hosts),
            request_rate=sum(load.rate.rate(now) + load.remote_rate for load in hosts),
            postfix_stress=any(load.levels.stressed(now) for load in hosts),
            tracked_clients=len(self._clients),
            postfix_stress_seen=stress_seen
            + sum(load.levels.stress_seen for load in hosts),
            evictions=self._evictions,
            transitions=transitions,
            host=hosts[0].name if len(hosts) == 1 else ALL_HOSTS,
            capacity=sum(load.capacity for load in hosts),
            pressure=max(load.levels.pressure for load in hosts),
        )
