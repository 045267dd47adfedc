"""
`PolicyDecider`: the load, the policy, one verdict per transaction, dry run.

The tracker is a real `MemoryLoadTracker` on a `Clock`; where a test needs a
given stress level, `ForcedLevel` wraps one and reports the level the test
sets, so the per-client counters (and the refusals the decider records) are
the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import pytest
from helpers import IDLE_SNAPSHOT, RecordingTracker, capture_logs, events_named
from prometheus_client import REGISTRY, CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogEvent, LogLevel, formatEvent

from policyd import config, decision, policy
from policyd.actions import DUNNO, MAX_ACTION_LENGTH, Action
from policyd.decision import PolicyDecider
from policyd.load import (
    ELEVATED,
    LOCAL_HOST,
    NORMAL,
    OVERLOAD,
    BackendStatus,
    ClientStats,
    LoadSettings,
    LoadSnapshot,
    MemoryLoadTracker,
)
from policyd.metrics import PolicyMetrics
from policyd.policy import PolicySettings
from policyd.request import PolicyRequest

START = 1_700_000_000.0

# The attributes smtpd sends, for a client with nothing suspicious about it.
CLEAN: dict[str, str] = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "client_address": "192.0.2.10",
    "client_name": "mail.example.net",
    "reverse_client_name": "mail.example.net",
    "helo_name": "mail.example.net",
    "sender": "alice@example.net",
    "recipient": "bob@example.org",
    "instance": "a1.65f0c1d2.3e4f5.0",
    "sasl_username": "",
}
# No PTR and a bare-word HELO: suspicious (6), not very (2 without DNS).
BOT: dict[str, str] = {
    **CLEAN,
    "client_address": "203.0.113.45",
    "client_name": "unknown",
    "reverse_client_name": "unknown",
    "helo_name": "user-pc",
}
BOT_REASONS = ("no_client_name", "no_reverse_name", "helo_not_fqdn")
# A dynamic name and a HELO of localhost: firm score 7, one short of 8.
IMPOSTOR: dict[str, str] = {
    **CLEAN,
    "client_address": "203.0.113.77",
    "client_name": "203-0-113-77.dyn.example.net",
    "reverse_client_name": "203-0-113-77.dyn.example.net",
    "helo_name": "localhost",
}
IMPOSTOR_REASONS = ("dynamic_name", "helo_impersonates")


class ForcedLevel:
    """A `MemoryLoadTracker` whose stress level the test sets."""

    def __init__(self, clock: Clock, level: int = NORMAL, pressure: int = 0) -> None:
        self.real = MemoryLoadTracker(clock, LoadSettings())
        self.forced = level
        self.pressure = pressure
        self.refusals: list[PolicyRequest] = []
        self.hangups: list[bool] = []
        self.observed: list[PolicyRequest] = []
        self.looked_up: list[PolicyRequest] = []
        #: What `lookup` returns: set a Deferred to make decisions wait.
        self.waiting: Deferred[ClientStats | None] | None = None
        #: For each read of a client's counters, whether `waiting` had not
        #: fired yet (the shared record was not in).
        self.read_while_waiting: list[bool] = []

    @property
    def level(self) -> int:
        """The level the test set."""
        return self.forced

    def pressure_at(self, request: PolicyRequest) -> int:
        """The pressure the test set, for every request."""
        return self.pressure

    def busy_requests(self, host: str | None = None) -> list[PolicyRequest]:
        """The real tracker's holders."""
        return self.real.busy_requests(host)

    def connection_opened(self, connection: int, host: str = LOCAL_HOST) -> None:
        """Pass on."""
        self.real.connection_opened(connection, host)

    def connection_closed(self, connection: int) -> None:
        """Pass on."""
        self.real.connection_closed(connection)

    def observe(self, request: PolicyRequest) -> int:
        """Account for *request* in the real tracker; the forced level."""
        self.observed.append(request)
        self.real.observe(request)
        return self.forced

    def client(self, request: PolicyRequest) -> ClientStats:
        """The real tracker's counters (noting whether a fetch was still due)."""
        self.read_while_waiting.append(
            self.waiting is not None and not self.waiting.called
        )
        return self.real.client(request)

    def record_refusal(self, request: PolicyRequest, hangup: bool = False) -> None:
        """Remember the call, and let the real tracker record it."""
        self.refusals.append(request)
        self.hangups.append(hangup)
        self.real.record_refusal(request, hangup)

    def tick(self) -> None:
        """Pass on."""
        self.real.tick()

    def start(self) -> Deferred[None]:
        """Pass on."""
        return self.real.start()

    def stop(self) -> Deferred[None]:
        """Pass on."""
        return self.real.stop()

    def snapshot(self, host: str | None = None) -> LoadSnapshot:
        """The real tracker's snapshot."""
        return self.real.snapshot(host)

    def hosts(self) -> list[str]:
        """The real tracker's hosts."""
        return self.real.hosts()

    def lookup(self, request: PolicyRequest) -> Deferred[ClientStats | None] | None:
        """`waiting` (None unless the test set one): a shared store's fetch."""
        self.looked_up.append(request)
        return self.waiting

    def set_capacity(self, capacity: int) -> None:
        """Pass on."""
        self.real.set_capacity(capacity)

    def backend(self) -> BackendStatus:
        """The real tracker's backend."""
        return self.real.backend()


class Rig:
    """A decider on a forced-level tracker, a clock and a fresh registry."""

    def __init__(
        self,
        level: int = NORMAL,
        settings: PolicySettings | None = None,
        *,
        dry_run: bool = False,
        dry_run_warn: bool = False,
        refusal_log_limit: int = 0,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.tracker = ForcedLevel(self.clock, level)
        self.registry = CollectorRegistry()
        self.metrics = PolicyMetrics(self.registry)
        self.decider = PolicyDecider(
            self.tracker,
            settings if settings is not None else PolicySettings(),
            self.metrics,
            dry_run=dry_run,
            dry_run_warn=dry_run_warn,
            refusal_log_limit=refusal_log_limit,
            clock=self.clock,
        )

    def ask(
        self, attributes: dict[str, str], connection: int = 1, **changes: str
    ) -> Action:
        """The decider's answer to *attributes* with *changes*, on *connection*."""
        merged = {**attributes, **changes}
        answer = self.decider.decide(PolicyRequest.from_attributes(merged, connection))
        if not isinstance(answer, Action):
            raise AssertionError(f"expected an answer at once, got {answer!r}")
        return answer

    def set_level(self, level: int) -> None:
        """From now on the tracker reports *level*."""
        self.tracker.forced = level

    def count(self, outcome: str, reason: str) -> float:
        """``policyd_decisions_total{outcome,reason}``."""
        value = self.registry.get_sample_value(
            "policyd_decisions_total", {"outcome": outcome, "reason": reason}
        )
        return 0.0 if value is None else value

    def counts(self) -> dict[tuple[str, str], float]:
        """Every non-zero ``policyd_decisions_total`` series."""
        return {
            (s.labels["outcome"], s.labels["reason"]): s.value
            for family in self.registry.collect()
            if family.name == "policyd_decisions"
            for s in family.samples
            if s.name == "policyd_decisions_total" and s.value
        }


@pytest.fixture
def logs() -> Iterator[EventLoggingObserver]:
    """Every log event emitted during the test."""
    with capture_logs() as observer:
        yield observer


def refusals(logs: EventLoggingObserver) -> list[LogEvent]:
    """The ``refusal`` events logged so far."""
    return events_named(logs, "refusal")


E_BOT = Action.parse("450 4.7.1 Busy; try again later (" + " ".join(BOT_REASONS) + ")")
O_BOT = Action.parse(
    "421 4.7.0 Overloaded; try again later (" + " ".join(BOT_REASONS) + ")"
)


class TestNormal:
    """At normal, the fast path: DUNNO for everyone, without scoring."""

    def test_dunno_counted_normal(self) -> None:
        """Even a bot gets DUNNO at normal, counted as pass/normal only."""
        rig = Rig(NORMAL)
        assert rig.ask(BOT) == DUNNO
        assert rig.ask(IMPOSTOR, connection=2) == DUNNO
        assert rig.counts() == {("pass", "normal"): 2.0}
        assert rig.tracker.refusals == []

    def test_real_tracker(self, logs: EventLoggingObserver) -> None:
        """With the real tracker idle, the level is normal and it sees the request."""
        clock = Clock()
        clock.advance(START)
        tracker = MemoryLoadTracker(clock, LoadSettings())
        registry = CollectorRegistry()
        decider = PolicyDecider(
            tracker, PolicySettings(), PolicyMetrics(registry), clock=clock
        )
        request = PolicyRequest.from_attributes(BOT, 1)
        assert decider.decide(request) == DUNNO
        assert tracker.client(request).concurrency == 1
        assert tracker.snapshot().transactions == 1
        assert refusals(logs) == []

    def test_postfix_stress_reaches_the_policy(self) -> None:
        """
        The real tracker's level decides: Postfix's stress=yes means overload.

        The first request carrying stress=yes is already decided at
        overload, so the bot is refused at once.  (The floor needs no load
        here: `postfix_stress_min_load` has tests of its own.)
        """
        clock = Clock()
        clock.advance(START)
        tracker = MemoryLoadTracker(clock, LoadSettings(postfix_stress_min_load=0.0))
        decider = PolicyDecider(
            tracker, PolicySettings(), PolicyMetrics(CollectorRegistry()), clock=clock
        )
        calm = PolicyRequest.from_attributes(BOT, 1)
        assert decider.decide(calm) == DUNNO
        stressed = PolicyRequest.from_attributes({**BOT, "stress": "yes"}, 2)
        assert decider.decide(stressed) == O_BOT

    def test_every_request_observed(self) -> None:
        """The tracker observes every request, pinned ones included."""
        tracker = RecordingTracker(attrs.evolve(IDLE_SNAPSHOT, level=ELEVATED))
        decider = PolicyDecider(
            tracker,
            PolicySettings(),
            PolicyMetrics(CollectorRegistry()),
            clock=Clock(),
        )
        requests = [
            PolicyRequest.from_attributes({**BOT, "recipient": f"r{n}@example.org"}, 1)
            for n in range(3)
        ]
        for request in requests:
            assert decider.decide(request) == E_BOT
        assert [c for c in tracker.calls if c[0] == "observe"] == [
            ("observe", r) for r in requests
        ]
        assert [c for c in tracker.calls if c[0] == "refusal"] == [
            ("refusal", requests[0])
        ]


class TestSharedRecord:
    """With a tracker that shares clients, the decision waits for the record."""

    def test_normal_does_not_look_up(self) -> None:
        """At normal nobody is scored, so nothing is fetched or waited for."""
        rig = Rig(NORMAL)
        rig.tracker.waiting = Deferred()
        assert rig.ask(BOT) == DUNNO
        assert rig.tracker.looked_up == []

    def test_scored_after_the_record_is_in(self) -> None:
        """Under stress the answer comes once the lookup fires, not before."""
        rig = Rig(ELEVATED)
        rig.tracker.waiting = Deferred()
        request = PolicyRequest.from_attributes(BOT, 1)
        answer = rig.decider.decide(request)
        assert isinstance(answer, Deferred)
        assert rig.tracker.looked_up == [request]
        assert rig.tracker.read_while_waiting == []
        assert rig.tracker.refusals == []
        answers: list[Action] = []
        answer.addCallback(answers.append)
        rig.tracker.waiting.callback(None)
        assert answers == [E_BOT]
        assert rig.tracker.read_while_waiting == [False]
        assert rig.tracker.refusals == [request]
        assert rig.counts() == {("defer", reason): 1.0 for reason in BOT_REASONS}

    def test_shared_record_scored(self) -> None:
        """The record the lookup brings is what the client is scored with."""
        rig = Rig(ELEVATED)
        rig.tracker.waiting = Deferred()
        answer = rig.decider.decide(PolicyRequest.from_attributes(CLEAN, 1))
        assert isinstance(answer, Deferred)
        answers: list[Action] = []
        answer.addCallback(answers.append)
        # Refused 2 s ago elsewhere, and holding processes without progress:
        # a clean identity that the shared history makes suspicious.
        rig.tracker.waiting.callback(
            ClientStats("192.0.2.10", 0, 0.0, 0.0, 1.0, 2.0, 60.0)
        )
        (action,) = answers
        assert action != DUNNO
        assert "quick_retry" in action.text
        assert rig.tracker.read_while_waiting == []  # client() not asked

    def test_nothing_to_wait_for(self) -> None:
        """A tracker with nothing to fetch (None) is decided at once."""
        rig = Rig(ELEVATED)
        assert rig.ask(BOT) == E_BOT
        assert len(rig.tracker.looked_up) == 1

    def test_transaction_looks_up_once(self) -> None:
        """The next recipients of a transaction reuse its verdict: no fetch."""
        rig = Rig(ELEVATED)
        rig.ask(CLEAN)
        rig.ask(CLEAN, recipient="carol@example.org")
        assert len(rig.tracker.looked_up) == 1


class TestOneVerdictPerTransaction:
    """Every request of one instance on one connection gets the first verdict."""

    STAGES = ("RCPT", "RCPT", "DATA", "END-OF-MESSAGE")

    @pytest.mark.parametrize(
        ("first", "then", "answer"),
        [
            pytest.param(ELEVATED, NORMAL, E_BOT, id="refused, load gone: refused"),
            pytest.param(OVERLOAD, NORMAL, O_BOT, id="421, load gone: 421"),
            pytest.param(ELEVATED, OVERLOAD, E_BOT, id="450, then overload: 450"),
            pytest.param(OVERLOAD, ELEVATED, O_BOT, id="421, then elevated: 421"),
            pytest.param(NORMAL, OVERLOAD, DUNNO, id="passed, then overload: pass"),
            pytest.param(NORMAL, ELEVATED, DUNNO, id="passed, then elevated: pass"),
        ],
    )
    def test_level_change_mid_transaction(
        self, first: int, then: int, answer: Action
    ) -> None:
        """A level change between RCPTs, DATA or END-OF-MESSAGE changes nothing."""
        rig = Rig(first)
        assert rig.ask(BOT, protocol_state="RCPT") == answer
        rig.set_level(then)
        for stage in self.STAGES:
            assert rig.ask(BOT, protocol_state=stage) == answer

    def test_new_instance_decided_afresh(self) -> None:
        """The next transaction on the connection is decided at the new level."""
        rig = Rig(ELEVATED)
        assert rig.ask(BOT) == E_BOT
        rig.set_level(NORMAL)
        assert rig.ask(BOT, instance="a1.65f0c1d2.3e4f6.1") == DUNNO
        rig.set_level(OVERLOAD)
        assert rig.ask(BOT, instance="a1.65f0c1d2.3e4f6.1") == DUNNO
        assert rig.ask(BOT, instance="a1.65f0c1d3.1.2").label == "421"

    def test_pinned_per_connection(self) -> None:
        """The same instance text on another connection is another transaction."""
        rig = Rig(ELEVATED)
        assert rig.ask(BOT, connection=1) == E_BOT
        rig.set_level(NORMAL)
        assert rig.ask(BOT, connection=2) == DUNNO
        assert rig.ask(BOT, connection=1) == E_BOT

    def test_no_instance_not_pinned(self) -> None:
        """
        Requests without an instance (CONNECT, HELO) are each decided.

        They belong to no transaction, so each is judged at the level of the
        moment.
        """
        rig = Rig(OVERLOAD)
        connect = {**BOT, "protocol_state": "CONNECT", "instance": "", "helo_name": ""}
        assert rig.ask(connect).label == "421"
        rig.set_level(NORMAL)
        assert rig.ask(connect) == DUNNO

    def test_clean_client_kept_clean(self) -> None:
        """A clean client's transaction passes throughout, counted pass/none."""
        rig = Rig(OVERLOAD)
        for stage in self.STAGES:
            assert rig.ask(CLEAN, protocol_state=stage) == DUNNO
        assert rig.counts() == {("pass", "none"): 4.0}

    def test_pins_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Only the most recent transactions are remembered; the oldest go first."""
        monkeypatch.setattr(decision, "PINNED_TRANSACTIONS", 3)
        rig = Rig(ELEVATED)
        for connection in range(1, 5):
            assert rig.ask(BOT, connection=connection).label == "450"
        rig.set_level(NORMAL)
        for connection in (2, 3, 4):
            assert rig.ask(BOT, connection=connection).label == "450"  # remembered
        assert rig.ask(BOT, connection=1) == DUNNO  # forgotten: decided afresh


class TestIdentityPerSession:
    """Who the client is, judged once a session, never carried to another one."""

    def test_judged_once_for_a_session(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The transactions of one session reuse the judgement of its names and HELO."""
        judged: list[str] = []
        real = policy.identity

        def counting(
            request: PolicyRequest, settings: PolicySettings, key: object = None
        ) -> object:
            judged.append(request.instance)
            return real(request, settings, key)  # type: ignore[arg-type]

        monkeypatch.setattr(policy, "identity", counting)
        rig = Rig(ELEVATED)
        for n in range(3):
            assert rig.ask(BOT, instance=f"a1.1.1.{n}").label == "450"
        assert judged == ["a1.1.1.0"]

    @pytest.mark.parametrize(
        ("first", "then", "answer"),
        [
            pytest.param(BOT, CLEAN, DUNNO, id="bot, then a clean client"),
            pytest.param(CLEAN, BOT, None, id="clean, then a bot"),
            pytest.param(CLEAN, {**CLEAN, "helo_name": "user-pc"}, None, id="new HELO"),
            pytest.param(
                CLEAN, {**CLEAN, "reverse_client_name": "unknown"}, None, id="new PTR"
            ),
            pytest.param(
                CLEAN, {**CLEAN, "client_name": "unknown"}, None, id="new name"
            ),
            pytest.param(
                {**CLEAN, "helo_name": "localhost", "client_address": "127.0.0.1"},
                {**CLEAN, "helo_name": "localhost", "client_address": "192.0.2.99"},
                None,
                id="localhost from elsewhere",
            ),
            pytest.param(
                {**CLEAN, "helo_name": "localhost", "server_address": "192.0.2.10"},
                {**CLEAN, "helo_name": "localhost", "server_address": "192.0.2.11"},
                None,
                id="other server address",
            ),
        ],
    )
    def test_next_session_judged_afresh(
        self, first: dict[str, str], then: dict[str, str], answer: Action | None
    ) -> None:
        """A new session on the same smtpd process is judged on what it says.

        Another client, or the same with other names, HELO or server address:
        answered as a decider that never saw the first session would.
        """
        # A bar of 2: one identity sign is enough to be refused.
        low = PolicySettings(suspicious_score=2)
        rig = Rig(ELEVATED, low)
        assert rig.ask(first, instance="a1.1.1.1") == Rig(ELEVATED, low).ask(first)
        expected = Rig(ELEVATED, low).ask(then)
        assert rig.ask(then, instance="a1.1.1.2") == expected
        if answer is not None:
            assert expected == answer
        else:
            assert expected != DUNNO

    def test_helo_judged_after_connect(self) -> None:
        """The CONNECT (no HELO yet) does not stand for the session's RCPTs."""
        rig = Rig(ELEVATED)
        connect = {**IMPOSTOR, "protocol_state": "CONNECT", "instance": ""}
        first = rig.ask(connect)
        assert "helo_impersonates" not in first.text
        assert "helo_impersonates" in rig.ask(IMPOSTOR).text

    def test_reload_weighs_again(self) -> None:
        """New weights (a reload) apply at once: no verdict of the old ones is kept."""
        rig = Rig(ELEVATED)
        assert rig.ask(BOT, instance="a1.1.1.1") == E_BOT
        rig.decider.settings = weighted_zero = attrs.evolve(
            rig.decider.settings,
            weights={**rig.decider.settings.weights, **dict.fromkeys(BOT_REASONS, 0)},
        )
        assert weighted_zero is rig.decider.settings
        # Another bot (no quick retry): the very signals of the first.
        other = {**BOT, "client_address": "203.0.113.46"}
        assert rig.ask(other, connection=2, instance="a1.1.1.2") == DUNNO

    def test_reload_judges_again(self) -> None:
        """New settings (a reload) are applied to the next request of a session."""
        rig = Rig(ELEVATED)
        named = {**CLEAN, "helo_name": "mx.example.org"}
        assert rig.ask(named, instance="a1.1.1.1") == DUNNO
        rig.decider.settings = attrs.evolve(
            rig.decider.settings, my_hostnames=("mx.example.org",)
        )
        assert "helo_impersonates" in rig.ask(named, instance="a1.1.1.2").text


class TestRefusals:
    """A refusal: logged once, recorded once, counted per reason."""

    def test_one_log_event_per_transaction(self, logs: EventLoggingObserver) -> None:
        """Four requests of one refused transaction log one ``refusal`` event."""
        rig = Rig(OVERLOAD)
        for stage in ("RCPT", "RCPT", "DATA", "END-OF-MESSAGE"):
            rig.ask(BOT, protocol_state=stage)
        (event,) = refusals(logs)
        assert event["log_level"] == LogLevel.info
        assert {
            key: event[key]
            for key in (
                "client",
                "name",
                "helo",
                "stress_level",
                "action",
                "outcome",
                "score",
                "bar",
                "reasons",
                "instance",
                "state",
                "dry_run",
            )
        } == {
            "client": "203.0.113.45",
            "name": "unknown",
            "helo": "user-pc",
            "stress_level": "overload",
            "action": O_BOT.text,
            "outcome": "defer",
            "score": 6,
            "bar": 3,
            "reasons": list(BOT_REASONS),
            "instance": "a1.65f0c1d2.3e4f5.0",
            "state": "RCPT",
            "dry_run": False,
        }
        assert formatEvent(event) == (
            "Refused 203.0.113.45 (unknown, helo user-pc) at overload: "
            f"{O_BOT.text} (score 6, bar 3: no_client_name, no_reverse_name, "
            "helo_not_fqdn)"
        )

    def test_each_transaction_logged(self, logs: EventLoggingObserver) -> None:
        """A second refused transaction (a new instance) is logged again."""
        rig = Rig(ELEVATED)
        rig.ask(BOT)
        rig.ask(BOT)
        rig.ask(BOT, instance="a1.65f0c1d2.3e4f5.1")
        assert len(refusals(logs)) == 2

    def test_client_strings_escaped(self, logs: EventLoggingObserver) -> None:
        """What the client chose (names, HELO, instance) cannot forge log lines."""
        # A bad HELO alone is enough here, so that the names can be anything.
        rig = Rig(OVERLOAD, PolicySettings(suspicious_score=2))
        rig.ask(
            CLEAN,
            helo_name="evil\r\n2024-01-01 info [x] forged",
            client_name="b\udcff\x1b[31m.example",
            instance="i\n1",
        )
        (event,) = refusals(logs)
        assert event["helo"] == "evil\\r\\n2024-01-01 info [x] forged"
        assert event["name"] == "b\\xff\\x1b[31m.example"
        assert event["instance"] == "i\\n1"
        assert "\n" not in formatEvent(event)
        assert "\r" not in formatEvent(event)

    @pytest.mark.parametrize("client", [CLEAN, {**BOT, "sasl_username": "alice"}])
    def test_no_log_without_refusal(
        self, logs: EventLoggingObserver, client: dict[str, str]
    ) -> None:
        """Passed and exempt clients are not logged as refusals."""
        Rig(OVERLOAD).ask(client)
        assert refusals(logs) == []

    def test_recorded_once_per_transaction(self) -> None:
        """`record_refusal` is called once for a transaction, not per request."""
        rig = Rig(OVERLOAD)
        for _ in range(3):
            rig.ask(BOT)
        assert len(rig.tracker.refusals) == 1
        assert rig.tracker.refusals[0].client_address == "203.0.113.45"

    def test_quick_retry_seen(self) -> None:
        """
        A client back within the retry window after a refusal scores quick_retry.

        The impostor's firm score is 7; coming back 5 s after a 421 adds 3,
        so the retry is refused for good.  After the window it is 421 again.
        """
        rig = Rig(OVERLOAD)
        assert rig.ask(IMPOSTOR).label == "421"
        rig.clock.advance(5)
        retry = rig.ask(IMPOSTOR, connection=2, instance="b2.1.2.0")
        assert retry.label == "521"
        assert "quick_retry" in retry.text
        rig.clock.advance(31)
        later = rig.ask(IMPOSTOR, connection=3, instance="c3.1.2.0")
        assert later.label == "421"
        assert "quick_retry" not in later.text

    def test_counted_per_reason(self) -> None:
        """A refusal counts one per reason, under its outcome."""
        rig = Rig(OVERLOAD)
        rig.ask(BOT)
        rig.ask(IMPOSTOR, connection=2)
        expected = {("defer", reason): 1.0 for reason in BOT_REASONS}
        expected.update({("defer", reason): 1.0 for reason in IMPOSTOR_REASONS})
        assert rig.counts() == expected

    def test_counted_per_request(self) -> None:
        """
        Every answered request is a decision, pinned ones too.

        The log and the tracker hear of a refusal once per transaction; the
        counter counts what Postfix was told.
        """
        rig = Rig(ELEVATED)
        for _ in range(3):
            rig.ask(BOT)
        assert rig.counts() == {("defer", reason): 3.0 for reason in BOT_REASONS}

    def test_reject_counted(self) -> None:
        """A very suspicious client at overload is counted as reject."""
        rig = Rig(OVERLOAD)
        assert rig.ask(IMPOSTOR).label == "421"
        assert rig.ask(IMPOSTOR, connection=2, instance="b2.1.2.0").label == "521"
        assert rig.counts() == {
            ("defer", "dynamic_name"): 1.0,
            ("defer", "helo_impersonates"): 1.0,
            ("reject", "dynamic_name"): 1.0,
            ("reject", "helo_impersonates"): 1.0,
            ("reject", "quick_retry"): 1.0,
        }


class TestExemptions:
    """Exempt clients get DUNNO under stress, counted by their exemption."""

    SETTINGS = PolicySettings(
        allow_networks=config.networks("198.51.100.0/24 2001:db8::/32"),
        allow_domains=("example.com",),
    )

    @pytest.mark.parametrize(
        ("changes", "reason"),
        [
            ({"sasl_username": "alice"}, "authenticated"),
            ({"client_address": "198.51.100.9"}, "allowed_network"),
            ({"client_address": "2001:db8:5::9"}, "allowed_network"),
            (
                {"client_name": "mx.example.com", "reverse_client_name": "x"},
                "allowed_domain",
            ),
        ],
    )
    @pytest.mark.parametrize("level", [ELEVATED, OVERLOAD])
    def test_exempt(
        self,
        logs: EventLoggingObserver,
        changes: dict[str, str],
        reason: str,
        level: int,
    ) -> None:
        """DUNNO, counted exempt/<exemption>; no log, nothing recorded."""
        rig = Rig(level, self.SETTINGS)
        assert rig.ask({**IMPOSTOR, **changes}) == DUNNO
        assert rig.counts() == {("exempt", reason): 1.0}
        assert refusals(logs) == []
        assert rig.tracker.refusals == []

    def test_unverified_name_not_exempt(self) -> None:
        """A PTR under an allowed domain that does not verify exempts nobody."""
        rig = Rig(OVERLOAD, self.SETTINGS)
        answer = rig.ask(BOT, reverse_client_name="mx.example.com")
        assert answer.label == "421"


class TestDryRun:
    """POLICYD_DRY_RUN: never refuse; log and count what would have happened."""

    @pytest.mark.parametrize(
        ("level", "client", "reasons", "outcome"),
        [
            (ELEVATED, BOT, BOT_REASONS, "dry_run_defer"),
            (OVERLOAD, BOT, BOT_REASONS, "dry_run_defer"),
            (ELEVATED, IMPOSTOR, IMPOSTOR_REASONS, "dry_run_defer"),
            (OVERLOAD, IMPOSTOR, IMPOSTOR_REASONS, "dry_run_reject"),
        ],
    )
    def test_never_refuses(
        self,
        logs: EventLoggingObserver,
        level: int,
        client: dict[str, str],
        reasons: tuple[str, ...],
        outcome: str,
    ) -> None:
        """
        The answer is DUNNO; the would-be outcome is counted and logged.

        Nothing is recorded as a refusal, so the client's next attempt is
        not a quick retry either.
        """
        settings = PolicySettings(reject_score=7)  # the impostor's firm score
        rig = Rig(level, settings, dry_run=True)
        for _ in range(2):
            assert rig.ask(client) == DUNNO
        assert rig.counts() == {(outcome, reason): 2.0 for reason in reasons}
        (event,) = refusals(logs)
        assert event["what"] == "Would refuse"
        assert event["dry_run"] is True
        assert event["outcome"] == outcome.removeprefix("dry_run_")
        assert formatEvent(event).startswith(
            f"Would refuse {client['client_address']} "
        )
        assert rig.tracker.refusals == []
        rig.clock.advance(1)
        rig.ask(client, connection=2, instance="z.1.2.3")
        assert rig.count(outcome, "quick_retry") == 0.0

    def test_pass_and_exempt_unchanged(self) -> None:
        """Clients that would not be refused are counted as without dry run."""
        rig = Rig(OVERLOAD, dry_run=True)
        assert rig.ask(CLEAN) == DUNNO
        assert rig.ask(BOT, connection=2, sasl_username="bob") == DUNNO
        assert rig.counts() == {("pass", "none"): 1.0, ("exempt", "authenticated"): 1.0}

    def test_normal_unchanged(self) -> None:
        """At normal, dry run or not, the fast path answers."""
        rig = Rig(NORMAL, dry_run=True, dry_run_warn=True)
        assert rig.ask(BOT) == DUNNO
        assert rig.counts() == {("pass", "normal"): 1.0}

    @pytest.mark.parametrize(("level", "would"), [(ELEVATED, E_BOT), (OVERLOAD, O_BOT)])
    def test_warn(self, level: int, would: Action) -> None:
        """With POLICYD_DRY_RUN_WARN the answer is a valid WARN naming the action."""
        rig = Rig(level, dry_run=True, dry_run_warn=True)
        answer = rig.ask(BOT)
        assert answer.text == f"WARN policyd dry run would answer: {would.text}"
        assert answer.label == "WARN"
        assert Action.parse(answer.text) == answer
        assert answer.wire == b"action=" + answer.text.encode() + b"\n\n"
        assert rig.count("dry_run_defer", "no_client_name") == 1.0
        assert rig.tracker.refusals == []

    def test_warn_of_a_long_action(self) -> None:
        """
        A WARN around a long action is cut to 400 characters and still valid.

        The cut must not leave a trailing space, which Postfix's parser (and
        Action.parse) would not take: the request would fail and get the
        fallback action instead.
        """
        head = "450 4.7.1 ab "
        template = head + " ".join(["x"] * ((MAX_ACTION_LENGTH - len(head)) // 2))
        assert config.action_template(template) == template  # a valid setting
        prefix = "WARN policyd dry run would answer: "
        assert (prefix + template)[:MAX_ACTION_LENGTH].endswith(" ")
        rig = Rig(
            ELEVATED,
            PolicySettings(elevated_action=template),
            dry_run=True,
            dry_run_warn=True,
        )
        answer = rig.ask(BOT)
        assert len(answer.text) <= MAX_ACTION_LENGTH
        assert answer.text == answer.text.strip()
        assert (prefix + template).startswith(answer.text)
        assert Action.parse(answer.text) == answer

    def test_warn_needs_dry_run(self) -> None:
        """POLICYD_DRY_RUN_WARN alone changes nothing: refusals are real."""
        rig = Rig(OVERLOAD, dry_run_warn=True)
        assert rig.ask(BOT) == O_BOT
        assert rig.count("defer", "no_client_name") == 1.0
        assert len(rig.tracker.refusals) == 1


class TestCellsThatLetThrough:
    """A matrix cell set to DUNNO, WARN or INFO refuses nobody."""

    @pytest.mark.parametrize(
        ("template", "answer"),
        [
            ("DUNNO", "DUNNO"),
            (
                "WARN suspicious ({reasons})",
                "WARN suspicious (" + " ".join(BOT_REASONS) + ")",
            ),
            ("INFO suspicious", "INFO suspicious"),
        ],
    )
    def test_cell(self, logs: EventLoggingObserver, template: str, answer: str) -> None:
        """The cell's action is the answer; not logged, recorded or counted refused."""
        rig = Rig(ELEVATED, PolicySettings(elevated_action=template))
        assert rig.ask(BOT) == Action.parse(answer)
        assert refusals(logs) == []
        assert rig.tracker.refusals == []
        assert rig.counts() == {("pass", "none"): 1.0}


class TestMetrics:
    """The decisions counter lives on the registry passed in."""

    def test_own_registry(self) -> None:
        """Nothing is counted on prometheus_client's global registry."""
        rig = Rig(OVERLOAD)
        rig.ask(BOT)
        assert rig.count("defer", "no_client_name") == 1.0
        assert (
            REGISTRY.get_sample_value(
                "policyd_decisions_total",
                {"outcome": "defer", "reason": "no_client_name"},
            )
            is None
        )

    def test_labels_bounded(self) -> None:
        """Outcome and reason labels come from fixed sets, never from clients."""
        rig = Rig(OVERLOAD, PolicySettings(allow_domains=("example.com",)))
        for n, client in enumerate(
            [CLEAN, BOT, IMPOSTOR, {**CLEAN, "sasl_username": "x"}]
        ):
            rig.ask(client, connection=n + 1)
        rig.set_level(NORMAL)
        rig.ask(BOT, connection=99)
        outcomes = {*policy.OUTCOMES, "dry_run_defer", "dry_run_reject"}
        reasons = {*policy.SIGNALS, *policy.EXEMPTIONS, "normal", "none"}
        for outcome, reason in rig.counts():
            assert outcome in outcomes
            assert reason in reasons


class TestRefusalLogLimit:
    """A flood of refusals does not become a flood of log lines."""

    def test_limit_per_second(self, logs: EventLoggingObserver) -> None:
        """
        At most refusal_log_limit refusal events a second; the rest are summed.

        Every refusal is still answered and counted; the next second starts a
        new allowance, and its first refusal brings one warning with the
        number not logged.
        """
        rig = Rig(OVERLOAD, refusal_log_limit=3)
        for connection in range(1, 11):
            answer = rig.ask(
                BOT,
                connection=connection,
                instance=f"i{connection}",
                client_address=f"203.0.113.{connection}",
            )
            assert answer.label == "421"
        assert len(refusals(logs)) == 3
        assert rig.count("defer", "helo_not_fqdn") == 10
        rig.clock.advance(1.0)
        rig.ask(BOT, connection=11, instance="i11", client_address="203.0.113.11")
        assert len(refusals(logs)) == 4
        (summary,) = events_named(logs, "refusals_not_logged")
        assert summary["count"] == 7
        assert summary["log_level"] == LogLevel.warn

    def test_zero_logs_every_refusal(self, logs: EventLoggingObserver) -> None:
        """refusal_log_limit 0 logs every refusal."""
        rig = Rig(OVERLOAD, refusal_log_limit=0)
        for connection in range(1, 21):
            rig.ask(BOT, connection=connection, instance=f"i{connection}")
        assert len(refusals(logs)) == 20
        assert events_named(logs, "refusals_not_logged") == []


class TestPressure:
    """The decider asks the tracker how far the bar has fallen."""

    def test_one_sign_refused_once_overload_lasts(self) -> None:
        """One identity sign: DUNNO at fresh overload, 421 once pressure is 1."""
        rig = Rig(OVERLOAD)
        one_sign = {**CLEAN, "client_name": "unknown", "protocol_state": "CONNECT"}
        assert rig.ask(one_sign, connection=1) == DUNNO
        rig.tracker.pressure = 1
        action = rig.ask(one_sign, connection=2)
        assert action.text.startswith("421 4.7.0")
        assert "no_client_name" in action.text

    def test_clean_client_passes_at_any_pressure(self) -> None:
        """Pressure never makes a clean client refusable."""
        rig = Rig(OVERLOAD)
        rig.tracker.pressure = 9
        assert rig.ask(CLEAN) == DUNNO


class TestHangups:
    """The tracker learns whether a refusal ended the session (421, 521)."""

    @pytest.mark.parametrize(("level", "hangup"), [(OVERLOAD, True), (ELEVATED, False)])
    def test_hangup_told(self, level: int, hangup: bool) -> None:
        """421 at overload hangs up; 450 at elevated does not."""
        rig = Rig(level)
        rig.ask(BOT)
        assert rig.tracker.hangups == [hangup]
