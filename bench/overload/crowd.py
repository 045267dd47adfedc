"""
The two populations of the overload scenario: bots and legitimate senders.

Both are threads driving Python's `smtplib` against a real Postfix, and both
present their identity with XCLIENT (every connection really comes from the
runner's one address).  The XCLIENT command stands for the connection
arriving from that identity, so it is sent straight after the greeting, and
the client's behaviour starts after it:

- a **bot** dawdles before each of EHLO, MAIL, RCPT and DATA (so it holds an
  smtpd process for several dawdles per message) and, once dropped or done,
  reconnects after a configurable pause (0 = at once);
- a **sender** sends messages one after another as fast as they are accepted,
  optionally across a slow link (it waits *link_delay* before each command,
  as a client one round trip away would: smtpd sits idle in between);
  a 4xx (or 421, or a dropped connection, or a timeout) defers the message,
  which is retried after a delay, and holds back new mail until then, as an
  MTA's queue manager does with a destination that deferred it; a 5xx
  refuses it for good (counted, never retried).

Every session and message is recorded with `time.monotonic` timestamps, so
the report can cut out the measured window, compute who held the smtpd
processes, and draw throughput over time.  Nothing here knows about policyd.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import queue
import random
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs

from policyd.testing.smtp import xtext

#: Where a session or message attempt ended (the ``stage`` of a refusal).
CONNECT: Final = "CONNECT"  # greeting or XCLIENT: connect-stage restrictions
STAGES: Final = (CONNECT, "EHLO", "MAIL", "RCPT", "DATA", "DATA-END")

#: Outcomes of one session.
ACCEPTED: Final = "accepted"  # the message was queued (250 after the data)
DEFERRED: Final = "deferred"  # a 4xx reply: try again later
REFUSED: Final = "refused"  # a 5xx reply: refused for good
DROPPED: Final = "dropped"  # the server hung up or timed out, with no reply
STOPPED: Final = "stopped"  # the runner ended the session (end of the flood)


@attrs.frozen
class Identity:
    """Who a client claims to be, through XCLIENT and its HELO."""

    address: str
    #: Verified client name; ``[UNAVAILABLE]`` for none.
    name: str
    #: Reverse (PTR) name; ``[UNAVAILABLE]`` for none.
    reverse_name: str
    helo: str

    def xclient(self) -> str:
        """The XCLIENT arguments presenting this identity."""
        fields = {
            # Postfix wants IPv6 addresses tagged (XCLIENT_README).
            "ADDR": f"IPV6:{self.address}" if ":" in self.address else self.address,
            "NAME": self.name,
            "REVERSE_NAME": self.reverse_name,
            "HELO": self.helo,
            "PROTO": "ESMTP",
        }
        return " ".join(f"{k}={xtext(v)}" for k, v in fields.items())


#: The kinds of bot population (`bot_identities`).
NO_PTR: Final = "no-ptr"
MIXED: Final = "mixed"
WIDE: Final = "wide"
#: `MIXED`, with every fifth bot a compromised server with a clean identity.
MIXED_CLEAN: Final = "mixed-clean"
BOT_MIXES: Final = (NO_PTR, MIXED, WIDE, MIXED_CLEAN)

_UNAVAILABLE: Final = "[UNAVAILABLE]"
_BOT_HELOS: Final = (
    "localhost",
    "user",
    "WIN-{n:04X}",
    "mail.example.test",
    "[10.0.0.{n}]",
)


def _no_ptr_bot(address: str, rng: random.Random, n: int) -> Identity:
    """No reverse DNS at all, and an odd HELO (bare word, forged, literal)."""
    helo = _BOT_HELOS[n % len(_BOT_HELOS)].format(n=rng.randrange(1, 250))
    return Identity(address, _UNAVAILABLE, _UNAVAILABLE, helo)


def _dynamic_bot(address: str, rng: random.Random, n: int) -> Identity:
    """A home line: a forward-confirmed PTR that looks dynamic, used as HELO.

    One identity sign (``dynamic_name``), at every stage.
    """
    if ":" in address:
        name = f"host-{rng.randrange(1 << 32):08x}.dyn.ipv6.cable.example.net"
    else:
        name = f"{address.replace('.', '-')}.dyn.cable.example.net"
    return Identity(address, name, name, name)


def _unconfirmed_bot(address: str, rng: random.Random, n: int) -> Identity:
    """A PTR that does not forward-confirm (it names some business's server).

    Postfix reports ``client_name=unknown`` and the PTR as the reverse name;
    the HELO is that name, a valid FQDN: one identity sign (``no_client_name``).
    """
    name = f"mail.somebiz{rng.randrange(1, 999)}.example"
    return Identity(address, _UNAVAILABLE, name, name)


def _clean_bot(address: str, rng: random.Random, n: int) -> Identity:
    """A compromised mail server: verified name, matching HELO; no sign at all.

    Only how it behaves (holding processes without progress) gives it away.
    """
    name = f"mail.hosted{rng.randrange(1, 999)}.example"
    return Identity(address, name, name, name)


_KINDS: Final = (_no_ptr_bot, _dynamic_bot, _unconfirmed_bot)


def bot_identities(count: int, rng: random.Random, mix: str = NO_PTR) -> list[Identity]:
    """*count* bot identities of the population *mix*.

    * `NO_PTR`: three /24s, no reverse DNS, bare-word, forged or IP-literal
      HELOs (at least two identity signs each).
    * `MIXED`: the same three /24s, a third each with no PTR, with a
      forward-confirmed dynamic-looking PTR (one sign), and with a PTR that
      does not forward-confirm (one sign), as real botnets show.
    * `MIXED_CLEAN`: as `MIXED`, but every fifth bot is a compromised server
      whose names and HELO are in order.
    * `WIDE`: as `MIXED`, but spread over 200 IPv4 /24s and 1000 IPv6 /64s,
      so that hardly any address or prefix is seen twice in a run
      (*count* is then the size of the pool the bots draw from).
    """
    identities = []
    for n in range(count):
        if mix == WIDE and n % 3 == 2:
            address = (
                f"2001:db8:{rng.randrange(1 << 16):x}:{rng.randrange(1 << 16):x}"
                f"::{rng.randrange(1, 1 << 16):x}"
            )
        elif mix == WIDE:
            address = (
                f"{rng.choice((100, 101, 102, 103))}.{rng.randrange(64, 114)}."
                f"{rng.randrange(256)}.{rng.randrange(2, 250)}"
            )
        else:
            networks = ("203.0.113", "198.18.7", "192.0.2")
            address = f"{networks[n % len(networks)]}.{rng.randrange(2, 250)}"
        if mix == NO_PTR:
            kind = _no_ptr_bot
        elif mix == MIXED_CLEAN and n % 5 == 4:
            kind = _clean_bot
        else:
            kind = _KINDS[n % len(_KINDS)]
        identities.append(kind(address, rng, n))
    return identities


def sender_identities(count: int, weak: int = 0) -> list[Identity]:
    """*count* legitimate identities; the last *weak* of them without a PTR.

    The clean ones have verified names and matching HELOs; the weak ones
    are small businesses whose address has no reverse DNS (two DNS signs,
    deferred under stress), with a proper HELO.
    """
    identities = []
    for n in range(count):
        address = f"198.51.100.{10 + n}"
        if n >= count - weak:
            helo = f"mail.smallbiz{n}.example"
            identities.append(Identity(address, _UNAVAILABLE, _UNAVAILABLE, helo))
        else:
            name = f"mx{n}.sender{n}.example"
            identities.append(Identity(address, name, name, name))
    return identities


@attrs.define
class Session:
    """One SMTP connection."""

    client: int
    #: When connect() was called.
    started: float
    #: When the greeting arrived: an smtpd process took the connection.
    greeted: float | None = None
    #: When the connection was closed (by either side).
    ended: float = 0.0
    outcome: str = DROPPED
    #: The last command sent (a `STAGES` member): where a refusal or a drop
    #: happened.
    stage: str = CONNECT
    code: int = 0
    reply: str = ""

    @property
    def greeting_wait(self) -> float | None:
        """Seconds from connect to the greeting (queueing for a process)."""
        return None if self.greeted is None else self.greeted - self.started

    def held(self, start: float, end: float) -> float:
        """Seconds of smtpd process time this session held within [start, end]."""
        if self.greeted is None:
            return 0.0
        return max(0.0, min(self.ended, end) - max(self.greeted, start))


@attrs.define
class Message:
    """One legitimate message, across its delivery attempts."""

    sender: int
    number: int
    #: When the first attempt began.
    first_attempt: float
    accepted: float | None = None
    refused: bool = False
    attempts: list[Session] = attrs.field(factory=list)

    @property
    def delay(self) -> float | None:
        """Seconds from first attempt to acceptance."""
        return None if self.accepted is None else self.accepted - self.first_attempt


class _Stopped(Exception):
    """The runner ended the session."""


class _Client(threading.Thread):
    """A thread holding at most one SMTP connection, which `stop` can cut."""

    def __init__(
        self,
        number: int,
        identity: Identity,
        address: tuple[str, int],
        timeout: float,
        name: str,
        link_delay: float = 0.0,
    ) -> None:
        super().__init__(name=f"{name}-{number}", daemon=True)
        self.number = number
        self.identity = identity
        self.address = address
        self.timeout = timeout
        #: Seconds between a reply and the client's next command (a round
        #: trip of the link it stands behind; 0 on the loopback).
        self.link_delay = link_delay
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.error: BaseException | None = None

    def stop(self) -> None:
        """Stop: end the current session at once, start no other."""
        self.stopping.set()
        with self._lock:
            if self._socket is not None:
                # Unblocks a recv() waiting for a greeting or a reply.
                with contextlib.suppress(OSError):
                    self._socket.shutdown(socket.SHUT_RDWR)

    def _pause(self, seconds: float) -> None:
        if seconds > 0 and self.stopping.wait(seconds):
            raise _Stopped

    def _link(self) -> None:
        """Wait one round trip before sending (nothing on the loopback)."""
        self._pause(self.link_delay)

    @staticmethod
    def _do(session: Session, stage: str, call: Callable[[], tuple[int, bytes]]) -> int:
        """Send one command (*call*), record its reply; return the code."""
        session.stage = stage
        code, text = call()
        session.code, session.reply = code, text.decode("utf-8", "replace")
        if 400 <= code < 500:
            session.outcome = DEFERRED
        elif code >= 500:
            session.outcome = REFUSED
        return code

    def _session(
        self, session: Session, body: Callable[[smtplib.SMTP], None]
    ) -> Session:
        """Connect, present the identity, run *body*; record how it ended."""
        client = smtplib.SMTP(timeout=self.timeout)
        session.stage = CONNECT
        try:
            if self.stopping.is_set():
                raise _Stopped
            sock = socket.create_connection(self.address, self.timeout)
            with self._lock:
                self._socket = sock
            if self.stopping.is_set():
                raise _Stopped
            # smtplib.SMTP.connect(), with the socket where `stop` can cut it
            # while the greeting is awaited (the accept queue can be long).
            client.sock = sock
            code = self._do(session, CONNECT, client.getreply)
            session.greeted = time.monotonic()
            if code != 220:
                return session
            # The identity this connection stands for, sent at once (no EHLO
            # first: smtpd does not need one, and a real client would not
            # have sent anything yet).  smtpd answers the XCLIENT like a new
            # greeting, after its connect-stage checks.
            xclient = self.identity.xclient()
            self._link()
            if (
                self._do(session, CONNECT, lambda: client.docmd("XCLIENT", xclient))
                != 220
            ):
                return session
            client.ehlo_resp = client.helo_resp = None
            client.esmtp_features = {}
            client.does_esmtp = False
            session.outcome = DROPPED  # until the body says otherwise
            body(client)
            if session.code != 421:  # after a 421, smtpd has hung up
                self._link()
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    client.docmd("QUIT")
        except _Stopped:
            session.outcome = STOPPED
        except (smtplib.SMTPException, OSError) as e:
            if self.stopping.is_set():
                session.outcome = STOPPED
            elif session.outcome not in (DEFERRED, REFUSED, ACCEPTED):
                session.outcome = DROPPED
                session.reply = str(e) or type(e).__name__
        finally:
            with self._lock:
                self._socket = None
            client.close()
            session.ended = time.monotonic()
        return session

    def run(self) -> None:
        try:
            self.loop()
        except BaseException as e:  # noqa: BLE001 - reported by the runner
            self.error = e

    def loop(self) -> None:
        """The client's life; overridden."""
        raise NotImplementedError


class Bot(_Client):
    """Holds smtpd processes: dawdles before every command, reconnects.

    The commands are EHLO, MAIL, RCPT, DATA and QUIT: five dawdles for a
    session that gets its message in, three before a refusal at RCPT.
    """

    def __init__(
        self,
        number: int,
        identity: Identity,
        address: tuple[str, int],
        *,
        dawdle: float,
        reconnect_pause: float,
        recipient: str,
        timeout: float = 60.0,
        seed: int = 0,
    ) -> None:
        super().__init__(number, identity, address, timeout, "bot")
        self.dawdle = dawdle
        self.reconnect_pause = reconnect_pause
        self.recipient = recipient
        self.sessions: list[Session] = []
        self._rng = random.Random(seed * 1000 + number)
        #: When not empty, each session presents one of these at random (a
        #: wide botnet: many addresses, each seen rarely).
        self.pool: Sequence[Identity] = ()

    def _wait(self) -> None:
        # +-25% so that the bots do not march in step.
        self._pause(self.dawdle * self._rng.uniform(0.75, 1.25))

    def _converse(self, client: smtplib.SMTP, *, session: Session) -> None:
        self._message(client, session)
        if session.code != 421:  # smtpd has not hung up: QUIT, after a dawdle
            self._wait()

    def _message(self, client: smtplib.SMTP, session: Session) -> None:
        do = self._do
        helo = self.identity.helo
        self._wait()
        if not 200 <= do(session, "EHLO", lambda: client.ehlo(helo)) < 300:
            return
        self._wait()
        sender = f"info@{self.identity.address.replace('.', '-')}.example"
        if do(session, "MAIL", lambda: client.mail(sender)) != 250:
            return
        self._wait()
        if do(session, "RCPT", lambda: client.rcpt(self.recipient)) not in (250, 251):
            return
        self._wait()
        if do(session, "DATA", lambda: client.docmd("DATA")) != 354:
            return
        client.send(b"Subject: offer\r\n\r\nBuy now.\r\n.\r\n")
        if do(session, "DATA-END", client.getreply) == 250:
            session.outcome = ACCEPTED

    def loop(self) -> None:
        """Connect, dawdle through one message, reconnect; until stopped."""
        while not self.stopping.is_set():
            if self.pool:
                self.identity = self._rng.choice(self.pool)
            session = Session(self.number, time.monotonic())
            self._session(session, functools.partial(self._converse, session=session))
            self.sessions.append(session)
            if self.reconnect_pause > 0:
                self.stopping.wait(self.reconnect_pause)


class Sender(_Client):
    """A legitimate MTA, with a queue.

    One message per connection, sent as soon as the last one is done;
    deferred messages are retried after *retry_delay*.
    """

    def __init__(
        self,
        number: int,
        identity: Identity,
        address: tuple[str, int],
        *,
        retry_delay: float,
        recipients: Sequence[str],
        timeout: float = 60.0,
        link_delay: float = 0.0,
    ) -> None:
        super().__init__(number, identity, address, timeout, "sender", link_delay)
        self.retry_delay = retry_delay
        self.recipients = tuple(recipients)
        self.messages: list[Message] = []
        #: Set by the runner when the flood ends: send no new message, only
        #: retry the deferred ones.
        self.draining = threading.Event()
        self._pending: list[tuple[float, Message]] = []
        self._backoff_until = 0.0

    @property
    def pending(self) -> int:
        """Messages deferred and not yet accepted."""
        return sum(1 for m in self.messages if m.accepted is None and not m.refused)

    def _converse(
        self, client: smtplib.SMTP, *, session: Session, message: Message
    ) -> None:
        do, link = self._do, self._link
        helo = self.identity.helo
        link()
        if not 200 <= do(session, "EHLO", lambda: client.ehlo(helo)) < 300:
            return
        # The HELO names the sender's domain (its PTR may be missing).
        sender = f"news{message.number}@{self.identity.helo}"
        link()
        if do(session, "MAIL", lambda: client.mail(sender)) != 250:
            return
        for recipient in self.recipients:
            link()
            reply = do(session, "RCPT", lambda: client.rcpt(recipient))  # noqa: B023
            if reply not in (250, 251):
                return
        link()
        if do(session, "DATA", lambda: client.docmd("DATA")) != 354:
            return
        link()
        client.send(
            (
                f"From: <{sender}>\r\nTo: <{self.recipients[0]}>\r\n"
                f"Subject: message {self.number}.{message.number}\r\n\r\n"
                "Your statement is ready.\r\n.\r\n"
            ).encode()
        )
        if do(session, "DATA-END", client.getreply) == 250:
            session.outcome = ACCEPTED

    def _next(self) -> Message | None:
        """The next message to try: a due retry, else a new one, else wait."""
        while not self.stopping.is_set():
            now = time.monotonic()
            if self._pending and self._pending[0][0] <= now:
                return self._pending.pop(0)[1]
            if now < self._backoff_until:
                # The destination deferred us: like an MTA's queue manager,
                # send nothing new to it until the retry is due.
                self.stopping.wait(self._backoff_until - now)
                continue
            if not self.draining.is_set():
                message = Message(self.number, len(self.messages), now)
                self.messages.append(message)
                return message
            if not self._pending:
                return None
            self.stopping.wait(self._pending[0][0] - now)
        return None

    def loop(self) -> None:
        """Send until draining and nothing is pending, or until stopped."""
        while (message := self._next()) is not None:
            session = Session(self.number, time.monotonic())
            if not message.attempts:
                message.first_attempt = session.started
            self._session(
                session,
                functools.partial(self._converse, session=session, message=message),
            )
            message.attempts.append(session)
            if session.outcome == ACCEPTED:
                message.accepted = session.ended
            elif session.outcome == REFUSED:
                message.refused = True
            elif session.outcome == STOPPED:
                return
            else:
                # Deferred or dropped: the queue tries again later, and
                # holds back new mail to this destination until then.
                self._backoff_until = session.ended + self.retry_delay
                self._pending.append((self._backoff_until, message))
                self._pending.sort(key=lambda item: item[0])


class _ClientProcess:
    """A process running clients; it reports once, through a queue, and exits.

    *target* is called in the new process as ``target(*args, stop, results)``
    and puts exactly one result on *results* before it returns.
    """

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results: Any = context.Queue()
        self._process = context.Process(
            target=target, args=(*args, self._stop, self._results), daemon=True
        )

    @property
    def pid(self) -> int | None:
        """The process id, once started."""
        return self._process.pid

    def start(self) -> None:
        """Start the process (and so its clients)."""
        self._process.start()

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self._process.is_alive()

    def _collect(self, timeout: float) -> Any:
        """The process's one result; queue.Empty if none came within *timeout*.

        Once it came, the process is joined (killed if it lingers).
        """
        result = self._results.get(timeout=timeout)
        self._end()
        return result

    def _end(self) -> None:
        """Join the process; kill it if it does not exit by itself."""
        self._process.join(10.0)
        if self._process.is_alive():
            self._process.kill()

    def _collect_or_kill(self, timeout: float) -> Any:
        """`_collect`, but a process that never reports is killed."""
        try:
            return self._collect(timeout)
        except queue.Empty:
            self._end()
            raise


#: Bots per `BotSwarm` process.
BOTS_PER_PROCESS: Final = 5


@attrs.frozen
class SwarmSpec:
    """What `BotSwarm` needs to build its bots in another process."""

    identities: tuple[Identity, ...]
    address: tuple[str, int]
    dawdle: float
    reconnect_pause: float
    recipient_domain: str
    seed: int
    #: Added to the swarm process's nice value (0: compete for the CPU as
    #: equals; 19: take only what Postfix, policyd and the senders leave).
    nice: int = 0
    #: The number of the first bot (bots are numbered across swarms).
    first: int = 0
    #: Identities every bot draws from, one per session (empty: each bot
    #: keeps its own identity).
    pool: tuple[Identity, ...] = ()


def _swarm(
    spec: SwarmSpec, stop: Any, results: Any
) -> None:  # pragma: no cover - runs in the swarm's process
    if spec.nice:
        os.nice(spec.nice)
    bots = [
        Bot(
            n,
            identity,
            spec.address,
            dawdle=spec.dawdle,
            reconnect_pause=spec.reconnect_pause,
            recipient=f"user{n}@{spec.recipient_domain}",
            seed=spec.seed,
        )
        for n, identity in enumerate(spec.identities, start=spec.first)
    ]
    for bot in bots:
        bot.pool = spec.pool
        bot.start()
    stop.wait()
    for bot in bots:
        bot.stop()
    for bot in bots:
        bot.join(30.0)
    errors = [f"{bot.name}: {bot.error!r}" for bot in bots if bot.error is not None]
    results.put(([s for bot in bots for s in bot.sessions], errors))


class BotSwarm(_ClientProcess):
    """
    Some bots, as threads of a process of their own.

    In the runner's process they would compete with the legitimate senders
    for Python's global interpreter lock, and every bot reconnect would slow
    the senders down: a cost of this test bed, not of the mail server.  The
    runner starts one swarm per `BOTS_PER_PROCESS` bots: twenty threads in
    one process fell into spells of burning more CPU per reconnect.
    """

    def __init__(self, spec: SwarmSpec) -> None:
        super().__init__(_swarm, spec)
        self.spec = spec

    def stop(self, timeout: float = 60.0) -> list[Session]:
        """Stop every bot; return their sessions (raise if one failed)."""
        self._stop.set()
        sessions, errors = self._collect_or_kill(timeout)
        if errors:
            raise RuntimeError("bot failed: " + "; ".join(errors))
        return list(sessions)


@attrs.frozen
class SenderSpec:
    """What `SenderProcess` needs to build its sender in another process."""

    number: int
    identity: Identity
    address: tuple[str, int]
    retry_delay: float
    recipients: tuple[str, ...]
    link_delay: float = 0.0


def _sender(
    spec: SenderSpec, drain: Any, stop: Any, results: Any
) -> None:  # pragma: no cover - runs in the sender's process
    sender = Sender(
        spec.number,
        spec.identity,
        spec.address,
        retry_delay=spec.retry_delay,
        recipients=spec.recipients,
        link_delay=spec.link_delay,
    )
    sender.start()
    while sender.is_alive():
        if stop.is_set():
            sender.stop()
        elif drain.is_set():
            sender.draining.set()
        sender.join(0.05)
    error = None if sender.error is None else f"{sender.name}: {sender.error!r}"
    results.put((sender.messages, error))


class SenderProcess(_ClientProcess):
    """
    One legitimate sender in a process of its own.

    Several senders as threads of one process share Python's global
    interpreter lock, and measured here, the runner then fell into spells
    of spending four times the CPU per message (throughput halving for tens
    of seconds, with no bots at all): a cost of the test bed, not of the
    mail server.  One process each keeps the senders independent, like the
    separate MTAs they stand for.
    """

    def __init__(self, spec: SenderSpec, drain: Any) -> None:
        super().__init__(_sender, spec, drain)
        self.spec = spec
        self.messages: list[Message] = []

    def finish(self, timeout: float) -> bool:
        """Wait up to *timeout* for the sender to drain, then stop it.

        Collect its messages; return whether it had drained by itself.
        """
        drained = True
        try:
            messages, error = self._collect(timeout)
        except queue.Empty:
            drained = False
            self._stop.set()
            messages, error = self._collect_or_kill(60.0)
        if error:
            raise RuntimeError(f"sender failed: {error}")
        self.messages = list(messages)
        return drained
