"""
A small Redis client: the URL policyd is given, and RESP over a Twisted stream.

policyd needs a handful of commands (AUTH, SELECT, SCRIPT LOAD, EVALSHA, TIME,
PING) on one connection, with its own deadlines: a decision waits for Redis
at most tens of milliseconds and then goes on without it, while the
connection stays up for the late reply.  The client here does exactly that
and nothing else: commands are written at once (pipelined), replies are
matched to them in order, and nothing here waits or times out by itself;
the caller (`policyd.shared.RedisLoadTracker`) owns every timer, on the
reactor it was given, so that tests drive it with a `Clock`.

(txredisapi, the Twisted Redis library, was the first choice; it reads the
global reactor, aborts the connection on the first reply later than its
timeout, and verifies no TLS certificate unless handed an old-style context
factory: each of the three is against what the backend must do.)
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, cast
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint, ITransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

__all__ = [
    "DEFAULT_PORT",
    "ProtocolError",
    "RedisError",
    "RedisProtocol",
    "RedisURL",
    "ask_sentinels",
    "encode",
    "hide_password",
    "log_in",
    "parse_url",
]

DEFAULT_PORT: Final = 6379

# A reply larger than this is not Redis talking (policyd's replies are a few
# kilobytes): the connection is dropped rather than buffered without end.
MAX_REPLY_BYTES: Final = 64 << 20


class RedisError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""

    @property
    def kind(self) -> str:
        """The first word of the error: ``ERR``, ``NOSCRIPT``, ``BUSY``..."""
        return str(self.args[0]).split(" ", 1)[0]


class ProtocolError(Exception):
    """The peer sent something that is not RESP: the connection is unusable."""


@attrs.frozen
class RedisURL:
    """Where Redis is and how to log in, from ``POLICYD_REDIS_URL``."""

    #: ``redis`` (TCP), ``rediss`` (TCP with TLS), ``unix``, or
    #: ``redis+sentinel`` (a master found through Sentinel).
    scheme: str
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    #: For ``rediss``: a PEM file of the certificate authority to trust
    #: instead of the system's.
    ca_file: str | None = None
    #: For ``redis+sentinel``: the Sentinels to ask, and the name of the
    #: master they watch.
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        """A client endpoint that reaches this Redis within *timeout* seconds."""
        if self.scheme == "unix":
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            reactor, self.host, self.port, timeout=timeout
        )
        if self.scheme == "rediss":
            trust = None
            if self.ca_file is not None:
                with open(self.ca_file, "rb") as pem:
                    trust = ssl.Certificate.loadPEM(pem.read())
            endpoint = wrapClientTLS(
                ssl.optionsForClientTLS(self.host, trustRoot=trust), endpoint
            )
        return endpoint

    def describe(self) -> str:
        """The URL without its password, for logs."""
        if self.scheme == SENTINEL:
            where = ",".join(f"{_bracket(h)}:{p}" for h, p in self.sentinels)
            where += f"/{self.service}"
        elif self.scheme == "unix":
            where = self.path
        else:
            where = f"{_bracket(self.host)}:{self.port}"
        user = ""
        if self.username is not None or self.password is not None:
            user = f"{self.username or ''}:***@"
        return f"{self.scheme}://{user}{where}/{self.db}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


#: The scheme of a master found through Redis Sentinel.
SENTINEL: Final = "redis+sentinel"
SENTINEL_PORT: Final = 26379

_QUERY_KEYS: Final = {
    "redis": {"db"},
    "rediss": {"db", "ca"},
    "unix": {"db"},
    SENTINEL: {"db"},
}


_PASSWORD = re.compile(r"(://[^/@:]*:)[^@/]*@")


def hide_password(text: str) -> str:
    """*text* with the password of any URL in it replaced by ``***``."""
    return _PASSWORD.sub(r"\1***@", text)


def parse_url(raw: str) -> RedisURL:
    """
    Read a Redis URL; `ValueError` saying what is wrong if it is not one.

    ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` the same
    over TLS (``?ca=/path/ca.pem`` to trust a private authority),
    ``unix://[[user]:password@]/path/to/redis.sock[?db=N]``, and
    ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/name[/db]``
    for the master that the Sentinels name *name* (port 26379 by default).
    """
    text = hide_password(raw.strip())
    example = "e.g. redis://127.0.0.1:6379/0 or unix:///run/redis/redis.sock"
    if not text:
        raise ValueError(f"no Redis URL given; {example}")
    scheme = text.partition("://")[0].lower() if "://" in text else ""
    if scheme not in _QUERY_KEYS:
        raise ValueError(
            f"{text!r} is not a Redis URL: the scheme must be redis://, rediss://, "
            f"unix:// or redis+sentinel://; {example}"
        )
    if scheme == SENTINEL:
        return _parse_sentinel(raw.strip(), text)
    parts = urlsplit(raw.strip())
    if parts.fragment:
        raise ValueError(f"{text!r}: a Redis URL has no #fragment")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = set(query) - _QUERY_KEYS[scheme]
    if unknown:
        raise ValueError(
            f"{text!r}: unknown URL parameter {sorted(unknown)[0]!r} "
            f"({scheme}:// takes {', '.join(sorted(_QUERY_KEYS[scheme]))})"
        )
    for key, values in query.items():
        if len(values) != 1:
            raise ValueError(f"{text!r}: the parameter {key!r} is given twice")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(
            f"{text!r}: the port must be a number from 1 to 65535"
        ) from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    _check_login(text, username, password)
    db_text = query.get("db", [None])[0]
    if scheme == "unix":
        if parts.hostname or parts.port:
            raise ValueError(
                f"{text!r}: a unix:// URL names a socket path, not a host "
                "(three slashes: unix:///run/redis/redis.sock)"
            )
        path = unquote(parts.path)
        if not path.startswith("/") or path == "/":
            raise ValueError(
                f"{text!r}: a unix:// URL needs the socket's absolute path, "
                "e.g. unix:///run/redis/redis.sock"
            )
        return RedisURL(
            scheme,
            path=path,
            db=_db(text, db_text),
            username=username,
            password=password,
        )
    host = parts.hostname
    if not host:
        raise ValueError(f"{text!r}: no host; {example}")
    path_db = parts.path.strip("/")
    if path_db and db_text is not None:
        raise ValueError(f"{text!r}: the database is given twice (path and ?db=)")
    ca_file = query.get("ca", [None])[0] if scheme == "rediss" else None
    if ca_file is not None and not ca_file:
        raise ValueError(f"{text!r}: ?ca= needs the path of a PEM file")
    return RedisURL(
        scheme,
        host=host,
        port=port if port is not None else DEFAULT_PORT,
        db=_db(text, path_db or db_text),
        username=username,
        password=password,
        ca_file=ca_file,
    )


def _check_login(text: str, username: str | None, password: str | None) -> None:
    if username is not None and password is None:
        raise ValueError(
            f"{text!r}: a user without a password (Redis logs a user in with "
            "both: redis://USER:PASSWORD@HOST)"
        )


def _parse_sentinel(raw: str, text: str) -> RedisURL:
    """A ``redis+sentinel://`` URL (*text* is *raw* without its password)."""
    rest = raw.split("://", 1)[1]
    rest, _, query_text = rest.partition("?")
    if "#" in query_text or "#" in rest:
        raise ValueError(f"{text!r}: a Redis URL has no #fragment")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) if user else None
        password = unquote(secret) if colon else None
    _check_login(text, username, password)
    sentinels = []
    for item in hosts.split(","):
        host = item
        port = SENTINEL_PORT
        if item.startswith("["):
            host, _, after = item[1:].partition("]")
            if after:
                port = _sentinel_port(text, after.removeprefix(":"))
        elif ":" in item:
            host, _, port_text = item.rpartition(":")
            port = _sentinel_port(text, port_text)
        if not host:
            raise ValueError(
                f"{text!r}: every Sentinel needs a host, e.g. "
                "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster"
            )
        sentinels.append((host, port))
    service, _, db_path = path.partition("/")
    if not service:
        raise ValueError(
            f"{text!r}: name the master the Sentinels watch after the hosts, e.g. "
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster"
        )
    query = parse_qs(query_text, keep_blank_values=True)
    unknown = set(query) - _QUERY_KEYS[SENTINEL]
    if unknown:
        raise ValueError(
            f"{text!r}: unknown URL parameter {sorted(unknown)[0]!r} "
            "(redis+sentinel:// takes db)"
        )
    db_query = query.get("db", [None])
    if len(db_query) != 1:
        raise ValueError(f"{text!r}: the parameter 'db' is given twice")
    if db_path and db_query[0] is not None:
        raise ValueError(f"{text!r}: the database is given twice (path and ?db=)")
    return RedisURL(
        SENTINEL,
        db=_db(text, db_path or db_query[0]),
        username=username,
        password=password,
        sentinels=tuple(sentinels),
        service=unquote(service),
    )


def _sentinel_port(text: str, port: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return int(port)


def _db(text: str, raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    if not re.fullmatch(r"[0-9]{1,5}", raw):
        raise ValueError(
            f"{text!r}: the database must be a number from 0 (the /0 at the end)"
        )
    return int(raw)


def encode(args: Sequence[bytes | str | int | float]) -> bytes:
    """One command as RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(float(arg)).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Incomplete(Exception):
    """More bytes are needed before the next reply is whole."""


# A reply: bytes (simple or bulk string), int, None (null), a list of
# replies, or a RedisError (an error inside an array).
Reply = Any


def _parse(buffer: bytes | bytearray, start: int) -> tuple[Reply, int]:
    """The reply that begins at *start*, and where the next one begins."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        raise _Incomplete
    kind = buffer[start : start + 1]
    line = bytes(buffer[start + 1 : end])
    after = end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), after
    try:
        number = int(line)
    except ValueError:
        raise ProtocolError(f"not RESP: {bytes(buffer[start:end])[:80]!r}") from None
    if kind == b":":
        return number, after
    if kind == b"$":
        if number < 0:
            return None, after
        if number > MAX_REPLY_BYTES:
            raise ProtocolError(f"a reply of {number} bytes")
        if len(buffer) < after + number + 2:
            raise _Incomplete
        if buffer[after + number : after + number + 2] != b"\r\n":
            raise ProtocolError("a bulk string without its CRLF")
        return bytes(buffer[after : after + number]), after + number + 2
    if kind == b"*":
        if number < 0:
            return None, after
        items = []
        for _ in range(number):
            item, after = _parse(buffer, after)
            items.append(item)
        return items, after
    raise ProtocolError(f"not RESP: {bytes(buffer[start:end])[:80]!r}")


class RedisProtocol(Protocol):
    """
    RESP2 on one stream: `command` writes at once and returns the reply's Deferred.

    Replies come back in the order of the commands.  An error reply fails its
    Deferred with `RedisError`; a lost connection fails every command still
    waiting (with the reason); bytes that are not RESP drop the connection.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._waiting: deque[Deferred[Reply]] = deque()
        self.connected_ = False
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        """Commands may be sent from now on."""
        self.connected_ = True

    @property
    def pending(self) -> int:
        """Commands written and not yet answered."""
        return len(self._waiting)

    def command(self, *args: bytes | str | int | float) -> Deferred[Reply]:
        """Send one command; its Deferred fires with the reply."""
        waiting: Deferred[Reply] = Deferred()
        if not self.connected_:
            waiting.errback(Failure(ConnectionDone("not connected to Redis")))
            return waiting
        self._waiting.append(waiting)
        self._transport().write(encode(args))
        return waiting

    def dataReceived(self, data: bytes) -> None:
        """Match every whole reply in *data* (and what came before) to its command."""
        buffer = self._buffer
        buffer += data
        start = 0
        try:
            while start < len(buffer):
                try:
                    reply, start = _parse(buffer, start)
                except _Incomplete:
                    break
                if not self._waiting:
                    raise ProtocolError("a reply to no command")
                waiting = self._waiting.popleft()
                if waiting.called:
                    # Cancelled by its caller (a timeout): nobody listens.
                    continue
                if isinstance(reply, RedisError):
                    waiting.errback(Failure(reply))
                else:
                    waiting.callback(reply)
        except ProtocolError:
            del buffer[:]
            self.abort()
            return
        del buffer[:start]
        if len(buffer) > MAX_REPLY_BYTES:
            del buffer[:]
            self.abort()

    def abort(self) -> None:
        """Drop the connection at once (what is unsent is lost)."""
        if self.transport is not None:
            cast(Any, self.transport).abortConnection()

    def close(self) -> None:
        """Close the connection once what is written has gone."""
        if self.transport is not None:
            self.transport.loseConnection()

    def _transport(self) -> ITransport:
        transport = self.transport
        if transport is None:
            raise ConnectionDone("not connected to Redis")
        return transport

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008 - Twisted's signature
        """Fail every command still waiting for its reply."""
        self.connected_ = False
        waiting, self._waiting = self._waiting, deque()
        for each in waiting:
            if not each.called:
                each.errback(reason)
        if not self.lost.called:
            self.lost.callback(None)


async def ask_sentinels(reactor: Any, url: RedisURL, timeout: float) -> RedisURL:
    """
    The master that *url*'s Sentinels name now, as a ``redis://`` URL.

    The Sentinels are asked in turn (each may take *timeout*); the first one
    that knows the master answers.  `ConnectionError` if none does.
    """
    problems = []
    for host, port in url.sentinels:
        protocol = RedisProtocol()
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        try:
            await connectProtocol(endpoint, protocol)
            try:
                master = await protocol.command(
                    b"SENTINEL", b"get-master-addr-by-name", url.service
                )
            finally:
                protocol.close()
        except (OSError, RedisError, ConnectionError) as e:
            problems.append(f"{_bracket(host)}:{port}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - Twisted's connection errors
            problems.append(f"{_bracket(host)}:{port}: {e or type(e).__name__}")
            continue
        if not isinstance(master, list) or len(master) != 2:
            problems.append(f"{_bracket(host)}:{port} does not know {url.service!r}")
            continue
        return attrs.evolve(
            url,
            scheme="redis",
            host=master[0].decode("ascii", "replace"),
            port=int(master[1]),
            sentinels=(),
        )
    raise ConnectionError(
        f"no Sentinel names the master {url.service!r} ({'; '.join(problems)})"
    )


async def log_in(protocol: RedisProtocol, url: RedisURL) -> None:
    """Log in and choose the database on a fresh connection, as *url* says."""
    if url.password is not None:
        if url.username:
            await protocol.command(b"AUTH", url.username, url.password)
        else:
            await protocol.command(b"AUTH", url.password)
    if url.db:
        await protocol.command(b"SELECT", url.db)
