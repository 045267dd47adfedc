"""The server: the factory that owns shared state, and the listeners around it.

`PolicyFactory` builds one `PolicyProtocol` per connection and owns what the
connections share: the decider, the limits, the metrics and the set of live
connections, which it sweeps once a second for stalled or idle ones.
`PolicyServer` binds the factory to the configured endpoints, serves
``/metrics`` and ``/healthz``, and stops gracefully: stop listening, answer
what is in flight, close.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Sequence
from typing import Final

import attrs
from prometheus_client import CollectorRegistry
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.server import Site

from policyd import policy
from policyd.actions import Action
from policyd.config import AUTO_CAPACITY, Config
from policyd.decision import Decider, PolicyDecider
from policyd.doctor import auto_capacity, describe_capacity, read_postfix_async
from policyd.holders import LevelChangeLog
from policyd.lists import ListFileError, read_domains, read_networks
from policyd.load import (
    ELEVATED,
    LOCAL_HOST,
    NORMAL,
    OVERLOAD,
    LoadSettings,
    LoadTracker,
    MemoryLoadTracker,
)
from policyd.metrics import (
    HoldersCollector,
    LoadCollector,
    MetricsRoot,
    PolicyMetrics,
)
from policyd.policy import PolicySettings
from policyd.postconf import PostconfError
from policyd.protocol import (
    DECISION_FAILURE_REASONS,
    PROTOCOL_ERROR_REASONS,
    Limits,
    PolicyProtocol,
)
from policyd.shared import RedisLoadTracker, RedisSettings

log = Logger()

# How often connections are checked for stalled requests and idleness; the
# timeouts are enforced to within this much.
SWEEP_INTERVAL = 1.0
# How long stop() waits for closing connections to flush their last replies.
CLOSE_TIMEOUT = 1.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: A refused peer address is logged at most once per this many seconds, and
#: at most this many addresses are remembered for it (a scan of the whole
#: Internet must not grow a table or flood the log).
PEER_LOG_INTERVAL: Final = 60.0
PEER_LOG_MEMORY: Final = 1024

#: A failing tracker tick is logged at most once per this many seconds.
TICK_ERROR_LOG_INTERVAL: Final = 60.0

LOOPBACK: Final = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def peer_ip(address: IAddress | None) -> IPAddress | None:
    """The IP address of a peer, IPv4-mapped IPv6 as IPv4; None if not IP."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def host_of(peer: IAddress | None) -> str:
    """The Postfix host a policy connection comes from, by its peer address.

    Loopback and unix-socket peers are this machine's Postfix: `LOCAL_HOST`.
    """
    ip = peer_ip(peer)
    if ip is None or ip.is_loopback:
        return LOCAL_HOST
    return str(ip)


def only_loopback(allowed: Sequence[Network]) -> bool:
    """Whether *allowed* admits nothing but loopback peers."""
    return all(
        any(
            net.version == loop.version and net.subnet_of(loop)  # type: ignore[arg-type]
            for loop in LOOPBACK
        )
        for net in allowed
    )


class PolicyFactory(Factory):
    """Builds policy connections and holds the state they share."""

    noisy = False

    def __init__(
        self,
        *,
        clock: IReactorTime,
        decider: Decider,
        metrics: PolicyMetrics,
        limits: Limits = Limits(),  # noqa: B008 - immutable
        fallback: Action,
        decision_timeout: float,
        request_timeout: float,
        idle_timeout: float,
        log_requests: bool = False,
        tracker: LoadTracker | None = None,
        allow_peers: Sequence[Network] | None = None,
        timer: Callable[[], float] | None = None,
    ) -> None:
        self.clock = clock
        #: What decisions are timed with: a clock that never jumps in
        #: production (time.monotonic); *clock* when not given (tests).
        self.timer = timer if timer is not None else clock.seconds
        self.tracker = tracker
        #: Who may connect over IP (None: everyone).
        self.allow_peers = tuple(allow_peers) if allow_peers is not None else None
        self._peers_logged: dict[str, float] = {}
        self.decider = decider
        self.metrics = metrics
        self.limits = limits
        self.fallback = fallback
        self.decision_timeout = decision_timeout
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.log_requests = log_requests
        self.protocols: set[PolicyProtocol] = set()
        self._ids = itertools.count(1)
        self._drain_waiters: list[Deferred[None]] = []
        self._tick_failures = 0
        self._tick_logged_at = -TICK_ERROR_LOG_INTERVAL
        self._close_waiters: list[Deferred[None]] = []
        metrics.active_connections.set_function(lambda: len(self.protocols))

    def buildProtocol(self, addr: IAddress | None) -> PolicyProtocol | None:
        """Make the protocol for a new connection; None closes it at once.

        A peer with an IP address outside `allow_peers` gets no protocol:
        Twisted closes the connection before a byte is read.
        """
        if self.allow_peers is not None and not self.peer_allowed(addr):
            self._refuse_peer(addr)
            return None
        return PolicyProtocol(self, next(self._ids))

    def peer_allowed(self, addr: IAddress | None) -> bool:
        """Whether *addr* may connect (peers without an IP address may)."""
        allowed = self.allow_peers
        if allowed is None:
            return True
        ip = peer_ip(addr)
        if ip is None:
            return True
        return any(ip in network for network in allowed)

    def _refuse_peer(self, addr: IAddress | None) -> None:
        self.metrics.peers_refused.inc()
        peer = str(peer_ip(addr))
        now = self.clock.seconds()
        logged = self._peers_logged
        last = logged.get(peer)
        if last is not None and now - last < PEER_LOG_INTERVAL:
            return
        if len(logged) >= PEER_LOG_MEMORY:
            logged.clear()
        logged[peer] = now
        log.warn(
            "Closed a connection from {peer}: not in POLICYD_ALLOW_PEERS "
            "(logged once a minute per address)",
            event="peer_refused",
            peer=peer,
        )

    def connection_made(self, protocol: PolicyProtocol) -> None:
        """Track a new connection, as one of its Postfix host's processes."""
        self.protocols.add(protocol)
        self.metrics.connections.inc()
        if self.tracker is not None:
            transport = protocol.transport
            peer = transport.getPeer() if transport is not None else None
            self.tracker.connection_opened(protocol.connection_id, host_of(peer))

    def connection_lost(self, protocol: PolicyProtocol) -> None:
        """Forget a closed connection."""
        self.protocols.discard(protocol)
        if self.tracker is not None:
            self.tracker.connection_closed(protocol.connection_id)
        self.answered_all(protocol)
        if self._close_waiters and not any(p.closing for p in self.protocols):
            waiters, self._close_waiters = self._close_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def answered_all(self, protocol: PolicyProtocol) -> None:
        """Note that *protocol* has nothing in flight any more."""
        if self._drain_waiters and not any(p.busy for p in self.protocols):
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def sweep(self) -> Deferred[None] | None:
        """
        Close connections whose partial request stalled or that sat idle.

        Also lets the load tracker expire busy connections and re-evaluate
        the stress level when no request arrives to do it.
        """
        now = self.clock.seconds()
        for protocol in list(self.protocols):
            protocol.check_timeouts(now)
        if self.tracker is None:
            return None
        # A failing tick must not stop the sweeps (a LoopingCall stops at
        # the first error) nor reach a request: it is logged, and the next
        # sweep comes as usual.  A Deferred is waited for (LoopingCall does
        # not start the next sweep before it fires), so ticks never overlap.
        try:
            result = self.tracker.tick()
        except Exception:  # noqa: BLE001 - logged; the sweeps go on
            self._tick_failed(Failure())
            return None
        if isinstance(result, Deferred):
            return result.addErrback(self._tick_failed)
        return None

    def _tick_failed(self, failure: Failure) -> None:
        """Log a tick's failure, at most once a minute (with how many since)."""
        self._tick_failures += 1
        now = self.clock.seconds()
        if now - self._tick_logged_at < TICK_ERROR_LOG_INTERVAL:
            return
        self._tick_logged_at = now
        log.failure(
            "The load tracker's periodic work failed ({failures} times since "
            "the last report); requests are still answered",
            failure,
            event="tick_error",
            failures=self._tick_failures,
        )
        self._tick_failures = 0

    def drain(self) -> Deferred[None]:
        """Fire once no connection has a request in flight."""
        if not any(p.busy for p in self.protocols):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def closed(self) -> Deferred[None]:
        """Fire once every connection that is closing has gone."""
        if not any(p.closing for p in self.protocols):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        return waiter

    def close_idle(self) -> None:
        """Close every connection that has nothing in flight."""
        for protocol in list(self.protocols):
            protocol.close_when_idle()


_STRESS_LEVELS = {"ignore": NORMAL, "elevated": ELEVATED, "overload": OVERLOAD}


def load_settings(config: Config, capacity: int | None = None) -> LoadSettings:
    """The load tracker's settings from the configuration.

    *capacity* replaces POLICYD_SMTPD_CAPACITY (what ``auto`` read from Postfix).
    """
    return LoadSettings(
        capacity=config.smtpd_capacity if capacity is None else capacity,
        host_capacities=config.host_capacities,
        host_from=config.host_from,
        busy_window=config.busy_window,
        transaction_timeout=config.transaction_timeout,
        close_linger=config.close_linger,
        elevated_enter=config.elevated_enter,
        elevated_exit=config.elevated_exit,
        overload_enter=config.overload_enter,
        overload_exit=config.overload_exit,
        min_dwell=config.level_min_dwell,
        rate_capacity=config.rate_capacity,
        rate_window=max(1, round(config.rate_window)),
        postfix_stress_hold=config.postfix_stress_hold,
        postfix_stress_level=_STRESS_LEVELS[config.postfix_stress_level],
        postfix_stress_min_load=config.postfix_stress_min_load,
        ipv4_prefix=config.client_ipv4_prefix,
        ipv6_prefix=config.client_ipv6_prefix,
        max_tracked_clients=config.max_tracked_clients,
        client_rate_window=config.client_rate_window,
        hold_grace=config.hold_grace,
        hold_window=config.hold_window,
        pressure_step=config.bar_step,
        max_pressure=max(0, config.suspicious_score - config.overload_suspicious_score),
    )


def build_tracker(
    config: Config, reactor: IReactorTime, level_log: LevelChangeLog, capacity: int
) -> LoadTracker:
    """
    The tracker the configuration describes (POLICYD_BACKEND).

    In memory, or sharing clients in Redis; level changes are logged by
    *level_log*, with who holds the processes.
    """
    tracker: MemoryLoadTracker | RedisLoadTracker
    if config.backend == "redis":
        tracker = RedisLoadTracker(
            reactor,
            load_settings(config, capacity),
            RedisSettings(
                url=config.redis_url,
                prefix=config.redis_prefix,
                deadline=config.redis_deadline,
                timeout=config.redis_timeout,
            ),
            level_log.level_changed,
        )
    else:
        tracker = MemoryLoadTracker(
            reactor, load_settings(config, capacity), level_log.level_changed
        )
    level_log.tracker = tracker
    return tracker


def allow_lists(config: Config) -> tuple[tuple[Network, ...], tuple[str, ...]]:
    """
    The networks and domains never refused: the variables' and the files'.

    `policyd.lists.ListFileError` if a file cannot be read or has a bad line.
    """
    networks = config.allow_networks
    domains = config.allow_domains
    if config.allow_networks_file:
        networks += read_networks(config.allow_networks_file)
    if config.allow_domains_file:
        domains += read_domains(config.allow_domains_file)
    return networks, domains


def policy_settings(config: Config) -> PolicySettings:
    """The decision settings from the configuration (and its list files)."""
    networks, domains = allow_lists(config)
    return PolicySettings(
        weights={
            policy.NO_CLIENT_NAME: config.weight_no_client_name,
            policy.NO_REVERSE_NAME: config.weight_no_reverse_name,
            policy.DYNAMIC_NAME: config.weight_dynamic_name,
            policy.NO_HELO: config.weight_no_helo,
            policy.HELO_NOT_FQDN: config.weight_helo_not_fqdn,
            policy.HELO_BARE_IP: config.weight_helo_bare_ip,
            policy.HELO_FOREIGN_LITERAL: config.weight_helo_foreign_literal,
            policy.HELO_IMPERSONATES: config.weight_helo_impersonates,
            policy.CONCURRENCY: config.weight_concurrency,
            policy.MESSAGE_RATE: config.weight_message_rate,
            policy.SESSION_RATE: config.weight_session_rate,
            policy.QUICK_RETRY: config.weight_quick_retry,
            policy.PROCESS_HOLDER: config.weight_process_holder,
        },
        suspicious_score=config.suspicious_score,
        overload_suspicious_score=config.overload_suspicious_score,
        hold_limit=config.hold_limit,
        reject_score=config.reject_score,
        client_concurrency_limit=config.client_concurrency_limit,
        client_message_rate_limit=config.client_message_rate_limit,
        client_session_rate_limit=config.client_session_rate_limit,
        quick_retry_window=config.quick_retry_window,
        my_hostnames=config.my_hostnames,
        allow_networks=networks,
        allow_domains=domains,
        elevated_action=config.elevated_action,
        elevated_reject_action=config.elevated_reject_action,
        overload_action=config.overload_action,
        overload_reject_action=config.overload_reject_action,
    )


# Postfix's default smtpd_policy_service_max_idle, in seconds.
POSTFIX_MAX_IDLE = 300


class CannotListen(Exception):
    """A configured endpoint could not be listened on."""

    def __init__(self, variable: str, description: str, reason: str) -> None:
        super().__init__(variable, description, reason)
        self.variable = variable
        self.description = description
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.variable}: cannot listen on {self.description}: {self.reason}"


class _QuietSite(Site):
    """A Site that does not log every scrape as an access-log line."""

    noisy = False

    def log(self, request: Request) -> None:
        """Skip access logging: Prometheus scrapes would flood the log."""


def _address(address: IAddress) -> tuple[str, int | None]:
    host = getattr(address, "host", None)
    if host is not None:
        return str(host), getattr(address, "port", None)
    name = getattr(address, "name", None)
    return (name.decode() if isinstance(name, bytes) else str(name)), None


class PolicyServer:
    """Listeners, the factory behind them, and the metrics site."""

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        registry: CollectorRegistry,
        decider: Decider | None = None,
        tracker: LoadTracker | None = None,
        capacity: int | None = None,
        timer: Callable[[], float] | None = None,
    ) -> None:
        """
        Build everything; nothing listens before `start`.

        *timer* times each decision against POLICYD_DECISION_TIMEOUT:
        `time.monotonic` in production (the reactor's clock is the wall
        clock, and a step of it must not turn an answer into the fallback);
        the reactor's clock when not given.

        With POLICYD_SMTPD_CAPACITY=auto, *capacity* is what was read from
        Postfix (`policyd.cli` reads it before the reactor runs); a reload
        reads it again.

        *reactor* is the clock of everything (`IReactorTime`); to listen
        (`start`) it must also provide the endpoints' interfaces
        (`IReactorTCP`, `IReactorUNIX`: `serverFromString`), and for
        POLICYD_SMTPD_CAPACITY=auto reloads `IReactorProcess`, as Twisted's
        reactors do.  Tests that only decide pass a `Clock`.

        *tracker* replaces the one the configuration describes (an in-memory
        `MemoryLoadTracker` whose level changes are logged with who holds the
        processes); the server starts, ticks and stops whichever it has.
        """
        self.config = config
        self.reactor = reactor
        self.metrics = PolicyMetrics(
            registry, PROTOCOL_ERROR_REASONS, DECISION_FAILURE_REASONS
        )
        settings = self.settings = policy_settings(config)
        self.auto_capacity = config.smtpd_capacity == AUTO_CAPACITY
        if capacity is None:
            if self.auto_capacity:
                raise ValueError("POLICYD_SMTPD_CAPACITY=auto needs the capacity read")
            capacity = config.smtpd_capacity
        self.capacity = capacity
        self._level_log = LevelChangeLog(settings, capacity)
        if tracker is None:
            tracker = build_tracker(config, reactor, self._level_log, capacity)
        self.tracker: LoadTracker = tracker
        registry.register(LoadCollector(self.tracker))
        self._holders = HoldersCollector(self.tracker, settings)
        registry.register(self._holders)
        self.factory = PolicyFactory(
            clock=reactor,
            decider=decider
            if decider is not None
            else PolicyDecider(
                self.tracker,
                settings,
                self.metrics,
                dry_run=config.dry_run,
                dry_run_warn=config.dry_run_warn,
                refusal_log_limit=config.refusal_log_limit,
                clock=reactor,
            ),
            metrics=self.metrics,
            limits=Limits(
                max_line_length=config.max_line_length,
                max_attributes=config.max_attributes,
                max_request_bytes=config.max_request_bytes,
            ),
            fallback=config.fallback_action,
            decision_timeout=config.decision_timeout,
            request_timeout=config.request_timeout,
            idle_timeout=config.idle_timeout,
            log_requests=config.log_level == "debug",
            tracker=self.tracker,
            allow_peers=config.allow_peers,
            timer=timer,
        )
        self.site = _QuietSite(MetricsRoot(registry, self.health))  # type: ignore[no-untyped-call]
        self.ports: list[IListeningPort] = []
        self.metrics_port: IListeningPort | None = None
        self._sweeper = LoopingCall(self.factory.sweep)
        self._sweeper.clock = reactor
        self.stopping = False

    def reload(self) -> bool:
        """
        Read the allow-list files again (SIGHUP); True if the new lists apply.

        Connections, the load and what is known of clients are untouched.  A
        file that cannot be read, or has a bad line, keeps the lists in use
        and says why in the log.  With POLICYD_SMTPD_CAPACITY=auto, the
        capacity is read from Postfix again too (in the background).
        """
        if self.auto_capacity:
            Deferred.fromCoroutine(self._reload_capacity())
        try:
            networks, domains = allow_lists(self.config)
        except ListFileError as e:
            log.warn(
                "Reload failed, keeping the allow-lists in use: {error}",
                event="reload_failed",
                error=str(e),
            )
            return False
        settings = attrs.evolve(
            self.settings, allow_networks=networks, allow_domains=domains
        )
        self.settings = settings
        decider = self.factory.decider
        if isinstance(decider, PolicyDecider):
            decider.settings = settings
        self._holders.settings = settings
        self._level_log.settings = settings
        log.info(
            "Reloaded: {networks} allowed networks, {domains} allowed domains",
            event="reloaded",
            networks=len(networks),
            domains=len(domains),
        )
        return True

    async def _reload_capacity(self) -> None:
        """Read the capacity from Postfix again; keep the old one on failure."""
        try:
            postfix = await read_postfix_async(
                IReactorProcess(self.reactor), self.config.postfix_config_dir
            )
            found = auto_capacity(self.config.listen, postfix)
        except PostconfError as e:
            log.warn(
                "Reload kept POLICYD_SMTPD_CAPACITY at {capacity}: {error}",
                event="reload_failed",
                capacity=self.capacity,
                error=str(e),
            )
            return
        self.capacity = found.total
        self.tracker.set_capacity(found.total)
        self._level_log.capacity = found.total
        log.info(
            "POLICYD_SMTPD_CAPACITY=auto: {capacity} ({how})",
            event="capacity",
            capacity=found.total,
            how=describe_capacity(found),
        )

    def health(self) -> tuple[bool, str]:
        """Healthy while the policy listeners are up."""
        if self.stopping:
            return False, "stopping"
        if not self.ports:
            return False, "not listening"
        return True, "ok"

    async def start(self) -> None:
        """Listen on every configured endpoint.

        If any endpoint cannot be listened on, the ones already open are
        closed again and the error is raised: a half-started server would
        leave Postfix connecting to some addresses and not others.
        """
        if self.config.idle_timeout < POSTFIX_MAX_IDLE:
            log.warn(
                "POLICYD_IDLE_TIMEOUT={timeout}s is below Postfix's default "
                "smtpd_policy_service_max_idle ({max_idle}s): smtpd may find "
                "its connection closed and pay a one-second retry",
                event="config_warning",
                timeout=self.config.idle_timeout,
                max_idle=POSTFIX_MAX_IDLE,
            )
        # Before listening: the first request is decided with the tracker's
        # state (a shared store's start is bounded: it may start empty).
        await self.tracker.start()
        try:
            for description in self.config.listen:
                port = await self._listen("POLICYD_LISTEN", description, self.factory)
                self.ports.append(port)
                self._log_listening("listening", description, port)
                self._check_peers(description, port)
            if self.config.metrics_listen is not None:
                self.metrics_port = await self._listen(
                    "POLICYD_METRICS_LISTEN", self.config.metrics_listen, self.site
                )
                self._log_listening(
                    "metrics_listening", self.config.metrics_listen, self.metrics_port
                )
        except BaseException:
            await self._stop_listening()
            await self.tracker.stop()
            raise
        self._sweeper.start(SWEEP_INTERVAL, now=False)

    async def _listen(
        self, variable: str, description: str, factory: IProtocolFactory
    ) -> IListeningPort:
        try:
            endpoint = serverFromString(self.reactor, description)
        except (IndexError, KeyError) as e:
            if not description.startswith("systemd:"):
                raise CannotListen(variable, description, str(e)) from e
            raise CannotListen(
                variable,
                description,
                "systemd passed no such socket; start policyd through its "
                ".socket unit (deploy/systemd/policyd.socket)",
            ) from e
        except Exception as e:
            raise CannotListen(variable, description, str(e)) from e
        try:
            port: IListeningPort = await endpoint.listen(factory)
        except Exception as e:
            raise CannotListen(variable, description, str(e)) from e
        return port

    def _check_peers(self, description: str, port: IListeningPort) -> None:
        """Warn if a listener reaches beyond loopback but admits only loopback."""
        ip = peer_ip(port.getHost())
        if ip is None or ip.is_loopback or not only_loopback(self.config.allow_peers):
            return
        log.warn(
            "The policy service listens on {address} ({endpoint}), beyond "
            "loopback, but POLICYD_ALLOW_PEERS admits only loopback peers: "
            "connections from other hosts will be closed.  Set "
            "POLICYD_ALLOW_PEERS to your MX hosts' addresses",
            event="config_warning",
            endpoint=description,
            address=str(ip),
        )

    def _log_listening(
        self, event: str, description: str, port: IListeningPort
    ) -> None:
        address, number = _address(port.getHost())
        log.info(
            "{what} on {address}" + ("" if number is None else ":{port}"),
            what="Policy service listening"
            if event == "listening"
            else "Metrics listening",
            event=event,
            endpoint=description,
            address=address,
            port=number,
        )

    async def _stop_listening(self) -> None:
        ports = [*self.ports, *([self.metrics_port] if self.metrics_port else [])]
        self.ports = []
        self.metrics_port = None
        await DeferredList(
            [Deferred.fromCoroutine(_stop(p)) for p in ports], consumeErrors=True
        )

    async def stop(self) -> None:
        """Stop listening, answer what is in flight, then close connections."""
        if self.stopping:
            return
        self.stopping = True
        log.info(
            "Stopping: no new connections; answering requests in flight",
            event="stopping",
            connections=len(self.factory.protocols),
        )
        policy_ports, self.ports = self.ports, []
        await gatherResults([Deferred.fromCoroutine(_stop(p)) for p in policy_ports])
        # Every decision ends by the decision timeout (it then gets the
        # fallback action), so draining is bounded; the margin covers a
        # decider that ignores cancellation.
        drained = self.factory.drain()
        drained.addTimeout(self.config.decision_timeout + 1.0, self.reactor)
        try:
            await drained
        except Exception:  # noqa: BLE001 - shutdown goes on regardless
            log.warn("Stopping with requests still in flight", event="drain_timeout")
        self.factory.close_idle()
        # loseConnection only begins a close: a reply still in the write
        # buffer goes out first.  Wait for that, or the reactor's shutdown
        # (disconnectAll) would drop the reply just decided.
        closed = self.factory.closed()
        closed.addTimeout(CLOSE_TIMEOUT, self.reactor)
        try:
            await closed
        except Exception:  # noqa: BLE001 - shutdown goes on regardless
            log.warn("Stopping with replies still unsent", event="close_timeout")
        if self._sweeper.running:
            self._sweeper.stop()
        await self._stop_listening()
        try:
            await self.tracker.stop()
        except Exception:  # noqa: BLE001 - shutdown goes on regardless
            log.failure(
                "The load tracker did not stop cleanly", event="tracker_stop_error"
            )
        log.info("Stopped", event="stopped")


async def _stop(port: IListeningPort) -> None:
    # stopListening returns a Deferred, or None when the port stopped at once
    # (IListeningPort allows both; awaiting None would raise TypeError).
    await maybeDeferred(port.stopListening)
