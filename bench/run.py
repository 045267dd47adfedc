"""Benchmark policyd against the bare Twisted DUNNO baseline, side by side.

One command::

    python bench/run.py                 # the full matrix, about 12 minutes
    python bench/run.py --quick         # a smoke run, under 2 minutes

runs ``bench/baseline.py`` and ``python -m policyd serve`` (on 127.0.0.1) at
the same time and drives each with ``bench/loadgen.py`` over a matrix of

* concurrency (``--concurrency``, 1,10,100,1000 connections),
* stress level (``--levels``, normal,overload): one policyd per level.
  *normal* runs with ``POLICYD_SMTPD_CAPACITY=1000000``, so the load never
  lifts the level; *overload* with ``POLICYD_SMTPD_CAPACITY=1`` and
  ``POLICYD_LEVEL_MIN_DWELL=3600s``, so the first busy connection forces the
  level to overload and it stays there for the whole run.  Every policyd
  answers ``/metrics`` on a port it picks (read from its log); the runner
  scrapes ``policyd_stress_level`` after each window and shows it per row,
  with the share of refusals (4xx/5xx, REJECT, DEFER) among the replies.
* tracked clients (``--tracked``, 1k,1m; 1k with ``--quick``): one policyd
  per level and size.  Before measuring, each is made to track about N
  distinct clients: first N minus the measured pool's clients one-request
  sessions of distinct clean clients (``loadgen.build_fill_sessions``) over
  100 connections, then one pass over the measured pool, so the measured
  clients are known too.  ``POLICYD_MAX_TRACKED_CLIENTS`` is raised to 2 N
  (at least its default).  ``policyd_tracked_clients`` confirms the count and
  ``/proc/PID/status`` gives the RSS after the warm-up; the difference between
  the largest and the smallest size gives the bytes per tracked client.

policyd runs at its default log level (info), so at overload the one log
event per refusal is part of what is measured.  Its stdout and stderr go to a
pipe that a thread of this runner drains (like journald would), keeping only
the last lines and a count; the runner's own CPU is on the load generator's
core, outside both measured figures.

All servers stay up for the whole run.  At each concurrency level and repeat
every server is measured once, back to back, in an order that rotates from
one block to the next, so drift and noise land on all alike; each ratio to
the baseline is the median over repeats of the pair from the same block.
Each figure is the median over ``--repeat`` runs (3 by default) with the
spread.

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

``--compare DIR`` also runs the policyd of another checkout (a ``git
worktree`` of an older commit, say) at every level and table size, in the
same rotation, labelled with its commit: a before/after comparison measured
in the same blocks, with the same baseline.

``--backends memory,redis`` adds a Redis-backed policyd per level and size
(``POLICYD_BACKEND=redis``), in the same rotation: one private redis-server
(``redisbench.BenchRedis``, no persistence) pinned with the servers, each
policyd under its own ``POLICYD_REDIS_PREFIX``.  The load generator reads
redis-server's CPU over each window of such a cell ("redis" us/req, apart
from policyd's); Redis's memory per key is read after each warm-up; a table
compares each Redis-backed cell with its memory twin.  After the matrix,
``--redis-faults kill,pause`` measures a window that begins when the load
generator sends redis-server SIGKILL (SIGSTOP), at each level.

``--paced`` measures open-loop load instead of saturated connections (see
"Paced load" below and bench/README.md): each cell ``CONNSxRATE`` is CONNS
connections each sending RATE requests a second on a jittered schedule of its
own, as smtpd processes do, the same offered rate for the baseline and every
policyd; client addresses are fresh (a new client every session) or drawn from
a pool (``--addresses``).  The figure to read is the server's CPU per request
at that rate against the baseline's: at a few thousand requests a second each
request is a wake-up of its own, a cost saturated runs hide.

``--target-env KEY=VALUE`` adds to every policyd's environment (after the
runner's own settings, so it can override them).  ``--target baseline``
benchmarks a second baseline instead of policyd, which shows the noise floor
of the method (both ratios should be about 1).

Only loopback addresses are used; every load run is bounded in time, and so
is every warm-up and scrape.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import loadgen
import redisbench

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
LEVEL_NAMES = ("normal", "elevated", "overload")
LEVEL_ENV = {
    # The load ratio is busy connections / capacity: 100 busy benchmark
    # connections are 0.0001 of a million (normal) and 100 of one (overload).
    "normal": {"POLICYD_SMTPD_CAPACITY": "1000000"},
    "overload": {"POLICYD_SMTPD_CAPACITY": "1", "POLICYD_LEVEL_MIN_DWELL": "3600s"},
}
DEFAULT_MAX_TRACKED = 100_000
FILL_CHUNK = 100_000
FILL_CONNECTIONS = 100
LOG_KEEP = 200


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def parse_size(text: str) -> int:
    """``1000``, ``1k``, ``100k`` or ``1m`` as a number."""
    t = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def size_label(n: int) -> str:
    """The short form of a client count: 1k, 1M, 2500."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a policyd under test is set up for: level, table size, backend."""

    level: str
    tracked: int
    backend: str = "memory"

    @property
    def group(self) -> str:
        """The level and backend, e.g. ``overload`` or ``overload redis``."""
        return self.level + ("" if self.backend == "memory" else f" {self.backend}")

    @property
    def name(self) -> str:
        """Row label, e.g. ``overload 1M`` (memory) or ``overload 1M redis``."""
        suffix = "" if self.backend == "memory" else f" {self.backend}"
        return f"{self.level} {size_label(self.tracked)}{suffix}"


@dataclasses.dataclass
class Server:
    """A server process under test; a thread drains its output."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    cpus: set[int] | None = None
    variant: Variant | None = None
    #: Where it runs (`python -m` imports from there): this checkout or
    #: the one given with ``--compare``.
    cwd: Path = REPO
    #: The Redis a Redis-backed policyd shares its clients in, and its prefix.
    redis: redisbench.BenchRedis | None = None
    redis_prefix: str = ""
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int | None = None
    lines: int = 0
    tail: collections.deque[str] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=LOG_KEEP)
    )
    warmup: dict[str, Any] = dataclasses.field(default_factory=dict)
    _reader: threading.Thread | None = None

    def start(self, timeout: float) -> None:
        """Start the process and wait until it accepts connections."""
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.pin()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} on start:\n"
                    + self.log_tail()
                )
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
            except OSError:
                time.sleep(0.1)
                continue
            self.pin()  # again, for threads started before the first pin
            if self.variant is None:
                return
            # policyd logs the metrics port it bound (POLICYD_METRICS_LISTEN
            # asks for port 0) before it runs.
            while time.monotonic() < deadline and self.metrics_port is None:
                self.metrics_port = self._metrics_port_from_log()
                if self.metrics_port is None:
                    time.sleep(0.1)
            if self.metrics_port is None:
                raise RuntimeError(
                    f"{self.name}: no 'Metrics listening on' line in its log:\n"
                    + self.log_tail()
                )
            return
        raise RuntimeError(f"{self.name} did not listen within {timeout} s")

    def _drain(self) -> None:
        assert self.proc is not None  # noqa: S101 - started
        assert self.proc.stdout is not None  # noqa: S101 - a pipe
        for raw in self.proc.stdout:
            self.lines += 1
            self.tail.append(raw.decode(errors="replace").rstrip("\n"))

    def _metrics_port_from_log(self) -> int | None:
        for line in list(self.tail):
            m = re.search(r"Metrics listening on [^ ]*:(\d+)", line)
            if m:
                return int(m.group(1))
        return None

    def pin(self) -> None:
        """Bind every thread of the process to ``cpus`` (if set)."""
        if self.proc is not None:
            redisbench.pin(self.proc.pid, self.cpus)

    def companion(self, signal: int | None = None) -> loadgen.Companion | None:
        """Its redis-server, for the load generator to watch (None: no Redis)."""
        if self.redis is None or not self.redis.alive():
            return None
        return loadgen.Companion(self.redis.pid, signal)

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
        return "\n".join(list(self.tail)[-lines:])

    def rss_bytes(self) -> int | None:
        """Resident set size now (``VmRSS`` of ``/proc/PID/status``)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None

    def scrape(self, timeout: float = 5.0) -> dict[str, float]:
        """The ``/metrics`` of policyd as {name with labels: value}, or {}."""
        if self.metrics_port is None:
            return {}
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
        return values

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
        if self._reader is not None:
            self._reader.join(5)


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
    args: argparse.Namespace,
    variants: Sequence[Variant],
    cpus: set[int] | None,
    redis: redisbench.BenchRedis | None = None,
) -> list[Server]:
    """The baseline, then the targets, not yet started.

    A Redis-backed variant uses *redis*, under a prefix of its own.
    """
    env = dict(os.environ)
    servers: list[Server] = []
    names = ["baseline"] + (["baseline2"] if args.target == "baseline" else [])
    for name in names:
        port = free_port()
        servers.append(
            Server(
                name,
                [sys.executable, str(HERE / "baseline.py"), "--port", str(port)],
                env,
                port,
                cpus,
            )
        )
    if args.target == "baseline":
        return servers
    checkouts = [(REPO, "")]
    if args.compare:
        other = Path(args.compare).resolve()
        if not (other / "policyd" / "__init__.py").is_file():
            raise SystemExit(f"--compare {args.compare}: no policyd checkout there")
        checkouts.append((other, " @" + checkout_label(other)))
    for variant in variants:
        for checkout, suffix in checkouts:
            port = free_port()
            tenv = dict(os.environ)
            tenv["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(checkout), os.environ.get("PYTHONPATH", "")) if p
            )
            tenv.update(
                POLICYD_LISTEN=f"tcp:{port}:interface={HOST}",
                POLICYD_METRICS_LISTEN=f"tcp:0:interface={HOST}",
                POLICYD_LOG_LEVEL="info",
                POLICYD_MAX_TRACKED_CLIENTS=str(
                    max(DEFAULT_MAX_TRACKED, 2 * variant.tracked)
                ),
                **LEVEL_ENV[variant.level],
            )
            prefix = ""
            if variant.backend == "redis":
                if redis is None:
                    raise SystemExit("a Redis-backed policyd needs the Redis")
                prefix = redis_prefix(variant, suffix)
                tenv.update(
                    POLICYD_BACKEND="redis",
                    POLICYD_REDIS_URL=redis.url,
                    POLICYD_REDIS_PREFIX=prefix,
                )
            for item in args.target_env:
                key, sep, value = item.partition("=")
                if not sep:
                    raise SystemExit(f"--target-env wants KEY=VALUE, not {item!r}")
                tenv[key] = value
            servers.append(
                Server(
                    variant.name + suffix,
                    [sys.executable, "-m", "policyd", "serve"],
                    tenv,
                    port,
                    cpus,
                    variant,
                    checkout,
                    redis if variant.backend == "redis" else None,
                    prefix,
                )
            )
    return servers


def redis_prefix(variant: Variant, suffix: str = "") -> str:
    """The POLICYD_REDIS_PREFIX of a Redis-backed cell: its own keys in the Redis.

    *suffix* is the ``--compare`` checkout's label (`` @abc1234``).
    """
    label = f"{variant.level}-{size_label(variant.tracked)}{suffix.strip()}"
    return f"bench:{label}:"


def checkout_label(path: Path) -> str:
    """The short commit checked out at *path*, or its directory name."""
    git = shutil.which("git")
    if git is None:
        return path.name
    try:
        out = subprocess.run(
            [git, "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return path.name
    return out.stdout.strip() or path.name


# ---------------------------------------------------------------------------
# Warm-up: make a policyd track about N clients
# ---------------------------------------------------------------------------


def fill(
    gen: loadgen.LoadGenerator,
    server: Server,
    pool_clients: int,
    args: argparse.Namespace,
    pool_pass: bool = True,
) -> None:
    """Make *server* track about ``variant.tracked`` clients; record what it took.

    N minus the measured pool's clients as one-request sessions of distinct
    clean clients, in chunks, then one pass over the measured pool (unless
    not *pool_pass*: paced runs must not show policyd their clients before
    they come; then *pool_clients* is 0).  Every chunk is bounded in time (at
    least 1,000 req/s, or it gives up).
    """
    assert server.variant is not None  # noqa: S101 - only policyd is filled
    t0 = time.monotonic()
    redis = server.redis
    redis_before = redis.used_memory() if redis is not None else None
    keys_before = len(redis.client_keys(server.redis_prefix)) if redis else 0
    extra = max(0, server.variant.tracked - pool_clients)
    sent = errors = 0
    while sent < extra:
        n = min(FILL_CHUNK, extra - sent)
        res = gen.run(
            host=HOST,
            port=server.port,
            connections=FILL_CONNECTIONS,
            duration=n / 1000 + 5,
            warmup=0,
            count=n,
            timeout=args.timeout,
            server_pid=server.pid,
            sessions=loadgen.build_fill_sessions(sent, n),
        )
        sent += res.completed
        errors += res.error_total
        if res.completed < n:
            print(f"  {server.name}: fill chunk answered {res.completed:,} of {n:,}")
            break
    pool_requests = 0
    if pool_pass:
        res = gen.run(
            host=HOST,
            port=server.port,
            connections=FILL_CONNECTIONS,
            duration=gen.n_requests / 1000 + 5,
            warmup=0,
            count=gen.n_requests,
            timeout=args.timeout,
            server_pid=server.pid,
        )
        errors += res.error_total
        pool_requests = res.completed
    if redis is not None:
        wait_written(server)
    metrics = server.scrape()
    server.warmup = {
        "fill_requests": sent,
        "pool_requests": pool_requests,
        "errors": errors,
        "seconds": time.monotonic() - t0,
        "tracked_clients": metrics.get("policyd_tracked_clients"),
        "evictions": metrics.get("policyd_client_evictions_total"),
        "rss_bytes": server.rss_bytes(),
    }
    w = server.warmup
    extra_text = ""
    if redis is not None:
        keys = redis.client_keys(server.redis_prefix)
        redis_after = redis.used_memory()
        written = len(keys) - keys_before
        w.update(
            redis_keys=len(keys),
            redis_keys_written=written,
            redis_used_memory_before=redis_before,
            redis_used_memory_after=redis_after,
            redis_bytes_per_key=redisbench.per_item(redis_before, redis_after, written),
            redis_memory_usage_sample=redis.memory_usage(keys),
            backend_fallbacks=redisbench.metric_total(
                metrics, "policyd_backend_fallbacks_total"
            ),
        )
        extra_text = (
            f"; Redis keys {len(keys):,}, "
            f"{_num(w['redis_bytes_per_key'])} B each (used_memory), "
            f"MEMORY USAGE {_num(w['redis_memory_usage_sample'])} B"
        )
    print(
        f"  {server.name}: warm-up {sent:,} fill + {pool_requests:,} pool requests "
        f"in {w['seconds']:.0f} s, errors {errors}; tracked clients "
        f"{_num(w['tracked_clients'])}, evictions {_num(w['evictions'])}, "
        f"RSS {_num(_mb(w['rss_bytes']), '.1f')} MB{extra_text}",
        flush=True,
    )


def wait_written(server: Server, limit: float = 10.0) -> bool:
    """Wait (at most *limit* s) until a Redis-backed policyd has written everything.

    That is: its backend is up and no client's update is pending.
    """
    deadline = time.monotonic() + limit
    while True:
        metrics = server.scrape()
        up = redisbench.metric_total(metrics, "policyd_backend_up")
        pending = metrics.get("policyd_backend_pending_clients")
        if up == 1 and pending == 0:
            return True
        if time.monotonic() > deadline:
            print(
                f"  {server.name}: backend up {_num(up)}, {_num(pending)} clients "
                f"still pending after {limit:g} s",
                flush=True,
            )
            return False
        time.sleep(0.1)


def _mb(n: float | None) -> float | None:
    return None if n is None else n / 2**20


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def is_refusal(action: str) -> bool:
    """Whether an action (its first word, upper-cased) refuses the request."""
    return (action[:1] in "45" and action[:3].isdigit()) or action.startswith(
        ("REJECT", "DEFER")
    )


@dataclasses.dataclass
class Run:
    """One measured window of one server, with what policyd said about it."""

    result: loadgen.LoadResult
    level: float | None = None
    """``policyd_stress_level`` scraped right after the window."""
    tracked: float | None = None
    """``policyd_tracked_clients`` scraped right after the window."""
    log_lines: int = 0
    """Lines the server wrote during the run (warm-up and window)."""
    fallbacks: float | None = None
    """Decisions made without Redis in the run (``policyd_backend_fallbacks_total``
    after minus before; Redis-backed policyd only)."""
    backend_errors: dict[str, float] = dataclasses.field(default_factory=dict)
    """``policyd_backend_errors_total`` by reason, after minus before."""
    reused: bool = False
    """Paced: the run went past the end of the pool, so its server saw some
    sessions (clients) a second time (see `Cursor`)."""

    @property
    def fallback_share(self) -> float | None:
        """Fallbacks per request answered in the run (warm-up and window)."""
        n = self.result.completed + self.result.warmup_completed
        return redisbench.share(self.fallbacks, n)

    @property
    def refused_share(self) -> float | None:
        """Share of the window's replies that refused (4xx/5xx, REJECT, DEFER)."""
        total = sum(self.result.actions.values())
        if not total:
            return None
        return sum(v for k, v in self.result.actions.items() if is_refusal(k)) / total

    @property
    def log_per_req(self) -> float | None:
        """Log lines per request answered in the run."""
        n = self.result.completed + self.result.warmup_completed
        return self.log_lines / n if n else None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            **self.result.as_dict(),
            "stress_level": self.level,
            "tracked_clients": self.tracked,
            "log_lines": self.log_lines,
            "refused_share": self.refused_share,
            "backend_fallbacks": self.fallbacks,
            "backend_errors": self.backend_errors,
            "reused": self.reused,
        }


@dataclasses.dataclass
class Summary:
    """Median and spread of one server at one concurrency across repeats.

    Paced, one server in one cell: *rate* per connection and *addresses*.
    """

    server: str
    connections: int
    runs: list[Run]
    rate: float = 0.0
    addresses: str = ""

    def _values(self, attr: str) -> list[float]:
        vals = []
        for r in self.runs:
            v = getattr(r.result, attr) if hasattr(r.result, attr) else getattr(r, attr)
            if v is not None:
                vals.append(float(v))
        return vals

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
        return sum(r.result.error_total for r in self.runs)

    @property
    def fallbacks(self) -> float | None:
        """Decisions made without Redis over all repeats (None: no Redis)."""
        vals = [r.fallbacks for r in self.runs if r.fallbacks is not None]
        return sum(vals) if vals else None

    @property
    def backend_errors(self) -> dict[str, float]:
        """Backend errors by reason over all repeats."""
        total: collections.Counter[str] = collections.Counter()
        for r in self.runs:
            total.update(r.backend_errors)
        return {k: v for k, v in total.items() if v}

    @property
    def contention(self) -> float | None:
        """Worst CPU contention (run-queue wait share) of the repeats."""
        vals = [r.result.contention for r in self.runs]
        known = [v for v in vals if v is not None]
        return max(known) if known else None

    @property
    def levels_seen(self) -> str:
        """The stress level(s) policyd reported after the windows."""
        seen = {r.level for r in self.runs if r.level is not None}
        if not seen:
            return "-"
        names = [
            LEVEL_NAMES[int(v)] if v in (0, 1, 2) else str(v) for v in sorted(seen)
        ]
        return "/".join(names)

    @property
    def actions(self) -> dict[str, int]:
        """The replies of all repeats, by action."""
        total: collections.Counter[str] = collections.Counter()
        for r in self.runs:
            total.update(r.result.actions)
        return dict(total.most_common())

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        attrs = (
            "rps",
            "server_us_per_req",
            "p50_us",
            "p90_us",
            "p99_us",
            "max_us",
            "loadgen_cores",
            "loadgen_us_per_req",
            "refused_share",
            "log_per_req",
            "companion_us_per_req",
            "fallback_share",
            "offered_rps",
            "late_share",
        )
        return {
            "server": self.server,
            "connections": self.connections,
            "rate": self.rate,
            "addresses": self.addresses,
            "reused": any(r.reused for r in self.runs),
            "median": {a: self.median(a) for a in attrs},
            "spread": {a: self.spread(a) for a in attrs},
            "errors": self.errors,
            "backend_fallbacks": self.fallbacks,
            "backend_errors": self.backend_errors,
            "contention": self.contention,
            "stress_levels_seen": self.levels_seen,
            "actions": self.actions,
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
    """Median over repeats of target/baseline, each pair from the same block.

    Pairing cancels slow drift in the machine's speed better than a ratio of
    medians does.
    """
    ratios = []
    for t, b in zip(target.runs, baseline.runs, strict=False):
        tv, bv = getattr(t.result, attr), getattr(b.result, attr)
        if tv is not None and bv:
            ratios.append(tv / bv)
    return statistics.median(ratios) if ratios else None


def _ratio(t: Summary, b: Summary, attr: str) -> str:
    r = paired_ratio(t, b, attr)
    return "n/a" if r is None else f"{r:.2f}x"


def format_table(
    summaries: Sequence[Summary], order: Sequence[str], max_contention: float
) -> str:
    """The comparison table: one row per server per concurrency, with ratios."""
    w = max(20, *(len(name) for name in order))  # --compare adds " @commit"
    header = (
        f"{'conns':>5}  {'server':<{w}} {'req/s':>13} {'x base':>6} "
        f"{'CPU us/req':>12} {'x base':>6} {'redis':>6} {'p50 us':>7} {'p99 us':>7} "
        f"{'errors':>6} {'loadgen':>7} {'noise':>6}  {'level':<8} {'refused':>7} "
        f"{'log/req':>7}"
    )
    lines = [header, "-" * len(header)]
    by = {(s.server, s.connections): s for s in summaries}
    noisy = 0
    base_name = order[0]
    for conns in sorted({s.connections for s in summaries}):
        base = by.get((base_name, conns))
        for name in order:
            s = by.get((name, conns))
            if s is None:
                continue
            rps = _num(s.median("rps")) + _spread_pct(s, "rps")
            cpu = _num(s.median("server_us_per_req"), ".1f") + _spread_pct(
                s, "server_us_per_req"
            )
            x_rps = x_cpu = ""
            if base is not None and s is not base:
                x_rps = _ratio(s, base, "rps")
                x_cpu = _ratio(s, base, "server_us_per_req")
            flag = "!" if (s.contention or 0.0) > max_contention else " "
            noisy += flag == "!"
            redis_cpu = s.median("companion_us_per_req")
            lines.append(
                f"{conns:>5}  {s.server:<{w}} {rps:>13} "
                f"{x_rps:>6} "
                f"{cpu:>12} "
                f"{x_cpu:>6} "
                f"{'' if redis_cpu is None else format(redis_cpu, '.1f'):>6} "
                f"{_num(s.median('p50_us')):>7} {_num(s.median('p99_us')):>7} "
                f"{s.errors:>6} {_num(s.median('loadgen_cores'), '.2f'):>7} "
                f"{_num(s.contention, '.1%'):>6}{flag} {s.levels_seen:<8} "
                f"{_num(s.median('refused_share'), '.1%'):>7} "
                f"{_num(s.median('log_per_req'), '.3f'):>7}"
            )
        lines.append("")
    lines += [
        "req/s and CPU us/req: median over repeats, ± half the min-max spread;",
        "x base: the server's figure / the baseline's, median of the pairs measured",
        "in the same block. CPU us/req: the server's utime+stime in the window /",
        "requests answered; redis: the same for the redis-server of a Redis-backed",
        "policyd (not in CPU us/req). loadgen: cores the load generator used (near",
        "1.00 would make it the bottleneck). noise: worst share of a window that",
        "the server or the load generator waited for a CPU held by something else.",
        "level: policyd_stress_level scraped after each window. refused: share of",
        "replies that refused (4xx/5xx). log/req: lines policyd logged per request.",
    ]
    if noisy:
        lines.append(
            f"! {noisy} rows stayed noisier than --max-contention "
            f"{max_contention:.0%} after retries: their req/s and latencies are "
            "unreliable; CPU us/req suffers much less."
        )
    return "\n".join(lines)


def format_tracked(
    summaries: Sequence[Summary], targets: Sequence[Server]
) -> tuple[str, dict[str, Any]]:
    """The tracked-clients section: warm-ups, memory per client, 1M/1k cost."""
    lines = [
        f"{'server':<20} {'tracked':>10} {'evictions':>9} {'RSS MB':>8} "
        f"{'warm-up s':>9} {'errors':>6}",
    ]
    for t in targets:
        w = t.warmup
        lines.append(
            f"{t.name:<20} {_num(w.get('tracked_clients')):>10} "
            f"{_num(w.get('evictions')):>9} {_num(_mb(w.get('rss_bytes')), '.1f'):>8} "
            f"{_num(w.get('seconds'), '.0f'):>9} {w.get('errors', 0):>6}"
        )
    data: dict[str, Any] = {"warmup": {t.name: t.warmup for t in targets}}
    by_level: dict[str, list[Server]] = {}
    for t in targets:
        assert t.variant is not None  # noqa: S101 - targets are policyd
        # Level and backend, and the --compare checkout's label if any.
        key = t.variant.group + t.name[len(t.variant.name) :]
        by_level.setdefault(key, []).append(t)
    by = {(s.server, s.connections): s for s in summaries}
    for level, group in by_level.items():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda t: t.variant.tracked if t.variant else 0)
        small, big = group[0], group[-1]
        ws, wb = small.warmup, big.warmup
        entry: dict[str, Any] = {"small": small.name, "big": big.name}
        if None not in (
            ws.get("rss_bytes"),
            wb.get("rss_bytes"),
            ws.get("tracked_clients"),
            wb.get("tracked_clients"),
        ):
            per = (wb["rss_bytes"] - ws["rss_bytes"]) / (
                wb["tracked_clients"] - ws["tracked_clients"]
            )
            entry["bytes_per_client"] = per
            lines.append(
                f"{level}: ({big.name} RSS - {small.name} RSS) / (tracked difference)"
                f" = {per:,.0f} B per tracked client"
            )
        ratios = {}
        for conns in sorted({s.connections for s in summaries}):
            sb, ss = by.get((big.name, conns)), by.get((small.name, conns))
            if sb and ss:
                r = paired_ratio(sb, ss, "server_us_per_req")
                ratios[conns] = r
        entry["cpu_ratio"] = ratios
        data[level] = entry
        big_n = big.variant.tracked if big.variant else 0
        small_n = small.variant.tracked if small.variant else 0
        lines.append(
            f"{level}: CPU us/req {size_label(big_n)}/{size_label(small_n)} "
            "(median of the same-block pairs): "
            + ", ".join(f"c={c} {_num(r, '.2f')}x" for c, r in ratios.items())
        )
    return "\n".join(lines), data


# ---------------------------------------------------------------------------
# Paced load
# ---------------------------------------------------------------------------

#: Issue 13's reference cells: 100 and 200 connections at about 10 requests/s
#: each (1k and 2k req/s), and 100 at about 50/s (5k req/s).
DEFAULT_PACED = "100x10,200x10,100x50"
ADDRESS_MODES = ("fresh", "pool")
#: Paced, ``--addresses pool``: a botnet's worth of client addresses.
PACED_CLIENTS = 100_000
#: A paced pool holds this many times what the planned runs take, for the
#: runs done again because they were noisy (and more: see paced_pool_requests).
#: On the shared development box a third of the runs were done again at times.
RETRY_MARGIN = 2.0


@dataclasses.dataclass(frozen=True)
class Pace:
    """One paced cell: *connections*, each sending *rate* requests a second."""

    connections: int
    rate: float

    @property
    def offered(self) -> float:
        """Requests a second asked of all connections together."""
        return self.connections * self.rate

    @property
    def label(self) -> str:
        """``100 x 10/s``."""
        return pace_label(self.connections, self.rate)


def pace_label(connections: int, rate: float) -> str:
    """A paced cell as ``100 x 10/s``."""
    return f"{connections} x {rate:g}/s"


def parse_paces(text: str) -> list[Pace]:
    """``100x10,200x10,100x50`` as cells, in the order given, once each."""
    paces: list[Pace] = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        conns, sep, rate = item.partition("x")
        try:
            pace = Pace(int(conns), float(rate))
        except ValueError:
            raise ValueError(f"{item!r} is not CONNSxRATE, such as 100x10") from None
        if not sep or pace.connections < 1 or not 0 < pace.rate < math.inf:
            raise ValueError(f"{item!r}: connections and rate must be positive")
        if pace not in paces:
            paces.append(pace)
    if not paces:
        raise ValueError("no cell given")
    return paces


def paced_pool_requests(
    paces: Sequence[Pace],
    seconds: float,
    repeats: int,
    retries: int,
    margin: float = RETRY_MARGIN,
) -> int:
    """Requests a paced pool needs so that no server is sent a session twice.

    Every server (the baseline too) goes through the pool on its own
    (`Cursor`): once per cell and repeat, each run taking about the offered
    rate over its warm-up and window, *seconds* (`loadgen.paced_requests`).
    Runs done again because they were noisy take more: *margin* times the
    planned runs, and at least room for the largest run to be done again
    *retries* times (with one repeat, the margin alone would not hold that).
    """
    runs = [loadgen.paced_requests(p.offered, seconds, p.connections) for p in paces]
    planned = sum(runs) * repeats
    return max(math.ceil(planned * margin), planned + retries * max(runs))


@dataclasses.dataclass
class Cursor:
    """Where a server's next paced run starts in a pool of *sessions* sessions.

    Each run begins after the sessions the server's earlier runs took, so
    that with fresh addresses no client comes to the same server twice.
    """

    sessions: int
    next: int = 0

    def take(self, used: int) -> bool:
        """Move past a run's *used* sessions; whether it ran past the pool's end.

        Past the end the load generator comes round to the first session: that
        run and every later one send the server clients it has seen.
        """
        self.next += used
        return self.next > self.sessions


def run_paced(args: argparse.Namespace, servers: list[Server]) -> int:
    """The paced matrix: every server at every offered rate, side by side."""
    targets = [s for s in servers if s.variant is not None]
    seconds = args.warmup + args.duration
    need = paced_pool_requests(args.paces, seconds, args.repeat, args.retries)
    size = max(need, args.pool)
    print(
        f"paced pools: {size:,} requests per address mode ({need:,} needed: every "
        f"server goes through the pool once, {args.repeat} x {len(args.paces)} "
        f"runs of {seconds:g} s, with room for runs done again)",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        gens: dict[str, loadgen.LoadGenerator] = {}
        for mode in args.address_modes:
            t0 = time.monotonic()
            opts = loadgen.pool_options(args, fresh=mode == "fresh")
            gen = stack.enter_context(
                loadgen.LoadGenerator(
                    dataclasses.replace(opts, requests=size), args.engine
                )
            )
            if gen.engine != "c":
                raise SystemExit("--paced needs the C engine: no C compiler found")
            gens[mode] = gen
            addresses = len(loadgen.pool_addresses(gen.sessions))
            print(
                f"  {mode}: {len(gen.sessions):,} sessions, {gen.n_requests:,} "
                f"requests, {addresses:,} distinct addresses"
                + ("" if mode == "fresh" else f" (of {args.clients:,} clients)")
                + f"; built in {time.monotonic() - t0:.1f} s",
                flush=True,
            )
        print(
            "starting " + ", ".join(f"{s.name} (port {s.port})" for s in servers),
            flush=True,
        )
        for s in servers:
            s.start(args.start_timeout)
        for t in targets:
            # Only the fill's clean clients: the measured clients come fresh.
            fill(gens[args.address_modes[0]], t, 0, args, pool_pass=False)
        print(
            f"engine c, paced ({args.jitter} gaps); {args.repeat} x "
            f"{len(args.paces)} cells x {len(gens)} address modes x "
            f"{len(servers)} servers, {args.warmup:g} s warm-up + "
            f"{args.duration:g} s each; {args.pinning}; {args.priority}",
            flush=True,
        )
        cursors = {
            (s.name, mode): Cursor(len(gen.sessions))
            for s in servers
            for mode, gen in gens.items()
        }
        results: dict[tuple[str, str, Pace], list[Run]] = {}
        block = 0
        for rep in range(args.repeat):
            for pace in args.paces:
                for mode, gen in gens.items():
                    # Rotate who goes first so drift and noise hit all alike.
                    k = block % len(servers)
                    block += 1
                    for s in servers[k:] + servers[:k]:
                        run = measure(
                            gen,
                            s,
                            pace.connections,
                            f"[{rep + 1}/{args.repeat}] {pace.label:<12} {mode:<5}",
                            args,
                            rate=pace.rate,
                            cursor=cursors[(s.name, mode)],
                        )
                        if run is None:
                            return 1
                        results.setdefault((s.name, mode, pace), []).append(run)
        report_logs(servers)
    summaries = [
        Summary(name, pace.connections, runs, pace.rate, mode)
        for (name, mode, pace), runs in results.items()
    ]
    order = [s.name for s in servers]
    print()
    print(format_paced(summaries, order, args))
    print()
    print(format_paced_brief(summaries, order, args))
    if targets:
        print()
        print(format_actions(summaries, targets))
    if args.json:
        payload = {
            "mode": "paced",
            "engine": "c",
            "jitter": args.jitter,
            "duration": args.duration,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "pinning": args.pinning,
            "priority": args.priority,
            "paces": [dataclasses.asdict(p) for p in args.paces],
            "addresses": args.address_modes,
            "pool": {
                mode: dataclasses.asdict(gen.options)
                | {"requests": gen.n_requests, "sessions": len(gen.sessions)}
                for mode, gen in gens.items()
            },
            "servers": order,
            "level_env": LEVEL_ENV,
            "warmup_fill": {t.name: t.warmup for t in targets},
            "summaries": [s.as_dict() for s in summaries],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _paced_cells(
    summaries: Sequence[Summary], args: argparse.Namespace
) -> list[tuple[Pace, str]]:
    """(cell, address mode) in the order of the command line."""
    seen = {(s.connections, s.rate, s.addresses) for s in summaries}
    return [
        (p, mode)
        for p in args.paces
        for mode in args.address_modes
        if (p.connections, p.rate, mode) in seen
    ]


def format_paced(
    summaries: Sequence[Summary], order: Sequence[str], args: argparse.Namespace
) -> str:
    """The paced table, in Markdown: one row per cell, address mode and server."""
    by = {(s.server, s.connections, s.rate, s.addresses): s for s in summaries}
    lines = [
        f"Paced load ({args.jitter} gaps), {args.repeat} x ({args.warmup:g} s "
        f"warm-up + {args.duration:g} s); median over repeats, ± half the spread:",
        "",
        "| load | addresses | server | offered req/s | req/s | CPU µs/req | x base "
        "| p50 µs | p99 µs | late | errors | noise | level | refused |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    noisy = reused = 0
    for pace, mode in _paced_cells(summaries, args):
        base = by.get((order[0], pace.connections, pace.rate, mode))
        for name in order:
            s = by.get((name, pace.connections, pace.rate, mode))
            if s is None:
                continue
            x_cpu = ""
            if base is not None and s is not base:
                x_cpu = _num(paired_ratio(s, base, "server_us_per_req"), ".2f")
            flag = " !" if (s.contention or 0.0) > args.max_contention else ""
            again = " *" if any(r.reused for r in s.runs) else ""
            noisy += bool(flag)
            reused += bool(again)
            level = refused = ""
            if s.levels_seen != "-":  # policyd: it has a level
                level = s.levels_seen
                refused = _num(s.median("refused_share"), ".1%")
            lines.append(
                f"| {pace.label} | {mode} | {s.server}{again} | {pace.offered:,.0f} | "
                f"{_num(s.median('rps'))}{_spread_pct(s, 'rps')} | "
                f"{_num(s.median('server_us_per_req'), '.1f')}"
                f"{_spread_pct(s, 'server_us_per_req')} | {x_cpu} | "
                f"{_num(s.median('p50_us'))} | {_num(s.median('p99_us'))} | "
                f"{_num(s.median('late_share'), '.1%')} | {s.errors} | "
                f"{_num(s.contention, '.1%')}{flag} | {level} | {refused} |"
            )
    lines += [
        "",
        "offered: connections x rate; req/s: answered in the window / its length. "
        "CPU µs/req: the server's CPU time in the window (schedstat, ns) / requests "
        "answered; x base: against the baseline, median of the pairs measured in "
        "the same block. p50/p99: from a request's sending to its reply. late: "
        "requests that fell due while their connection's previous reply was "
        "outstanding, sent when it came (a server that keeps up has next to "
        "none). noise: worst share of a window that the server or the load "
        "generator waited for a CPU held by something else. level: "
        "policyd_stress_level after each window; refused: share of replies that "
        "refused.",
    ]
    tracked = []
    for name in order:
        seen = [
            t
            for s in summaries
            if s.server == name
            for t in (r.tracked for r in s.runs)
            if t is not None
        ]
        if seen:
            tracked.append(f"{name} {min(seen):,.0f} to {max(seen):,.0f}")
    if tracked:
        lines.append(
            "policyd_tracked_clients after the windows: " + ", ".join(tracked) + "."
        )
    if noisy:
        lines.append(
            f"! {noisy} rows stayed noisier than --max-contention "
            f"{args.max_contention:.0%} after retries."
        )
    if reused:
        lines.append(
            f"* {reused} rows had runs past the end of the pool: their server "
            "was sent clients it had seen (raise --pool)."
        )
    return "\n".join(lines)


def format_paced_brief(
    summaries: Sequence[Summary], order: Sequence[str], args: argparse.Namespace
) -> str:
    """CPU µs per request of every server in every cell, in Markdown, with x base."""
    by = {(s.server, s.connections, s.rate, s.addresses): s for s in summaries}
    lines = [
        "CPU per request (x base: median of the same-block pairs):",
        "",
        "| load | " + " | ".join(order) + " |",
        "|---|" + "---:|" * len(order),
    ]
    for pace, mode in _paced_cells(summaries, args):
        cells = []
        base = by.get((order[0], pace.connections, pace.rate, mode))
        for name in order:
            s = by.get((name, pace.connections, pace.rate, mode))
            if s is None:
                cells.append("")
                continue
            text = _num(s.median("server_us_per_req"), ".1f") + " µs"
            if base is not None and s is not base:
                ratio = paired_ratio(s, base, "server_us_per_req")
                text += f" ({_num(ratio, '.2f')}x)"
            cells.append(text)
        load = (
            f"{pace.connections} conns x {pace.rate:g}/s "
            f"({pace.offered:,.0f} req/s), {mode}"
        )
        lines.append(f"| {load} | " + " | ".join(cells) + " |")
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
        "--levels",
        default="normal,overload",
        help="comma-separated stress levels to force policyd to [normal,overload]",
    )
    parser.add_argument(
        "--tracked",
        help="comma-separated numbers of clients policyd tracks while measured, "
        "e.g. 1k,100k,1m [1k,1m; quick 1k]",
    )
    parser.add_argument(
        "--repeat", type=int, help="runs per server and level [3; quick 1]"
    )
    parser.add_argument(
        "--backends",
        default="memory",
        help="comma-separated client-state backends, one policyd per backend, "
        "level and size: memory, redis (a private redis-server shared by the "
        "Redis-backed policyds, each under its own key prefix) [memory]",
    )
    parser.add_argument(
        "--redis-transport",
        choices=("tcp", "unix"),
        default="tcp",
        help="how policyd reaches the Redis: loopback TCP or its unix socket [tcp]",
    )
    parser.add_argument(
        "--redis-cpu",
        choices=("server", "loadgen"),
        default="server",
        help="pin redis-server with the servers (it competes with policyd, as "
        "a Redis on the MX would) or with the load generator (a Redis "
        "elsewhere) [server]",
    )
    parser.add_argument(
        "--redis-faults",
        default="kill,pause",
        help="after the matrix, for each Redis-backed level: Redis faults to "
        "measure, each in a window that starts with the fault: kill (SIGKILL), "
        "pause (SIGSTOP), or none [kill,pause]",
    )
    parser.add_argument(
        "--fault-window",
        type=float,
        default=10.0,
        help="s measured from the fault on [10]",
    )
    parser.add_argument(
        "--fault-connections",
        type=int,
        default=100,
        help="connections during a fault window [100]",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--paced",
        nargs="?",
        const=DEFAULT_PACED,
        metavar="CONNSxRATE,...",
        help="paced (open-loop) load instead of saturated connections: in each "
        "cell CONNS connections each send RATE requests/s on a jittered "
        "schedule of their own (replaces --concurrency) "
        f"[{DEFAULT_PACED}]",
    )
    parser.add_argument(
        "--addresses",
        help="paced: where client addresses come from, comma-separated: fresh "
        "(a new client every session) or pool (sessions drawn from --clients "
        f"clients, {PACED_CLIENTS:,} by default) [fresh]",
    )
    parser.add_argument(
        "--jitter",
        choices=loadgen.JITTERS,
        default=loadgen.JITTERS[0],
        help="paced: a connection's gaps uniform in 0.5-1.5x the mean, or "
        "exponential (Poisson) [uniform]",
    )
    parser.add_argument(
        "--target",
        choices=("policyd", "baseline"),
        default="policyd",
        help="what to compare with the baseline [policyd]",
    )
    parser.add_argument(
        "--compare",
        metavar="DIR",
        help="also run the policyd of the checkout in DIR (an older commit's "
        "worktree), in the same rotation",
    )
    parser.add_argument(
        "--target-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every policyd (repeatable)",
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
    # Saturated: 500 active clients, so that the smallest table (1k) holds
    # them; paced: a botnet's worth.  Paced, the pool is sized to the run.
    parser.set_defaults(clients=None, pool=None)
    args = parser.parse_args(argv)
    if args.clients is None:
        args.clients = PACED_CLIENTS if args.paced else 500
    if args.pool is None:
        args.pool = 0 if args.paced else loadgen.PoolOptions().requests
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.warmup = (
        args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    )
    args.repeat = args.repeat or (1 if args.quick else 3)
    try:
        args.conns = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        parser.error("--concurrency wants comma-separated integers")
    if not args.conns or min(args.conns) < 1:
        parser.error("--concurrency wants positive integers")
    args.stress_levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    unknown = set(args.stress_levels) - set(LEVEL_ENV)
    if unknown or not args.stress_levels:
        parser.error(f"--levels wants some of {', '.join(LEVEL_ENV)}")
    if args.paced:
        try:
            args.paces = parse_paces(args.paced)
        except ValueError as e:
            parser.error(f"--paced: {e}")
        args.conns = sorted({p.connections for p in args.paces})
        modes = [x.strip() for x in (args.addresses or "fresh").split(",")]
        if not modes or set(modes) - set(ADDRESS_MODES) or len(set(modes)) < len(modes):
            parser.error(f"--addresses wants some of {','.join(ADDRESS_MODES)}")
        args.address_modes = modes
    elif args.addresses is not None:
        parser.error("--addresses goes with --paced")
    tracked = args.tracked or ("1k" if args.quick or args.paced else "1k,1m")
    try:
        args.sizes = sorted({parse_size(x) for x in tracked.split(",") if x.strip()})
    except ValueError:
        parser.error("--tracked wants comma-separated counts such as 1k,1m")
    if not args.sizes or min(args.sizes) < 1:
        parser.error("--tracked wants positive counts")
    args.backend_list = [x.strip() for x in args.backends.split(",") if x.strip()]
    if not args.backend_list or set(args.backend_list) - {"memory", "redis"}:
        parser.error("--backends wants some of memory,redis")
    faults = [x.strip() for x in args.redis_faults.split(",") if x.strip()]
    args.faults = [] if faults == ["none"] else faults
    if set(args.faults) - set(redisbench.FAULTS):
        parser.error(f"--redis-faults wants some of {','.join(redisbench.FAULTS)}")
    if "redis" not in args.backend_list or args.target == "baseline" or args.paced:
        args.faults = []
    if args.fault_window <= 0 or args.fault_connections < 1:
        parser.error("--fault-window and --fault-connections must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whole comparison and print the table."""
    args = parse_args(argv)
    # Every connection is a descriptor in both the load generator and the
    # server; children inherit the raised limit.
    need = max(*args.conns, FILL_CONNECTIONS, args.fault_connections) + 256
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
    variants = [
        Variant(lv, n, backend)
        for backend in args.backend_list
        for lv in args.stress_levels
        for n in args.sizes
    ]
    redis = None
    if "redis" in args.backend_list and args.target == "policyd":
        redis = redisbench.BenchRedis(
            server_cpus if args.redis_cpu == "server" else loadgen_cpus,
            args.redis_transport,
        )
        redis.start()
        args.redis_desc = (
            f"redis-server {redis.version()} (no persistence) over "
            f"{args.redis_transport}, pinned "
            + (
                "with the servers"
                if args.redis_cpu == "server"
                else "with the load generator"
            )
        )
        print(args.redis_desc, flush=True)
    try:
        servers = make_servers(args, variants, server_cpus, redis)
        try:
            return _run(args, servers)
        finally:
            for s in servers:
                s.stop()
    finally:
        if redis is not None:
            redis.stop()


def measure(
    gen: loadgen.LoadGenerator,
    server: Server,
    conns: int,
    tag: str,
    args: argparse.Namespace,
    *,
    rate: float = 0.0,
    cursor: Cursor | None = None,
) -> Run | None:
    """One load run, repeated while it is noisy; the least noisy attempt.

    *rate* > 0: paced at that rate per connection, each attempt starting
    where *cursor* (the server's place in the pool) says, and moving it on.
    None if the server died.
    """
    best: Run | None = None
    for attempt in range(args.retries + 1):
        if not server.alive():
            print(f"{server.name} died:\n{server.log_tail()}", file=sys.stderr)
            return None
        # Also lets the previous run's connections drain.
        wait_for_quiet(args.quiet_wait if attempt else 2.0)
        lines0 = server.lines
        before = server.scrape() if server.redis is not None else {}
        res = gen.run(
            host=HOST,
            port=server.port,
            connections=conns,
            duration=args.duration,
            warmup=args.warmup,
            timeout=args.timeout,
            server_pid=server.pid,
            companion=server.companion(),
            rate=rate,
            jitter=args.jitter,
            start_session=None if cursor is None else cursor.next,
        )
        time.sleep(0.05)  # let the drain thread catch up with the last lines
        run = Run(res, log_lines=server.lines - lines0)
        if cursor is not None:
            run.reused = cursor.take(res.sessions_used or 0)
        if server.variant is not None:
            metrics = server.scrape()
            run.level = metrics.get("policyd_stress_level")
            run.tracked = metrics.get("policyd_tracked_clients")
            if server.redis is not None:
                run.fallbacks, run.backend_errors = backend_deltas(before, metrics)
        noisy = (res.contention or 0.0) > args.max_contention
        again = "  (noisy, again)" if noisy and attempt < args.retries else ""
        extra = ""
        if server.variant is not None:
            level = (
                LEVEL_NAMES[int(run.level)]
                if run.level in (0, 1, 2)
                else _num(run.level)
            )
            extra = (
                f"  level {level} refused "
                f"{_num(run.refused_share, '.1%')} tracked {_num(run.tracked)}"
            )
            if server.redis is not None:
                extra += (
                    f"  redis {loadgen.format_optional(res.companion_us_per_req)} "
                    f"us/req fallbacks {_num(run.fallbacks)}"
                    + "".join(
                        f" {k} {v:,.0f}" for k, v in run.backend_errors.items() if v
                    )
                )
        if res.offered_rps:
            extra += (
                f"  offered {res.offered_rps:,.0f} late "
                f"{loadgen.format_optional(res.late_share, '.1%')}"
                + ("  (pool came round: clients seen before)" if run.reused else "")
            )
        print(
            f"  {tag} {server.name:<20} c={conns:<5} {res.rps:>9,.0f} req/s  "
            f"{loadgen.format_optional(res.server_us_per_req)} us/req  "
            f"p99 {res.p99_us:,.0f} us  errors {res.error_total}  "
            f"loadgen {res.loadgen_cores:.2f} cores  "
            f"noise {loadgen.format_optional(res.contention, '.1%')}{extra}{again}",
            flush=True,
        )
        if best is None or (res.contention or 0.0) < (best.result.contention or 0.0):
            best = run
        if not noisy:
            break
    return best


def backend_deltas(
    before: dict[str, float], after: dict[str, float]
) -> tuple[float | None, dict[str, float]]:
    """Fallbacks and backend errors by reason between two scrapes."""
    fb0 = redisbench.metric_total(before, "policyd_backend_fallbacks_total")
    fb1 = redisbench.metric_total(after, "policyd_backend_fallbacks_total")
    name = "policyd_backend_errors_total"
    e0 = redisbench.metric_by_label(before, name, "reason")
    e1 = redisbench.metric_by_label(after, name, "reason")
    errors = {k: v - e0.get(k, 0.0) for k, v in e1.items()}
    return (None if fb0 is None or fb1 is None else fb1 - fb0), errors


# ---------------------------------------------------------------------------
# Redis faults and the Redis sections of the report
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class FaultRun:
    """One window that began with a fault of the Redis under a policyd."""

    fault: str
    server: str
    result: loadgen.LoadResult
    fallbacks: float | None
    backend_errors: dict[str, float]
    scored_share: float
    """Share of the pool's requests that policyd scores at a stress level
    above normal (the first of each transaction): the most that can fall back."""
    back_after_s: float | None
    """From Redis running again (restarted empty, or resumed) to this policyd's
    backend being up, s; None if not within the limit."""

    @property
    def fallback_share(self) -> float | None:
        """Fallbacks per answer of the window."""
        return redisbench.share(self.fallbacks, self.result.completed)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            "fault": self.fault,
            "server": self.server,
            "fallbacks": self.fallbacks,
            "fallback_share": self.fallback_share,
            "backend_errors": self.backend_errors,
            "scored_share": self.scored_share,
            "back_after_s": self.back_after_s,
            "result": self.result.as_dict(),
        }


def wait_backends_up(servers: Sequence[Server], limit: float) -> bool:
    """Wait (at most *limit* s) until every Redis-backed policyd's backend is up."""
    deadline = time.monotonic() + limit
    waiting = [s for s in servers if s.redis is not None]
    while waiting:
        waiting = [
            s
            for s in waiting
            if redisbench.metric_total(s.scrape(), "policyd_backend_up") != 1
        ]
        if not waiting:
            break
        if time.monotonic() > deadline:
            print(
                "  backend still down after "
                f"{limit:g} s: {', '.join(s.name for s in waiting)}",
                flush=True,
            )
            return False
        time.sleep(0.05)
    return True


# The Redis-backed policyds reconnect with a growing delay (up to 30 s).
RECONNECT_LIMIT = 45.0


def run_fault(
    gen: loadgen.LoadGenerator,
    server: Server,
    fault: str,
    others: Sequence[Server],
    args: argparse.Namespace,
    scored: float,
) -> FaultRun | None:
    """Measure the answers of *server* in the window that starts with *fault*.

    Redis runs and every Redis-backed policyd (*others*) is connected first;
    after a warm-up of at least 2 s, the load generator sends redis-server
    the fault's signal when the measured window begins.  Then Redis is
    resumed or restarted (empty) and the runner waits for the policyds to
    reconnect (bounded), so that the next window starts from a healthy
    state.  A noisy window is done again, like any run (`measure`); the
    least noisy counts.  None if the server died.
    """
    best: FaultRun | None = None
    for attempt in range(args.retries + 1):
        run = _fault_window(gen, server, fault, others, args, scored, attempt)
        if run is None:
            return None
        contention = run.result.contention or 0.0
        if best is None or contention < (best.result.contention or 0.0):
            best = run
        if contention <= args.max_contention:
            break
    return best


def _fault_window(
    gen: loadgen.LoadGenerator,
    server: Server,
    fault: str,
    others: Sequence[Server],
    args: argparse.Namespace,
    scored: float,
    attempt: int,
) -> FaultRun | None:
    redis = server.redis
    assert redis is not None  # noqa: S101 - only Redis-backed policyd
    if redis.ensure_running():
        print("  redis-server restarted", flush=True)
    wait_backends_up(others, RECONNECT_LIMIT)
    if not server.alive():
        print(f"{server.name} died:\n{server.log_tail()}", file=sys.stderr)
        return None
    wait_for_quiet(args.quiet_wait if attempt else 2.0)
    before = server.scrape()
    number = signal.SIGKILL if fault == "kill" else signal.SIGSTOP
    res = gen.run(
        host=HOST,
        port=server.port,
        connections=args.fault_connections,
        duration=args.fault_window,
        warmup=max(2.0, args.warmup),
        timeout=args.timeout,
        server_pid=server.pid,
        companion=server.companion(number),
        timeline_step=1.0,
    )
    after = server.scrape()
    fallbacks, errors = backend_deltas(before, after)
    redis.signal_sent(fault)
    back = time.monotonic()
    redis.ensure_running()
    back_after = (
        time.monotonic() - back if wait_backends_up([server], RECONNECT_LIMIT) else None
    )
    run = FaultRun(fault, server.name, res, fallbacks, errors, scored, back_after)
    noisy = (res.contention or 0.0) > args.max_contention
    print(
        f"  {fault:<5} {server.name:<20} c={args.fault_connections:<5} "
        f"{res.rps:>9,.0f} req/s  p50 {res.p50_us:,.0f} p99 {res.p99_us:,.0f} "
        f"max {res.max_us:,.0f} us  errors {res.error_total}  fallbacks "
        f"{_num(fallbacks)} ({_num(run.fallback_share, '.1%')} of answers)  "
        f"signal errno {res.signal_error}  back after {_num(back_after, '.1f')} s  "
        f"noise {loadgen.format_optional(res.contention, '.1%')}"
        + ("  (noisy, again)" if noisy and attempt < args.retries else ""),
        flush=True,
    )
    return run


def fault_cells(targets: Sequence[Server], args: argparse.Namespace) -> list[Server]:
    """The Redis-backed policyd of each level with the fewest tracked clients."""
    cells: dict[str, Server] = {}
    for t in targets:
        v = t.variant
        if v is None or t.redis is None or t.cwd != REPO:
            continue
        if v.level not in cells or v.tracked < (cells[v.level].variant or v).tracked:
            cells[v.level] = t
    return [cells[level] for level in args.stress_levels if level in cells]


def deadline_text(args: argparse.Namespace) -> str:
    """POLICYD_REDIS_DEADLINE as the Redis-backed policyds run with it."""
    for item in args.target_env:
        key, _, value = item.partition("=")
        if key == "POLICYD_REDIS_DEADLINE":
            return str(value)
    return "20ms (the default)"


def format_faults(faults: Sequence[FaultRun], args: argparse.Namespace) -> str:
    """The fault windows: latency from the fault on, fallbacks, recovery."""
    lines = [
        f"Redis faults: each window ({args.fault_window:g} s, "
        f"{args.fault_connections} connections) starts when the load generator "
        "signals redis-server (kill: SIGKILL; pause: SIGSTOP, resumed after the "
        f"window); POLICYD_REDIS_DEADLINE {deadline_text(args)}",
        f"{'fault':<6} {'server':<20} {'answers':>8} {'req/s':>7} {'p50 us':>7} "
        f"{'p99 us':>7} {'max us':>8} {'errors':>6} {'fallbk':>7} {'/answ':>6} "
        f"{'scored':>6} {'back s':>6} {'noise':>6}  backend errors",
    ]
    for f in faults:
        r = f.result
        errs = ", ".join(f"{k} {v:,.0f}" for k, v in f.backend_errors.items() if v)
        lines.append(
            f"{f.fault:<6} {f.server:<20} {r.completed:>8,} {r.rps:>7,.0f} "
            f"{r.p50_us:>7,.0f} {r.p99_us:>7,.0f} {r.max_us:>8,.0f} "
            f"{r.error_total:>6} {_num(f.fallbacks):>7} "
            f"{_num(f.fallback_share, '.1%'):>6} {f.scored_share:>6.1%} "
            f"{_num(f.back_after_s, '.1f'):>6} "
            f"{loadgen.format_optional(r.contention, '.1%'):>6}  {errs or '-'}"
        )
        if r.timeline:
            lines.append(
                "       p99/max per second, ms: "
                + "  ".join(
                    f"{sl.p99_us / 1e3:.1f}/{sl.max_us / 1e3:.1f}" for sl in r.timeline
                )
            )
    lines += [
        "answers: replies in the window (requests in flight at the fault "
        "included); fallbk: policyd_backend_fallbacks_total over the run; /answ: "
        "per answer of the window; scored: share of the pool's requests policyd "
        "scores above normal (the first of each transaction), the most that can "
        "fall back; back s: from Redis running again to policyd_backend_up 1.",
    ]
    return "\n".join(lines)


def backend_pairs(targets: Sequence[Server]) -> list[tuple[Server, Server]]:
    """(memory-backed, Redis-backed) policyd of the same level, size and checkout."""
    by_name = {t.name: t for t in targets}
    pairs = []
    for t in targets:
        v = t.variant
        if v is None or v.backend != "redis":
            continue
        suffix = t.name[len(v.name) :]
        memory = by_name.get(dataclasses.replace(v, backend="memory").name + suffix)
        if memory is not None:
            pairs.append((memory, t))
    return pairs


def paired(
    target: Summary, base: Summary, value: Any, of_base: Any = None
) -> float | None:
    """Median over same-block pairs of value(target run) / of_base(base run)."""
    of_base = of_base or value
    ratios = []
    for t, b in zip(target.runs, base.runs, strict=False):
        tv, bv = value(t.result), of_base(b.result)
        if tv is not None and bv:
            ratios.append(tv / bv)
    return statistics.median(ratios) if ratios else None


def _total_cpu(r: loadgen.LoadResult) -> float | None:
    if r.server_us_per_req is None:
        return None
    return r.server_us_per_req + (r.companion_us_per_req or 0.0)


def format_backends(
    summaries: Sequence[Summary], targets: Sequence[Server]
) -> tuple[str, list[dict[str, Any]]]:
    """Redis-backed against memory-backed policyd, cell by cell."""
    by = {(s.server, s.connections): s for s in summaries}
    pairs = backend_pairs(targets)
    w = max(14, *(len(memory.name) for memory, _ in pairs)) if pairs else 14
    lines = [
        "Redis-backed against memory-backed policyd (x mem: median of the "
        "same-block pairs):",
        f"{'conns':>5}  {'cell':<{w}} {'req/s mem':>9} {'redis':>7} {'x mem':>6} "
        f"{'p99 mem':>8} {'redis':>7} {'CPU mem':>7} {'redis':>6} {'x mem':>6} "
        f"{'+server':>7} {'x mem':>6} {'fallbk':>7}",
    ]
    data = []
    for memory, redis in pairs:
        for conns in sorted({s.connections for s in summaries}):
            sm, sr = by.get((memory.name, conns)), by.get((redis.name, conns))
            if sm is None or sr is None:
                continue
            x_rps = paired_ratio(sr, sm, "rps")
            x_cpu = paired_ratio(sr, sm, "server_us_per_req")
            x_total = paired(sr, sm, _total_cpu, lambda r: r.server_us_per_req)
            redis_cpu = sr.median("companion_us_per_req")
            row: dict[str, Any] = {
                "connections": conns,
                "memory": memory.name,
                "redis": redis.name,
                "rps_memory": sm.median("rps"),
                "rps_redis": sr.median("rps"),
                "rps_ratio": x_rps,
                "p99_us_memory": sm.median("p99_us"),
                "p99_us_redis": sr.median("p99_us"),
                "cpu_us_memory": sm.median("server_us_per_req"),
                "cpu_us_redis": sr.median("server_us_per_req"),
                "cpu_ratio": x_cpu,
                "redis_server_us": redis_cpu,
                "total_cpu_ratio": x_total,
                "fallbacks": sr.fallbacks,
            }
            data.append(row)
            cell = memory.name
            lines.append(
                f"{conns:>5}  {cell:<{w}} {_num(row['rps_memory']):>9} "
                f"{_num(row['rps_redis']):>7} {_num(x_rps, '.2f'):>6} "
                f"{_num(row['p99_us_memory']):>8} {_num(row['p99_us_redis']):>7} "
                f"{_num(row['cpu_us_memory'], '.1f'):>7} "
                f"{_num(row['cpu_us_redis'], '.1f'):>6} {_num(x_cpu, '.2f'):>6} "
                f"{_num(redis_cpu, '.1f'):>7} {_num(x_total, '.2f'):>6} "
                f"{_num(sr.fallbacks):>7}"
            )
    lines += [
        "CPU: policyd's us/req; +server: redis-server's us/req, and x mem the "
        "two together against the memory-backed policyd's; fallbk: decisions "
        "made without Redis (deadline missed) over all repeats.",
    ]
    return "\n".join(lines), data


def format_redis_memory(targets: Sequence[Server]) -> str:
    """Redis's memory per client record, after each Redis-backed warm-up."""
    lines = [
        "Redis memory (after each warm-up: the keys under its prefix, those it "
        "wrote, Redis's used_memory in all, B/key: used_memory growth over its "
        "warm-up / keys it wrote; MEMORY USAGE: mean of 200 of its keys):",
        f"{'server':<20} {'keys':>9} {'written':>9} {'Redis MB':>8} {'B/key':>6} "
        f"{'MEMORY USAGE B':>14}",
    ]
    for t in targets:
        w = t.warmup
        if t.redis is None or "redis_keys" not in w:
            continue
        lines.append(
            f"{t.name:<20} {w['redis_keys']:>9,} {w['redis_keys_written']:>9,} "
            f"{_num(_mb(w['redis_used_memory_after']), '.1f'):>8} "
            f"{_num(w['redis_bytes_per_key']):>6} "
            f"{_num(w['redis_memory_usage_sample']):>14}"
        )
    return "\n".join(lines)


def report_logs(servers: Sequence[Server]) -> None:
    """Say which servers have children (CPU not counted) and what they logged last."""
    for s in servers:
        if s.alive() and s.children():
            print(f"warning: {s.name} has child processes; their CPU is not counted")
        tail = [
            line for line in s.log_tail(4).splitlines() if "listening on" not in line
        ]
        if tail:
            print(f"{s.name} logged {s.lines:,} lines; the last:", *tail, sep="\n  ")


def format_actions(summaries: Sequence[Summary], targets: Sequence[Server]) -> str:
    """The mix of replies of every policyd in every cell, all repeats."""
    lines = ["action mix (all repeats):"]
    order = {t.name: i for i, t in enumerate(targets)}
    mine = [sm for sm in summaries if sm.server in order]
    mine.sort(key=lambda sm: (order[sm.server], sm.addresses, sm.connections, sm.rate))
    for sm in mine:
        acts = sm.actions
        total = max(1, sum(acts.values()))
        mix = "  ".join(f"{k} {v / total:.1%}" for k, v in acts.items())
        cell = f"c={sm.connections:<5}"
        if sm.rate:
            cell = f"{pace_label(sm.connections, sm.rate)} {sm.addresses}"
        lines.append(f"  {sm.server:<20} {cell} {mix}")
    return "\n".join(lines)


def _run(args: argparse.Namespace, servers: list[Server]) -> int:
    if args.paced:
        return run_paced(args, servers)
    targets = [s for s in servers if s.variant is not None]
    print(
        f"generating {args.pool:,} requests from {args.clients:,} clients; starting "
        + ", ".join(f"{s.name} (port {s.port})" for s in servers),
        flush=True,
    )
    with loadgen.LoadGenerator(loadgen.pool_options(args), args.engine) as gen:
        pool_clients = len(loadgen.pool_addresses(gen.sessions))
        for s in servers:
            s.start(args.start_timeout)
        if targets:
            print(
                "policyd: POLICYD_LOG_LEVEL=info, stdout+stderr to a pipe drained by "
                f"the runner; measured pool: {pool_clients:,} distinct clients",
                flush=True,
            )
        for t in targets:
            fill(gen, t, pool_clients, args)
        print(
            f"engine {gen.engine}; {args.repeat} x {len(args.conns)} concurrency "
            f"levels x {len(servers)} servers, {args.warmup:g} s warm-up + "
            f"{args.duration:g} s each; {args.pinning}; {args.priority}",
            flush=True,
        )
        results: dict[tuple[str, int], list[Run]] = {}
        block = 0
        for rep in range(args.repeat):
            for conns in args.conns:
                # Rotate who goes first so drift and noise hit all alike.
                k = block % len(servers)
                block += 1
                for s in servers[k:] + servers[:k]:
                    run = measure(gen, s, conns, f"[{rep + 1}/{args.repeat}]", args)
                    if run is None:
                        return 1
                    results.setdefault((s.name, conns), []).append(run)
        faults: list[FaultRun] = []
        if args.faults:
            scored = redisbench.scored_share(gen.sessions)
            print("Redis faults:", flush=True)
            for cell in fault_cells(targets, args):
                for fault in args.faults:
                    fr = run_fault(gen, cell, fault, targets, args, scored)
                    if fr is None:
                        return 1
                    faults.append(fr)
        report_logs(servers)
    summaries = [Summary(name, c, runs) for (name, c), runs in results.items()]
    order = [s.name for s in servers]
    print()
    print(format_table(summaries, order, args.max_contention))
    tracked_data: dict[str, Any] = {}
    backend_data: list[dict[str, Any]] = []
    if targets:
        text, tracked_data = format_tracked(summaries, targets)
        print()
        print(text)
        if any(t.redis is not None for t in targets):
            text, backend_data = format_backends(summaries, targets)
            print()
            print(text)
            print()
            print(format_redis_memory(targets))
        if faults:
            print()
            print(format_faults(faults, args))
        print()
        print(format_actions(summaries, targets))
    if args.json:
        payload = {
            "engine": gen.engine,
            "duration": args.duration,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "pinning": args.pinning,
            "priority": args.priority,
            "policyd_output": "POLICYD_LOG_LEVEL=info; stdout to a pipe drained "
            "by the runner",
            "pool": dataclasses.asdict(loadgen.pool_options(args)),
            "pool_clients": pool_clients,
            "servers": order,
            "level_env": LEVEL_ENV,
            "tracked": tracked_data,
            "redis": getattr(args, "redis_desc", None),
            "backends": backend_data,
            "faults": [f.as_dict() for f in faults],
            "summaries": [s.as_dict() for s in summaries],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
