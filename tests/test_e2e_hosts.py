"""
Several MX hosts (issue 11), with real Postfix instances.

One central policyd serves two Postfix instances; then two Postfix instances
with a policyd each share one Redis.  In the first case both instances run
on this machine and reach policyd over loopback, so the peer address cannot
tell them apart: each names itself with
``policy_context`` in its ``check_policy_service`` settings (Postfix 3.1+),
and policyd runs with ``POLICYD_HOST_FROM=policy_context``.  The process
limits policyd assumes differ per host (``POLICYD_HOST_CAPACITIES``).
"""

from __future__ import annotations

from policyd.testing.daemon import PolicydProcess
from policyd.testing.postfix import PostfixConfig, PostfixInstance, PostfixTools
from policyd.testing.redis import RedisServer
from policyd.testing.smtp import bot_xclient
from policyd.testing.system import wait_until


def _config(policy_port: int, context: str) -> PostfixConfig:
    """An instance asking policyd at RCPT, naming itself *context*."""
    return PostfixConfig(
        policy_port=policy_port,
        policy_settings=(
            ("timeout", "10s"),
            ("default_action", "DUNNO"),
            ("policy_context", context),
        ),
    )


def test_flood_on_one_host_leaves_the_other_normal(
    postfix_tools: PostfixTools,
) -> None:
    """
    Two busy smtpd processes overload mx1 (limit 2); mx2 (limit 10) stays normal.

    mx1 runs two sessions at once, each keeping its connection through
    several messages: two of its smtpd processes are busy, which is all of
    the 2 policyd is told mx1 has.  A message through mx2 meanwhile is one
    busy process of 10.  Each host's level is its own; the unlabelled level
    is the highest, and the level-change log line names the host.
    """
    env = {
        "POLICYD_HOST_FROM": "policy_context",
        "POLICYD_HOST_CAPACITIES": "mx1=2 mx2=10",
        # Postfix's stress=yes must not lift anything: these instances are
        # on loopback (no stress mode), but say so anyway.
        "POLICYD_POSTFIX_STRESS_LEVEL": "ignore",
    }
    with (
        PolicydProcess(env) as policyd,
        PostfixInstance(_config(policyd.port, "mx1"), postfix_tools) as mx1,
        PostfixInstance(_config(policyd.port, "mx2"), postfix_tools) as mx2,
    ):
        mx1.smtp_source(sessions=2, messages=4, keep_open=True, delay=1).check()
        mx2.smtp_source(sessions=1, messages=1).check()
        wait_until(
            lambda: (
                policyd.metric("policyd_host_busy_connections", {"host": "mx2"}) == 1
            ),
            timeout=10.0,
            what="mx2's one busy connection",
        )
        # Transactions keep their connections busy for the transaction
        # timeout (30 s) after their last request: both hosts' counts
        # still stand.
        assert policyd.metric("policyd_host_busy_connections", {"host": "mx1"}) == 2
        assert policyd.metric("policyd_host_stress_level", {"host": "mx1"}) == 2
        assert policyd.metric("policyd_host_stress_level", {"host": "mx2"}) == 0
        assert policyd.metric("policyd_host_capacity", {"host": "mx1"}) == 2
        assert policyd.metric("policyd_host_capacity", {"host": "mx2"}) == 10
        assert policyd.metric("policyd_stress_level") == 2
        changes = policyd.snapshot(lambda e: e.get("event") == "stress_level")
        assert {e["host"] for e in changes} == {"mx1"}
        # Every request came with its instance's context, none from "local".
        contexts = {e["attributes"].get("policy_context") for e in policyd.requests()}
        assert contexts == {"mx1", "mx2"}


def test_refused_on_one_mx_is_a_quick_retry_on_the_other(
    postfix_tools: PostfixTools, own_redis_server: RedisServer
) -> None:
    """
    A bot refused by mx1 is refused by mx2 as a quick retry (one Redis).

    Two MX hosts have a policyd each, sharing one Redis.  Both Postfix
    instances send through their ``stress`` listener (smtpd with
    ``-o stress=yes``), which puts each policyd at overload.  The bot's first
    refusal (mx1) names its identity only; its try at mx2 seconds later also
    names ``quick_retry``, which mx2's policyd can only know from Redis.  A
    clean client passes both.
    """
    env = {
        "POLICYD_BACKEND": "redis",
        "POLICYD_REDIS_URL": own_redis_server.tcp_url,
        "POLICYD_POSTFIX_STRESS_HOLD": "2s",
        "POLICYD_POSTFIX_STRESS_MIN_LOAD": "0",
    }
    with (
        PolicydProcess(env) as policyd1,
        PolicydProcess(env) as policyd2,
        PostfixInstance(PostfixConfig(policy_port=policyd1.port), postfix_tools) as mx1,
        PostfixInstance(PostfixConfig(policy_port=policyd2.port), postfix_tools) as mx2,
    ):
        for policyd in (policyd1, policyd2):
            policyd.wait_for_event("backend_connected")
        bot = bot_xclient("192.0.2.66")
        first = mx1.send("stress", xclient=bot, ehlo_after_xclient=False)
        refusal = first.replies("RCPT")[0]
        assert refusal.code == 421, first
        assert "no_client_name" in refusal.text
        assert "quick_retry" not in refusal.text
        wait_until(
            lambda: (
                own_redis_server.command("HEXISTS", "policyd:c:192.0.2.66", "ra") == 1
            ),
            what="mx1's refusal of the bot in Redis",
        )
        second = mx2.send("stress", xclient=bot, ehlo_after_xclient=False)
        retry = second.replies("RCPT")[0]
        assert retry.code in (421, 521), second
        assert "quick_retry" in retry.text, second
        clean = {
            "ADDR": "192.0.2.25",
            "NAME": "mail.example.org",
            "HELO": "mail.example.org",
            "PROTO": "ESMTP",
        }
        for mx in (mx1, mx2):
            assert mx.send("stress", xclient=clean, ehlo_after_xclient=False).accepted
