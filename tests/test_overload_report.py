"""The overload scenario's arithmetic: what its table and plot say, in memory.

The scenario itself (bench/overload/overload.py) runs a real Postfix; see
test_e2e_overload.py.  Here its records are built by hand, so every figure
can be checked against a number worked out on paper.
"""

from __future__ import annotations

import random

import pytest
from crowd import (
    ACCEPTED,
    CONNECT,
    DEFERRED,
    DROPPED,
    MIXED,
    MIXED_CLEAN,
    REFUSED,
    WIDE,
    Identity,
    Message,
    Session,
    bot_identities,
    sender_identities,
)
from overload import (
    RUNS,
    RunResult,
    Sample,
    Scenario,
    bot_kind,
    percentile,
    reference_run,
    reproducible_argv,
    sender_count,
    summarize,
    table,
    throughput_series,
)

#: warm-up 10 s, flood measured over [110, 130) with the run begun at 100.
SCENARIO = Scenario(maxproc=4, warmup=10, duration=20)
BEGAN = 100.0
FLOOD_END = 130.0


def session(
    started: float,
    greeted: float | None,
    ended: float,
    outcome: str = ACCEPTED,
    stage: str = "DATA-END",
) -> Session:
    """A session with the given times."""
    return Session(0, started, greeted, ended, outcome, stage)


def message(first: float, accepted: float | None, *attempts: Session) -> Message:
    """A message first tried at *first*, accepted at *accepted* (or not)."""
    return Message(0, 0, first, accepted, False, list(attempts))


def result(
    sessions: list[Session] | None = None,
    messages: list[Message] | None = None,
    samples: list[Sample] | None = None,
    run: str = "connect",
) -> RunResult:
    """A run record over the standard timeline."""
    return RunResult(
        spec=RUNS[run],
        scenario=SCENARIO,
        began=BEGAN,
        flood_end=FLOOD_END,
        sessions=sessions or [],
        messages=messages or [],
        samples=samples or [],
        postfix_stress="automatic",
        process_limit_warnings=1,
    )


class TestPercentile:
    """Nearest-rank percentiles."""

    def test_empty(self) -> None:
        """No values: no percentile (shown as '-')."""
        assert percentile([], 0.5) is None

    @pytest.mark.parametrize(
        ("share", "expected"), [(0.5, 5.0), (0.99, 10.0), (0.1, 1.0), (0.0, 1.0)]
    )
    def test_ranks(self, share: float, expected: float) -> None:
        """The p-th percentile of 1..10 is the value at rank ceil(p * 10)."""
        values = [float(v) for v in range(10, 0, -1)]
        assert percentile(values, share) == expected


class TestLegitimate:
    """Legitimate senders' figures count only the measured flood window."""

    def test_rate_counts_acceptances_in_window(self) -> None:
        """Messages accepted before, in and after [110, 130) count only inside."""
        messages = [
            message(105.0, 109.0),  # warm-up
            message(111.0, 112.0),
            message(120.0, 129.9),
            message(125.0, 131.0),  # after the flood
        ]
        summary = summarize(result(messages=messages))
        assert summary["legit_accepted"] == 2
        assert summary["legit_per_second"] == pytest.approx(2 / 20)

    def test_delay_from_first_attempt(self) -> None:
        """Delay is first attempt to acceptance, retries included."""
        deferred = session(111.0, 111.5, 112.0, DEFERRED, "RCPT")
        retried = session(114.0, 114.1, 115.0)
        messages = [
            message(111.0, 115.0, deferred, retried),
            message(112.0, 113.0, session(112.0, 112.2, 113.0)),
        ]
        summary = summarize(result(messages=messages))
        assert summary["delay_p50"] == pytest.approx(1.0)
        assert summary["delay_p99"] == pytest.approx(4.0)
        assert summary["legit_deferred_then_accepted"] == 1
        assert summary["legit_attempts_refused"] == 1

    def test_greeting_wait(self) -> None:
        """Greeting wait is connect to 220, for sessions begun in the window."""
        messages = [
            message(111.0, 113.0, session(111.0, 112.5, 113.0)),
            message(105.0, 106.0, session(105.0, 105.9, 106.0)),  # warm-up
        ]
        summary = summarize(result(messages=messages))
        assert summary["greeting_wait_p50"] == pytest.approx(1.5)

    def test_refused_and_pending(self) -> None:
        """Refused-for-good and never-accepted messages are counted apart."""
        refused = message(111.0, None, session(111.0, 111.1, 111.2, REFUSED, "RCPT"))
        refused.refused = True
        pending = message(112.0, None, session(112.0, 112.1, 112.2, DEFERRED, "RCPT"))
        summary = summarize(result(messages=[refused, pending]))
        assert (summary["legit_refused"], summary["legit_pending"]) == (1, 1)


class TestBots:
    """What the bots held, and where they were refused."""

    def test_share_of_process_time(self) -> None:
        """Held time is greeting to close, clipped to the window, over maxproc x s."""
        sessions = [
            session(105.0, 106.0, 115.0),  # 5 s inside
            session(120.0, 121.0, 135.0),  # 9 s inside
            session(112.0, None, 118.0, DROPPED),  # never got a process
        ]
        summary = summarize(result(sessions=sessions))
        assert summary["bot_share"] == pytest.approx(14 / (4 * 20))

    def test_refusal_stages(self) -> None:
        """Sessions begun in the window are counted by the stage of refusal."""
        sessions = [
            session(111.0, 111.0, 111.1, DEFERRED, CONNECT),
            session(112.0, 112.0, 112.1, DEFERRED, CONNECT),
            session(113.0, 113.0, 125.0, DEFERRED, "RCPT"),
            session(114.0, 114.0, 126.0, ACCEPTED),
            session(105.0, 105.0, 105.1, DEFERRED, CONNECT),  # warm-up
        ]
        summary = summarize(result(sessions=sessions))
        assert summary["bot_refused_at"] == {"CONNECT": 2, "RCPT": 1}
        assert summary["bot_sessions"] == 4
        assert summary["bot_accepted"] == 1


class TestLevels:
    """policyd's level over the flood."""

    def test_overload_share(self) -> None:
        """Samples inside the window give the share of time at overload."""
        samples = [
            Sample(5.0, 0, 4, 0),  # warm-up: ignored
            Sample(11.0, 1, 4, 4),
            Sample(15.0, 2, 4, 4),
            Sample(20.0, 2, 4, 4),
            Sample(25.0, None, 4, 4),  # scrape failed
        ]
        summary = summarize(result(samples=samples))
        assert summary["overload_share"] == pytest.approx(2 / 3)
        assert summary["max_level"] == "overload"
        assert summary["stressed_smtpd_seen"] == 4

    def test_no_policyd(self) -> None:
        """Without policyd there is no level."""
        summary = summarize(result(samples=[Sample(15.0, None, 4, 4)], run="baseline"))
        assert summary["overload_share"] is None
        assert summary["max_level"] is None


class TestSeries:
    """The plot's data."""

    def test_buckets(self) -> None:
        """Acceptances fall into buckets counted from the run's start, per second."""
        messages = [message(100.0, 100.5), message(100.0, 101.5), message(100, 101.9)]
        series = throughput_series(result(messages=messages), bucket=1.0)
        assert series[:3] == [(0.0, 1.0), (1.0, 2.0), (2.0, 0.0)]
        # Until the flood's end at least.
        assert series[-1][0] == pytest.approx(30.0)

    def test_two_second_buckets_are_rates(self) -> None:
        """A 2 s bucket with 4 acceptances reads 2 per second."""
        messages = [message(100.0, 100.0 + t) for t in (0.1, 0.5, 1.0, 1.9)]
        series = throughput_series(result(messages=messages), bucket=2.0)
        assert series[0] == (0.0, 2.0)


class TestTable:
    """The Markdown table."""

    def test_ratios(self) -> None:
        """Each run is compared with the no-policyd run and with the baseline."""
        baseline = summarize(
            result(
                messages=[message(111, 112 + i * 0.1) for i in range(40)],
                run="baseline",
            )
        )
        no_policyd = summarize(result(messages=[message(111, 112)], run="no-policyd"))
        connect = summarize(
            result(messages=[message(111, 112 + i * 0.1) for i in range(20)])
        )
        text = table([baseline, no_policyd, connect])
        lines = text.splitlines()
        assert len(lines) == 5
        row = lines[4].split("|")
        assert row[2].strip() == "1.0"  # 20 messages / 20 s
        assert row[3].strip() == "20.00x"
        assert row[4].strip() == "0.50x"


class TestScenarios:
    """The runs of issue 10: references, sender counts, weak senders, kinds."""

    @pytest.mark.parametrize(
        ("run", "reference"),
        [
            ("connect", "no-policyd"),
            ("mixed", "mixed-no-policyd"),
            ("mixed-rcpt", "mixed-no-policyd"),
            ("wide", "mixed-no-policyd"),
            ("weak", "mixed-no-policyd"),
            ("surge", "surge-no-policyd"),
            ("surge-bare", "surge-no-policyd"),
            ("surge-wan", "surge-wan-no-policyd"),
        ],
    )
    def test_reference(self, run: str, reference: str) -> None:
        """Each run is compared with the run of the same load without policyd."""
        assert reference_run(run) == reference
        assert reference in RUNS

    def test_surge_senders(self) -> None:
        """The surge has three senders per process; other runs the scenario's."""
        assert sender_count(RUNS["surge"], SCENARIO) == 12
        assert sender_count(RUNS["mixed"], SCENARIO) == SCENARIO.senders

    def test_weak_senders_counted_apart(self) -> None:
        """The last senders of a weak run are weak; their figures are their own."""
        weak = RUNS["weak"]
        count = sender_count(weak, SCENARIO)
        late = Message(count - 1, 0, 111.0, FLOOD_END + 42.0, False, [])
        late.attempts = [
            Session(count - 1, 111, 111.1, 111.2, DEFERRED, CONNECT),
            Session(count - 1, FLOOD_END + 42, FLOOD_END + 42, FLOOD_END + 42),
        ]
        clean = Message(0, 0, 111.0, 112.0, False, [session(111, 111.1, 112)])
        figures = summarize(
            RunResult(
                spec=weak,
                scenario=SCENARIO,
                began=BEGAN,
                flood_end=FLOOD_END,
                sessions=[],
                messages=[late, clean],
                samples=[],
                postfix_stress="automatic",
                process_limit_warnings=1,
            )
        )
        assert figures["weak_messages"] == 1
        assert figures["weak_deferred"] == 1
        assert figures["weak_last_after_flood"] == pytest.approx(42.0)
        assert figures["clean_attempts_refused"] == 0
        assert "1 of 1 deferred, last 42.0 s after" in table([figures])

    @pytest.mark.parametrize(
        ("mix", "number", "kind"),
        [
            (MIXED, 0, "no-ptr"),
            (MIXED, 1, "dynamic"),
            (MIXED, 5, "unconfirmed"),
            (MIXED_CLEAN, 4, "clean"),
            (MIXED_CLEAN, 5, "unconfirmed"),
            (WIDE, 1, None),
        ],
    )
    def test_bot_kind(self, mix: str, number: int, kind: str | None) -> None:
        """The kind of a bot follows the order identities are dealt in."""
        assert bot_kind(mix, number) == kind


class TestIdentities:
    """The populations' identities."""

    def test_mixed_botnet(self) -> None:
        """A third each: no PTR, dynamic confirmed PTR, unconfirmed PTR."""
        bots = bot_identities(6, random.Random(1), MIXED)  # noqa: S311 - not crypto
        assert (bots[0].name, bots[0].reverse_name) == ("[UNAVAILABLE]",) * 2
        assert bots[1].name == bots[1].reverse_name == bots[1].helo
        assert ".dyn." in bots[1].name
        assert bots[1].address.replace(".", "-") in bots[1].name
        assert bots[2].name == "[UNAVAILABLE]"
        assert bots[2].reverse_name == bots[2].helo != "[UNAVAILABLE]"
        assert bot_kind(MIXED, 2) == "unconfirmed"

    def test_mixed_clean_botnet(self) -> None:
        """Every fifth bot of MIXED_CLEAN has verified, non-dynamic names."""
        bots = bot_identities(10, random.Random(1), MIXED_CLEAN)  # noqa: S311
        for n in (4, 9):
            assert bots[n].name == bots[n].reverse_name == bots[n].helo
            assert bots[n].name.startswith("mail.hosted")

    def test_wide_botnet(self) -> None:
        """Thousands of addresses over many /24s and /64s, IPv6 tagged."""
        pool = bot_identities(3000, random.Random(1), WIDE)  # noqa: S311
        v6 = [b for b in pool if ":" in b.address]
        v4 = [b for b in pool if ":" not in b.address]
        assert len(v6) == 1000
        assert len({b.address.rsplit(".", 1)[0] for b in v4}) > 1000
        assert len({b.address.split("::")[0] for b in v6}) > 900
        assert "ADDR=IPV6:2001:db8:" in v6[0].xclient()

    def test_weak_senders(self) -> None:
        """The last *weak* senders have no PTR and a proper HELO."""
        senders = sender_identities(4, weak=1)
        assert senders[3].name == senders[3].reverse_name == "[UNAVAILABLE]"
        assert "." in senders[3].helo
        assert senders[0].name == senders[0].helo

    def test_bots_look_like_bots(self) -> None:
        """Bots have no names and come from three /24s."""
        bots = bot_identities(9, random.Random(1))  # noqa: S311 - not crypto
        assert {b.name for b in bots} == {"[UNAVAILABLE]"}
        assert {b.reverse_name for b in bots} == {"[UNAVAILABLE]"}
        assert len({b.address.rsplit(".", 1)[0] for b in bots}) == 3

    def test_senders_are_clean(self) -> None:
        """Senders' names match their HELO."""
        for sender in sender_identities(3):
            assert sender.name == sender.reverse_name == sender.helo
            assert "." in sender.helo

    def test_xclient_encoding(self) -> None:
        """XCLIENT values are xtext: '+', '=' and controls are escaped."""
        identity = Identity("192.0.2.1", "[UNAVAILABLE]", "[UNAVAILABLE]", "a=b+c")
        assert "HELO=a+3Db+2Bc" in identity.xclient()


def test_recorded_command_leaves_out_json() -> None:
    """The command written into the docs drops --json FILE (a local path)."""
    argv = ["--quick", "--json", "/x/results.json", "--docs", "docs/", "--json=/y"]
    assert reproducible_argv(argv) == ["--quick", "--docs", "docs/"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--runs", "surge", "--docs", "/scratch/run7/docs"],
        ["--runs", "surge", "--docs=/scratch/run7/docs"],
    ],
)
def test_recorded_command_names_the_docs(argv: list[str]) -> None:
    """The command written into the docs says --docs docs/, not a local path."""
    assert reproducible_argv(argv) == ["--runs", "surge", "--docs", "docs/"]
