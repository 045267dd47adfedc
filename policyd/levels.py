"""
Stress levels and per-client statistics.

The vocabulary shared by the load tracker (`policyd.load`) and the pure
policy (`policyd.policy`).  Free of Twisted, so that the policy stays a
pure function of its inputs.
"""

from __future__ import annotations

from typing import Final

import attrs

NORMAL: Final = 0
ELEVATED: Final = 1
OVERLOAD: Final = 2
LEVEL_NAMES: Final = ("normal", "elevated", "overload")


@attrs.frozen
class ClientStats:
    """What policyd remembers about one client (an address prefix)."""

    key: str
    # smtpd processes the client holds now: its busy policy connections.
    concurrency: int
    # New sessions (CONNECT/XCLIENT requests) and new messages (instances)
    # per minute, averaged over about `LoadSettings.client_rate_window`.
    session_rate: float
    message_rate: float
    # Refusals, decayed like the rates, and seconds since the last one.
    refusals: float
    since_refusal: float | None
    # Seconds of smtpd process time held without progress (waits beyond the
    # grace, sessions that ended before any recipient), decayed over
    # `LoadSettings.hold_window`.
    held: float = 0.0
