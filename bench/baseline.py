r"""The benchmark baseline: a bare Twisted policy server that answers DUNNO.

This is what the performance targets mean by "bare Twisted DUNNO server": a
``LineOnlyReceiver`` with ``delimiter = b"\n"`` that collects the attribute
lines of one request until the empty line and then answers ``action=DUNNO\n\n``
in one write.  Connections are persistent, as Postfix expects; the server never
closes one itself.  It does no parsing beyond line framing, so the difference
between it and policyd is the cost of policyd's own work.

Run it as ``python bench/baseline.py --port N`` (``--port 0`` picks a free
port).  It listens on 127.0.0.1, prints ``baseline listening on
127.0.0.1:PORT`` once it is listening, and exits on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

# The transport is Optional[ITransport] and the global reactor a module to mypy;
# both are bound to Any locals, so the baseline pays for no per-request checks.

DUNNO_REPLY = b"action=DUNNO\n\n"


class DunnoProtocol(LineOnlyReceiver):
    """Collect one request's lines; answer ``action=DUNNO`` on the empty line."""

    delimiter = b"\n"
    MAX_LENGTH = 16384

    def __init__(self) -> None:
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        """Keep attribute lines; the empty line ends the request."""
        if line:
            self._lines.append(line)
            return
        self._lines = []
        transport: Any = self.transport
        transport.write(DUNNO_REPLY)

    def lineLengthExceeded(self, line: bytes) -> None:
        """Drop the connection without a reply, as the protocol asks on errors."""
        transport: Any = self.transport
        transport.loseConnection()


def main(argv: list[str] | None = None) -> int:
    """Listen on 127.0.0.1 and serve until SIGTERM/SIGINT stops the reactor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any)")
    parser.add_argument(
        "--backlog",
        type=int,
        default=50,
        help="listen backlog (Twisted's default is 50)",
    )
    args = parser.parse_args(argv)

    # Import the reactor only here, at the entry point (house style); this
    # installs the platform default (epoll on Linux), as policyd's own CLI does.
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    factory = Factory.forProtocol(DunnoProtocol)
    port: Any = reactor.listenTCP(
        args.port, factory, backlog=args.backlog, interface="127.0.0.1"
    )
    print(f"baseline listening on 127.0.0.1:{port.getHost().port}", flush=True)
    # reactor.run() installs SIGINT/SIGTERM handlers that stop the reactor.
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
