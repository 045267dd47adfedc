"""Benchmark policyd against the bare Twisted DUNNO baseline, side by side.

One command::

    python bench/run.py [--duration S] [--concurrency 1,10,100,1000] [--quick]

starts ``bench/baseline.py`` and the target (``python -m policyd serve`` on
127.0.0.1) at the same time, then drives each with ``bench/loadgen.py`` at
each concurrency level.  The two servers take turns on every level (baseline,
target; on the next level or repeat target, baseline, and so on), so drift
and noise land on both alike.  It prints one table: req/s, server CPU
us/request, p50/p99 latency, errors, the load generator's own CPU, a noise
figure, and target/baseline ratios.  Each figure is the median over
``--repeat`` runs (3 by default) with the spread; each ratio is the median of
the back-to-back pairs.

Noise.  The box is shared (2 vCPUs; a test suite next door takes a whole
core at times), and such runs are worth nothing.  So each run records how
long the server and the load generator waited for a CPU that something else
held (run-queue wait from /proc/PID/task/*/schedstat); a run above
``--max-contention`` (5% of the window) is repeated up to ``--retries`` times
after waiting for the machine to be idle, and the least noisy attempt counts.
Rows that stayed noisy are flagged with "!".  Server CPU per request is far
less sensitive to noise than req/s and latency: compare that first.

Priority.  The runner lowers its nice value to -10 (``--nice``; needs root),
which its children inherit, so that a neighbour's test suite gets a small
share of the cores while a run lasts (bounded: minutes).

Placement.  Servers are pinned to the last CPU and the load generator (with
this runner) to the others (``--no-pin`` to disable): on a 2-vCPU VM the
single-connection rate doubled whenever the scheduler happened to put client
and server on one core, which made that level meaningless without pinning.

The target's environment is ``POLICYD_LISTEN=tcp:PORT:interface=127.0.0.1``,
``POLICYD_METRICS_LISTEN=none`` and ``POLICYD_LOG_LEVEL=warn`` (more with
``--target-env``).  ``--target baseline`` benchmarks a second baseline instead,
which shows the noise floor of the method (both ratios should be about 1).

Only loopback addresses are used; every load run is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import loadgen

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclasses.dataclass
class Server:
    """A server process under test, with its log captured to a file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log: IO[bytes]
    cpus: set[int] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> None:
        """Start the process and wait until it accepts connections."""
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.pin()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} on start:\n"
                    + self.log_tail()
                )
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                self.pin()  # again, for threads started before the first pin
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen within {timeout} s")

    def pin(self) -> None:
        """Bind every thread of the process to ``cpus`` (if set)."""
        if self.cpus is None or self.proc is None:
            return
        with contextlib.suppress(OSError):  # the process may be gone
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                with contextlib.suppress(OSError):  # the thread may be gone
                    os.sched_setaffinity(int(task.name), self.cpus)

    @property
    def pid(self) -> int:
        """The PID whose CPU time is measured."""
        assert self.proc is not None  # noqa: S101 - started
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        """Child processes, whose CPU time the measurement would miss."""
        kids: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*/children"):
            kids += [int(x) for x in task.read_text().split()]
        return kids

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the process wrote."""
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def set_priority(nice: int) -> str:
    """Set this process's nice value (inherited by servers and load generator).

    On a shared box a test suite next door competes for the cores; at nice
    -10 the scheduler gives our processes about nine times its weight, which
    cut the run-queue wait from 25-50% of a window to about 1% in our runs.
    Lowering the nice value needs root (CAP_SYS_NICE); without it the run
    goes on at the current priority.
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice == current:
        return f"nice {current}"
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        return f"nice {current} (not allowed to set {nice})"
    return f"nice {nice}"


def cpu_plan(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """CPUs for (the servers, the load generator), or (None, None): no pinning.

    Where the server and the client run decides the cost of every wake-up: on
    a 2-vCPU VM one connection gave 9k or 17k req/s from run to run depending
    on whether the scheduler had put both on one core.  Pinning the servers to
    the last CPU and the load generator to the others makes that the same for
    both servers and every run.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most *max_wait* s) until the machine is nearly idle; return the wait.

    Between runs our own servers are idle, so CPU busy now belongs to other
    processes (on a shared box: someone's test suite).  Starting a run in the
    middle of that only produces a noisy run to throw away.
    """
    start = time.monotonic()
    while True:
        before = loadgen.machine_cpu_seconds()
        time.sleep(0.5)
        after = loadgen.machine_cpu_seconds()
        waited = time.monotonic() - start
        if before is None or after is None:
            return waited
        busy_cores = (after[0] - before[0]) / 0.5
        if busy_cores < threshold or waited >= max_wait:
            return waited


def make_servers(
    args: argparse.Namespace, logdir: Path, cpus: set[int] | None
) -> list[Server]:
    """The baseline and the target, not yet started."""
    base_port, target_port = free_port(), free_port()
    env = dict(os.environ)
    baseline = Server(
        "baseline",
        [sys.executable, str(HERE / "baseline.py"), "--port", str(base_port)],
        env,
        base_port,
        (logdir / "baseline.log").open("wb"),
        cpus,
    )
    if args.target == "baseline":
        target = Server(
            "baseline2",
            [sys.executable, str(HERE / "baseline.py"), "--port", str(target_port)],
            env,
            target_port,
            (logdir / "baseline2.log").open("wb"),
            cpus,
        )
    else:
        tenv = dict(os.environ)
        tenv["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
        tenv.update(
            POLICYD_LISTEN=f"tcp:{target_port}:interface={HOST}",
            POLICYD_METRICS_LISTEN="none",
            POLICYD_LOG_LEVEL="warn",
        )
        for item in args.target_env:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--target-env wants KEY=VALUE, not {item!r}")
            tenv[key] = value
        target = Server(
            "policyd",
            [sys.executable, "-m", "policyd", "serve"],
            tenv,
            target_port,
            (logdir / "policyd.log").open("wb"),
            cpus,
        )
    return [baseline, target]


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    """Median and spread of one server at one concurrency across repeats."""

    server: str
    connections: int
    runs: list[loadgen.LoadResult]

    def _values(self, attr: str) -> list[float]:
        vals = [getattr(r, attr) for r in self.runs]
        return [float(v) for v in vals if v is not None]

    def median(self, attr: str) -> float | None:
        """Median of an attribute over the repeats (None if never measured)."""
        vals = self._values(attr)
        return statistics.median(vals) if vals else None

    def spread(self, attr: str) -> tuple[float, float] | None:
        """(min, max) of an attribute over the repeats."""
        vals = self._values(attr)
        return (min(vals), max(vals)) if vals else None

    @property
    def errors(self) -> int:
        """Errors over all repeats."""
        return sum(r.error_total for r in self.runs)

    @property
    def other_cores(self) -> float | None:
        """Median CPU used by neither the server nor the load generator.

        Approximate: /proc/stat is sampled per tick and the processes' times
        are not, so it can even read slightly negative.
        """
        vals = [
            r.machine_busy_cores - r.loadgen_cores - (r.server_cores or 0.0)
            for r in self.runs
            if r.machine_busy_cores is not None
        ]
        return statistics.median(vals) if vals else None

    @property
    def contention(self) -> float | None:
        """Worst CPU contention (run-queue wait share) of the repeats."""
        vals = [r.contention for r in self.runs if r.contention is not None]
        return max(vals) if vals else None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        attrs = ("rps", "server_us_per_req", "p50_us", "p99_us", "loadgen_cores")
        return {
            "server": self.server,
            "connections": self.connections,
            "median": {a: self.median(a) for a in attrs},
            "spread": {a: self.spread(a) for a in attrs},
            "errors": self.errors,
            "other_cores": self.other_cores,
            "contention": self.contention,
            "runs": [r.as_dict() for r in self.runs],
        }


def _num(v: float | None, fmt: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _spread_pct(s: Summary, attr: str) -> str:
    sp, med = s.spread(attr), s.median(attr)
    if sp is None or med is None or med == 0 or len(s.runs) < 2:
        return ""
    return f" ±{(sp[1] - sp[0]) / 2 / med:.0%}"


def paired_ratio(target: Summary, baseline: Summary, attr: str) -> float | None:
    """Median over repeats of target/baseline, each repeat's pair run back to back.

    Pairing cancels slow drift in the machine's speed better than a ratio of
    medians does.
    """
    ratios = []
    for t, b in zip(target.runs, baseline.runs, strict=False):
        tv, bv = getattr(t, attr), getattr(b, attr)
        if tv is not None and bv:
            ratios.append(tv / bv)
    return statistics.median(ratios) if ratios else None


def _ratio(t: Summary, b: Summary, attr: str) -> str:
    r = paired_ratio(t, b, attr)
    return "n/a" if r is None else f"{r:.2f}x"


def format_table(
    summaries: Sequence[Summary], baseline: str, target: str, max_contention: float
) -> str:
    """The comparison table: one row per server per level, then the ratios."""
    header = (
        f"{'conns':>5}  {'server':<9} {'req/s':>14} {'CPU us/req':>14} "
        f"{'p50 us':>9} {'p99 us':>9} {'errors':>6} {'loadgen':>7} {'noise':>6}"
    )
    lines = [header, "-" * len(header)]
    by = {(s.server, s.connections): s for s in summaries}
    noisy = 0
    for conns in sorted({s.connections for s in summaries}):
        rows = [by[k] for k in ((baseline, conns), (target, conns)) if k in by]
        for s in rows:
            rps = _num(s.median("rps")) + _spread_pct(s, "rps")
            cpu = _num(s.median("server_us_per_req"), ".1f") + _spread_pct(
                s, "server_us_per_req"
            )
            flag = "!" if (s.contention or 0.0) > max_contention else " "
            noisy += flag == "!"
            lines.append(
                f"{conns:>5}  {s.server:<9} {rps:>14} {cpu:>14} "
                f"{_num(s.median('p50_us')):>9} {_num(s.median('p99_us')):>9} "
                f"{s.errors:>6} {_num(s.median('loadgen_cores'), '.2f'):>7} "
                f"{_num(s.contention, '.1%'):>6}{flag}"
            )
        if len(rows) == 2:
            b, t = rows
            lines.append(
                f"{conns:>5}  {'ratio':<9} {_ratio(t, b, 'rps'):>14} "
                f"{_ratio(t, b, 'server_us_per_req'):>14} "
                f"{_ratio(t, b, 'p50_us'):>9} {_ratio(t, b, 'p99_us'):>9}"
            )
        lines.append("")
    lines += [
        "req/s and CPU us/req: median over repeats, ± half the min-max spread.",
        "CPU us/req: the server's utime+stime in the window / requests answered.",
        "loadgen: cores the load generator itself used (near 1.00 would make it",
        "the bottleneck). noise: worst share of a window that the server or the",
        "load generator waited for a CPU held by something else (run-queue wait).",
        "ratio: target/baseline, median of the back-to-back pairs of each repeat.",
    ]
    if noisy:
        lines.append(
            f"! {noisy} rows stayed noisier than --max-contention "
            f"{max_contention:.0%} after retries: their req/s and latencies are "
            "unreliable; CPU us/req suffers much less."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; --quick shortens the defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, help="measured s per run [5; quick 2]"
    )
    parser.add_argument(
        "--warmup", type=float, help="unmeasured s per run [1; quick 0.5]"
    )
    parser.add_argument(
        "--concurrency",
        default="1,10,100,1000",
        help="comma-separated connection counts [1,10,100,1000]",
    )
    parser.add_argument(
        "--repeat", type=int, help="runs per server and level [3; quick 1]"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--target",
        choices=("policyd", "baseline"),
        default="policyd",
        help="what to compare with the baseline [policyd]",
    )
    parser.add_argument(
        "--target-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the policyd target (repeatable)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="nice value for the servers and the load generator, so that other "
        "processes on the box disturb less (below the current value needs "
        "root; pass the current value, usually 0, to leave it) [-10]",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin servers and client to CPUs"
    )
    parser.add_argument(
        "--max-contention",
        type=float,
        default=0.05,
        help="repeat a run whose server or client waited for a CPU longer than "
        "this share of the window (noise from other processes) [0.05]",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="repeats of a noisy run, at most [2]"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before repeating a noisy run, wait up to this many s for the "
        "machine to be idle (before a first run: up to 2 s) [10]",
    )
    parser.add_argument("--engine", choices=loadgen.ENGINES, default="auto")
    parser.add_argument("--timeout", type=float, default=10.0, help="reply timeout, s")
    parser.add_argument("--json", metavar="FILE", help="also write all results here")
    parser.add_argument(
        "--start-timeout", type=float, default=30.0, help="s to wait for a server"
    )
    loadgen.add_pool_arguments(parser)
    args = parser.parse_args(argv)
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.warmup = (
        args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    )
    args.repeat = args.repeat or (1 if args.quick else 3)
    try:
        args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        parser.error("--concurrency wants comma-separated integers")
    if not args.levels or min(args.levels) < 1:
        parser.error("--concurrency wants positive integers")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whole comparison and print the table."""
    args = parse_args(argv)
    # Every connection is a descriptor in both the load generator and the
    # server; children inherit the raised limit.
    need = max(args.levels) + 256
    have = loadgen.raise_fd_limit(need)
    if have < need:
        print(f"warning: RLIMIT_NOFILE is {have}, below the {need} needed", flush=True)

    args.priority = set_priority(args.nice)
    server_cpus, loadgen_cpus = cpu_plan(not args.no_pin)
    if loadgen_cpus is not None:
        # Inherited by the load generator, which runs as this process's child.
        os.sched_setaffinity(0, loadgen_cpus)
    args.pinning = "no CPU pinning"
    if server_cpus is not None and loadgen_cpus is not None:
        args.pinning = (
            f"servers on CPU {sorted(server_cpus)}, "
            f"load generator on CPU {sorted(loadgen_cpus)}"
        )

    with tempfile.TemporaryDirectory(prefix="policyd-bench-logs-") as tmp:
        servers = make_servers(args, Path(tmp), server_cpus)
        try:
            return _run(args, servers)
        finally:
            for s in servers:
                s.stop()
                s.log.close()


def measure(
    gen: loadgen.LoadGenerator,
    server: Server,
    conns: int,
    tag: str,
    args: argparse.Namespace,
) -> loadgen.LoadResult | None:
    """One load run, repeated while it is noisy; the least noisy attempt.

    None if the server died.
    """
    best: loadgen.LoadResult | None = None
    for attempt in range(args.retries + 1):
        if not server.alive():
            print(f"{server.name} died:\n{server.log_tail()}", file=sys.stderr)
            return None
        # Also lets the previous run's connections drain.
        wait_for_quiet(args.quiet_wait if attempt else 2.0)
        res = gen.run(
            host=HOST,
            port=server.port,
            connections=conns,
            duration=args.duration,
            warmup=args.warmup,
            timeout=args.timeout,
            server_pid=server.pid,
        )
        noisy = (res.contention or 0.0) > args.max_contention
        again = "  (noisy, again)" if noisy and attempt < args.retries else ""
        print(
            f"  {tag} {server.name:<9} c={conns:<5} {res.rps:>9,.0f} req/s  "
            f"{loadgen.format_optional(res.server_us_per_req)} us/req  "
            f"p99 {res.p99_us:,.0f} us  errors {res.error_total}  "
            f"loadgen {res.loadgen_cores:.2f} cores  "
            f"noise {loadgen.format_optional(res.contention, '.1%')}{again}",
            flush=True,
        )
        if best is None or (res.contention or 0.0) < (best.contention or 0.0):
            best = res
        if not noisy:
            break
    return best


def _run(args: argparse.Namespace, servers: list[Server]) -> int:
    baseline, target = servers
    print(
        f"generating {args.pool:,} requests; starting {baseline.name} (port "
        f"{baseline.port}) and {target.name} (port {target.port})",
        flush=True,
    )
    with loadgen.LoadGenerator(loadgen.pool_options(args), args.engine) as gen:
        for s in servers:
            s.start(args.start_timeout)
        print(
            f"engine {gen.engine}; {args.repeat} x {len(args.levels)} levels x 2 "
            f"servers, {args.warmup:g} s warm-up + {args.duration:g} s each; "
            f"{args.pinning}; {args.priority}",
            flush=True,
        )
        results: dict[tuple[str, int], list[loadgen.LoadResult]] = {}
        for rep in range(args.repeat):
            for i, conns in enumerate(args.levels):
                # Alternate who goes first so drift and noise hit both alike.
                order = servers if (rep + i) % 2 == 0 else servers[::-1]
                for s in order:
                    res = measure(gen, s, conns, f"[{rep + 1}/{args.repeat}]", args)
                    if res is None:
                        return 1
                    results.setdefault((s.name, conns), []).append(res)
        for s in servers:
            if s.alive() and s.children():
                print(
                    f"warning: {s.name} has child processes; their CPU is not counted"
                )
            tail = [
                line
                for line in s.log_tail(6).splitlines()
                if not line.startswith("baseline listening on")
            ]
            if tail:
                print(f"{s.name} logged (last lines):", *tail, sep="\n  ")
    summaries = [Summary(name, c, runs) for (name, c), runs in results.items()]
    print()
    print(format_table(summaries, baseline.name, target.name, args.max_contention))
    if args.json:
        payload = {
            "engine": gen.engine,
            "duration": args.duration,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "pinning": args.pinning,
            "priority": args.priority,
            "pool": dataclasses.asdict(loadgen.pool_options(args)),
            "baseline": baseline.name,
            "target": target.name,
            "summaries": [s.as_dict() for s in summaries],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
