"""What many test modules share.

Mostly in-memory doubles for the protocol, server and command-line tests,
which open no socket and read no wall clock: connections are
`StringTransport`s, time is a `Clock`, every `Harness` has its own
`CollectorRegistry`, `RecordingTracker` records what a tracker is told, and
`run_main` runs the command line in this process.  Then small helpers for
tests of what ships: `exported_metric_names` (what /metrics can show, for the
alert rules and the dashboard), `sourced_by_sh` (an env file as /bin/sh reads
it) and `required_program` (a program tests/run installs: skip, or fail under
CI=true).  policyd as a real process is `policyd.testing.daemon.PolicydProcess`.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    StringTransportWithDisconnection,
)
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure

from policyd import cli
from policyd.actions import DUNNO, Action
from policyd.decision import Decider
from policyd.load import (
    LOCAL_HOST,
    NORMAL,
    BackendStatus,
    ClientStats,
    LoadSnapshot,
    LoadTracker,
)
from policyd.metrics import PolicyMetrics
from policyd.protocol import (
    DECISION_FAILURE_REASONS,
    PROTOCOL_ERROR_REASONS,
    Limits,
    PolicyProtocol,
)
from policyd.request import PolicyRequest
from policyd.server import PolicyFactory

PEER = IPv4Address("TCP", "127.0.0.1", 40000)

# What smtpd sends (reference §2), trimmed to the attributes policyd reads.
TYPICAL: Mapping[str, str] = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "client_address": "192.0.2.10",
    "client_name": "mail.example.net",
    "reverse_client_name": "mail.example.net",
    "helo_name": "mail.example.net",
    "sender": "alice@example.net",
    "recipient": "bob@example.org",
    "recipient_count": "0",
    "queue_id": "",
    "instance": "123.456.7",
    "size": "0",
    "sasl_username": "",
    "stress": "",
}

MINIMAL = b"request=smtpd_access_policy\n\n"
DUNNO_REPLY = b"action=DUNNO\n\n"


def encode_request(
    attributes: Mapping[str, str] | Iterable[tuple[str, str]] = TYPICAL,
) -> bytes:
    """The wire form of a request: ``name=value`` lines and an empty line."""
    pairs = attributes.items() if isinstance(attributes, Mapping) else attributes
    lines = b"".join(
        name.encode("utf-8", "surrogateescape")
        + b"="
        + value.encode("utf-8", "surrogateescape")
        + b"\n"
        for name, value in pairs
    )
    return lines + b"\n"


class FixedDecider:
    """Answer every request with one action, remembering the requests."""

    def __init__(self, action: Action = DUNNO) -> None:
        self.action = action
        self.requests: list[PolicyRequest] = []

    def decide(self, request: PolicyRequest) -> Action:
        """Record *request* and return the fixed action."""
        self.requests.append(request)
        return self.action


class DeferredDecider:
    """Answer every request with a new, unfired Deferred the test fires.

    The Deferreds have no canceller, like most ad-hoc ones: cancelling one
    fails it with `CancelledError` and silently eats a later ``callback``.
    """

    def __init__(self) -> None:
        self.requests: list[PolicyRequest] = []
        self.pending: list[Deferred[Action]] = []
        self.cancelled = 0

    def decide(self, request: PolicyRequest) -> Deferred[Action]:
        """Record *request* and return a Deferred that only the test fires."""
        self.requests.append(request)
        d: Deferred[Action] = Deferred()
        d.addErrback(self._count_cancel)
        self.pending.append(d)
        return d

    def _count_cancel(self, failure: Failure) -> Failure:
        if failure.check(CancelledError):
            self.cancelled += 1
        return failure


class RaisingDecider:
    """A decider with a bug: it raises."""

    def __init__(self) -> None:
        self.calls = 0

    def decide(self, request: PolicyRequest) -> Action:
        """Raise `RuntimeError`."""
        self.calls += 1
        raise RuntimeError("decider bug")


class SlowDecider:
    """A synchronous decider that lets *seconds* pass before answering."""

    def __init__(self, clock: Clock, seconds: float, action: Action = DUNNO) -> None:
        self.clock = clock
        self.seconds = seconds
        self.action = action

    def decide(self, request: PolicyRequest) -> Action:
        """Advance the clock by *seconds*, then answer."""
        self.clock.advance(self.seconds)
        return self.action


class WrongTypeDecider:
    """A decider that breaks its contract by returning a plain string."""

    def decide(self, request: PolicyRequest) -> Action:
        """Return ``"DUNNO"`` (a str, not an `Action`)."""
        return cast(Action, "DUNNO")


IDLE_SNAPSHOT = LoadSnapshot(
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
    transitions={"normal": 0, "elevated": 0, "overload": 0},
)


class RecordingTracker:
    """A `LoadTracker` that records what it is told and reports a fixed load."""

    def __init__(
        self,
        load: LoadSnapshot = IDLE_SNAPSHOT,
        backend: BackendStatus = BackendStatus("memory"),  # noqa: B008 - frozen
    ) -> None:
        self.load = load
        self.backend_status = backend
        self.calls: list[tuple[str, object]] = []
        self.snapshots = 0
        self.fixed_pressure = 0
        self.hosts_opened: list[str] = []
        #: What `tick` returns (an exception is raised); what `start` returns.
        self.tick_result: Deferred[None] | Exception | None = None
        self.start_result: Deferred[None] | None = None

    @property
    def level(self) -> int:
        """The level of the fixed load."""
        return self.load.level

    @property
    def pressure(self) -> int:
        """The pressure set by the test (0 unless told)."""
        return self.fixed_pressure

    def pressure_at(self, request: PolicyRequest) -> int:
        """The pressure set by the test, for every request."""
        return self.fixed_pressure

    def busy_requests(self, host: str | None = None) -> list[PolicyRequest]:
        """Every request observed (a test double's idea of the holders)."""
        return [
            r
            for name, r in self.calls
            if name == "observe" and isinstance(r, PolicyRequest)
        ]

    def connection_opened(self, connection: int, host: str = LOCAL_HOST) -> None:
        """Record ``("opened", connection)`` (and the host, in `hosts_opened`)."""
        self.calls.append(("opened", connection))
        self.hosts_opened.append(host)

    def connection_closed(self, connection: int) -> None:
        """Record ``("closed", connection)``."""
        self.calls.append(("closed", connection))

    def observe(self, request: PolicyRequest) -> int:
        """Record ``("observe", request)``; the fixed level."""
        self.calls.append(("observe", request))
        return self.load.level

    def client(self, request: PolicyRequest) -> ClientStats:
        """Nothing known about anyone."""
        return ClientStats(request.client_address, 0, 0.0, 0.0, 0.0, None)

    def record_refusal(self, request: PolicyRequest, hangup: bool = False) -> None:
        """Record ``("refusal", request)`` (or ``"hangup"`` with *hangup*)."""
        self.calls.append(("hangup" if hangup else "refusal", request))

    def tick(self) -> Deferred[None] | None:
        """Record ``("tick", None)``; return (or raise) `tick_result`."""
        self.calls.append(("tick", None))
        result = self.tick_result
        if isinstance(result, Exception):
            raise result
        return result

    def start(self) -> Deferred[None]:
        """Record ``("start", None)``; `start_result`, or fire at once."""
        self.calls.append(("start", None))
        return self.start_result if self.start_result is not None else succeed(None)

    def stop(self) -> Deferred[None]:
        """Record ``("stop", None)``; fire at once."""
        self.calls.append(("stop", None))
        return succeed(None)

    def snapshot(self, host: str | None = None) -> LoadSnapshot:
        """The fixed load; counts the calls."""
        self.snapshots += 1
        return self.load

    def hosts(self) -> list[str]:
        """The one host of the fixed load."""
        return [self.load.host]

    def set_capacity(self, capacity: int) -> None:
        """Record ``("capacity", capacity)``."""
        self.calls.append(("capacity", capacity))

    def lookup(self, request: PolicyRequest) -> None:
        """Record ``("lookup", request)``; nothing to wait for."""
        self.calls.append(("lookup", request))

    def backend(self) -> BackendStatus:
        """The backend status given (in memory unless told)."""
        return self.backend_status


class RecordingTransport(StringTransportWithDisconnection):
    """A transport that keeps each ``write`` call apart, not just their sum."""

    def __init__(self, peer: IAddress = PEER) -> None:
        super().__init__(peerAddress=peer)  # type: ignore[no-untyped-call]
        self.writes: list[bytes] = []
        self.late_writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Record *data* as one write (or as a late one, after the close)."""
        (self.writes if self.connected else self.late_writes).append(bytes(data))
        super().write(data)  # type: ignore[no-untyped-call]


class FlushingTransport(RecordingTransport):
    """A transport that, like TCP, closes only once its write buffer is sent.

    ``loseConnection`` just starts the close; `flushed` finishes it.
    """

    def loseConnection(self) -> None:
        """Begin closing: the connection is lost only when `flushed` is called."""
        self.disconnecting = True

    def flushed(self) -> None:
        """The buffer has gone out: finish a close begun earlier."""
        assert self.disconnecting, "nothing was closing"
        super().loseConnection()  # type: ignore[no-untyped-call]


class Client:
    """One in-memory connection to a `PolicyFactory`."""

    def __init__(
        self, factory: PolicyFactory, transport: RecordingTransport | None = None
    ) -> None:
        protocol = factory.buildProtocol(PEER)
        if protocol is None:
            raise AssertionError(f"the factory refused the test peer {PEER}")
        self.protocol: PolicyProtocol = protocol
        self.transport = transport if transport is not None else RecordingTransport()
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)  # type: ignore[no-untyped-call]

    def send(self, *chunks: bytes) -> None:
        """Deliver *chunks* as separate reads."""
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    @property
    def writes(self) -> list[bytes]:
        """Every write call so far."""
        return self.transport.writes

    def is_closed(self) -> bool:
        """Whether the connection has been closed.

        A method, not a property, so that mypy does not narrow it between two
        asserts around a state change.
        """
        return not self.transport.connected

    def drop(self) -> None:
        """The peer goes away (smtpd exits)."""
        self.transport.loseConnection()  # type: ignore[no-untyped-call]


class Harness:
    """A `PolicyFactory` on a fake clock with a fresh metrics registry.

    Decisions are timed on that clock too, unless a separate *timer* is
    given (the monotonic clock that production times them with).
    """

    def __init__(
        self,
        decider: Decider | None = None,
        *,
        fallback: Action = DUNNO,
        decision_timeout: float = 1.0,
        request_timeout: float = 10.0,
        idle_timeout: float = 600.0,
        limits: Limits = Limits(),  # noqa: B008 - immutable
        log_requests: bool = False,
        clock: Clock | None = None,
        tracker: LoadTracker | None = None,
        timer: Clock | None = None,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.registry = CollectorRegistry()
        self.metrics = PolicyMetrics(
            self.registry, PROTOCOL_ERROR_REASONS, DECISION_FAILURE_REASONS
        )
        self.decider = decider if decider is not None else FixedDecider()
        self.factory = PolicyFactory(
            clock=self.clock,
            decider=self.decider,
            metrics=self.metrics,
            limits=limits,
            fallback=fallback,
            decision_timeout=decision_timeout,
            request_timeout=request_timeout,
            idle_timeout=idle_timeout,
            log_requests=log_requests,
            tracker=tracker,
            timer=None if timer is None else timer.seconds,
        )

    def connect(self) -> Client:
        """Open a new in-memory connection."""
        return Client(self.factory)

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 if it does not exist)."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def protocol_errors(self, reason: str) -> float:
        """``policyd_protocol_errors_total{reason=...}``."""
        return self.sample("policyd_protocol_errors_total", reason=reason)

    def decision_failures(self, reason: str) -> float:
        """``policyd_decision_failures_total{reason=...}``."""
        return self.sample("policyd_decision_failures_total", reason=reason)

    def requests(self, action: str) -> float:
        """``policyd_requests_total{action=...}``."""
        return self.sample("policyd_requests_total", action=action)


@contextmanager
def capture_logs() -> Iterator[EventLoggingObserver]:
    """Collect every log event emitted inside the block."""
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


def events_named(events: Iterable[LogEvent], name: str) -> list[LogEvent]:
    """The policyd events whose ``event`` key is *name*."""
    return [e for e in events if e.get("event") == name]


def run_main(
    capsys: pytest.CaptureFixture[str], argv: Sequence[str], env: Mapping[str, str]
) -> tuple[int, str, str]:
    """Run `policyd.cli.main` in-process: (exit status, stdout, stderr)."""
    try:
        cli.main(list(argv), env)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    else:
        code = 0
    out, err = capsys.readouterr()
    return code, out, err


def sourced_by_sh(path: Path, names: Sequence[str], cwd: Path) -> dict[str, str]:
    """
    The values /bin/sh gives *names* after ``set -a; . PATH``.

    Run in *cwd* with only ``PATH`` in the environment, so that what the file
    sets is all there is.
    """
    script = 'set -a; . "$1" && printf "%s\\0" ' + " ".join(f'"${n}"' for n in names)
    result = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(path)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        timeout=30,
        check=True,
        cwd=cwd,
    )
    values = result.stdout.decode().split("\0")[:-1]
    return dict(zip(names, values, strict=True))


def exported_metric_names() -> set[str]:
    """
    Every sample name a policyd's /metrics can show.

    Read from a real `PolicyServer`'s registry (its families, as typed), with
    the sample suffixes of counters (``_total``) and histograms (``_bucket``,
    ``_sum``, ``_count``): what a PromQL expression may name.
    """
    from prometheus_client.exposition import generate_latest
    from twisted.internet.testing import MemoryReactorClock

    from policyd import config
    from policyd.server import PolicyServer

    registry = CollectorRegistry()
    PolicyServer(config.load({}), MemoryReactorClock(), registry)
    text = generate_latest(registry).decode()
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.MULTILINE):
        names.add(name)
        if kind == "counter":
            names.add(name.removesuffix("_total") + "_total")
        elif kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def required_program(name: str, package: str) -> str:
    """
    The path of program *name*, or skip the test if it is missing.

    Under ``CI=true`` a missing program fails instead: tests/run installs
    Debian's *package* there, and a silent skip would hide a broken set-up.
    """
    import shutil

    program = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if program is None:
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true but {name} is missing (Debian's {package})")
        pytest.skip(f"{name} is not installed (Debian's {package})")
    return program
