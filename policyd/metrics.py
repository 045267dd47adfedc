"""Prometheus metrics and the small HTTP resource that serves them.

Every metric lives on a `CollectorRegistry` passed in by the caller, never on
prometheus_client's global registry, so tests get fresh counters and an
embedding program keeps its own.  Label values are bounded: actions by keyword
or SMTP code, protocol errors by a fixed set of reasons; never per client.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as float_to_go_string
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from policyd import __version__
from policyd.actions import Action
from policyd.holders import count_holders, current_bar
from policyd.load import LoadTracker
from policyd.policy import PolicySettings, bar

# Decisions are expected in microseconds; the upper buckets show a stalled
# decider long before Postfix's own policy timeout (reference §1.6).
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class PolicyMetrics:
    """The server's metrics, created on *registry*."""

    def __init__(
        self,
        registry: CollectorRegistry,
        protocol_error_reasons: Iterable[str] = (),
        decision_failure_reasons: Iterable[str] = (),
    ) -> None:
        self.registry = registry
        # The per-request counters are plain Python numbers, exported by
        # `_RequestCollector` at scrape time: prometheus_client's own take a
        # lock on every increment, which is a tenth of policyd's cost per
        # request.  Safe because everything runs in the reactor thread,
        # scrapes included.
        self._actions: dict[str, int] = {}
        self._buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self._duration_sum = 0.0
        self._decisions: dict[tuple[str, str], int] = {}
        # Refusals counted once for all their reasons, spread at scrape time.
        self._refusals: dict[tuple[str, tuple[str, ...]], int] = {}
        registry.register(_RequestCollector(self))
        self.active_connections = Gauge(
            "policyd_active_connections",
            "Open policy connections (about one per live smtpd process).",
            registry=registry,
        )
        self.connections = Counter(
            "policyd_connections",
            "Policy connections accepted.",
            registry=registry,
        )
        self.protocol_errors = Counter(
            "policyd_protocol_errors",
            "Connections closed without a reply because of bad input, by reason.",
            ["reason"],
            registry=registry,
        )
        self.decision_failures = Counter(
            "policyd_decision_failures",
            "Decisions that failed or timed out and got the fallback action.",
            ["reason"],
            registry=registry,
        )
        self.idle_closes = Counter(
            "policyd_idle_closes",
            "Idle connections closed by policyd after POLICYD_IDLE_TIMEOUT.",
            registry=registry,
        )
        self.peers_refused = Counter(
            "policyd_peers_refused",
            "Connections closed at once because the peer is not in "
            "POLICYD_ALLOW_PEERS.",
            registry=registry,
        )
        Info("policyd_build", "policyd version.", registry=registry).info(
            {"version": __version__}
        )
        # Pre-create the bounded label sets so every series exists at zero
        # from the first scrape: rate() and alerts need no special cases.
        for reason in protocol_error_reasons:
            self.protocol_errors.labels(reason)
        for reason in decision_failure_reasons:
            self.decision_failures.labels(reason)

    def answered(self, action: Action, seconds: float) -> None:
        """Count one reply of *action* that took *seconds* to decide."""
        actions = self._actions
        label = action.label
        actions[label] = actions.get(label, 0) + 1
        self._buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self._duration_sum += seconds

    def decided(self, outcome: str, reason: str) -> None:
        """Count one decision with *outcome* for *reason* (both bounded sets)."""
        key = (outcome, reason)
        decisions = self._decisions
        decisions[key] = decisions.get(key, 0) + 1

    def decided_for(self, outcome: str, reasons: tuple[str, ...]) -> None:
        """Count one decision with *outcome* for each of *reasons*."""
        key = (outcome, reasons)
        refusals = self._refusals
        refusals[key] = refusals.get(key, 0) + 1

    def decisions(self) -> dict[tuple[str, str], int]:
        """Decisions counted so far, by (outcome, reason)."""
        counts = dict(self._decisions)
        for (outcome, reasons), count in self._refusals.items():
            for reason in reasons:
                key = (outcome, reason)
                counts[key] = counts.get(key, 0) + count
        return counts


class _RequestCollector(Collector):
    """Exports `PolicyMetrics`' lock-free per-request counters."""

    def __init__(self, metrics: PolicyMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        """The families, so the registry refuses a second collector of them."""
        yield CounterMetricFamily("policyd_requests", "", labels=["action"])
        yield HistogramMetricFamily("policyd_request_duration_seconds", "")
        yield CounterMetricFamily("policyd_decisions", "", labels=["outcome", "reason"])

    def collect(self) -> Iterator[Metric]:
        """Yield the request, duration and decision families."""
        metrics = self._metrics
        requests = CounterMetricFamily(
            "policyd_requests",
            "Policy requests answered, by the action keyword or SMTP code sent.",
            labels=["action"],
        )
        for action, count in sorted(metrics._actions.items()):
            requests.add_metric([action], count)
        yield requests
        cumulative = 0
        buckets = []
        for bound, count in zip(
            (*map(float_to_go_string, DURATION_BUCKETS), "+Inf"),
            metrics._buckets,
            strict=True,
        ):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "policyd_request_duration_seconds",
            "Time from a complete request to its reply being written.",
            buckets=buckets,
            sum_value=metrics._duration_sum,
        )
        decisions = CounterMetricFamily(
            "policyd_decisions",
            "Decisions by outcome (pass, exempt, defer, reject, dry_run_defer, "
            "dry_run_reject) and reason (a signal, an exemption, normal or none).",
            labels=["outcome", "reason"],
        )
        for (outcome, reason), count in sorted(metrics.decisions().items()):
            decisions.add_metric([outcome, reason], count)
        yield decisions


def _plain(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return body


class MetricsResource(Resource):
    """``/metrics`` in Prometheus (or OpenMetrics, if asked) text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        """Render every metric of the registry."""
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(
            accept.decode("latin-1") if accept else ""
        )
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encoder(self._registry)


class HealthResource(Resource):
    """``/healthz``: 200 while *check* says healthy, 503 with the reason if not."""

    isLeaf = True

    def __init__(self, check: Callable[[], tuple[bool, str]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._check = check

    def render_GET(self, request: Request) -> bytes:
        """Answer the health check."""
        healthy, detail = self._check()
        return _plain(request, 200 if healthy else 503, detail.encode() + b"\n")


class MetricsRoot(Resource):
    """The metrics site's root: ``/metrics`` and ``/healthz``, 404 elsewhere."""

    def __init__(
        self, registry: CollectorRegistry, health: Callable[[], tuple[bool, str]]
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.putChild(b"metrics", MetricsResource(registry))
        self.putChild(b"healthz", HealthResource(health))

    def getChild(self, path: bytes, request: Request) -> IResource:
        """``/`` itself is this page; any other unknown path is 404."""
        # A request for "/" arrives here as the empty child name: without
        # this, the root text below would never be served.
        return self if path == b"" else notFound()

    def render_GET(self, request: Request) -> bytes:
        """Point a human at the two useful paths."""
        return _plain(request, 200, b"policyd: see /metrics and /healthz\n")


class LoadCollector(Collector):
    """Reads the load tracker at scrape time: no cost on the request path."""

    def __init__(self, tracker: LoadTracker) -> None:
        self._tracker = tracker

    def collect(self) -> Iterator[Metric]:
        """Yield the load metrics from one snapshot of the tracker."""
        load = self._tracker.snapshot()
        gauges = [
            (
                "policyd_stress_level",
                "Stress level: 0 normal, 1 elevated, 2 overload.",
                load.level,
            ),
            (
                "policyd_load_ratio",
                "Load as a fraction of capacity (busy smtpd processes or request "
                "rate, whichever is higher); 1.0 means every process is busy.",
                load.load_ratio,
            ),
            (
                "policyd_busy_connections",
                "Policy connections (smtpd processes) busy with a client now.",
                load.busy_connections,
            ),
            (
                "policyd_transactions_active",
                "Connections inside an SMTP transaction (MAIL FROM seen, not ended).",
                load.transactions,
            ),
            (
                "policyd_tracked_clients",
                "Clients (address prefixes) remembered by the tracker.",
                load.tracked_clients,
            ),
            (
                "policyd_request_rate",
                "Policy requests per second over the rate window.",
                load.request_rate,
            ),
            (
                "policyd_postfix_stress_active",
                "1 while a recent request carried Postfix's stress=yes.",
                int(load.postfix_stress),
            ),
        ]
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)
        yield CounterMetricFamily(
            "policyd_postfix_stress_seen",
            "Requests carrying Postfix's stress=yes.",
            value=load.postfix_stress_seen,
        )
        yield CounterMetricFamily(
            "policyd_client_evictions",
            "Clients forgotten to keep the table within POLICYD_MAX_TRACKED_CLIENTS.",
            value=load.evictions,
        )
        yield from self._per_host()
        transitions = CounterMetricFamily(
            "policyd_stress_transitions",
            "Changes of the stress level, by the level entered.",
            labels=["level"],
        )
        for level, count in load.transitions.items():
            transitions.add_metric([level], count)
        yield transitions
        yield from self._backend()

    def _backend(self) -> Iterator[Metric]:
        """Where shared client state lives (memory, redis) and how it answers."""
        backend = self._tracker.backend()
        up = GaugeMetricFamily(
            "policyd_backend_up",
            "1 while the store of client state answers in time (memory: always).",
            labels=["backend"],
        )
        up.add_metric([backend.name], int(backend.up))
        yield up
        errors = CounterMetricFamily(
            "policyd_backend_errors",
            "Failures talking to the store of shared client state: connect, "
            "timeout (no reply within the deadline), lost (connection), error "
            "(a refused command).",
            labels=["backend", "reason"],
        )
        for reason, count in backend.errors:
            errors.add_metric([backend.name, reason], count)
        yield errors
        yield CounterMetricFamily(
            "policyd_backend_fallbacks",
            "Clients scored on this policyd's own view because the shared store "
            "was down or did not answer within POLICYD_REDIS_DEADLINE.",
            value=backend.fallbacks,
        )
        yield GaugeMetricFamily(
            "policyd_backend_pending_clients",
            "Clients whose updates wait to be written to the shared store.",
            value=backend.pending,
        )

    def _per_host(self) -> Iterator[Metric]:
        """The load of each Postfix host, labelled with its name."""
        tracker = self._tracker
        snapshots = [tracker.snapshot(host) for host in tracker.hosts()]
        for name, documentation, field in (
            (
                "policyd_host_stress_level",
                "Stress level of each Postfix host served: 0 normal, 1 elevated, "
                "2 overload (policyd_stress_level is the highest).",
                "level",
            ),
            (
                "policyd_host_load_ratio",
                "Load of each Postfix host as a fraction of its capacity.",
                "load_ratio",
            ),
            (
                "policyd_host_busy_connections",
                "Busy policy connections (smtpd processes) of each Postfix host.",
                "busy_connections",
            ),
            (
                "policyd_host_capacity",
                "The smtpd process limit policyd assumes for each Postfix host.",
                "capacity",
            ),
        ):
            family = GaugeMetricFamily(name, documentation, labels=["host"])
            for load in snapshots:
                family.add_metric([load.host], getattr(load, field))
            yield family


class HoldersCollector(Collector):
    """
    Who holds the busy smtpd processes, and the current bar; at scrape time.

    Classifying costs a scoring per busy process (microseconds each, a few
    hundred at most), paid once per scrape, never per request.
    """

    def __init__(self, tracker: LoadTracker, settings: PolicySettings) -> None:
        self._tracker = tracker
        #: Replaced on a reload (new allow-lists classify holders anew).
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        """Yield the busy processes by class and the refusal bar."""
        holders = GaugeMetricFamily(
            "policyd_busy_processes",
            "Busy smtpd processes (policy connections) by the class of the client "
            "holding them: clean (never refused for load), suspicious (refused "
            "once overload lasts), exempt (authenticated or allow-listed).",
            labels=["class"],
        )
        for kind, count in count_holders(self._tracker, self.settings).items():
            holders.add_metric([kind], count)
        yield holders
        yield GaugeMetricFamily(
            "policyd_refusal_bar",
            "The score a client needs now to be refused under stress: "
            "POLICYD_SUSPICIOUS_SCORE, falling towards "
            "POLICYD_OVERLOAD_SUSPICIOUS_SCORE while overload lasts (the "
            "lowest of the hosts').",
            value=current_bar(self._tracker, self.settings),
        )
        yield from self._per_host()

    def _per_host(self) -> Iterator[Metric]:
        """The holders and the bar of each Postfix host, labelled with its name."""
        tracker, settings = self._tracker, self.settings
        holders = GaugeMetricFamily(
            "policyd_host_busy_processes",
            "Busy smtpd processes of one Postfix host by the class of the client "
            "holding them (see policyd_busy_processes).",
            labels=["host", "class"],
        )
        bars = GaugeMetricFamily(
            "policyd_host_refusal_bar",
            "The score a client of one Postfix host needs now to be refused "
            "(see policyd_refusal_bar).",
            labels=["host"],
        )
        for host in tracker.hosts():
            try:
                load = tracker.snapshot(host)
            except KeyError:  # forgotten between the two calls
                continue
            counts = count_holders(tracker, settings, host)
            for kind, count in counts.items():
                holders.add_metric([host, kind], count)
            bars.add_metric([host], bar(load.level, load.pressure, settings))
        yield holders
        yield bars
