"""The arithmetic of the Redis benchmark (bench/run.py --backends memory,redis).

Only the pure parts: reading /metrics and INFO text, shares, the latency
timeline of a fault window, the contention figure with a Redis beside the
server, and how cells are named, prefixed and paired.  No server is started
and nothing is timed.
"""

from __future__ import annotations

import dataclasses

import pytest
from loadgen import Companion, LoadResult, latency_timeline
from redisbench import metric_by_label, metric_total, parse_info, per_item, scored_share
from run import Server, Variant, backend_pairs, parse_args, redis_prefix

from policyd.config import key_prefix

MS = 1_000_000  # nanoseconds


def result(**changes: object) -> LoadResult:
    """A 10 s window of 1,000 answers, changed as given."""
    base = LoadResult(
        engine="c",
        connections=100,
        connected=100,
        window_s=10.0,
        completed=1000,
        rps=100.0,
        p50_us=1.0,
        p90_us=1.0,
        p99_us=1.0,
        max_us=1.0,
        errors={},
        actions={},
        loadgen_cpu_s=1.0,
        loadgen_cores=0.1,
        loadgen_us_per_req=1.0,
        server_cpu_s=5.0,
        server_cores=0.5,
        server_us_per_req=5000.0,
        machine_busy_cores=None,
        machine_steal_cores=None,
        warmup_completed=0,
        connect_s=0.0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def request(instance: str) -> bytes:
    """A policy request with just an instance (what scored_share reads)."""
    return f"request=smtpd_access_policy\ninstance={instance}\nsender=\n\n".encode()


class TestMetrics:
    """Samples of a metric are found by name whatever their labels."""

    SCRAPE = {  # noqa: RUF012 - read only
        'policyd_backend_up{backend="redis"}': 1.0,
        "policyd_backend_fallbacks_total": 7.0,
        'policyd_backend_errors_total{backend="redis",reason="lost"}': 2.0,
        'policyd_backend_errors_total{backend="redis",reason="timeout"}': 3.0,
        "policyd_backend_upx": 9.0,
    }

    def test_total_sums_every_label(self) -> None:
        """A labelled metric's total is the sum of its samples."""
        assert metric_total(self.SCRAPE, "policyd_backend_errors_total") == 5.0

    def test_total_of_unlabelled(self) -> None:
        """A metric without labels is its one value."""
        assert metric_total(self.SCRAPE, "policyd_backend_fallbacks_total") == 7.0

    def test_total_not_a_longer_name(self) -> None:
        """A metric whose name merely starts with the one asked for is not counted."""
        assert metric_total(self.SCRAPE, "policyd_backend_up") == 1.0

    def test_total_absent(self) -> None:
        """A metric the scrape lacks is None (not 0: policyd may be down)."""
        assert metric_total(self.SCRAPE, "policyd_tracked_clients") is None
        assert metric_total({}, "policyd_backend_up") is None

    def test_by_label(self) -> None:
        """Samples keyed by one label's value."""
        assert metric_by_label(
            self.SCRAPE, "policyd_backend_errors_total", "reason"
        ) == {"lost": 2.0, "timeout": 3.0}


class TestRedisFigures:
    """INFO text and the per-key and per-answer divisions."""

    def test_parse_info(self) -> None:
        """Fields of every section; section headers and blank lines skipped."""
        text = "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\n\r\n"
        assert parse_info(text) == {
            "used_memory": "1048576",
            "used_memory_human": "1.00M",
        }

    def test_per_item(self) -> None:
        """Growth over the items written."""
        assert per_item(1000, 21000, 100) == 200.0

    @pytest.mark.parametrize(
        ("before", "after", "items"), [(None, 1.0, 10), (1.0, None, 10), (1.0, 2.0, 0)]
    )
    def test_per_item_unknown(
        self, before: float | None, after: float | None, items: int
    ) -> None:
        """Nothing measured, or nothing written: no figure rather than a wrong one."""
        assert per_item(before, after, items) is None

    def test_scored_share(self) -> None:
        """The first request of each transaction is the one scored."""
        sessions = [
            [request("a"), request("a"), request("b")],  # two transactions
            [request("c")],
            [request("d"), request("d"), request("d"), request("d")],
        ]
        assert scored_share(sessions) == pytest.approx(4 / 8)

    def test_scored_share_without_instance(self) -> None:
        """A request without an instance is scored each time."""
        assert scored_share([[request(""), request("")]]) == 1.0
        assert scored_share([]) == 0.0


class TestTimeline:
    """Latencies per slice of the window, by when the answer came."""

    def test_slices(self) -> None:
        """Each answer lands in the slice of its completion time."""
        latencies = [1 * MS, 3 * MS, 20 * MS, 2 * MS]
        done = [100 * MS, 900 * MS, 1500 * MS, 2999 * MS]
        slices = latency_timeline(latencies, done, 3.0, 1.0)
        assert [s.count for s in slices] == [2, 1, 1]
        assert slices[0].max_us == 3000.0
        assert slices[1].p99_us == 20000.0
        assert (slices[2].start_s, slices[2].end_s) == (2.0, 3.0)

    def test_empty_slice_is_listed(self) -> None:
        """A stall shows as a slice with no answers, not as a missing one."""
        slices = latency_timeline([1 * MS], [2500 * MS], 3.0, 1.0)
        assert [s.count for s in slices] == [0, 0, 1]
        assert slices[0].p99_us == slices[0].max_us == 0.0

    def test_late_answers_in_last_slice(self) -> None:
        """A window a little longer than whole slices ends in the last one."""
        slices = latency_timeline([1 * MS, 1 * MS], [0, 10_000_300_000], 10.0003, 1.0)
        assert len(slices) == 10
        assert slices[-1].count == 1
        assert slices[-1].end_s == 10.0003

    def test_mismatch_refused(self) -> None:
        """Latencies and completion times must pair up."""
        with pytest.raises(ValueError, match="zip"):
            latency_timeline([1, 2], [1], 1.0, 1.0)


class TestContention:
    """The Redis beside the server is not noise from a neighbour."""

    def test_companion_cpu_not_counted(self) -> None:
        """The server's wait, up to the companion's CPU time, is its own setup."""
        r = result(server_wait_s=0.8, loadgen_wait_s=0.1, companion_cpu_s=0.6)
        assert r.contention == pytest.approx(0.02)

    def test_never_negative(self) -> None:
        """A server that waited less than its companion ran waited for nobody else."""
        r = result(server_wait_s=0.2, loadgen_wait_s=0.0, companion_cpu_s=0.6)
        assert r.contention == 0.0

    def test_without_companion(self) -> None:
        """Without a companion the figure is what it always was."""
        r = result(server_wait_s=0.8, loadgen_wait_s=0.1)
        assert r.contention == pytest.approx(0.08)

    def test_companion_per_request(self) -> None:
        """The companion's CPU per answer, in microseconds."""
        assert result(companion_cpu_s=0.5).companion_us_per_req == 500.0
        assert result().companion_us_per_req is None

    def test_companion_signal_default(self) -> None:
        """A companion is only watched unless a signal is asked for."""
        assert Companion(123).signal is None


class TestCells:
    """Redis-backed cells: their names, key prefixes and memory twins."""

    def test_names(self) -> None:
        """Memory cells keep their names; Redis-backed ones say so."""
        assert Variant("overload", 1000).name == "overload 1k"
        assert Variant("overload", 1000, "redis").name == "overload 1k redis"
        assert Variant("normal", 100_000, "redis").group == "normal redis"

    def test_prefixes_valid_and_distinct(self) -> None:
        """Every cell writes its own keys, under a prefix policyd accepts."""
        prefixes = {
            redis_prefix(Variant(level, size, "redis"), suffix)
            for level in ("normal", "overload")
            for size in (1000, 1_000_000)
            for suffix in ("", " @abc1234")
        }
        assert len(prefixes) == 8
        for prefix in prefixes:
            assert key_prefix(prefix) == prefix

    def test_pairs(self) -> None:
        """A Redis-backed cell is paired with the memory cell of its level and size."""

        def server(variant: Variant, suffix: str = "") -> Server:
            return Server(variant.name + suffix, [], {}, 0, variant=variant)

        cells = [
            server(Variant("normal", 1000)),
            server(Variant("overload", 1000)),
            server(Variant("overload", 1000), " @abc"),
            server(Variant("overload", 1000, "redis")),
            server(Variant("overload", 1000, "redis"), " @abc"),
            server(Variant("normal", 100_000, "redis")),  # no memory twin
        ]
        pairs = [(m.name, r.name) for m, r in backend_pairs(cells)]
        assert pairs == [
            ("overload 1k", "overload 1k redis"),
            ("overload 1k @abc", "overload 1k redis @abc"),
        ]


class TestOptions:
    """The command line of the Redis runs."""

    def test_default_memory_only(self) -> None:
        """Without --backends nothing changes: memory only, no fault runs."""
        args = parse_args([])
        assert args.backend_list == ["memory"]
        assert args.faults == []

    def test_redis_faults(self) -> None:
        """With Redis the kill and pause windows run, unless turned off."""
        assert parse_args(["--backends", "memory,redis"]).faults == ["kill", "pause"]
        args = parse_args(["--backends", "redis", "--redis-faults", "none"])
        assert args.faults == []

    @pytest.mark.parametrize(
        "argv",
        [
            ["--backends", "memcached"],
            ["--backends", "redis", "--redis-faults", "crash"],
            ["--backends", "redis", "--fault-window", "0"],
        ],
    )
    def test_refused(self, argv: list[str]) -> None:
        """Unknown backends and faults, and empty windows, are errors."""
        with pytest.raises(SystemExit):
            parse_args(argv)
