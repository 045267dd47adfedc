"""
The test bed: a private Postfix instance and the policyd process it asks.

`Bed` bundles a `policyd.testing.postfix.PostfixInstance`, the
`policyd.testing.daemon.PolicydProcess` its policy check points at, and the
maillog offset where the current test (or run) began.  The end-to-end tests
get one from the ``postfix_bed`` fixture (tests/conftest.py), which shares
one instance between the tests of a module; `running_bed` starts both for a
single test, a script or a benchmark.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping

import attrs

from policyd.testing.daemon import PolicydProcess
from policyd.testing.netns import NetworkNamespace
from policyd.testing.postfix import PostfixConfig, PostfixInstance, PostfixTools


@attrs.frozen
class Bed:
    """A Postfix instance, the policyd it asks, and where the test's log starts."""

    postfix: PostfixInstance
    policyd: PolicydProcess
    #: `policyd.testing.postfix.MailLog.mark` when the test began; lines
    #: before it belong to others.
    log_mark: int = 0

    def log_lines(self, pattern: str | re.Pattern[str] | None = None) -> list[str]:
        """Maillog lines written since the test began, matching *pattern*."""
        return self.postfix.maillog.lines(pattern, self.log_mark)


@contextlib.contextmanager
def running_bed(
    tools: PostfixTools,
    policyd_env: Mapping[str, str] | None = None,
    config: PostfixConfig | None = None,
    netns: NetworkNamespace | None = None,
) -> Iterator[Bed]:
    """
    Run policyd and a Postfix instance that asks it (for scripts, benchmarks).

    *config*'s ``policy_port`` is replaced by the port policyd listens on.
    With *netns*, both run inside that network namespace (see
    `PostfixInstance` and `PolicydProcess`).
    """
    with PolicydProcess(policyd_env, netns=netns) as policyd:
        config = attrs.evolve(
            config or PostfixConfig(policy_port=policyd.port), policy_port=policyd.port
        )
        with PostfixInstance(config, tools, netns=netns) as postfix:
            yield Bed(postfix, policyd, postfix.log_marker("begin"))
