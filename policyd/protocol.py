r"""The Postfix policy protocol: bytes in, one ``action=...`` reply out.

A request is a series of ``name=value`` lines ending in LF, closed by an empty
line; the reply is exactly ``action=<action>\n\n`` (reference §1).  This module
knows bytes, framing, limits and the transport.  It hands each parsed request
to the factory's decider and knows nothing of how the answer is chosen.

Contract with Postfix, in brief:

* one connection carries many sequential requests and is never closed after a
  normal reply (Postfix would pay a one-second retry for the next request);
* requests that arrive pipelined are answered in order;
* bad input (an over-long line or request, too many attributes, a line without
  ``=``, an empty request, or a ``request=`` other than ``smtpd_access_policy``)
  is logged, counted and answered by closing the connection **without** a
  reply, which is what Postfix documents for a server in trouble;
* a decision that raises, fails, or is slower than the decision timeout gets
  the configured fallback action: never silence.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol, cast

import attrs
from twisted.internet import protocol
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from policyd.actions import Action
from policyd.decision import Decider
from policyd.logs import escape
from policyd.metrics import PolicyMetrics
from policyd.request import EXPECTED_REQUEST, PolicyRequest, decode, field

log = Logger()

# Why a connection was closed without a reply (the ``reason`` metric label).
LINE_TOO_LONG: Final = "line_too_long"
TOO_MANY_ATTRIBUTES: Final = "too_many_attributes"
REQUEST_TOO_LARGE: Final = "request_too_large"
MALFORMED_LINE: Final = "malformed_line"
EMPTY_REQUEST: Final = "empty_request"
BAD_REQUEST_TYPE: Final = "bad_request_type"
REQUEST_TIMEOUT: Final = "request_timeout"
PIPELINE_OVERFLOW: Final = "pipeline_overflow"
PROTOCOL_ERROR_REASONS: Final = (
    LINE_TOO_LONG,
    TOO_MANY_ATTRIBUTES,
    REQUEST_TOO_LARGE,
    MALFORMED_LINE,
    EMPTY_REQUEST,
    BAD_REQUEST_TYPE,
    REQUEST_TIMEOUT,
    PIPELINE_OVERFLOW,
)

# Postfix sends one request and waits for its answer; a client that piles up
# more unanswered requests than this behind a slow decision is not Postfix,
# and is cut off before its queue costs real memory.
MAX_PIPELINED: Final = 64

# Why a decision was replaced by the fallback action.
DECISION_EXCEPTION: Final = "exception"
DECISION_TIMEOUT: Final = "timeout"
DECISION_FAILURE_REASONS: Final = (DECISION_EXCEPTION, DECISION_TIMEOUT)

_TERMINATOR: Final = b"\n\n"
# Every byte but "=" and LF: deleting them leaves a request's skeleton.
_NOT_SEPARATORS: Final = bytes(set(range(256)) - {ord("="), ord("\n")})


_EXPECTED_REQUEST: Final = EXPECTED_REQUEST.encode("ascii")


# The default bounds of a request, here and for POLICYD_MAX_LINE_LENGTH,
# POLICYD_MAX_ATTRIBUTES and POLICYD_MAX_REQUEST_BYTES: Postfix 3.x sends
# about 30 attributes of at most a few hundred bytes.
MAX_LINE_LENGTH: Final = 8192
MAX_ATTRIBUTES: Final = 128
MAX_REQUEST_BYTES: Final = 65536


@attrs.frozen
class Limits:
    """Bounds on what one request may contain (defaults: POLICYD_MAX_*'s)."""

    max_line_length: int = MAX_LINE_LENGTH
    max_attributes: int = MAX_ATTRIBUTES
    max_request_bytes: int = MAX_REQUEST_BYTES
    # A prefix of this is the skeleton (see PolicyProtocol._parse) of every
    # request of at most max_attributes lines with exactly one "=" each:
    # ``=\\n=\\n...=``, of odd length 2n - 1 for n lines.
    one_per_line: bytes = attrs.field(init=False, repr=False, eq=False)

    @one_per_line.default
    def _one_per_line(self) -> bytes:
        return b"=\n" * self.max_attributes


class ConnectionHost(Protocol):
    """What a `PolicyProtocol` needs from the factory that built it.

    `policyd.server.PolicyFactory` is one; the protocol knows it only by
    these members.
    """

    #: The reactor's clock: idle and partial-request timeouts, and the
    #: decision timeout of a Deferred answer.
    clock: IReactorTime
    #: A clock that never jumps (time.monotonic in production): how long a
    #: decision took, which a wall-clock step must not turn into a timeout.
    timer: Callable[[], float]
    decider: Decider
    metrics: PolicyMetrics
    limits: Limits
    fallback: Action
    decision_timeout: float
    request_timeout: float
    idle_timeout: float
    log_requests: bool

    def connection_made(self, connection: PolicyProtocol) -> None:
        """*connection* is up."""

    def connection_lost(self, connection: PolicyProtocol) -> None:
        """*connection* is gone."""

    def answered_all(self, connection: PolicyProtocol) -> None:
        """*connection* has answered every request it received."""


def describe_peer(address: IAddress) -> str:
    """``host:port`` for TCP peers, ``unix`` for unix-socket peers."""
    host = getattr(address, "host", None)
    if host is not None:
        return f"{host}:{getattr(address, 'port', '?')}"
    return "unix"


class PolicyProtocol(protocol.Protocol):
    """One policy connection from one smtpd process."""

    def __init__(self, host: ConnectionHost, connection_id: int) -> None:
        self.host = host
        self.connection_id = connection_id
        # Unconsumed input: always a partial request, never a complete one.
        self._buffer = bytearray()
        # Where in _buffer the current (incomplete) line starts.
        self._line_start = 0
        self._partial_since: float | None = None
        self._last_activity = host.clock.seconds()
        # A decision in flight; later (pipelined) requests wait in _queue.
        self._in_flight: Deferred[Action] | None = None
        self._queue: deque[PolicyRequest] = deque()
        self._advancing = False  # _next is working through _queue
        self.closing = False
        # The socket's send(), while replies may bypass Twisted (`_write`).
        self._send: Callable[[bytes], int] | None = None

    # -- connection life ---------------------------------------------------

    def connectionMade(self) -> None:
        """Register with the factory, which counts and sweeps connections."""
        # Replies go straight to the socket while it takes them whole (see
        # `_write`): only a real socket's.  A TLS transport's handle has a
        # send() too (OpenSSL's, which would bypass the TLS layer's
        # bookkeeping), and test transports have none.
        handle = getattr(self.transport, "getHandle", None)
        sock = handle() if handle is not None else None
        self._send = sock.send if isinstance(sock, socket.socket) else None
        self.host.connection_made(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008 - Twisted API
        """Forget the connection and abandon any decision in flight."""
        self.closing = True
        self._queue.clear()
        if self._in_flight is not None:
            self._in_flight.cancel()
        self.host.connection_lost(self)

    @property
    def busy(self) -> bool:
        """Whether a request has been received but not yet answered."""
        return self._in_flight is not None or bool(self._queue)

    def check_timeouts(self, now: float) -> None:
        """Close the connection if a partial request stalled or it sat idle."""
        if self.closing:
            return
        host = self.host
        if self._partial_since is not None:
            if now - self._partial_since >= host.request_timeout:
                self._protocol_error(REQUEST_TIMEOUT)
        elif not self.busy and now - self._last_activity >= host.idle_timeout:
            log.debug(
                "Closing idle policy connection {connection} from {peer}",
                event="idle_close",
                connection=self.connection_id,
                peer=describe_peer(self.transport.getPeer()),  # type: ignore[union-attr]
            )
            host.metrics.idle_closes.inc()
            self.closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]

    def close_when_idle(self) -> None:
        """Close now if nothing is in flight (used at shutdown)."""
        if not self.closing and not self.busy:
            self.closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]

    # -- framing -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Frame *data* into requests, enforcing the limits on the way."""
        if self.closing:
            return
        now = self.host.clock.seconds()
        self._last_activity = now
        limits = self.host.limits
        buffer: bytes | bytearray
        if self._buffer:
            # Continue a partial request.  Only the new bytes (and the last
            # old one, for a terminator split across reads) are scanned, so
            # input fed byte by byte costs linear time, not quadratic.
            old = len(self._buffer)
            self._buffer += data
            buffer = self._buffer
            end = buffer.find(_TERMINATOR, old - 1)
            if end < 0:
                newline = buffer.rfind(b"\n", old)
                if newline >= 0:
                    self._line_start = newline + 1
                self._check_partial(limits)
                return
            self._buffer = bytearray()
        else:
            buffer = data
            end = buffer.find(_TERMINATOR)
        start = 0
        started = self.host.timer()
        while True:
            if end < 0:
                if start < len(buffer):
                    rest = buffer[start:]
                    self._buffer = bytearray(rest)
                    self._line_start = rest.rfind(b"\n") + 1
                    if self._partial_since is None:
                        self._partial_since = now
                    self._check_partial(limits)
                else:
                    self._partial_since = None
                return
            if buffer[start : start + 1] == b"\n":
                self._protocol_error(EMPTY_REQUEST)
                return
            if end - start + 2 > limits.max_request_bytes:
                self._protocol_error(REQUEST_TOO_LARGE)
                return
            request = self._parse(buffer[start:end], limits)
            if request is None:
                return
            self._partial_since = None
            self._received(request, started)
            # Later requests of the same read are timed from their own start.
            started = -1.0
            # A decider may drop the connection (say, the peer vanished while
            # it ran); mypy cannot see that through the call.
            if self.closing:
                return  # type: ignore[unreachable]
            start = end + 2
            end = buffer.find(_TERMINATOR, start)

    def _check_partial(self, limits: Limits) -> None:
        if len(self._buffer) > limits.max_request_bytes:
            self._protocol_error(REQUEST_TOO_LARGE)
        elif len(self._buffer) - self._line_start > limits.max_line_length:
            self._protocol_error(LINE_TOO_LONG)

    def _parse(self, block: bytes | bytearray, limits: Limits) -> PolicyRequest | None:
        if isinstance(block, bytearray):
            block = bytes(block)  # the request keeps it: immutable
        # The block's skeleton: its "=" and LF bytes in order, every other
        # byte deleted (one C pass).  Each line is one LF-separated run, so a
        # line without "=" shows as a leading, trailing or doubled LF, and
        # the line count is the LF count plus one; no Python loop per line.
        skeleton = block.translate(None, _NOT_SEPARATORS)
        if len(skeleton) & 1 and limits.one_per_line.startswith(skeleton):
            # At most max_attributes lines, each with exactly one "=": the
            # common case (values rarely contain "="), valid as it stands
            # (the general checks below cost about 0.3 µs a request more).
            if len(block) > limits.max_line_length and not self._lines_fit(
                block, limits
            ):
                return None
        else:
            if skeleton.count(b"\n") >= limits.max_attributes:
                self._protocol_error(TOO_MANY_ATTRIBUTES)
                return None
            if len(block) > limits.max_line_length and not self._lines_fit(
                block, limits
            ):
                return None
            if (
                not skeleton
                or skeleton[:1] == b"\n"
                or skeleton[-1:] == b"\n"
                or b"\n\n" in skeleton
            ):
                self._protocol_error(MALFORMED_LINE)
                return None
            # Some value holds "=" (VERP and SRS senders, for one): each
            # line's name ends at its first "=", which is how RequestLines
            # reads them.
        # Every line holds an "=" now; one right at its start has no name.
        if block[:1] == b"=" or b"\n=" in block:
            self._protocol_error(MALFORMED_LINE)
            return None
        kind = field(block, b"\nrequest=")
        if kind != _EXPECTED_REQUEST:
            self._protocol_error(
                BAD_REQUEST_TYPE, None if kind is None else decode(kind)
            )
            return None
        # The few fields every request needs are found in the block; the
        # other lines are split only if something reads them.
        return PolicyRequest.from_block(block, self.connection_id)

    def _lines_fit(self, block: bytes, limits: Limits) -> bool:
        if any(len(line) > limits.max_line_length for line in block.split(b"\n")):
            self._protocol_error(LINE_TOO_LONG)
            return False
        return True

    def _protocol_error(self, reason: str, detail: str | None = None) -> None:
        self.closing = True
        self._buffer = bytearray()
        self._partial_since = None
        self.host.metrics.protocol_errors.labels(reason).inc()
        log.warn(
            "Closing policy connection {connection} from {peer} without a reply: "
            "{reason}{detail}",
            event="protocol_error",
            reason=reason,
            detail="" if detail is None else f" (request={escape(detail)})",
            connection=self.connection_id,
            peer=describe_peer(self.transport.getPeer()),  # type: ignore[union-attr]
        )
        self.transport.loseConnection()  # type: ignore[union-attr]

    # -- answering ---------------------------------------------------------

    def _received(self, request: PolicyRequest, started: float) -> None:
        if self.busy:
            if len(self._queue) >= MAX_PIPELINED:
                self._protocol_error(PIPELINE_OVERFLOW)
                return
            self._queue.append(request)
        else:
            if started < 0:
                started = self.host.timer()
            self._decide(request, started)

    def _decide(self, request: PolicyRequest, started: float) -> None:
        host = self.host
        try:
            # Whatever it returns: a broken decider must still get an answer.
            result = cast(object, host.decider.decide(request))
        except Exception:  # noqa: BLE001 - any decider bug must still get an answer
            self._failed(request, Failure(), started)
            return
        if isinstance(result, Action):
            elapsed = host.timer() - started
            if elapsed > host.decision_timeout:
                self._timed_out(request, started)
            else:
                self._reply(request, result, elapsed)
            return
        if not isinstance(result, Deferred):
            self._failed(
                request,
                Failure(TypeError(f"decider returned {type(result).__name__}")),
                started,
            )
            return
        self._in_flight = result
        result.addTimeout(host.decision_timeout, host.clock)
        result.addCallbacks(
            lambda action: self._decided(action, request, started),
            lambda failure: self._decision_failed(failure, request, started),
        )

    def _decided(self, action: object, request: PolicyRequest, started: float) -> None:
        self._in_flight = None
        if isinstance(action, Action):
            self._reply(request, action, self.host.timer() - started)
        else:
            self._failed(
                request,
                Failure(TypeError(f"decider returned {type(action).__name__}")),
                started,
            )
        self._next()

    def _decision_failed(
        self, failure: Failure, request: PolicyRequest, started: float
    ) -> None:
        self._in_flight = None
        if failure.check(TimeoutError):
            self._timed_out(request, started)
        elif failure.check(CancelledError) and self.closing:
            return  # connection lost: nobody to answer
        else:
            self._failed(request, failure, started)
        self._next()

    def _next(self) -> None:
        # Loop, not one step: a queued request may be answered synchronously
        # (an Action, a raising decider, an already-fired Deferred), and the
        # ones behind it must not be stranded.  The guard keeps an answer
        # that lands back here from inside _decide from recursing once per
        # queued request (a long pipeline would overflow the stack).
        if self._advancing:
            return
        self._advancing = True
        try:
            while self._queue and self._in_flight is None and not self.closing:
                request = self._queue.popleft()
                self._decide(request, self.host.timer())
        finally:
            self._advancing = False
        if not self.busy:
            self.host.answered_all(self)

    def _failed(self, request: PolicyRequest, failure: Failure, started: float) -> None:
        host = self.host
        host.metrics.decision_failures.labels(DECISION_EXCEPTION).inc()
        log.failure(
            "Decision failed for client {client}; answering {action}",
            failure,
            event="decision_error",
            client=escape(request.client_address),
            instance=escape(request.instance),
            action=host.fallback.text,
        )
        self._reply(request, host.fallback, host.timer() - started)

    def _timed_out(self, request: PolicyRequest, started: float) -> None:
        host = self.host
        host.metrics.decision_failures.labels(DECISION_TIMEOUT).inc()
        elapsed = host.timer() - started
        log.warn(
            "Decision for client {client} took longer than {timeout}s; answering "
            "{action}",
            event="decision_timeout",
            client=escape(request.client_address),
            instance=escape(request.instance),
            timeout=host.decision_timeout,
            action=host.fallback.text,
        )
        self._reply(request, host.fallback, elapsed)

    def _write(self, data: bytes) -> None:
        """Send *data* now if the socket takes it all, else through Twisted.

        Twisted's ``write`` buffers and sends on the reactor's next turn,
        registering for writability and unregistering after (two
        ``epoll_ctl`` calls and a loop iteration per reply).  A reply is a
        few bytes that a socket with an empty buffer takes at once, so
        policyd sends it directly.  The first time the socket does not take
        a whole reply (or fails), the rest and every later reply go through
        ``transport.write``, so nothing is ever reordered; a real error is
        then reported by Twisted as usual.
        """
        send = self._send
        if send is not None:
            try:
                sent = send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            self._send = None
            data = data[sent:]
        self.transport.write(data)  # type: ignore[union-attr]

    def _reply(self, request: PolicyRequest, action: Action, elapsed: float) -> None:
        if self.closing:
            return
        host = self.host
        self._write(action.wire)
        self._last_activity = host.clock.seconds()
        host.metrics.answered(action, elapsed)
        if host.log_requests:
            log.debug(
                "request {attributes} -> {action}",
                event="request",
                attributes={
                    escape(k): escape(v) for k, v in request.attributes.items()
                },
                action=action.text,
                seconds=elapsed,
                connection=self.connection_id,
            )
