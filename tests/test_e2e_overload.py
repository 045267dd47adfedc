"""
The overload scenario, short: with policyd, legitimate mail gets through.

This is a small version of bench/overload/overload.py (docs/overload.md):
a real Postfix with 5 smtpd processes in a private network namespace, 10
bots that dawdle 1.5 s before each command and reconnect at once, and 3
legitimate senders with a retry queue, all presenting their identities
with XCLIENT.  The same load runs twice, with policyd in dry run (so, in
effect, without it) and with policyd wired at CONNECT, for 15 measured
seconds each.  It pins the qualitative outcome, not numbers (the machine
may be slow or busy): with policyd the legitimate senders get more messages
accepted during the flood than without it, the bots are refused at
connect time, and no legitimate message is refused for good or left
undelivered once the flood is over.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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


@pytest.fixture(scope="module")
def outcomes(overload_bed: Bed) -> dict[str, dict[str, Any]]:
    """The figures of the dry-run and the CONNECT-wired run."""
    return {
        name: summarize(run_one(overload_bed, RUNS[name], QUICK))
        for name in ("no-policyd", "connect")
    }


def test_stress_mode_is_automatic(
    overload_bed: Bed, outcomes: dict[str, dict[str, Any]]
) -> None:
    """Postfix's master itself entered stress mode: the bed is a real overload."""
    assert overload_bed.netns is not None
    for figures in outcomes.values():
        assert figures["postfix_stress"] == "automatic"
        assert figures["process_limit_warnings"] >= 1
        assert figures["stressed_smtpd_seen"] >= 1


def test_policyd_detects_overload(outcomes: dict[str, dict[str, Any]]) -> None:
    """The policyd stress level is overload during the flood, in dry run too."""
    for figures in outcomes.values():
        assert figures["max_level"] == "overload"


def test_more_legitimate_mail_with_policyd(
    outcomes: dict[str, dict[str, Any]],
) -> None:
    """Legitimate senders get more accepted with policyd than without it."""
    without, with_policyd = outcomes["no-policyd"], outcomes["connect"]
    assert with_policyd["legit_accepted"] > without["legit_accepted"], (
        without,
        with_policyd,
    )
    assert with_policyd["bot_share"] < without["bot_share"]


def test_bots_refused_at_connect(outcomes: dict[str, dict[str, Any]]) -> None:
    """With CONNECT wiring, bots are refused before they say anything."""
    assert outcomes["connect"]["bot_refused_at"].get("CONNECT", 0) > 0
    # In dry run nobody is refused.
    assert outcomes["no-policyd"]["bot_refused_at"] == {}
    assert "dry_run_defer" in outcomes["no-policyd"]["decisions"]


def test_no_legitimate_message_lost(outcomes: dict[str, dict[str, Any]]) -> None:
    """None refused for good; every deferred message accepted after the flood."""
    for figures in outcomes.values():
        assert figures["legit_refused"] == 0, figures
        assert figures["legit_pending"] == 0, figures
        assert figures["drained"], figures
