"""The command line: output, exit codes, and the real process.

The first classes call `policyd.cli.main` in-process for what needs no
reactor (``config``, usage and configuration errors).  The rest start
``python -m policyd`` as a subprocess, because only a process shows signal
handling, exit statuses, stdout logging and real sockets.  Those use only
127.0.0.1, port 0 or an inherited pre-bound socket, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from helpers import run_main, sourced_by_sh

from policyd import __version__, config
from policyd.testing.daemon import PolicydProcess

# A generous bound for anything a subprocess does; normally it takes < 1 s.
TIMEOUT = 15.0

REQUEST = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=RCPT\n"
    b"protocol_name=ESMTP\n"
    b"client_address=192.0.2.10\n"
    b"client_name=mail.example.net\n"
    b"helo_name=mail.example.net\n"
    b"sender=alice@example.net\n"
    b"recipient=bob@example.org\n"
    b"instance=123.456.7\n"
    b"stress=\n"
    b"\n"
)
DUNNO_REPLY = b"action=DUNNO\n\n"

# One bad value per variable, and a fragment of the accepted form it names.
BAD = {
    "POLICYD_LISTEN": ("10040", "e.g. tcp:10040:interface=127.0.0.1"),
    "POLICYD_METRICS_LISTEN": ("tcp:1 tcp:2", "or none to disable"),
    "POLICYD_LOG_LEVEL": ("verbose", "expected one of: debug, info, warn, error"),
    "POLICYD_LOG_FORMAT": ("yaml", "expected one of: text, json"),
    "POLICYD_DECISION_TIMEOUT": ("5 minutes", "expected a duration such as"),
    "POLICYD_FALLBACK_ACTION": ("REJECT", "must not refuse mail for good"),
    "POLICYD_REQUEST_TIMEOUT": ("0", "expected a duration between"),
    "POLICYD_IDLE_TIMEOUT": ("2d", "expected a duration such as"),
    "POLICYD_MAX_LINE_LENGTH": ("8k", "expected a whole number from 64"),
    "POLICYD_MAX_ATTRIBUTES": ("1", "expected a whole number from 8"),
    "POLICYD_MAX_REQUEST_BYTES": ("-1", "expected a whole number from 256"),
    "POLICYD_SMTPD_CAPACITY": (
        "0",
        "expected a whole number from 1 to 1000000, or auto",
    ),
    "POLICYD_POSTFIX_CONFIG_DIR": ("etc/postfix", "expected an absolute path"),
    "POLICYD_HOST_FROM": ("server_address", "expected one of"),
    "POLICYD_HOST_CAPACITIES": ("mx1:200", "is not HOST=PROCESSES"),
    "POLICYD_BUSY_WINDOW": ("50ms", "expected a duration between 0.1s and 3600s"),
    "POLICYD_TRANSACTION_TIMEOUT": ("1d", "expected a duration such as"),
    "POLICYD_CLOSE_LINGER": ("2h", "expected a duration between 0s and 3600s"),
    "POLICYD_ELEVATED_ENTER": ("70%", "expected a number from 0 to 1"),
    "POLICYD_ELEVATED_EXIT": ("1.5", "expected a number from 0 to 1"),
    "POLICYD_POSTFIX_STRESS_MIN_LOAD": ("-0.1", "expected a number from 0 to 1"),
    "POLICYD_OVERLOAD_ENTER": ("-0.9", "expected a number from 0 to 1"),
    "POLICYD_OVERLOAD_EXIT": ("high", "expected a number from 0 to 1"),
    "POLICYD_LEVEL_MIN_DWELL": ("2h", "expected a duration between 0s and 3600s"),
    "POLICYD_RATE_CAPACITY": ("-5", "expected a number of zero or more"),
    "POLICYD_RATE_WINDOW": ("0", "expected a duration between 1s and 300s"),
    "POLICYD_POSTFIX_STRESS_HOLD": ("forever", "expected a duration such as"),
    "POLICYD_POSTFIX_STRESS_LEVEL": (
        "yes",
        "expected one of: overload, elevated, ignore",
    ),
    "POLICYD_CLIENT_IPV4_PREFIX": ("33", "expected a whole number from 8 to 32"),
    "POLICYD_CLIENT_IPV6_PREFIX": ("/64", "expected a whole number from 16 to 128"),
    "POLICYD_MAX_TRACKED_CLIENTS": ("1e6", "expected a whole number from 100"),
    "POLICYD_CLIENT_RATE_WINDOW": ("0", "expected a duration between 1s and 86400s"),
    "POLICYD_DRY_RUN": ("maybe", "expected 1/yes/true/on or 0/no/false/off"),
    "POLICYD_DRY_RUN_WARN": ("2", "expected 1/yes/true/on or 0/no/false/off"),
    "POLICYD_REFUSAL_LOG_LIMIT": ("-1", "expected a whole number from 0 to 1000000"),
    "POLICYD_SUSPICIOUS_SCORE": ("0", "expected a whole number from 1 to 1000"),
    "POLICYD_REJECT_SCORE": ("8.5", "expected a whole number from 1 to 1000"),
    "POLICYD_WEIGHT_NO_CLIENT_NAME": ("101", "expected a whole number from -100"),
    "POLICYD_WEIGHT_NO_REVERSE_NAME": ("-101", "expected a whole number from -100"),
    "POLICYD_WEIGHT_DYNAMIC_NAME": ("two", "expected a whole number from -100"),
    "POLICYD_WEIGHT_NO_HELO": ("", "expected a whole number from -100 to 100"),
    "POLICYD_WEIGHT_HELO_NOT_FQDN": ("2.5", "expected a whole number from -100"),
    "POLICYD_WEIGHT_HELO_BARE_IP": ("1000", "expected a whole number from -100"),
    "POLICYD_WEIGHT_HELO_FOREIGN_LITERAL": ("x", "expected a whole number"),
    "POLICYD_WEIGHT_HELO_IMPERSONATES": ("5 points", "expected a whole number"),
    "POLICYD_WEIGHT_CONCURRENCY": ("0x3", "expected a whole number from -100"),
    "POLICYD_WEIGHT_MESSAGE_RATE": ("1e2", "expected a whole number from -100"),
    "POLICYD_WEIGHT_SESSION_RATE": ("-", "expected a whole number from -100"),
    "POLICYD_WEIGHT_QUICK_RETRY": ("+-3", "expected a whole number from -100"),
    "POLICYD_WEIGHT_PROCESS_HOLDER": ("3.0", "expected a whole number from -100"),
    "POLICYD_OVERLOAD_SUSPICIOUS_SCORE": ("0", "expected a whole number from 1"),
    "POLICYD_BAR_STEP": ("-1", "expected a duration such as"),
    "POLICYD_HOLD_LIMIT": ("long", "expected a duration such as"),
    "POLICYD_HOLD_GRACE": ("2h", "expected a duration between 0s and 3600s"),
    "POLICYD_HOLD_WINDOW": ("0", "expected a duration between 1s and 86400s"),
    "POLICYD_CLIENT_CONCURRENCY_LIMIT": ("0", "expected a whole number from 1"),
    "POLICYD_CLIENT_MESSAGE_RATE_LIMIT": ("-1", "expected a number of zero or more"),
    "POLICYD_CLIENT_SESSION_RATE_LIMIT": ("lots", "expected a number of zero"),
    "POLICYD_QUICK_RETRY_WINDOW": ("2d", "expected a duration such as"),
    "POLICYD_MY_HOSTNAMES": ("mx..example.org", "is not a host or domain name"),
    "POLICYD_ALLOW_NETWORKS": ("192.0.2.0/33", "is not a network; expected CIDR"),
    "POLICYD_ALLOW_PEERS": ("", "at least one network"),
    "POLICYD_ALLOW_NETWORKS_FILE": ("networks", "expected an absolute path"),
    "POLICYD_ALLOW_DOMAINS_FILE": ("/nonexistent/domains", "cannot read"),
    "POLICYD_BACKEND": ("postgres", "expected one of: memory, redis"),
    "POLICYD_REDIS_URL": ("http://redis:6379", "the scheme must be redis://"),
    "POLICYD_REDIS_PREFIX": ("my prefix", "without spaces"),
    "POLICYD_REDIS_DEADLINE": ("20s", "between 0.001s and 10s"),
    "POLICYD_REDIS_TIMEOUT": ("0", "between 0.1s and 60s"),
    "POLICYD_ALLOW_DOMAINS": ("*.example.com", "is not a host or domain name"),
    "POLICYD_ELEVATED_ACTION": ("450", "must be followed by text"),
    "POLICYD_ELEVATED_REJECT_ACTION": ("OK", "must start with a 4xx/5xx code"),
    "POLICYD_OVERLOAD_ACTION": (
        "421 4.7.0 " + "x" * 300 + " {reasons}",
        "checked with every reason filled into {reasons}",
    ),
    "POLICYD_OVERLOAD_REJECT_ACTION": ("DISCARD", "expected a 4xx/5xx code with"),
}

_TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (debug|info|warn|error|critical) "
    r"\[[^\]\s]+\] \S.*"
)


def _parse_config(output: str) -> list[tuple[str, str, str]]:
    """``policyd config`` output as (variable, value, comment) in order."""
    settings = []
    comment: list[str] = []
    for line in output.splitlines():
        if line.startswith("# "):
            comment.append(line[2:])
        elif line:
            (word,) = shlex.split(line)  # exactly one shell word per line
            name, _, value = word.partition("=")
            settings.append((name, value, " ".join(comment)))
            comment = []
    return settings


def _clean_env(**settings: str) -> dict[str, str]:
    """The test's environment without any POLICYD_* variable, plus *settings*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env.update(settings)
    return env


class TestConfigCommand:
    """``policyd config`` prints every variable, its value and help."""

    def test_every_variable(self, capsys: pytest.CaptureFixture[str]) -> None:
        """One NAME=value line per variable, in declaration order, exit 0."""
        code, out, err = run_main(capsys, ["config"], {})
        assert (code, err) == (0, "")
        settings = _parse_config(out)
        assert [name for name, _, _ in settings] == list(config.variables())
        for line in out.splitlines():
            assert line == "" or line.startswith("# ") or line.startswith("POLICYD_")

    def test_defaults_and_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Unset variables show their default and the help text, marked default."""
        _, out, _ = run_main(capsys, ["config"], {})
        described = {s.variable: s for s in config.describe({})}
        for name, value, comment in _parse_config(out):
            assert value == described[name].default
            assert comment == f"{described[name].help} (default)"

    def test_effective_values(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Set variables show their value, and the comment names the default."""
        env = {
            "POLICYD_LOG_LEVEL": "debug",
            "POLICYD_LISTEN": "tcp:1:interface=127.0.0.1 tcp:2:interface=127.0.0.1",
            "POLICYD_FALLBACK_ACTION": "450 4.7.1 Try again later",
        }
        code, out, _ = run_main(capsys, ["config"], env)
        assert code == 0
        shown = {name: (value, comment) for name, value, comment in _parse_config(out)}
        described = {s.variable: s for s in config.describe({})}
        for name, value in env.items():
            assert shown[name][0] == value
            assert shown[name][1] == (
                f"{described[name].help} (default: {described[name].default})"
            )
        assert shown["POLICYD_LOG_FORMAT"] == (
            "text",
            described["POLICYD_LOG_FORMAT"].help + " (default)",
        )

    def test_shell_quoting(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Values with spaces are quoted, so each line is one shell word."""
        env = {"POLICYD_LISTEN": "tcp:1:interface=127.0.0.1 tcp:2:interface=127.0.0.1"}
        _, out, _ = run_main(capsys, ["config"], env)
        (line,) = [x for x in out.splitlines() if x.startswith("POLICYD_LISTEN=")]
        assert line == (
            "POLICYD_LISTEN='tcp:1:interface=127.0.0.1 tcp:2:interface=127.0.0.1'"
        )

    def test_sourced_by_sh(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """The output, sourced by /bin/sh, reproduces every value exactly."""
        env = {
            "POLICYD_LISTEN": "tcp:1:interface=127.0.0.1 unix:/run/p.sock:mode=660",
            "POLICYD_FALLBACK_ACTION": '450 4.7.1 Don\'t `touch x` $HOME; "now" \\',
            "POLICYD_LOG_LEVEL": "INFO",
        }
        code, out, _ = run_main(capsys, ["config"], env)
        assert code == 0
        env_file = tmp_path / "policyd.env"
        env_file.write_text(out)
        sourced = sourced_by_sh(env_file, config.variables(), tmp_path)
        assert sourced == {s.variable: s.value for s in config.describe(env)}
        assert not (tmp_path / "x").exists()  # nothing was executed

    def test_markdown(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``policyd config --markdown`` prints the reference of every variable."""
        code, out, _ = run_main(capsys, ["config", "--markdown"], {})
        assert code == 0
        for setting in config.describe({}):
            assert f"## `{setting.variable}`" in out
            assert f"Default: `{setting.default}`" in out


class TestConfigErrors:
    """An invalid value stops ``config`` and ``serve`` with status 2."""

    def test_table_covers_every_variable(self) -> None:
        """The table below has a bad value for every variable."""
        assert set(BAD) == set(config.variables())

    @pytest.mark.parametrize("command", ["config", "serve"])
    @pytest.mark.parametrize(("name", "bad"), sorted(BAD.items()))
    def test_invalid(
        self,
        capsys: pytest.CaptureFixture[str],
        command: str,
        name: str,
        bad: tuple[str, str],
    ) -> None:
        """Exactly one stderr line names variable, value and accepted form."""
        value, form = bad
        code, out, err = run_main(capsys, [command], {name: value})
        assert code == 2
        assert out == ""
        assert err.count("\n") == 1
        assert err.startswith(f"policyd: {name}={value!r} is invalid: ")
        assert form in err
        assert "Traceback" not in err

    @pytest.mark.parametrize("command", ["config", "serve"])
    def test_thresholds_do_not_nest(
        self, capsys: pytest.CaptureFixture[str], command: str
    ) -> None:
        """Thresholds that do not nest: status 2, one line naming both variables."""
        env = {"POLICYD_ELEVATED_EXIT": "0.8", "POLICYD_OVERLOAD_EXIT": "0.85"}
        code, out, err = run_main(capsys, [command], env)
        assert (code, out) == (2, "")
        assert err == (
            "policyd: POLICYD_ELEVATED_EXIT='0.8' is invalid: "
            "must be below POLICYD_ELEVATED_ENTER=0.7 (the default)\n"
        )

    def test_unknown_variable_warns(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A POLICYD_ typo is reported on stderr, and the command still works."""
        code, out, err = run_main(capsys, ["config"], {"POLICYD_LISTN": "tcp:1"})
        assert code == 0
        assert err == "policyd: warning: ignoring unknown variable POLICYD_LISTN\n"
        assert "POLICYD_LISTEN=tcp:10040:interface=127.0.0.1" in out
        assert "POLICYD_LISTN" not in out

    def test_unknown_and_invalid(self, capsys: pytest.CaptureFixture[str]) -> None:
        """With a typo and a bad value: the warning, then the one error line."""
        code, _, err = run_main(
            capsys, ["config"], {"POLICYD_LOGLEVEL": "x", "POLICYD_LOG_LEVEL": "x"}
        )
        assert code == 2
        warning, error = err.splitlines()
        assert "POLICYD_LOGLEVEL" in warning
        assert error.startswith("policyd: POLICYD_LOG_LEVEL='x' is invalid")


class TestUsage:
    """Arguments: usage, version."""

    def test_no_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without a command: usage on stderr, status 2."""
        code, out, err = run_main(capsys, [], {})
        assert code == 2
        assert out == ""
        assert err.startswith("usage: policyd")
        assert "serve" in err
        assert "config" in err

    def test_unknown_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An unknown command is a usage error, status 2."""
        code, _, err = run_main(capsys, ["start"], {})
        assert code == 2
        assert "invalid choice" in err

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--version`` prints the version and exits 0."""
        code, out, _ = run_main(capsys, ["--version"], {})
        assert (code, out) == (0, f"policyd {__version__}\n")

    def test_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--help`` points at ``policyd config`` for the variables."""
        code, out, _ = run_main(capsys, ["--help"], {})
        assert code == 0
        assert "POLICYD_*" in out
        assert "policyd config" in out


# -- the real process --------------------------------------------------------


def _json_settings(**settings: str) -> dict[str, str]:
    """Loopback, port 0 for both listeners, JSON logs; then *settings*."""
    defaults = {
        "POLICYD_LISTEN": "tcp:0:interface=127.0.0.1",
        "POLICYD_METRICS_LISTEN": "tcp:0:interface=127.0.0.1",
        "POLICYD_LOG_FORMAT": "json",
    }
    return {**defaults, **settings}


def _serve(
    env: Mapping[str, str],
    argv: Sequence[str] | None = None,
    pass_fds: Sequence[int] = (),
) -> PolicydProcess:
    """Start ``policyd serve`` with only *env* among POLICYD_*; wait for nothing."""
    return PolicydProcess(env, defaults=False, argv=argv, pass_fds=pass_fds).spawn()


def _ask(sock: socket.socket, request: bytes = REQUEST) -> bytes:
    """Send one request and read up to the reply's empty line (or EOF)."""
    sock.sendall(request)
    return _read_reply(sock)


def _read_reply(sock: socket.socket) -> bytes:
    reply = b""
    while not reply.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply


def _http_get(port: int, path: str) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        connection.close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port that something else is already listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def activation_socket() -> Iterator[socket.socket]:
    """A bound, listening loopback socket for systemd-style activation."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


def _socket_activated(sock: socket.socket, **settings: str) -> PolicydProcess:
    """Start policyd as systemd would, with the listening socket as fd 3.

    The socket is bound before policyd starts, so a client can connect at
    once and its request waits in the backlog: the reply itself shows that
    policyd is up, without polling or log parsing.  A small Python
    trampoline moves the socket to fd 3 and sets LISTEN_PID to its own pid,
    then execs policyd in the same process.
    """
    trampoline = (
        "import os, sys\n"
        "fd = int(sys.argv[1])\n"
        "if fd != 3:\n"
        "    os.dup2(fd, 3)\n"
        "    os.close(fd)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'policyd', 'serve'])\n"
    )
    env = {
        "LISTEN_FDS": "1",
        # Twisted ignores inherited sockets unless they are also named
        # (systemd 227 and later always name them).
        "LISTEN_FDNAMES": "policyd.socket",
        "POLICYD_LISTEN": "systemd:domain=INET:index=0",
        "POLICYD_METRICS_LISTEN": "none",
        **settings,
    }
    argv = [sys.executable, "-c", trampoline, str(sock.fileno())]
    return _serve(env, argv=argv, pass_fds=[sock.fileno()])


class TestServeProcess:
    """``policyd serve`` as Postfix and Prometheus meet it."""

    def test_serves_and_stops_on_sigterm(self) -> None:
        """Starts, answers policy and HTTP requests, and exits 0 on SIGTERM."""
        with _serve(_json_settings()) as daemon:
            listening = daemon.wait_for_event("listening")
            metrics = daemon.wait_for_event("metrics_listening")
            daemon.wait_for_event("started")
            assert listening["address"] == "127.0.0.1"
            with socket.create_connection(
                ("127.0.0.1", listening["port"]), timeout=TIMEOUT
            ) as sock:
                assert _ask(sock) == DUNNO_REPLY
                # The connection stays open for the next request (reference §1.2).
                assert _ask(sock) == DUNNO_REPLY

            status, content_type, body = _http_get(metrics["port"], "/metrics")
            assert status == 200
            assert content_type.startswith("text/plain; version=0.0.4")
            text = body.decode()
            for name in (
                "policyd_requests_total",
                "policyd_request_duration_seconds",
                "policyd_active_connections",
                "policyd_protocol_errors_total",
            ):
                assert name in text
            assert 'policyd_requests_total{action="DUNNO"} 2.0' in text
            assert _http_get(metrics["port"], "/healthz")[::2] == (200, b"ok\n")

            signalled = time.monotonic()
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
            assert time.monotonic() - signalled < 5
            events = [json.loads(line).get("event") for line in daemon.stdout]
            assert events.index("stopping") < events.index("stopped")
            assert daemon.stderr == []

    def test_allow_peers(self) -> None:
        """A peer outside POLICYD_ALLOW_PEERS is closed unanswered; others served."""
        settings = _json_settings(POLICYD_ALLOW_PEERS="127.0.0.2")
        with _serve(settings) as daemon:
            port = daemon.wait_for_event("listening")["port"]
            metrics = daemon.wait_for_event("metrics_listening")["port"]
            daemon.wait_for_event("started")
            with socket.create_connection(
                ("127.0.0.1", port), timeout=TIMEOUT, source_address=("127.0.0.1", 0)
            ) as sock:
                sock.sendall(REQUEST)
                # A reset (closed before our request was read) is unanswered too.
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(4096) == b""
            with socket.create_connection(
                ("127.0.0.1", port), timeout=TIMEOUT, source_address=("127.0.0.2", 0)
            ) as sock:
                assert _ask(sock) == DUNNO_REPLY
            refused = daemon.wait_for_event("peer_refused")
            assert refused["peer"] == "127.0.0.1"
            status, _, body = _http_get(metrics, "/metrics")
            assert status == 200
            assert "policyd_peers_refused_total 1.0" in body.decode()

    def test_sigint(self) -> None:
        """SIGINT (Ctrl-C) stops it cleanly too: exit 0, no traceback."""
        with _serve(_json_settings(POLICYD_METRICS_LISTEN="none")) as daemon:
            daemon.wait_for_event("started")
            daemon.signal(signal.SIGINT)
            assert daemon.wait() == 0
            daemon.wait_for_event("stopped")
            assert daemon.stderr == []

    @pytest.mark.parametrize("attempt", range(3))
    def test_request_sent_before_sigterm_is_answered(self, attempt: int) -> None:
        """A request already sent when SIGTERM arrives still gets its reply.

        With the DUNNO decider a decision takes microseconds, so "in flight"
        here means sent by the client and not yet read by policyd: the request
        is written, then SIGTERM is sent at once, without waiting for the
        reply.  policyd must answer it and then close the connection.  Whether
        policyd reads the request before or during its shutdown is up to the
        scheduler, hence a few attempts.
        """
        with _serve(_json_settings(POLICYD_METRICS_LISTEN="none")) as daemon:
            port = daemon.wait_for_event("listening")["port"]
            daemon.wait_for_event("started")
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as a:
                assert _ask(a) == DUNNO_REPLY  # connection fully set up
                with socket.create_connection(
                    ("127.0.0.1", port), timeout=TIMEOUT
                ) as idle:
                    assert _ask(idle) == DUNNO_REPLY  # accepted, now idle
                    a.sendall(REQUEST)
                    daemon.signal(signal.SIGTERM)
                    assert _read_reply(a) == DUNNO_REPLY
                    assert a.recv(1) == b""  # closed once answered
                    assert idle.recv(1) == b""  # idle connections are closed
            assert daemon.wait() == 0

    @pytest.mark.parametrize("variable", ["POLICYD_LISTEN", "POLICYD_METRICS_LISTEN"])
    def test_port_in_use(self, busy_port: int, variable: str) -> None:
        """A port already in use: exit 1 with one clear line on stderr."""
        env = _json_settings(**{variable: f"tcp:{busy_port}:interface=127.0.0.1"})
        with _serve(env) as daemon:
            assert daemon.wait() == 1
            assert len(daemon.stderr) == 1, daemon.output()
            (line,) = daemon.stderr
            assert line.startswith("policyd: cannot start: ")
            assert f"127.0.0.1:{busy_port}" in line
            assert "Address already in use" in line
            assert "Traceback" not in daemon.output()

    @pytest.mark.parametrize(
        ("name", "value"),
        [("POLICYD_LISTEN", "tcp:70000"), ("POLICYD_LOG_FORMAT", "x")],
    )
    def test_invalid_config(self, name: str, value: str) -> None:
        """An invalid value: exit 2 and one stderr line, before listening."""
        with _serve(_json_settings(**{name: value})) as daemon:
            assert daemon.wait() == 2
            assert daemon.stdout == []
            (line,) = daemon.stderr
            assert line.startswith(f"policyd: {name}={value!r} is invalid: ")

    def test_unknown_variable_warns_but_serves(self) -> None:
        """A POLICYD_ typo is warned about on stderr; the server still runs."""
        env = _json_settings(POLICYD_METRICS_LISTEN="none", POLICYD_LISTN="tcp:1")
        with _serve(env) as daemon:
            daemon.wait_for_event("started")
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
            assert daemon.stderr == [
                "policyd: warning: ignoring unknown variable POLICYD_LISTN\n"
            ]

    def test_text_log_one_line_per_event(self) -> None:
        """The text format writes each event as one timestamped line."""
        env = _json_settings(POLICYD_LOG_FORMAT="text")
        with _serve(env) as daemon:
            daemon.wait_for_text("running; SIGTERM or SIGINT stops it")
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        assert len(daemon.stdout) >= 5  # listening x2, running, stopping, stopped
        for line in daemon.stdout:
            assert _TEXT_LINE.fullmatch(line.rstrip("\n")), line

    def test_json_log_one_object_per_line(self) -> None:
        """The JSON format writes one object per line, each with its keys."""
        with _serve(_json_settings()) as daemon:
            daemon.wait_for_event("started")
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        for line in daemon.stdout:
            record = json.loads(line)
            assert {"time", "level", "namespace", "message", "event"} <= set(record)

    def test_socket_activation_and_warn_level(
        self, activation_socket: socket.socket
    ) -> None:
        """Socket-activated policyd answers; at level warn it logs no info."""
        with _socket_activated(
            activation_socket, POLICYD_LOG_LEVEL="warn", POLICYD_LOG_FORMAT="text"
        ) as daemon:
            port = activation_socket.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                assert _ask(sock) == DUNNO_REPLY
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        levels = [line.split(" ")[1] for line in daemon.stdout]
        assert "info" not in levels
        assert "debug" not in levels
        assert daemon.stderr == []

    def test_info_level_does_log_info(self, activation_socket: socket.socket) -> None:
        """The counterpart: at the default level the same run logs info lines."""
        with _socket_activated(activation_socket, POLICYD_LOG_FORMAT="text") as daemon:
            port = activation_socket.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                assert _ask(sock) == DUNNO_REPLY
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        assert "info" in [line.split(" ")[1] for line in daemon.stdout]


class TestEntryPoints:
    """``python -m policyd`` and the ``policyd`` console script are the same."""

    @staticmethod
    def _script() -> str:
        script = Path(sys.executable).with_name("policyd")
        if not script.exists():
            pytest.skip(f"no console script next to {sys.executable}")
        return str(script)

    @pytest.mark.parametrize(
        "args", [["--version"], ["config"], [], ["config", "--markdown"]]
    )
    def test_same_output(self, args: list[str]) -> None:
        """Both give the same output and exit status."""
        env = _clean_env(POLICYD_LOG_LEVEL="debug")
        results = [
            subprocess.run(
                [*prefix, *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            for prefix in ([sys.executable, "-m", "policyd"], [self._script()])
        ]
        module, script = results
        assert (module.returncode, module.stdout, module.stderr) == (
            script.returncode,
            script.stdout,
            script.stderr,
        )

    def test_module_usage_status(self) -> None:
        """``python -m policyd`` without a command exits 2 with usage."""
        result = subprocess.run(
            [sys.executable, "-m", "policyd"],
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert result.returncode == 2
        assert result.stderr.startswith("usage: policyd")

    def test_module_config_error(self) -> None:
        """``python -m policyd config`` with a bad value: status 2, one line."""
        result = subprocess.run(
            [sys.executable, "-m", "policyd", "config"],
            env=_clean_env(POLICYD_IDLE_TIMEOUT="forever"),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith("policyd: POLICYD_IDLE_TIMEOUT='forever'")
