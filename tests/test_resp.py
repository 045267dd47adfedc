"""The small Redis client: URLs, RESP framing, replies matched to commands."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from policyd.resp import (
    RedisError,
    RedisProtocol,
    RedisURL,
    encode,
    hide_password,
    parse_url,
)


def connected() -> tuple[RedisProtocol, StringTransport]:
    """A protocol on a StringTransport."""
    protocol = RedisProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
    return protocol, transport


def results(protocol: RedisProtocol, count: int) -> list[list[Any]]:
    """Send *count* PINGs; lists that receive each one's outcome."""
    outcomes: list[list[Any]] = []
    for _ in range(count):
        box: list[Any] = []
        protocol.command(b"PING").addCallbacks(box.append, box.append)
        outcomes.append(box)
    return outcomes


# Replies as Redis writes them, and what the protocol makes of them.
REPLIES = [
    (b"+OK\r\n", b"OK"),
    (b":42\r\n", 42),
    (b":-1\r\n", -1),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),
    (b"*0\r\n", []),
    (b"*-1\r\n", None),
    (b"*2\r\n$1\r\na\r\n:1\r\n", [b"a", 1]),
    (
        b"*2\r\n*2\r\n$1\r\n1\r\n$1\r\n2\r\n*1\r\n$3\r\n0.5\r\n",
        [[b"1", b"2"], [b"0.5"]],
    ),
]


class TestEncode:
    """Commands go out as RESP arrays of bulk strings."""

    def test_arguments(self) -> None:
        """Bytes as they are, text in UTF-8, numbers in decimal."""
        assert encode([b"SET", "k\u00e9", 5, 0.25]) == (
            b"*4\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$1\r\n5\r\n$4\r\n0.25\r\n"
        )

    def test_float_round_trips(self) -> None:
        """A float is written so that Redis reads back the very same number."""
        value = 1 / 3
        data = encode([value])
        assert float(data.split(b"\r\n")[2]) == value


class TestReplies:
    """Replies are parsed and handed to the command they answer, in order."""

    @pytest.mark.parametrize(("wire", "value"), REPLIES)
    def test_each_kind(self, wire: bytes, value: Any) -> None:
        """Each RESP2 reply type becomes its Python value."""
        protocol, _ = connected()
        (box,) = results(protocol, 1)
        protocol.dataReceived(wire)
        assert box == [value]

    @given(st.data())
    def test_split_anywhere(self, data: st.DataObject) -> None:
        """Replies cut into pieces at any bytes arrive whole and in order."""
        protocol, _ = connected()
        wire = b"".join(w for w, _ in REPLIES)
        boxes = results(protocol, len(REPLIES))
        cuts = sorted(
            data.draw(st.lists(st.integers(0, len(wire)), max_size=len(wire)))
        )
        start = 0
        for cut in [*cuts, len(wire)]:
            protocol.dataReceived(wire[start:cut])
            start = cut
        assert boxes == [[value] for _, value in REPLIES]
        assert protocol.pending == 0

    def test_error_fails_its_command_only(self) -> None:
        """An error reply fails its own command; the next one still succeeds."""
        protocol, _ = connected()
        first, second = results(protocol, 2)
        protocol.dataReceived(b"-NOSCRIPT No matching script.\r\n+PONG\r\n")
        (failure,) = first
        assert isinstance(failure, Failure)
        assert isinstance(failure.value, RedisError)
        assert failure.value.kind == "NOSCRIPT"
        assert second == [b"PONG"]

    def test_error_inside_an_array(self) -> None:
        """An error inside an array is a value in it, not a failure."""
        protocol, _ = connected()
        (box,) = results(protocol, 1)
        protocol.dataReceived(b"*2\r\n-ERR no\r\n:1\r\n")
        (value,) = box
        assert isinstance(value[0], RedisError)
        assert value[1] == 1

    @pytest.mark.parametrize(
        "garbage",
        [b"HTTP/1.1 400 Bad Request\r\n", b"$x\r\n", b"$3\r\nabcde\r\n", b":1\r\n"],
    )
    def test_not_resp_drops_the_connection(self, garbage: bytes) -> None:
        """Bytes that are not RESP (or a reply to no command) abort at once."""
        protocol, transport = connected()
        if garbage != b":1\r\n":
            results(protocol, 1)
        protocol.dataReceived(garbage)
        assert transport.disconnecting

    def test_connection_lost_fails_what_waits(self) -> None:
        """Every command still waiting fails with the reason; none is left."""
        protocol, _ = connected()
        boxes = results(protocol, 3)
        protocol.dataReceived(b"+PONG\r\n")
        protocol.connectionLost(Failure(ConnectionLost("gone")))
        assert boxes[0] == [b"PONG"]
        for box in boxes[1:]:
            (failure,) = box
            assert isinstance(failure, Failure)
            assert failure.check(ConnectionLost)
        assert protocol.lost.called

    def test_command_after_loss_fails(self) -> None:
        """A command on a lost connection fails at once; nothing is written."""
        protocol, transport = connected()
        protocol.connectionLost(Failure(ConnectionDone()))
        transport.clear()
        (box,) = results(protocol, 1)
        (failure,) = box
        assert failure.check(ConnectionDone)
        assert transport.value() == b""

    def test_cancelled_command_skipped(self) -> None:
        """A command its caller gave up on is skipped when its reply comes."""
        protocol, _ = connected()
        given_up = protocol.command(b"PING")
        given_up.addErrback(lambda _: None)
        given_up.cancel()
        (box,) = results(protocol, 1)
        protocol.dataReceived(b"+FIRST\r\n+SECOND\r\n")
        assert box == [b"SECOND"]


class TestURL:
    """What a URL is shown as, and how it connects."""

    def test_describe_hides_the_password(self) -> None:
        """Logs show user and where, never the password."""
        url = parse_url("redis://policyd:secret@[2001:db8::6]:6380/2")
        assert url.describe() == "redis://policyd:***@[2001:db8::6]:6380/2"
        assert "secret" not in repr(url)

    def test_describe_unix(self) -> None:
        """A unix URL shows its path and database."""
        url = parse_url("unix:///run/redis/redis.sock?db=3")
        assert url.describe() == "unix:///run/redis/redis.sock/3"

    def test_endpoints(self) -> None:
        """TCP, TLS and unix URLs make the matching Twisted endpoints."""
        from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        assert isinstance(
            RedisURL("redis", host="h").endpoint(reactor, 1.0), HostnameEndpoint
        )
        assert isinstance(
            RedisURL("unix", path="/s").endpoint(reactor, 1.0), UNIXClientEndpoint
        )
        tls = RedisURL("rediss", host="h").endpoint(reactor, 1.0)
        assert type(tls).__name__ == "_WrapperEndpoint"


class TestSecrets:
    """A password in POLICYD_REDIS_URL stays out of errors and logs."""

    @pytest.mark.parametrize(
        "url",
        [
            "redis://:hunter2@redis.example.net:99999/0",
            "redis://policyd:hunter2@redis/zero",
            "unix://:hunter2@relative/path",
        ],
    )
    def test_not_in_the_error(self, url: str) -> None:
        """The configuration error shows the URL with *** for the password."""
        from policyd import config

        with pytest.raises(config.ConfigError) as caught:
            config.load({"POLICYD_REDIS_URL": url})
        assert "hunter2" not in str(caught.value)
        assert "***" in str(caught.value)

    def test_hide_password(self) -> None:
        """Only the password goes; user, host and path stay."""
        assert hide_password("redis://u:p%40ss@h:1/2") == "redis://u:***@h:1/2"
        assert hide_password("redis://h:6379/0") == "redis://h:6379/0"
