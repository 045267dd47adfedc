"""The decision seam between the protocol and the policy.

The protocol hands each parsed `PolicyRequest` to a `Decider` and writes back
whatever `Action` it returns.  It knows nothing about scores or load; a decider
knows nothing about bytes or connections.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from policyd.actions import DUNNO, Action
from policyd.load import LoadTracker
from policyd.request import PolicyRequest


class Decider(Protocol):
    """Something that turns a request into a reply action."""

    def decide(self, request: PolicyRequest) -> Action | Deferred[Action]:
        """Answer *request*.

        Return an `Action` directly when the answer is known at once (the fast
        path), or a `Deferred` that fires with one.  Raising, failing, or taking
        longer than the configured decision timeout makes the protocol answer
        the fallback action instead.
        """


class DunnoDecider:
    """Answer ``DUNNO`` to everything: Postfix carries on as if we were absent."""

    def decide(self, request: PolicyRequest) -> Action:
        """Return ``DUNNO``."""
        return DUNNO


class TrackingDecider:
    """
    Account for every request in the load tracker, then answer ``DUNNO``.

    Stress detection without decisions: the level and the per-client
    counters are kept (and exported as metrics), but nobody is refused.
    """

    def __init__(self, tracker: LoadTracker) -> None:
        self.tracker = tracker

    def decide(self, request: PolicyRequest) -> Action:
        """Observe *request*; return ``DUNNO``."""
        self.tracker.observe(request)
        return DUNNO
