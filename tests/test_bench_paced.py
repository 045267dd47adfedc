"""Paced (open-loop) load: bench/run.py --paced and the engine under it.

The pure parts first: the cells of the command line, how large a paced pool
must be and how each server walks through it, and the fresh-address pool.
Then a few short real runs of the C engine (bench/policyload.c) against the
bare Twisted baseline (bench/baseline.py) on 127.0.0.1, each bounded by its
warm-up and window (a few seconds); they are skipped without a C compiler.
"""

from __future__ import annotations

import ipaddress
import re
import selectors
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loadgen import (
    LoadGenerator,
    PoolOptions,
    build_pool,
    find_compiler,
    paced_requests,
    pool_addresses,
)
from run import Cursor, Pace, paced_pool_requests, parse_args, parse_paces

BENCH = Path(__file__).resolve().parent.parent / "bench"


def attribute(request: bytes, name: str) -> str:
    """One attribute's value in a policy request."""
    m = re.search(rb"(?m)^" + name.encode() + rb"=(.*)$", request)
    assert m is not None, name
    return m.group(1).decode()


class TestCells:
    """``--paced CONNSxRATE,...``: the cells of a paced run."""

    def test_default_is_the_issue_matrix(self) -> None:
        """Bare --paced runs issue 13's cells, with fresh addresses only."""
        args = parse_args(["--paced"])
        assert args.paces == [Pace(100, 10.0), Pace(200, 10.0), Pace(100, 50.0)]
        assert [p.offered for p in args.paces] == [1000, 2000, 5000]
        assert args.address_modes == ["fresh"]
        assert args.conns == [100, 200]

    def test_paced_defaults(self) -> None:
        """Paced: a botnet's worth of pool clients, a small fill, no Redis faults."""
        args = parse_args(["--paced", "--backends", "memory,redis"])
        assert args.clients == 100_000
        assert args.sizes == [1000]
        assert args.faults == []
        assert args.jitter == "uniform"

    def test_saturated_defaults_unchanged(self) -> None:
        """Without --paced the pool is what it was: 500 clients, 20,000 requests."""
        args = parse_args([])
        assert (args.clients, args.pool, args.paced) == (500, 20_000, None)

    def test_parse(self) -> None:
        """Order kept, case and spaces forgiven, repeats dropped, fractions allowed."""
        assert parse_paces(" 200X10, 100x12.5,200x10 ") == [
            Pace(200, 10.0),
            Pace(100, 12.5),
        ]

    @pytest.mark.parametrize(
        "text", ["", "100", "x10", "0x10", "100x0", "100x-5", "100xinf", "ax10"]
    )
    def test_refused(self, text: str) -> None:
        """A cell needs a positive whole number of connections and a finite rate."""
        with pytest.raises(ValueError, match=r"CONNSxRATE|positive|no cell"):
            parse_paces(text)

    @pytest.mark.parametrize(
        "argv",
        [
            ["--addresses", "fresh"],
            ["--paced", "--addresses", "botnet"],
            ["--paced", "--addresses", "fresh,fresh"],
            ["--paced", "100"],
        ],
    )
    def test_bad_options(self, argv: list[str]) -> None:
        """--addresses only with --paced, and only known modes, once each."""
        with pytest.raises(SystemExit):
            parse_args(argv)


class TestPoolSize:
    """A paced pool is large enough that no server is sent a session twice."""

    def test_one_run(self) -> None:
        """A run takes the offered rate over its time, plus a session a connection.

        The session each connection holds when the run stops: the next run
        skips its rest.
        """
        assert paced_requests(1000, 6.0, 100) == 6000 + 300

    def test_default_matrix(self) -> None:
        """Three repeats of 1k, 2k and 5k req/s over 6 s, twice over for retries."""
        paces = parse_paces("100x10,200x10,100x50")
        planned = 3 * (6300 + 12600 + 30300)
        assert paced_pool_requests(paces, 6.0, 3, 2) == planned * 2

    def test_room_for_retries_of_one_repeat(self) -> None:
        """With one repeat the largest run still fits in again, once per retry."""
        paces = parse_paces("100x10,100x50")
        need = paced_pool_requests(paces, 2.5, 1, 2)
        assert need == (2800 + 12800) + 2 * 12800

    def test_cursor_walks_the_pool(self) -> None:
        """Each run starts where the server's last one stopped.

        A run that goes past the end of the pool is flagged, and so is every
        run after it.
        """
        cursor = Cursor(100)
        assert cursor.take(60) is False
        assert cursor.next == 60
        assert cursor.take(40) is False
        assert cursor.take(1) is True
        assert cursor.take(0) is True


class TestFreshPool:
    """``PoolOptions(fresh=True)``: a new client for every session."""

    POOL = build_pool(PoolOptions(requests=6000, fresh=True, ipv6_share=0.3))

    def test_one_client_per_session(self) -> None:
        """Every request of a session comes from the session's one client."""
        for session in self.POOL:
            assert len({attribute(r, "client_address") for r in session}) == 1

    def test_no_address_twice(self) -> None:
        """No two sessions share an address, nor an IPv6 /64 (policyd's key)."""
        keys = []
        for session in self.POOL:
            address = ipaddress.ip_address(attribute(session[0], "client_address"))
            key = (
                address
                if address.version == 4
                else ipaddress.ip_network(f"{address}/64", strict=False)
            )
            keys.append(key)
        assert len(set(keys)) == len(keys) == len(self.POOL)
        assert len(pool_addresses(self.POOL)) == len(self.POOL)
        assert any(":" in str(k) for k in keys)

    def test_names_are_new_too(self) -> None:
        """A clean client's names and HELO are its own: no session repeats them."""
        names = [
            attribute(s[0], "reverse_client_name")
            for s in self.POOL
            if attribute(s[0], "client_name") != "unknown"
        ]
        assert len(names) > len(self.POOL) // 2
        assert len(set(names)) == len(names)

    def test_bot_share_kept(self) -> None:
        """About 15% of the clients still look like bots (no verified name)."""
        bots = sum(
            attribute(s[0], "client_name") == "unknown"
            and attribute(s[0], "sasl_username") == ""
            for s in self.POOL
        )
        # 3% of clean clients also miss their name (DNS trouble).
        assert 0.12 < bots / len(self.POOL) < 0.22

    def test_reproducible(self) -> None:
        """The same seed builds the same fresh pool."""
        again = build_pool(PoolOptions(requests=6000, fresh=True, ipv6_share=0.3))
        assert again == self.POOL

    def test_pool_mode_replays_its_clients(self) -> None:
        """Without fresh, sessions draw from the given clients, so addresses recur."""
        pool = build_pool(PoolOptions(requests=2000, clients=50))
        assert len(pool_addresses(pool)) <= 50 < len(pool)


needs_cc = pytest.mark.skipif(find_compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def baseline() -> Iterator[tuple[int, int]]:
    """The bare Twisted DUNNO server on 127.0.0.1: (port, pid)."""
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "baseline.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=30), "baseline did not start within 30 s"
        line = proc.stdout.readline().decode()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        yield int(m.group(1)), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def generator() -> Iterator[LoadGenerator]:
    """The C engine over a fresh pool large enough for every run here."""
    if find_compiler() is None:
        pytest.skip("no C compiler")
    with LoadGenerator(PoolOptions(requests=8000, fresh=True), "c") as gen:
        yield gen


@needs_cc
class TestPacedRuns:
    """Real paced runs of the C engine against the baseline, a few seconds each."""

    def test_achieved_is_offered(
        self, baseline: tuple[int, int], generator: LoadGenerator
    ) -> None:
        """A server that keeps up answers the offered rate, nothing late.

        Its CPU is read from schedstat, at nanosecond resolution.
        """
        port, pid = baseline
        res = generator.run(
            port=port,
            connections=20,
            rate=50.0,
            warmup=0.5,
            duration=2.0,
            server_pid=pid,
        )
        assert res.offered_rps == 1000.0
        assert res.error_total == 0
        assert res.rps == pytest.approx(1000.0, rel=0.1)
        assert res.paced_sent == pytest.approx(res.completed, abs=20)
        assert res.late_share is not None
        assert res.late_share < 0.05
        assert res.cpu_source == "schedstat"
        assert res.server_us_per_req is not None
        assert res.server_us_per_req > 0

    def test_late_when_server_cannot_keep_up(
        self, baseline: tuple[int, int], generator: LoadGenerator
    ) -> None:
        """Asked for more than round trips allow, every request is late.

        Each is sent when the previous reply comes: never two in flight (the
        baseline would answer both, and the second reply would count as
        malformed).
        """
        port, _ = baseline
        res = generator.run(
            port=port, connections=1, rate=1e6, warmup=0.2, duration=0.5
        )
        assert res.error_total == 0
        assert res.completed > 100
        assert res.rps < 0.1 * 1e6
        assert res.late_share is not None
        assert res.late_share > 0.99
        assert res.late_lag_max_us is not None
        assert res.late_lag_max_us > 1000

    def test_connections_start_at_random_phases(
        self, baseline: tuple[int, int], generator: LoadGenerator
    ) -> None:
        """50 connections at 2/s do not all send at once.

        With no warm-up, the first tenth of a second holds about a tenth of
        the answers, not the 50 that connections started together would give.
        """
        port, _ = baseline
        res = generator.run(
            port=port,
            connections=50,
            rate=2.0,
            warmup=0.0,
            duration=1.0,
            timeline_step=0.1,
        )
        assert res.error_total == 0
        assert res.timeline is not None
        assert 70 < res.completed < 130
        assert max(s.count for s in res.timeline) < 35

    def test_exponential_gaps(
        self, baseline: tuple[int, int], generator: LoadGenerator
    ) -> None:
        """Exponential gaps keep the mean rate."""
        port, _ = baseline
        res = generator.run(
            port=port,
            connections=20,
            rate=50.0,
            jitter="exponential",
            warmup=0.5,
            duration=2.0,
        )
        assert res.error_total == 0
        assert res.rps == pytest.approx(1000.0, rel=0.1)

    def test_sessions_used(
        self, baseline: tuple[int, int], generator: LoadGenerator
    ) -> None:
        """The engine says how many sessions a run took.

        So that the next run of the same server can start after them: at least
        one per connection, at most one per request sent.
        """
        port, _ = baseline
        res = generator.run(
            port=port,
            connections=10,
            rate=20.0,
            warmup=0.3,
            duration=1.0,
            start_session=123,
        )
        sent = res.completed + res.warmup_completed
        assert res.sessions_used is not None
        assert 10 <= res.sessions_used <= sent + 10

    def test_saturated_runs_need_no_rate(
        self, baseline: tuple[int, int], generator: LoadGenerator
    ) -> None:
        """Without a rate a run is saturated as before: no pacing figures."""
        port, _ = baseline
        res = generator.run(port=port, connections=2, warmup=0.1, duration=0.3)
        assert res.error_total == 0
        assert res.offered_rps is None
        assert res.late is None
        assert res.cpu_source == "stat"

    def test_paced_needs_the_c_engine(self) -> None:
        """The Python engines do not pace: asking them is an error.

        Not a run that is silently saturated instead.
        """
        with (
            LoadGenerator(PoolOptions(requests=10), "asyncio") as gen,
            pytest.raises(ValueError, match="C engine"),
        ):
            gen.run(port=1, connections=1, rate=10.0)
