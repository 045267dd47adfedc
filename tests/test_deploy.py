"""
The deploy/ examples load as policyd reads them, and fit together.

Every environment file is read the way systemd's ``EnvironmentFile=`` and
``/bin/sh`` read it, then through `policyd.config.load`; its commented
alternatives (``#POLICYD_...=``) must load too.  The several-MX examples of
docs/cluster.md are checked against each other: the Postfix snippets reach
the policyd the environment files set up, and the two policyd of deployment
(a) share a refusal through a real redis-server that reads
``deploy/cluster/redis.conf``, as the ACL user their URL names.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from helpers import sourced_by_sh
from load_contract import CLIENT, START, Smtpd, request
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from policyd import config
from policyd.load import MemoryLoadTracker
from policyd.request import PolicyRequest
from policyd.resp import RedisError, RedisURL, _Incomplete, _parse, encode
from policyd.server import PolicyServer, host_of, load_settings
from policyd.shared import RedisLoadTracker, RedisSettings
from policyd.testing.redis import BlockingEndpoint, RedisServer
from policyd.testing.system import Unavailable

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CLUSTER = DEPLOY / "cluster"
ENV_FILES = sorted(DEPLOY.rglob("*.env"))
REDIS_ENV = CLUSTER / "policyd-redis.env"
CENTRAL_ENV = CLUSTER / "central.env"
CENTRAL_CF = CLUSTER / "main-central.cf"
REDIS_CONF = CLUSTER / "redis.conf"
DROP_IN = DEPLOY / "systemd" / "policyd.service.d" / "redis.conf"

TIMEOUT = 30

# The part of the value syntax that systemd's EnvironmentFile= and /bin/sh
# (docs/operations.md: `set -a; . /etc/default/policyd`) read alike: a bare
# word without shell or quoting characters, or a double-quoted text without
# anything either would expand or unescape.
_BARE = r"[A-Za-z0-9_@%+=:,./?-]*"
_QUOTED = r'"[^"$`\\]*"'
_ASSIGNMENT = re.compile(rf"(POLICYD_[A-Z0-9_]+)=({_BARE}|{_QUOTED})\Z")


@attrs.frozen
class EnvFile:
    """An environment file's settings and its commented alternatives."""

    settings: dict[str, str]
    alternatives: list[tuple[str, str]]

    def load(self, *extra: tuple[str, str]) -> config.Config:
        """The configuration of the settings, with *extra* ones on top."""
        return config.load({**self.settings, **dict(extra)})

    def alternative(self, *names: str) -> list[tuple[str, str]]:
        """The commented alternatives that set one of *names*."""
        return [(n, v) for n, v in self.alternatives if n in names]


def _assignment(path: Path, number: int, line: str) -> tuple[str, str]:
    match = _ASSIGNMENT.match(line)
    assert match, (
        f"{path.name}:{number}: {line!r} is not NAME=VALUE in the syntax that "
        "systemd and /bin/sh read alike"
    )
    name, value = match.groups()
    return name, value[1:-1] if value.startswith('"') else value


def read_env(path: Path) -> EnvFile:
    """Read *path* as systemd would; fail on a line it might read otherwise."""
    settings: dict[str, str] = {}
    alternatives = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#POLICYD_"):
            alternatives.append(_assignment(path, number, line[1:]))
        elif not line.startswith("#"):
            name, value = _assignment(path, number, line)
            assert name not in settings, f"{path.name}:{number}: {name} set twice"
            settings[name] = value
    return EnvFile(settings, alternatives)


def policy_services(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Every ``check_policy_service { ... }`` in *path*, commented or not."""
    found = []
    for inside in re.findall(r"check_policy_service \{([^}]*)\}", path.read_text()):
        endpoint, *settings = (part.strip() for part in inside.split(","))
        found.append((endpoint, dict(s.split("=", 1) for s in settings)))
    return found


def inet_endpoint(description: str) -> tuple[str, int]:
    """The address and port a ``tcp:PORT:interface=ADDRESS`` listener binds."""
    port, *options = description.removeprefix("tcp:").split(":")
    interface = dict(option.split("=", 1) for option in options)["interface"]
    return interface, int(port)


class TestEnvFiles:
    """Every deploy/**/*.env file is one that policyd and the shell read alike."""

    def test_found(self) -> None:
        """The files of both several-MX deployments are among them."""
        assert {REDIS_ENV, CENTRAL_ENV} <= set(ENV_FILES)

    @pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
    def test_loads(self, path: Path) -> None:
        """Its settings load, and every name is one policyd knows."""
        env = read_env(path)
        env.load()
        names = {*env.settings, *(name for name, _ in env.alternatives)}
        assert config.unknown_variables(dict.fromkeys(names, "")) == []

    @pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
    def test_alternatives_load(self, path: Path) -> None:
        """Each commented alternative, uncommented, loads on top of the settings."""
        env = read_env(path)
        for alternative in env.alternatives:
            env.load(alternative)

    @pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
    def test_sourced_by_sh(self, path: Path, tmp_path: Path) -> None:
        """
        ``set -a; . FILE`` in /bin/sh gives every variable the same value.

        The alternatives too: the file is sourced with them uncommented (the
        last assignment of a name wins, in the shell as in systemd).
        """
        uncommented = tmp_path / path.name
        uncommented.write_text(path.read_text().replace("\n#POLICYD_", "\nPOLICYD_"))
        expected: dict[str, str] = {}
        for number, line in enumerate(uncommented.read_text().splitlines(), 1):
            if line.startswith("POLICYD_"):
                name, value = _assignment(path, number, line)
                expected[name] = value
        assert expected, f"{path.name} sets nothing"
        assert sourced_by_sh(uncommented, sorted(expected), tmp_path) == expected


class TestOnePolicydPerMx:
    """Deployment (a): policyd-redis.env, deploy/postfix/main.cf, redis.conf."""

    def test_shares_in_redis(self) -> None:
        """Client state goes to Redis; Postfix asks on loopback only."""
        cfg = read_env(REDIS_ENV).load()
        assert cfg.backend == "redis"
        assert cfg.redis_url.scheme == "redis"
        for description in cfg.listen:
            address, _ = inet_endpoint(description)
            assert ipaddress.ip_address(address).is_loopback

    def test_agreed_settings_written_out(self) -> None:
        """What all policyd on one prefix must agree on is set, not left implicit."""
        settings = read_env(REDIS_ENV).settings
        for name in (
            "POLICYD_REDIS_PREFIX",
            "POLICYD_CLIENT_RATE_WINDOW",
            "POLICYD_HOLD_WINDOW",
            "POLICYD_CLIENT_IPV4_PREFIX",
            "POLICYD_CLIENT_IPV6_PREFIX",
        ):
            assert name in settings

    def test_postfix_snippet_reaches_it(self) -> None:
        """deploy/postfix/main.cf, unchanged, asks where the env file listens."""
        (listen,) = read_env(REDIS_ENV).load().listen
        address, port = inet_endpoint(listen)
        services = policy_services(DEPLOY / "postfix" / "main.cf")
        assert [endpoint for endpoint, _ in services] == [f"inet:{address}:{port}"]

    def test_logs_in_as_the_acl_user(self) -> None:
        """The URL's user and password are redis.conf's policyd user, on its keys."""
        cfg = read_env(REDIS_ENV).load()
        user = redis_user(cfg.redis_url.username or "")
        assert f">{cfg.redis_url.password}" in user
        assert f"~{cfg.redis_prefix}*" in user


def redis_user(name: str) -> list[str]:
    """The rules of the ``user NAME ...`` line of redis.conf."""
    for line in REDIS_CONF.read_text().splitlines():
        words = line.split()
        if words[:2] == ["user", name]:
            return words[2:]
    raise AssertionError(f"redis.conf has no user {name!r}")


def redis_setting(name: str) -> str:
    """The value of setting *name* in redis.conf."""
    for line in REDIS_CONF.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return value
    raise AssertionError(f"redis.conf does not set {name}")


def redis_session(path: Path, *commands: tuple[Any, ...]) -> list[Any]:
    """Send *commands* on one connection to *path*; their replies, errors as values."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"".join(encode(command) for command in commands))
        buffer = b""
        replies: list[Any] = []
        while len(replies) < len(commands):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            buffer += chunk
            while len(replies) < len(commands):
                try:
                    reply, end = _parse(buffer, 0)
                except _Incomplete:
                    break
                replies.append(reply)
                buffer = buffer[end:]
        return replies


class ConfiguredRedis(RedisServer):
    """A private redis-server that reads deploy/cluster/redis.conf."""

    def __init__(self) -> None:
        """On this test's socket and port (the file's are examples)."""
        super().__init__(config=REDIS_CONF)

    def command(self, *args: bytes | str | int | float) -> Any:
        """Run one command as the default user (redis.conf's requirepass)."""
        _, reply = redis_session(
            self.socket, ("AUTH", redis_setting("requirepass")), args
        )
        if isinstance(reply, Exception):
            raise reply
        return reply


@pytest.fixture
def configured_redis() -> Iterator[ConfiguredRedis]:
    """A redis-server configured by deploy/cluster/redis.conf."""
    try:
        server = ConfiguredRedis()
    except Unavailable as e:
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true but redis-server is unavailable: {e}")
        pytest.skip(f"redis-server unavailable: {e}")
    with server:
        yield server


@pytest.fixture
def endpoints() -> Iterator[list[BlockingEndpoint]]:
    """Connections to a test's redis-server, closed at the end."""
    made: list[BlockingEndpoint] = []
    yield made
    for endpoint in made:
        endpoint.close()


def policyd_on(
    server: RedisServer,
    cfg: config.Config,
    endpoints: list[BlockingEndpoint],
    url: RedisURL | None = None,
) -> Smtpd:
    """A started Redis tracker as *cfg* sets it up, on *server* (as *url*)."""
    clock = Clock()
    clock.advance(START)
    endpoint = BlockingEndpoint(server.socket)
    endpoints.append(endpoint)
    tracker = RedisLoadTracker(
        clock,
        load_settings(cfg),
        RedisSettings(url=url or cfg.redis_url, prefix=cfg.redis_prefix),
        endpoint=endpoint,
    )
    tracker.start()
    assert tracker.state == "up"
    return Smtpd(tracker, clock)


def assert_no_errors(*policyd: Smtpd) -> None:
    """Redis answered every command of every one of *policyd*."""
    for each in policyd:
        assert isinstance(each.tracker, RedisLoadTracker)
        assert each.tracker.state == "up"
        assert dict(each.tracker.backend().errors) == dict.fromkeys(
            ("connect", "timeout", "lost", "error"), 0
        )


class TestRedisConf:
    """deploy/cluster/redis.conf, read by a real redis-server."""

    def test_settings_apply(self, configured_redis: ConfiguredRedis) -> None:
        """Redis reads the file: no persistence, bounded memory, evicting by TTL."""
        assert configured_redis.command("CONFIG", "GET", "save") == [b"save", b""]
        assert configured_redis.command("CONFIG", "GET", "appendonly") == [
            b"appendonly",
            b"no",
        ]
        assert configured_redis.command("CONFIG", "GET", "maxmemory-policy") == [
            b"maxmemory-policy",
            b"volatile-ttl",
        ]
        assert int(configured_redis.command("CONFIG", "GET", "maxmemory")[1]) > 0

    def test_two_policyd_share_a_refusal(
        self, configured_redis: ConfiguredRedis, endpoints: list[BlockingEndpoint]
    ) -> None:
        """
        Two policyd set up by policyd-redis.env share a refusal as the ACL user.

        Each logs in with the URL's user and password, loads its scripts,
        reads the epoch and TIME, and runs the update script: every command
        it sends, and every command its scripts call, is one the user may
        run.  A database other than 0 (SELECT) works too.
        """
        cfg = read_env(REDIS_ENV).load()
        for url in (cfg.redis_url, attrs.evolve(cfg.redis_url, db=1)):
            mx1, mx2 = (
                policyd_on(configured_redis, cfg, endpoints, url) for _ in range(2)
            )
            mx1.refuse()
            for host in (mx1, mx2):
                host.wait(3)
            assert mx2.stats().since_refusal == pytest.approx(3.0, abs=0.1)
            assert_no_errors(mx1, mx2)

    def test_two_central_policyd_add_up_a_host(
        self, configured_redis: ConfiguredRedis, endpoints: list[BlockingEndpoint]
    ) -> None:
        """
        Two central policyd on Redis (central.env's alternative) add up an MX's load.

        Each serves part of one MX's smtpd processes and, as the ACL user,
        runs the script that shares each named host's load: each then counts
        the processes of both.
        """
        env = read_env(CENTRAL_ENV)
        cfg = env.load(*env.alternative("POLICYD_BACKEND", "POLICYD_REDIS_URL"))
        assert cfg.backend == "redis"
        host = cfg.host_capacities[0][0]
        first, second = (policyd_on(configured_redis, cfg, endpoints) for _ in range(2))
        for policyd, busy in ((first, 3), (second, 4)):
            for number in range(busy):
                connection = 100 + number
                policyd.tracker.connection_opened(connection, host)
                policyd.ask(connection, f"198.51.100.{number + 1}")
        for _ in range(2):
            for policyd in (first, second):
                policyd.wait(1)
        for policyd in (first, second):
            assert policyd.tracker.snapshot(host).busy_connections == 3 + 4
        assert_no_errors(first, second)

    def test_policyd_user_may_do_nothing_else(
        self, configured_redis: ConfiguredRedis
    ) -> None:
        """The policyd user cannot flush, configure, EVAL, or touch other keys."""
        cfg = read_env(REDIS_ENV).load()
        login = ("AUTH", cfg.redis_url.username, cfg.redis_url.password)
        refused = [
            ("FLUSHALL",),
            ("CONFIG", "GET", "maxmemory"),
            ("EVAL", "return 1", "0"),
            ("KEYS", "*"),
            ("GET", "other:key"),
            ("SET", "other:key", "1"),
        ]
        logged_in, *replies = redis_session(configured_redis.socket, login, *refused)
        assert logged_in == b"OK"
        for command, reply in zip(refused, replies, strict=True):
            assert isinstance(reply, RedisError), command
            assert reply.kind == "NOPERM", command

    def test_no_password_no_entry(self, configured_redis: ConfiguredRedis) -> None:
        """Without a password, Redis answers nothing but the demand for one."""
        (reply,) = redis_session(configured_redis.socket, ("GET", "policyd:epoch"))
        assert isinstance(reply, RedisError)
        assert reply.kind == "NOAUTH"


def _context_request(connection: int, context: str) -> PolicyRequest:
    return PolicyRequest.from_attributes(
        {
            "request": "smtpd_access_policy",
            "protocol_state": "RCPT",
            "client_address": CLIENT,
            "policy_context": context,
        },
        connection,
    )


class TestCentralPolicyd:
    """Deployment (b): central.env and deploy/cluster/main-central.cf."""

    def test_listens_for_the_mx_hosts(self) -> None:
        """It listens beyond loopback and admits the MX hosts, nobody else."""
        cfg = read_env(CENTRAL_ENV).load()
        (listen,) = cfg.listen
        address, _ = inet_endpoint(listen)
        assert not ipaddress.ip_address(address).is_loopback
        factory = PolicyServer(cfg, MemoryReactorClock(), CollectorRegistry()).factory
        for host, _ in cfg.host_capacities:
            assert factory.peer_allowed(IPv4Address("TCP", host, 40000))
        assert not factory.peer_allowed(IPv4Address("TCP", "198.51.100.1", 40000))
        assert not factory.peer_allowed(IPv6Address("TCP", "2001:db8::1", 40000))

    def test_memory_is_enough(self) -> None:
        """One central policyd keeps clients in its own memory."""
        assert read_env(CENTRAL_ENV).load().backend == "memory"

    def test_each_mx_has_its_capacity(self) -> None:
        """A connection from each MX's address is that host, with its process limit."""
        cfg = read_env(CENTRAL_ENV).load()
        assert cfg.host_from == "peer"
        tracker = MemoryLoadTracker(Clock(), load_settings(cfg))
        for number, (host, capacity) in enumerate(cfg.host_capacities, 1):
            tracker.connection_opened(
                number, host_of(IPv4Address("TCP", host, 40000 + number))
            )
            tracker.observe(request(number))
            assert tracker.snapshot(host).capacity == capacity

    def test_policy_context_alternative(self) -> None:
        """
        The commented policy_context form names the hosts main-central.cf names.

        Every ``policy_context=`` in main-central.cf is a host of the
        commented POLICYD_HOST_CAPACITIES, and a connection that sends it is
        that host, with that process limit.
        """
        env = read_env(CENTRAL_ENV)
        cfg = env.load(*env.alternative("POLICYD_HOST_FROM", "POLICYD_HOST_CAPACITIES"))
        assert cfg.host_from == "policy_context"
        capacities = dict(cfg.host_capacities)
        contexts = [
            settings["policy_context"]
            for _, settings in policy_services(CENTRAL_CF)
            if "policy_context" in settings
        ]
        assert sorted(contexts) == sorted(capacities)
        tracker = MemoryLoadTracker(Clock(), load_settings(cfg))
        for number, context in enumerate(contexts, 1):
            tracker.connection_opened(number, "192.0.2.99")
            tracker.observe(_context_request(number, context))
            assert tracker.snapshot(context).capacity == capacities[context]

    def test_postfix_snippet_reaches_it(self) -> None:
        """Every check_policy_service in main-central.cf asks it, and fails open."""
        (listen,) = read_env(CENTRAL_ENV).load().listen
        address, port = inet_endpoint(listen)
        services = policy_services(CENTRAL_CF)
        assert services
        for endpoint, settings in services:
            assert endpoint == f"inet:{address}:{port}"
            assert settings["default_action"] == "DUNNO"
            assert "timeout" in settings


class TestSystemdDropIn:
    """deploy/systemd/policyd.service.d/redis.conf."""

    def test_extends_the_unit(self) -> None:
        """It is a drop-in directory of a unit shipped beside it."""
        unit = DROP_IN.parent.name.removesuffix(".d")
        assert (DROP_IN.parent.parent / unit).is_file()

    def test_orders_after_redis(self) -> None:
        """Its only section starts policyd after Redis, and wants Redis started."""
        sections: dict[str, list[str]] = {}
        section = ""
        for line in DROP_IN.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            if line.startswith("["):
                section = line
                sections[section] = []
            else:
                sections[section].append(line)
        assert sections == {
            "[Unit]": ["Wants=redis-server.service", "After=redis-server.service"]
        }


class TestClusterDocExamples:
    """What docs/cluster.md shows is what deploy/cluster/ holds."""

    def test_examples_are_deploy_lines(self) -> None:
        """Every setting, check_policy_service and ACL line it shows is in a file."""
        lines = {
            line.lstrip("#").strip()
            for path in CLUSTER.iterdir()
            for line in path.read_text().splitlines()
        }
        doc = (ROOT / "docs" / "cluster.md").read_text()
        shown = [
            line.strip()
            for block in re.findall(r"^ *```\n(.*?)^ *```", doc, flags=re.M | re.S)
            for line in block.splitlines()
            if line.strip().startswith(("POLICYD_", "check_policy_service", "user "))
        ]
        assert len(shown) >= 10
        for line in shown:
            assert line in lines, f"docs/cluster.md shows {line!r}, deploy/ does not"
