"""
Counting over time: decayed event counts and a windowed request rate.

The arithmetic the load tracker keeps its per-client memory and its request
rate with, apart from where the numbers are stored, so that every backend
(this process's memory, a store shared by several MX hosts) counts alike.
Pure functions and one small class; no Twisted.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = [
    "NEVER",
    "NO_EVENTS",
    "RateWindow",
    "add_event",
    "decay",
    "events",
]

# "Never happened": one shared float object, so that a million clients do
# not carry a million copies of it.
NEVER: Final = -math.inf

# A decayed event count kept in ONE float: ln(count) + time / window.  The
# count at *now* is exp(stored - now / window); one float per counter instead
# of a count and a timestamp saves ~50 bytes per tracked client.  A float
# holds time / window (~3e7 for a 60 s window) to ~4e-9, so the count is
# exact to nine digits.  (If the clock steps back by d seconds, counts read
# e^(d/window) times too high until it catches up: harmless for seconds.)
NO_EVENTS: Final = -math.inf


def add_event(stored: float, now: float, window: float, amount: float = 1.0) -> float:
    """*stored* (see `NO_EVENTS`) with *amount* more events at *now*."""
    base = now / window
    if stored == NO_EVENTS:
        return math.log(amount) + base
    return math.log(math.exp(stored - base) + amount) + base


def events(stored: float, now: float, window: float) -> float:
    """The decayed count in *stored* at *now*."""
    if stored == NO_EVENTS:
        return 0.0
    return math.exp(stored - now / window)


def decay(value: float, then: float, now: float, window: float) -> float:
    """*value* (a count recorded at *then*) decayed exponentially to *now*."""
    if now <= then:
        return value
    return value * math.exp((then - now) / window)


class RateWindow:
    """Events per second over the last *seconds* whole seconds (buckets)."""

    __slots__ = ("_buckets", "_second", "_total")

    def __init__(self, seconds: int, now: float) -> None:
        self._buckets = [0] * seconds
        self._second = int(now)
        self._total = 0

    def count(self, now: float) -> None:
        """One event at *now*."""
        if int(now) != self._second:  # else _advance has nothing to do
            self._advance(now)
        self._buckets[self._second % len(self._buckets)] += 1
        self._total += 1

    def rate(self, now: float) -> float:
        """Events per second over the window ending at *now*."""
        self._advance(now)
        return self._total / len(self._buckets)

    def _advance(self, now: float) -> None:
        second = int(now)
        if second == self._second:
            return
        buckets = self._buckets
        size = len(buckets)
        if second - self._second >= size:
            buckets[:] = [0] * size
            self._total = 0
        else:
            for past in range(self._second + 1, second + 1):
                index = past % size
                self._total -= buckets[index]
                buckets[index] = 0
        self._second = second
