r"""A load generator for Postfix policy servers.

It speaks the policy protocol the way smtpd does: N persistent connections,
one request outstanding per connection (Postfix never pipelines), each reply
validated to be exactly ``action=VALUE\n\n``.  Requests are realistic RCPT-time
requests with every attribute smtpd sends (see :func:`build_pool`), generated
before the run so that generating them costs nothing while measuring.

It reports requests/s, latency percentiles, errors (timeouts, closed
connections, malformed replies, failed connects), the mix of actions received,
its own CPU time, and, given the server's PID, the server's CPU time per
request (from ``/proc/PID/stat`` before and after the measured window).

Why the load is driven from C.  The bare Twisted DUNNO server
(``bench/baseline.py``) spends about 21-25 us of CPU per request, so to keep
its core saturated a client on the other core must spend clearly less than
that per request, with headroom for noise.  Measured on the 2-core
development VM against the baseline at 100 and 1000 connections (server and
client pinned to one core each, nice -10, same requests), with the three
engines of this file (``--engine``):

=========  ===========  ============  =========  ========================
engine     req/s        client cores  client us  server cores
=========  ===========  ============  =========  ========================
asyncio    34-46k       0.70-1.00     15-28      0.89-0.97 (often starved)
uvloop     40-47k       0.50-0.57     11-14      1.00
c          42-46k       0.35-0.38     8-9        1.00
=========  ===========  ============  =========  ========================

``asyncio`` (a raw ``asyncio.Protocol``, pre-encoded requests) costs about
as much per request as the server: it usually burns its whole core and
leaves the server idle part of the time, so it is the bottleneck.
``uvloop`` would do, but it is a PyPI package a fresh machine lacks, and it
takes over half a core.  The C driver (``bench/policyload.c``, one epoll
loop) costs 8-9 us per request, most of it the kernel's loopback TCP work
that any client pays, so it is the default: ``cc -O2`` compiles it into a
temporary directory at run time, and gcc is on every machine we target.
Several Python client processes are no way out on 2 cores: each one takes
CPU from the server it should saturate.  The Python engines remain as a
fallback (``--engine auto`` uses them when no C compiler is found) and for
comparison.  Every run reports the client's own CPU, so a reader can check
that it was not the bottleneck.

Paced (open-loop) runs, ``--rate R``: instead of keeping a request in flight,
each connection sends R requests a second on a jittered schedule of its own,
as an smtpd process asks when its SMTP client gets there; a request that
falls due while the connection's previous reply is outstanding goes out when
the reply comes and counts as *late* (see ``policyload.c``).  Then the
server's CPU per request is read from ``/proc/PID/task/*/schedstat`` in
nanoseconds, as the few clock ticks of a lightly loaded window are too coarse.
``--fresh`` makes every session's client new (address, names, HELO): what a
botnet flood looks like to a policy server.

Usage::

    python bench/loadgen.py --port 10040 --connections 100 --duration 10 \
        --server-pid 12345 [--json]
    python bench/loadgen.py --port 10040 --connections 100 --rate 10 --fresh \
        --server-pid 12345

Traffic goes only to the given loopback address (127.0.0.1 or ::1); every run
is bounded by its duration (or count) and by a connect time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import importlib
import importlib.util
import ipaddress
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DRIVER_SOURCE = HERE / "policyload.c"
LOOPBACK_HOSTS = ("127.0.0.1", "::1")
ENGINES = ("auto", "c", "uvloop", "asyncio")
#: How a paced connection's gaps are drawn (see policyload.c): uniformly
#: between 0.5 and 1.5 times the mean, or exponentially (Poisson arrivals).
JITTERS = ("uniform", "exponential")
_JITTER_FLAGS = {"uniform": "uniform", "exponential": "exp"}

# ---------------------------------------------------------------------------
# Request generation
# ---------------------------------------------------------------------------

# Names that look like real mail hosts without belonging to anyone in
# particular.  Only payload text: nothing is ever resolved or contacted.
_ORGS = (
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka",
    "tyrell", "cyberdyne", "soylent", "vandelay", "oscorp", "aperture", "gringotts",
    "monsters", "dunder", "prestige", "massive", "sirius", "nakatomi", "zorg",
)  # fmt: skip
_TLDS = ("com", "net", "org", "de", "fr", "co.uk", "io", "nl", "it", "com.br")
_MX_PREFIXES = ("mail", "mx1", "mx2", "smtp", "out", "mta3", "o1.email", "outbound")
_USERS = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan",
    "judy", "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent",
    "victor", "walter", "info", "sales", "support", "billing", "noreply",
    "newsletter", "postmaster", "jobs", "admin",
)  # fmt: skip
_LOCAL_DOMAINS = ("example.org", "mail.example.net", "lists.example.com")
_FREEMAIL = ("gmail.com", "yahoo.com", "outlook.com", "mail.ru", "qq.com")
# HELO names that spam bots and misconfigured hosts send.
_BARE_HELOS = (
    "localhost", "User", "ylmf-pc", "WIN-3K1J2PQ8R4L", "DESKTOP-7QK2M1", "mail",
    "friend", "ADMIN", "host", "smtp.localdomain",
)  # fmt: skip
_TLS_CHOICES = (
    ("TLSv1.3", "TLS_AES_256_GCM_SHA384", "256"),
    ("TLSv1.3", "TLS_AES_128_GCM_SHA256", "128"),
    ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256", "256"),
    ("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384", "256"),
)
# Addresses our MX listens on, from the documentation ranges (RFC 5737/3849).
_SERVER_V4 = "203.0.113.25"
_SERVER_V6 = "2001:db8::25"


@dataclasses.dataclass(frozen=True)
class PoolOptions:
    """What the generated request mix looks like."""

    requests: int = 20000
    """Generate whole sessions until at least this many requests exist."""
    clients: int = 2000
    """Distinct SMTP clients (addresses) that the requests come from."""
    ipv6_share: float = 0.1
    """Share of clients with an IPv6 address."""
    suspicious_share: float = 0.15
    """Share of clients that look like bots: no or forged PTR, odd HELO."""
    stress_share: float = 0.0
    """Share of smtpd processes (sessions) that report ``stress=yes``."""
    smtpd_processes: int = 100
    """Distinct smtpd PIDs that ``instance`` values are built from."""
    seed: int = 1
    fresh: bool = False
    """A new client for every session (``clients`` is then unused): an address
    no other session of the pool has (IPv6: a /64 of its own, as policyd keys
    IPv6 clients by /64), and names and HELO under a domain of its own."""


@dataclasses.dataclass(frozen=True)
class _Client:
    address: str
    name: str
    reverse_name: str
    helo: str
    protocol_name: str
    suspicious: bool
    domain: str


def _public_ipv4(rng: random.Random) -> str:
    while True:
        addr = ipaddress.IPv4Address(rng.getrandbits(32))
        if addr.is_global and not addr.is_multicast:
            return str(addr)


def _public_ipv6(rng: random.Random) -> str:
    while True:
        # 2000::/3 is global unicast; mostly /64s with small interface ids,
        # some EUI-64-looking ones, as seen from real MTAs.
        net = (0x2 << 61) | rng.getrandbits(61)
        iid = rng.getrandbits(16) if rng.random() < 0.7 else rng.getrandbits(64)
        addr = ipaddress.IPv6Address((net << 64) | iid)
        if addr.is_global:
            return str(addr)


def _domain(rng: random.Random) -> str:
    org = rng.choice(_ORGS)
    if rng.random() < 0.5:
        org += str(rng.randrange(1, 400))
    return f"{org}.{rng.choice(_TLDS)}"


def _address_key(address: str) -> str:
    """What makes two clients one: the address (IPv4) or its /64 (IPv6)."""
    if ":" not in address:
        return address
    return format(int(ipaddress.IPv6Address(address)) >> 64, "x") + "::/64"


def _make_client(
    rng: random.Random,
    opts: PoolOptions,
    serial: int | None = None,
    seen: set[str] | None = None,
) -> _Client:
    """A client; with *serial*, a fresh one (see `PoolOptions.fresh`).

    A fresh client's address is drawn again until its key is not in *seen*
    (then added), and its domain carries *serial*, so that its names, HELO
    and sender domain are its own too.
    """
    v6 = rng.random() < opts.ipv6_share
    address = _public_ipv6(rng) if v6 else _public_ipv4(rng)
    if seen is not None:
        while _address_key(address) in seen:
            address = _public_ipv6(rng) if v6 else _public_ipv4(rng)
        seen.add(_address_key(address))
    if serial is None:
        domain = _domain(rng)
    else:
        domain = f"{rng.choice(_ORGS)}{serial}.{rng.choice(_TLDS)}"
    if rng.random() >= opts.suspicious_share:
        name = f"{rng.choice(_MX_PREFIXES)}.{domain}"
        reverse = name
        if rng.random() < 0.03:  # temporary DNS trouble: verified name missing
            name = "unknown"
        helo = (
            reverse if rng.random() < 0.85 else f"{rng.choice(_MX_PREFIXES)}.{domain}"
        )
        return _Client(address, name, reverse, helo, "ESMTP", False, domain)
    # Bots: a dynamic-looking PTR that does not resolve back, or no PTR at all,
    # and a HELO that is a bare word, an address literal, or someone else's name.
    if rng.random() < 0.6:
        dashed = address.replace(".", "-").replace(":", "-")
        reverse = f"{rng.choice(('dsl', 'dyn', 'cpe', 'host', 'ip'))}-{dashed}.{domain}"
    else:
        reverse = "unknown"
    kind = rng.random()
    if kind < 0.4:
        helo = rng.choice(_BARE_HELOS)
    elif kind < 0.7:
        helo = f"[{address}]" if not v6 else f"[IPv6:{address}]"
    elif kind < 0.9:
        helo = rng.choice(_FREEMAIL)
    else:
        helo = reverse if reverse != "unknown" else rng.choice(_BARE_HELOS)
    proto = "SMTP" if rng.random() < 0.3 else "ESMTP"
    return _Client(address, "unknown", reverse, helo, proto, True, domain)


def _sender(rng: random.Random, client: _Client) -> str:
    r = rng.random()
    if client.suspicious:
        if r < 0.1:
            return ""
        if r < 0.6:
            return f"{rng.choice(_USERS)}{rng.randrange(10000)}@{rng.choice(_FREEMAIL)}"
        return f"{rng.choice(_USERS)}@{rng.choice(_LOCAL_DOMAINS)}"  # forged local
    if r < 0.05:
        return ""  # null sender: bounces and DSNs
    if r < 0.12:  # VERP and SRS senders: values with '=' in them
        tag = f"{rng.getrandbits(32):08x}-{rng.choice(_USERS)}"
        return f"bounce+{tag}=example.org@{client.domain}"
    if r < 0.16:
        return (
            f"SRS0={rng.getrandbits(16):04x}={rng.choice('ABCDEFGH')}{rng.randrange(10)}="
            f"{_domain(rng)}={rng.choice(_USERS)}@{client.domain}"
        )
    return f"{rng.choice(_USERS)}@{client.domain}"


def _recipient(rng: random.Random, client: _Client) -> str:
    if client.suspicious and rng.random() < 0.5:  # dictionary attack
        return f"{rng.choice(_USERS)}{rng.randrange(1000)}@{rng.choice(_LOCAL_DOMAINS)}"
    return f"{rng.choice(_USERS)}@{rng.choice(_LOCAL_DOMAINS)}"


def _encode(attrs: Sequence[tuple[str, str]]) -> bytes:
    return "".join(f"{k}={v}\n" for k, v in attrs).encode() + b"\n"


def build_pool(opts: PoolOptions) -> list[list[bytes]]:
    """Generate the request pool: a list of SMTP sessions, each a list of requests.

    Every request is what Postfix smtpd (3.8, with SASL and TLS built in) sends
    for a ``check_policy_service`` in ``smtpd_recipient_restrictions``: all 31
    attributes in smtpd's order, ``protocol_state=RCPT``.  A session is one
    SMTP connection handled by one smtpd process: one or more mail
    transactions (each with its own ``instance``), each with one or more RCPTs.
    ``queue_id`` is empty for a transaction's first RCPT and set afterwards,
    as with ``smtpd_delay_open_until_valid_rcpt=yes``.  About 5% of the
    sessions are SASL-authenticated submissions on port 587.

    Each session's client is drawn at random from ``opts.clients`` clients
    made up front, or, with ``opts.fresh``, made for that session alone.
    The share of bot-like clients (``suspicious_share``) and the rest of the
    mix are the same either way.
    """
    rng = random.Random(opts.seed)
    clients = (
        []
        if opts.fresh
        else [_make_client(rng, opts) for _ in range(max(1, opts.clients))]
    )
    seen: set[str] = set()
    pids = [rng.randrange(1000, 4_000_000) for _ in range(max(1, opts.smtpd_processes))]
    stressed = {pid for pid in pids if rng.random() < opts.stress_share}
    seq = dict.fromkeys(pids, 0)
    now = 1_767_225_600  # 2026-01-01T00:00:00Z; instances move forward from here
    sessions: list[list[bytes]] = []
    total = 0
    while total < opts.requests:
        if opts.fresh:
            client = _make_client(rng, opts, len(sessions), seen)
        else:
            client = rng.choice(clients)
        pid = rng.choice(pids)
        submission = not client.suspicious and rng.random() < 0.05
        sasl_user = f"{rng.choice(_USERS)}@{client.domain}" if submission else ""
        v6 = ":" in client.address
        tls = (
            rng.choice(_TLS_CHOICES)
            if submission or (not client.suspicious and rng.random() < 0.75)
            else ("", "", "0")
        )
        fingerprint = ""
        if tls[0] and rng.random() < 0.02:
            fingerprint = ":".join(f"{rng.getrandbits(8):02X}" for _ in range(32))
        client_port = str(rng.randrange(1024, 65536))
        n_tx = 1 if rng.random() < 0.85 else rng.randrange(2, 4)
        session: list[bytes] = []
        for _ in range(n_tx):
            now += rng.randrange(0, 3)
            seq[pid] += 1
            instance = f"{pid:x}.{now:x}.{rng.randrange(1_000_000):x}.{seq[pid]:x}"
            sender = f"{sasl_user}" if submission else _sender(rng, client)
            size = "0" if rng.random() < 0.3 else str(rng.randrange(800, 5_000_000))
            if client.suspicious and rng.random() < 0.3:
                n_rcpt = rng.randrange(2, 11)
            else:
                n_rcpt = 1 if rng.random() < 0.7 else rng.randrange(2, 6)
            queue_id = ""
            for r in range(n_rcpt):
                attrs = (
                    ("request", "smtpd_access_policy"),
                    ("protocol_state", "RCPT"),
                    ("protocol_name", client.protocol_name),
                    ("helo_name", client.helo),
                    ("queue_id", queue_id),
                    ("sender", sender),
                    ("recipient", _recipient(rng, client)),
                    ("recipient_count", "0"),
                    ("client_address", client.address),
                    ("client_name", client.name),
                    ("reverse_client_name", client.reverse_name),
                    ("instance", instance),
                    ("sasl_method", "PLAIN" if submission else ""),
                    ("sasl_username", sasl_user),
                    ("sasl_sender", ""),
                    ("size", size),
                    ("ccert_subject", ""),
                    ("ccert_issuer", ""),
                    ("ccert_fingerprint", fingerprint),
                    ("ccert_pubkey_fingerprint", ""),
                    ("encryption_protocol", tls[0]),
                    ("encryption_cipher", tls[1]),
                    ("encryption_keysize", tls[2]),
                    ("etrn_domain", ""),
                    ("stress", "yes" if pid in stressed else ""),
                    ("client_port", client_port),
                    ("policy_context", ""),
                    ("server_address", _SERVER_V6 if v6 else _SERVER_V4),
                    ("server_port", "587" if submission else "25"),
                    ("compatibility_level", "3.6"),
                    ("mail_version", "3.8.6"),
                )
                session.append(_encode(attrs))
                if r == 0:
                    queue_id = f"{rng.getrandbits(40):010X}"
        sessions.append(session)
        total += len(session)
    return sessions


def build_fill_sessions(start: int, count: int) -> list[list[bytes]]:
    """*count* one-request sessions from distinct clean clients numbered from *start*.

    For filling a server's client table quickly (``run.py --tracked``): client
    *i* gets an address of its own (IPv4 from 11.0.0.0 up; every tenth an IPv6
    address in a /64 of its own, as the tracker keys IPv6 by /64), a verified
    name that matches its PTR and HELO, and one RCPT with a fresh ``instance``.
    Only the attributes a policy decision reads are sent, to keep a million
    requests small; all of them look like a clean MTA, so that no request is
    refused (and logged) while filling, whatever the stress level.
    """
    sessions: list[list[bytes]] = []
    for i in range(start, start + count):
        if i % 10 == 9:
            address = f"2a0b:{(i >> 16) & 0xFFFF:x}:{i & 0xFFFF:x}:19::25"
        else:
            n = 0x0B000000 + i
            address = f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        name = f"mx{i % 3}.org{i}.example.net"
        sessions.append(
            [
                (
                    "request=smtpd_access_policy\nprotocol_state=RCPT\n"
                    f"protocol_name=ESMTP\nhelo_name={name}\nqueue_id=\n"
                    f"sender=news@org{i}.example.net\nrecipient=info@example.org\n"
                    f"client_address={address}\nclient_name={name}\n"
                    f"reverse_client_name={name}\ninstance=f{i:x}.6955b901.0.1\n"
                    "sasl_username=\nstress=\nserver_address=203.0.113.25\n"
                    "server_port=25\n\n"
                ).encode()
            ]
        )
    return sessions


def pool_addresses(sessions: Sequence[Sequence[bytes]]) -> set[str]:
    """The distinct ``client_address`` values of a pool."""
    found: set[str] = set()
    for session in sessions:
        for req in session:
            start = req.find(b"\nclient_address=")
            if start >= 0:
                start += len(b"\nclient_address=")
                found.add(req[start : req.index(b"\n", start)].decode())
    return found


def write_pool(sessions: Sequence[Sequence[bytes]], path: Path) -> None:
    """Write the pool in the binary layout that ``policyload.c`` reads."""
    requests = [req for session in sessions for req in session]
    firsts = [0]
    for session in sessions:
        firsts.append(firsts[-1] + len(session))
    offsets = [0]
    for req in requests:
        offsets.append(offsets[-1] + len(req))
    with path.open("wb") as f:
        f.write(b"PLP1")
        f.write(struct.pack("<II", len(requests), len(sessions)))
        f.write(struct.pack(f"<{len(firsts)}I", *firsts))
        f.write(struct.pack(f"<{len(offsets)}I", *offsets))
        for req in requests:
            f.write(req)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Companion:
    """A helper process of the server under test, watched over the same window.

    ``bench/run.py`` gives the redis-server of a Redis-backed policyd: its CPU
    time and run-queue wait are read at the start and the end of the measured
    window, like the server's.  With *signal*, the load generator sends it
    that signal at the very moment the measured window begins (SIGKILL: the
    window is then exactly the answers after Redis died).
    """

    pid: int
    signal: int | None = None


@dataclasses.dataclass(frozen=True)
class TimeSlice:
    """The answers completed in one slice of the measured window."""

    start_s: float
    end_s: float
    count: int
    p50_us: float
    p99_us: float
    max_us: float


def latency_timeline(
    latencies_ns: Sequence[int],
    done_ns: Sequence[int],
    window_s: float,
    step_s: float,
) -> list[TimeSlice]:
    """Latency percentiles per *step_s* slice of the window, by completion time.

    *done_ns*[i] is when the answer of *latencies_ns*[i] came, in nanoseconds
    since the window began.  Every slice of the window is listed, empty ones
    too (count 0, percentiles 0), so that a stall shows as a gap.  The window
    is cut into round(window_s / step_s) slices (at least one); the last one
    ends with the window and takes every later answer.
    """
    if step_s <= 0:
        raise ValueError("step_s must be positive")
    n = max(1, round(window_s / step_s))
    buckets: list[list[int]] = [[] for _ in range(n)]
    step_ns = step_s * 1e9
    for latency, done in zip(latencies_ns, done_ns, strict=True):
        buckets[min(n - 1, max(0, int(done // step_ns)))].append(latency)
    slices = []
    for i, bucket in enumerate(buckets):
        bucket.sort()
        slices.append(
            TimeSlice(
                start_s=i * step_s,
                end_s=window_s if i == n - 1 else (i + 1) * step_s,
                count=len(bucket),
                p50_us=_percentile(bucket, 50) / 1e3,
                p99_us=_percentile(bucket, 99) / 1e3,
                max_us=(bucket[-1] / 1e3) if bucket else 0.0,
            )
        )
    return slices


@dataclasses.dataclass
class LoadResult:
    """What one load run measured.  Times are seconds unless named ``_us``."""

    engine: str
    connections: int
    connected: int
    window_s: float
    completed: int
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    errors: dict[str, int]
    actions: dict[str, int]
    loadgen_cpu_s: float
    loadgen_cores: float
    loadgen_us_per_req: float
    server_cpu_s: float | None
    server_cores: float | None
    server_us_per_req: float | None
    machine_busy_cores: float | None
    machine_steal_cores: float | None
    warmup_completed: int
    connect_s: float
    server_wait_s: float | None = None
    """Run-queue wait of the server's threads: ready to run, CPU taken."""
    loadgen_wait_s: float | None = None
    """The same for the load generator."""
    first_malformed: str = ""
    companion_cpu_s: float | None = None
    """CPU time of the `Companion` (a Redis) over the window."""
    companion_wait_s: float | None = None
    """Its run-queue wait over the window."""
    signal_error: int | None = None
    """The errno of sending the companion its signal: 0 sent, None not asked."""
    timeline: list[TimeSlice] | None = None
    """Latencies per slice of the window, when asked for."""
    rate: float = 0.0
    """Paced runs: the requests per second asked of each connection (0:
    saturated, every connection always has a request in flight)."""
    jitter: str = ""
    """Paced runs: how the gaps were drawn (`JITTERS`)."""
    paced_sent: int | None = None
    """Paced runs: requests sent in the window."""
    late: int | None = None
    """Paced runs: of those, the ones that fell due while the previous reply
    of their connection was outstanding, sent when it came."""
    late_lag_max_us: float | None = None
    """Paced runs: the longest a late request waited past its time."""
    sessions_used: int | None = None
    """Sessions the run took from the pool (warm-up included)."""
    cpu_source: str = "stat"
    """Where ``server_cpu_s`` comes from: ``stat`` (``/proc/PID/stat``, clock
    ticks) or ``schedstat`` (``/proc/PID/task/*/schedstat``, nanoseconds)."""

    @property
    def offered_rps(self) -> float | None:
        """Paced runs: the rate asked of all connections together."""
        return self.rate * self.connections if self.rate > 0 else None

    @property
    def late_share(self) -> float | None:
        """Paced runs: late requests / requests sent in the window."""
        if self.late is None or not self.paced_sent:
            return None
        return self.late / self.paced_sent

    @property
    def companion_us_per_req(self) -> float | None:
        """The companion's CPU per request answered, in microseconds."""
        if self.companion_cpu_s is None or not self.completed:
            return None
        return self.companion_cpu_s * 1e6 / self.completed

    @property
    def contention(self) -> float | None:
        """Largest share of the window that the server or the client waited for CPU.

        A clean run on an otherwise idle machine stays near 0; a few percent
        means something else (another tenant, a test run) competed for a core
        and the figures of this run are suspect.  A companion (the server's
        Redis) pinned to the server's CPU makes the server wait while it runs:
        that part of the server's wait, at most the companion's CPU time, is
        not counted, as it is the server's own setup and not a neighbour.
        """
        server = self.server_wait_s
        if server is not None and self.companion_cpu_s is not None:
            server = max(0.0, server - self.companion_cpu_s)
        waits = [w for w in (server, self.loadgen_wait_s) if w is not None]
        if not waits or self.window_s <= 0:
            return None
        return max(waits) / self.window_s

    @property
    def error_total(self) -> int:
        """All errors of the measured window."""
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        d = dataclasses.asdict(self)
        d["error_total"] = self.error_total
        d["contention"] = self.contention
        d["companion_us_per_req"] = self.companion_us_per_req
        d["offered_rps"] = self.offered_rps
        d["late_share"] = self.late_share
        return d


def _percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


def _make_result(
    *,
    engine: str,
    connections: int,
    connected: int,
    window_s: float,
    latencies_ns: Sequence[int],
    errors: dict[str, int],
    actions: dict[str, int],
    loadgen_cpu_s: float,
    server_cpu_s: float | None,
    machine_busy_s: float | None,
    machine_steal_s: float | None,
    warmup_completed: int,
    connect_s: float,
    first_malformed: str,
    server_wait_s: float | None = None,
    loadgen_wait_s: float | None = None,
    companion_cpu_s: float | None = None,
    companion_wait_s: float | None = None,
    signal_error: int | None = None,
    done_ns: Sequence[int] | None = None,
    timeline_step: float = 0.0,
    paced: dict[str, Any] | None = None,
) -> LoadResult:
    timeline = None
    if timeline_step > 0 and done_ns is not None:
        timeline = latency_timeline(latencies_ns, done_ns, window_s, timeline_step)
    lat = sorted(latencies_ns)
    n = len(lat)
    window = window_s if window_s > 0 else float("nan")
    per_req = 1e6 / n if n else float("nan")
    return LoadResult(
        engine=engine,
        connections=connections,
        connected=connected,
        window_s=window_s,
        completed=n,
        rps=n / window,
        p50_us=_percentile(lat, 50) / 1e3,
        p90_us=_percentile(lat, 90) / 1e3,
        p99_us=_percentile(lat, 99) / 1e3,
        max_us=(lat[-1] / 1e3) if lat else 0.0,
        errors=errors,
        actions=dict(sorted(actions.items(), key=lambda kv: -kv[1])),
        loadgen_cpu_s=loadgen_cpu_s,
        loadgen_cores=loadgen_cpu_s / window,
        loadgen_us_per_req=loadgen_cpu_s * per_req,
        server_cpu_s=server_cpu_s,
        server_cores=None if server_cpu_s is None else server_cpu_s / window,
        server_us_per_req=None if server_cpu_s is None else server_cpu_s * per_req,
        machine_busy_cores=None if machine_busy_s is None else machine_busy_s / window,
        machine_steal_cores=None
        if machine_steal_s is None
        else machine_steal_s / window,
        warmup_completed=warmup_completed,
        connect_s=connect_s,
        server_wait_s=server_wait_s,
        loadgen_wait_s=loadgen_wait_s,
        first_malformed=first_malformed,
        companion_cpu_s=companion_cpu_s,
        companion_wait_s=companion_wait_s,
        signal_error=signal_error,
        timeline=timeline,
        **(paced or {}),
    )


def format_optional(value: float | None, fmt: str = ".1f") -> str:
    """Format a number that may be missing (then ``n/a``)."""
    return "n/a" if value is None else format(value, fmt)


def format_result(res: LoadResult, title: str = "") -> str:
    """Render one result as a small human-readable table."""
    opt = format_optional

    total = max(1, sum(res.actions.values()))
    mix = "  ".join(f"{k} {v / total:.1%}" for k, v in res.actions.items()) or "none"
    errs = "  ".join(f"{k} {v}" for k, v in res.errors.items())
    lines = [
        title or f"policy load, engine {res.engine}",
        f"  connections        {res.connected}/{res.connections} up "
        f"(connect {res.connect_s:.2f} s, warm-up requests {res.warmup_completed:,})",
        f"  measured window    {res.window_s:.2f} s, {res.completed:,} requests",
        f"  throughput         {res.rps:,.0f} req/s"
        + (
            f" of {res.offered_rps:,.0f} offered ({res.rate:g}/s per connection, "
            f"{res.jitter} gaps)"
            if res.offered_rps
            else ""
        ),
        f"  latency (us)       p50 {res.p50_us:,.0f}  p90 {res.p90_us:,.0f}  "
        f"p99 {res.p99_us:,.0f}  max {res.max_us:,.0f}",
        f"  errors             {errs}  (total {res.error_total})",
        f"  actions            {mix}",
        f"  load generator CPU {res.loadgen_cpu_s:.2f} s = "
        f"{res.loadgen_cores:.2f} cores, {res.loadgen_us_per_req:.1f} us/req",
        f"  server CPU         {opt(res.server_cpu_s, '.2f')} s = "
        f"{opt(res.server_cores, '.2f')} cores, "
        f"{opt(res.server_us_per_req, '.1f')} us/req",
        f"  machine            busy {opt(res.machine_busy_cores, '.2f')} cores, "
        f"steal {opt(res.machine_steal_cores, '.2f')} cores",
        f"  waited for CPU     server {opt(res.server_wait_s, '.3f')} s, "
        f"load generator {opt(res.loadgen_wait_s, '.3f')} s "
        f"(contention {opt(res.contention, '.1%')})",
    ]
    if res.late is not None:
        lines.append(
            f"  late               {res.late:,} of {res.paced_sent or 0:,} sent "
            f"({opt(res.late_share, '.1%')}), at most "
            f"{opt(res.late_lag_max_us, ',.0f')} us behind"
        )
    if res.companion_cpu_s is not None:
        lines.append(
            f"  companion CPU      {res.companion_cpu_s:.2f} s, "
            f"{opt(res.companion_us_per_req)} us/req"
        )
    if res.first_malformed:
        lines.append(f"  first bad reply    {res.first_malformed}")
    if res.loadgen_cores > 0.9 and (res.server_cores or 0.0) < 0.9:
        lines.append(
            "  WARNING: the load generator used a whole core; it may be the bottleneck"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# CPU accounting helpers (Linux /proc)
# ---------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """Return utime + stime of a process in seconds, from ``/proc/PID/stat``."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def proc_wait_seconds(pid: int) -> float | None:
    """Run-queue wait of all threads of a process (``/proc/PID/task/*/schedstat``)."""
    total, found = 0, False
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1])
            found = True
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9 if found else None


def machine_cpu_seconds() -> tuple[float, float] | None:
    """Machine-wide busy and steal CPU seconds from ``/proc/stat``."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    v = [int(x) for x in first[1:]] + [0] * 10
    busy = v[0] + v[1] + v[2] + v[5] + v[6]
    return busy / _TICKS, v[7] / _TICKS


# ---------------------------------------------------------------------------
# Engine: the C driver
# ---------------------------------------------------------------------------


def find_compiler() -> str | None:
    """The C compiler to build the driver with: ``$CC``, ``cc`` or ``gcc``."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def compile_driver(workdir: Path) -> Path:
    """Compile ``policyload.c`` with ``cc -O2`` into *workdir*; return the binary."""
    cc = find_compiler()
    if cc is None:
        raise RuntimeError(
            "no C compiler found (set CC, or use --engine uvloop/asyncio)"
        )
    out = workdir / "policyload"
    subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(out), str(DRIVER_SOURCE), "-lm"],
        check=True,
    )
    return out


def _run_c(
    driver: Path,
    pool_file: Path,
    workdir: Path,
    *,
    host: str,
    port: int,
    connections: int,
    warmup: float,
    duration: float,
    count: int,
    timeout: float,
    connect_limit: float,
    server_pid: int | None,
    start_session: int,
    companion: Companion | None = None,
    timeline_step: float = 0.0,
    rate: float = 0.0,
    jitter: str = "uniform",
) -> LoadResult:
    lat_file = workdir / f"latencies-{os.getpid()}-{port}-{connections}.bin"
    done_file = workdir / f"done-{os.getpid()}-{port}-{connections}.bin"
    argv = [
        str(driver),
        "-h", host, "-p", str(port), "-f", str(pool_file), "-o", str(lat_file),
        "-c", str(connections), "-w", str(warmup), "-d", str(duration),
        "-n", str(count), "-t", str(int(timeout * 1000)), "-T", str(connect_limit),
        "-s", str(start_session),
    ]  # fmt: skip
    if server_pid:
        argv += ["-P", str(server_pid)]
    if companion is not None:
        argv += ["-Q", str(companion.pid)]
        if companion.signal is not None:
            argv += ["-k", str(companion.pid), "-S", str(int(companion.signal))]
    if timeline_step > 0:
        argv += ["-e", str(done_file)]
    if rate > 0:
        argv += ["-r", repr(rate), "-J", _JITTER_FLAGS[jitter]]
    limit = connect_limit + warmup + duration + 30
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=limit, check=False
    )
    if proc.returncode not in (0, 130):
        raise RuntimeError(
            f"policyload failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    kv: dict[str, str] = {}
    actions: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        key, _, rest = line.partition(" ")
        if key == "action":
            n, _, name = rest.partition(" ")
            actions[name] = actions.get(name, 0) + int(n)
        else:
            kv[key] = rest
    raw = lat_file.read_bytes()
    lat_file.unlink()
    latencies = struct.unpack(f"={len(raw) // 8}Q", raw)
    done: tuple[int, ...] | None = None
    if timeline_step > 0:
        raw = done_file.read_bytes()
        done_file.unlink()
        done = struct.unpack(f"={len(raw) // 8}Q", raw)
    server_cpu = float(kv["server_cpu_s"])
    paced: dict[str, Any] = {"sessions_used": _optional_int(kv, "sessions_started")}
    if rate > 0:
        paced.update(
            rate=rate,
            jitter=jitter,
            paced_sent=_optional_int(kv, "paced_sent"),
            late=_optional_int(kv, "paced_late"),
            late_lag_max_us=float(kv["late_lag_max_s"]) * 1e6,
        )
        # A paced window holds few clock ticks of server CPU (30 at 1,000
        # req/s and 60 us/req over 5 s): take the nanoseconds of schedstat.
        if "server_sched_cpu_s" in kv and server_cpu >= 0:
            server_cpu = float(kv["server_sched_cpu_s"])
            paced["cpu_source"] = "schedstat"
    return _make_result(
        engine="c",
        connections=connections,
        connected=int(kv["connected"]),
        window_s=float(kv["window_s"]),
        latencies_ns=latencies,
        errors={
            "timeout": int(kv["err_timeout"]),
            "closed": int(kv["err_closed"]),
            "malformed": int(kv["err_malformed"]),
            "connect": int(kv["err_connect"]),
        },
        actions=actions,
        loadgen_cpu_s=float(kv["own_cpu_s"]),
        server_cpu_s=server_cpu if server_cpu >= 0 else None,
        machine_busy_s=float(kv["machine_busy_s"]),
        machine_steal_s=float(kv["machine_steal_s"]),
        warmup_completed=int(kv["warmup_completed"]),
        connect_s=float(kv["connect_s"]),
        first_malformed=kv.get("first_malformed", ""),
        server_wait_s=float(kv["server_wait_s"]) if "server_wait_s" in kv else None,
        loadgen_wait_s=float(kv["own_wait_s"]) if "own_wait_s" in kv else None,
        companion_cpu_s=_optional_float(kv, "companion_cpu_s"),
        companion_wait_s=_optional_float(kv, "companion_wait_s"),
        signal_error=int(kv["signal_errno"]) if "signal_errno" in kv else None,
        done_ns=done,
        timeline_step=timeline_step,
        paced=paced,
    )


def _optional_float(kv: dict[str, str], key: str) -> float | None:
    return float(kv[key]) if key in kv else None


def _optional_int(kv: dict[str, str], key: str) -> int | None:
    return int(kv[key]) if key in kv else None


# ---------------------------------------------------------------------------
# Engine: asyncio (optionally on uvloop)
# ---------------------------------------------------------------------------


class _AsyncRun:
    """Shared state of one asyncio load run."""

    def __init__(self, requests: list[bytes], firsts: list[int], start: int) -> None:
        self.requests = requests
        self.firsts = firsts
        self.cursor = start
        self.measuring = False
        self.latencies: list[int] = []
        self.done_ns: list[int] = []
        self.window_start_ns = 0
        self.actions: collections.Counter[str] = collections.Counter()
        self.errors = {"timeout": 0, "closed": 0, "malformed": 0, "connect": 0}
        self.warmup_completed = 0
        self.count = 0
        self.count_done = asyncio.Event()
        self.first_malformed = ""
        self.clients: list[_AsyncClient] = []
        self.started = False
        self.stopping = False

    def next_session(self) -> tuple[int, int]:
        """Hand out the next whole session as a [first, end) request range."""
        n = len(self.firsts) - 1
        s = self.cursor % n
        self.cursor += 1
        return self.firsts[s], self.firsts[s + 1]

    def error(self, kind: str, data: bytes = b"") -> None:
        """Count an error of the measured window."""
        if self.measuring:
            self.errors[kind] += 1
            if kind == "malformed" and not self.first_malformed:
                self.first_malformed = repr(data[:100])[2:-1]


class _AsyncClient(asyncio.Protocol):
    """One persistent policy connection with one request in flight."""

    def __init__(
        self, run: _AsyncRun, reconnect: Callable[[_AsyncClient], None]
    ) -> None:
        self.run = run
        self.reconnect = reconnect
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.req = 0
        self.req_end = 0
        self.t_start = 0
        self.waiting = False
        self.connected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.connected = True
        if self.run.started:  # else the run starts it once all are connected
            self.send_next()

    def send_next(self) -> None:
        """Send the next request of this connection's session."""
        if self.req >= self.req_end:
            self.req, self.req_end = self.run.next_session()
        self.buf = b""
        self.waiting = True
        self.t_start = time.perf_counter_ns()
        assert self.transport is not None  # noqa: S101 - connected
        self.transport.write(self.run.requests[self.req])

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.waiting:
            self._fail("malformed", buf)
            return
        nl = buf.find(b"\n")
        if nl < 0 or len(buf) == nl + 1:
            if len(buf) > 4096:
                self._fail("malformed", buf)
            else:
                self.buf = buf
            return
        if (
            buf[nl + 1] != 0x0A
            or len(buf) != nl + 2
            or not buf.startswith(b"action=")
            or nl <= 7
            or b"\r" in buf
            or b"\0" in buf
        ):
            self._fail("malformed", buf)
            return
        t = time.perf_counter_ns()
        run = self.run
        self.waiting = False
        self.req += 1
        if run.count_done.is_set():
            return  # the count is reached: the run is ending
        if run.measuring:
            run.latencies.append(t - self.t_start)
            run.done_ns.append(t - run.window_start_ns)
            value = buf[7:nl]
            sp = value.find(b" ")
            run.actions[
                (value if sp < 0 else value[:sp]).decode("latin-1").upper()
            ] += 1
            if run.count and len(run.latencies) >= run.count:
                run.count_done.set()
                return
        else:
            run.warmup_completed += 1
        if not run.stopping:
            self.send_next()

    def timed_out(self, now_ns: int, timeout_ns: int) -> bool:
        """Whether the outstanding request has waited longer than the timeout."""
        return self.waiting and now_ns - self.t_start > timeout_ns

    def _fail(self, kind: str, data: bytes = b"") -> None:
        self.run.error(kind, data)
        self.waiting = False
        if self.transport is not None:
            self.transport.abort()  # connection_lost reconnects

    def connection_lost(self, exc: Exception | None) -> None:
        was_connected, self.connected = self.connected, False
        self.transport = None
        if self.run.stopping:
            return
        if self.waiting and was_connected:
            self.run.error("closed")
        self.waiting = False
        self.reconnect(self)


async def _run_async(
    sessions: Sequence[Sequence[bytes]],
    *,
    host: str,
    port: int,
    connections: int,
    warmup: float,
    duration: float,
    count: int,
    timeout: float,
    connect_limit: float,
    server_pid: int | None,
    start_session: int,
    engine: str,
    companion: Companion | None = None,
    timeline_step: float = 0.0,
) -> LoadResult:
    loop = asyncio.get_running_loop()
    requests = [req for s in sessions for req in s]
    firsts = [0]
    for s in sessions:
        firsts.append(firsts[-1] + len(s))
    run = _AsyncRun(requests, firsts, start_session)
    run.count = count
    tasks: set[asyncio.Task[None]] = set()
    gate = asyncio.Semaphore(64)  # connects in flight, like the C driver

    async def connect(client: _AsyncClient, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        async with gate:
            while not run.stopping:
                try:
                    await asyncio.wait_for(
                        loop.create_connection(lambda: client, host, port), timeout
                    )
                    return
                except (OSError, TimeoutError):
                    run.error("connect")
                    await asyncio.sleep(0.1)

    def reconnect(client: _AsyncClient) -> None:
        task = loop.create_task(connect(client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    run.clients = [_AsyncClient(run, reconnect) for _ in range(connections)]
    t0 = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(connect(c) for c in run.clients)), connect_limit
        )
    connect_s = time.monotonic() - t0
    run.started = True
    for c in run.clients:
        if c.connected:
            c.send_next()
        else:  # its connect was cancelled with the connect phase: go on trying
            reconnect(c)

    async def watch_timeouts() -> None:
        timeout_ns = int(timeout * 1e9)
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter_ns()
            for c in run.clients:
                if c.timed_out(now, timeout_ns):
                    c._fail("timeout")

    watcher = loop.create_task(watch_timeouts())
    await asyncio.sleep(warmup)
    cpu0 = time.process_time()
    srv0 = proc_cpu_seconds(server_pid) if server_pid else None
    sw0 = proc_wait_seconds(server_pid) if server_pid else None
    ow0 = proc_wait_seconds(os.getpid())
    m0 = machine_cpu_seconds()
    cc0 = proc_cpu_seconds(companion.pid) if companion else None
    cw0 = proc_wait_seconds(companion.pid) if companion else None
    run.window_start_ns = time.perf_counter_ns()
    run.measuring = True
    signal_error = None
    if companion is not None and companion.signal is not None:
        try:
            os.kill(companion.pid, companion.signal)
            signal_error = 0
        except OSError as e:
            signal_error = e.errno or -1
    w0 = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.count_done.wait(), duration)
    run.measuring = False
    w1 = time.perf_counter()
    cpu1 = time.process_time()
    srv1 = proc_cpu_seconds(server_pid) if server_pid else None
    sw1 = proc_wait_seconds(server_pid) if server_pid else None
    ow1 = proc_wait_seconds(os.getpid())
    m1 = machine_cpu_seconds()
    cc1 = proc_cpu_seconds(companion.pid) if companion else None
    cw1 = proc_wait_seconds(companion.pid) if companion else None
    run.stopping = True
    watcher.cancel()
    for task in list(tasks):
        task.cancel()
    connected = sum(c.connected for c in run.clients)
    for c in run.clients:
        if c.transport is not None:
            c.transport.abort()
    await asyncio.sleep(0)
    return _make_result(
        engine=engine,
        connections=connections,
        connected=connected,
        window_s=w1 - w0,
        latencies_ns=run.latencies,
        errors=run.errors,
        actions=dict(run.actions),
        loadgen_cpu_s=cpu1 - cpu0,
        server_cpu_s=None if srv0 is None or srv1 is None else srv1 - srv0,
        machine_busy_s=None if m0 is None or m1 is None else m1[0] - m0[0],
        machine_steal_s=None if m0 is None or m1 is None else m1[1] - m0[1],
        warmup_completed=run.warmup_completed,
        connect_s=connect_s,
        first_malformed=run.first_malformed,
        server_wait_s=None if sw0 is None or sw1 is None else sw1 - sw0,
        loadgen_wait_s=None if ow0 is None or ow1 is None else ow1 - ow0,
        companion_cpu_s=None if cc0 is None or cc1 is None else cc1 - cc0,
        companion_wait_s=None if cw0 is None or cw1 is None else cw1 - cw0,
        signal_error=signal_error,
        done_ns=run.done_ns,
        timeline_step=timeline_step,
    )


# ---------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------


def resolve_engine(engine: str) -> str:
    """Turn ``auto`` into the best engine this machine has."""
    if engine != "auto":
        return engine
    if find_compiler():
        return "c"
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


class LoadGenerator:
    """A request pool plus an engine, reusable across many runs.

    Building the pool and compiling the driver happen once; :meth:`run` may be
    called for any number of servers and concurrency levels.  Use it as a
    context manager so that its temporary directory is removed.
    """

    def __init__(self, pool: PoolOptions, engine: str = "auto") -> None:
        self.engine = resolve_engine(engine)
        self.options = pool
        self.sessions = build_pool(pool)
        self.n_requests = sum(len(s) for s in self.sessions)
        self._tmp = tempfile.TemporaryDirectory(prefix="policyd-bench-")
        self.workdir = Path(self._tmp.name)
        self._driver: Path | None = None
        self._pool_file: Path | None = None
        self._runs = 0
        if self.engine == "c":
            self._driver = compile_driver(self.workdir)
            self._pool_file = self.workdir / "pool.bin"
            write_pool(self.sessions, self._pool_file)

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary directory (driver, pool, latency files)."""
        self._tmp.cleanup()

    def run(
        self,
        *,
        host: str = "127.0.0.1",
        port: int,
        connections: int,
        duration: float = 10.0,
        warmup: float = 2.0,
        count: int = 0,
        timeout: float = 10.0,
        connect_limit: float = 30.0,
        server_pid: int | None = None,
        sessions: Sequence[Sequence[bytes]] | None = None,
        companion: Companion | None = None,
        timeline_step: float = 0.0,
        rate: float = 0.0,
        jitter: str = "uniform",
        start_session: int | None = None,
    ) -> LoadResult:
        """Run one bounded load against ``host:port`` and return what it measured.

        Runs for *duration* seconds after *warmup* seconds, or until *count*
        requests completed if *count* is given (still at most *duration*).
        *sessions* replaces the generator's pool for this run only (then it
        starts at the first session).  *companion* is a helper process of the
        server (see `Companion`); *timeline_step* > 0 also reports latencies
        per slice of that many seconds (`LoadResult.timeline`).

        *rate* > 0 makes the run paced (open loop; C engine only): each
        connection sends *rate* requests a second on average, the gaps drawn
        as *jitter* says (`JITTERS`), a request that falls due while its
        connection's previous reply is outstanding is sent when the reply
        comes and counted late.  *start_session* is where in the pool the run
        begins (by default each run starts elsewhere);
        `LoadResult.sessions_used` says how far it went.
        """
        if host not in LOOPBACK_HOSTS:
            raise ValueError(f"refusing to load {host}: loopback only {LOOPBACK_HOSTS}")
        if rate < 0 or jitter not in JITTERS:
            raise ValueError(f"rate {rate!r} or jitter {jitter!r} not understood")
        if rate > 0 and self.engine != "c":
            raise ValueError("paced runs need the C engine (a C compiler)")
        pool_file = self._pool_file
        if sessions is None:
            sessions = self.sessions
            # Each run starts at a different session so repeated runs differ.
            start = (self._runs * 7919) % max(1, len(self.sessions))
            if start_session is not None:
                start = start_session % max(1, len(self.sessions))
            self._runs += 1
        else:
            start = 0
            if self.engine == "c":
                pool_file = self.workdir / "other-pool.bin"
                write_pool(sessions, pool_file)
        if self.engine == "c":
            assert self._driver is not None  # noqa: S101 - set for engine c
            assert pool_file is not None  # noqa: S101
            return _run_c(
                self._driver, pool_file, self.workdir,
                host=host, port=port, connections=connections, warmup=warmup,
                duration=duration, count=count, timeout=timeout,
                connect_limit=connect_limit, server_pid=server_pid,
                start_session=start, companion=companion,
                timeline_step=timeline_step, rate=rate, jitter=jitter,
            )  # fmt: skip
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
        if self.engine == "uvloop":
            # Imported by name: uvloop is optional and not among the project's
            # dependencies, so mypy must not go looking for it.
            loop_factory = importlib.import_module("uvloop").new_event_loop
        coro = _run_async(
            sessions, host=host, port=port, connections=connections,
            warmup=warmup, duration=duration, count=count, timeout=timeout,
            connect_limit=connect_limit, server_pid=server_pid,
            start_session=start, engine=self.engine, companion=companion,
            timeline_step=timeline_step,
        )  # fmt: skip
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(coro)


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards *wanted*; return the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the request-mix options shared by loadgen.py and run.py."""
    d = PoolOptions()
    g = parser.add_argument_group("request mix")
    g.add_argument(
        "--pool", type=int, default=d.requests, help="requests to pre-generate"
    )
    g.add_argument("--clients", type=int, default=d.clients, help="client address pool")
    g.add_argument("--ipv6-share", type=float, default=d.ipv6_share)
    g.add_argument("--suspicious-share", type=float, default=d.suspicious_share)
    g.add_argument("--stress-share", type=float, default=d.stress_share)
    g.add_argument("--seed", type=int, default=d.seed)


def pool_options(args: argparse.Namespace, *, fresh: bool = False) -> PoolOptions:
    """The :class:`PoolOptions` given on the command line (*fresh*: see there)."""
    return PoolOptions(
        requests=args.pool,
        clients=args.clients,
        ipv6_share=args.ipv6_share,
        suspicious_share=args.suspicious_share,
        stress_share=args.stress_share,
        seed=args.seed,
        fresh=fresh,
    )


#: Requests a session of `build_pool` holds, rounded up (the mean is about 2.4).
SESSION_REQUESTS = 3


def paced_requests(offered_rps: float, seconds: float, connections: int) -> int:
    """About how many requests of the pool one paced run takes.

    The offered rate over *seconds* (warm-up and window), plus one session per
    connection: the one each holds when the run stops, whose rest the next run
    that starts after it skips.
    """
    return math.ceil(offered_rps * seconds + connections * SESSION_REQUESTS)


def main(argv: list[str] | None = None) -> int:
    """Command line: one load run against a running server."""
    parser = argparse.ArgumentParser(
        description="Drive a Postfix policy server with realistic RCPT requests."
    )
    parser.add_argument("--host", default="127.0.0.1", choices=LOOPBACK_HOSTS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", "-c", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds")
    parser.add_argument(
        "--count",
        type=int,
        default=0,
        help="stop after this many requests (0: by time)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="reply timeout, s")
    parser.add_argument(
        "--connect-limit",
        type=float,
        default=30.0,
        help="s to wait for all connections before starting anyway",
    )
    parser.add_argument("--server-pid", type=int, help="PID whose CPU time to measure")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="paced (open loop): requests/s per connection; 0: saturated, one "
        "request always in flight [0]",
    )
    parser.add_argument(
        "--jitter",
        choices=JITTERS,
        default=JITTERS[0],
        help="paced: gaps uniform in 0.5-1.5x the mean, or exponential [uniform]",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="a new client (address, names, HELO) for every session; paced, the "
        "pool is made large enough not to come round during the run",
    )
    parser.add_argument("--engine", choices=ENGINES, default="auto")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    parser.add_argument("--dump-request", action="store_true", help="print one request")
    add_pool_arguments(parser)
    args = parser.parse_args(argv)

    if args.dump_request:
        sessions = build_pool(dataclasses.replace(pool_options(args), requests=1))
        sys.stdout.write(sessions[0][0].decode())
        return 0
    if args.rate < 0:
        parser.error("--rate must not be negative")
    opts = pool_options(args, fresh=args.fresh)
    if args.fresh and args.rate > 0:
        need = paced_requests(
            args.rate * args.connections, args.warmup + args.duration, args.connections
        )
        opts = dataclasses.replace(opts, requests=max(opts.requests, need))
    raise_fd_limit(args.connections + 64)
    with LoadGenerator(opts, args.engine) as gen:
        res = gen.run(
            host=args.host,
            port=args.port,
            connections=args.connections,
            duration=args.duration,
            warmup=args.warmup,
            count=args.count,
            timeout=args.timeout,
            connect_limit=args.connect_limit,
            server_pid=args.server_pid,
            rate=args.rate,
            jitter=args.jitter,
        )
        if args.fresh and (res.sessions_used or 0) > len(gen.sessions):
            print(
                f"warning: the run took {res.sessions_used:,} sessions of a pool of "
                f"{len(gen.sessions):,}: clients came round again (raise --pool)",
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
    else:
        print(format_result(res, f"{args.host}:{args.port}, engine {res.engine}"))
    return 0 if res.completed else 1


if __name__ == "__main__":
    sys.exit(main())
