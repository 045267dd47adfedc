"""
The overload scenario, short: with policyd, legitimate mail gets through.

This is a small version of bench/overload/overload.py (docs/overload.md): a
real Postfix with 5 smtpd processes in a private network namespace, 10 bots
that dawdle 1.5 s before each command and reconnect at once, and 3
legitimate senders with a retry queue, all presenting their identities with
XCLIENT.  The load runs with policyd in dry run (so, in effect, without it)
and with policyd wired at CONNECT, against bots without reverse DNS; then
against a *mixed* botnet (a third each without PTR, with a dynamic-looking
forward-confirmed PTR, with a PTR that does not confirm: one identity sign
for two thirds of them) with policyd at CONNECT + RCPT, with and without two
legitimate senders that have no PTR; and a legitimate surge (three clean
senders per process, no bots).  Every run measures 15 seconds.  It pins the
qualitative outcome, not numbers (the machine may be slow or busy): with
policyd the legitimate senders get more messages accepted during the flood
than without it, the bots are refused at connect time, single-sign bots
included once the overload lasts; a surge of clean senders is never refused;
and no legitimate message is refused for good or left undelivered once the
flood is over.

policyd's own detection is what the level tests check: these runs ignore
Postfix's ``stress=yes`` (``POLICYD_POSTFIX_STRESS_LEVEL=ignore``), so the
level comes from policyd's count of busy processes alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from overload import QUICK, RUNS, Bed, open_bed, run_one, summarize

from policyd.testing.netns import NetworkNamespace
from policyd.testing.postfix import PostfixTools

pytestmark = pytest.mark.postfix


@pytest.fixture(scope="module")
def overload_bed(
    postfix_tools: PostfixTools, network_namespace: NetworkNamespace
) -> Iterator[Bed]:
    """A Postfix instance in its own network namespace, for the scenario."""
    with open_bed(QUICK, postfix_tools, network_namespace) as bed:
        yield bed


#: Postfix's stress=yes plays no part in policyd's level in these runs.
OWN_DETECTION = (("POLICYD_POSTFIX_STRESS_LEVEL", "ignore"),)
#: The bar falls after 2 s of overload instead of 10 s (the runs are short).
SHORT_STEP = (("POLICYD_BAR_STEP", "2s"),)

RUN_NAMES = ("no-policyd", "connect", "mixed-no-policyd", "mixed", "weak", "surge")


@pytest.fixture(scope="module")
def outcomes(overload_bed: Bed) -> dict[str, dict[str, Any]]:
    """The figures of every run, by name."""
    figures = {}
    for name in RUN_NAMES:
        spec = RUNS[name]
        spec = attrs.evolve(
            spec, policyd_env=(*spec.policyd_env, *OWN_DETECTION, *SHORT_STEP)
        )
        figures[name] = summarize(run_one(overload_bed, spec, QUICK))
    return figures


def test_postfix_stress_is_automatic(outcomes: dict[str, dict[str, Any]]) -> None:
    """
    The master started smtpd in stress mode itself, and policyd saw it.

    The listener sets no ``stress`` option, so smtpd processes running with
    ``stress=yes`` were made so by master (after the process limit was hit),
    and the requests they sent carried ``stress=yes`` to policyd.
    """
    for name in ("no-policyd", "connect", "mixed"):
        figures = outcomes[name]
        assert figures["stressed_smtpd_seen"] >= 1, figures
        assert figures["postfix_stress_seen"] > 0, figures


def test_policyd_detects_overload(outcomes: dict[str, dict[str, Any]]) -> None:
    """The level from policyd's own count of busy processes reaches overload."""
    for name in ("no-policyd", "connect", "mixed-no-policyd", "mixed", "surge"):
        assert outcomes[name]["max_level"] == "overload", name


def test_more_legitimate_mail_with_policyd(
    outcomes: dict[str, dict[str, Any]],
) -> None:
    """Legitimate senders get more accepted with policyd than without it."""
    for without, with_policyd in (
        ("no-policyd", "connect"),
        ("mixed-no-policyd", "mixed"),
    ):
        before, after = outcomes[without], outcomes[with_policyd]
        assert after["legit_accepted"] > before["legit_accepted"], (before, after)
        assert after["bot_share"] < before["bot_share"]


def test_bots_refused_at_connect(outcomes: dict[str, dict[str, Any]]) -> None:
    """With CONNECT wiring, bots are refused before they say anything."""
    for name in ("connect", "mixed"):
        assert outcomes[name]["bot_refused_at"].get("CONNECT", 0) > 0
    # In dry run nobody is refused.
    assert outcomes["no-policyd"]["bot_refused_at"] == {}
    assert "dry_run_defer" in outcomes["no-policyd"]["decisions"]


def test_single_sign_bots_refused_at_connect(
    outcomes: dict[str, dict[str, Any]],
) -> None:
    """
    In the mixed botnet, bots with one identity sign are refused at CONNECT.

    With a fixed bar of 3 they passed the CONNECT check and held their
    process until RCPT; once the overload lasts the bar is 2.
    """
    by_kind = outcomes["mixed"]["bot_refused_at_by_kind"]
    for kind in ("dynamic", "unconfirmed"):
        assert by_kind[kind].get("CONNECT", 0) > 0, by_kind


def test_surge_never_refused(outcomes: dict[str, dict[str, Any]]) -> None:
    """A surge of clean senders fills the processes; none of them is refused."""
    surge = outcomes["surge"]
    assert surge["clean_attempts_refused"] == 0, surge
    assert not {"defer", "reject"} & set(surge["decisions"]), surge["decisions"]
    assert surge["legit_accepted"] > 0


def test_weak_senders_delivered_after_the_flood(
    outcomes: dict[str, dict[str, Any]],
) -> None:
    """Senders without PTR may be deferred in the flood; all deliver after it."""
    weak = outcomes["weak"]
    assert weak["weak_messages"] > 0, weak
    assert weak["weak_refused"] == 0, weak
    assert weak["weak_pending"] == 0, weak
    assert weak["drained"], weak


def test_no_legitimate_message_lost(outcomes: dict[str, dict[str, Any]]) -> None:
    """None refused for good; every deferred message accepted after the flood."""
    for figures in outcomes.values():
        assert figures["legit_refused"] == 0, figures
        assert figures["legit_pending"] == 0, figures
        assert figures["drained"], figures
