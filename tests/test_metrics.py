"""Metrics: names, bounded labels, a private registry, and the HTTP resources."""

from __future__ import annotations

from typing import cast

import pytest
from helpers import IDLE_SNAPSHOT, MINIMAL, Client, RecordingTracker
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyRequest

from policyd import __version__
from policyd.actions import DUNNO, Action
from policyd.config import load
from policyd.load import BackendStatus, LoadSnapshot
from policyd.metrics import (
    DURATION_BUCKETS,
    HealthResource,
    LoadCollector,
    MetricsResource,
    MetricsRoot,
    PolicyMetrics,
)
from policyd.protocol import DECISION_FAILURE_REASONS, PROTOCOL_ERROR_REASONS
from policyd.server import PolicyServer

# Sample names as Prometheus scrapes them (counters get _total).
FIXED_SAMPLES = (
    "policyd_requests_total",
    "policyd_request_duration_seconds_count",
    "policyd_request_duration_seconds_sum",
    "policyd_active_connections",
    "policyd_connections_total",
    "policyd_idle_closes_total",
    "policyd_build_info",
)


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry for each test."""
    return CollectorRegistry()


def _names(registry: CollectorRegistry) -> set[str]:
    return {family.name for family in registry.collect()}


def _sample_names(registry: CollectorRegistry) -> set[str]:
    return {s.name for family in registry.collect() for s in family.samples}


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def _render(
    resource: MetricsResource | HealthResource, request: DummyRequest
) -> tuple[int, bytes]:
    """GET *resource* with a DummyRequest: (status, body)."""
    body = resource.render_GET(cast(Request, request))
    code = cast("int | None", request.responseCode)
    return (200 if code is None else code), body  # None: never set, so 200


def _header(request: DummyRequest, name: bytes) -> bytes:
    """The single value of response header *name*."""
    (value,) = request.responseHeaders.getRawHeaders(name) or []
    return value


def _http_get(
    root: MetricsRoot, path: bytes, accept: bytes | None = None
) -> tuple[int, dict[bytes, bytes], bytes]:
    """GET *path* from a Site around *root*, in memory: (status, headers, body)."""
    site = Site(root, reactor=Clock())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    extra = b"" if accept is None else b"Accept: " + accept + b"\r\n"
    channel.dataReceived(
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: localhost\r\n"
        + extra
        + b"Connection: close\r\n\r\n"
    )
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b": ")
        headers[name.lower()] = value
    return int(status_line.split(b" ")[1]), headers, body


class TestPolicyMetrics:
    """`PolicyMetrics` creates its metrics on the registry it is given."""

    def test_fixed_names(self, registry: CollectorRegistry) -> None:
        """The documented metric names exist from the first scrape."""
        metrics = PolicyMetrics(registry)
        metrics.answered(Action.parse("DUNNO"), 0.001)
        assert set(FIXED_SAMPLES) <= _sample_names(registry)

    def test_not_on_global_registry(self, registry: CollectorRegistry) -> None:
        """Nothing is registered on prometheus_client's global REGISTRY."""
        PolicyMetrics(registry, PROTOCOL_ERROR_REASONS, DECISION_FAILURE_REASONS)
        assert not {n for n in _names(REGISTRY) if n.startswith("policyd")}
        assert {n for n in _names(registry) if n.startswith("policyd")}

    def test_two_instances(self) -> None:
        """Two instances on two registries do not clash or share counts."""
        first, second = CollectorRegistry(), CollectorRegistry()
        PolicyMetrics(first).answered(Action.parse("DUNNO"), 0.0)
        PolicyMetrics(second)
        assert _value(first, "policyd_requests_total", action="DUNNO") == 1
        assert _value(second, "policyd_requests_total", action="DUNNO") is None

    def test_only_policyd_metrics(self, registry: CollectorRegistry) -> None:
        """The registry holds policyd's metrics and nothing else."""
        PolicyMetrics(registry)
        assert {n for n in _names(registry) if not n.startswith("policyd_")} == set()

    def test_build_info(self, registry: CollectorRegistry) -> None:
        """policyd_build_info carries the version."""
        PolicyMetrics(registry)
        assert _value(registry, "policyd_build_info", version=__version__) == 1

    @pytest.mark.parametrize(
        ("texts", "counts"),
        [
            (["DUNNO", "dunno", "DUNNO whatever"], {"DUNNO": 3}),
            (
                ["DEFER_IF_PERMIT Try later", "defer_if_permit Busy"],
                {"DEFER_IF_PERMIT": 2},
            ),
            (
                ["450 4.7.1 Try later", "450 4.7.1 Busy", "421 4.7.0 Closing"],
                {"450": 2, "421": 1},
            ),
            (["REJECT no", "550 5.7.1 no"], {"REJECT": 1, "550": 1}),
        ],
    )
    def test_action_labels(
        self, registry: CollectorRegistry, texts: list[str], counts: dict[str, int]
    ) -> None:
        """Replies count under the keyword or 3-digit code, never the text."""
        metrics = PolicyMetrics(registry)
        for text in texts:
            metrics.answered(Action.parse(text), 0.0)
        samples = {
            s.labels["action"]: s.value
            for family in registry.collect()
            if family.name == "policyd_requests"
            for s in family.samples
            if s.name == "policyd_requests_total"
        }
        assert samples == counts

    def test_labels_bounded(self, registry: CollectorRegistry) -> None:
        """Thousands of distinct reply texts make only a few label values."""
        metrics = PolicyMetrics(registry)
        for i in range(2000):
            metrics.answered(Action.parse(f"450 4.7.1 client {i} try later"), 0.0)
            metrics.answered(Action.parse(f"DEFER_IF_PERMIT greylisted {i}"), 0.0)
        series = [
            sample
            for family in registry.collect()
            if family.name == "policyd_requests"
            for sample in family.samples
            if sample.name == "policyd_requests_total"
        ]
        assert len(series) == 2

    def test_duration(self, registry: CollectorRegistry) -> None:
        """Each reply observes its decision time in the histogram."""
        metrics = PolicyMetrics(registry)
        metrics.answered(Action.parse("DUNNO"), 0.0002)
        metrics.answered(Action.parse("DUNNO"), 0.003)
        name = "policyd_request_duration_seconds"
        assert _value(registry, name + "_count") == 2
        assert _value(registry, name + "_sum") == pytest.approx(0.0032)
        assert _value(registry, name + "_bucket", le="0.00025") == 1
        assert _value(registry, name + "_bucket", le="0.005") == 2

    def test_buckets(self, registry: CollectorRegistry) -> None:
        """The histogram has the declared buckets, sorted, up to +Inf."""
        assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)
        PolicyMetrics(registry)
        les = [
            s.labels["le"]
            for family in registry.collect()
            for s in family.samples
            if s.name == "policyd_request_duration_seconds_bucket"
        ]
        assert les == [str(b) for b in DURATION_BUCKETS] + ["+Inf"]

    def test_precreated_reasons(self, registry: CollectorRegistry) -> None:
        """Every protocol error and decision failure reason shows at 0."""
        PolicyMetrics(registry, PROTOCOL_ERROR_REASONS, DECISION_FAILURE_REASONS)
        for reason in PROTOCOL_ERROR_REASONS:
            assert _value(registry, "policyd_protocol_errors_total", reason=reason) == 0
        for reason in DECISION_FAILURE_REASONS:
            assert (
                _value(registry, "policyd_decision_failures_total", reason=reason) == 0
            )

    def test_counters_start_at_zero(self, registry: CollectorRegistry) -> None:
        """Unlabelled counters and the gauge read 0 before anything happens."""
        PolicyMetrics(registry)
        assert _value(registry, "policyd_connections_total") == 0
        assert _value(registry, "policyd_idle_closes_total") == 0
        assert _value(registry, "policyd_active_connections") == 0

    def test_active_connections_read_at_scrape(
        self, registry: CollectorRegistry
    ) -> None:
        """The gauge can read a live count at scrape time (server.py does)."""
        metrics = PolicyMetrics(registry)
        live = [1, 2, 3]
        metrics.active_connections.set_function(lambda: len(live))
        assert _value(registry, "policyd_active_connections") == 3
        live.pop()
        assert _value(registry, "policyd_active_connections") == 2


class TestMetricsResource:
    """``/metrics`` renders the registry."""

    def test_prometheus_text(self, registry: CollectorRegistry) -> None:
        """Without an Accept header: Prometheus text format 0.0.4."""
        metrics = PolicyMetrics(registry, PROTOCOL_ERROR_REASONS)
        metrics.answered(Action.parse("450 4.7.1 Busy"), 0.01)
        request = DummyRequest([b""])
        code, body = _render(MetricsResource(registry), request)
        assert code == 200
        assert _header(request, b"content-type").startswith(
            b"text/plain; version=0.0.4"
        )
        text = body.decode("utf-8")
        assert 'policyd_requests_total{action="450"} 1.0' in text
        assert "# TYPE policyd_request_duration_seconds histogram" in text
        families = {f.name for f in text_string_to_metric_families(text)}
        assert {
            "policyd_requests",
            "policyd_request_duration_seconds",
            "policyd_active_connections",
            "policyd_protocol_errors",
        } <= families

    def test_openmetrics(self, registry: CollectorRegistry) -> None:
        """With Accept: application/openmetrics-text: OpenMetrics, ending # EOF."""
        PolicyMetrics(registry).answered(Action.parse("DUNNO"), 0.0)
        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(
            b"accept", [b"application/openmetrics-text; version=1.0.0"]
        )
        _, body = _render(MetricsResource(registry), request)
        content_type = _header(request, b"content-type")
        assert content_type.startswith(b"application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        assert b'policyd_requests_total{action="DUNNO"} 1.0' in body

    def test_only_its_registry(self, registry: CollectorRegistry) -> None:
        """The page shows the given registry, not the process-wide one."""
        PolicyMetrics(registry)
        _, body = _render(MetricsResource(registry), DummyRequest([b""]))
        assert b"policyd_requests" in body
        assert b"python_gc_" not in body
        assert b"process_" not in body


class TestHealthResource:
    """``/healthz`` answers what the check says."""

    @pytest.mark.parametrize(
        ("check", "code", "body"),
        [
            ((True, "ok"), 200, b"ok\n"),
            ((False, "stopping"), 503, b"stopping\n"),
            ((False, "not listening"), 503, b"not listening\n"),
        ],
    )
    def test_status(self, check: tuple[bool, str], code: int, body: bytes) -> None:
        """200 while healthy, 503 otherwise, with the reason as text."""
        request = DummyRequest([b""])
        assert _render(HealthResource(lambda: check), request) == (code, body)
        assert _header(request, b"content-type") == b"text/plain; charset=utf-8"

    def test_checked_each_time(self) -> None:
        """The check runs on every request, so the answer follows the server."""
        state = [(True, "ok")]
        resource = HealthResource(lambda: state[-1])
        first = _render(resource, DummyRequest([b""]))
        state.append((False, "stopping"))
        second = _render(resource, DummyRequest([b""]))
        assert (first[0], second[0]) == (200, 503)


class TestMetricsRoot:
    """The metrics site, routed as Twisted routes a real request."""

    def _root(self, healthy: bool = True) -> MetricsRoot:
        registry = CollectorRegistry()
        PolicyMetrics(registry, PROTOCOL_ERROR_REASONS)
        return MetricsRoot(
            registry, lambda: (True, "ok") if healthy else (False, "stopping")
        )

    def test_root_text(self) -> None:
        """``/`` points a human at /metrics and /healthz."""
        status, headers, body = _http_get(self._root(), b"/")
        assert status == 200
        assert headers[b"content-type"] == b"text/plain; charset=utf-8"
        assert body == b"policyd: see /metrics and /healthz\n"

    def test_metrics(self) -> None:
        """``/metrics`` is the Prometheus page."""
        status, headers, body = _http_get(self._root(), b"/metrics")
        assert status == 200
        assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
        for name in (
            b"policyd_requests_total",
            b"policyd_request_duration_seconds",
            b"policyd_active_connections",
            b"policyd_protocol_errors_total",
        ):
            assert name in body

    def test_metrics_openmetrics(self) -> None:
        """``/metrics`` honours an OpenMetrics Accept header through the site."""
        status, headers, body = _http_get(
            self._root(), b"/metrics", accept=b"application/openmetrics-text"
        )
        assert status == 200
        assert headers[b"content-type"].startswith(b"application/openmetrics-text")
        assert body.endswith(b"# EOF\n")

    @pytest.mark.parametrize(
        ("healthy", "status", "body"),
        [(True, 200, b"ok\n"), (False, 503, b"stopping\n")],
    )
    def test_healthz(self, healthy: bool, status: int, body: bytes) -> None:
        """``/healthz`` is 200 ``ok`` while healthy and 503 when not."""
        assert _http_get(self._root(healthy), b"/healthz")[::2] == (status, body)

    @pytest.mark.parametrize(
        "path", [b"/nope", b"/metricsx", b"/nope/", b"/favicon.ico"]
    )
    def test_not_found(self, path: bytes) -> None:
        """Any other path is 404."""
        assert _http_get(self._root(), path)[0] == 404


# A load in which every value differs, so that no two metrics can be swapped
# unnoticed.
BUSY_LOAD = LoadSnapshot(
    level=1,
    load_ratio=0.75,
    connections=40,
    busy_connections=15,
    transactions=4,
    request_rate=12.5,
    postfix_stress=True,
    tracked_clients=1234,
    postfix_stress_seen=42,
    evictions=7,
    transitions={"normal": 3, "elevated": 5, "overload": 2},
    capacity=20,
)

# Sample name, labels, and its value for BUSY_LOAD.
LOAD_SAMPLES: list[tuple[str, dict[str, str], float]] = [
    ("policyd_stress_level", {}, 1),
    ("policyd_load_ratio", {}, 0.75),
    ("policyd_busy_connections", {}, 15),
    ("policyd_transactions_active", {}, 4),
    ("policyd_tracked_clients", {}, 1234),
    ("policyd_request_rate", {}, 12.5),
    ("policyd_postfix_stress_active", {}, 1),
    ("policyd_postfix_stress_seen_total", {}, 42),
    ("policyd_client_evictions_total", {}, 7),
    ("policyd_stress_transitions_total", {"level": "normal"}, 3),
    ("policyd_stress_transitions_total", {"level": "elevated"}, 5),
    ("policyd_stress_transitions_total", {"level": "overload"}, 2),
    ("policyd_host_stress_level", {"host": "local"}, 1),
    ("policyd_host_load_ratio", {"host": "local"}, 0.75),
    ("policyd_host_busy_connections", {"host": "local"}, 15),
    ("policyd_host_capacity", {"host": "local"}, 20),
    ("policyd_backend_up", {"backend": "redis"}, 0),
    ("policyd_backend_errors_total", {"backend": "redis", "reason": "connect"}, 3),
    ("policyd_backend_errors_total", {"backend": "redis", "reason": "timeout"}, 2),
    ("policyd_backend_fallbacks_total", {}, 9),
    ("policyd_backend_pending_clients", {}, 4),
]

# A Redis backend that has been failing.
REDIS_DOWN = BackendStatus(
    "redis", up=False, errors=(("connect", 3), ("timeout", 2)), fallbacks=9, pending=4
)


class TestLoadCollector:
    """`LoadCollector` exports the tracker's snapshot at scrape time."""

    @pytest.mark.parametrize(("name", "labels", "value"), LOAD_SAMPLES)
    def test_values(
        self,
        registry: CollectorRegistry,
        name: str,
        labels: dict[str, str],
        value: float,
    ) -> None:
        """Each load metric shows the tracker's value, on the registry passed in."""
        registry.register(LoadCollector(RecordingTracker(BUSY_LOAD, REDIS_DOWN)))
        assert registry.get_sample_value(name, labels) == value
        assert REGISTRY.get_sample_value(name, labels) is None

    def test_no_other_samples(self, registry: CollectorRegistry) -> None:
        """The collector exports exactly the documented samples."""
        registry.register(LoadCollector(RecordingTracker(BUSY_LOAD, REDIS_DOWN)))
        assert _sample_names(registry) == {name for name, _, _ in LOAD_SAMPLES}

    def test_types(self, registry: CollectorRegistry) -> None:
        """Counts that only grow are counters; the rest are gauges."""
        registry.register(LoadCollector(RecordingTracker(BUSY_LOAD, REDIS_DOWN)))
        types = {family.name: family.type for family in registry.collect()}
        counters = {
            "policyd_postfix_stress_seen",
            "policyd_client_evictions",
            "policyd_stress_transitions",
            "policyd_backend_errors",
            "policyd_backend_fallbacks",
        }
        assert {n for n, t in types.items() if t == "counter"} == counters
        assert {t for n, t in types.items() if n not in counters} == {"gauge"}

    def test_read_at_scrape(self, registry: CollectorRegistry) -> None:
        """Every scrape reads the tracker anew, once: one consistent snapshot."""
        tracker = RecordingTracker(IDLE_SNAPSHOT)
        registry.register(LoadCollector(tracker))
        tracker.snapshots = 0
        assert _value(registry, "policyd_postfix_stress_active") == 0
        assert _value(registry, "policyd_stress_level") == 0
        tracker.load = BUSY_LOAD
        assert _value(registry, "policyd_postfix_stress_active") == 1
        assert _value(registry, "policyd_stress_level") == 1
        tracker.snapshots = 0
        list(registry.collect())
        # A scrape reads the load of all hosts together, then of each host
        # (here one).
        assert tracker.snapshots == 2
        assert tracker.calls == []  # scraping changes nothing

    def test_server_registers_it(self, registry: CollectorRegistry) -> None:
        """A PolicyServer exports its tracker's load on the registry it is given."""
        server = PolicyServer(load({}), MemoryReactorClock(), registry)
        assert _value(registry, "policyd_busy_connections") == 0
        Client(server.factory).send(MINIMAL)
        assert _value(registry, "policyd_busy_connections") == 1
        assert _value(registry, "policyd_stress_level") == 0
        for name in ("normal", "elevated", "overload"):
            assert _value(registry, "policyd_stress_transitions_total", level=name) == 0
        assert REGISTRY.get_sample_value("policyd_stress_level") is None


class TestLockFreeCounters:
    """The per-request counters are plain numbers exported at scrape time."""

    def test_histogram_buckets_are_cumulative_and_inclusive(self) -> None:
        """An observation equal to a bound counts in that bucket (le = at most)."""
        registry = CollectorRegistry()
        metrics = PolicyMetrics(registry)
        for seconds in (0.0001, 0.00011, 0.001, 99.0):
            metrics.answered(DUNNO, seconds)

        def bucket(le: str) -> float | None:
            return registry.get_sample_value(
                "policyd_request_duration_seconds_bucket", {"le": le}
            )

        assert bucket("0.0001") == 1
        assert bucket("0.00025") == 2
        assert bucket("0.001") == 3
        assert bucket("10.0") == 3
        assert bucket("+Inf") == 4
        assert registry.get_sample_value("policyd_request_duration_seconds_count") == 4
        assert registry.get_sample_value(
            "policyd_request_duration_seconds_sum"
        ) == pytest.approx(99.00121)

    def test_decided_for_spreads_over_reasons(self) -> None:
        """decided_for() counts one decision in the series of each of its reasons."""
        registry = CollectorRegistry()
        metrics = PolicyMetrics(registry)
        metrics.decided_for("defer", ("no_helo", "dynamic_name"))
        metrics.decided_for("defer", ("no_helo",))
        metrics.decided("defer", "no_helo")
        metrics.decided_for("reject", ("helo_impersonates", "no_helo"))
        expected = {
            ("defer", "no_helo"): 3,
            ("defer", "dynamic_name"): 1,
            ("reject", "helo_impersonates"): 1,
            ("reject", "no_helo"): 1,
        }
        assert metrics.decisions() == expected
        for (outcome, reason), count in expected.items():
            assert (
                registry.get_sample_value(
                    "policyd_decisions_total", {"outcome": outcome, "reason": reason}
                )
                == count
            )

    def test_decided_counts_by_outcome_and_reason(self) -> None:
        """decided() adds one to its (outcome, reason) series, and only to it."""
        registry = CollectorRegistry()
        metrics = PolicyMetrics(registry)
        metrics.decided("defer", "no_helo")
        metrics.decided("defer", "no_helo")
        metrics.decided("pass", "normal")
        assert metrics.decisions() == {("defer", "no_helo"): 2, ("pass", "normal"): 1}
        assert (
            registry.get_sample_value(
                "policyd_decisions_total", {"outcome": "defer", "reason": "no_helo"}
            )
            == 2
        )

    def test_one_set_per_registry(self) -> None:
        """A second PolicyMetrics on the same registry is refused (duplicate names)."""
        registry = CollectorRegistry()
        PolicyMetrics(registry)
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            PolicyMetrics(registry)
