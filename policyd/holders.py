"""
Who holds the smtpd processes, and what an admin should do about it.

An overload has one of two causes, and they call for different measures:

* **suspicious clients** hold the processes (a botnet, a spam run): refusing
  them is policyd's job, and it does so, temporarily, under stress;
* **clean clients** hold them (a legitimate surge: a newsletter run, a
  backlog after an outage): policyd will not refuse them, so the other two
  measures of Postfix's STRESS_README apply: serve more clients at once
  (raise the smtpd process limit, if memory allows) and spend less time per
  client (Postfix's stress-dependent timeouts, on by default since 2.6).

This module classifies the clients holding busy processes (from the latest
request of each, as the tracker keeps them) and turns the counts into one
log line at every level change and into metrics at scrape time.  Nothing
here runs on the request path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from twisted.logger import Logger

from policyd.levels import LEVEL_NAMES, NORMAL
from policyd.load import ALL_HOSTS, LoadSnapshot, LoadTracker
from policyd.policy import (
    CLEAN,
    EXEMPT,
    HOLDER_CLASSES,
    SUSPICIOUS,
    PolicySettings,
    bar,
    holder_class,
)

log = Logger()

# Causes (a log field).
BOTNET: Final = "suspicious_clients"
SURGE: Final = "legitimate_surge"
CALM: Final = "none"

ADVICE: Final = {
    BOTNET: (
        "most busy smtpd processes are held by suspicious clients (a botnet or "
        "spam run): policyd refuses them under stress; wire it at CONNECT "
        "(deploy/postfix/main-connect.cf) so that they are refused before they "
        "hold a process"
    ),
    SURGE: (
        "most busy smtpd processes are held by clean clients (a legitimate "
        "surge): policyd will not refuse them; raise the smtpd process limit "
        "(maxproc in master.cf, or default_process_limit) if memory allows, "
        "and keep Postfix's stress-dependent timeouts"
    ),
    CALM: "load is back to normal: nobody is refused",
}


def count_holders(
    tracker: LoadTracker, settings: PolicySettings, host: str | None = None
) -> dict[str, int]:
    """
    How many busy processes clean, suspicious and exempt clients hold.

    On Postfix host *host* only, if given; else on every host.
    """
    counts = dict.fromkeys(HOLDER_CLASSES, 0)
    for request in tracker.busy_requests(host):
        counts[holder_class(request, tracker.client(request), settings)] += 1
    return counts


def cause(level: int, counts: Mapping[str, int]) -> str:
    """`BOTNET`, `SURGE` or `CALM`: what the holders say about the load."""
    if level == NORMAL:
        return CALM
    busy = sum(counts.values())
    if busy and counts.get(SUSPICIOUS, 0) * 2 >= busy:
        return BOTNET
    return SURGE


class LevelChangeLog:
    """
    The one log line of a level change: the load, who holds it, what to do.

    Pass `level_changed` as the tracker's ``on_level_change`` and set
    `tracker` once the tracker exists (it needs the callback first).
    """

    def __init__(self, settings: PolicySettings, capacity: int) -> None:
        self.settings = settings
        self.capacity = capacity
        self.tracker: LoadTracker | None = None

    def level_changed(self, old: int, new: int, snapshot: LoadSnapshot) -> None:
        """Log the change (event ``stress_level``) with its cause and advice."""
        # The holders of the host whose level changed: another host's
        # clients say nothing about this one's load.
        host = None if snapshot.host == ALL_HOSTS else snapshot.host
        counts = (
            count_holders(self.tracker, self.settings, host)
            if self.tracker is not None
            else dict.fromkeys(HOLDER_CLASSES, 0)
        )
        why = cause(new, counts)
        log.info(
            "Stress level {old_level} -> {new_level} (load {load:.2f}, "
            "{busy} busy of {capacity}: {suspicious} suspicious, {clean} clean, "
            "{exempt} exempt; {rate:.1f} requests/s, Postfix stress "
            "{postfix_stress}): {advice}",
            event="stress_level",
            host=snapshot.host,
            old_level=LEVEL_NAMES[old],
            new_level=LEVEL_NAMES[new],
            load=snapshot.load_ratio,
            busy=snapshot.busy_connections,
            capacity=snapshot.capacity or self.capacity,
            rate=snapshot.request_rate,
            postfix_stress="yes" if snapshot.postfix_stress else "no",
            suspicious=counts[SUSPICIOUS],
            clean=counts[CLEAN],
            exempt=counts[EXEMPT],
            cause=why,
            advice=ADVICE[why],
        )


def current_bar(tracker: LoadTracker, settings: PolicySettings) -> int:
    """The score a client needs now to be refused (the elevated one at normal)."""
    return bar(tracker.level, tracker.pressure, settings)
