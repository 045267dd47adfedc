"""
``policyd ask``: one policy request, as smtpd would send it, to a running server.

An admin tries a client by hand: the attributes given on the command line
over a request that looks like smtpd's, sent over the policy protocol
(reference §1.1), and the one reply read back.

This is the client side of the protocol, used by a short-lived command, so it
uses the standard library's blocking sockets, bounded by one deadline for the
whole exchange, rather than the reactor.  `policyd.cli` owns the process:
arguments, environment, output and exit codes; this module raises exceptions
whose messages are the one line the admin sees.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Final

import attrs

from policyd.request import EXPECTED_REQUEST, TRANSACTION_STATES, decode, encode

# -- the request -------------------------------------------------------------

# What smtpd would send for a client it knows nothing about, at RCPT (the
# stage of the default wiring), in smtpd's order.  Only what a request needs
# to mean something is filled in; the rest is empty (or 0), which is how
# smtpd sends unavailable values (reference §1.1).  192.0.2.1 is a
# documentation address (RFC 5737) that no real client has, so asking does
# not add to a real client's history in policyd's tracker.  Names are not
# looked up: `unknown` is what smtpd sends when its lookups fail.
DEFAULTS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "request": EXPECTED_REQUEST,
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "helo_name": "",
        "queue_id": "",
        "sender": "",
        "recipient": "",
        "recipient_count": "0",
        "client_address": "192.0.2.1",
        "client_name": "unknown",
        "reverse_client_name": "unknown",
        "instance": "",
        "sasl_method": "",
        "sasl_username": "",
        "sasl_sender": "",
        "size": "0",
        "stress": "",
    }
)

# smtpd has an instance only inside a mail transaction: from the accepted
# MAIL FROM to the end of the message (reference §2.2).  At these stages an
# ask gets a fresh one unless given, so that it is its own transaction.

# Every attribute some Postfix version sends (reference §2.1).  Others are
# sent too, but named in a warning: most likely they are typos.
POSTFIX_ATTRIBUTES: Final = frozenset(
    {
        *DEFAULTS,
        "ccert_subject",
        "ccert_issuer",
        "ccert_fingerprint",
        "ccert_pubkey_fingerprint",
        "encryption_protocol",
        "encryption_cipher",
        "encryption_keysize",
        "etrn_domain",
        "client_port",
        "policy_context",
        "server_address",
        "server_port",
        "compatibility_level",
        "mail_version",
        "tls_sni",
    }
)


class InvalidAttribute(ValueError):
    """A ``NAME=VALUE`` argument that cannot be sent; the message says why."""


def new_instance() -> str:
    """A fresh ``instance`` value, recognisably from ``policyd ask``."""
    return f"ask.{os.getpid():x}.{secrets.token_hex(6)}"


def parse_attribute(argument: str) -> tuple[str, str]:
    """Split ``NAME=VALUE`` at the first ``=``: values may contain ``=``."""
    name, equals, value = argument.partition("=")
    if not equals:
        raise InvalidAttribute(f"{argument!r} is not NAME=VALUE, e.g. helo_name=foo")
    if not name:
        raise InvalidAttribute(f"{argument!r} has no name before '='")
    for part, what in ((name, "name"), (value, "value")):
        for char, label in (("\n", "a newline"), ("\0", "a NUL")):
            if char in part:
                raise InvalidAttribute(
                    f"the {what} of {argument!r} contains {label}, which the "
                    "policy protocol cannot carry"
                )
    return name, value


def build_request(
    arguments: Iterable[str], instance: Callable[[], str] = new_instance
) -> dict[str, str]:
    """
    The attributes to send: `DEFAULTS`, then every ``NAME=VALUE`` over them.

    A given name replaces its default in place; a new one is added at the end,
    in the order given; a name given twice keeps its last value.  Unless
    ``instance`` is given, a request at a `TRANSACTION_STATES` stage gets a
    fresh one from *instance*.
    """
    given = dict(parse_attribute(argument) for argument in arguments)
    attributes = {**DEFAULTS, **given}
    if "instance" not in given and (
        attributes["protocol_state"].upper() in TRANSACTION_STATES
    ):
        attributes["instance"] = instance()
    return attributes


def unknown_names(attributes: Iterable[str]) -> list[str]:
    """The names in *attributes* that no Postfix version sends."""
    return [name for name in attributes if name not in POSTFIX_ATTRIBUTES]


def encode_request(attributes: Mapping[str, str]) -> bytes:
    """The wire form: ``name=value`` lines ending in LF, then an empty line."""
    lines = b"".join(
        encode(name) + b"=" + encode(value) + b"\n"
        for name, value in attributes.items()
    )
    return lines + b"\n"


# -- where to ask ------------------------------------------------------------


class InvalidEndpoint(ValueError):
    """An endpoint ``policyd ask`` cannot connect to; the message says why."""


@attrs.frozen
class TCPTarget:
    """A policy server at a host (name or address) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def connect(self, remaining: Callable[[], float]) -> socket.socket:
        """
        A connected socket, trying each address of the host in turn.

        *remaining* gives the seconds left for each attempt (and raises
        `TimeoutError` when none are), so the attempts share one deadline;
        `socket.create_connection` would give each its own.
        """
        error: OSError | None = None
        for family, kind, protocol, _, address in socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, protocol)
            try:
                sock.settimeout(remaining())
                sock.connect(address)
            except TimeoutError:
                sock.close()
                raise
            except OSError as e:
                sock.close()
                error = e
                continue
            return sock
        raise error or OSError(f"no address for {self.host}")


@attrs.frozen
class UNIXTarget:
    """A policy server on a unix-domain socket."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"

    def connect(self, remaining: Callable[[], float]) -> socket.socket:
        """A connected socket, within the seconds *remaining* gives."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining())
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock


Target = TCPTarget | UNIXTarget

# Endpoint types of Twisted (or Postfix) that a plain socket cannot speak.
_UNSUPPORTED: Final = frozenset({"ssl", "tls", "systemd", "tor", "onion", "stdio"})

SERVER_FORMS: Final = (
    "HOST:PORT, [IPv6]:PORT, tcp:HOST:PORT, inet:HOST:PORT, unix:PATH or a socket /PATH"
)


def split_description(description: str) -> list[tuple[str | None, str]]:
    r"""
    Twisted's endpoint syntax: ``:``-separated arguments, ``key=value`` ones.

    A backslash escapes the next character (``\:`` for a colon in a path or
    an IPv6 address).  Only the first unescaped ``=`` of an argument splits.
    """
    arguments: list[tuple[str | None, str]] = []
    key: str | None = None
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            arguments.append((key, "".join(current)))
            key, current = None, []
        elif char == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(char)
    arguments.append((key, "".join(current)))
    return arguments


def _port(text: str, description: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise InvalidEndpoint(
            f"{description!r} has port {text!r}; expected a port from 1 to 65535"
        )
    return int(text)


_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\[\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>.*)\Z")


def _host_port(text: str, description: str) -> TCPTarget:
    match = _HOST_PORT.match(text)
    if match is None:
        raise InvalidEndpoint(
            f"{description!r} is not HOST:PORT; write an IPv6 address in "
            "brackets, e.g. [::1]:10040"
        )
    host = match["v6"] or match["host"]
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidEndpoint(
                f"{description!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
    return TCPTarget(host, _port(match["port"], description))


def _unix(rest: str, description: str) -> UNIXTarget:
    path = ""
    for key, value in split_description(rest):
        # address= is the server form (POLICYD_LISTEN), path= the client form;
        # the other options matter only to whoever listens or connects.
        if (key is None and not path) or key in ("address", "path"):
            path = value
        elif key not in (
            "mode",
            "lockfile",
            "backlog",
            "wantPID",
            "timeout",
            "checkPID",
        ):
            raise InvalidEndpoint(
                f"{description!r}: unexpected {key or value!r}; expected unix:PATH"
            )
    if not path:
        raise InvalidEndpoint(f"{description!r} names no socket; expected unix:PATH")
    return UNIXTarget(path)


def _listening(family: str, rest: str, description: str) -> TCPTarget:
    """Where to connect to a server listening on Twisted ``tcp:PORT:...``."""
    port = interface = ""
    for key, value in split_description(rest):
        if (key is None and not port) or key == "port":
            port = value
        elif key == "interface":
            interface = value
        elif key != "backlog":
            raise InvalidEndpoint(
                f"{description!r}: unexpected {key or value!r}; expected "
                "tcp:PORT:interface=ADDRESS"
            )
    if port == "0":
        raise InvalidEndpoint(
            f"{description!r} listens on a port chosen at start-up; give "
            "--server with the port policyd logged"
        )
    number = _port(port, description)
    if not interface:
        interface = "::" if family == "tcp6" else "0.0.0.0"  # noqa: S104 - Twisted's default
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return TCPTarget(interface, number)  # a host name: connect to it
    if address.is_unspecified:
        # Listening on every address: the loopback one of the same family.
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return TCPTarget(str(address), number)


def parse_server(description: str) -> Target:
    """
    The target of ``--server``.

    Accepts client descriptions (``tcp:HOST:PORT``, ``tcp:host=H:port=P``,
    ``unix:PATH``), Postfix's own (``inet:HOST:PORT`` and ``local:PATH``, as
    in main.cf, though a relative path is relative to the current directory
    here, not to Postfix's queue directory), the
    shorthand ``HOST:PORT`` and ``[IPv6]:PORT``, a socket path starting with
    ``/``, and a server description as in ``POLICYD_LISTEN``
    (``tcp:10040:interface=127.0.0.1``, ``unix:/path:mode=660``).
    """
    scheme, colon, rest = description.partition(":")
    if description.startswith("/"):
        return UNIXTarget(description)
    if scheme in ("unix", "local") and colon:  # local: is Postfix's alias
        return _unix(rest, description)
    if scheme == "inet" and colon:
        return _host_port(rest, description)
    if scheme in ("tcp", "tcp6") and colon:
        if rest.startswith("["):
            return _host_port(rest, description)
        arguments = split_description(rest)
        keys = {key for key, _ in arguments}
        positional = [value for key, value in arguments if key is None]
        # A server description names one port and no host: the POLICYD_LISTEN
        # value, pasted.
        if keys & {"interface", "backlog"} or (
            "host" not in keys and len(positional) + ("port" in keys) == 1
        ):
            return _listening(scheme, rest, description)
        host = port = ""
        for key, value in arguments:
            if key == "host" or (key is None and not host and "host" not in keys):
                host = value
            elif key == "port" or (key is None and not port):
                port = value
            elif key not in ("timeout", "bindAddress"):
                raise InvalidEndpoint(
                    f"{description!r}: unexpected {key or value!r}; expected "
                    "tcp:HOST:PORT"
                )
        if not host:
            raise InvalidEndpoint(
                f"{description!r} names no host; expected tcp:HOST:PORT"
            )
        return TCPTarget(host, _port(port, description))
    if scheme in _UNSUPPORTED:
        raise InvalidEndpoint(
            f"{description!r}: policyd ask cannot connect to {scheme}: endpoints; "
            f"expected {SERVER_FORMS}"
        )
    return _host_port(description, description)


def listen_target(descriptions: Sequence[str], variable: str) -> Target:
    """
    Where to reach a server that listens on *descriptions* (``POLICYD_LISTEN``).

    The first endpoint that can be connected to from here: ``tcp:PORT``
    with its interface (the loopback address when it listens on all of
    them), or ``unix:PATH``.  A systemd socket is known only to systemd.
    """
    problems = []
    for description in descriptions:
        scheme, _, rest = description.partition(":")
        try:
            if scheme in ("tcp", "tcp6"):
                return _listening(scheme, rest, description)
            if scheme == "unix":
                return _unix(rest, description)
        except InvalidEndpoint as e:
            problems.append(str(e))
            continue
        if scheme == "systemd":
            problems.append(
                f"{description!r} is a socket only systemd knows; give --server "
                "with the ListenStream= of the socket unit"
            )
        else:
            problems.append(f"policyd ask cannot connect to {scheme}: endpoints")
    raise InvalidEndpoint(
        f"cannot tell where to ask from {variable}: " + "; ".join(problems)
    )


# -- the exchange ------------------------------------------------------------

# policyd's replies are a few hundred bytes (actions.MAX_ACTION_LENGTH).
MAX_REPLY = 4096


class AskFailed(Exception):
    """No usable reply; the message says what happened."""


def _show(data: bytes) -> str:
    text = repr(bytes(data[:80]))
    return text + ("..." if len(data) > 80 else "")


def _os_error(e: OSError) -> str:
    if e.errno == errno.ECONNREFUSED:
        return "connection refused (is policyd listening there?)"
    if e.errno == errno.ENOENT:
        return "no such socket (is policyd listening there?)"
    return (e.strerror or str(e)).lower() if e.errno is not None else str(e)


_MALFORMED = "malformed reply {reply}: expected action=... and an empty line"


def parse_reply(block: bytes) -> str:
    """The action of one reply, given without its empty line; or `AskFailed`."""
    if not block.startswith(b"action=") or b"\n" in block:
        raise AskFailed(_MALFORMED.format(reply=_show(block + _EMPTY_LINE)))
    action = block.removeprefix(b"action=")
    if not action.strip():
        raise AskFailed(
            "the reply has an empty action, which Postfix takes as OK (permit)"
        )
    if b"\r" in action or b"\0" in action:
        raise AskFailed(
            f"malformed reply {_show(block + _EMPTY_LINE)}: the action contains "
            "a CR or NUL, which Postfix would misread"
        )
    return decode(action)


_EMPTY_LINE = b"\n\n"

_CLOSED_WITHOUT_REPLY = (
    "the server closed the connection without a reply (policyd does that when "
    "it cannot use a request; its log says why, as a protocol_error event)"
)


def _read_reply(
    sock: socket.socket, remaining: Callable[[], float], timeout: float
) -> bytes:
    """Bytes up to and including the reply's empty line, and any after it."""
    buffer = b""
    while not (buffer.startswith(b"\n") or _EMPTY_LINE in buffer):
        if len(buffer) > MAX_REPLY:
            raise AskFailed(
                f"malformed reply {_show(buffer)}: no empty line within "
                f"{MAX_REPLY} bytes"
            )
        try:
            sock.settimeout(remaining())
            chunk = sock.recv(MAX_REPLY)
        except TimeoutError:
            if buffer:
                raise AskFailed(
                    f"no complete reply within {timeout:g}s, only {_show(buffer)}"
                ) from None
            raise AskFailed(f"no reply within {timeout:g}s") from None
        except ConnectionResetError:
            # A server that closes with part of the request unread resets
            # the connection: the same as a close, for the admin.
            chunk = b""
        if not chunk:
            if buffer:
                raise AskFailed(
                    "the server closed the connection in the middle of the reply "
                    + _show(buffer)
                )
            raise AskFailed(_CLOSED_WITHOUT_REPLY)
        buffer += chunk
    return buffer


def _countdown(deadline: float, clock: Callable[[], float]) -> Callable[[], float]:
    """Seconds left until *deadline*; `TimeoutError` once there are none."""

    def remaining() -> float:
        left = deadline - clock()
        if left <= 0:
            raise TimeoutError
        return left

    return remaining


def exchange(
    sock: socket.socket,
    request: bytes,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    deadline: float | None = None,
) -> str:
    """
    Send *request* on *sock* and return the action of the one reply.

    Everything ends by *deadline* (of *clock*; by default *timeout* seconds
    from now), however slowly the server trickles its bytes.  The reply must
    be exactly ``action=...`` and an empty line, with nothing after it: that
    is what policyd sends, and what Postfix reads without surprises
    (reference §1.5).
    """
    remaining = _countdown(clock() + timeout if deadline is None else deadline, clock)
    try:
        sock.settimeout(remaining())
        sock.sendall(request)
    except TimeoutError:
        raise AskFailed(f"could not send the request within {timeout:g}s") from None
    except (BrokenPipeError, ConnectionResetError):
        # policyd stops reading a request it cannot use, and closes.
        raise AskFailed(_CLOSED_WITHOUT_REPLY) from None
    except OSError as e:
        raise AskFailed(f"could not send the request: {_os_error(e)}") from None
    try:
        received = _read_reply(sock, remaining, timeout)
    except OSError as e:
        raise AskFailed(f"while waiting for the reply: {_os_error(e)}") from None
    if received.startswith(b"\n"):
        raise AskFailed("the reply is an empty line, without action=...")
    block, _, after = received.partition(_EMPTY_LINE)
    action = parse_reply(block)
    if after:
        raise AskFailed(
            f"the server sent more after its reply: {_show(after)}; Postfix "
            "would take that as a disconnect before its next request"
        )
    return action


def ask(
    target: Target,
    request: bytes,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """
    Connect to *target*, send *request*, return the action it answers.

    Connecting and the exchange together take at most *timeout* seconds,
    except for looking up a host name, which the system's resolver bounds.
    """
    deadline = clock() + timeout
    try:
        sock = target.connect(_countdown(deadline, clock))
    except TimeoutError:
        raise AskFailed(f"no connection within {timeout:g}s") from None
    except socket.gaierror as e:
        raise AskFailed(f"cannot resolve the host name: {e.strerror}") from None
    except OSError as e:
        raise AskFailed(_os_error(e)) from None
    with sock:
        return exchange(sock, request, timeout, clock, deadline)
