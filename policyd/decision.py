"""The decision seam between the protocol and the policy.

The protocol hands each parsed `PolicyRequest` to a `Decider` and writes back
whatever `Action` it returns.  It knows nothing about scores or load; a decider
knows nothing about bytes or connections.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Final, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from policyd import policy
from policyd.actions import DUNNO, MAX_ACTION_LENGTH, Action
from policyd.load import NORMAL, ClientStats, LoadTracker
from policyd.logs import escape
from policyd.metrics import PolicyMetrics
from policyd.policy import PolicySettings, Verdict
from policyd.request import PolicyRequest

log = Logger()


class Decider(Protocol):
    """Something that turns a request into a reply action."""

    def decide(self, request: PolicyRequest) -> Action | Deferred[Action]:
        """Answer *request*.

        Return an `Action` directly when the answer is known at once (the fast
        path), or a `Deferred` that fires with one.  Raising, failing, or taking
        longer than the configured decision timeout makes the protocol answer
        the fallback action instead.
        """


class TrackingDecider:
    """
    Account for every request in the load tracker, then answer ``DUNNO``.

    Stress detection without decisions: the level and the per-client
    counters are kept (and exported as metrics), but nobody is refused.
    """

    def __init__(self, tracker: LoadTracker) -> None:
        self.tracker = tracker

    def decide(self, request: PolicyRequest) -> Action:
        """Observe *request*; return ``DUNNO``."""
        self.tracker.observe(request)
        return DUNNO


# How many transactions' verdicts are remembered, so that every request of
# one transaction (one RCPT after another) gets the same answer.  One per
# smtpd process is enough; the bound only matters for connection churn.
PINNED_TRANSACTIONS = 65536


@attrs.define
class _Session:
    """What a policy connection's requests settled (`PolicyDecider._sessions`)."""

    #: The transaction whose verdict every later request of it gets.
    instance: str = ""
    verdict: Verdict | None = None
    #: The client's `policy.identity`, for requests with this identity key
    #: (None: judge again, as after a reload).
    identity_key: policy.IdentityKey | None = None
    identity: tuple[str, ...] = ()


class PolicyDecider:
    """
    The product: observe the load, and under stress refuse the suspicious.

    At ``normal`` every request gets ``DUNNO`` without being scored.  Under
    stress, `policyd.policy.decide` scores the client; a refusal is logged
    (one event with the client, the level, the score and the reasons),
    counted, and remembered by the tracker so that a quick retry is noticed.
    Every request of one transaction gets the verdict of its first request.
    With *dry_run*, nothing is refused: the would-be action is logged and
    counted, and the answer is ``DUNNO`` (or ``WARN`` with *dry_run_warn*).
    """

    def __init__(
        self,
        tracker: LoadTracker,
        settings: PolicySettings,
        metrics: PolicyMetrics,
        *,
        clock: IReactorTime,
        dry_run: bool = False,
        dry_run_warn: bool = False,
        refusal_log_limit: int = 0,
    ) -> None:
        self.tracker = tracker
        self.metrics = metrics
        self.dry_run = dry_run
        self.dry_run_warn = dry_run_warn
        # Refusal log events per second (0: all).  A flood of bots must not
        # become a flood of log lines, written just when CPU is scarcest.
        self.refusal_log_limit = refusal_log_limit
        self._clock = clock
        self._log_second = -1
        self._logged = 0
        self._not_logged = 0
        # Per policy connection (one smtpd process), what its latest requests
        # settled: the transaction whose verdict is pinned, and the identity
        # of its client (the same for every request of a session).
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        # What the signals found, the level and the bar make of a client
        # (`policy.judge`).  Both memos hold for the current settings only.
        self._verdicts: dict[tuple[tuple[str, ...], int, int], Verdict] = {}
        self.settings = settings
        self._count_normal = partial(metrics.decided, policy.PASS, "normal")

    @property
    def settings(self) -> PolicySettings:
        """The policy's settings; new ones (a reload) apply from the next request."""
        return self._settings

    @settings.setter
    def settings(self, settings: PolicySettings) -> None:
        # Every judgement made under the old settings is forgotten.
        self._settings = settings
        self._verdicts.clear()
        for session in self._sessions.values():
            session.identity_key = None

    def decide(self, request: PolicyRequest) -> Action | Deferred[Action]:
        """Answer *request*.

        At once, unless the client is scored and the tracker shares its state
        with other policyd instances: then once the shared record is in (or
        the tracker's deadline passed, and the local view decides).
        """
        level = self.tracker.observe(request)
        instance = request.instance
        if instance:
            session = self._sessions.get(request.connection)
            if (
                session is not None
                and session.instance == instance
                and session.verdict is not None
            ):
                return self._answer(request, session.verdict, first=False)
        if level == NORMAL:
            return self._decided(request, _NORMAL)
        waiting = self.tracker.lookup(request)
        if waiting is not None:
            return waiting.addCallback(self._score, request, level)
        return self._score(None, request, level)

    def _score(
        self, shared: ClientStats | None, request: PolicyRequest, level: int
    ) -> Action:
        """Score *request*'s client: its *shared* record, else what is known here.

        Who the client is (its names and HELO) is judged once per session:
        later requests that repeat them reuse the judgement.
        """
        settings = self._settings
        key = policy.identity_key(request)
        session = self._session(request.connection)
        if session.identity_key != key:
            session.identity_key = key
            session.identity = policy.identity(request, settings, key)
        verdict = policy.decide(
            request,
            level,
            shared if shared is not None else self.tracker.client(request),
            settings,
            self.tracker.pressure_at(request),
            session.identity,
            self._verdicts,
        )
        return self._decided(request, verdict, session)

    def _session(self, connection: int) -> _Session:
        """What is remembered of *connection*, the most recent one now."""
        sessions = self._sessions
        session = sessions.get(connection)
        if session is None:
            session = sessions[connection] = _Session()
            if len(sessions) > PINNED_TRANSACTIONS:
                sessions.popitem(last=False)
        else:
            sessions.move_to_end(connection)
        return session

    def _decided(
        self, request: PolicyRequest, verdict: Verdict, session: _Session | None = None
    ) -> Action:
        instance = request.instance
        if instance:
            if session is None:
                session = self._session(request.connection)
            session.instance = instance
            session.verdict = verdict
        return self._answer(request, verdict, first=True)

    def _answer(
        self, request: PolicyRequest, verdict: Verdict, *, first: bool
    ) -> Action:
        if verdict is _NORMAL:
            self._count_normal()
            return DUNNO
        outcome = verdict.outcome
        # Once: a property, and this runs for every request under stress.
        refused = verdict.refused
        if refused:
            if self.dry_run:
                outcome = "dry_run_" + outcome
            elif first:
                self.tracker.record_refusal(
                    request, hangup=policy.hangs_up(verdict.action)
                )
            if first:
                self._log_refusal(request, verdict)
        if verdict.exemption is not None:
            self.metrics.decided(outcome, verdict.exemption)
        elif not refused or not verdict.reasons:
            self.metrics.decided(outcome, "none")
        else:
            self.metrics.decided_for(outcome, verdict.reasons)
        if not refused:
            # DUNNO, or the WARN or INFO an admin put in a matrix cell.
            return verdict.action
        if self.dry_run:
            if self.dry_run_warn:
                # Cut to the limit, and never end in the space the cut may
                # leave (Action.parse refuses trailing spaces).
                return Action.parse(
                    f"WARN policyd dry run would answer: {verdict.action.text}"[
                        :MAX_ACTION_LENGTH
                    ].rstrip()
                )
            return DUNNO
        return verdict.action

    def _log_refusal(self, request: PolicyRequest, verdict: Verdict) -> None:
        if self.refusal_log_limit:
            second = int(self._clock.seconds())
            if second != self._log_second:
                if self._not_logged:
                    log.warn(
                        "{count} refusals were not logged (more than "
                        "{limit} a second); policyd_decisions_total counts them",
                        event="refusals_not_logged",
                        count=self._not_logged,
                        limit=self.refusal_log_limit,
                    )
                self._log_second = second
                self._logged = 0
                self._not_logged = 0
            if self._logged >= self.refusal_log_limit:
                self._not_logged += 1
                return
            self._logged += 1
        log.info(
            "{what} {client} ({name}, helo {helo}) at {stress_level}: {action} "
            "(score {score}, bar {bar}: {reason_list})",
            event="refusal",
            what="Would refuse" if self.dry_run else "Refused",
            dry_run=self.dry_run,
            client=escape(request.client_address),
            name=escape(request.client_name),
            helo=escape(request.helo_name),
            stress_level=verdict.level_name,
            action=verdict.action.text,
            outcome=verdict.outcome,
            score=verdict.score,
            bar=verdict.bar,
            reasons=list(verdict.reasons),
            reason_list=", ".join(verdict.reasons),
            instance=escape(request.instance),
            state=escape(request.protocol_state),
        )


_NORMAL: Final = Verdict(DUNNO, policy.PASS, NORMAL, 0, ())
