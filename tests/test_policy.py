"""
Scoring and the decision matrix (`policyd.policy`), from tables.

The policy is pure: a request, a stress level, what the tracker knows about
the client (`ClientStats`, with the time since its last refusal) and the
settings go in; a `Verdict` comes out.  No clock, no reactor, no I/O.
"""

from __future__ import annotations

import ast
import ipaddress
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import attrs
import pytest

from policyd import policy
from policyd.actions import DUNNO, MAX_ACTION_LENGTH, Action
from policyd.load import ELEVATED, NORMAL, OVERLOAD, ClientStats
from policyd.policy import (
    ALLOWED_DOMAIN,
    ALLOWED_NETWORK,
    AUTHENTICATED,
    BEHAVIOUR_SIGNALS,
    CONCURRENCY,
    DEFER,
    DNS_SIGNALS,
    DYNAMIC_NAME,
    EXEMPT,
    HELO_BARE_IP,
    HELO_FOREIGN_LITERAL,
    HELO_IMPERSONATES,
    HELO_NOT_FQDN,
    MESSAGE_RATE,
    NO_CLIENT_NAME,
    NO_HELO,
    NO_REVERSE_NAME,
    PASS,
    PROCESS_HOLDER,
    QUICK_RETRY,
    REJECT,
    SESSION_RATE,
    SIGNALS,
    SUSPICIOUS,
    PolicySettings,
    Verdict,
    bar,
    decide,
    exemption,
    holder_class,
    looks_dynamic,
    refusal,
    signals,
)
from policyd.policy import CLEAN as CLEAN_CLASS
from policyd.request import PolicyRequest

# A well-configured MTA at the RCPT stage: nothing about it is suspicious.
CLEAN: dict[str, str] = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "client_address": "192.0.2.10",
    "client_name": "mail.example.net",
    "reverse_client_name": "mail.example.net",
    "helo_name": "mail.example.net",
    "sender": "alice@example.net",
    "recipient": "bob@example.org",
    "instance": "1a2b.65f0c1d2.3e4f5.0",
    "sasl_username": "",
    "server_address": "198.51.100.1",
}

# No PTR at all and a bare-word HELO: scores 2 + 2 + 2 = 6 by default, only
# 2 of which do not depend on DNS.
UNKNOWN_BOT: dict[str, str] = {
    "client_address": "203.0.113.45",
    "client_name": "unknown",
    "reverse_client_name": "unknown",
    "helo_name": "user-pc",
}

# Claims to be localhost (5) while holding many smtpd processes (3): 8 points
# that no DNS failure can explain, so very suspicious.
HAMMERING_IMPOSTOR: dict[str, str] = {
    "client_address": "203.0.113.45",
    "client_name": "203-0-113-45.dyn.example.net",
    "reverse_client_name": "203-0-113-45.dyn.example.net",
    "helo_name": "localhost",
}


def req(**attributes: str) -> PolicyRequest:
    """`CLEAN` with *attributes* changed (``state`` for ``protocol_state``)."""
    merged = dict(CLEAN)
    if "state" in attributes:
        merged["protocol_state"] = attributes.pop("state")
    merged.update(attributes)
    return PolicyRequest.from_attributes(merged, 1)


def stats(
    concurrency: int = 1,
    session_rate: float = 0.0,
    message_rate: float = 1.0,
    since_refusal: float | None = None,
    held: float = 0.0,
) -> ClientStats:
    """What the tracker knows about a client; by default a quiet one."""
    refusals = 0.0 if since_refusal is None else 1.0
    return ClientStats(
        "192.0.2.10",
        concurrency,
        session_rate,
        message_rate,
        refusals,
        since_refusal,
        held,
    )


QUIET = stats()
HAMMERING = stats(concurrency=6)
DEFAULTS = PolicySettings()


def weighted(**weights: int) -> PolicySettings:
    """The default settings with some signal weights changed."""
    return attrs.evolve(DEFAULTS, weights={**DEFAULTS.weights, **weights})


def check_reply(action: Action) -> None:
    """A refusal Postfix reads as intended: code, DSN, text; printable; short."""
    text = action.text
    assert len(text) <= MAX_ACTION_LENGTH
    assert re.fullmatch(r"[\x20-\x7e]+", text), text
    match = re.match(r"([45])[0-9][0-9] ([45])\.[0-9]{1,3}\.[0-9]{1,3} \S", text)
    assert match is not None, text
    # Postfix forces the DSN class to the code's; make it agree to begin with.
    assert match.group(1) == match.group(2), text
    assert Action.parse(text) == action


# --------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------

# The default actions with {reasons} filled in.
E_DEFAULT = "450 4.7.1 Busy; try again later ({reasons})"
O_DEFAULT = "421 4.7.0 Overloaded; try again later ({reasons})"
O_REJECT_DEFAULT = "521 5.7.1 Refused: looks like a bot ({reasons})"

# level, client, stats, action template (None: DUNNO), outcome.
DEFAULT_MATRIX = [
    pytest.param(NORMAL, CLEAN, QUIET, None, PASS, id="normal-clean"),
    pytest.param(NORMAL, UNKNOWN_BOT, QUIET, None, PASS, id="normal-suspicious"),
    pytest.param(NORMAL, HAMMERING_IMPOSTOR, HAMMERING, None, PASS, id="normal-very"),
    pytest.param(ELEVATED, CLEAN, QUIET, None, PASS, id="elevated-clean"),
    pytest.param(
        ELEVATED, UNKNOWN_BOT, QUIET, E_DEFAULT, DEFER, id="elevated-suspicious"
    ),
    pytest.param(
        ELEVATED,
        HAMMERING_IMPOSTOR,
        HAMMERING,
        E_DEFAULT,  # elevated never refuses for good by default
        DEFER,
        id="elevated-very",
    ),
    pytest.param(OVERLOAD, CLEAN, QUIET, None, PASS, id="overload-clean"),
    pytest.param(
        OVERLOAD, UNKNOWN_BOT, QUIET, O_DEFAULT, DEFER, id="overload-suspicious"
    ),
    pytest.param(
        OVERLOAD,
        HAMMERING_IMPOSTOR,
        HAMMERING,
        O_REJECT_DEFAULT,
        REJECT,
        id="overload-very",
    ),
]

# Every cell with an action of its own, to show which variable each uses.
CELLS = PolicySettings(
    elevated_action="450 4.7.1 cell E ({reasons})",
    elevated_reject_action="554 5.7.1 cell ER ({reasons})",
    overload_action="421 4.7.0 cell O ({reasons})",
    overload_reject_action="521 5.7.1 cell OR ({reasons})",
)
CELL_MATRIX = [
    pytest.param(NORMAL, CLEAN, QUIET, "DUNNO", PASS, id="normal-clean"),
    pytest.param(NORMAL, UNKNOWN_BOT, QUIET, "DUNNO", PASS, id="normal-suspicious"),
    pytest.param(
        NORMAL, HAMMERING_IMPOSTOR, HAMMERING, "DUNNO", PASS, id="normal-very"
    ),
    pytest.param(ELEVATED, CLEAN, QUIET, "DUNNO", PASS, id="elevated-clean"),
    pytest.param(
        ELEVATED,
        UNKNOWN_BOT,
        QUIET,
        "450 4.7.1 cell E (no_client_name no_reverse_name helo_not_fqdn)",
        DEFER,
        id="elevated-suspicious: ELEVATED_ACTION",
    ),
    pytest.param(
        ELEVATED,
        HAMMERING_IMPOSTOR,
        HAMMERING,
        "554 5.7.1 cell ER (dynamic_name helo_impersonates concurrency)",
        REJECT,
        id="elevated-very: ELEVATED_REJECT_ACTION",
    ),
    pytest.param(OVERLOAD, CLEAN, QUIET, "DUNNO", PASS, id="overload-clean"),
    pytest.param(
        OVERLOAD,
        UNKNOWN_BOT,
        QUIET,
        "421 4.7.0 cell O (no_client_name no_reverse_name helo_not_fqdn)",
        DEFER,
        id="overload-suspicious: OVERLOAD_ACTION",
    ),
    pytest.param(
        OVERLOAD,
        HAMMERING_IMPOSTOR,
        HAMMERING,
        "521 5.7.1 cell OR (dynamic_name helo_impersonates concurrency)",
        REJECT,
        id="overload-very: OVERLOAD_REJECT_ACTION",
    ),
]


class TestMatrix:
    """Level x how suspicious the client is -> the action of that cell."""

    @pytest.mark.parametrize(
        ("level", "client", "known", "template", "outcome"), DEFAULT_MATRIX
    )
    def test_defaults(
        self,
        level: int,
        client: dict[str, str],
        known: ClientStats,
        template: str | None,
        outcome: str,
    ) -> None:
        """
        The default matrix: DUNNO at normal and for clean clients.

        450 at elevated; 421, or 521 for the very suspicious, at overload.
        """
        verdict = decide(req(**client), level, known, DEFAULTS)
        assert (verdict.outcome, verdict.level) == (outcome, level)
        if template is None:
            assert verdict.action == DUNNO
            assert not verdict.refused
        else:
            expected = template.replace("{reasons}", " ".join(verdict.reasons))
            assert verdict.action == Action.parse(expected)
            assert verdict.refused
            check_reply(verdict.action)

    @pytest.mark.parametrize(
        ("level", "client", "known", "action", "outcome"), CELL_MATRIX
    )
    def test_each_cell_its_own_action(
        self,
        level: int,
        client: dict[str, str],
        known: ClientStats,
        action: str,
        outcome: str,
    ) -> None:
        """Each refusing cell answers its own variable's action, reasons filled."""
        verdict = decide(req(**client), level, known, CELLS)
        assert verdict.action == Action.parse(action)
        assert verdict.outcome == outcome

    @pytest.mark.parametrize("level", [NORMAL, ELEVATED, OVERLOAD])
    def test_clean_client_never_refused(self, level: int) -> None:
        """A clean client gets DUNNO with score 0 and no reasons at every level."""
        for pressure in (0, 1, 5):
            verdict = decide(req(), level, QUIET, DEFAULTS, pressure)
            needed = bar(level, pressure, DEFAULTS) if level != NORMAL else 0
            assert verdict == Verdict(DUNNO, PASS, level, 0, (), bar=needed)

    def test_normal_is_not_scored(self) -> None:
        """At normal nobody is even scored: score 0 and no reasons."""
        verdict = decide(req(**HAMMERING_IMPOSTOR), NORMAL, HAMMERING, DEFAULTS)
        assert verdict == Verdict(DUNNO, PASS, NORMAL, 0, ())

    @pytest.mark.parametrize(
        ("helo", "score", "outcome"),
        [
            pytest.param("pc01", 2, PASS, id="2 below 3: pass"),
            pytest.param("192.0.2.10", 3, DEFER, id="3 at 3: suspicious"),
        ],
    )
    def test_suspicious_score_inclusive(
        self, helo: str, score: int, outcome: str
    ) -> None:
        """A score at POLICYD_SUSPICIOUS_SCORE is suspicious; below it passes."""
        verdict = decide(req(helo_name=helo), ELEVATED, QUIET, DEFAULTS)
        assert (verdict.score, verdict.outcome) == (score, outcome)

    @pytest.mark.parametrize(
        ("concurrency", "outcome"),
        [
            pytest.param(5, DEFER, id="firm 7 below 8: 421"),
            pytest.param(6, REJECT, id="firm 10 at or above 8: 521"),
        ],
    )
    def test_reject_score_inclusive(self, concurrency: int, outcome: str) -> None:
        """A firm score at POLICYD_REJECT_SCORE is very suspicious; below is not."""
        client = {
            **HAMMERING_IMPOSTOR,
            "client_name": "mx.example.net",
            "reverse_client_name": "mx.example.net",
        }
        settings = attrs.evolve(DEFAULTS, reject_score=8)
        verdict = decide(
            req(**client),
            OVERLOAD,
            stats(concurrency=concurrency, message_rate=31),
            settings,
        )
        # helo_impersonates 5 + message_rate 2 (+ concurrency 3)
        assert verdict.outcome == outcome

    def test_very_needs_suspicious(self) -> None:
        """
        A reject score below the suspicious score does not refuse on its own.

        The refusal cells are reached only by suspicious clients; "very" only
        picks which of the two refusals.
        """
        settings = attrs.evolve(
            weighted(helo_impersonates=8), suspicious_score=10, reject_score=1
        )
        verdict = decide(req(helo_name="pc01"), OVERLOAD, QUIET, settings)
        assert verdict.outcome == PASS
        verdict = decide(req(**HAMMERING_IMPOSTOR), OVERLOAD, HAMMERING, settings)
        assert verdict.outcome == REJECT

    def test_unknown_level(self) -> None:
        """A level the matrix does not have is a bug, not a silent DUNNO."""
        with pytest.raises(ValueError, match="unknown stress level 7"):
            decide(req(**UNKNOWN_BOT), 7, QUIET, DEFAULTS)

    @pytest.mark.parametrize(
        ("template", "action", "outcome"),
        [
            pytest.param("DUNNO", "DUNNO", PASS, id="DUNNO switches a cell off"),
            pytest.param(
                "WARN policyd: suspicious ({reasons})",
                "WARN policyd: suspicious (no_client_name no_reverse_name "
                "helo_not_fqdn)",
                PASS,
                id="WARN only logs",
            ),
            pytest.param("INFO x {reasons}", None, PASS, id="INFO only logs"),
            pytest.param("DEFER_IF_PERMIT busy", None, DEFER, id="DEFER_IF_PERMIT"),
            pytest.param("DEFER busy", None, DEFER, id="DEFER"),
            pytest.param("defer_if_reject busy", None, DEFER, id="lower case"),
            pytest.param("REJECT go away", None, REJECT, id="REJECT"),
            pytest.param("550 5.7.1 go away", None, REJECT, id="550"),
        ],
    )
    def test_outcome_follows_the_action(
        self, template: str, action: str | None, outcome: str
    ) -> None:
        """
        The outcome is what the cell's action does to the client.

        A cell set to DUNNO, WARN or INFO refuses nobody (pass); the DEFER
        family and 4xx codes defer; REJECT and 5xx codes reject.
        """
        settings = attrs.evolve(DEFAULTS, overload_action=template)
        verdict = decide(req(**UNKNOWN_BOT), OVERLOAD, QUIET, settings)
        assert verdict.outcome == outcome
        assert verdict.refused is (outcome != PASS)
        if action is not None:
            assert verdict.action == Action.parse(action)


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ("450 4.7.1 Busy", DEFER),
        ("421 4.7.0 Overloaded", DEFER),
        ("451 4.3.0 later", DEFER),
        ("521 5.7.1 Bot", REJECT),
        ("554 5.7.1 No", REJECT),
        ("REJECT", REJECT),
        ("reject no", REJECT),
        ("DEFER", DEFER),
        ("DEFER_IF_PERMIT x", DEFER),
        ("DEFER_IF_REJECT", DEFER),
        ("DUNNO", PASS),
        ("WARN x", PASS),
        ("INFO", PASS),
    ],
)
def test_outcome_of(text: str, outcome: str) -> None:
    """`outcome_of` classifies an action by what it does to the client."""
    assert policy.outcome_of(Action.parse(text)) == outcome


# --------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------

# Request attributes (over CLEAN), client stats, the signals expected in order.
SIGNAL_CASES = [
    pytest.param({}, QUIET, [], id="clean"),
    # -- names --
    pytest.param(
        {"client_name": "unknown"}, QUIET, [NO_CLIENT_NAME], id="no_client_name"
    ),
    pytest.param(
        {"client_name": "unknown", "reverse_client_name": "unknown"},
        QUIET,
        [NO_CLIENT_NAME, NO_REVERSE_NAME],
        id="no PTR: both name signals",
    ),
    pytest.param(
        {"reverse_client_name": "unknown"},
        QUIET,
        [NO_REVERSE_NAME],
        id="no_reverse_name alone",
    ),
    pytest.param(
        {"client_name": "", "reverse_client_name": ""},
        QUIET,
        [],
        id="names not sent: not unknown",
    ),
    pytest.param(
        {"client_name": "Unknown"},
        QUIET,
        [],
        id="only Postfix's exact 'unknown'",
    ),
    pytest.param(
        {
            "client_address": "198.51.100.23",
            "client_name": "unknown",
            "reverse_client_name": "198-51-100-23.dsl.example.net",
        },
        QUIET,
        [NO_CLIENT_NAME, DYNAMIC_NAME],
        id="forged dynamic PTR",
    ),
    pytest.param(
        {
            "client_address": "198.51.100.23",
            "client_name": "198-51-100-23.dsl.example.net",
            "reverse_client_name": "198-51-100-23.dsl.example.net",
        },
        QUIET,
        [DYNAMIC_NAME],
        id="verified but dynamic",
    ),
    # -- HELO (each HELO trait on its own in TestHelo) --
    pytest.param({"helo_name": ""}, QUIET, [NO_HELO], id="no_helo"),
    pytest.param({"helo_name": "pc01"}, QUIET, [HELO_NOT_FQDN], id="helo_not_fqdn"),
    pytest.param({"helo_name": "192.0.2.10"}, QUIET, [HELO_BARE_IP], id="helo_bare_ip"),
    pytest.param(
        {"helo_name": "[10.0.0.5]"},
        QUIET,
        [HELO_FOREIGN_LITERAL],
        id="helo_foreign_literal",
    ),
    pytest.param(
        {"helo_name": "localhost"},
        QUIET,
        [HELO_IMPERSONATES],
        id="helo_impersonates",
    ),
    # -- behaviour --
    pytest.param({}, stats(concurrency=5), [], id="concurrency at the limit"),
    pytest.param({}, stats(concurrency=6), [CONCURRENCY], id="concurrency above"),
    pytest.param({}, stats(message_rate=30.0), [], id="message rate at the limit"),
    pytest.param(
        {}, stats(message_rate=30.01), [MESSAGE_RATE], id="message rate above"
    ),
    pytest.param({}, stats(session_rate=30.0), [], id="session rate at the limit"),
    pytest.param({}, stats(session_rate=31.0), [SESSION_RATE], id="session rate above"),
    pytest.param({}, stats(since_refusal=None), [], id="never refused"),
    pytest.param(
        {}, stats(since_refusal=0.0), [QUICK_RETRY], id="back at once: quick retry"
    ),
    pytest.param(
        {}, stats(since_refusal=29.9), [QUICK_RETRY], id="back within the window"
    ),
    pytest.param({}, stats(since_refusal=30.0), [], id="back at the window's end"),
    pytest.param({}, stats(since_refusal=300.0), [], id="back after MTA backoff"),
    pytest.param({}, stats(held=20.0), [], id="held without progress, at the limit"),
    pytest.param(
        {}, stats(held=20.5), [PROCESS_HOLDER], id="held without progress, above"
    ),
    # -- everything at once, in a stable order --
    pytest.param(
        {
            "client_address": "203.0.113.45",
            "client_name": "unknown",
            "reverse_client_name": "203-0-113-45.pool.example.net",
            "helo_name": "[192.0.2.1]",
        },
        stats(concurrency=9, session_rate=99, message_rate=99, since_refusal=1),
        [
            NO_CLIENT_NAME,
            DYNAMIC_NAME,
            HELO_FOREIGN_LITERAL,
            CONCURRENCY,
            MESSAGE_RATE,
            SESSION_RATE,
            QUICK_RETRY,
        ],
        id="all at once",
    ),
]


class TestSignals:
    """`signals` lists the suspicious traits a request shows."""

    @pytest.mark.parametrize(("attributes", "known", "expected"), SIGNAL_CASES)
    def test_signal(
        self, attributes: dict[str, str], known: ClientStats, expected: list[str]
    ) -> None:
        """Each trait, present and absent, gives exactly its signal."""
        found = signals(req(**attributes), known, known.since_refusal, DEFAULTS)
        assert found == expected

    def test_every_signal_tested(self) -> None:
        """The table above shows every signal policyd knows at least once."""
        shown = {s for case in SIGNAL_CASES for s in cast(list[str], case.values[2])}
        assert shown == set(SIGNALS)

    def test_signals_are_stable_names(self) -> None:
        """Signal names are unique, lower-case metric label values."""
        assert len(set(SIGNALS)) == len(SIGNALS)
        for name in SIGNALS:
            assert re.fullmatch(r"[a-z_]+", name)
        assert set(policy.EXEMPTIONS).isdisjoint(SIGNALS)
        assert {"normal", "none"}.isdisjoint(SIGNALS)

    @pytest.mark.parametrize(
        ("setting", "value", "known", "expected"),
        [
            ("client_concurrency_limit", 1, stats(concurrency=2), [CONCURRENCY]),
            ("client_concurrency_limit", 10, stats(concurrency=10), []),
            ("client_message_rate_limit", 0.0, stats(message_rate=0.5), [MESSAGE_RATE]),
            ("client_message_rate_limit", 100.0, stats(message_rate=99), []),
            ("client_session_rate_limit", 5.0, stats(session_rate=6), [SESSION_RATE]),
            ("client_session_rate_limit", 100.0, stats(session_rate=99), []),
            ("quick_retry_window", 600.0, stats(since_refusal=300), [QUICK_RETRY]),
            ("quick_retry_window", 0.0, stats(since_refusal=0.0), []),
        ],
    )
    def test_limits_tunable(
        self, setting: str, value: Any, known: ClientStats, expected: list[str]
    ) -> None:
        """The behaviour limits are the settings' (a 0 s retry window: off)."""
        settings = attrs.evolve(DEFAULTS, **{setting: value})
        assert signals(req(), known, known.since_refusal, settings) == expected

    def test_since_refusal_is_an_argument(self) -> None:
        """`signals` takes the time since the last refusal as an argument."""
        assert signals(req(), QUIET, 1.0, DEFAULTS) == [QUICK_RETRY]
        assert signals(req(), stats(since_refusal=1.0), None, DEFAULTS) == []


# --------------------------------------------------------------------------
# Stage awareness
# --------------------------------------------------------------------------

BAD_HELO = {"helo_name": "localhost"}


class TestStages:
    """Each stage is judged on what it offers."""

    @pytest.mark.parametrize("state", ["CONNECT", "XCLIENT", "connect", "Xclient"])
    @pytest.mark.parametrize("helo", ["", "localhost", "pc01", "[10.0.0.1]"])
    def test_connect_does_not_judge_helo(self, state: str, helo: str) -> None:
        """
        At CONNECT (or XCLIENT) no HELO has been sent yet: no HELO signal.

        Postfix sends an empty helo_name there; XCLIENT may present one, but
        the stage is still the connection's, and is judged the same.
        """
        request = req(state=state, helo_name=helo, instance="")
        assert signals(request, QUIET, None, DEFAULTS) == []

    @pytest.mark.parametrize("state", ["CONNECT", "XCLIENT"])
    def test_connect_judges_names_and_behaviour(self, state: str) -> None:
        """At CONNECT the names, their look and the client's behaviour count."""
        request = req(state=state, instance="", **{**UNKNOWN_BOT, "helo_name": ""})
        known = stats(concurrency=6, session_rate=40, since_refusal=3)
        assert signals(request, known, 3, DEFAULTS) == [
            NO_CLIENT_NAME,
            NO_REVERSE_NAME,
            CONCURRENCY,
            SESSION_RATE,
            QUICK_RETRY,
        ]

    @pytest.mark.parametrize(
        "state",
        ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN"],
    )
    def test_later_stages_judge_helo(self, state: str) -> None:
        """From HELO/EHLO on, the HELO name is judged."""
        assert signals(req(state=state, **BAD_HELO), QUIET, None, DEFAULTS) == [
            HELO_IMPERSONATES
        ]

    @pytest.mark.parametrize("state", ["MAIL", "RCPT", "DATA", "END-OF-MESSAGE"])
    def test_no_helo_after_connect(self, state: str) -> None:
        """A client that skipped HELO/EHLO scores no_helo at later stages."""
        request = req(state=state, helo_name="")
        assert signals(request, QUIET, None, DEFAULTS) == [NO_HELO]

    @pytest.mark.parametrize(
        ("state", "outcome"),
        [("CONNECT", DEFER), ("XCLIENT", DEFER), ("RCPT", REJECT)],
    )
    def test_verdict_by_stage(self, state: str, outcome: str) -> None:
        """
        A client is judged on what its stage shows.

        The same client is very suspicious at RCPT, where its HELO is known,
        but only suspicious at CONNECT, where it is not.
        """
        verdict = decide(
            req(state=state, **HAMMERING_IMPOSTOR), OVERLOAD, HAMMERING, DEFAULTS
        )
        assert verdict.outcome == outcome


# --------------------------------------------------------------------------
# Dynamic-looking reverse names
# --------------------------------------------------------------------------

# (reverse name, client address): look dynamic.
DYNAMIC = [
    # The client's address, written into the name.
    ("c-73-15-22-101.hsd1.ca.comcast.net", "73.15.22.101"),
    ("pool-71-174-12-34.bstnma.fios.verizon.net", "71.174.12.34"),
    ("cpe-72-182-10-20.tx.res.rr.com", "72.182.10.20"),
    ("syn-074-130-077-123.res.spectrum.com", "74.130.77.123"),
    ("ip68-100-200-1.ok.ok.cox.net", "68.100.200.1"),
    ("ec2-54-240-8-1.compute-1.amazonaws.com", "54.240.8.1"),
    ("dslb-178-004-123-045.178.004.pools.vodafone-ip.de", "178.4.123.45"),
    ("host-203.0.113.45.example.net", "203.0.113.45"),
    ("203_0_113_45.example.net", "203.0.113.45"),
    ("HOST-203-0-113-45.EXAMPLE.NET.", "203.0.113.45"),
    # ... in reverse order.
    ("45.113.0.203.bc.googleusercontent.com", "203.0.113.45"),
    ("static.45.113.0.203.clients.your-server.de", "203.0.113.45"),
    ("45-113-0-203.example.net", "203.0.113.45"),
    # ... in hex.
    ("p5B0D1234.example.de", "91.13.18.52"),
    ("host-cb00712d.example.net", "203.0.113.45"),
    ("xd9ba1b2c.example.de", "217.186.27.44"),
    # ISP tokens left of the registered domain.
    ("host.dyn.example.net", "192.0.2.1"),
    ("dynamic-7.example.net", "192.0.2.1"),
    ("dynip-5.example.org", "192.0.2.1"),
    ("adsl-17.example.com", "192.0.2.1"),
    ("line.xdsl.example.com", "192.0.2.1"),
    ("vdsl2-19.example.com", "192.0.2.1"),
    ("a17.dsl.example.com", "192.0.2.1"),
    ("cable-modem-7.example.com", "192.0.2.1"),
    ("dhcp-12.campus.example.edu", "192.0.2.1"),
    ("dialup-34.example.net", "192.0.2.1"),
    ("dialin-34.example.net", "192.0.2.1"),
    ("dial17.example.net", "192.0.2.1"),
    ("ppp123.example.net", "192.0.2.1"),
    ("pppoe-user-1.example.net", "192.0.2.1"),
    ("broadband-44.example.co.uk", "192.0.2.1"),
    ("cust-1234.example.net", "192.0.2.1"),
    ("customer-12.example.net", "192.0.2.1"),
    ("abc.res.rr.com", "192.0.2.1"),
    ("resident-7.isp.example.com", "192.0.2.1"),
    ("catv-1-2.example.hu", "192.0.2.1"),
    ("ftth-42.example.fr", "192.0.2.1"),
    ("cpe00112233.example.net", "192.0.2.1"),
    ("unassigned.example.net", "192.0.2.1"),
    ("x.pool.example.com", "2001:db8::1"),  # tokens work for IPv6 clients too
]

# (reverse name, client address): do not look dynamic.
NOT_DYNAMIC = [
    ("mail.example.com", "192.0.2.1"),
    ("mx1.google.com", "192.0.2.1"),
    ("host.example.org", "192.0.2.1"),
    ("mail-pl1-f182.google.com", "209.85.214.182"),
    ("a48-93.smtp-out.amazonses.com", "54.240.48.93"),
    ("mail-dm6nam12on2071.outbound.protection.outlook.com", "40.107.92.71"),
    ("sonic301-21.consmr.mail.ne1.yahoo.com", "74.6.128.21"),
    ("mail180-17.suw21.mcdlv.net", "198.2.180.17"),
    ("o1.sendgrid.net", "167.89.0.1"),
    ("mta-10-20-30-40.example.net", "192.0.2.1"),  # someone else's address
    ("host-11-2-3-45.example.net", "1.2.3.4"),  # whole numbers only
    ("host-1-2-3-45.example.net", "1.2.3.4"),
    # Microsoft names its outbound servers with the zero-padded address.
    ("mail-oln040092066050.outbound.protection.outlook.com", "40.92.66.50"),
    ("host-cb00712e.example.net", "203.0.113.45"),
    ("203-0-113-45.example.net", "2001:db8::1"),  # IPv6 client
    # Tokens inside words, or in the registered domain (who the ISP is).
    ("smtp.pool-party.example", "192.0.2.1"),
    ("mail.dyn.com", "192.0.2.1"),
    ("mx.dslextreme.com", "192.0.2.1"),
    ("mx.cablelabs.com", "192.0.2.1"),
    ("smtp.resend.com", "192.0.2.1"),
    ("poolside-mail.example.com", "192.0.2.1"),
    ("dialog-mta.example.com", "192.0.2.1"),
    ("customerio-mta1.example.com", "192.0.2.1"),
    ("resolver1.example.com", "192.0.2.1"),
    ("dynamo.example.com", "192.0.2.1"),
    ("dsl.example", "192.0.2.1"),
    ("unknown", "192.0.2.1"),
    ("", "192.0.2.1"),
]


class TestLooksDynamic:
    """`looks_dynamic` recognises ISPs' names for end-user addresses."""

    @pytest.mark.parametrize(
        ("name", "address"), [pytest.param(*case, id=case[0]) for case in DYNAMIC]
    )
    def test_dynamic(self, name: str, address: str) -> None:
        """The name carries the client's address, or an ISP access token."""
        assert looks_dynamic(name, address)

    @pytest.mark.parametrize(
        ("name", "address"),
        [pytest.param(*case, id=case[0] or "empty") for case in NOT_DYNAMIC],
    )
    def test_not_dynamic(self, name: str, address: str) -> None:
        """Mail servers' names, lookalike words and other addresses do not."""
        assert not looks_dynamic(name, address)

    def test_hex_is_the_whole_address(self) -> None:
        """Only all eight hex digits of the client's address count."""
        assert looks_dynamic("x-c0000201.example.net", "192.0.2.1")
        assert not looks_dynamic("x-c00002.example.net", "192.0.2.1")

    def test_huge_digit_runs(self) -> None:
        """A name of thousands of digits is judged without error, quickly."""
        name = "1" * 5000 + ".example.net"
        assert not looks_dynamic(name, "1.1.1.1")

    def test_dynamic_signal_needs_a_ptr(self) -> None:
        """With no PTR (unknown) the dynamic look is not judged: no_reverse_name."""
        found = signals(req(reverse_client_name="unknown"), QUIET, None, DEFAULTS)
        assert DYNAMIC_NAME not in found


# --------------------------------------------------------------------------
# HELO
# --------------------------------------------------------------------------

MY_HOSTNAMES = attrs.evolve(
    DEFAULTS, my_hostnames=("mx.example.org", "mail.example.org")
)

# HELO name, client address, the signals expected.
HELO_CASES = [
    # Good names.
    ("mail.example.net", "192.0.2.10", []),
    ("MAIL.Example.NET.", "192.0.2.10", []),
    ("mail_01.example.net", "192.0.2.10", []),  # Postfix allows '_'
    ("a.b", "192.0.2.10", []),
    ("xn--bcher-kva.example", "192.0.2.10", []),
    ("x" * 63 + ".example.net", "192.0.2.10", []),
    ("mx.example.org.evil.net", "192.0.2.10", []),
    ("localhostmail.example.com", "192.0.2.10", []),
    # No HELO at all.
    ("", "192.0.2.10", [NO_HELO]),
    # Not a fully qualified domain name.
    ("pc01", "192.0.2.10", [HELO_NOT_FQDN]),
    ("WIN-ABC123", "192.0.2.10", [HELO_NOT_FQDN]),
    ("ylmf-pc", "192.0.2.10", [HELO_NOT_FQDN]),
    ("mail..example.net", "192.0.2.10", [HELO_NOT_FQDN]),
    (".example.net", "192.0.2.10", [HELO_NOT_FQDN]),
    ("-mail.example.net", "192.0.2.10", [HELO_NOT_FQDN]),
    ("mail-.example.net", "192.0.2.10", [HELO_NOT_FQDN]),
    ("mail.example.123", "192.0.2.10", [HELO_NOT_FQDN]),
    ("1.2.3.4.5", "192.0.2.10", [HELO_NOT_FQDN]),
    ("192.0.2.010", "192.0.2.10", [HELO_NOT_FQDN]),
    ("mail example.net", "192.0.2.10", [HELO_NOT_FQDN]),
    ("mail.example.net:25", "192.0.2.10", [HELO_NOT_FQDN]),
    ("mail@example.net", "192.0.2.10", [HELO_NOT_FQDN]),
    ("bücher.example", "192.0.2.10", [HELO_NOT_FQDN]),
    ("x" * 64 + ".example.net", "192.0.2.10", [HELO_NOT_FQDN]),
    (".".join(["abcdefghi"] * 26), "192.0.2.10", [HELO_NOT_FQDN]),  # 259 chars
    ("[mail.example.net]", "192.0.2.10", [HELO_NOT_FQDN]),
    # A bare IP address, even the client's own: RFC 5321 wants [brackets].
    ("192.0.2.10", "192.0.2.10", [HELO_BARE_IP]),
    ("203.0.113.9", "192.0.2.10", [HELO_BARE_IP]),
    ("2001:db8::1", "2001:db8::1", [HELO_BARE_IP]),
    # Address literals: the client's own is fine.
    ("[192.0.2.10]", "192.0.2.10", []),
    ("[IPv6:2001:db8::1]", "2001:db8::1", []),
    ("[ipv6:2001:0DB8:0:0:0:0:0:1]", "2001:db8::1", []),
    ("[2001:db8::1]", "2001:db8::1", []),
    ("[IPv6:::ffff:192.0.2.10]", "192.0.2.10", []),
    # ... anyone else's is not.
    ("[192.0.2.99]", "192.0.2.10", [HELO_FOREIGN_LITERAL]),
    ("[10.0.0.5]", "192.0.2.10", [HELO_FOREIGN_LITERAL]),
    ("[127.0.0.1]", "192.0.2.10", [HELO_FOREIGN_LITERAL]),
    ("[IPv6:2001:db8::2]", "2001:db8::1", [HELO_FOREIGN_LITERAL]),
    ("[192.0.2.10]", "2001:db8::1", [HELO_FOREIGN_LITERAL]),
    ("[IPv6:2001:db8::1]", "192.0.2.10", [HELO_FOREIGN_LITERAL]),
    ("[999.0.0.1]", "192.0.2.10", [HELO_FOREIGN_LITERAL]),
    ("[192.0.2.10]", "unknown", [HELO_FOREIGN_LITERAL]),
    # Claiming to be localhost, or this server.
    ("localhost", "192.0.2.10", [HELO_IMPERSONATES]),
    ("LOCALHOST.", "192.0.2.10", [HELO_IMPERSONATES]),
    ("localhost.localdomain", "192.0.2.10", [HELO_IMPERSONATES]),
    ("localhost.example.net", "192.0.2.10", [HELO_IMPERSONATES]),
    ("localhost6.localdomain6", "192.0.2.10", [HELO_IMPERSONATES]),
    ("ip6-localhost", "2001:db8::1", [HELO_IMPERSONATES]),
    ("mx.example.org", "192.0.2.10", [HELO_IMPERSONATES]),
    ("Mail.Example.Org.", "192.0.2.10", [HELO_IMPERSONATES]),
    # ... which is true of this host itself (loopback, or our own address).
    ("localhost", "127.0.0.1", []),
    ("localhost.localdomain", "127.0.0.5", []),
    ("localhost", "::1", []),
    ("mx.example.org", "127.0.0.1", []),
    ("mx.example.org", "198.51.100.1", []),  # CLEAN's server_address
]


class TestHelo:
    """The HELO signals: missing, malformed, a bare IP, a foreign literal, a lie."""

    @pytest.mark.parametrize(
        ("helo", "address", "expected"),
        [pytest.param(*case, id=f"{case[0][:40]}@{case[1]}") for case in HELO_CASES],
    )
    def test_helo(self, helo: str, address: str, expected: list[str]) -> None:
        """Each HELO gives exactly its signal (my_hostnames: mx/mail.example.org)."""
        request = req(helo_name=helo, client_address=address)
        assert signals(request, QUIET, None, MY_HOSTNAMES) == expected

    def test_my_hostnames_only_when_configured(self) -> None:
        """Without POLICYD_MY_HOSTNAMES, a HELO of our name is an ordinary FQDN."""
        assert signals(req(helo_name="mx.example.org"), QUIET, None, DEFAULTS) == []

    def test_own_address_without_server_address(self) -> None:
        """Without Postfix's server_address (before 3.2) only loopback is us."""
        request = PolicyRequest.from_attributes(
            {**CLEAN, "helo_name": "mx.example.org", "server_address": ""}
        )
        assert signals(request, QUIET, None, MY_HOSTNAMES) == [HELO_IMPERSONATES]


# --------------------------------------------------------------------------
# Exemptions
# --------------------------------------------------------------------------

ALLOWING = attrs.evolve(
    DEFAULTS,
    allow_networks=(
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("198.51.100.7/32"),
        ipaddress.ip_network("2001:db8:1::/48"),
    ),
    allow_domains=("example.com", "partner.example.org"),
)

# Request attributes over a bot's, the exemption expected.
EXEMPTION_CASES = [
    pytest.param({"sasl_username": "alice"}, AUTHENTICATED, id="sasl"),
    pytest.param(
        {"sasl_username": "alice", "client_address": "192.0.2.1"},
        AUTHENTICATED,
        id="sasl first",
    ),
    pytest.param({"client_address": "192.0.2.1"}, ALLOWED_NETWORK, id="v4 in /24"),
    pytest.param({"client_address": "192.0.2.255"}, ALLOWED_NETWORK, id="v4 edge"),
    pytest.param({"client_address": "192.0.3.0"}, None, id="v4 just outside"),
    pytest.param({"client_address": "198.51.100.7"}, ALLOWED_NETWORK, id="v4 /32"),
    pytest.param({"client_address": "198.51.100.8"}, None, id="v4 next to /32"),
    pytest.param(
        {"client_address": "2001:db8:1:ffff::25"}, ALLOWED_NETWORK, id="v6 in /48"
    ),
    pytest.param({"client_address": "2001:db8:2::25"}, None, id="v6 outside"),
    pytest.param({"client_address": "unknown"}, None, id="no address"),
    pytest.param({"client_name": "example.com"}, ALLOWED_DOMAIN, id="domain"),
    pytest.param({"client_name": "mx1.example.com"}, ALLOWED_DOMAIN, id="subdomain"),
    pytest.param({"client_name": "MX1.Example.COM."}, ALLOWED_DOMAIN, id="case, dot"),
    pytest.param(
        {"client_name": "a.b.partner.example.org"},
        ALLOWED_DOMAIN,
        id="deep subdomain",
    ),
    pytest.param({"client_name": "evilexample.com"}, None, id="lookalike"),
    pytest.param({"client_name": "example.com.evil.net"}, None, id="prefix"),
    pytest.param({"client_name": "example.org"}, None, id="parent of allowed"),
    pytest.param({"client_name": "other.example.org"}, None, id="sibling of allowed"),
    pytest.param(
        {"client_name": "unknown", "reverse_client_name": "mx.example.com"},
        None,
        id="unverified PTR does not count",
    ),
    pytest.param(
        {"client_name": "", "reverse_client_name": "mx.example.com"},
        None,
        id="no client_name",
    ),
    pytest.param({}, None, id="bot"),
]


class TestExemptions:
    """Authenticated and allow-listed clients are never refused."""

    @pytest.mark.parametrize(("attributes", "expected"), EXEMPTION_CASES)
    def test_exemption(self, attributes: dict[str, str], expected: str | None) -> None:
        """Which exemption, if any, a client has."""
        request = req(**{**HAMMERING_IMPOSTOR, **attributes})
        assert exemption(request, ALLOWING) == expected

    @pytest.mark.parametrize(
        ("attributes", "expected"),
        [case for case in EXEMPTION_CASES if case.values[1] is not None],
    )
    @pytest.mark.parametrize("level", [ELEVATED, OVERLOAD])
    def test_exempt_client_not_refused(
        self, attributes: dict[str, str], expected: str, level: int
    ) -> None:
        """An exempt client gets DUNNO however bad it looks, with its reason."""
        request = req(**{**HAMMERING_IMPOSTOR, **attributes})
        verdict = decide(request, level, stats(concurrency=50), ALLOWING)
        assert verdict == Verdict(DUNNO, EXEMPT, level, 0, (), expected)
        assert not verdict.refused

    def test_nothing_allowed_by_default(self) -> None:
        """By default only authentication exempts."""
        assert exemption(req(client_address="127.0.0.1"), DEFAULTS) is None
        assert exemption(req(client_name="localhost"), DEFAULTS) is None
        assert exemption(req(sasl_username="bob"), DEFAULTS) == AUTHENTICATED

    def test_exemptions_are_stable_names(self) -> None:
        """Exemption names are the bounded metric labels policyd documents."""
        assert policy.EXEMPTIONS == (AUTHENTICATED, ALLOWED_NETWORK, ALLOWED_DOMAIN)


# --------------------------------------------------------------------------
# A temporary DNS failure never earns a permanent refusal
# --------------------------------------------------------------------------

# Request attributes, stats, settings, the outcome at overload.
DNS_CASES = [
    pytest.param(
        UNKNOWN_BOT, QUIET, DEFAULTS, DEFER, id="unknown names, bare-word HELO: 421"
    ),
    pytest.param(
        {**UNKNOWN_BOT, "helo_name": "localhost"},
        QUIET,
        DEFAULTS,
        DEFER,
        id="unknown names, localhost HELO (score 9): 421",
    ),
    pytest.param(
        {**UNKNOWN_BOT, "helo_name": "[10.1.1.1]"},
        QUIET,
        weighted(no_client_name=100, no_reverse_name=100),
        DEFER,
        id="DNS weights 100: still 421",
    ),
    pytest.param(
        UNKNOWN_BOT,
        QUIET,
        weighted(no_client_name=100, no_reverse_name=100, helo_not_fqdn=7),
        DEFER,
        id="firm 7 below 8: 421",
    ),
    pytest.param(
        UNKNOWN_BOT,
        QUIET,
        weighted(helo_not_fqdn=8),
        REJECT,
        id="firm signals reach 8: 521",
    ),
    pytest.param(
        {**UNKNOWN_BOT, "helo_name": "localhost"},
        HAMMERING,
        DEFAULTS,
        REJECT,
        id="localhost HELO + hammering, no rDNS: 521 (firm 8)",
    ),
    pytest.param(
        UNKNOWN_BOT,
        QUIET,
        attrs.evolve(DEFAULTS, reject_score=2, suspicious_score=2),
        REJECT,
        id="reject and suspicious scores lowered to the firm part: 521",
    ),
    pytest.param(
        UNKNOWN_BOT,
        stats(concurrency=9, session_rate=99, message_rate=99, since_refusal=1),
        DEFAULTS,
        DEFER,
        id="no rDNS, one weak HELO sign, all behaviour: 421 (identity 2 < 3)",
    ),
    pytest.param(
        UNKNOWN_BOT,
        QUIET,
        attrs.evolve(
            DEFAULTS, reject_score=1, weights={**DEFAULTS.weights, "helo_not_fqdn": 0}
        ),
        DEFER,
        id="only DNS signals left, reject score 1: 421",
    ),
]


class TestDnsNeverRejects:
    """`unknown` names may be a temporary DNS failure: never 5xx on their own."""

    @pytest.mark.parametrize(("attributes", "known", "settings", "outcome"), DNS_CASES)
    def test_at_overload(
        self,
        attributes: dict[str, str],
        known: ClientStats,
        settings: PolicySettings,
        outcome: str,
    ) -> None:
        """Only the signals that DNS cannot explain count towards a rejection."""
        verdict = decide(req(**attributes), OVERLOAD, known, settings)
        assert verdict.outcome == outcome
        expected = "521" if outcome == REJECT else "421"
        assert verdict.action.label == expected

    def test_dns_signals(self) -> None:
        """Exactly the two reverse-DNS signals are set aside."""
        assert {NO_CLIENT_NAME, NO_REVERSE_NAME} == DNS_SIGNALS

    @pytest.mark.parametrize("weight", [2, 10, 100])
    def test_any_weight(self, weight: int) -> None:
        """However heavy the DNS signals, a client with only those is deferred."""
        settings = weighted(no_client_name=weight, no_reverse_name=weight)
        request = req(state="CONNECT", instance="", **{**UNKNOWN_BOT, "helo_name": ""})
        verdict = decide(request, OVERLOAD, QUIET, settings)
        assert verdict.outcome == DEFER
        assert verdict.score == 2 * weight


class TestBehaviourNeedsIdentity:
    """Volume alone never refuses: a clean identity sending a lot passes."""

    #: Everything a busy, clean sender can trip: 6 connections, 400 messages
    #: and 400 sessions a minute, back 2 s after a refusal.
    BUSY = stats(concurrency=6, session_rate=400, message_rate=400, since_refusal=2)

    @pytest.mark.parametrize("level", [ELEVATED, OVERLOAD])
    @pytest.mark.parametrize("state", ["CONNECT", "RCPT"])
    def test_clean_busy_sender_passes(self, level: int, state: str) -> None:
        """Every behaviour signal fires, the score is far above 3, yet DUNNO."""
        verdict = decide(req(state=state), level, self.BUSY, DEFAULTS)
        assert set(verdict.reasons) == BEHAVIOUR_SIGNALS
        assert verdict.score >= DEFAULTS.reject_score
        assert (verdict.outcome, verdict.action) == (PASS, DUNNO)

    def test_behaviour_adds_to_identity(self) -> None:
        """
        With a strong identity signal, behaviour counts in full (here: to 521).

        helo_bare_ip (3) is suspicious on its own, DNS aside; with the
        behaviour signals the firm score reaches 8.
        """
        verdict = decide(req(helo_name="192.0.2.99"), OVERLOAD, self.BUSY, DEFAULTS)
        assert verdict.outcome == REJECT
        assert HELO_BARE_IP in verdict.reasons

    @pytest.mark.parametrize(
        "attributes",
        [
            pytest.param({"helo_name": "mail"}, id="bare-word HELO (Exchange)"),
            pytest.param(
                {"reverse_client_name": "dsl-1.example.net"}, id="dynamic-looking PTR"
            ),
            pytest.param(
                {"client_name": "unknown", "reverse_client_name": "unknown"},
                id="no PTR",
            ),
        ],
    )
    def test_weak_identity_and_behaviour_never_reject(
        self, attributes: dict[str, str]
    ) -> None:
        """
        One weak sign plus every behaviour signal: deferred, never 521.

        A legitimate server with a weak identity that flushes its queue after
        a deferral comes back fast over many connections: behaviour then
        adds far past the reject score, but its identity alone (DNS aside) is
        below the suspicious score, so it is only ever deferred.
        """
        verdict = decide(req(**attributes), OVERLOAD, self.BUSY, DEFAULTS)
        assert verdict.score >= DEFAULTS.reject_score
        assert verdict.outcome == DEFER

    def test_identity_weighted_zero_is_no_identity(self) -> None:
        """An identity signal switched off (weight 0) does not let behaviour in."""
        settings = weighted(helo_not_fqdn=0)
        verdict = decide(req(helo_name="mail"), OVERLOAD, self.BUSY, settings)
        assert verdict.outcome == PASS

    def test_behaviour_signals(self) -> None:
        """The four behaviour signals; every other signal is about identity."""
        assert {CONCURRENCY, MESSAGE_RATE, SESSION_RATE, QUICK_RETRY} == (
            BEHAVIOUR_SIGNALS
        )


# --------------------------------------------------------------------------
# Weights, reasons and reply texts
# --------------------------------------------------------------------------


class TestWeights:
    """Weights tune each signal; 0 switches one off, negative counts for it."""

    @pytest.mark.parametrize(
        ("weights", "score", "reasons", "outcome"),
        [
            pytest.param({}, 4, (NO_CLIENT_NAME, HELO_NOT_FQDN), DEFER, id="defaults"),
            pytest.param(
                {"no_client_name": 0},
                2,
                (HELO_NOT_FQDN,),
                PASS,
                id="a 0 weight: off, and no reason",
            ),
            pytest.param(
                {"no_client_name": 0, "helo_not_fqdn": 3},
                3,
                (HELO_NOT_FQDN,),
                DEFER,
                id="refused without the 0-weight signal in its reasons",
            ),
            pytest.param(
                {"helo_not_fqdn": -2},
                0,
                (NO_CLIENT_NAME,),
                PASS,
                id="a negative weight offsets another",
            ),
            pytest.param(
                {"helo_not_fqdn": -1, "no_client_name": 5},
                4,
                (NO_CLIENT_NAME,),
                DEFER,
                id="negative signal is no reason for refusal",
            ),
            pytest.param(
                dict.fromkeys(SIGNALS, 0), 0, (), PASS, id="all off: nobody refused"
            ),
            pytest.param(dict.fromkeys(SIGNALS, -100), -200, (), PASS, id="all -100"),
        ],
    )
    def test_weights(
        self,
        weights: dict[str, int],
        score: int,
        reasons: tuple[str, ...],
        outcome: str,
    ) -> None:
        """The score sums the weights; reasons are the signals that added to it."""
        request = req(client_name="unknown", helo_name="pc01")
        verdict = decide(request, ELEVATED, QUIET, weighted(**weights))
        assert (verdict.score, verdict.reasons, verdict.outcome) == (
            score,
            reasons,
            outcome,
        )

    def test_negative_firm_weight_lowers_very(self) -> None:
        """A negative non-DNS weight also lowers the score for rejection."""
        settings = weighted(dynamic_name=-2)
        verdict = decide(req(**HAMMERING_IMPOSTOR), OVERLOAD, HAMMERING, settings)
        assert verdict.score == 6
        assert verdict.outcome == DEFER  # firm 6 < 8: 421, not 521

    @pytest.mark.parametrize("signal", SIGNALS)
    def test_each_weight_is_its_signals(self, signal: str) -> None:
        """Every signal is scored with its own weight from the settings."""
        assert set(DEFAULTS.weights) == set(SIGNALS)
        settings = weighted(**{signal: 37})
        found = {
            NO_CLIENT_NAME: {"client_name": "unknown"},
            NO_REVERSE_NAME: {"reverse_client_name": "unknown"},
            DYNAMIC_NAME: {"reverse_client_name": "dsl-1.example.net"},
            NO_HELO: {"helo_name": ""},
            HELO_NOT_FQDN: {"helo_name": "pc"},
            HELO_BARE_IP: {"helo_name": "192.0.2.10"},
            HELO_FOREIGN_LITERAL: {"helo_name": "[192.0.2.11]"},
            HELO_IMPERSONATES: {"helo_name": "localhost"},
        }.get(signal, {})
        known = {
            CONCURRENCY: stats(concurrency=99),
            MESSAGE_RATE: stats(message_rate=99),
            SESSION_RATE: stats(session_rate=99),
            QUICK_RETRY: stats(since_refusal=1),
            PROCESS_HOLDER: stats(held=99),
        }.get(signal, QUIET)
        verdict = decide(req(**found), ELEVATED, known, settings)
        assert (verdict.score, verdict.reasons) == (37, (signal,))


class TestReplies:
    """What the client reads: code, DSN and a short reason; printable."""

    @pytest.mark.parametrize(
        ("template", "reasons", "expected"),
        [
            (
                "450 4.7.1 Busy ({reasons})",
                [NO_HELO, CONCURRENCY],
                "450 4.7.1 Busy (no_helo concurrency)",
            ),
            ("450 4.7.1 Busy", [NO_HELO], "450 4.7.1 Busy"),
            (
                "421 4.7.0 {reasons}; {reasons}",
                [NO_HELO],
                "421 4.7.0 no_helo; no_helo",
            ),
            ("450 4.7.1 {reason}", [NO_HELO], "450 4.7.1 {reason}"),
        ],
    )
    def test_reasons_filled(
        self, template: str, reasons: list[str], expected: str
    ) -> None:
        """Every ``{reasons}`` becomes the reasons, space-separated, in order."""
        assert refusal(template, reasons) == Action.parse(expected)

    @pytest.mark.parametrize("level", [ELEVATED, OVERLOAD])
    @pytest.mark.parametrize(
        ("client", "known"),
        [
            (UNKNOWN_BOT, QUIET),
            (HAMMERING_IMPOSTOR, HAMMERING),
            (
                {
                    "client_address": "203.0.113.45",
                    "client_name": "unknown",
                    "reverse_client_name": "203-0-113-45.pool.example.net",
                    "helo_name": "[192.0.2.1]",
                },
                stats(concurrency=9, session_rate=99, message_rate=99, since_refusal=1),
            ),
        ],
    )
    def test_default_replies_well_formed(
        self, level: int, client: dict[str, str], known: ClientStats
    ) -> None:
        """The default refusals: code + DSN + text, printable, at most 400 chars."""
        verdict = decide(req(**client), level, known, DEFAULTS)
        assert verdict.refused
        check_reply(verdict.action)
        assert " ".join(verdict.reasons) in verdict.action.text

    @pytest.mark.parametrize(
        "template",
        [
            DEFAULTS.elevated_action,
            DEFAULTS.elevated_reject_action,
            DEFAULTS.overload_action,
            DEFAULTS.overload_reject_action,
        ],
    )
    def test_every_reason_fits(self, template: str) -> None:
        """Each default stays well-formed with every signal at once in it."""
        check_reply(refusal(template, SIGNALS))

    def test_disconnecting_codes(self) -> None:
        """At overload the defaults hang up (421, 521): the process is freed."""
        assert DEFAULTS.overload_action.startswith("421 4.")
        assert DEFAULTS.overload_reject_action.startswith("521 5.")
        assert DEFAULTS.elevated_action.startswith("450 4.")
        assert DEFAULTS.elevated_reject_action.startswith("450 4.")


class TestVerdict:
    """The verdict carries its decision as data."""

    @pytest.mark.parametrize(
        ("level", "name"),
        [(NORMAL, "normal"), (ELEVATED, "elevated"), (OVERLOAD, "overload")],
    )
    def test_level_name(self, level: int, name: str) -> None:
        """The level's name, as the logs and metrics show it."""
        assert Verdict(DUNNO, PASS, level, 0, ()).level_name == name

    @pytest.mark.parametrize(
        ("outcome", "refused"),
        [(PASS, False), (EXEMPT, False), (DEFER, True), (REJECT, True)],
    )
    def test_refused(self, outcome: str, refused: bool) -> None:
        """Deferred and rejected clients are refused; passed and exempt are not."""
        assert Verdict(DUNNO, outcome, OVERLOAD, 0, ()).refused is refused

    def test_reasons_are_data(self) -> None:
        """Reasons are a tuple of signal names, the score a number."""
        verdict = decide(req(**UNKNOWN_BOT), OVERLOAD, QUIET, DEFAULTS)
        assert verdict.reasons == (NO_CLIENT_NAME, NO_REVERSE_NAME, HELO_NOT_FQDN)
        assert verdict.score == 6
        assert verdict.exemption is None

    def test_pure(self) -> None:
        """The policy module imports nothing from Twisted (time is passed in)."""
        tree = ast.parse(Path(policy.__file__).read_text(encoding="utf-8"))
        imported = {
            name
            for node in ast.walk(tree)
            for name in (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
        }
        assert not {m for m in imported if m.split(".")[0] in {"twisted", "time"}}


class TestPurity:
    """The policy module is a pure function of its inputs."""

    def test_no_twisted(self) -> None:
        """Importing policyd.policy loads no Twisted module (no reactor, no clock)."""
        code = (
            "import sys, policyd.policy; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert result.stdout.strip() == "[]"


# A client showing one identity sign (score 2) at each stage.
ONE_SIGN = [
    pytest.param({"client_name": "unknown", "state": "CONNECT"}, id="unverified PTR"),
    pytest.param(
        {
            "client_address": "203.0.113.7",
            "client_name": "203-0-113-7.dyn.cable.example.net",
            "reverse_client_name": "203-0-113-7.dyn.cable.example.net",
            "state": "XCLIENT",
        },
        id="dynamic-looking PTR",
    ),
    pytest.param({"helo_name": "pc01"}, id="bare-word HELO at RCPT"),
]


class TestBar:
    """The bar falls as the overload lasts: `bar` and `decide(..., pressure)`."""

    @pytest.mark.parametrize(
        ("level", "pressure", "expected"),
        [
            (ELEVATED, 0, 3),
            (ELEVATED, 5, 3),
            (OVERLOAD, 0, 3),
            (OVERLOAD, 1, 2),
            (OVERLOAD, 2, 2),
            (OVERLOAD, 99, 2),
        ],
    )
    def test_defaults(self, level: int, pressure: int, expected: int) -> None:
        """3 at elevated; at overload one point less per step, never below 2."""
        assert bar(level, pressure, DEFAULTS) == expected

    @pytest.mark.parametrize(
        ("suspicious", "lowest", "pressure", "expected"),
        [
            (6, 2, 1, 5),
            (6, 2, 3, 3),
            (6, 2, 9, 2),
            (3, 3, 5, 3),
            (2, 5, 5, 2),
        ],
    )
    def test_tunable(
        self, suspicious: int, lowest: int, pressure: int, expected: int
    ) -> None:
        """The bar runs from POLICYD_SUSPICIOUS_SCORE down to the overload one.

        A lowest bar above the suspicious score changes nothing: the bar
        never rises under overload.
        """
        settings = attrs.evolve(
            DEFAULTS, suspicious_score=suspicious, overload_suspicious_score=lowest
        )
        assert bar(OVERLOAD, pressure, settings) == expected
        assert policy.max_pressure(settings) == max(0, suspicious - lowest)

    @pytest.mark.parametrize("attributes", ONE_SIGN)
    def test_one_sign_refused_once_overload_lasts(
        self, attributes: dict[str, str]
    ) -> None:
        """One identity sign: passes at elevated and fresh overload, 421 later."""
        request = req(**attributes)
        assert decide(request, ELEVATED, QUIET, DEFAULTS, 5).outcome == PASS
        assert decide(request, OVERLOAD, QUIET, DEFAULTS, 0).outcome == PASS
        verdict = decide(request, OVERLOAD, QUIET, DEFAULTS, 1)
        assert (verdict.outcome, verdict.score, verdict.bar) == (DEFER, 2, 2)
        assert verdict.action.text.startswith("421 ")

    def test_lower_bar_never_rejects_for_good(self) -> None:
        """The bar moves the temporary refusal only: 521 still needs firm 8."""
        request = req(
            client_name="unknown", reverse_client_name="unknown", helo_name="pc01"
        )
        verdict = decide(request, OVERLOAD, stats(since_refusal=1), DEFAULTS, 1)
        assert verdict.score == 9
        assert verdict.outcome == DEFER  # firm: helo 2 + quick retry 3 = 5

    @pytest.mark.parametrize("pressure", [0, 1, 99])
    def test_behaviour_alone_never_refuses_at_any_bar(self, pressure: int) -> None:
        """A clean identity that hammers passes, however low the bar."""
        known = stats(concurrency=99, message_rate=99, session_rate=99, since_refusal=1)
        verdict = decide(req(), OVERLOAD, known, DEFAULTS, pressure)
        assert verdict.outcome == PASS
        assert verdict.score == 10

    @pytest.mark.parametrize("pressure", [0, 1, 99])
    def test_exempt_never_refused_at_any_bar(self, pressure: int) -> None:
        """Authenticated clients pass, whatever the bar and the signs."""
        request = req(client_name="unknown", helo_name="pc01", sasl_username="u")
        verdict = decide(request, OVERLOAD, HAMMERING, DEFAULTS, pressure)
        assert verdict.outcome == EXEMPT


class TestProcessHolder:
    """Holding processes without progress: a signal that only ever defers."""

    def test_refuses_a_clean_identity_temporarily(self) -> None:
        """A clean name that held processes for nothing is deferred under stress.

        Holding a process is the very harm policyd exists to undo, so unlike
        volume it counts on its own, but it never leads to a permanent
        refusal (a slow link or slow DNS on our side can cause it too).
        """
        verdict = decide(req(), ELEVATED, stats(held=60.0), DEFAULTS)
        assert (verdict.outcome, verdict.reasons) == (DEFER, (PROCESS_HOLDER,))

    def test_lets_behaviour_add(self) -> None:
        """Once a holder, its hammering adds to the score (still temporary)."""
        known = stats(held=60.0, concurrency=9, since_refusal=1)
        verdict = decide(req(), OVERLOAD, known, DEFAULTS)
        assert verdict.score == 9
        assert verdict.reasons == (CONCURRENCY, QUICK_RETRY, PROCESS_HOLDER)
        assert verdict.outcome == DEFER  # firm 6 (behaviour), not 8

    def test_never_counts_towards_reject(self) -> None:
        """Firm signals one short of the reject score stay a 421 with a holder."""
        request = req(helo_name="localhost", reverse_client_name="dsl-1.example.net")
        settings = attrs.evolve(DEFAULTS, reject_score=8)
        without = decide(request, OVERLOAD, stats(), settings)
        held = decide(request, OVERLOAD, stats(held=99.0), settings)
        assert without.score == 7
        assert held.score == 10
        assert (without.outcome, held.outcome) == (DEFER, DEFER)


class TestHolderClass:
    """`holder_class`: who holds the processes, for the metric and the log."""

    @pytest.mark.parametrize(
        ("attributes", "known", "expected"),
        [
            pytest.param({}, QUIET, CLEAN_CLASS, id="clean"),
            pytest.param({}, HAMMERING, CLEAN_CLASS, id="clean and busy: clean"),
            pytest.param(
                {"client_name": "unknown"}, QUIET, SUSPICIOUS, id="one sign: suspicious"
            ),
            pytest.param({}, stats(held=99.0), SUSPICIOUS, id="process holder"),
            pytest.param(
                {"client_name": "unknown", "sasl_username": "alice"},
                QUIET,
                EXEMPT,
                id="authenticated",
            ),
        ],
    )
    def test_classes(
        self, attributes: dict[str, str], known: ClientStats, expected: str
    ) -> None:
        """Suspicious means refused at the lowest overload bar."""
        assert holder_class(req(**attributes), known, DEFAULTS) == expected


class TestVerdictMemo:
    """A caller's memo of verdicts (`decide`'s *verdicts*) changes no answer."""

    CLIENTS: tuple[dict[str, str], ...] = (
        {},
        {"client_name": "unknown", "reverse_client_name": "unknown"},
        {"helo_name": "user-pc"},
        {"helo_name": "[203.0.113.9]", "client_name": "unknown"},
        {"reverse_client_name": "192-0-2-10.dyn.example.net", "helo_name": "localhost"},
        {"sasl_username": "alice"},
    )
    HISTORIES = (stats(), stats(concurrency=9), stats(since_refusal=2.0, held=99.0))

    @pytest.mark.parametrize("pressure", [0, 1, 5])
    @pytest.mark.parametrize("level", [NORMAL, ELEVATED, OVERLOAD])
    def test_same_verdicts(self, level: int, pressure: int) -> None:
        """Every client and history, twice over, gets the verdict it gets without."""
        memo: dict[tuple[tuple[str, ...], int, int], Verdict] = {}
        for _ in range(2):
            for attributes in self.CLIENTS:
                for known in self.HISTORIES:
                    request = req(**attributes)
                    alone = decide(request, level, known, DEFAULTS, pressure)
                    kept = decide(
                        request, level, known, DEFAULTS, pressure, verdicts=memo
                    )
                    assert kept == alone

    def test_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A full memo starts over rather than grow."""
        monkeypatch.setattr(policy, "VERDICTS_KEPT", 2)
        memo: dict[tuple[tuple[str, ...], int, int], Verdict] = {}
        for attributes in self.CLIENTS:
            decide(req(**attributes), OVERLOAD, stats(), DEFAULTS, 0, verdicts=memo)
            assert len(memo) <= 2
