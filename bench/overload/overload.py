r"""
The overload scenario: bots exhaust a real Postfix's smtpd processes.

Does policyd keep legitimate mail flowing?  One command (as root; see
docs/overload.md)::

    python bench/overload/overload.py --docs docs/

runs, one after the other, against one private Postfix instance (restarted
for each run):

=================  =======  ==========================================
run                bots     policyd
=================  =======  ==========================================
``baseline``       no       none
``no-policyd``     yes      in dry run, wired at CONNECT (never refuses)
``rcpt``           yes      wired in smtpd_recipient_restrictions
``connect``        yes      wired in smtpd_client_restrictions,
                            ``smtpd_delay_reject=no``
``connect-nice``   yes,     as ``connect``; the bots' client process
                   niced    runs at nice 19, as if on other machines
``connect-pause``  yes,     as ``connect``
                   1 s
                   pause
=================  =======  ==========================================

and the runs of issue 10, against bots with the identities real botnets
show (`crowd.bot_identities`): ``mixed-no-policyd`` (dry run),
``mixed-rcpt``, ``mixed`` (CONNECT + RCPT), ``mixed-fixed-bar`` and
``mixed-no-step`` (the bar fixed, or lowered at once), ``mixed-nice``,
``mixed-clean`` (some bots with clean names), ``wide`` (thousands of
addresses over many /24s and /64s), ``weak`` (two legitimate senders
without PTR), and ``surge-no-policyd`` / ``surge`` (no bots, three clean
senders per process).  `DEFAULT_RUNS` is what runs without ``--runs``.  It
prints, for each, what the legitimate senders got done while the bots
were flooding, where the bots were refused, and policyd's stress level over
time; ``--docs DIR`` also writes ``overload-results.md`` (the table) and
``overload.png`` (legitimate messages per second over time) there.

How the runner stages a flood (and why):

* Postfix and policyd run in a private network namespace, the clients
  outside it (`policyd.testing.netns.NetworkNamespace`): master(8) only
  enters stress mode for a listener that is not loopback-only.  Without a
  namespace (``ip netns`` unavailable) the listener gets ``-o stress=yes``
  for every run instead, and the output says so.  The Postfix instance and
  policyd are those of the test bed (`policyd.testing`); the runner
  installs Debian's postfix and iproute2 with apt-get when they are missing
  (`install_missing`, called by `main` only).
* master marks only smtpd processes started *after* a service hit its
  process limit as stressed; the first generation would run the whole flood
  with the unstressed 300 s timeouts.  So before a run with bots, the runner
  hits the limit once (``maxproc + 1`` idle connections, until master logs
  the warning), lets go, and reloads Postfix: every smtpd of the run is
  stressed, as on an MX some minutes into a real flood.  The baseline is not
  primed (no flood, no stress).
* Every client is a thread of this runner using `smtplib`; each presents
  its identity with XCLIENT (`crowd`), so the policy requests carry the bot
  and sender addresses and names.  The runner's own address (the XCLIENT
  proxy) is in ``POLICYD_ALLOW_NETWORKS``: with CONNECT wiring Postfix asks
  once for the real connection before the XCLIENT, and that must pass.
  Everything else is policyd's defaults, except ``POLICYD_SMTPD_CAPACITY``,
  which is the process limit.
* Timeline of a run: bots and senders start together; the first
  ``--warmup`` seconds are not measured; the measured flood lasts
  ``--duration`` seconds; then the bots stop and the senders send nothing
  new but keep retrying deferred messages until all are accepted (at most
  ``--drain`` seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
from crowd import (
    ACCEPTED,
    BOTS_PER_PROCESS,
    CONNECT,
    DEFERRED,
    DROPPED,
    MIXED,
    MIXED_CLEAN,
    NO_PTR,
    REFUSED,
    WIDE,
    BotSwarm,
    Identity,
    Message,
    SenderProcess,
    SenderSpec,
    Session,
    SwarmSpec,
    bot_identities,
    sender_identities,
)

from policyd.testing.daemon import PolicydProcess
from policyd.testing.netns import NetworkNamespace, find_ip
from policyd.testing.postfix import (
    PostfixConfig,
    PostfixInstance,
    PostfixTools,
    SmtpListener,
    find_postfix,
)
from policyd.testing.smtp import RELAY_DOMAIN
from policyd.testing.system import Unavailable, find_program, free_port, wait_until

# The benchmark's /proc CPU helpers (bench/loadgen.py), one directory up: the
# protocol benchmark's scripts are run by path and import each other as
# top-level modules, so bench/ is not a package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadgen import machine_cpu_seconds, proc_cpu_seconds

#: Where policyd is asked: at CONNECT and again at RCPT (the wiring the docs
#: advise), both with one check_policy_service text (one connection).
CONNECT_RCPT: Final = "connect+rcpt"

LEVELS: Final = ("normal", "elevated", "overload")
PROCESS_LIMIT_WARNING: Final = "has reached its process limit"


@attrs.frozen
class RunSpec:
    """One run of the scenario."""

    name: str
    title: str
    bots: bool
    #: Where policyd is wired: None (no policy check), "rcpt" or "connect".
    wiring: str | None
    dry_run: bool = False
    #: Seconds a dropped bot waits before it reconnects (None: the scenario's).
    reconnect_pause: float | None = None
    #: Nice increment of the bots' client process.
    bots_nice: int = 0
    #: Who the bots are (`crowd.BOT_MIXES`).
    bot_mix: str = NO_PTR
    #: Legitimate senders as a multiple of the process limit (None: the
    #: scenario's count).
    senders_per_process: float | None = None
    #: How many of the senders have no PTR (weak identity).
    weak_senders: int = 0
    #: Environment for policyd beyond the scenario's.
    policyd_env: tuple[tuple[str, str], ...] = ()
    #: Longest the senders may take to drain (None: the scenario's).
    drain: float | None = None
    #: Seconds a sender waits before retrying (None: the scenario's).
    retry_delay: float | None = None
    #: Who answers the policy requests: "policyd", or "bare" (bench/baseline.py,
    #: DUNNO to everything: what any policy server costs on this bed).
    policy_server: str = "policyd"
    #: Seconds each sender waits before each command: a round trip of the
    #: link it stands behind (0: the loopback).
    link_delay: float = 0.0


#: The senders' round trip in the ``-wan`` runs: a client some hundreds of
#: kilometres away.  smtpd sits idle for it before each command, so the
#: processes, not the CPU, limit what a surge gets through.
WAN_ROUND_TRIP: Final = 0.03


RUNS: Final = {
    spec.name: spec
    for spec in (
        RunSpec("baseline", "no bots (baseline)", bots=False, wiring=None),
        RunSpec(
            "no-policyd",
            "bots, no policyd (dry run at CONNECT)",
            bots=True,
            wiring="connect",
            dry_run=True,
        ),
        RunSpec("rcpt", "bots, policyd at RCPT", bots=True, wiring="rcpt"),
        RunSpec("connect", "bots, policyd at CONNECT", bots=True, wiring="connect"),
        RunSpec(
            "connect-nice",
            "bots' client at nice 19, policyd at CONNECT",
            bots=True,
            wiring="connect",
            bots_nice=19,
        ),
        RunSpec(
            "connect-pause",
            "bots pausing 1 s, policyd at CONNECT",
            bots=True,
            wiring="connect",
            reconnect_pause=1.0,
        ),
        # -- botnets with a real mix of identities (issue 10) --
        RunSpec(
            "mixed-no-policyd",
            "mixed botnet, no policyd (dry run at CONNECT + RCPT)",
            bots=True,
            wiring=CONNECT_RCPT,
            dry_run=True,
            bot_mix=MIXED,
        ),
        RunSpec(
            "mixed-rcpt",
            "mixed botnet, policyd at RCPT",
            bots=True,
            wiring="rcpt",
            bot_mix=MIXED,
        ),
        RunSpec(
            "mixed",
            "mixed botnet, policyd at CONNECT + RCPT",
            bots=True,
            wiring=CONNECT_RCPT,
            bot_mix=MIXED,
        ),
        RunSpec(
            "mixed-fixed-bar",
            "mixed botnet, CONNECT + RCPT, fixed bar (as before)",
            bots=True,
            wiring=CONNECT_RCPT,
            bot_mix=MIXED,
            policyd_env=(("POLICYD_OVERLOAD_SUSPICIOUS_SCORE", "3"),),
        ),
        RunSpec(
            "mixed-no-step",
            "mixed botnet, CONNECT + RCPT, bar lowered at once (POLICYD_BAR_STEP=0)",
            bots=True,
            wiring=CONNECT_RCPT,
            bot_mix=MIXED,
            policyd_env=(("POLICYD_BAR_STEP", "0"),),
        ),
        RunSpec(
            "mixed-nice",
            "mixed botnet, bots' client at nice 19, CONNECT + RCPT",
            bots=True,
            wiring=CONNECT_RCPT,
            bot_mix=MIXED,
            bots_nice=19,
        ),
        RunSpec(
            "mixed-clean",
            "mixed botnet with 1 in 5 bots clean-named, CONNECT + RCPT",
            bots=True,
            wiring=CONNECT_RCPT,
            bot_mix=MIXED_CLEAN,
        ),
        RunSpec(
            "wide",
            "wide botnet (IPv4 /24s, IPv6 /64s), CONNECT + RCPT",
            bots=True,
            wiring=CONNECT_RCPT,
            bot_mix=WIDE,
        ),
        RunSpec(
            "weak",
            "mixed botnet, 2 of the senders without PTR, CONNECT + RCPT",
            bots=True,
            wiring=CONNECT_RCPT,
            bot_mix=MIXED,
            weak_senders=2,
            # policyd stays at overload, then elevated, for a dwell each
            # once the bots stop; the weak senders get through after that.
            drain=300.0,
            # An MTA backs off after a deferral (Postfix: 5 minutes at
            # first); senders retrying every 2 s over every process read as
            # all processes busy and keep the level up (docs/overload.md).
            retry_delay=30.0,
        ),
        # -- a legitimate surge: no bots, three senders per process --
        RunSpec(
            "surge-no-policyd",
            "legitimate surge (3 senders per process), no policyd",
            bots=False,
            wiring=None,
            senders_per_process=3.0,
        ),
        RunSpec(
            "surge",
            "legitimate surge (3 senders per process), CONNECT + RCPT",
            bots=False,
            wiring=CONNECT_RCPT,
            senders_per_process=3.0,
        ),
        RunSpec(
            "surge-bare",
            "legitimate surge, a bare DUNNO server at CONNECT + RCPT",
            bots=False,
            wiring=CONNECT_RCPT,
            senders_per_process=3.0,
            policy_server="bare",
        ),
        RunSpec(
            "surge-wan-no-policyd",
            "legitimate surge over 30 ms links, no policyd",
            bots=False,
            wiring=None,
            senders_per_process=3.0,
            link_delay=WAN_ROUND_TRIP,
        ),
        RunSpec(
            "surge-wan",
            "legitimate surge over 30 ms links, CONNECT + RCPT",
            bots=False,
            wiring=CONNECT_RCPT,
            senders_per_process=3.0,
            link_delay=WAN_ROUND_TRIP,
        ),
    )
}

#: The runs of `main`'s default, and of the docs (``--runs`` picks others).
DEFAULT_RUNS: Final = (
    "baseline",
    "no-policyd",
    "connect",
    "mixed-no-policyd",
    "mixed-rcpt",
    "mixed-fixed-bar",
    "mixed",
    "mixed-clean",
    "wide",
    "weak",
    "surge-no-policyd",
    "surge",
    "surge-bare",
    "surge-wan-no-policyd",
    "surge-wan",
)


@attrs.frozen
class Scenario:
    """The load: how many of whom, how they behave, for how long."""

    maxproc: int = 10
    bots: int = 20
    senders: int = 8
    #: Seconds a bot waits before each command (+-25%).
    dawdle: float = 4.0
    reconnect_pause: float = 0.0
    #: Seconds a sender waits before retrying a deferred message.
    retry_delay: float = 2.0
    warmup: float = 10.0
    duration: float = 60.0
    #: Longest the senders may take to get their deferred messages accepted
    #: once the flood is over.
    drain: float = 60.0
    seed: int = 1


@attrs.frozen
class Sample:
    """What the monitor saw at one moment (seconds since the run began)."""

    at: float
    level: int | None
    smtpd: int
    stressed: int


@attrs.define
class RunResult:
    """Everything recorded in one run; times are `time.monotonic` values."""

    spec: RunSpec
    scenario: Scenario
    began: float
    flood_end: float
    sessions: list[Session]
    messages: list[Message]
    samples: list[Sample]
    #: How Postfix's stress mode came about: "automatic" or "forced".
    postfix_stress: str
    process_limit_warnings: int
    decisions: dict[str, float] = attrs.field(factory=dict)
    drained: bool = True
    #: Policy requests that carried Postfix's stress=yes.
    postfix_stress_seen: float = 0.0
    #: Cores used during the measured flood: "runner" (every client thread),
    #: "policyd", "machine" (all busy CPU), "other" (Postfix, mostly).
    cores: dict[str, float] = attrs.field(factory=dict)

    @property
    def window(self) -> tuple[float, float]:
        """The measured part of the flood."""
        return self.flood_end - self.scenario.duration, self.flood_end


#: Identities a wide botnet draws from.
WIDE_POOL: Final = 3000


#: The identity kinds of a `MIXED` botnet, in the order bots are dealt them.
BOT_KINDS: Final = ("no-ptr", "dynamic", "unconfirmed")


def bot_kind(mix: str, number: int) -> str | None:
    """Which kind of identity bot *number* shows (None: it changes, `WIDE`)."""
    if mix == NO_PTR:
        return BOT_KINDS[0]
    if mix == MIXED:
        return BOT_KINDS[number % len(BOT_KINDS)]
    if mix == MIXED_CLEAN:
        return "clean" if number % 5 == 4 else BOT_KINDS[number % len(BOT_KINDS)]
    return None


def reference_run(name: str) -> str:
    """The run without policyd that *name* is compared with."""
    if name.startswith("surge-wan"):
        return "surge-wan-no-policyd"
    if name.startswith("surge"):
        return "surge-no-policyd"
    if name.startswith(("mixed", "wide", "weak")):
        return "mixed-no-policyd"
    return "no-policyd"


def sender_count(spec: RunSpec, scenario: Scenario) -> int:
    """How many legitimate senders *spec* runs."""
    if spec.senders_per_process is not None:
        return round(spec.senders_per_process * scenario.maxproc)
    return scenario.senders


def percentile(values: Sequence[float], share: float) -> float | None:
    """The *share* percentile (0..1) by the nearest-rank method; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(result: RunResult) -> dict[str, Any]:
    """The figures of one run (see docs/overload.md for what each means)."""
    start, end = result.window
    seconds = end - start
    scenario = result.scenario
    messages = result.messages
    accepted_in_window = [
        m for m in messages if m.accepted is not None and start <= m.accepted < end
    ]
    flood_messages = [m for m in messages if start <= m.first_attempt < end]
    delays = [m.delay for m in flood_messages if m.delay is not None]
    sender_sessions = [s for m in messages for s in m.attempts]
    greeting_waits = [
        wait
        for s in sender_sessions
        if start <= s.started < end and (wait := s.greeting_wait) is not None
    ]
    bot_sessions = [s for s in result.sessions if s.started < end]
    window_bots = [s for s in bot_sessions if start <= s.started]
    refused_at: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for session in window_bots:
        kind = bot_kind(result.spec.bot_mix, session.client)
        if session.outcome in (DEFERRED, REFUSED):
            stage = "CONNECT" if session.stage == CONNECT else session.stage
            refused_at[stage] = refused_at.get(stage, 0) + 1
        elif session.outcome == ACCEPTED:
            stage = "accepted"
        else:
            continue
        if kind is not None:
            counts = by_kind.setdefault(kind, {})
            counts[stage] = counts.get(stage, 0) + 1
    capacity = scenario.maxproc * seconds
    count = sender_count(result.spec, scenario)
    weak_numbers = set(range(count - result.spec.weak_senders, count))
    weak = [m for m in messages if m.sender in weak_numbers]
    clean = [m for m in messages if m.sender not in weak_numbers]
    weak_late = [
        m.accepted - result.flood_end
        for m in weak
        if m.accepted is not None and m.accepted > result.flood_end
    ]
    levels = [s.level for s in result.samples if start <= s.at + result.began < end]
    known = [level for level in levels if level is not None]
    return {
        "run": result.spec.name,
        "title": result.spec.title,
        "legit_accepted": len(accepted_in_window),
        "legit_per_second": len(accepted_in_window) / seconds,
        "delay_p50": percentile(delays, 0.5),
        "delay_p99": percentile(delays, 0.99),
        "greeting_wait_p50": percentile(greeting_waits, 0.5),
        "greeting_wait_p99": percentile(greeting_waits, 0.99),
        "legit_messages": len(messages),
        "legit_deferred_then_accepted": sum(
            1 for m in messages if m.accepted is not None and len(m.attempts) > 1
        ),
        "legit_refused": sum(1 for m in messages if m.refused),
        "legit_pending": sum(
            1 for m in messages if m.accepted is None and not m.refused
        ),
        "legit_attempts_refused": sum(
            1 for s in sender_sessions if s.outcome in (DEFERRED, REFUSED)
        ),
        "legit_attempts_dropped": sum(
            1 for s in sender_sessions if s.outcome == DROPPED
        ),
        "senders": count,
        "clean_attempts_refused": sum(
            1 for m in clean for s in m.attempts if s.outcome in (DEFERRED, REFUSED)
        ),
        "weak_senders": len(weak_numbers),
        "weak_messages": len(weak),
        "weak_deferred": sum(1 for m in weak if len(m.attempts) > 1),
        "weak_refused": sum(1 for m in weak if m.refused),
        "weak_pending": sum(1 for m in weak if m.accepted is None and not m.refused),
        "weak_delay_max": max(
            (d for m in weak if (d := m.delay) is not None), default=None
        ),
        "weak_last_after_flood": max(weak_late, default=None),
        "bot_share": sum(s.held(start, end) for s in bot_sessions) / capacity,
        "legit_share": sum(s.held(start, end) for s in sender_sessions) / capacity,
        "bot_sessions": len(window_bots),
        "bot_sessions_per_second": len(window_bots) / seconds,
        "bot_refused_at": dict(sorted(refused_at.items())),
        "bot_refused_at_by_kind": by_kind,
        "bot_accepted": sum(1 for s in window_bots if s.outcome == ACCEPTED),
        "bot_dropped": sum(1 for s in window_bots if s.outcome == DROPPED),
        "overload_share": (
            sum(1 for level in known if level == 2) / len(known) if known else None
        ),
        "max_level": LEVELS[max(known)] if known else None,
        "postfix_stress": result.postfix_stress,
        "process_limit_warnings": result.process_limit_warnings,
        "stressed_smtpd_seen": max((s.stressed for s in result.samples), default=0),
        "decisions": result.decisions,
        "postfix_stress_seen": result.postfix_stress_seen,
        "drained": result.drained,
        "cores": result.cores,
    }


def throughput_series(
    result: RunResult, bucket: float = 1.0
) -> list[tuple[float, float]]:
    """Legitimate messages accepted per second, per *bucket*, from the run's start."""
    last = max(
        [result.flood_end]
        + [m.accepted for m in result.messages if m.accepted is not None]
    )
    buckets = [0] * (int((last - result.began) / bucket) + 1)
    for message in result.messages:
        if message.accepted is not None:
            buckets[int((message.accepted - result.began) / bucket)] += 1
    return [(i * bucket, count / bucket) for i, count in enumerate(buckets)]


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


@attrs.define
class Bed:
    """The Postfix instance and where it lives, shared by every run."""

    tools: PostfixTools
    postfix: PostfixInstance
    netns: NetworkNamespace | None
    port: int

    @property
    def client_address(self) -> str:
        """The address our connections come from, as Postfix sees them."""
        return self.netns.host_address if self.netns is not None else "127.0.0.1"


def _postfix_config(
    bed_port: int,
    scenario: Scenario,
    netns: NetworkNamespace | None,
    policy_port: int,
    wiring: str | None,
) -> PostfixConfig:
    options = {} if netns is not None else {"stress": "yes"}
    client = netns.host_address if netns is not None else "127.0.0.1"
    config = PostfixConfig(
        policy_port=policy_port,
        listeners=(SmtpListener("smtp", bed_port, scenario.maxproc, options),),
        listen_address="all" if netns is not None else "127.0.0.1",
        xclient_hosts=f"{client}/32" if netns is not None else "127.0.0.0/8",
        policy_restriction={
            None: None,
            "rcpt": "smtpd_recipient_restrictions",
            "connect": "smtpd_client_restrictions",
            CONNECT_RCPT: ("smtpd_client_restrictions", "smtpd_recipient_restrictions"),
        }[wiring],
        delay_reject=wiring not in ("connect", CONNECT_RCPT),
        main_extra={
            # Only the process limit shapes the load: anvil's per-client
            # limits would count every XCLIENT'd session against our one
            # real address.
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "smtpd_client_recipient_rate_limit": "0",
            "smtpd_client_new_tls_session_rate_limit": "0",
        },
        # Our own address, as the XCLIENT proxy: see below.
        mynetworks=f"{client}/32",
    )
    if wiring in ("connect", CONNECT_RCPT):
        # At CONNECT, Postfix first checks our own connection, then the
        # identity XCLIENT presents.  A real MX sees one client per session:
        # let our own address through before policyd is asked, so that each
        # session costs Postfix and policyd one connect-stage request, not
        # two (the proxy's address is allow-listed in policyd as well).
        config = attrs.evolve(
            config,
            main_extra={
                **dict(config.main_extra),
                "smtpd_client_restrictions": (
                    f"permit_mynetworks, {config.policy_check}"
                ),
            },
        )
    return config


def _apt_install(packages: Sequence[str], log: Callable[[str], None]) -> None:
    """``apt-get install`` *packages*, running ``apt-get update`` if that fails."""
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        log(f"{' and '.join(packages)} missing, and there is no apt-get")
        return
    log(f"installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt_get, "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, timeout=900, check=False).returncode == 0:
        return
    subprocess.run([apt_get, "update"], env=env, timeout=900, check=False)
    subprocess.run(install, env=env, timeout=900, check=False)


def install_missing(*, netns: bool, log: Callable[[str], None] = print) -> None:
    """
    Install Debian's postfix (and, for *netns*, iproute2) if they are missing.

    Only `main` calls this (the runner is run by hand, as root); the tests
    that import the runner get their programs from tests/run.  Postfix is
    installed with "No configuration": the package neither writes
    /etc/postfix/main.cf nor starts the system instance; the runner brings
    its own.
    """
    packages = [] if find_program("postfix") else ["postfix"]
    if netns and not find_program("ip"):
        packages.append("iproute2")
    if not packages:
        return
    debconf = shutil.which("debconf-set-selections")
    if "postfix" in packages and debconf is not None:
        subprocess.run(
            [debconf],
            input="postfix postfix/main_mailer_type select No configuration\n",
            text=True,
            check=False,
            timeout=60,
        )
    _apt_install(packages, log)


def open_namespace(log: Callable[[str], None] = print) -> NetworkNamespace | None:
    """A private network namespace for Postfix, or None (and why) if impossible."""
    try:
        return NetworkNamespace(find_ip()).create()
    except (Unavailable, RuntimeError) as e:
        log(
            f"no private network namespace ({e}): falling back to loopback "
            "with -o stress=yes on the listener (Postfix's stress mode is "
            "forced, not automatic)"
        )
        return None


@contextlib.contextmanager
def open_bed(
    scenario: Scenario, tools: PostfixTools, netns: NetworkNamespace | None
) -> Iterator[Bed]:
    """A Postfix instance (not yet configured for a run), in *netns* if given."""
    port = free_port()
    config = _postfix_config(port, scenario, netns, free_port(), None)
    with PostfixInstance(config, tools, netns=netns) as postfix:
        yield Bed(tools, postfix, netns, port)


def prime_stress(
    bed: Bed, maxproc: int, timeout: float = 15.0, log: Callable[[str], None] = print
) -> int:
    """Make master hit the process limit once, then reload.

    From then on master starts every new smtpd process with ``stress=yes``.
    Return how many process-limit warnings master logged.
    """
    postfix = bed.postfix
    mark = postfix.maillog.mark()
    host, port = postfix.address("smtp")
    held = []
    try:
        for _ in range(maxproc + 1):
            held.append(socket.create_connection((host, port), timeout=5.0))
        wait_until(
            lambda: PROCESS_LIMIT_WARNING in postfix.maillog.text(mark),
            timeout,
            "master's process-limit warning",
        )
    finally:
        for conn in held:
            conn.close()
    # Reload: every smtpd of the first generation exits after its session.
    # One that lingers (seen: a process that had taken the queued priming
    # connection after we closed it) is killed; it serves nobody.
    old = set(postfix.smtpd_pids())
    postfix.postfix("reload")
    with contextlib.suppress(TimeoutError):
        wait_until(
            lambda: not old & set(postfix.smtpd_pids()), 10.0, "old smtpd to exit"
        )
    lingering = old & set(postfix.smtpd_pids())
    for pid in lingering:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if lingering:
        log(f"  priming: killed {len(lingering)} first-generation smtpd still there")
    return postfix.maillog.text(mark).count(PROCESS_LIMIT_WARNING)


def _process_cpu(pid: int | None) -> float:
    """Utime + stime of *pid*, in seconds (0 if there is none, or it is gone)."""
    return (proc_cpu_seconds(pid) or 0.0) if pid is not None else 0.0


@attrs.frozen
class Cpu:
    """CPU seconds used so far: by this runner (the clients), policyd, all."""

    runner: float
    policyd: float
    machine: float

    @classmethod
    def now(cls, policyd_pid: int | None, client_pids: Sequence[int]) -> Cpu:
        """Read the counters ("runner": this process and the clients' ones)."""
        times = os.times()
        machine = machine_cpu_seconds()
        return cls(
            times.user + times.system + sum(map(_process_cpu, client_pids)),
            _process_cpu(policyd_pid),
            machine[0] if machine is not None else 0.0,
        )

    def cores(self, earlier: Cpu, seconds: float) -> dict[str, float]:
        """Cores used on average since *earlier*, over *seconds*."""
        runner = (self.runner - earlier.runner) / seconds
        policyd = (self.policyd - earlier.policyd) / seconds
        machine = (self.machine - earlier.machine) / seconds
        return {
            "runner": runner,
            "policyd": policyd,
            "machine": machine,
            "other": max(0.0, machine - runner - policyd),
        }


def _stressed(pid: int) -> bool:
    try:
        return b"stress=yes" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Monitor(threading.Thread):
    """Samples policyd's stress level and Postfix's smtpd processes."""

    def __init__(
        self, bed: Bed, policyd: PolicydProcess | None, began: float, every: float = 0.5
    ) -> None:
        super().__init__(name="monitor", daemon=True)
        self.bed = bed
        self.policyd = policyd
        self.began = began
        self.every = every
        self.samples: list[Sample] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        """Sample every *every* seconds until stopped."""
        while not self.stopping.wait(self.every):
            level: float | None = None
            if self.policyd is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    level = self.policyd.metric("policyd_stress_level")
            pids = self.bed.postfix.smtpd_pids()
            self.samples.append(
                Sample(
                    time.monotonic() - self.began,
                    None if level is None else int(level),
                    len(pids),
                    sum(1 for pid in pids if _stressed(pid)),
                )
            )


class BareServer:
    """bench/baseline.py (DUNNO to everything) as the policy service.

    The surge against it shows what any policy server costs this bed: the
    two policy round trips per session on Postfix's side, and a minimal
    Twisted server's own CPU.
    """

    SCRIPT: Final = Path(__file__).resolve().parents[1] / "baseline.py"

    def __init__(self, netns: NetworkNamespace | None) -> None:
        argv = [sys.executable, str(self.SCRIPT), "--port", "0"]
        self._process = subprocess.Popen(
            argv if netns is None else netns.wrap(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.port = 0

    def start(self, timeout: float = 15.0) -> BareServer:
        """Wait for the listening line; learn the port."""
        stdout = self._process.stdout
        if stdout is None:
            raise RuntimeError("Popen gave no pipe")
        deadline = threading.Timer(timeout, self._process.kill)
        deadline.start()
        try:
            for line in stdout:
                if line.startswith("baseline listening on "):
                    self.port = int(line.rsplit(":", 1)[1])
                    return self
        finally:
            deadline.cancel()
        raise RuntimeError("the bare policy server did not start")

    @property
    def pid(self) -> int:
        """Its process id."""
        return self._process.pid

    def terminate(self) -> None:
        """Stop it (killed if it lingers)."""
        self._process.terminate()
        try:
            self._process.wait(10.0)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def run_one(
    bed: Bed, spec: RunSpec, scenario: Scenario, log: Callable[[str], None] = print
) -> RunResult:
    """Run *spec* on *bed* and return what happened."""
    policyd: PolicydProcess | None = None
    bare: BareServer | None = None
    if spec.wiring is not None and spec.policy_server == "bare":
        bare = BareServer(bed.netns).start()
    elif spec.wiring is not None:
        env = {
            "POLICYD_SMTPD_CAPACITY": str(scenario.maxproc),
            "POLICYD_ALLOW_NETWORKS": f"{bed.client_address}/32",
            "POLICYD_LOG_LEVEL": "info",
            "POLICYD_DRY_RUN": "1" if spec.dry_run else "0",
            **dict(spec.policyd_env),
        }
        policyd = PolicydProcess(env, netns=bed.netns).start()
    try:
        config = _postfix_config(
            bed.port,
            scenario,
            bed.netns,
            policyd.port
            if policyd is not None
            else bare.port
            if bare is not None
            else free_port(),
            spec.wiring,
        )
        # A fresh master: no stress left over from the previous run.
        bed.postfix.restart(config)
        warnings = 0
        stress = "forced" if bed.netns is None else "automatic"
        if spec.bots and bed.netns is not None:
            warnings = prime_stress(bed, scenario.maxproc, log=log)
        mark = bed.postfix.maillog.mark()
        address = bed.postfix.address("smtp")
        rng = random.Random(scenario.seed)
        pause = (
            spec.reconnect_pause
            if spec.reconnect_pause is not None
            else scenario.reconnect_pause
        )
        pool: tuple[Identity, ...] = ()
        identities: Sequence[Identity] = ()
        if spec.bots and spec.bot_mix == WIDE:
            # Each bot draws a fresh identity from the pool for every session.
            pool = tuple(bot_identities(WIDE_POOL, rng, WIDE))
            identities = pool[: scenario.bots]
        elif spec.bots:
            identities = bot_identities(scenario.bots, rng, spec.bot_mix)
        swarms = [
            BotSwarm(
                SwarmSpec(
                    tuple(identities[first : first + BOTS_PER_PROCESS]),
                    address,
                    scenario.dawdle,
                    pause,
                    RELAY_DOMAIN,
                    scenario.seed,
                    spec.bots_nice,
                    first,
                    pool,
                )
            )
            for first in range(0, len(identities), BOTS_PER_PROCESS)
        ]
        drain = multiprocessing.get_context("spawn").Event()
        senders = [
            SenderProcess(
                SenderSpec(
                    n,
                    identity,
                    address,
                    spec.retry_delay
                    if spec.retry_delay is not None
                    else scenario.retry_delay,
                    (f"customer{n}@{RELAY_DOMAIN}",),
                    spec.link_delay,
                ),
                drain,
            )
            for n, identity in enumerate(
                sender_identities(sender_count(spec, scenario), spec.weak_senders)
            )
        ]
        began = time.monotonic()
        monitor = Monitor(bed, policyd, began)
        monitor.start()
        for swarm in swarms:
            swarm.start()
        for sender in senders:
            sender.start()
        flood_end = began + scenario.warmup + scenario.duration
        server = policyd if policyd is not None else bare
        policyd_pid = server.pid if server is not None else None
        client_pids = [
            pid
            for pid in [swarm.pid for swarm in swarms]
            + [sender.pid for sender in senders]
            if pid is not None
        ]
        cpu_start: Cpu | None = None
        while (now := time.monotonic()) < flood_end:
            if cpu_start is None and now >= flood_end - scenario.duration:
                cpu_start = Cpu.now(policyd_pid, client_pids)
            time.sleep(min(0.25, max(0.0, flood_end - now)))
            if not all(sender.alive() for sender in senders):
                raise RuntimeError("a sender's process ended during the flood")
            if not all(swarm.alive() for swarm in swarms):
                raise RuntimeError("a bots' process died")
        cores = (
            Cpu.now(policyd_pid, client_pids).cores(cpu_start, scenario.duration)
            if cpu_start is not None
            else {}
        )
        bot_sessions = [s for swarm in swarms for s in swarm.stop()]
        drain.set()
        deadline = time.monotonic() + (
            spec.drain if spec.drain is not None else scenario.drain
        )
        # Every sender must be finished (and its messages collected), so no
        # all() that would stop at the first one still busy.
        drained = True
        for sender in senders:
            if not sender.finish(max(0.1, deadline - time.monotonic())):
                drained = False
        monitor.stopping.set()
        monitor.join(10.0)
        decisions: dict[str, float] = {}
        if policyd is not None:
            for outcome in (
                "pass",
                "exempt",
                "defer",
                "reject",
                "dry_run_defer",
                "dry_run_reject",
            ):
                value = policyd.metric("policyd_decisions_total", {"outcome": outcome})
                if value:
                    decisions[outcome] = value
        stress_seen = (
            policyd.metric("policyd_postfix_stress_seen_total") or 0.0
            if policyd is not None
            else 0.0
        )
        warnings += bed.postfix.maillog.text(mark).count(PROCESS_LIMIT_WARNING)
        return RunResult(
            spec=spec,
            scenario=scenario,
            began=began,
            flood_end=flood_end,
            sessions=bot_sessions,
            messages=[m for sender in senders for m in sender.messages],
            samples=monitor.samples,
            postfix_stress=stress,
            process_limit_warnings=warnings,
            decisions=decisions,
            drained=drained,
            cores=cores,
            postfix_stress_seen=stress_seen,
        )
    finally:
        if policyd is not None:
            policyd.terminate()
        if bare is not None:
            bare.terminate()


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _ratio(value: float, reference: float | None) -> str:
    if reference is None:
        return "-"
    if reference <= 0:
        return "inf" if value > 0 else "-"
    return f"{value / reference:.2f}x"


def _weak(summary: dict[str, Any]) -> str:
    """The weak-identity senders' column: deferred, and how late delivered."""
    if not summary.get("weak_senders"):
        return "-"
    return (
        f"{summary['weak_deferred']} of {summary['weak_messages']} deferred, "
        f"last {_seconds(summary['weak_last_after_flood'])} after"
    )


def table(summaries: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table, one row per run."""
    by_run = {s["run"]: s for s in summaries}
    baseline = by_run.get("baseline", {}).get("legit_per_second")
    rows = [
        "| run | legit msg/s | vs no policyd | vs baseline | delay p50 / p99 "
        "| greeting wait p50 / p99 | refused for good | pending at end "
        "| bots' share of smtpd time | bot sessions/s | bots refused at "
        "| policyd level | cores: clients / Postfix / policy server "
        "| clean senders' attempts refused | weak-identity messages: deferred, "
        "last accepted after the flood |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---|---|---|---:|---|",
    ]
    for s in summaries:
        refused = ", ".join(f"{k} {v}" for k, v in s["bot_refused_at"].items()) or "-"
        if s["max_level"] is None:
            level = "-"
        else:
            level = f"{s['overload_share']:.0%} of the flood at overload"
        used = s["cores"]
        cores = (
            f"{used['runner']:.2f} / {used['other']:.2f} / {used['policyd']:.2f}"
            if used
            else "-"
        )
        rate = s["legit_per_second"]
        reference = by_run.get(reference_run(s["run"]), {}).get("legit_per_second")
        versus = (
            _ratio(rate, reference)
            if s["run"] not in ("baseline", reference_run(s["run"]))
            else "-"
        )
        delays = f"{_seconds(s['delay_p50'])} / {_seconds(s['delay_p99'])}"
        waits = (
            f"{_seconds(s['greeting_wait_p50'])} / {_seconds(s['greeting_wait_p99'])}"
        )
        rows.append(
            f"| {s['title']} | {rate:.1f} | {versus} | {_ratio(rate, baseline)} "
            f"| {delays} | {waits} "
            f"| {s['legit_refused']} | {s['legit_pending']} "
            f"| {s['bot_share']:.0%} | {s['bot_sessions_per_second']:.1f} "
            f"| {refused} | {level} | {cores} "
            f"| {s.get('clean_attempts_refused', '-')} | {_weak(s)} |"
        )
    return "\n".join(rows) + "\n"


@attrs.frozen
class PlotRun:
    """What the plot shows of one run."""

    title: str
    #: (seconds since the run began, legitimate messages per second).
    throughput: Sequence[tuple[float, float]]
    #: (seconds since the run began, policyd stress level 0-2); empty
    #: without policyd.
    levels: Sequence[tuple[float, int]] = ()


def level_series(result: RunResult) -> list[tuple[float, int]]:
    """The stress level policyd reported during the run (sampled)."""
    return [(s.at, s.level) for s in result.samples if s.level is not None]


def plot(runs: Sequence[PlotRun], scenario: Scenario, path: Path) -> bool:
    """Draw throughput and policyd's level over time; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (axes, levels) = plt.subplots(
        2,
        1,
        figsize=(10, 9 + 0.2 * len(runs)),
        dpi=100,
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1]},
    )
    start = scenario.warmup
    end = scenario.warmup + scenario.duration
    for number, run in enumerate(runs):
        color = f"C{number}"
        axes.plot(
            [t for t, _ in run.throughput],
            [rate for _, rate in run.throughput],
            label=run.title,
            linewidth=1.6,
            color=color,
        )
        if run.levels:
            # Runs at the same level would hide each other: spread them.
            offset = (number - len(runs) / 2) * 0.03
            levels.step(
                [t for t, _ in run.levels],
                [level + offset for _, level in run.levels],
                where="post",
                linewidth=1.2,
                color=color,
            )
    for panel in (axes, levels):
        panel.axvspan(start, end, color="0.92", zorder=0)
        panel.axvline(end, color="0.5", linestyle="--", linewidth=1)
        panel.grid(True, alpha=0.3)
    axes.axvspan(start, end, color="0.92", zorder=0, label="measured flood")
    axes.text(end, 0, " bots stop", va="bottom", color="0.4")
    axes.set_title(
        f"Legitimate mail during a bot flood: {scenario.maxproc} smtpd "
        f"processes, {scenario.bots} bots (dawdling {scenario.dawdle:g} s), "
        f"{scenario.senders} senders",
        fontsize=10,
    )
    axes.set_ylabel("legitimate messages accepted\nper second (2 s buckets)")
    axes.set_ylim(bottom=0)
    handles, labels = axes.get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="lower center", ncol=2)
    levels.set_yticks([0, 1, 2], list(LEVELS))
    levels.set_ylim(-0.3, 2.3)
    levels.set_ylabel("policyd level")
    levels.set_xlabel("seconds since the flood began")
    # Room for the legend: two columns, a row per two runs.
    figure.tight_layout(rect=(0, 0.025 * (len(runs) + 2) / 2 + 0.02, 1, 1))
    figure.savefig(path)
    plt.close(figure)
    return True


def machine() -> str:
    """One line about where the numbers were measured."""
    cpus = os.cpu_count() or 0
    return (
        f"{platform.system()} {platform.release()}, {cpus} CPUs, "
        f"Python {platform.python_version()}"
    )


def describe(result: RunResult, summary: dict[str, Any]) -> str:
    """A few lines on one run, for the console."""
    s = summary
    lines = [
        f"{result.spec.name}: {s['title']}",
        f"  legitimate: {s['legit_accepted']} accepted in the flood window "
        f"({s['legit_per_second']:.1f}/s); {s['legit_messages']} messages in all, "
        f"{s['legit_deferred_then_accepted']} deferred then accepted, "
        f"{s['legit_refused']} refused for good, {s['legit_pending']} pending; "
        f"delay p50/p99 {_seconds(s['delay_p50'])}/{_seconds(s['delay_p99'])}, "
        f"greeting wait p50/p99 {_seconds(s['greeting_wait_p50'])}/"
        f"{_seconds(s['greeting_wait_p99'])}",
        f"  bots: {s['bot_sessions']} sessions ({s['bot_sessions_per_second']:.1f}/s), "
        f"{s['bot_share']:.0%} of smtpd time (legitimate {s['legit_share']:.0%}), "
        f"refused at {s['bot_refused_at'] or '-'}, {s['bot_accepted']} messages "
        f"accepted, {s['bot_dropped']} dropped"
        + (
            f"; refused by kind {s['bot_refused_at_by_kind']}"
            if s["bot_refused_at_by_kind"]
            else ""
        ),
        f"  postfix stress {s['postfix_stress']} (process-limit warnings "
        f"{s['process_limit_warnings']}, up to {s['stressed_smtpd_seen']} stressed "
        f"smtpd at once); policyd level max {s['max_level']}, overload "
        f"{'-' if s['overload_share'] is None else format(s['overload_share'], '.0%')}"
        f" of the flood; decisions {s['decisions'] or '-'}",
        "  cores used in the flood: "
        + ", ".join(f"{k} {v:.2f}" for k, v in s["cores"].items()),
    ]
    if not s["drained"]:
        lines.append(
            "  WARNING: senders still had deferred messages at the drain limit"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Bots flood a real Postfix; how much legitimate mail gets through?"
    )
    defaults = Scenario()
    parser.add_argument(
        "--runs",
        default=",".join(DEFAULT_RUNS),
        help=(
            f"comma-separated runs, in order, of {', '.join(RUNS)} "
            f"(default: {','.join(DEFAULT_RUNS)})"
        ),
    )
    parser.add_argument("--maxproc", type=int, default=defaults.maxproc)
    parser.add_argument("--bots", type=int, default=defaults.bots)
    parser.add_argument("--senders", type=int, default=defaults.senders)
    parser.add_argument("--dawdle", type=float, default=defaults.dawdle)
    parser.add_argument(
        "--reconnect-pause", type=float, default=defaults.reconnect_pause
    )
    parser.add_argument("--retry-delay", type=float, default=defaults.retry_delay)
    parser.add_argument("--warmup", type=float, default=defaults.warmup)
    parser.add_argument("--duration", type=float, default=defaults.duration)
    parser.add_argument("--drain", type=float, default=defaults.drain)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short version: 5 processes, 10 bots dawdling 1.5 s, 3 senders, 15 s",
    )
    parser.add_argument(
        "--no-netns",
        action="store_true",
        help="run on loopback with Postfix's stress mode forced",
    )
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="only redraw overload.png (into --docs) from an earlier --json file",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        help="write overload-results.md and overload.png into this directory",
    )
    return parser.parse_args(argv)


QUICK: Final = Scenario(
    maxproc=5, bots=10, senders=3, dawdle=1.5, warmup=4, duration=15, drain=30
)


def scenario_from(args: argparse.Namespace) -> Scenario:
    """The scenario the command line asks for."""
    if args.quick:
        return QUICK
    return Scenario(
        maxproc=args.maxproc,
        bots=args.bots,
        senders=args.senders,
        dawdle=args.dawdle,
        reconnect_pause=args.reconnect_pause,
        retry_delay=args.retry_delay,
        warmup=args.warmup,
        duration=args.duration,
        drain=args.drain,
        seed=args.seed,
    )


def reproducible_argv(argv: Sequence[str]) -> list[str]:
    """*argv* as it reproduces the run from the repository.

    ``--json FILE`` goes (where the figures went is nobody's business) and
    ``--docs DIR`` becomes ``--docs docs/``: a directory of this machine
    says nothing to a reader, and the docs are where the files belong.
    """
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif arg == "--docs":
            kept += ["--docs", "docs/"]
            skip = True
        elif arg.startswith("--docs="):
            kept += ["--docs", "docs/"]
        elif not arg.startswith("--json="):
            kept.append(arg)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenario; print and write the results."""
    args = parse_args(argv)
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        titles = {run["run"]: run["title"] for run in saved["runs"]}
        target = (args.docs or Path(".")) / "overload.png"
        levels = saved.get("levels", {})
        drawn = plot(
            [
                PlotRun(titles[name], series, levels.get(name, ()))
                for name, series in saved["throughput"].items()
            ],
            Scenario(**saved["scenario"]),
            target,
        )
        print(f"wrote {target}" if drawn else "matplotlib is not installed")
        return 0 if drawn else 1
    names = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = [name for name in names if name not in RUNS]
    if unknown:
        print(f"unknown run(s) {', '.join(unknown)}; known: {', '.join(RUNS)}")
        return 2
    if os.geteuid() != 0:
        print(
            "the overload scenario starts Postfix and a network namespace: run as root"
        )
        return 2
    scenario = scenario_from(args)
    command = " ".join(
        ["python bench/overload/overload.py", *reproducible_argv(argv or sys.argv[1:])]
    )
    print(f"scenario: {attrs.asdict(scenario)}", flush=True)
    results: list[RunResult] = []
    summaries: list[dict[str, Any]] = []
    install_missing(netns=not args.no_netns)
    tools = find_postfix()
    netns = None if args.no_netns else open_namespace()
    with contextlib.ExitStack() as cleanup:
        if netns is not None:
            cleanup.callback(netns.destroy)
        bed = cleanup.enter_context(open_bed(scenario, tools, netns))
        print(
            f"Postfix {bed.tools.mail_version()}, "
            + (
                f"in network namespace {bed.netns.name} (automatic stress mode)"
                if bed.netns is not None
                else "on loopback (stress mode forced)"
            ),
            flush=True,
        )
        for name in names:
            started = time.monotonic()
            result = run_one(bed, RUNS[name], scenario)
            summary = summarize(result)
            results.append(result)
            summaries.append(summary)
            print(describe(result, summary), flush=True)
            print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
    print()
    print(table(summaries))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "scenario": attrs.asdict(scenario),
                    "machine": machine(),
                    "runs": summaries,
                    "throughput": {
                        r.spec.name: throughput_series(r, 2.0) for r in results
                    },
                    "levels": {r.spec.name: level_series(r) for r in results},
                },
                indent=2,
            )
        )
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        drawn = plot(
            [
                PlotRun(r.spec.title, throughput_series(r, 2.0), level_series(r))
                for r in results
            ],
            scenario,
            args.docs / "overload.png",
        )
        (args.docs / "overload-results.md").write_text(
            "# Overload scenario: results\n\n"
            "Written by the overload scenario runner; how to read it: "
            "[overload.md](overload.md).\n\n"
            f"Command: `{command.strip()}`  \n"
            f"Machine: {machine()}  \n"
            f"Scenario: {scenario.maxproc} smtpd processes, {scenario.bots} bots "
            f"dawdling {scenario.dawdle:g} s before each command, "
            f"{scenario.senders} legitimate senders retrying after "
            f"{scenario.retry_delay:g} s; {scenario.warmup:g} s warm-up, "
            f"{scenario.duration:g} s measured flood.\n\n"
            + table(summaries)
            + ("\n![legitimate messages per second](overload.png)\n" if drawn else "")
        )
        print(
            f"wrote {args.docs / 'overload-results.md'}"
            + (" and overload.png" if drawn else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
