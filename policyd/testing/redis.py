"""
A private redis-server for tests, and a blocking way to talk to it.

`RedisServer` runs Debian's ``redis-server`` as a child process on a unix
socket in a temporary directory and a loopback TCP port, without persistence,
so that a restart comes back empty.  It can be killed, paused (SIGSTOP),
resumed and restarted, for the fault tests.  ``tests/run`` installs the
package; without it `RedisServer` raises `Unavailable`.

`BlockingEndpoint` connects a protocol to it over a blocking socket: every
command's reply is read before ``write`` returns, so a `RedisProtocol` (and
the tracker above it) can be driven by a `Clock` in a unit test and still
talk to the real server.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from policyd.resp import RedisProtocol, RedisURL, _parse, encode
from policyd.testing.system import (
    Unavailable,
    find_program,
    free_port,
    wait_until,
)

__all__ = ["BlockingEndpoint", "RedisServer"]


def _die_with_parent() -> None:
    """In the child: be killed when the process that started us dies (Linux).

    A test run that is killed (a timeout, ^C twice) then leaves no
    redis-server behind.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


_PR_SET_PDEATHSIG = 1


class RedisServer:
    """
    A redis-server child process on a unix socket and a loopback port.

    Started by `start` (or on entering the context manager); stopped, and its
    directory removed, on exit.
    """

    def __init__(
        self,
        *,
        replica_of: RedisServer | None = None,
        sentinel_for: RedisServer | None = None,
        service: str = "mymaster",
        config: Path | None = None,
    ) -> None:
        """
        A plain server, a replica, or a Sentinel.

        With *replica_of*, a replica of that server; with *sentinel_for*, a
        Sentinel watching that server as master *service* (quorum 1, a
        master down after 1 s, failovers 3 s apart).  With *config*, a
        server reads that redis.conf first; this server's addresses,
        directory and no persistence override it.
        """
        self.config = config
        self.replica_of = replica_of
        self.sentinel_for = sentinel_for
        self.service = service
        program = find_program("redis-server")
        if program is None:
            raise Unavailable(
                "redis-server is not installed (Debian's redis-server package; "
                "tests/run installs it)"
            )
        self.program = program
        self._dir = tempfile.TemporaryDirectory(prefix="policyd-redis-")
        self.socket = Path(self._dir.name) / "redis.sock"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> RedisURL:
        """The unix-socket URL of this server."""
        return RedisURL("unix", path=str(self.socket))

    @property
    def tcp_url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, as POLICYD_REDIS_URL takes it."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (empty) and wait until it answers PING."""
        if self.socket.exists():
            self.socket.unlink()
        if self.sentinel_for is not None:
            config = Path(self._dir.name) / "sentinel.conf"
            master = self.sentinel_for
            config.write_text(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                f"dir {self._dir.name}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {master.port} 1\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 3000\n"
            )
            argv = [self.program, str(config), "--sentinel"]
        else:
            argv = self._server_argv()
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        wait_until(self._answers, what="redis-server to answer PING")

    def _server_argv(self) -> list[str]:
        replica = (
            ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
            if self.replica_of is not None
            else []
        )
        return [
            self.program,
            *([str(self.config)] if self.config is not None else []),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            *replica,
        ]

    def _answers(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError("redis-server exited at start-up")
        try:
            return bool(self.command("PING") == b"PONG")
        except OSError:
            return False

    def command(self, *args: bytes | str | int | float) -> Any:
        """Run one command on a fresh connection; its reply (errors raised)."""
        sentinel = self.sentinel_for is not None
        family = socket.AF_INET if sentinel else socket.AF_UNIX
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(("127.0.0.1", self.port) if sentinel else str(self.socket))
            sock.sendall(encode(args))
            buffer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("redis-server closed the connection")
                buffer += chunk
                try:
                    reply, _ = _parse(buffer, 0)
                except Exception as e:
                    if type(e).__name__ == "_Incomplete":
                        continue
                    raise
                if isinstance(reply, Exception):
                    raise reply
                return reply

    def kill(self) -> None:
        """Kill the server at once (SIGKILL): connections drop, data is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """Stop the server (SIGSTOP): connections stay open, nothing answers."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT)."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Kill the server and start it again, empty, on the same addresses."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Stop the server if it runs (resuming it first if paused)."""
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        self._dir.cleanup()


class _BlockingTransport:
    """A transport that reads the replies to what it writes before returning."""

    disconnecting = False

    def __init__(self, sock: socket.socket, protocol: RedisProtocol) -> None:
        self.sock = sock
        self.protocol = protocol
        self._reading = False

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return
        self.sock.sendall(data)
        if self._reading:
            # A reply's callback sent this: the outer read loop gets its
            # reply too (the protocol is not re-entered).
            return
        self._reading = True
        try:
            while self.protocol.pending and not self.disconnecting:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    self._lost(Failure(ConnectionLost("redis-server went away")))
                    return
                self.protocol.dataReceived(chunk)
        finally:
            self._reading = False

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self._lost(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self._lost(Failure(ConnectionLost()))

    def _lost(self, reason: Failure) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        self.sock.close()
        self.protocol.connectionLost(reason)

    def getPeer(self) -> UNIXAddress:
        return UNIXAddress(None)

    def getHost(self) -> UNIXAddress:
        return UNIXAddress(None)


@implementer(IStreamClientEndpoint)
class BlockingEndpoint:
    """A client endpoint to a unix socket whose transport blocks on replies."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        #: Every transport made, so that a test can close them all.
        self.transports: list[_BlockingTransport] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Connect at once (or fail at once); the protocol must be a RedisProtocol."""
        protocol = cast(Any, factory.buildProtocol(UNIXAddress(self.path)))
        if not isinstance(protocol, RedisProtocol):
            raise TypeError("BlockingEndpoint serves RedisProtocol only")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        transport = _BlockingTransport(sock, protocol)
        self.transports.append(transport)
        protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
        return succeed(protocol)

    def close(self) -> None:
        """Close every connection made."""
        for transport in self.transports:
            transport.loseConnection()
