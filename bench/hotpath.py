"""In-process cost of one request, policyd against the baseline.

policyd's protocol and decision path and the baseline's LineOnlyReceiver are
fed the same requests through a StringTransport, with no sockets or reactor.

This isolates the Python work per request that the socket benchmark
(`bench/run.py`) cannot separate from the reactor's own cost.  Run:
``python bench/hotpath.py [--level normal|overload] [--profile]``.

What a serving policyd does besides answering is kept: its clock advances
as at ``--rate`` requests a second, the sweeper runs once a simulated
second (expiring busy connections, re-evaluating the level), refusals are
logged at the default limit through policyd's text observer (to
/dev/null), and the garbage collector runs (`timeit` would switch it off),
with the thresholds `policyd serve` sets.

``--cold`` times each request on its own after copying 64 MiB (more than
any last-level cache), so that little of policyd, Twisted or CPython's own
code is left in the caches: what a paced server pays when every request
is a wake-up of its own (`bench/run.py --paced`).  Each of three passes
over ``--cold-requests`` requests gives a mean; the median is reported.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import statistics
import time
import timeit
from typing import Any

from baseline import DunnoProtocol
from loadgen import PoolOptions, build_pool
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner

from policyd import config as config_module
from policyd.cli import tune_collector
from policyd.logs import make_observer
from policyd.server import PolicyServer


def _requests(count: int, clients: int) -> list[bytes]:
    sessions = build_pool(PoolOptions(requests=count, clients=clients))
    return [request for session in sessions for request in session][:count]


def main(argv: list[str] | None = None) -> int:
    """Print µs per request for the baseline and policyd."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", choices=("normal", "overload"), default="normal")
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument(
        "--addresses",
        choices=("pool", "fresh"),
        default="pool",
        help="pool: 2,000 requests from 500 clients, replayed; fresh: 60,000 "
        "requests, about one client per session, through a table of 1,000 "
        "clients (each comes back as a stranger: evicted, and out of every cache)",
    )
    parser.add_argument(
        "--rate", type=int, default=20_000, help="simulated requests per second"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="time each request after evicting the CPU caches (a paced server "
        "wakes for each request with little of itself in cache)",
    )
    parser.add_argument(
        "--cold-requests", type=int, default=1000, help="requests timed with --cold"
    )
    parser.add_argument(
        "--cold-mb", type=int, default=64, help="MiB copied to evict the caches"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile policyd")
    parser.add_argument("--sort", default="tottime", help="profile order")
    parser.add_argument("--top", type=int, default=25, help="profile lines")
    args = parser.parse_args(argv)
    capacity = "1000000" if args.level == "normal" else "1"
    env = {
        "POLICYD_SMTPD_CAPACITY": capacity,
        "POLICYD_LEVEL_MIN_DWELL": "3600s",
        "POLICYD_REFUSAL_LOG_LIMIT": "100",
    }
    if args.addresses == "fresh":
        env["POLICYD_MAX_TRACKED_CLIENTS"] = "1000"
    config = config_module.load(env)
    clock = Clock()
    clock.advance(1_000_000)
    server = PolicyServer(config, clock, CollectorRegistry())
    size, clients = (2000, 500) if args.addresses == "pool" else (60_000, 60_000)
    pool = _requests(size, clients)
    devnull = open(os.devnull, "w")  # noqa: SIM115 - for the whole run
    globalLogBeginner.beginLoggingTo(
        [make_observer(config.log_level, config.log_format, devnull)],
        redirectStandardIO=False,
    )
    tune_collector()
    # The clock moves a simulated second every `rate` requests, and the
    # sweeper runs then (for both servers: the same harness cost).
    rate = args.rate
    sweep = server.factory.sweep

    def feed(protocol: Any, transport: StringTransport) -> None:
        receive = protocol.dataReceived
        clear: Any = transport.clear
        count = 0
        for request in pool:
            receive(request)
            clear()
            count += 1
            if count == rate:
                count = 0
                clock.advance(1.0)
                sweep()

    def cold(protocol: Any, transport: StringTransport) -> float:
        """Mean µs of one request when the CPU caches hold none of policyd."""
        evict = bytearray(args.cold_mb << 20)
        zeros = bytes(len(evict))
        total = 0
        requests = pool[: args.cold_requests]
        for request in requests:
            evict[:] = zeros  # a memory copy larger than the last-level cache
            # The request's bytes arrive fresh, as from recv().
            fresh = bytes(bytearray(request))
            start = time.perf_counter_ns()
            protocol.dataReceived(fresh)
            total += time.perf_counter_ns() - start
            transport.clear()
        return total / len(requests) / 1000

    results = {}
    for name in ("baseline", "policyd"):
        if name == "baseline":
            protocol: Any = DunnoProtocol()
        else:
            protocol = server.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        rounds = max(1, args.requests // len(pool))
        feed(protocol, transport)
        if args.profile and name == "policyd":
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(rounds):
                feed(protocol, transport)
            profiler.disable()
            stats = pstats.Stats(profiler).sort_stats(args.sort)
            stats.print_stats(args.top)
        if args.cold:
            results[name] = statistics.median(
                cold(protocol, transport) for _ in range(3)
            )
            print(f"{name:9s} {results[name]:6.2f} us/request, cold", flush=True)
            continue
        timer = timeit.Timer(
            functools.partial(feed, protocol, transport), setup="gc.enable()"
        )
        best = min(timer.repeat(number=rounds, repeat=5))
        results[name] = best / (rounds * len(pool)) * 1e6
        print(f"{name:9s} {results[name]:6.2f} us/request", flush=True)
    print(f"policyd - baseline {results['policyd'] - results['baseline']:.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
