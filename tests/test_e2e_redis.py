"""
policyd processes on a real redis-server, and Redis failing under them.

Each test runs ``python -m policyd serve`` with ``POLICYD_BACKEND=redis``
against a redis-server of its own (`RedisServer`, on a loopback port), holds
the level at overload with two busy policy connections (capacity 2), and asks
on a third connection as smtpd would.  A clean client must get DUNNO and a
bot its refusal, decided for real: the decision timeout is set to 500 ms,
ten times the Redis deadline (50 ms), so a decision that waited on a dead or
paused Redis would get the fallback answer instead (DUNNO for the bot too)
and be counted in ``policyd_decision_failures_total``.

Then Redis is paused (SIGSTOP), killed, restarted empty, or absent at
start-up, and the same questions must get the same kind of answers, with the
outage logged once, counted in the backend metrics, and the shared state
back once Redis is.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from helpers import TYPICAL

from policyd.ask import encode_request, parse_reply
from policyd.testing.daemon import PolicydProcess
from policyd.testing.redis import RedisServer
from policyd.testing.system import free_port, wait_until

# A clean client (verified name, same HELO), as smtpd asks at RCPT.
CLEAN = {k: v for k, v in TYPICAL.items() if k != "instance"}
BOT = {
    **CLEAN,
    "client_address": "203.0.113.45",
    "client_name": "unknown",
    "reverse_client_name": "unknown",
    "helo_name": "user-pc",
}

SETTINGS = {
    "POLICYD_BACKEND": "redis",
    "POLICYD_SMTPD_CAPACITY": "2",
    "POLICYD_BUSY_WINDOW": "600s",
    "POLICYD_LEVEL_MIN_DWELL": "600s",
    "POLICYD_REDIS_DEADLINE": "50ms",
    "POLICYD_REDIS_TIMEOUT": "1s",
    "POLICYD_DECISION_TIMEOUT": "500ms",
    "POLICYD_LOG_LEVEL": "info",
}


class PolicyConnection:
    """One smtpd process's policy connection: a request, then its reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._buffer = b""
        self._instances = iter(range(1, 1_000_000))

    def ask(self, attributes: dict[str, str]) -> tuple[str, float]:
        """The action for *attributes* (in a new transaction) and the seconds taken."""
        request = {**attributes, "instance": f"e2e.{next(self._instances)}"}
        started = time.monotonic()
        self.sock.sendall(encode_request(request))
        while b"\n\n" not in self._buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("policyd closed the connection")
            self._buffer += chunk
        block, self._buffer = self._buffer.split(b"\n\n", 1)
        return parse_reply(block), time.monotonic() - started

    def close(self) -> None:
        """Hang up."""
        self.sock.close()


class Overloaded:
    """A policyd held at overload, and a connection to ask it on."""

    def __init__(self, policyd: PolicydProcess) -> None:
        self.policyd = policyd
        self.holders = [PolicyConnection(policyd.port) for _ in range(2)]
        for n, holder in enumerate(self.holders):
            holder.ask({**CLEAN, "client_address": f"198.51.100.{n + 1}"})
        self.smtpd = PolicyConnection(policyd.port)
        self.latencies: list[float] = []

    def ask(self, attributes: dict[str, str]) -> str:
        """Ask on the third connection; remember how long the answer took."""
        action, seconds = self.smtpd.ask(attributes)
        self.latencies.append(seconds)
        return action

    def check_decisions(self, rounds: int = 5) -> None:
        """Clean clients pass and the bot is refused, for real, *rounds* times."""
        for _ in range(rounds):
            assert self.ask(CLEAN) == "DUNNO"
            refusal = self.ask(BOT)
            assert refusal.startswith(("421", "521")), refusal
            assert "no_client_name" in refusal
        assert self.policyd.metric("policyd_decision_failures_total") in (None, 0)

    def metric(self, name: str, **labels: str) -> float | None:
        """One metric of the policyd."""
        return self.policyd.metric(name, labels)

    def close(self) -> None:
        """Hang up every connection."""
        for connection in [*self.holders, self.smtpd]:
            connection.close()


@pytest.fixture
def redis(own_redis_server: RedisServer) -> RedisServer:
    """The test's own redis-server."""
    return own_redis_server


def run(redis_url: str, **extra: str) -> PolicydProcess:
    """A policyd on *redis_url*, started (listening)."""
    return PolicydProcess({**SETTINGS, "POLICYD_REDIS_URL": redis_url, **extra})


@pytest.fixture
def overloaded(redis: RedisServer) -> Iterator[Overloaded]:
    """A policyd on the test's Redis, at overload, Redis reachable."""
    with run(redis.tcp_url) as policyd:
        policyd.wait_for_event("backend_connected")
        state = Overloaded(policyd)
        yield state
        state.close()


def backend_up(state: Overloaded) -> float | None:
    """policyd_backend_up of the Redis backend."""
    return state.metric("policyd_backend_up", backend="redis")


class TestRedisFailing:
    """Redis fails under a policyd at overload: answers stay real and in time."""

    def test_healthy(self, overloaded: Overloaded, redis: RedisServer) -> None:
        """With Redis up, refusals are written to it and nothing falls back."""
        overloaded.check_decisions()
        assert backend_up(overloaded) == 1
        assert overloaded.metric("policyd_backend_fallbacks_total") == 0
        wait_until(
            lambda: redis.command("EXISTS", "policyd:c:203.0.113.45") == 1,
            what="the bot's record in Redis",
        )

    def test_paused(self, overloaded: Overloaded, redis: RedisServer) -> None:
        """
        A paused Redis (SIGSTOP) is not waited for beyond the deadline.

        The outage is logged once, counted, and ends when Redis resumes.
        """
        overloaded.check_decisions(1)
        redis.pause()
        try:
            overloaded.check_decisions()
            assert backend_up(overloaded) == 0
            fallbacks = overloaded.metric("policyd_backend_fallbacks_total")
            assert fallbacks is not None
            assert fallbacks >= 1
        finally:
            redis.resume()
        policyd = overloaded.policyd
        policyd.wait_for_event("backend_up", timeout=15)
        wait_until(lambda: backend_up(overloaded) == 1, what="backend up")
        overloaded.check_decisions(1)
        assert len(policyd.snapshot(lambda e: e.get("event") == "backend_down")) == 1

    def test_killed_and_restarted_empty(
        self, overloaded: Overloaded, redis: RedisServer
    ) -> None:
        """
        Redis killed: answers go on from the local view.

        Restarted empty, it gets back what this policyd knows, refusals made
        meanwhile included.
        """
        overloaded.check_decisions(1)
        redis.kill()
        overloaded.check_decisions()
        policyd = overloaded.policyd
        policyd.wait_for_event("backend_down")
        assert backend_up(overloaded) == 0
        overloaded.ask({**BOT, "client_address": "203.0.113.99"})
        redis.start()
        policyd.wait_for_event("backend_resync", timeout=40)
        wait_until(
            lambda: redis.command("EXISTS", "policyd:c:203.0.113.99") == 1,
            what="the refusal made during the outage, in Redis",
        )
        assert redis.command("EXISTS", "policyd:c:203.0.113.45") == 1
        errors = overloaded.metric("policyd_backend_errors_total", reason="lost")
        assert errors == 1

    def test_unreachable_at_start(self) -> None:
        """No Redis at start-up: policyd listens and decides anyway; connects later."""
        port = free_port()
        with run(f"redis://127.0.0.1:{port}/0") as policyd:
            down = policyd.wait_for_event("backend_down")
            assert "cannot reach Redis" in down["reason"]
            state = Overloaded(policyd)
            try:
                state.check_decisions()
                assert backend_up(state) == 0
                server = RedisServer()
                server.port = port
                with server:
                    policyd.wait_for_event("backend_up", timeout=40)
                    assert backend_up(state) == 1
                    state.check_decisions(1)
            finally:
                state.close()


class TestTwoPolicyd:
    """Two policyd (two MX hosts) on one Redis share what they know of clients."""

    def test_refused_on_one_is_a_quick_retry_on_the_other(
        self, redis: RedisServer
    ) -> None:
        """A bot refused by MX1's policyd is scored as a quick retry by MX2's."""
        with run(redis.tcp_url) as mx1, run(redis.tcp_url) as mx2:
            for policyd in (mx1, mx2):
                policyd.wait_for_event("backend_connected")
            first, second = Overloaded(mx1), Overloaded(mx2)
            try:
                refusal = first.ask(BOT)
                assert "quick_retry" not in refusal
                wait_until(
                    lambda: (
                        redis.command("HEXISTS", "policyd:c:203.0.113.45", "ra") == 1
                    ),
                    what="MX1's refusal in Redis",
                )
                retry = second.ask(BOT)
                assert "quick_retry" in retry, retry
                # A client MX1 never refused is not a quick retry on MX2.
                other = second.ask({**BOT, "client_address": "203.0.113.46"})
                assert "quick_retry" not in other
            finally:
                first.close()
                second.close()


def promoted(server: RedisServer) -> bool:
    """Whether *server* is a master now (Sentinel drops its clients meanwhile)."""
    try:
        return bool(server.command("ROLE")[0] == b"master")
    except OSError:
        return False


def has_key(server: RedisServer, key: str) -> bool:
    """Whether *server* holds *key* (False while it drops connections)."""
    try:
        return bool(server.command("EXISTS", key) == 1)
    except OSError:
        return False


class TestSentinel:
    """Redis behind Sentinel: policyd follows a failover to the new master."""

    def test_failover(self) -> None:
        """
        The master dies; Sentinel promotes the replica; policyd goes on.

        Decisions stay real throughout; once Sentinel names the new master,
        policyd connects to it and writes refusals there.
        """
        with (
            RedisServer() as master,
            RedisServer(replica_of=master) as replica,
            RedisServer(sentinel_for=master) as sentinel,
        ):
            url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster"
            with run(url) as policyd:
                connected = policyd.wait_for_event("backend_connected")
                assert f":{master.port}" in connected["master"]
                state = Overloaded(policyd)
                try:
                    state.check_decisions(1)
                    master.kill()
                    state.check_decisions()
                    policyd.wait_for_event("backend_down")
                    wait_until(
                        lambda: promoted(replica),
                        timeout=30,
                        what="Sentinel to promote the replica",
                    )
                    policyd.wait_for_event("backend_up", timeout=40)
                    state.ask({**BOT, "client_address": "203.0.113.98"})
                    wait_until(
                        lambda: has_key(replica, "policyd:c:203.0.113.98"),
                        what="a refusal written to the new master",
                    )
                finally:
                    state.close()
