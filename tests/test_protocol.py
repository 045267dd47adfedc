"""PolicyProtocol: framing, limits, timeouts and the decision seam, in memory.

Every connection here is a `StringTransport` and every clock a `Clock`: no
socket is opened and nothing sleeps.
"""

from __future__ import annotations

import itertools
import re
import socket
import sys
from collections.abc import Iterator, Sequence

import pytest
from helpers import (
    DUNNO_REPLY,
    MINIMAL,
    TYPICAL,
    Client,
    DeferredDecider,
    FixedDecider,
    Harness,
    RaisingDecider,
    RecordingTransport,
    SlowDecider,
    WrongTypeDecider,
    capture_logs,
    encode_request,
    events_named,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel

from policyd.actions import DUNNO, Action
from policyd.protocol import (
    BAD_REQUEST_TYPE,
    EMPTY_REQUEST,
    LINE_TOO_LONG,
    MALFORMED_LINE,
    MAX_PIPELINED,
    PROTOCOL_ERROR_REASONS,
    REQUEST_TIMEOUT,
    REQUEST_TOO_LARGE,
    TOO_MANY_ATTRIBUTES,
    Limits,
    describe_peer,
)
from policyd.request import PolicyRequest, encode

VERP = "bounce+x=example.com@example.org"
SRS = "SRS0=HHH=TT=example.com=user@example.org"
BUSY = Action.parse("DEFER_IF_PERMIT Service busy")
BUSY_REPLY = b"action=DEFER_IF_PERMIT Service busy\n\n"
# Small limits so that tests (and hypothesis) reach them with little input.
SMALL = Limits(max_line_length=64, max_attributes=8, max_request_bytes=256)


@pytest.fixture
def logs() -> Iterator[EventLoggingObserver]:
    """Every log event emitted during the test."""
    with capture_logs() as observer:
        yield observer


def numbered(n: int) -> bytes:
    """A request whose ``seq`` attribute is *n*."""
    return encode_request({"request": "smtpd_access_policy", "seq": str(n)})


class SeqDecider:
    """Answer ``INFO seq <n>``, so replies show which request they answer."""

    def decide(self, request: PolicyRequest) -> Action:
        """Echo the ``seq`` attribute in an INFO action."""
        return Action.parse(f"INFO seq {request.attributes.get('seq', '-')}")


def seq_reply(n: int) -> bytes:
    """The reply `SeqDecider` gives to ``numbered(n)``."""
    return f"action=INFO seq {n}\n\n".encode()


# --------------------------------------------------------------------------


class TestFraming:
    """LF framing: one request in, exactly one reply out, in one write."""

    @pytest.mark.parametrize(
        "request_bytes", [MINIMAL, encode_request()], ids=["minimal", "typical"]
    )
    def test_whole(self, request_bytes: bytes) -> None:
        """A request in one read gets one ``action=DUNNO`` reply in one write."""
        client = Harness().connect()
        client.send(request_bytes)
        assert client.writes == [DUNNO_REPLY]
        assert not client.is_closed()

    def test_byte_by_byte(self) -> None:
        """Fed one byte per read, nothing is written until the final LF."""
        client = Harness().connect()
        data = encode_request()
        for i in range(len(data)):
            assert client.writes == [], f"reply written after byte {i}"
            client.send(data[i : i + 1])
        assert client.writes == [DUNNO_REPLY]

    @pytest.mark.parametrize(
        ("split_after", "why"),
        [
            (b"request=smtpd_access_policy\nsen", "inside a name"),
            (b"request=smtpd_access_policy\nsender=", "right after the ="),
            (b"request=smtpd_access_policy\nsender=jos\xc3", "inside a UTF-8 char"),
            (b"request=smtpd_access_policy\nsender=jos\xc3\xa9@example.org", "at LF"),
            (
                b"request=smtpd_access_policy\nsender=jos\xc3\xa9@example.org\n",
                "between the two LFs of the terminator",
            ),
        ],
    )
    def test_awkward_split(self, split_after: bytes, why: str) -> None:
        """A request split anywhere is reassembled intact and answered once."""
        data = b"request=smtpd_access_policy\nsender=jos\xc3\xa9@example.org\n\n"
        assert data.startswith(split_after), why
        decider = FixedDecider()
        client = Harness(decider).connect()
        client.send(split_after)
        assert client.writes == []
        client.send(data[len(split_after) :])
        assert client.writes == [DUNNO_REPLY]
        assert [r.sender for r in decider.requests] == ["josé@example.org"]

    def test_split_in_three_across_requests(self) -> None:
        """Chunks that straddle request boundaries give one write per request."""
        client = Harness(SeqDecider()).connect()
        data = numbered(1) + numbered(2) + numbered(3)
        client.send(data[:5], data[5:40], data[40:41], data[41:])
        assert client.writes == [seq_reply(1), seq_reply(2), seq_reply(3)]

    def test_reply_never_contains_cr(self) -> None:
        """CR in a request does not leak into the reply, which is LF-only."""
        client = Harness(fallback=BUSY).connect()
        client.send(b"request=smtpd_access_policy\nsender=a\r\n\n")
        assert client.writes == [DUNNO_REPLY]
        assert b"\r" not in b"".join(client.writes)

    def test_no_greeting(self) -> None:
        """A new connection is not written to before a request arrives."""
        client = Harness().connect()
        assert client.writes == []
        assert not client.is_closed()

    def test_nothing_before_terminator(self) -> None:
        """A request missing only its empty line gets no reply yet."""
        client = Harness().connect()
        client.send(encode_request()[:-1])
        assert client.writes == []
        assert not client.is_closed()


class TestParsing:
    """What the decider receives for a given request."""

    def test_fields(self) -> None:
        """The decider receives a PolicyRequest with the parsed fields."""
        decider = FixedDecider()
        Harness(decider).connect().send(encode_request())
        [request] = decider.requests
        assert request.protocol_state == "RCPT"
        assert request.client_address == "192.0.2.10"
        assert request.client_name == "mail.example.net"
        assert request.helo_name == "mail.example.net"
        assert request.sender == "alice@example.net"
        assert request.recipient == "bob@example.org"
        assert request.instance == "123.456.7"
        assert request.stress is False
        assert dict(request.attributes) == dict(TYPICAL)

    @given(
        st.lists(
            # Few symbols, so that lines without "=", with several, with
            # empty names or values all come up often.
            st.text(alphabet="a=\xff", min_size=1, max_size=8).map(
                lambda line: line.encode("latin-1")
            ),
            max_size=10,
        )
    )
    @settings(max_examples=300)
    def test_any_lines_parse_like_line_by_line(self, lines: list[bytes]) -> None:
        """Any lines are read as if each were split at its first ``=``.

        Same attributes, or the same close without a reply.  The parser
        takes a shortcut when every line holds exactly one ``=``; this pins
        that the shortcut and the general path agree with the plain
        definition on every input, "=" in values and names included.
        """
        lines = [b"request=smtpd_access_policy", *lines]
        decider = FixedDecider()
        client = Harness(decider).connect()
        client.send(b"\n".join(lines) + b"\n\n")
        if all(b"=" in line and not line.startswith(b"=") for line in lines):
            expected = dict(line.split(b"=", 1) for line in lines)
            assert client.writes == [DUNNO_REPLY]
            [request] = decider.requests
            assert {encode(k): encode(v) for k, v in request.attributes.items()} == (
                expected
            )
        else:
            assert client.writes == []
            assert client.is_closed()
            assert decider.requests == []

    @pytest.mark.parametrize(
        ("line", "name", "value"),
        [
            (b"sender=" + VERP.encode(), "sender", VERP),
            (b"sender=" + SRS.encode(), "sender", SRS),
            (b"ccert_subject==", "ccert_subject", "="),
            (b"sender=", "sender", ""),
            (b"helo_name= spaced ", "helo_name", " spaced "),
        ],
    )  # fmt: skip
    def test_split_at_first_equals(self, line: bytes, name: str, value: str) -> None:
        """A line is split at its first ``=`` only; the value keeps the rest."""
        decider = FixedDecider()
        client = Harness(decider).connect()
        client.send(b"request=smtpd_access_policy\n" + line + b"\n\n")
        assert client.writes == [DUNNO_REPLY]
        assert decider.requests[0].attributes[name] == value

    def test_unknown_attributes(self) -> None:
        """Unknown attributes are ignored by the protocol but kept for the decider."""
        decider = FixedDecider()
        client = Harness(decider).connect()
        client.send(b"request=smtpd_access_policy\nx_future_attribute=42\n\n")
        assert client.writes == [DUNNO_REPLY]
        assert decider.requests[0].attributes["x_future_attribute"] == "42"

    def test_duplicate_names(self) -> None:
        """A repeated name is tolerated; the last value wins (§1.1 allows either)."""
        decider = FixedDecider()
        client = Harness(decider).connect()
        client.send(b"request=smtpd_access_policy\nsender=a@x\nsender=b@x\n\n")
        assert client.writes == [DUNNO_REPLY]
        assert decider.requests[0].sender == "b@x"

    def test_missing_attributes(self) -> None:
        """Attributes that are not sent read as empty strings."""
        decider = FixedDecider()
        Harness(decider).connect().send(MINIMAL)
        [request] = decider.requests
        assert (request.sender, request.client_address, request.instance) == (
            "",
            "",
            "",
        )

    @pytest.mark.parametrize(
        "raw",
        [
            b"\xff\xfe",
            b"caf\xc3",
            b"a\x00b",
            b"\x01\x1b[31m\x7f",
            b"x\ry",
            b"\xc3\xa9\xed\xa0\x80",
        ],
        ids=["invalid", "truncated", "nul", "controls", "cr", "surrogate"],
    )
    def test_undecodable_values(self, raw: bytes) -> None:
        """Invalid UTF-8, NUL and control bytes reach the decider surrogateescaped."""
        decider = FixedDecider()
        client = Harness(decider).connect()
        client.send(b"request=smtpd_access_policy\nhelo_name=" + raw + b"\n\n")
        assert client.writes == [DUNNO_REPLY]
        helo = decider.requests[0].helo_name
        assert helo == raw.decode("utf-8", "surrogateescape")
        assert encode(helo) == raw

    def test_undecodable_name(self) -> None:
        """An attribute name that is not UTF-8 is kept, not fatal."""
        decider = FixedDecider()
        client = Harness(decider).connect()
        client.send(b"request=smtpd_access_policy\n\xffname=v\n\n")
        assert client.writes == [DUNNO_REPLY]
        assert decider.requests[0].attributes["\udcffname"] == "v"


class TestConnection:
    """One persistent connection, many requests, replies in order."""

    def test_sequential(self) -> None:
        """Many requests on one connection each get a reply; it is never closed."""
        client = Harness(SeqDecider()).connect()
        for n in range(200):
            client.send(numbered(n))
            assert client.writes[-1] == seq_reply(n)
            assert not client.is_closed()
        assert len(client.writes) == 200

    def test_pipelined(self) -> None:
        """Several requests in one read are answered in order, one write each."""
        client = Harness(SeqDecider()).connect()
        client.send(b"".join(numbered(n) for n in range(5)))
        assert client.writes == [seq_reply(n) for n in range(5)]
        assert not client.is_closed()

    def test_pipelined_async_serialised(self) -> None:
        """With an async decider, one decision per connection runs at a time."""
        decider = DeferredDecider()
        client = Harness(decider).connect()
        client.send(numbered(1) + numbered(2) + numbered(3))
        assert len(decider.pending) == 1
        assert client.protocol.busy
        for n in (1, 2, 3):
            assert decider.requests[-1].attributes["seq"] == str(n)
            decider.pending[-1].callback(Action.parse(f"INFO seq {n}"))
        assert client.writes == [seq_reply(1), seq_reply(2), seq_reply(3)]
        assert not client.protocol.busy

    def test_async_across_connections(self) -> None:
        """Decisions fired in reverse order each answer their own connection."""
        decider = DeferredDecider()
        harness = Harness(decider)
        clients = [harness.connect() for _ in range(3)]
        for n, client in enumerate(clients):
            client.send(numbered(n))
        for n in reversed(range(3)):
            decider.pending[n].callback(Action.parse(f"INFO seq {n}"))
            assert clients[n].writes == [seq_reply(n)]
        assert [c.writes for c in clients] == [[seq_reply(n)] for n in range(3)]

    def test_pipelined_async_then_sync(self) -> None:
        """A queued request answered synchronously does not strand the next one.

        A decider may answer from a cache at once and go asynchronous on a
        miss (the `Decider` contract allows both); every queued request must
        still be answered.
        """
        answers: list[Deferred[Action] | Action] = []
        first: Deferred[Action] = Deferred()

        class Mixed:
            """Asynchronous for the first request, synchronous after."""

            def decide(self, request: PolicyRequest) -> Action | Deferred[Action]:
                answer = first if not answers else DUNNO
                answers.append(answer)
                return answer

        client = Harness(Mixed()).connect()
        client.send(MINIMAL * 4)
        first.callback(BUSY)
        assert client.writes == [BUSY_REPLY] + [DUNNO_REPLY] * 3
        assert not client.protocol.busy

    @pytest.mark.parametrize("decider_fails", [False, True], ids=["errback", "raise"])
    def test_pipelined_async_then_sync_failure(self, decider_fails: bool) -> None:
        """A queued request whose decider fails at once does not strand the rest."""
        first: Deferred[Action] = Deferred()
        calls: list[int] = []

        class Mixed:
            """Asynchronous for the first request, failing at once after."""

            def decide(self, request: PolicyRequest) -> Action | Deferred[Action]:
                calls.append(1)
                if len(calls) == 1:
                    return first
                if decider_fails:
                    raise RuntimeError("boom")
                return fail(RuntimeError("boom"))

        client = Harness(Mixed(), fallback=BUSY).connect()
        client.send(MINIMAL * 3)
        first.callback(DUNNO)
        assert client.writes == [DUNNO_REPLY, BUSY_REPLY, BUSY_REPLY]
        assert not client.protocol.busy

    def test_long_pipeline_of_fired_deferreds(self) -> None:
        """A full pipeline answered by fired Deferreds gets every reply.

        Answering them must not recurse once per request (which would end in
        RecursionError and a wedged connection): the recursion limit is set
        low enough that a frame per request would hit it.
        """
        first: Deferred[Action] = Deferred()
        count = MAX_PIPELINED + 1

        class Cached:
            """A miss (pending) for the first request, cache hits after."""

            calls = 0

            def decide(self, request: PolicyRequest) -> Deferred[Action]:
                self.calls += 1
                return first if self.calls == 1 else succeed(DUNNO)

        client = Harness(Cached()).connect()
        client.send(MINIMAL * count)
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(MAX_PIPELINED * 4)
        try:
            first.callback(DUNNO)
        finally:
            sys.setrecursionlimit(limit)
        assert len(client.writes) == count
        assert not client.protocol.busy

    def test_pipeline_overflow_closes(self) -> None:
        """More unanswered requests than MAX_PIPELINED close the connection.

        Postfix waits for each answer; a client that piles up requests behind
        a slow decision is cut off (no reply, counted) before it costs memory.
        """
        pending: Deferred[Action] = Deferred()

        class Slow:
            """Never answers the first request."""

            def decide(self, request: PolicyRequest) -> Deferred[Action]:
                return pending

        harness = Harness(Slow())
        client = harness.connect()
        client.send(MINIMAL * (MAX_PIPELINED + 1))
        assert not client.is_closed()
        client.send(MINIMAL)
        assert client.is_closed()
        assert client.writes == []
        assert harness.protocol_errors("pipeline_overflow") == 1

    def test_decider_drops_connection(self) -> None:
        """If the connection is lost while deciding, the rest of the read is dropped."""
        clients: list[Client] = []
        decider = FixedDecider()

        class Dropping:
            """The peer vanishes while the first request is decided."""

            def decide(self, request: PolicyRequest) -> Action:
                clients[0].drop()
                return decider.decide(request)

        clients.append(Harness(Dropping()).connect())
        clients[0].send(MINIMAL * 3)
        assert len(decider.requests) == 1
        assert clients[0].writes == []

    def test_data_after_close_ignored(self) -> None:
        """Once the server has closed, later reads are ignored."""
        decider = FixedDecider()
        client = Harness(decider).connect()
        client.send(b"no-equals\n\n")
        client.send(MINIMAL)
        assert client.writes == []
        assert decider.requests == []


# -- limits ------------------------------------------------------------------

LONG = b"x" * 65
LIMIT_CASES: list[tuple[str, Limits, bytes, str]] = [
    (
        "line too long, complete",
        SMALL,
        b"request=smtpd_access_policy\nsender=" + LONG + b"\n\n",
        LINE_TOO_LONG,
    ),
    (
        "line too long, partial",
        SMALL,
        b"request=smtpd_access_policy\nsender=" + LONG,
        LINE_TOO_LONG,
    ),
    (
        "too many attributes",
        SMALL,
        MINIMAL[:-1] + b"".join(b"a%d=\n" % i for i in range(8)) + b"\n",
        TOO_MANY_ATTRIBUTES,
    ),
    (
        "request too large, complete",
        Limits(max_line_length=64, max_attributes=100, max_request_bytes=256),
        MINIMAL[:-1] + b"".join(b"attr%02d=%s\n" % (i, b"v" * 20) for i in range(9))
        + b"\n",
        REQUEST_TOO_LARGE,
    ),
    (
        "request too large, partial",
        Limits(max_line_length=64, max_attributes=100, max_request_bytes=256),
        MINIMAL[:-1] + b"".join(b"attr%02d=%s\n" % (i, b"v" * 20) for i in range(9)),
        REQUEST_TOO_LARGE,
    ),
    ("line without =", SMALL, MINIMAL[:-1] + b"sender\n\n", MALFORMED_LINE),
    ("empty name", SMALL, MINIMAL[:-1] + b"=value\n\n", MALFORMED_LINE),
    ("empty request", SMALL, b"\n" + MINIMAL, EMPTY_REQUEST),
    ("bare terminator", SMALL, b"\n\n", EMPTY_REQUEST),
    ("request= missing", SMALL, b"sender=a@example.org\n\n", BAD_REQUEST_TYPE),
    ("request= empty", SMALL, b"request=\n\n", BAD_REQUEST_TYPE),
    ("request= other", SMALL, b"request=junk\n\n", BAD_REQUEST_TYPE),
    ("request= case", SMALL, b"request=SMTPD_ACCESS_POLICY\n\n", BAD_REQUEST_TYPE),
]  # fmt: skip


def _at_request_limit() -> bytes:
    head = MINIMAL[:-1] + b"".join(b"a%d=%s\n" % (i, b"v" * 50) for i in range(4))
    room = SMALL.max_request_bytes - len(head) - len(b"a4=\n\n")
    return head + b"a4=" + b"v" * room + b"\n\n"


AT_LINE_LIMIT = (
    b"request=smtpd_access_policy\nsender="
    + b"x" * (SMALL.max_line_length - len(b"sender="))
    + b"\n\n"
)
AT_ATTRIBUTE_LIMIT = MINIMAL[:-1] + b"".join(b"a%d=\n" % i for i in range(7)) + b"\n"
AT_REQUEST_LIMIT = _at_request_limit()


def feeds(data: bytes) -> dict[str, list[bytes]]:
    """*data* whole and one byte per read."""
    return {
        "whole": [data],
        "byte by byte": [data[i : i + 1] for i in range(len(data))],
    }


class TestLimits:
    """Bad input closes the connection without a reply, counted and logged."""

    @pytest.mark.parametrize("how", ["whole", "byte by byte"])
    @pytest.mark.parametrize(
        ("limits", "data", "reason"),
        [case[1:] for case in LIMIT_CASES],
        ids=[case[0] for case in LIMIT_CASES],
    )
    def test_protocol_error(
        self,
        logs: EventLoggingObserver,
        limits: Limits,
        data: bytes,
        reason: str,
        how: str,
    ) -> None:
        """Closed with no bytes written, one error of *reason*, one warning."""
        decider = FixedDecider()
        harness = Harness(decider, limits=limits)
        client = harness.connect()
        # The trailing good request must be ignored: nothing after bad input
        # is read.
        client.send(*feeds(data)[how], MINIMAL)
        assert client.writes == []
        assert client.is_closed()
        assert decider.requests == []
        assert {r: harness.protocol_errors(r) for r in PROTOCOL_ERROR_REASONS} == {
            r: 1.0 if r == reason else 0.0 for r in PROTOCOL_ERROR_REASONS
        }
        [event] = events_named(logs, "protocol_error")
        assert event["log_level"] == LogLevel.warn
        assert event["reason"] == reason
        assert event["peer"] == "127.0.0.1:40000"
        assert event["connection"] == client.protocol.connection_id
        assert harness.sample("policyd_active_connections") == 0

    def test_good_request_before_bad_one(self) -> None:
        """Requests before the bad one in the same read are still answered."""
        client = Harness(limits=SMALL).connect()
        client.send(MINIMAL + MINIMAL + b"garbage\n\n" + MINIMAL)
        assert client.writes == [DUNNO_REPLY, DUNNO_REPLY]
        assert client.is_closed()

    def test_partial_too_long_closes_early(self) -> None:
        """An over-long line is refused as soon as it passes the limit.

        The server does not buffer input up to the request limit waiting for
        the line to end.
        """
        client = Harness(limits=SMALL).connect()
        client.send(b"request=smtpd_access_policy\nsender=")
        client.send(b"x" * (SMALL.max_line_length - len(b"sender=")))
        assert not client.is_closed()
        client.send(b"x")
        assert client.is_closed()

    def test_bad_request_type_logged(self, logs: EventLoggingObserver) -> None:
        """The warning for a wrong request type names the type, escaped."""
        Harness().connect().send(b"request=junk\x1b\n\n")
        [event] = events_named(logs, "protocol_error")
        assert event["detail"] == " (request=junk\\x1b)"

    @pytest.mark.parametrize("how", ["whole", "byte by byte"])
    @pytest.mark.parametrize(
        "data",
        [AT_LINE_LIMIT, AT_ATTRIBUTE_LIMIT, AT_REQUEST_LIMIT],
        ids=["line", "attributes", "request"],
    )
    def test_at_the_limit(self, data: bytes, how: str) -> None:
        """Input exactly at each limit is accepted (the limits are inclusive)."""
        client = Harness(limits=SMALL).connect()
        client.send(*feeds(data)[how])
        assert client.writes == [DUNNO_REPLY]
        assert not client.is_closed()

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (AT_LINE_LIMIT.replace(b"=", b"=x", 2), LINE_TOO_LONG),
            (AT_ATTRIBUTE_LIMIT[:-1] + b"one=more\n\n", TOO_MANY_ATTRIBUTES),
            (AT_REQUEST_LIMIT[:-2] + b"v\n\n", REQUEST_TOO_LARGE),
        ],
        ids=["line", "attributes", "request"],
    )
    def test_one_past_the_limit(self, data: bytes, reason: str) -> None:
        """One byte or attribute more than each limit is refused."""
        harness = Harness(limits=SMALL)
        client = harness.connect()
        client.send(data)
        assert client.writes == []
        assert client.is_closed()
        assert harness.protocol_errors(reason) == 1

    def test_limit_fixtures(self) -> None:
        """The at-the-limit inputs are exactly at their limits (guards the above)."""
        longest = max(AT_LINE_LIMIT.split(b"\n"), key=len)
        assert len(longest) == SMALL.max_line_length
        assert AT_ATTRIBUTE_LIMIT.count(b"\n") - 1 == SMALL.max_attributes
        assert len(AT_REQUEST_LIMIT) == SMALL.max_request_bytes
        assert max(map(len, AT_REQUEST_LIMIT.split(b"\n"))) <= SMALL.max_line_length


class TestTimeouts:
    """The factory's sweep closes stalled and idle connections."""

    def test_stalled_partial_request(self, logs: EventLoggingObserver) -> None:
        """A partial request is closed request_timeout after it began, unanswered."""
        harness = Harness(request_timeout=10, idle_timeout=600)
        client = harness.connect()
        client.send(MINIMAL[:-1])
        harness.clock.advance(9.5)
        harness.factory.sweep()
        assert not client.is_closed()
        harness.clock.advance(0.5)
        harness.factory.sweep()
        assert client.is_closed()
        assert client.writes == []
        assert harness.protocol_errors(REQUEST_TIMEOUT) == 1
        [event] = events_named(logs, "protocol_error")
        assert event["reason"] == REQUEST_TIMEOUT

    def test_trickling_request(self) -> None:
        """The request timeout runs from the first byte; trickling does not reset it."""
        harness = Harness(request_timeout=10, idle_timeout=600)
        client = harness.connect()
        for byte in MINIMAL[:4]:  # at t = 0, 3, 6 and 9
            client.send(bytes([byte]))
            harness.factory.sweep()
            assert not client.is_closed()
            harness.clock.advance(3)
        harness.clock.advance(-2)  # t = 10
        harness.factory.sweep()
        assert client.is_closed()
        assert harness.protocol_errors(REQUEST_TIMEOUT) == 1

    def test_partial_after_complete(self) -> None:
        """A partial request behind a complete one in the same read is timed too."""
        harness = Harness(request_timeout=10)
        client = harness.connect()
        client.send(MINIMAL + MINIMAL[:5])
        assert client.writes == [DUNNO_REPLY]
        harness.clock.advance(10)
        harness.factory.sweep()
        assert client.is_closed()
        assert harness.protocol_errors(REQUEST_TIMEOUT) == 1

    def test_completed_request_stops_timer(self) -> None:
        """A request completed in time leaves no request timer running."""
        harness = Harness(request_timeout=10)
        client = harness.connect()
        client.send(MINIMAL[:5])
        harness.clock.advance(9)
        client.send(MINIMAL[5:])
        harness.clock.advance(9)
        harness.factory.sweep()
        assert not client.is_closed()
        assert client.writes == [DUNNO_REPLY]

    def test_new_partial_timed_from_its_start(self) -> None:
        """A partial request that follows a completed one is timed from its own start.

        The timer of the request that just completed is not carried over.
        """
        harness = Harness(request_timeout=10)
        client = harness.connect()
        client.send(MINIMAL[:5])
        harness.clock.advance(9)
        client.send(MINIMAL[5:] + MINIMAL[:5])
        harness.clock.advance(9)  # t = 18: 18 s after the first, 9 s into this one
        harness.factory.sweep()
        assert not client.is_closed()
        harness.clock.advance(1)
        harness.factory.sweep()
        assert client.is_closed()
        assert client.writes == [DUNNO_REPLY]

    def test_idle(self, logs: EventLoggingObserver) -> None:
        """An answered connection outlives request_timeout; idle_timeout closes it.

        The idle close is counted apart, not as a protocol error.
        """
        harness = Harness(request_timeout=10, idle_timeout=600)
        client = harness.connect()
        client.send(MINIMAL)
        harness.clock.advance(11)
        harness.factory.sweep()
        assert not client.is_closed()
        harness.clock.advance(588)
        harness.factory.sweep()
        assert not client.is_closed()
        harness.clock.advance(1)
        harness.factory.sweep()
        assert client.is_closed()
        assert client.writes == [DUNNO_REPLY]
        assert all(harness.protocol_errors(r) == 0 for r in PROTOCOL_ERROR_REASONS)
        assert harness.sample("policyd_idle_closes_total") == 1
        assert events_named(logs, "protocol_error") == []
        [event] = events_named(logs, "idle_close")
        assert event["log_level"] == LogLevel.debug

    def test_never_used(self) -> None:
        """A connection that never sends anything is closed as idle."""
        harness = Harness(idle_timeout=600)
        client = harness.connect()
        harness.clock.advance(600)
        harness.factory.sweep()
        assert client.is_closed()

    def test_activity_resets_idle(self) -> None:
        """Each request restarts the idle timer."""
        harness = Harness(idle_timeout=600)
        client = harness.connect()
        client.send(MINIMAL)
        harness.clock.advance(500)
        client.send(MINIMAL)
        harness.clock.advance(500)
        harness.factory.sweep()
        assert not client.is_closed()
        harness.clock.advance(100)
        harness.factory.sweep()
        assert client.is_closed()

    def test_busy_not_idle(self) -> None:
        """A connection waiting for a decision is never closed as idle."""
        decider = DeferredDecider()
        harness = Harness(decider, decision_timeout=10_000, idle_timeout=600)
        client = harness.connect()
        client.send(MINIMAL)
        harness.clock.advance(700)
        harness.factory.sweep()
        assert not client.is_closed()
        decider.pending[0].callback(DUNNO)
        assert client.writes == [DUNNO_REPLY]


class TestDecisions:
    """Whatever the decider does, Postfix gets an answer."""

    def test_sync(self) -> None:
        """A decider's Action is what is sent."""
        action = Action.parse("450 4.7.1 Try again later")
        client = Harness(FixedDecider(action)).connect()
        client.send(MINIMAL)
        assert client.writes == [b"action=450 4.7.1 Try again later\n\n"]

    def test_async(self) -> None:
        """A Deferred's Action is sent when it fires, and not before."""
        decider = DeferredDecider()
        client = Harness(decider).connect()
        client.send(MINIMAL)
        assert client.writes == []
        decider.pending[0].callback(Action.parse("REJECT go away"))
        assert client.writes == [b"action=REJECT go away\n\n"]

    def test_raises(self, logs: EventLoggingObserver) -> None:
        """A decider that raises gets the fallback, counted and logged as failure."""
        harness = Harness(RaisingDecider(), fallback=BUSY)
        client = harness.connect()
        client.send(MINIMAL)
        assert client.writes == [BUSY_REPLY]
        assert not client.is_closed()
        assert harness.decision_failures("exception") == 1
        assert harness.decision_failures("timeout") == 0
        assert harness.requests("DEFER_IF_PERMIT") == 1
        [event] = events_named(logs, "decision_error")
        assert event["log_failure"].check(RuntimeError)
        assert event["log_level"] == LogLevel.critical

    def test_errback(self, logs: EventLoggingObserver) -> None:
        """A Deferred that fails gets the fallback, counted and logged."""
        decider = DeferredDecider()
        harness = Harness(decider, fallback=BUSY)
        client = harness.connect()
        client.send(MINIMAL)
        decider.pending[0].errback(ValueError("backend down"))
        assert client.writes == [BUSY_REPLY]
        assert harness.decision_failures("exception") == 1
        [event] = events_named(logs, "decision_error")
        assert event["log_failure"].check(ValueError)

    @pytest.mark.parametrize(
        "decider",
        [WrongTypeDecider(), FixedDecider(None)],  # type: ignore[arg-type]
        ids=["str", "None"],
    )
    def test_not_an_action(self, decider: FixedDecider | WrongTypeDecider) -> None:
        """A decider returning something other than an Action gets the fallback."""
        harness = Harness(decider, fallback=BUSY)
        client = harness.connect()
        client.send(MINIMAL)
        assert client.writes == [BUSY_REPLY]
        assert harness.decision_failures("exception") == 1

    def test_deferred_not_an_action(self) -> None:
        """A Deferred firing with something other than an Action gets the fallback."""
        decider = DeferredDecider()
        harness = Harness(decider, fallback=BUSY)
        client = harness.connect()
        client.send(MINIMAL)
        decider.pending[0].callback("DUNNO")  # type: ignore[arg-type]
        assert client.writes == [BUSY_REPLY]
        assert harness.decision_failures("exception") == 1

    def test_never_fires(self, logs: EventLoggingObserver) -> None:
        """A Deferred that never fires gets the fallback at decision_timeout."""
        decider = DeferredDecider()
        harness = Harness(decider, fallback=BUSY, decision_timeout=1.0)
        client = harness.connect()
        client.send(MINIMAL)
        harness.clock.advance(0.999)
        assert client.writes == []
        harness.clock.advance(0.001)
        assert client.writes == [BUSY_REPLY]
        assert not client.is_closed()
        assert decider.cancelled == 1
        assert harness.decision_failures("timeout") == 1
        assert harness.decision_failures("exception") == 0
        [event] = events_named(logs, "decision_timeout")
        assert event["log_level"] == LogLevel.warn
        assert events_named(logs, "decision_error") == []

    def test_late_result(self) -> None:
        """A result arriving after the timeout writes nothing more."""
        decider = DeferredDecider()
        harness = Harness(decider, fallback=BUSY, decision_timeout=1.0)
        client = harness.connect()
        client.send(MINIMAL)
        harness.clock.advance(1.0)
        decider.pending[0].callback(DUNNO)  # ignored: the Deferred was cancelled
        assert client.writes == [BUSY_REPLY]
        assert harness.requests("DUNNO") == 0

    def test_slow_sync(self) -> None:
        """A synchronous decision slower than the timeout gets the fallback."""
        clock = Clock()
        harness = Harness(
            SlowDecider(clock, 1.5), fallback=BUSY, decision_timeout=1.0, clock=clock
        )
        client = harness.connect()
        client.send(MINIMAL)
        assert client.writes == [BUSY_REPLY]
        assert harness.decision_failures("timeout") == 1

    def test_sync_within_timeout(self) -> None:
        """A synchronous decision within the timeout is sent as decided."""
        clock = Clock()
        harness = Harness(
            SlowDecider(clock, 0.5), fallback=BUSY, decision_timeout=1.0, clock=clock
        )
        client = harness.connect()
        client.send(MINIMAL)
        assert client.writes == [DUNNO_REPLY]
        assert harness.decision_failures("timeout") == 0

    @pytest.mark.parametrize("step", [3600.0, -3600.0], ids=["forward", "back"])
    def test_wall_clock_step(self, step: float) -> None:
        """A step of the wall clock during a decision is not its duration.

        Decisions are timed on the monotonic timer: a quick answer during
        which the system clock was set an hour forward is still sent as
        decided (not replaced by the fallback), and timed as quick.
        """
        harness = _two_clocks(moved="wall", seconds=step)
        client = harness.connect()
        client.send(MINIMAL)
        assert client.writes == [DUNNO_REPLY]
        assert harness.decision_failures("timeout") == 0
        assert harness.sample("policyd_request_duration_seconds_count") == 1
        assert harness.sample("policyd_request_duration_seconds_sum") == 0

    def test_slow_on_the_timer(self) -> None:
        """A decision slow on the monotonic timer gets the fallback."""
        harness = _two_clocks(moved="timer", seconds=1.5)
        client = harness.connect()
        client.send(MINIMAL)
        assert client.writes == [BUSY_REPLY]
        assert harness.decision_failures("timeout") == 1

    def test_timeout_then_next(self) -> None:
        """After a timed-out decision the next pipelined request is decided."""
        decider = DeferredDecider()
        harness = Harness(decider, fallback=BUSY, decision_timeout=1.0)
        client = harness.connect()
        client.send(MINIMAL * 2)
        harness.clock.advance(1.0)
        assert len(decider.pending) == 2
        decider.pending[1].callback(DUNNO)
        assert client.writes == [BUSY_REPLY, DUNNO_REPLY]


class TestConnectionLost:
    """The peer going away abandons its work quietly."""

    def test_in_flight_cancelled(self, logs: EventLoggingObserver) -> None:
        """A decision in flight is cancelled; nothing is written or logged as error."""
        decider = DeferredDecider()
        harness = Harness(decider)
        client = harness.connect()
        client.send(MINIMAL * 3)
        client.drop()
        assert decider.cancelled == 1
        assert decider.pending[0].called
        harness.clock.advance(10)
        assert client.writes == []
        assert len(decider.requests) == 1  # the queued ones are never decided
        assert harness.clock.getDelayedCalls() == []
        assert all(harness.decision_failures(r) == 0 for r in ("exception", "timeout"))
        loud = {LogLevel.warn, LogLevel.error, LogLevel.critical}
        assert [e for e in logs if e.get("log_level") in loud] == []

    def test_forgotten(self) -> None:
        """A lost connection leaves the factory's set of connections."""
        harness = Harness()
        client = harness.connect()
        assert harness.factory.protocols == {client.protocol}
        client.drop()
        assert harness.factory.protocols == set()


class TestMetrics:
    """What the protocol counts."""

    def test_requests_by_action(self) -> None:
        """policyd_requests_total counts replies by keyword or SMTP code."""
        harness = Harness(FixedDecider(Action.parse("450 4.7.1 Later")))
        harness.connect().send(MINIMAL * 2)
        assert harness.requests("450") == 2
        assert harness.requests("DUNNO") == 0

    def test_duration(self) -> None:
        """The duration histogram observes the time to each reply."""
        decider = DeferredDecider()
        harness = Harness(decider)
        client = harness.connect()
        client.send(MINIMAL)
        harness.clock.advance(0.25)
        decider.pending[0].callback(DUNNO)
        assert harness.sample("policyd_request_duration_seconds_count") == 1
        assert harness.sample("policyd_request_duration_seconds_sum") == 0.25

    def test_connections(self) -> None:
        """The active gauge follows connections up and down; the total only grows."""
        harness = Harness(limits=SMALL)
        clients = [harness.connect() for _ in range(3)]
        assert harness.sample("policyd_active_connections") == 3
        assert harness.sample("policyd_connections_total") == 3
        clients[0].drop()
        clients[1].send(b"bad\n\n")
        assert harness.sample("policyd_active_connections") == 1
        assert harness.sample("policyd_connections_total") == 3

    def test_nothing_counted_for_errors(self) -> None:
        """A protocol error is not counted as an answered request."""
        harness = Harness()
        harness.connect().send(b"request=junk\n\n")
        assert harness.sample("policyd_request_duration_seconds_count") == 0
        assert harness.requests("DUNNO") == 0


class TestRequestLogging:
    """The debug log of every request and its answer."""

    def test_on(self, logs: EventLoggingObserver) -> None:
        """log_requests=True logs one escaped ``request`` event per reply."""
        client = Harness(log_requests=True).connect()
        client.send(
            b"request=smtpd_access_policy\nhelo_name=evil\x1b[2J\xff\n\n" + MINIMAL
        )
        events = events_named(logs, "request")
        assert len(events) == 2
        first = events[0]
        assert first["log_level"] == LogLevel.debug
        assert first["action"] == "DUNNO"
        assert first["connection"] == client.protocol.connection_id
        assert first["attributes"] == {
            "request": "smtpd_access_policy",
            "helo_name": "evil\\x1b[2J\\xff",
        }

    def test_off(self, logs: EventLoggingObserver) -> None:
        """log_requests=False logs no ``request`` events."""
        Harness(log_requests=False).connect().send(MINIMAL * 2)
        assert events_named(logs, "request") == []


class TestDescribePeer:
    """Peers as they appear in log events."""

    def test_tcp(self) -> None:
        """A TCP peer is ``host:port``."""
        assert describe_peer(IPv4Address("TCP", "192.0.2.1", 1234)) == "192.0.2.1:1234"

    def test_unix(self) -> None:
        """A unix-socket peer is ``unix``."""
        assert describe_peer(UNIXAddress(None)) == "unix"


# -- properties --------------------------------------------------------------

# A name never holds "=", NUL or LF; a value never holds NUL or LF (§1.1).
names = st.binary(min_size=1, max_size=12).filter(
    lambda b: not re.search(rb"[=\x00\n]", b)
)
values = st.binary(max_size=20).filter(lambda b: b"\x00" not in b and b"\n" not in b)


@st.composite
def valid_requests(draw: st.DrawFn, seq: int) -> bytes:
    """One valid request with ``seq=<seq>`` and random extra attributes."""
    extra = draw(st.lists(st.tuples(names, values), max_size=5))
    lines = [b"request=smtpd_access_policy", b"seq=%d" % seq]
    lines += [n + b"=" + v for n, v in extra if n not in (b"request", b"seq")]
    draw(st.randoms()).shuffle(lines)
    return b"\n".join(lines) + b"\n\n"


@st.composite
def valid_streams(draw: st.DrawFn) -> list[bytes]:
    """A few valid requests, numbered in order."""
    count = draw(st.integers(min_value=1, max_value=6))
    return [draw(valid_requests(n)) for n in range(count)]


def chunked(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """*data* cut at the (sorted, deduplicated) positions *cuts*."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def run(chunks: Sequence[bytes], limits: Limits = Limits()) -> Client:  # noqa: B008
    """Feed *chunks* to a fresh connection answered by `SeqDecider`."""
    client = Harness(SeqDecider(), limits=limits).connect()
    client.send(*chunks)
    return client


# Pieces that make arbitrary streams hit the interesting paths often.
fragments = st.one_of(
    st.binary(max_size=24),
    st.sampled_from(
        [MINIMAL, numbered(7), b"\n", b"\n\n", b"=", b"request=", b"x" * 70, b"\xff"]
    ),
)


class TestFramingProperties:
    """Framing does not depend on how the stream is cut into reads."""

    @settings(max_examples=300)
    @given(
        requests=valid_streams(),
        cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    )
    def test_any_split(self, requests: list[bytes], cuts: list[int]) -> None:
        """Any split of valid requests gives the replies of the whole, in order."""
        data = b"".join(requests)
        expected = [seq_reply(n) for n in range(len(requests))]
        whole = run([data])
        split = run(chunked(data, cuts))
        assert whole.writes == expected
        assert split.writes == expected
        assert not whole.is_closed()
        assert not split.is_closed()

    @settings(max_examples=300)
    @given(
        stream=st.lists(fragments, max_size=12).map(b"".join),
        cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    )
    def test_arbitrary_bytes(self, stream: bytes, cuts: list[int]) -> None:
        """Arbitrary bytes never raise and give only well-formed, whole replies.

        The replies do not depend on the split.  A split can only detect a
        doomed over-long line of an unfinished request sooner (the whole
        stream checks only the last line of its unfinished tail), so a close
        with the whole stream implies a close with any split.
        """
        whole = run([stream], SMALL)
        split = run(chunked(stream, cuts), SMALL)
        assert split.writes == whole.writes
        for reply in whole.writes:
            # SeqDecider raises on an unprintable seq: the fallback is DUNNO.
            assert re.fullmatch(rb"action=(INFO seq [\x20-\x7e]+|DUNNO)\n\n", reply)
        assert whole.transport.late_writes == split.transport.late_writes == []
        if whole.is_closed():
            assert split.is_closed()

    @settings(max_examples=100)
    @given(data=st.data(), connections=st.integers(min_value=1, max_value=4))
    def test_async_out_of_order(self, data: st.DataObject, connections: int) -> None:
        """Async decisions fired in any order still answer each connection in order.

        Per connection the decider is asked one request at a time, so firing
        order can only vary across connections; each connection's replies
        must come in its own request order.
        """
        decider = DeferredDecider()
        harness = Harness(decider)
        counts = [data.draw(st.integers(1, 4)) for _ in range(connections)]
        clients = [harness.connect() for _ in range(connections)]
        for client, count in zip(clients, counts, strict=True):
            client.send(b"".join(numbered(n) for n in range(count)))
        while True:
            waiting = [d for d in decider.pending if not d.called]
            if not waiting:
                break
            d = data.draw(st.sampled_from(waiting))
            index = decider.pending.index(d)
            seq = decider.requests[index].attributes["seq"]
            d.callback(Action.parse(f"INFO seq {seq}"))
        for client, count in zip(clients, counts, strict=True):
            assert client.writes == [seq_reply(n) for n in range(count)]


def _two_clocks(moved: str, seconds: float) -> Harness:
    """A harness with a wall clock and a separate decision timer (1 s timeout).

    Its decider lets *seconds* pass on the *moved* one ("wall" or "timer").
    """
    wall, timer = Clock(), Clock()
    return Harness(
        SlowDecider(wall if moved == "wall" else timer, seconds),
        fallback=BUSY,
        decision_timeout=1.0,
        clock=wall,
        timer=timer,
    )


class FakeSocket(socket.socket):
    """A real socket whose send() takes what a script says, then everything."""

    def __init__(self, *script: int | OSError) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
        self.script = list(script)
        self.sent: list[bytes] = []

    def send(self, data: bytes, flags: int = 0) -> int:  # type: ignore[override]
        """Take the scripted number of bytes (or raise the scripted error)."""
        step = self.script.pop(0) if self.script else len(data)
        if isinstance(step, OSError):
            raise step
        self.sent.append(bytes(data[:step]))
        return step


class TLSConnectionLike:
    """What a TLS transport's getHandle() gives: not a socket, but a send()."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        """Record, and take it all (as OpenSSL's would, bypassing the BIO)."""
        self.sent.append(bytes(data))
        return len(data)


class SocketTransport(RecordingTransport):
    """A transport that offers its socket through getHandle, as TCP does."""

    def __init__(self, sock: FakeSocket | TLSConnectionLike) -> None:
        super().__init__()
        self.sock = sock

    def getHandle(self) -> FakeSocket | TLSConnectionLike:
        """The socket."""
        return self.sock


class TestDirectWrite:
    """Replies go straight to the socket, in order, whatever it takes."""

    @pytest.fixture(autouse=True)
    def _close_sockets(self) -> Iterator[None]:
        """Every FakeSocket made by a test is closed after it."""
        self.sockets: list[FakeSocket] = []
        yield
        for sock in self.sockets:
            sock.close()

    def _client(self, sock: FakeSocket | TLSConnectionLike) -> Client:
        if isinstance(sock, FakeSocket):
            self.sockets.append(sock)
        return Client(Harness(SeqDecider()).factory, SocketTransport(sock))

    def test_only_a_real_socket(self) -> None:
        """A handle that is not a socket (TLS's connection) is never written to.

        Its send() would put the reply around the TLS layer; the transport
        gets it instead.
        """
        handle = TLSConnectionLike()
        client = self._client(handle)
        client.send(numbered(1), numbered(2))
        assert handle.sent == []
        assert client.writes == [seq_reply(1), seq_reply(2)]

    def test_whole_reply_bypasses_twisted(self) -> None:
        """A socket that takes the reply whole gets it directly, no buffering."""
        sock = FakeSocket()
        client = self._client(sock)
        client.send(numbered(1), numbered(2))
        assert sock.sent == [seq_reply(1), seq_reply(2)]
        assert client.writes == []

    @pytest.mark.parametrize(
        "refusal",
        [3, 0, BlockingIOError(), BrokenPipeError()],
        ids=["partial", "nothing", "would-block", "broken-pipe"],
    )
    def test_fallback_keeps_order(self, refusal: int | OSError) -> None:
        """After the socket refuses part of a reply, the transport takes over.

        The rest of that reply and every later one go through the transport,
        so the bytes stay in order.
        """
        sock = FakeSocket(refusal)
        client = self._client(sock)
        client.send(numbered(1), numbered(2), numbered(3))
        direct = b"".join(sock.sent)
        buffered = b"".join(client.writes)
        assert direct + buffered == seq_reply(1) + seq_reply(2) + seq_reply(3)
        assert len(sock.sent) <= 1  # never direct again after the fallback

    def test_without_a_socket(self) -> None:
        """A transport without getHandle (a test, TLS) gets plain writes."""
        client = Harness(SeqDecider()).connect()
        client.send(numbered(1))
        assert client.writes == [seq_reply(1)]
