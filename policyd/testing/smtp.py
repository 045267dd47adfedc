"""
SMTP clients for the test bed: one scripted session, or smtp-source(1).

- `send_message` sends one message with `smtplib` (optionally presenting
  another client identity with XCLIENT, its values encoded by `xtext`) and
  records every reply in an `SmtpTranscript`.
- `run_smtp_source` and `start_smtp_source` (in the background) run
  Postfix's smtp-source load generator; `smtp_source_argv` builds its
  command line.
- `wait_for_smtp_greeting` waits until a server answers with 220, and
  `ehlo_features` says which ESMTP extensions it offers.

Any SMTP server will do; `policyd.testing.postfix.PostfixInstance` has
shortcuts that aim these at one of its listeners.
"""

from __future__ import annotations

import atexit
import contextlib
import smtplib
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Final

import attrs

from policyd.testing.system import DEFAULT_TIMEOUT

#: The domain test mail is addressed to: the bed's Postfix instance relays
#: it (to the discard transport), so every recipient must be in it.
RELAY_DOMAIN: Final = "example.test"

_GREETING_RETRY: Final = 0.1


def wait_for_smtp_greeting(
    host: str, port: int, timeout: float = DEFAULT_TIMEOUT
) -> str:
    """Connect until the server at *host*:*port* sends its 220 greeting."""
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0) as conn:
                greeting = conn.makefile("rb").readline().decode("ascii", "replace")
                with contextlib.suppress(OSError):
                    conn.sendall(b"QUIT\r\n")
                if greeting.startswith("220"):
                    return greeting.strip()
                last_error = f"greeting {greeting!r}"
        except OSError as e:
            last_error = str(e)
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"no 220 greeting from {host}:{port} within {timeout}s: {last_error}"
            )
        time.sleep(_GREETING_RETRY)


@attrs.frozen
class SmtpStep:
    """One SMTP command and the server's reply."""

    command: str
    code: int
    text: str


@attrs.frozen
class SmtpTranscript:
    """Every command `send_message` sent and what Postfix answered."""

    steps: tuple[SmtpStep, ...]
    #: The client's TCP port: policyd sees it as ``client_port`` (also after
    #: an XCLIENT without PORT), which tells this session's requests apart.
    local_port: int = 0

    def replies(self, command: str) -> list[SmtpStep]:
        """The steps whose command starts with *command* (e.g. ``RCPT``)."""
        return [s for s in self.steps if s.command.upper().startswith(command.upper())]

    def code(self, command: str) -> int:
        """The reply code of the only or first *command*; KeyError if not sent."""
        found = self.replies(command)
        if not found:
            raise KeyError(f"{command} was not sent: {self}")
        return found[0].code

    @property
    def accepted(self) -> bool:
        """Whether the message was queued (DATA end answered 250)."""
        return any(s.command == "DATA-END" and s.code == 250 for s in self.steps)

    @property
    def disconnected(self) -> bool:
        """Whether the server hung up before the client said QUIT and got 221."""
        return bool(self.steps) and self.steps[-1].command == "DISCONNECTED"

    def __str__(self) -> str:
        return "; ".join(f"{s.command} -> {s.code} {s.text}" for s in self.steps)


_XTEXT_SAFE = frozenset(chr(c) for c in range(33, 127)) - {"+", "="}


def xtext(value: str) -> str:
    """RFC 3461 xtext, the encoding of XCLIENT attribute values."""
    return "".join(
        ch if ch in _XTEXT_SAFE else "".join(f"+{b:02X}" for b in ch.encode("utf-8"))
        for ch in value
    )


def bot_xclient(address: str, **extra: str) -> dict[str, str]:
    """
    XCLIENT attributes of a client that looks like a spambot.

    No reverse DNS at all (``client_name`` and ``reverse_client_name`` both
    ``unknown``) and a bare-word HELO; *extra* adds or replaces attributes
    (``LOGIN=alice``, ``HELO=localhost``).
    """
    return {
        "ADDR": address,
        "NAME": "[UNAVAILABLE]",
        "REVERSE_NAME": "[UNAVAILABLE]",
        "HELO": "foo",
        "PROTO": "ESMTP",
        **extra,
    }


def send_message(
    host: str,
    port: int,
    *,
    sender: str = "sender@example.org",
    recipients: Sequence[str] = (f"rcpt@{RELAY_DOMAIN}",),
    helo: str = "client.example.net",
    xclient: Mapping[str, str] | None = None,
    ehlo_after_xclient: bool = True,
    mail_options: Sequence[str] = (),
    body: str | None = None,
    timeout: float = 30.0,
) -> SmtpTranscript:
    """
    Send one message and record every reply.

    With *xclient*, EHLO is followed by ``XCLIENT name=value ...`` (values
    xtext-encoded; ``ADDR``, ``NAME``, ``REVERSE_NAME``, ``HELO``, ``PROTO``,
    ``PORT``, ``LOGIN``, ...) to present another client identity.  smtpd
    answers 220 and is back at the greeting stage; the client then says
    EHLO again (with *helo*), unless *ehlo_after_xclient* is false, in which
    case the HELO name from XCLIENT stays in effect.  *mail_options* go on
    MAIL FROM (e.g. ``SMTPUTF8``).  DATA is sent only if a recipient was
    accepted.  A refused XCLIENT is followed by QUIT only.  A server
    disconnect ends the transcript with a ``DISCONNECTED`` step.
    """
    steps: list[SmtpStep] = []
    local_port = 0

    def record(command: str, reply: tuple[int, bytes | str]) -> int:
        code, text = reply
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        steps.append(SmtpStep(command, code, text))
        return code

    client = smtplib.SMTP(timeout=timeout)
    try:
        record("CONNECT", client.connect(host, port))
        if client.sock is not None:
            local_port = int(client.sock.getsockname()[1])
        record("EHLO", client.ehlo(helo))
        if xclient:
            arguments = " ".join(f"{k.upper()}={xtext(v)}" for k, v in xclient.items())
            if record("XCLIENT", client.docmd("XCLIENT", arguments)) != 220:
                # Refused (e.g. a 421 from a connect-stage policy check, which
                # also hangs up): say QUIT as a client would, which records
                # whether the server is still there.
                record("QUIT", client.docmd("QUIT"))
                return SmtpTranscript(tuple(steps), local_port)
            client.ehlo_resp = client.helo_resp = None
            client.esmtp_features = {}
            client.does_esmtp = False
            if ehlo_after_xclient:
                record("EHLO", client.ehlo(helo))
        record("MAIL", client.mail(sender, list(mail_options)))
        accepted = 0
        for recipient in recipients:
            if record(f"RCPT {recipient}", client.rcpt(recipient)) in (250, 251):
                accepted += 1
        if accepted:
            if record("DATA", client.docmd("DATA")) == 354:
                message = body or (
                    f"From: <{sender}>\r\nTo: <{recipients[0]}>\r\n"
                    "Subject: policyd end-to-end test\r\n\r\nHello.\r\n"
                )
                client.send(smtplib.quotedata(message).encode("utf-8") + b"\r\n.\r\n")
                record("DATA-END", client.getreply())
        else:
            record("RSET", client.rset())
        record("QUIT", client.docmd("QUIT"))
    except smtplib.SMTPServerDisconnected as e:
        steps.append(SmtpStep("DISCONNECTED", 0, str(e)))
    finally:
        client.close()
    return SmtpTranscript(tuple(steps), local_port)


def ehlo_features(
    host: str, port: int, helo: str = "client.example.net"
) -> dict[str, str]:
    """The ESMTP extensions *host*:*port* advertises to us (e.g. XCLIENT)."""
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.ehlo(helo)
        return dict(client.esmtp_features)


@attrs.frozen
class SmtpSourceResult:
    """Outcome of one smtp-source(1) run."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> SmtpSourceResult:
        """Raise unless smtp-source exited 0."""
        if self.returncode != 0:
            raise AssertionError(
                f"{' '.join(self.argv)} exited {self.returncode}: "
                f"{self.stderr.strip() or self.stdout.strip()}"
            )
        return self


def smtp_source_argv(
    program: str,
    host: str,
    port: int,
    *,
    sessions: int = 1,
    messages: int = 1,
    recipients: int = 1,
    sender: str = "sender@example.org",
    recipient: str = f"rcpt@{RELAY_DOMAIN}",
    helo: str = "client.example.net",
    keep_open: bool = False,
    number_recipients: bool = False,
    tolerant: bool = False,
    delay: int = 0,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """
    The smtp-source command line for *host*:*port*.

    *sessions* is ``-s`` (parallel sessions), *messages* ``-m`` (total, not per
    session), *recipients* ``-r``; *keep_open* adds ``-d`` (several messages
    per connection), *number_recipients* ``-N`` (smtp-source 3.7 *prepends*
    a sequence number to the recipient localpart), *tolerant* ``-A`` (don't
    abort on a non-2xx reply), *delay* ``-w`` (whole seconds to wait before
    each next message of a session; with *keep_open* the session stays
    connected, holding its smtpd process, while it waits).  Without ``-A``
    any rejection makes smtp-source exit non-zero.
    """
    argv = [
        program,
        "-s", str(sessions),
        "-m", str(messages),
        "-r", str(recipients),
        "-f", sender,
        "-t", recipient,
        "-M", helo,
    ]  # fmt: skip
    argv += ["-d"] * keep_open + ["-N"] * number_recipients + ["-A"] * tolerant
    if delay > 0:
        argv += ["-w", str(delay)]
    argv += [*extra_args, f"inet:{host}:{port}"]
    return argv


class SmtpSourceProcess:
    """
    smtp-source(1) running in the background; `wait` for its result.

    Use as a context manager: leaving the block kills a run still going, so
    a failing test never leaves load generators behind.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = tuple(argv)
        self.started = time.monotonic()
        #: Wall-clock start, comparable with policyd's event times.
        self.started_at = time.time()
        self._process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        atexit.register(self.kill)

    @property
    def pid(self) -> int:
        """The process id."""
        return self._process.pid

    def running(self) -> bool:
        """Whether smtp-source is still running."""
        return self._process.poll() is None

    def wait(self, timeout: float = 60.0) -> SmtpSourceResult:
        """Wait for the exit (killing it after *timeout* and raising)."""
        try:
            stdout, stderr = self._process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        atexit.unregister(self.kill)
        return SmtpSourceResult(
            self.argv, self._process.returncode, stdout, stderr,
            time.monotonic() - self.started,
        )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL smtp-source if it still runs, and reap it."""
        if self._process.returncode is None:  # not reaped by `wait` yet
            if self._process.poll() is None:
                self._process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.communicate(timeout=10.0)
        atexit.unregister(self.kill)

    def __enter__(self) -> SmtpSourceProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def start_smtp_source(
    program: str, host: str, port: int, **options: Any
) -> SmtpSourceProcess:
    """Start smtp-source against *host*:*port* (options of `smtp_source_argv`)."""
    return SmtpSourceProcess(smtp_source_argv(program, host, port, **options))


def run_smtp_source(
    program: str, host: str, port: int, *, timeout: float = 60.0, **options: Any
) -> SmtpSourceResult:
    """
    Run smtp-source against *host*:*port* and wait (at most *timeout*).

    *options* are those of `smtp_source_argv`.
    """
    return start_smtp_source(program, host, port, **options).wait(timeout)
