"""``policyd ask``: the request it builds, where it connects, what it prints.

The first classes test `policyd.ask` in memory: the request builder and the
endpoint parsers are pure, and the exchange runs over a `socket.socketpair`
whose other end the test writes.  The rest run ``policyd ask`` against a real
``policyd serve`` subprocess listening on 127.0.0.1 port 0 and on a unix
socket, reading the port from its ``"event": "listening"`` JSON log line;
every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_main

from policyd import ask, config
from policyd.ask import (
    DEFAULTS,
    AskFailed,
    InvalidAttribute,
    InvalidEndpoint,
    TCPTarget,
    UNIXTarget,
)
from policyd.testing.daemon import PolicydProcess

# A generous bound for anything a subprocess does; normally it takes < 1 s.
TIMEOUT = 15.0

# An SRS-rewritten sender: "=" inside a value, as Postfix sends it.
SRS_SENDER = "SRS0=HHH=TT=example.org=alice@example.net"


def _fixed_instance() -> str:
    return "fixed.instance"


def _clean_env(**settings: str) -> dict[str, str]:
    """The test's environment without any POLICYD_* variable, plus *settings*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env.update(settings)
    return env


# -- the request -------------------------------------------------------------


class TestParseAttribute:
    """One ``NAME=VALUE`` argument."""

    @pytest.mark.parametrize(
        ("argument", "expected"),
        [
            ("helo_name=foo", ("helo_name", "foo")),
            (f"sender={SRS_SENDER}", ("sender", SRS_SENDER)),
            ("sender=", ("sender", "")),
            ("policy_context==", ("policy_context", "=")),
            ("helo_name= spaced out ", ("helo_name", " spaced out ")),
            ("helo_name=caf\u00e9\r", ("helo_name", "caf\u00e9\r")),
        ],
    )
    def test_split_at_first_equals(
        self, argument: str, expected: tuple[str, str]
    ) -> None:
        """Split at the first ``=`` only; the value is kept byte for byte."""
        assert ask.parse_attribute(argument) == expected

    @pytest.mark.parametrize(
        ("argument", "fragment"),
        [
            ("helo_name", "is not NAME=VALUE"),
            ("", "is not NAME=VALUE"),
            ("=foo", "has no name before '='"),
            ("helo\nname=x", "the name of 'helo\\nname=x' contains a newline"),
            ("helo\0name=x", "the name of 'helo\\x00name=x' contains a NUL"),
            ("helo_name=a\nb", "the value of 'helo_name=a\\nb' contains a newline"),
            ("helo_name=a\0b", "the value of 'helo_name=a\\x00b' contains a NUL"),
        ],
    )
    def test_rejected(self, argument: str, fragment: str) -> None:
        """What the protocol cannot carry is refused, saying which and why."""
        with pytest.raises(InvalidAttribute) as caught:
            ask.parse_attribute(argument)
        assert fragment in str(caught.value)
        assert "\n" not in str(caught.value)


class TestBuildRequest:
    """The request: smtpd's RCPT request for an unknown client, overridden."""

    def test_defaults(self) -> None:
        """Without arguments: the documented defaults, in smtpd's order."""
        attributes = ask.build_request([], instance=_fixed_instance)
        assert attributes == {**DEFAULTS, "instance": "fixed.instance"}
        assert list(attributes) == list(DEFAULTS)
        assert attributes["request"] == "smtpd_access_policy"
        assert attributes["protocol_state"] == "RCPT"
        assert attributes["client_address"] == "192.0.2.1"
        assert attributes["client_name"] == "unknown"
        assert attributes["reverse_client_name"] == "unknown"

    def test_override_in_place_and_add_at_end(self) -> None:
        """A known name replaces its default where it is; new names follow."""
        attributes = ask.build_request(
            ["policy_context=test", "client_address=198.51.100.7", "helo_name=foo"],
            instance=_fixed_instance,
        )
        assert list(attributes) == [*DEFAULTS, "policy_context"]
        assert attributes["client_address"] == "198.51.100.7"
        assert attributes["helo_name"] == "foo"
        assert attributes["policy_context"] == "test"

    def test_last_value_wins(self) -> None:
        """A name given twice keeps its last value."""
        attributes = ask.build_request(["helo_name=a", "helo_name=b"])
        assert attributes["helo_name"] == "b"

    def test_fresh_instance_each_time(self) -> None:
        """Each ask at RCPT is its own transaction: a new instance every time."""
        first = ask.build_request([])["instance"]
        second = ask.build_request([])["instance"]
        assert first != second
        assert first.startswith("ask.")

    def test_given_instance_kept(self) -> None:
        """An instance given on the command line is sent as given."""
        attributes = ask.build_request(["instance=ABC.123"], instance=_fixed_instance)
        assert attributes["instance"] == "ABC.123"

    @pytest.mark.parametrize(
        ("state", "instance"),
        [
            ("RCPT", "fixed.instance"),
            ("rcpt", "fixed.instance"),
            ("DATA", "fixed.instance"),
            ("END-OF-MESSAGE", "fixed.instance"),
            ("CONNECT", ""),
            ("XCLIENT", ""),
            ("EHLO", ""),
            ("MAIL", ""),
            ("VRFY", ""),
        ],
    )
    def test_instance_only_inside_a_transaction(
        self, state: str, instance: str
    ) -> None:
        """As smtpd: an instance from RCPT to END-OF-MESSAGE, empty before."""
        attributes = ask.build_request(
            [f"protocol_state={state}"], instance=_fixed_instance
        )
        assert attributes["instance"] == instance

    def test_invalid_argument(self) -> None:
        """A bad argument anywhere fails the whole request."""
        with pytest.raises(InvalidAttribute):
            ask.build_request(["helo_name=ok", "oops"])

    def test_wire_form(self) -> None:
        """``name=value`` lines ending in LF, then one empty line; no CR."""
        wire = ask.encode_request({"request": "smtpd_access_policy", "a": "b=c"})
        assert wire == b"request=smtpd_access_policy\na=b=c\n\n"

    def test_wire_form_keeps_raw_bytes(self) -> None:
        """Non-UTF-8 bytes from the command line (surrogateescape) go out as is."""
        raw = b"helo_name=\xff\xfe"
        attributes = dict([ask.parse_attribute(os.fsdecode(raw))])
        assert ask.encode_request(attributes) == raw + b"\n\n"

    def test_unknown_names(self) -> None:
        """Names no Postfix sends (likely typos) are picked out; others are not."""
        attributes = ask.build_request(
            ["client_adress=1", "policy_context=x", "tls_sni=a", "x-y=1"]
        )
        assert ask.unknown_names(attributes) == ["client_adress", "x-y"]


# -- where to ask ------------------------------------------------------------


class TestParseServer:
    """``--server``: client, Postfix and server descriptions, and shorthand."""

    @pytest.mark.parametrize(
        ("description", "target"),
        [
            ("127.0.0.1:10040", TCPTarget("127.0.0.1", 10040)),
            ("localhost:10040", TCPTarget("localhost", 10040)),
            ("mx.example.net:1", TCPTarget("mx.example.net", 1)),
            ("[::1]:10040", TCPTarget("::1", 10040)),
            ("[2001:db8::5]:65535", TCPTarget("2001:db8::5", 65535)),
            ("tcp:127.0.0.1:10040", TCPTarget("127.0.0.1", 10040)),
            ("tcp:localhost:10040:timeout=3", TCPTarget("localhost", 10040)),
            ("tcp:host=127.0.0.1:port=10040", TCPTarget("127.0.0.1", 10040)),
            ("tcp:localhost:port=10040", TCPTarget("localhost", 10040)),
            ("tcp:[::1]:10040", TCPTarget("::1", 10040)),
            ("tcp6:host=\\:\\:1:port=10040", TCPTarget("::1", 10040)),
            ("inet:127.0.0.1:10040", TCPTarget("127.0.0.1", 10040)),
            ("inet:[::1]:10040", TCPTarget("::1", 10040)),
            # A POLICYD_LISTEN value, pasted.
            ("tcp:10040:interface=127.0.0.1", TCPTarget("127.0.0.1", 10040)),
            ("tcp:10040", TCPTarget("127.0.0.1", 10040)),
            ("tcp:port=10040", TCPTarget("127.0.0.1", 10040)),
            ("tcp6:10040", TCPTarget("::1", 10040)),
            ("unix:/run/policyd.sock", UNIXTarget("/run/policyd.sock")),
            ("unix:path=/run/policyd.sock", UNIXTarget("/run/policyd.sock")),
            ("unix:/run/p.sock:mode=660", UNIXTarget("/run/p.sock")),
            ("unix:/odd\\:name", UNIXTarget("/odd:name")),
            ("local:private/policyd", UNIXTarget("private/policyd")),
            ("/run/policyd.sock", UNIXTarget("/run/policyd.sock")),
        ],
    )
    def test_accepted(self, description: str, target: ask.Target) -> None:
        """Each accepted form names the host and port, or the socket path."""
        assert ask.parse_server(description) == target

    @pytest.mark.parametrize(
        ("description", "fragment"),
        [
            ("127.0.0.1", "is not HOST:PORT"),
            ("10040", "is not HOST:PORT"),
            ("::1:10040", "write an IPv6 address in brackets"),
            ("[mail]:10040", "in brackets is not an IPv6 address"),
            ("127.0.0.1:0", "expected a port from 1 to 65535"),
            ("127.0.0.1:65536", "expected a port from 1 to 65535"),
            ("127.0.0.1:http", "expected a port from 1 to 65535"),
            ("tcp:127.0.0.1:10040:color=blue", "unexpected 'color'"),
            ("tcp:a:1:2", "unexpected '2'"),
            ("tcp:0", "a port chosen at start-up"),
            ("tcp:10040:interface=127.0.0.1:flavour=x", "unexpected 'flavour'"),
            ("unix:", "names no socket"),
            ("unix:/p:owner=me", "unexpected 'owner'"),
            ("ssl:10040", "cannot connect to ssl: endpoints"),
            ("systemd:domain=INET:index=0", "cannot connect to systemd: endpoints"),
        ],
    )
    def test_rejected(self, description: str, fragment: str) -> None:
        """What cannot be connected to is refused with a one-line reason."""
        with pytest.raises(InvalidEndpoint) as caught:
            ask.parse_server(description)
        assert fragment in str(caught.value)
        assert "\n" not in str(caught.value)

    @pytest.mark.parametrize(
        ("target", "shown"),
        [
            (TCPTarget("127.0.0.1", 10040), "127.0.0.1:10040"),
            (TCPTarget("::1", 10040), "[::1]:10040"),
            (UNIXTarget("/run/p.sock"), "unix:/run/p.sock"),
        ],
    )
    def test_shown(self, target: ask.Target, shown: str) -> None:
        """Targets print the way ``--server`` accepts them back."""
        assert str(target) == shown
        assert ask.parse_server(shown) == target


class TestListenTarget:
    """Without ``--server``: where ``POLICYD_LISTEN`` makes policyd listen."""

    def test_default_install(self) -> None:
        """The default POLICYD_LISTEN is reached at 127.0.0.1:10040."""
        (listen,) = [s for s in config.describe({}) if s.variable == "POLICYD_LISTEN"]
        target = ask.listen_target(config.endpoints(listen.value), "POLICYD_LISTEN")
        assert target == TCPTarget("127.0.0.1", 10040)

    @pytest.mark.parametrize(
        ("listen", "target"),
        [
            ("tcp:10040:interface=127.0.0.1", TCPTarget("127.0.0.1", 10040)),
            ("tcp:10040:interface=192.0.2.5", TCPTarget("192.0.2.5", 10040)),
            ("tcp:10040", TCPTarget("127.0.0.1", 10040)),
            ("tcp:10040:interface=0.0.0.0", TCPTarget("127.0.0.1", 10040)),
            ("tcp:port=10040:backlog=5", TCPTarget("127.0.0.1", 10040)),
            ("tcp:10040:interface=\\:\\:", TCPTarget("::1", 10040)),
            ("tcp6:10040", TCPTarget("::1", 10040)),
            ("tcp6:10040:interface=\\:\\:1", TCPTarget("::1", 10040)),
            ("unix:/run/p.sock:mode=660", UNIXTarget("/run/p.sock")),
            ("unix:address=/run/p.sock:lockfile=1", UNIXTarget("/run/p.sock")),
            (
                "systemd:domain=INET:index=0 tcp:10041:interface=127.0.0.1",
                TCPTarget("127.0.0.1", 10041),
            ),
            (
                "tcp:10040:interface=127.0.0.1 unix:/run/p.sock",
                TCPTarget("127.0.0.1", 10040),
            ),
        ],
    )
    def test_first_reachable_endpoint(self, listen: str, target: ask.Target) -> None:
        """The first endpoint ask can reach; all addresses mean loopback."""
        assert ask.listen_target(config.endpoints(listen), "POLICYD_LISTEN") == target

    @pytest.mark.parametrize(
        ("listen", "fragment"),
        [
            ("systemd:domain=INET:index=0", "give --server"),
            ("tcp:0:interface=127.0.0.1", "give --server"),
        ],
    )
    def test_unreachable(self, listen: str, fragment: str) -> None:
        """When no endpoint can be reached from here, the message says --server."""
        with pytest.raises(InvalidEndpoint) as caught:
            ask.listen_target(config.endpoints(listen), "POLICYD_LISTEN")
        message = str(caught.value)
        assert message.startswith("cannot tell where to ask from POLICYD_LISTEN: ")
        assert fragment in message


# -- the exchange, in memory -------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected socket pair: (ours, the server's end)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        yield ours, theirs


REQUEST = ask.encode_request(ask.build_request([], instance=_fixed_instance))


class TestExchange:
    """One request out, exactly one well-formed reply back."""

    def test_reply(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """The action of ``action=...`` and an empty line; the request arrives."""
        ours, theirs = pair
        theirs.sendall(b"action=450 4.7.1 Busy; try again later\n\n")
        assert ask.exchange(ours, REQUEST, 5) == "450 4.7.1 Busy; try again later"
        theirs.settimeout(5)
        assert theirs.recv(len(REQUEST) + 1) == REQUEST

    def test_reply_in_pieces(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A reply that arrives byte by byte is assembled, not cut short."""
        ours, theirs = pair
        reply = b"action=DUNNO\n\n"

        def trickle() -> None:
            theirs.settimeout(5)
            theirs.recv(len(REQUEST))
            for byte in reply:
                theirs.sendall(bytes([byte]))

        writer = threading.Thread(target=trickle)
        writer.start()
        try:
            assert ask.exchange(ours, REQUEST, 5) == "DUNNO"
        finally:
            writer.join(TIMEOUT)

    @pytest.mark.parametrize(
        ("reply", "fragment"),
        [
            (b"DUNNO\n\n", "malformed reply b'DUNNO\\n\\n': expected action="),
            (b"reply=DUNNO\n\n", "malformed reply"),
            (b"action=DUNNO\nfoo=bar\n\n", "malformed reply"),
            (b"action=\n\n", "empty action, which Postfix takes as OK"),
            (b"action=  \n\n", "empty action"),
            (b"action=DUNNO\r\n\n", "contains a CR or NUL"),
            (b"action=DU\0NNO\n\n", "contains a CR or NUL"),
            (b"\n", "the reply is an empty line"),
            (b"action=DUNNO\n\naction=DUNNO\n\n", "sent more after its reply"),
            (b"x" * (ask.MAX_REPLY + 1), "no empty line within 4096 bytes"),
        ],
    )
    def test_malformed(
        self, pair: tuple[socket.socket, socket.socket], reply: bytes, fragment: str
    ) -> None:
        """Anything but exactly ``action=X`` and an empty line is reported."""
        ours, theirs = pair
        theirs.sendall(reply)
        with pytest.raises(AskFailed) as caught:
            ask.exchange(ours, REQUEST, 5)
        assert fragment in str(caught.value)
        assert "\n" not in str(caught.value)

    def test_closed_without_reply(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        """A close before any reply byte: what policyd does with bad input."""
        ours, theirs = pair
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(AskFailed) as caught:
            ask.exchange(ours, REQUEST, 5)
        assert str(caught.value).startswith(
            "the server closed the connection without a reply"
        )

    def test_reset_without_reply(self) -> None:
        """A reset (a close with the request unread) reads as a close.

        The server end closes with bytes of ours still unread, which makes
        the kernel reset the connection rather than end it cleanly; sending
        or reading then fails with a reset, reported like policyd's close.
        """
        with socket.socket() as listener, socket.socket() as ours:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            ours.connect(listener.getsockname())
            accepted, _ = listener.accept()
            with accepted:
                ours.sendall(b"x")  # unread when the server end closes
            with pytest.raises(AskFailed) as caught:
                ask.exchange(ours, REQUEST, 5)
        assert str(caught.value).startswith(
            "the server closed the connection without a reply"
        )

    def test_closed_mid_reply(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A close in the middle of a reply is told apart, showing what came."""
        ours, theirs = pair
        theirs.sendall(b"action=DUNNO\r\n\r\n")  # CRLF: never an empty line
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(AskFailed) as caught:
            ask.exchange(ours, REQUEST, 5)
        assert "closed the connection in the middle of the reply" in str(caught.value)
        assert "b'action=DUNNO\\r\\n\\r\\n'" in str(caught.value)

    def test_no_reply_times_out(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        """A server that never answers: the wait ends at the timeout."""
        ours, _ = pair
        with pytest.raises(AskFailed) as caught:
            ask.exchange(ours, REQUEST, 0.05)
        assert str(caught.value) == "no reply within 0.05s"

    def test_deadline_covers_the_whole_exchange(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        """The timeout bounds the exchange, not each read: trickling can't extend it.

        The clock jumps past the deadline once part of the reply has come, so
        the next read is never started.
        """
        ours, theirs = pair
        theirs.sendall(b"action=DU")
        readings = iter([0.0, 0.0, 1.0, 6.0])
        with pytest.raises(AskFailed) as caught:
            ask.exchange(ours, REQUEST, 5, clock=lambda: next(readings))
        assert str(caught.value) == "no complete reply within 5s, only b'action=DU'"


class TestConnect:
    """`ask.ask` connects first, and says so when it cannot."""

    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
    def test_refused(self, host: str) -> None:
        """A port nobody listens on: connection refused, on every address."""
        with socket.socket() as bound:  # bound, not listening: refuses
            bound.bind(("127.0.0.1", 0))
            port = bound.getsockname()[1]
            with pytest.raises(AskFailed) as caught:
                ask.ask(TCPTarget(host, port), REQUEST, 5)
        assert str(caught.value).startswith("connection refused")

    def test_no_such_socket(self, tmp_path: Path) -> None:
        """A unix socket path that does not exist: no such socket."""
        with pytest.raises(AskFailed) as caught:
            ask.ask(UNIXTarget(str(tmp_path / "absent.sock")), REQUEST, 5)
        assert str(caught.value).startswith("no such socket")

    def test_unix_socket_server(self, tmp_path: Path) -> None:
        """Over a real unix socket, the reply comes back (no server process)."""
        path = str(tmp_path / "s.sock")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(path)
            listener.listen(1)

            def answer() -> None:
                connection, _ = listener.accept()
                with connection:
                    connection.settimeout(5)
                    connection.recv(len(REQUEST))
                    connection.sendall(b"action=DUNNO\n\n")
                    connection.recv(1)  # until the client closes

            server = threading.Thread(target=answer)
            server.start()
            try:
                assert ask.ask(UNIXTarget(path), REQUEST, 5) == "DUNNO"
            finally:
                server.join(TIMEOUT)


# -- the command, in-process -------------------------------------------------


class TestAskCommandUsage:
    """Usage errors stop ``policyd ask`` before it connects: status 2."""

    @pytest.mark.parametrize(
        ("argument", "fragment"),
        [
            ("helo_name", "'helo_name' is not NAME=VALUE"),
            ("=x", "has no name before '='"),
            ("helo_name=a\0b", "contains a NUL"),
            ("helo_name=a\nb", "contains a newline"),
        ],
    )
    def test_bad_attribute(
        self, capsys: pytest.CaptureFixture[str], argument: str, fragment: str
    ) -> None:
        """A bad NAME=VALUE: exit 2, nothing on stdout, one line on stderr."""
        code, out, err = run_main(
            capsys, ["ask", "--server", "127.0.0.1:1", argument], {}
        )
        assert (code, out) == (2, "")
        assert err.count("\n") == 1
        assert err.startswith("policyd: ")
        assert fragment in err

    def test_bad_server(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A --server that cannot be connected to: exit 2, one line naming it."""
        code, out, err = run_main(capsys, ["ask", "--server", "ssl:1"], {})
        assert (code, out) == (2, "")
        assert err.startswith("policyd: --server: 'ssl:1': ")
        assert err.count("\n") == 1

    def test_bad_listen(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without --server, an invalid POLICYD_LISTEN: exit 2, the config error."""
        code, out, err = run_main(capsys, ["ask"], {"POLICYD_LISTEN": "10040"})
        assert (code, out) == (2, "")
        assert err.startswith("policyd: POLICYD_LISTEN='10040' is invalid: ")
        assert err.count("\n") == 1

    def test_systemd_listen(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A socket-activated POLICYD_LISTEN: exit 2, asking for --server."""
        env = {"POLICYD_LISTEN": "systemd:domain=INET:index=0"}
        code, _, err = run_main(capsys, ["ask"], env)
        assert code == 2
        assert "give --server" in err
        assert err.count("\n") == 1

    def test_other_variables_not_read(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Only POLICYD_LISTEN matters: a bad unrelated variable is no error.

        The server being asked read its settings at its own start; ask must
        not refuse to run because of a variable it does not use.
        """
        env = {"POLICYD_LOG_LEVEL": "loud", "POLICYD_LISTEN": "tcp:1"}
        code, _, err = run_main(capsys, ["ask", "--timeout", "2"], env)
        assert code == 1  # it tried 127.0.0.1:1 (refused), not a usage error
        assert err.startswith("policyd: asking 127.0.0.1:1 failed: ")

    @pytest.mark.parametrize("value", ["0", "soon", "-1", "2h"])
    def test_bad_timeout(self, capsys: pytest.CaptureFixture[str], value: str) -> None:
        """--timeout takes a duration from 1 ms to 1 h, like the variables."""
        code, out, err = run_main(capsys, ["ask", "--timeout", value], {})
        assert (code, out) == (2, "")
        assert "argument --timeout: expected a duration" in err

    def test_help_documents_defaults(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``policyd ask --help`` lists every default attribute and the exits."""
        code, out, _ = run_main(capsys, ["ask", "--help"], {})
        assert code == 0
        for name, value in DEFAULTS.items():
            if name != "instance":
                assert f"  {name}={value}\n" in out
        assert "instance=<see below>" in out
        assert "--server ENDPOINT" in out
        assert "Exit status: 0" in out

    def test_listed_in_main_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``policyd --help`` lists the ask command."""
        _, out, _ = run_main(capsys, ["--help"], {})
        assert "ask" in out

    def test_timeout(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A server that accepts but never answers: exit 1 at --timeout."""
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(1)  # the kernel accepts; nobody ever answers
            port = silent.getsockname()[1]
            code, out, err = run_main(
                capsys,
                ["ask", "--server", f"127.0.0.1:{port}", "--timeout", "200ms"],
                {},
            )
        assert (code, out) == (1, "")
        assert err == f"policyd: asking 127.0.0.1:{port} failed: no reply within 0.2s\n"


# -- against a real policyd serve --------------------------------------------


class Served:
    """A running policyd: its TCP port and unix socket path."""

    def __init__(self, server: PolicydProcess, port: int, path: str) -> None:
        self.server = server
        self.port = port
        self.path = path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One policyd for the module, on 127.0.0.1 port 0 and a unix socket."""
    path = str(tmp_path_factory.mktemp("ask") / "policyd.sock")
    env = {
        "POLICYD_LISTEN": f"tcp:0:interface=127.0.0.1 unix:{path}:mode=600",
        "POLICYD_METRICS_LISTEN": "none",
        "POLICYD_LOG_FORMAT": "json",
        "POLICYD_LOG_LEVEL": "debug",
    }
    with PolicydProcess(env, defaults=False).spawn() as server:
        port = server.wait_for_event("listening", address="127.0.0.1")["port"]
        server.wait_for_event("started")
        yield Served(server, port, path)
    assert "Traceback" not in "".join(server.stderr)


def _ask(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m policyd ask ARGS`` with only *env* among POLICYD_*."""
    return subprocess.run(
        [sys.executable, "-m", "policyd", "ask", *args],
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


class TestAskProcess:
    """``policyd ask`` against ``policyd serve``, both real processes."""

    def test_default_ask(self, served: Served) -> None:
        """With only POLICYD_LISTEN, as on an install: DUNNO on stdout, exit 0."""
        result = _ask(POLICYD_LISTEN=f"tcp:{served.port}:interface=127.0.0.1")
        assert (result.returncode, result.stdout, result.stderr) == (0, "DUNNO\n", "")
        # The other tests' requests all differ from the defaults somewhere.
        record = served.server.wait_for_event(
            "request",
            lambda r: (
                r["attributes"] == {**DEFAULTS, "instance": r["attributes"]["instance"]}
            ),
        )
        assert record["attributes"]["instance"].startswith("ask.")

    def test_server_option(self, served: Served) -> None:
        """--server HOST:PORT reaches the server whatever POLICYD_LISTEN says."""
        result = _ask(
            "--server",
            f"127.0.0.1:{served.port}",
            "client_address=192.0.2.1",
            "helo_name=foo",
            POLICYD_LISTEN="tcp:1:interface=127.0.0.1",
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "DUNNO\n", "")

    def test_verbose_shows_request(self, served: Served) -> None:
        """-v prints the request sent on stderr; stdout is still just the action."""
        result = _ask(
            "-v", "--server", f"127.0.0.1:{served.port}", "helo_name=verbose.example"
        )
        assert (result.returncode, result.stdout) == (0, "DUNNO\n")
        lines = result.stderr.splitlines()
        assert lines[0] == f"policyd: asking 127.0.0.1:{served.port}:"
        sent = {
            name: value
            for name, _, value in (line.partition("=") for line in lines[1:] if line)
        }
        assert list(sent) == list(DEFAULTS)
        assert sent["helo_name"] == "verbose.example"
        assert sent["request"] == "smtpd_access_policy"
        assert result.stderr.endswith("\n\n")  # the request's empty line
        record = served.server.wait_for_event(
            "request", lambda r: r["attributes"]["instance"] == sent["instance"]
        )
        assert record["attributes"] == sent  # exactly what was shown was sent

    def test_value_with_equals_arrives_intact(self, served: Served) -> None:
        """A value containing '=' (an SRS sender) reaches policyd unchanged."""
        result = _ask(
            "--server", f"127.0.0.1:{served.port}", f"sender={SRS_SENDER}", "x=a=b"
        )
        assert (result.returncode, result.stdout) == (0, "DUNNO\n")
        assert result.stderr == (
            "policyd: warning: x is not an attribute Postfix sends; sending it anyway\n"
        )
        record = served.server.wait_for_event(
            "request", lambda r: r["attributes"].get("x") is not None
        )
        assert record["attributes"]["sender"] == SRS_SENDER
        assert record["attributes"]["x"] == "a=b"

    def test_unix_socket(self, served: Served) -> None:
        """A server on a unix socket is asked with --server unix:PATH."""
        result = _ask("--server", f"unix:{served.path}", "policy_context=unix")
        assert (result.returncode, result.stdout, result.stderr) == (0, "DUNNO\n", "")

    def test_unix_socket_from_listen(self, served: Served) -> None:
        """Without --server, a unix: POLICYD_LISTEN (with mode=) is used."""
        result = _ask(
            "policy_context=unix", POLICYD_LISTEN=f"unix:{served.path}:mode=600"
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "DUNNO\n", "")

    def test_closed_without_reply(self, served: Served) -> None:
        """A request policyd cannot use: exit 1, saying it closed without reply."""
        result = _ask("--server", f"127.0.0.1:{served.port}", "request=bogus")
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith(
            f"policyd: asking 127.0.0.1:{served.port} failed: the server closed "
            "the connection without a reply"
        )
        served.server.wait_for_event("protocol_error", reason="bad_request_type")

    def test_refusal_under_stress(self) -> None:
        """Under stress a suspicious client's whole refusal is printed, exit 0.

        With room for one smtpd process, the ask's own connection is full
        load: policyd is at overload while it decides.  The action is a code
        and text (reference §1.5), printed on one line as policyd sent it.
        """
        env = {
            "POLICYD_LISTEN": "tcp:0:interface=127.0.0.1",
            "POLICYD_METRICS_LISTEN": "none",
            "POLICYD_LOG_FORMAT": "json",
            "POLICYD_SMTPD_CAPACITY": "1",
        }
        with PolicydProcess(env, defaults=False).spawn() as server:
            port = server.wait_for_event("listening")["port"]
            server.wait_for_event("started")
            result = _ask("--server", f"127.0.0.1:{port}", "helo_name=foo")
            refusal = server.wait_for_event("refusal")
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout == refusal["action"] + "\n"
        assert result.stdout[0] == "4"  # temporary: `unknown` names may be DNS
        assert " " in result.stdout.strip()

    def test_closed_port(self) -> None:
        """--server to a closed port: exit 1, one line naming it and the cause."""
        with socket.socket() as bound:  # bound, not listening: refuses
            bound.bind(("127.0.0.1", 0))
            port = bound.getsockname()[1]
            result = _ask("--server", f"127.0.0.1:{port}")
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == (
            f"policyd: asking 127.0.0.1:{port} failed: connection refused "
            "(is policyd listening there?)\n"
        )

    def test_bad_attribute(self) -> None:
        """A bad NAME=VALUE: exit 2 and one line, before connecting anywhere."""
        result = _ask("--server", "127.0.0.1:1", "helo_name")
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (
            "policyd: 'helo_name' is not NAME=VALUE, e.g. helo_name=foo\n"
        )
