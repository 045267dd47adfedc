"""The Redis side of ``bench/run.py --backends memory,redis``.

``run.py`` starts one private redis-server (`policyd.testing.redis.RedisServer`:
no persistence, a unix socket and a loopback TCP port) that every
Redis-backed policyd of the run shares, each under its own
``POLICYD_REDIS_PREFIX``.  This module holds what the runner needs around it:

* `BenchRedis`: the server, pinned to a CPU set (by default the servers'
  CPU: on an MX, a local Redis competes with policyd for the same cores), its
  PID (the load generator reads its CPU time over each window of a
  Redis-backed policyd), its memory (``INFO memory``), the keys under a
  prefix (``SCAN``), ``MEMORY USAGE`` of sample keys, and kill/pause/restart
  for the fault runs.
* Pure helpers to read ``/metrics`` and ``INFO`` text, and to turn fallback
  counts into shares; the unit tests in ``tests/test_bench_redis.py`` pin
  them.

Only loopback and a unix socket are used; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: The fault runs: the signal the load generator sends redis-server when the
#: measured window begins, and what that stands for.
FAULTS = {
    "kill": "SIGKILL: Redis dies, connections are reset, data is gone",
    "pause": "SIGSTOP: Redis hangs, connections stay open, nothing answers",
}


def metric_total(metrics: Mapping[str, float], name: str) -> float | None:
    """The sum of every sample of metric *name* (any labels), None if absent.

    *metrics* maps sample names with their labels, as Prometheus' text format
    writes them (``policyd_backend_errors_total{backend="redis",reason="lost"}``),
    to values.
    """
    found = [
        value
        for key, value in metrics.items()
        if key == name or (key.startswith(name) and key[len(name)] == "{")
    ]
    return sum(found) if found else None


def metric_by_label(
    metrics: Mapping[str, float], name: str, label: str
) -> dict[str, float]:
    """The samples of metric *name* keyed by the value of *label*."""
    out: dict[str, float] = {}
    marker = f'{label}="'
    for key, value in metrics.items():
        if not key.startswith(name + "{"):
            continue
        start = key.find(marker)
        if start < 0:
            continue
        start += len(marker)
        out[key[start : key.index('"', start)]] = value
    return out


def parse_info(text: str) -> dict[str, str]:
    """The ``field:value`` lines of Redis ``INFO`` output (sections skipped)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value
    return fields


def per_item(before: float | None, after: float | None, items: float) -> float | None:
    """The growth per item, (after - before) / items; None if unknown or items < 1."""
    if before is None or after is None or items < 1:
        return None
    return (after - before) / items


def share(part: float | None, whole: float | None) -> float | None:
    """The quotient part / whole; None when either is missing or whole is 0."""
    if part is None or not whole:
        return None
    return part / whole


def scored_share(sessions: Sequence[Sequence[bytes]]) -> float:
    """The share of a pool's requests that open a mail transaction.

    At a stress level above normal, policyd scores the first request of each
    transaction (``instance``) on a connection and answers the others with
    the same verdict; only the scored ones ask Redis.  So this is the share
    of answers that can fall back when Redis is gone.
    """
    total = opened = 0
    for session in sessions:
        last = None
        for request in session:
            total += 1
            start = request.find(b"\ninstance=")
            instance = None
            if start >= 0:
                start += len(b"\ninstance=")
                instance = request[start : request.index(b"\n", start)]
            if not instance or instance != last:
                opened += 1
            last = instance
    return opened / total if total else 0.0


def pin(pid: int, cpus: set[int] | None) -> None:
    """Bind every thread of process *pid* to *cpus* (nothing if None)."""
    if cpus is None:
        return
    with contextlib.suppress(OSError):  # the process may be gone
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # the thread may be gone
                os.sched_setaffinity(int(task.name), cpus)


class BenchRedis:
    """A private redis-server for the benchmark, pinned, with its figures."""

    def __init__(self, cpus: set[int] | None, transport: str = "tcp") -> None:
        if str(REPO) not in sys.path:
            # This checkout's test helper, as the servers run this checkout.
            sys.path.insert(1, str(REPO))
        from policyd.testing.redis import RedisServer
        from policyd.testing.system import Unavailable

        try:
            self.server = RedisServer()
        except Unavailable as e:
            raise SystemExit(f"--backends redis: {e}") from None
        self.cpus = cpus
        self.transport = transport
        self.restarts = 0

    def start(self) -> None:
        """Start it (empty) and pin it."""
        self.server.start()
        pin(self.pid, self.cpus)

    def stop(self) -> None:
        """Stop it and remove its directory."""
        self.server.__exit__(None, None, None)

    @property
    def pid(self) -> int:
        """The PID of the running redis-server."""
        process = self.server.process
        if process is None:
            raise RuntimeError("redis-server is not running")
        return process.pid

    def alive(self) -> bool:
        """Whether redis-server runs (a killed one is reaped here)."""
        process = self.server.process
        return process is not None and process.poll() is None

    @property
    def url(self) -> str:
        """What POLICYD_REDIS_URL says: loopback TCP, or the unix socket."""
        if self.transport == "unix":
            return f"unix://{self.server.socket}"
        return self.server.tcp_url

    def version(self) -> str:
        """``redis_version`` from INFO, or ``?``."""
        return self.info("server").get("redis_version", "?")

    def info(self, section: str) -> dict[str, str]:
        """One INFO section as fields."""
        reply = self.server.command("INFO", section)
        return parse_info(reply.decode() if isinstance(reply, bytes) else str(reply))

    def used_memory(self) -> int | None:
        """``used_memory`` (bytes the allocator gave Redis), or None."""
        value = self.info("memory").get("used_memory")
        return int(value) if value is not None else None

    def scan(self, pattern: str, limit: float = 30.0) -> list[bytes]:
        """Every key matching *pattern* (SCAN, bounded to *limit* seconds)."""
        keys: list[bytes] = []
        cursor = b"0"
        deadline = time.monotonic() + limit
        while True:
            reply: Any = self.server.command(
                "SCAN", cursor, "MATCH", pattern, "COUNT", 10000
            )
            cursor, batch = reply
            keys += batch
            if cursor == b"0" or time.monotonic() > deadline:
                return keys

    def client_keys(self, prefix: str) -> list[bytes]:
        """The client records a policyd with *prefix* wrote."""
        return self.scan(_glob_escape(prefix) + "c:*")

    def memory_usage(self, keys: Iterable[bytes], samples: int = 200) -> float | None:
        """Mean ``MEMORY USAGE`` of up to *samples* of *keys*, in bytes."""
        sizes = []
        for key in list(keys)[:samples]:
            size = self.server.command("MEMORY", "USAGE", key, "SAMPLES", 0)
            if isinstance(size, int):
                sizes.append(size)
        return sum(sizes) / len(sizes) if sizes else None

    def signal_sent(self, fault: str) -> None:
        """After the load generator signalled it: reap (kill) or resume (pause)."""
        if fault == "pause":
            self.server.resume()
        else:
            self.server.kill()  # reaps the process the load generator killed

    def ensure_running(self) -> bool:
        """Start it again (empty) if it died; whether it had to."""
        if self.alive():
            return False
        self.server.start()
        pin(self.pid, self.cpus)
        self.restarts += 1
        return True


def _glob_escape(text: str) -> str:
    """*text* with Redis glob characters escaped, for SCAN MATCH."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
