"""
Stress levels, the machine that moves between them, and per-client statistics.

The vocabulary shared by the load tracker (`policyd.load`) and the pure
policy (`policyd.policy`), and `LevelMachine`, which turns a load ratio into
a level with hysteresis (every tracker backend uses it).  Free of Twisted,
so that the policy stays a pure function of its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from policyd.load import LoadSettings

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


class LevelMachine:
    """
    The stress level of one Postfix host, from its load ratio over time.

    Up at once when the load crosses an *enter* threshold; down only after
    the load has stayed below the *exit* threshold for `LoadSettings.min_dwell`.
    Postfix's ``stress=yes`` (`postfix_stress`) is a floor while it is recent
    and the load bears it out.  The *pressure* counts steps of a lasting
    overload (see `policyd.load.LoadTracker.pressure`).  *on_change* is called
    with the old and new level after every change.
    """

    __slots__ = (
        "_held_at",
        "_on_change",
        "_pressing",
        "_pressure_at",
        "_stress_at",
        "level",
        "pressure",
        "settings",
        "stress_seen",
        "transitions",
    )

    def __init__(
        self,
        settings: LoadSettings,
        now: float,
        on_change: Callable[[int, int], None],
    ) -> None:
        self.settings = settings
        self.level = NORMAL
        self.pressure = 0
        #: Requests that carried Postfix's stress=yes.
        self.stress_seen = 0
        #: Level changes, by the level entered.
        self.transitions = dict.fromkeys(LEVEL_NAMES, 0)
        self._on_change = on_change
        self._pressing = False
        self._pressure_at = now
        # When the load last justified the current level; the level drops
        # only once this is min_dwell in the past.
        self._held_at = now
        self._stress_at = -math.inf

    def postfix_stress(self, now: float) -> None:
        """A request said ``stress=yes`` at *now*."""
        self._stress_at = now
        self.stress_seen += 1

    def stressed(self, now: float) -> bool:
        """Whether Postfix said ``stress=yes`` within `postfix_stress_hold`."""
        return now - self._stress_at < self.settings.postfix_stress_hold

    def evaluate(self, now: float, load: float) -> int:
        """The level at *now* for a load ratio of *load*; changes it if due."""
        settings = self.settings
        current = self.level
        if load >= settings.overload_enter:
            target = OVERLOAD
        elif load >= settings.elevated_enter:
            target = ELEVATED
        else:
            target = NORMAL
        # Hysteresis: a level is kept while the load stays above its exit
        # threshold, even below its enter threshold.
        if current == OVERLOAD and load >= settings.overload_exit:
            target = OVERLOAD
        elif (
            current >= ELEVATED and target < ELEVATED and load >= settings.elevated_exit
        ):
            target = ELEVATED
        if (
            now - self._stress_at < settings.postfix_stress_hold
            and load >= settings.postfix_stress_min_load
        ):
            # Postfix's stress=yes says "saturated within the last 1000 s"
            # (master marks every smtpd it starts until then, and they keep
            # asking with it): a floor only while the load bears it out, or a
            # flood would keep deferring clients for a quarter of an hour
            # after it ended, with the processes idle.
            target = max(target, settings.postfix_stress_level)
        if target >= current:
            self._held_at = now
            if target > current:
                self._change(current, target)
        elif now - self._held_at >= settings.min_dwell:
            self._held_at = now
            self._change(current, target)
        pressed = self.level == OVERLOAD and load >= settings.overload_exit
        # Most requests change nothing: the pressure sits at its end, or
        # `_press` would count no whole step yet (its division truncates
        # towards zero, hence abs: the clock is wall time and may step back;
        # a step of 0 s always passes, and jumps).
        if pressed != self._pressing or (
            self.pressure != (settings.max_pressure if pressed else 0)
            and abs(now - self._pressure_at) >= settings.pressure_step
        ):
            self._press(now, pressed)
        return self.level

    def _press(self, now: float, pressed: bool) -> None:
        """Move the pressure one step per `LoadSettings.pressure_step`.

        Up while the overload lasts with the load above its exit threshold,
        down while it does not; each phase starts counting when it begins.
        """
        if pressed != self._pressing:
            self._pressing = pressed
            self._pressure_at = now
        top = self.settings.max_pressure
        if (self.pressure >= top) if pressed else (self.pressure <= 0):
            return
        step = self.settings.pressure_step
        if step <= 0:
            self.pressure = top if pressed else 0
            return
        steps = int((now - self._pressure_at) / step)
        if steps:
            self._pressure_at += steps * step
            change = steps if pressed else -steps
            self.pressure = max(0, min(top, self.pressure + change))

    def _change(self, old: int, new: int) -> None:
        self.level = new
        self.transitions[LEVEL_NAMES[new]] += 1
        self._on_change(old, new)
