"""
POLICYD_SMTPD_CAPACITY=auto against a real Postfix configuration.

policyd reads ``postconf`` and ``postconf -M`` of the test bed's private
instance (``POLICYD_POSTFIX_CONFIG_DIR``) at start-up, counts the smtpd
processes that can ask it as ``policyd doctor`` does, and counts again on
SIGHUP after master.cf changed.  No Postfix configuration to read is a
start-up error naming the variable.
"""

from __future__ import annotations

import attrs
import pytest

from policyd.testing.daemon import PolicydProcess
from policyd.testing.postfix import (
    PostfixConfig,
    PostfixInstance,
    PostfixTools,
    default_listeners,
)
from policyd.testing.system import free_port, wait_until

pytestmark = pytest.mark.postfix


def test_capacity_read_and_reread(postfix_tools: PostfixTools) -> None:
    """Two smtpd listeners of maxproc 10 make 20; after master.cf says 5, 10."""
    port = free_port()
    config = PostfixConfig(policy_port=port, listeners=default_listeners(maxproc=10))
    with PostfixInstance(config, postfix_tools) as postfix:
        env = {
            "POLICYD_SMTPD_CAPACITY": "auto",
            "POLICYD_POSTFIX_CONFIG_DIR": str(postfix.config_dir),
            "POLICYD_LISTEN": f"tcp:{port}:interface=127.0.0.1",
        }
        with PolicydProcess(env) as policyd:
            first = policyd.wait_for_event("capacity")
            assert first["capacity"] == 20
            assert policyd.metric("policyd_host_capacity", {"host": "local"}) == 20
            # master.cf changes (no Postfix reload needed: postconf reads files).
            postfix.config = attrs.evolve(
                config,
                listeners=[
                    attrs.evolve(listener, maxproc=5) for listener in config.listeners
                ],
            )
            postfix.write_config()
            policyd.signal(1)  # SIGHUP
            wait_until(
                lambda: (
                    len(policyd.snapshot(lambda e: e.get("event") == "capacity")) == 2
                ),
                what="the capacity read again",
            )
            assert policyd.metric("policyd_host_capacity", {"host": "local"}) == 10


def test_no_postfix_configuration_is_a_start_up_error() -> None:
    """Nothing to read: exit 2, one line naming POLICYD_SMTPD_CAPACITY=auto."""
    policyd = PolicydProcess(
        {
            "POLICYD_SMTPD_CAPACITY": "auto",
            "POLICYD_POSTFIX_CONFIG_DIR": "/nonexistent/postfix",
        }
    )
    policyd.spawn()
    assert policyd.wait() == 2
    (line,) = policyd.stderr
    assert line.startswith("policyd: POLICYD_SMTPD_CAPACITY=auto: cannot count")
