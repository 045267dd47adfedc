"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import attrs
import pytest

from policyd.testing.bed import Bed
from policyd.testing.daemon import PolicydProcess
from policyd.testing.netns import NetworkNamespace, find_ip
from policyd.testing.postfix import (
    PostfixConfig,
    PostfixInstance,
    PostfixTools,
    find_postfix,
)
from policyd.testing.redis import RedisServer
from policyd.testing.system import Unavailable, free_port

# --------------------------------------------------------------------------
# Real-Postfix end-to-end fixtures (policyd.testing)
# --------------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def postfix_tools() -> PostfixTools:
    """
    The Postfix programs (tests/run installs Debian's postfix, as root).

    Without them (or without root) the end-to-end tests are skipped, except
    under ``CI=true``, where they must run and a missing prerequisite fails.
    """
    try:
        return find_postfix()
    except Unavailable as e:
        if _in_ci():
            pytest.fail(f"CI=true but the Postfix test bed is unavailable: {e}")
        pytest.skip(f"Postfix test bed unavailable: {e}")


@pytest.fixture(scope="module")
def postfix_config() -> PostfixConfig:
    """
    The configuration of the module's Postfix instance.

    Override in a test module for other listeners, process limits or
    restriction lists.  The policy port is a placeholder: the `postfix_bed`
    fixture points the instance at each test's own policyd.
    """
    return PostfixConfig(policy_port=free_port())


@pytest.fixture(scope="module")
def network_namespace(postfix_tools: PostfixTools) -> Iterator[NetworkNamespace]:
    """
    A private network namespace joined to this one by a veth pair.

    It needs root and ip(8) (tests/run installs Debian's iproute2, as root).
    Without them, or where namespaces cannot be created, the test is
    skipped, except under ``CI=true``, where it fails.  The namespace, the
    veth pair and whatever still runs inside are removed at the end of the
    module.
    """
    try:
        ip = find_ip()
        namespace = NetworkNamespace(ip).create()
    except Unavailable as e:
        if _in_ci():
            pytest.fail(f"CI=true but no network namespace can be made: {e}")
        pytest.skip(f"network namespace unavailable: {e}")
    try:
        yield namespace
    finally:
        namespace.destroy()


@pytest.fixture(scope="module")
def postfix_netns() -> NetworkNamespace | None:
    """
    The namespace the module's Postfix and policyd run in; None: this one.

    Override in a test module to return the `network_namespace` fixture:
    Postfix then listens on a non-loopback address, where master(8) can
    enter stress mode (reference §5.2).
    """
    return None


@pytest.fixture(scope="module")
def postfix_instance(
    postfix_tools: PostfixTools,
    postfix_config: PostfixConfig,
    postfix_netns: NetworkNamespace | None,
) -> Iterator[PostfixInstance]:
    """A private Postfix instance shared by the tests of one module."""
    with PostfixInstance(
        postfix_config, postfix_tools, netns=postfix_netns
    ) as instance:
        yield instance


@pytest.fixture(scope="module")
def postfix_fresh_master() -> bool:
    """
    Whether `postfix_bed` restarts Postfix for every test instead of reloading.

    Override to return True in modules that drive master(8) into stress
    mode: master keeps starting smtpd with ``stress=yes`` for 1000 s after
    the last time a service hit its process limit, across reloads, so only
    a restart gives the next test an unstressed Postfix.
    """
    return False


@pytest.fixture
def policyd_env() -> dict[str, str]:
    """Extra ``POLICYD_*`` settings for `postfix_bed`'s policyd (override)."""
    return {}


@pytest.fixture
def postfix_bed(
    postfix_instance: PostfixInstance,
    policyd_env: dict[str, str],
    postfix_fresh_master: bool,
    request: pytest.FixtureRequest,
) -> Iterator[Bed]:
    """
    A fresh policyd process and the module's Postfix instance asking it.

    Postfix is reloaded (or, with `postfix_fresh_master`, restarted) onto
    the new policyd's port and every smtpd process from before is gone, so
    no policy connection or request leaks between tests.  policyd is killed
    at the end if the test left it running.
    """
    policyd = PolicydProcess(policyd_env, netns=postfix_instance.netns)
    try:
        policyd.start()
        if postfix_fresh_master:
            postfix_instance.restart(
                attrs.evolve(postfix_instance.config, policy_port=policyd.port)
            )
        else:
            postfix_instance.ensure_running()  # in case a test stopped it
            postfix_instance.use_policy_port(policyd.port)
        mark = postfix_instance.log_marker(f"begin {request.node.nodeid}")
        yield Bed(postfix_instance, policyd, mark)
    finally:
        policyd.kill()


# --------------------------------------------------------------------------
# A real redis-server (policyd.testing.redis)
# --------------------------------------------------------------------------


def _redis_server() -> Iterator[RedisServer]:
    """A started redis-server, stopped afterwards; skip or fail if there is none."""
    try:
        server = RedisServer()
    except Unavailable as e:
        if _in_ci():
            pytest.fail(f"CI=true but redis-server is unavailable: {e}")
        pytest.skip(f"redis-server unavailable: {e}")
    with server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """
    One private redis-server for the session (tests/run installs Debian's).

    Tests keep apart by key prefix.  Without the package the Redis tests are
    skipped, except under ``CI=true``, where a missing server fails.
    """
    yield from _redis_server()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, to kill, pause and restart."""
    yield from _redis_server()
