"""
Client state shared by every policyd on one Redis: `RedisLoadTracker`.

Several MX hosts, each with its own policyd (or one central policyd), see the
same botnet.  What policyd remembers about a client (its sessions and
messages per minute, the process time it held without progress, its recent
refusals) is written to Redis by every instance and read back, merged, when
a client is scored: a bot refused on MX1 is a quick retry on MX2.

What stays in this process: the load of each Postfix host (busy smtpd
processes, transactions, the request rate, the level) and which processes a
client holds on a host.  A `MemoryLoadTracker` keeps all of it, and a local
copy of every client's counts; the Redis tracker wraps it, hears of every
count through its journal, and adds the shared view.  Only when several
policyd serve one *named* Postfix host (two central policyd behind one
address) do they add up that host's busy processes and request rate, through
``<prefix>h:<host>``, once a second; this machine's own Postfix (``local``)
is never shared.

How it talks to Redis:

- Updates are batched: whatever arrived in one reactor turn (or, when no
  decision waits, within `RedisSettings.flush_delay`) goes in one EVALSHA of
  one Lua script that adds every client's updates, sets the TTL, and returns
  the merged records asked for.  One round trip serves many requests.
- Only a request that is scored (the level is not normal) waits, and at most
  `RedisSettings.deadline`; then it is decided on the local view.  At normal
  nothing waits.
- Time: every instance sends Redis-clock timestamps (its own clock plus an
  offset read from Redis's TIME at each connection), so hosts whose clocks
  disagree still agree on what "30 seconds ago" means; the script reads no
  clock itself.
- Keys: ``<prefix>c:<client prefix>`` (e.g. ``policyd:c:192.0.2.7``,
  ``policyd:c:2001:db8::/64``), a hash of five numbers with a TTL of
  `ttl` seconds, refreshed on every write.  ``<prefix>epoch`` tells an
  instance that Redis lost its data (restarted empty, flushed, failed over
  to an empty replica): every instance then writes its local counts back.

When Redis is slow, down, restarting or refuses a command, decisions go on
at once from the local view (fail-open), the outage is logged once and
counted, the connection is retried with a growing delay, and updates made
meanwhile (up to `RedisSettings.max_pending` clients) are written when it
returns.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    succeed,
)
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from policyd.counting import NEVER, NO_EVENTS, add_event, events
from policyd.load import (
    HELD,
    LOCAL_HOST,
    MESSAGES,
    REFUSALS,
    SESSIONS,
    BackendStatus,
    ClientStats,
    LoadSettings,
    LoadSnapshot,
    MemoryLoadTracker,
)
from policyd.request import PolicyRequest
from policyd.resp import (
    SENTINEL,
    RedisError,
    RedisProtocol,
    RedisURL,
    ask_sentinels,
    log_in,
)

__all__ = ["RedisLoadTracker", "RedisSettings"]

log = Logger()

# Adds what several clients did and returns the records asked for.
#   ARGV[1] now (Redis-clock seconds), ARGV[2] the rate window, ARGV[3] the
#   hold window, ARGV[4] the TTL; ARGV[5] six numbers per key, separated by
#   spaces (one argument: framing and parsing one number each costs policyd
#   more than the arithmetic): sessions, messages, held (amounts at now),
#   refusals (an amount at now), the age of the latest of those refusals in
#   seconds (-1: none), and 1 to return the record.
# Counts are kept as ln(count) + time / window (policyd.counting): one number
# each, decayed by reading.  The reply is one string of five numbers per
# record asked for, in the order of KEYS: sessions, messages, held,
# refusals at now, seconds since the latest refusal (-1: never).
UPDATE_SCRIPT: Final = b"""
local now, cw, hw = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl = ARGV[4]
local nums = {}
for x in string.gmatch(ARGV[5], '%S+') do nums[#nums + 1] = tonumber(x) end
local function add(stored, amount, window)
  local base = now / window
  if stored then
    return math.log(math.exp(tonumber(stored) - base) + amount) + base
  end
  return math.log(amount) + base
end
local function count(stored, window)
  if stored then return math.exp(tonumber(stored) - now / window) end
  return 0
end
local function text(x) return string.format('%.17g', x) end
local fields = {'s', 'm', 'h', 'r'}
local out = {}
for i, key in ipairs(KEYS) do
  local a = (i - 1) * 6
  local rec = redis.call('HMGET', key, 's', 'm', 'h', 'r', 'ra')
  local set = {}
  for f = 1, 4 do
    local amount = nums[a + f]
    if amount > 0 then
      rec[f] = add(rec[f], amount, f == 3 and hw or cw)
      set[#set + 1] = fields[f]
      set[#set + 1] = text(rec[f])
    end
  end
  local age = nums[a + 5]
  if age >= 0 and (not rec[5] or tonumber(rec[5]) < now - age) then
    rec[5] = now - age
    set[#set + 1] = 'ra'
    set[#set + 1] = text(rec[5])
  end
  if #set > 0 then
    redis.call('HSET', key, unpack(set))
    redis.call('EXPIRE', key, ttl)
  end
  if nums[a + 6] == 1 then
    local since = -1
    if rec[5] then since = math.max(0, now - tonumber(rec[5])) end
    out[#out + 1] = text(count(rec[1], cw)) .. ' ' .. text(count(rec[2], cw))
      .. ' ' .. text(count(rec[3], hw)) .. ' ' .. text(count(rec[4], cw))
      .. ' ' .. text(since)
  end
end
return table.concat(out, ' ')
"""

# Who has seen this Redis's data: returns the epoch token in KEYS[1], set to
# ARGV[1] if there is none (a new or emptied Redis), and keeps it ARGV[2]
# seconds more.  Also the health probe, once a second.
EPOCH_SCRIPT: Final = b"""
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return ARGV[1]
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return v
"""


def _sha(script: bytes) -> bytes:
    """The name Redis gives a script: its SHA-1 (an identifier, not security)."""
    return hashlib.sha1(script, usedforsecurity=False).hexdigest().encode()


# Shares the load of the Postfix hosts several policyd instances serve.
#   KEYS: one per host.  ARGV[1] now, ARGV[2] this instance, ARGV[3] how old
#   another instance's count may be, ARGV[4] the TTL; then two per key: this
#   instance's busy connections and requests per second for that host.
# Returns, per key, the sums of the other instances' fresh counts (as text);
# stale ones (an instance that stopped) are removed.
HOSTS_SCRIPT: Final = b"""
local now, me, fresh, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local out = {}
for i, key in ipairs(KEYS) do
  local busy, rate = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  redis.call('HSET', key, me, busy .. ' ' .. rate .. ' ' .. ARGV[1])
  redis.call('EXPIRE', key, ttl)
  local others, others_rate = 0, 0
  local all = redis.call('HGETALL', key)
  for j = 1, #all, 2 do
    if all[j] ~= me then
      local b, r, at = string.match(all[j + 1], '(%S+) (%S+) (%S+)')
      if at and tonumber(at) >= now - fresh then
        others = others + tonumber(b)
        others_rate = others_rate + tonumber(r)
      else
        redis.call('HDEL', key, all[j])
      end
    end
  end
  out[i] = {string.format('%d', others), string.format('%.17g', others_rate)}
end
return out
"""

UPDATE_SHA: Final = _sha(UPDATE_SCRIPT)
HOSTS_SHA: Final = _sha(HOSTS_SCRIPT)
EPOCH_SHA: Final = _sha(EPOCH_SCRIPT)

# Another instance's count of a host's load is used while younger than
# this (it writes every second); the key lives HOSTS_TTL after the last.
HOSTS_FRESH: Final = 5.0
HOSTS_TTL: Final = 60
# How long the epoch key outlives the last policyd that refreshed it.
EPOCH_TTL: Final = 86400
# Batches in flight at once; more waits in the next batch.
MAX_IN_FLIGHT: Final = 4
# The first retry after a failure, doubled each time up to backoff_max.
BACKOFF_FIRST: Final = 0.25
# At most one "Redis is down" log line this often; the rest are counted.
DOWN_LOG_INTERVAL: Final = 60.0

_CONNECTING, _UP, _SLOW, _DOWN, _STOPPED = range(5)
_STATE_NAMES: Final = ("connecting", "up", "slow", "down", "stopped")


@attrs.frozen
class RedisSettings:
    """How the Redis backend reaches Redis and how long it waits (docs/cluster.md)."""

    url: RedisURL
    #: Put before every key, so that several policyd clusters (or other
    #: programs) can share one Redis.
    prefix: str = "policyd:"
    #: Longest a decision waits for Redis before going on without it.
    deadline: float = 0.02
    #: Connecting (and logging in) may take this long, and a reply this late
    #: means the connection is dead: it is dropped and made again.
    timeout: float = 2.0
    #: Updates that no decision waits for are sent within this long.
    flush_delay: float = 0.02
    #: Most clients in one script call.
    max_batch: int = 256
    #: Most clients whose updates wait while Redis is away (then the least
    #: recent are dropped).
    max_pending: int = 100_000
    #: Longest wait between two attempts to reach Redis.
    #: (Short: a Redis that is back is used again within seconds; an
    #: attempt costs one connection.)
    backoff_max: float = 5.0


# A decision waiting for a client's shared record, and its request.
_Waiter = tuple[Deferred[ClientStats | None], PolicyRequest]


class _Batch:
    """One script call in flight."""

    __slots__ = ("deltas", "late", "timer", "waiters")

    def __init__(
        self,
        deltas: dict[int, list[float]],
        waiters: dict[int, list[_Waiter]],
    ) -> None:
        self.deltas = deltas
        self.waiters = waiters
        self.timer: IDelayedCall | None = None
        self.late = False


def _fresh_delta() -> list[float]:
    # sessions, messages, held, refusals (ln-encoded, local clock), and when
    # the latest refusal was (local clock).
    return [NO_EVENTS, NO_EVENTS, NO_EVENTS, NO_EVENTS, NEVER]


class RedisLoadTracker:
    """
    A `policyd.load.LoadTracker` whose per-client state is shared in Redis.

    The load of each Postfix host is this process's (see the module
    docstring); `lookup` fetches the shared record of a client before it is
    scored, and `client` answers with it.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        settings: LoadSettings,
        redis: RedisSettings,
        on_level_change: Callable[[int, int, LoadSnapshot], None] | None = None,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        """
        Track load on *reactor*'s clock; share clients in the Redis of *redis*.

        *on_level_change* is `MemoryLoadTracker`'s.  *endpoint* is where to
        connect, if not to ``redis.url`` on *reactor* (a socket handed over,
        or a test's).
        """
        self.reactor = reactor
        self._endpoint = endpoint
        self.settings = settings
        self.redis = redis
        self.local = MemoryLoadTracker(
            reactor, settings, on_level_change, journal=self._journal
        )
        self.keys = self.local.keys
        # The decay window of each count, indexed by what a journal reports
        # (SESSIONS, MESSAGES, HELD, REFUSALS).
        windows = dict.fromkeys(
            (SESSIONS, MESSAGES, REFUSALS), settings.client_rate_window
        )
        windows[HELD] = settings.hold_window
        self._windows = tuple(windows[what] for what in range(len(windows)))
        window = max(settings.client_rate_window, settings.hold_window)
        # Long enough that what is dropped has decayed to nothing: e^-4.
        self.ttl = max(60, math.ceil(4 * window))
        self._prefix = redis.prefix.encode()
        self._epoch_key = self._prefix + b"epoch"
        self._state = _CONNECTING
        self._protocol: RedisProtocol | None = None
        self._offset = 0.0  # Redis's clock minus ours
        self._epoch: bytes | None = None
        self._pending: OrderedDict[int, list[float]] = OrderedDict()
        self._wanted: dict[int, list[_Waiter]] = {}
        self._in_flight: list[_Batch] = []
        self._flush_call: IDelayedCall | None = None
        self._wanted_call: IDelayedCall | None = None
        self._flush_soon = False
        self._retry_call: IDelayedCall | None = None
        self._stall_call: IDelayedCall | None = None
        self._probing = False
        self._sharing = False
        # Who this policyd is among those sharing a host's load.
        self._instance = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._failures = 0
        self._errors: dict[str, int] = dict.fromkeys(
            ("connect", "timeout", "lost", "error"), 0
        )
        self._fallbacks = 0
        self._dropped = 0
        self._down_since: float | None = None
        self._down_logged_at = -math.inf
        self._downs_not_logged = 0
        self._hosts_error_logged_at = -math.inf
        self._started: Deferred[None] | None = None
        #: The Redis connected to (the master Sentinel named, if it did).
        self._master = redis.url.describe()

    # -- the local view, as it is ----------------------------------------

    @property
    def level(self) -> int:
        """The current stress level (the highest of the hosts')."""
        return self.local.level

    @property
    def pressure(self) -> int:
        """How far a lasting overload has lowered the bar."""
        return self.local.pressure

    def pressure_at(self, request: PolicyRequest) -> int:
        """The pressure of the host *request* came from."""
        return self.local.pressure_at(request)

    def busy_requests(self, host: str | None = None) -> list[PolicyRequest]:
        """The latest request of every busy connection (of *host*)."""
        return self.local.busy_requests(host)

    def connection_opened(self, connection: int, host: str = "local") -> None:
        """Start tracking a connection from Postfix host *host*."""
        self.local.connection_opened(connection, host)

    def connection_closed(self, connection: int) -> None:
        """Stop tracking a connection."""
        self.local.connection_closed(connection)

    def observe(self, request: PolicyRequest) -> int:
        """Account for *request* here (and, through the journal, in Redis)."""
        return self.local.observe(request)

    def record_refusal(self, request: PolicyRequest, hangup: bool = False) -> None:
        """Remember a refusal here and in Redis."""
        self.local.record_refusal(request, hangup)

    def snapshot(self, host: str | None = None) -> LoadSnapshot:
        """The load of *host*, or of all hosts together (this process's)."""
        return self.local.snapshot(host)

    def hosts(self) -> list[str]:
        """The Postfix hosts whose load is tracked here."""
        return self.local.hosts()

    def set_capacity(self, capacity: int) -> None:
        """The process limit of hosts not named in host_capacities, from now on."""
        self.local.set_capacity(capacity)

    def tick(self) -> None:
        """Expire what is stale here; check Redis; share the hosts' load."""
        self.local.tick()
        if self._state != _UP:
            # Fail open: without fresh counts, only this policyd's own.
            for load in self.local.loads():
                load.remote_busy = 0
                load.remote_rate = 0.0
            return
        if not self._probing:
            self._probe()
        if not self._sharing:
            self._share_hosts()

    def _share_hosts(self) -> None:
        """
        Add up each named host's load with the other policyd serving it.

        Several policyd instances may serve one Postfix host (two central
        policyd behind one address): each sees only its share of the host's
        smtpd processes, so each writes its counts and reads the others'.
        The host of this machine's own Postfix (`LOCAL_HOST`) is this
        policyd's alone, and not shared.
        """
        protocol = self._protocol
        loads = [load for load in self.local.loads() if load.name != LOCAL_HOST]
        if protocol is None or not loads:
            return
        now = self.reactor.seconds()
        args: list[bytes | str | int | float] = [
            HOSTS_SHA,
            len(loads),
            *(self._prefix + b"h:" + load.name.encode() for load in loads),
            now + self._offset,
            self._instance,
            HOSTS_FRESH,
            HOSTS_TTL,
        ]
        for load in loads:
            args += (load.busy - load.discounted, load.rate.rate(now))
        self._sharing = True

        def answered(reply: Any) -> None:
            self._sharing = False
            try:
                now = self.reactor.seconds()
                for load, (busy, rate) in zip(loads, reply, strict=True):
                    load.remote_busy = int(busy)
                    load.remote_rate = float(rate)
                    load.levels.evaluate(now, load.load_ratio(now))
            except (TypeError, ValueError):
                self._errors["error"] += 1
                log.warn(
                    "Redis answered the host-load script with {reply!r}",
                    event="backend_bad_reply",
                    reply=reply,
                )

        def failed(failure: Failure) -> None:
            self._sharing = False
            if failure.check(RedisError):
                self._errors["error"] += 1
                now = self.reactor.seconds()
                if now - self._hosts_error_logged_at >= DOWN_LOG_INTERVAL:
                    self._hosts_error_logged_at = now
                    log.warn(
                        "Redis refused the host-load script ({error}); each "
                        "host's load is this policyd's own count meanwhile",
                        event="backend_error",
                        error=str(failure.value),
                    )

        protocol.command(b"EVALSHA", *args).addCallbacks(answered, failed)

    # -- the shared view -------------------------------------------------

    def lookup(self, request: PolicyRequest) -> Deferred[ClientStats | None] | None:
        """Fetch the shared record of *request*'s client (see `LoadTracker`)."""
        if self._state != _UP:
            self._fallbacks += 1
            return None
        key = self.keys.key(request.client_address)
        waiting: Deferred[ClientStats | None] = Deferred()
        wanted = self._wanted.get(key)
        if wanted is None:
            self._wanted[key] = [(waiting, request)]
        else:
            wanted.append((waiting, request))
        if len(self._in_flight) >= MAX_IN_FLIGHT and self._wanted_call is None:
            # Queued behind batches in flight: bounded by the deadline too.
            self._wanted_call = self.reactor.callLater(
                self.redis.deadline, self._queued_late
            )
        self._schedule(now=True)
        return waiting

    def client(self, request: PolicyRequest) -> ClientStats:
        """What this policyd knows of *request*'s client itself (`lookup` shares)."""
        return self.local.client(request)

    def backend(self) -> BackendStatus:
        """Redis, whether it answers, and what went wrong so far."""
        return BackendStatus(
            "redis",
            up=self._state == _UP,
            errors=tuple(self._errors.items()),
            fallbacks=self._fallbacks,
            pending=len(self._pending),
        )

    @property
    def state(self) -> str:
        """``connecting``, ``up``, ``slow``, ``down`` or ``stopped``."""
        return _STATE_NAMES[self._state]

    # -- updates ---------------------------------------------------------

    def _journal(self, key: int, what: int, amount: float, now: float) -> None:
        """One thing a client did: to be added in Redis with the next batch."""
        pending = self._pending
        delta = pending.get(key)
        if delta is None:
            if len(pending) >= self.redis.max_pending:
                pending.popitem(last=False)
                self._dropped += 1
            delta = pending[key] = _fresh_delta()
        delta[what] = add_event(delta[what], now, self._windows[what], amount)
        if what == REFUSALS:
            delta[4] = now
        if self._state == _UP:
            self._schedule(now=False)

    def _schedule(self, now: bool) -> None:
        """Send a batch in this reactor turn (*now*), or within flush_delay."""
        call = self._flush_call
        if call is not None:
            if not now or self._flush_soon:
                return
            call.cancel()
        self._flush_soon = now
        self._flush_call = self.reactor.callLater(
            0 if now else self.redis.flush_delay, self._flush
        )

    def _flush(self) -> None:
        self._flush_call = None
        while (
            self._state == _UP
            and (self._wanted or self._pending)
            and len(self._in_flight) < MAX_IN_FLIGHT
        ):
            self._send_batch()

    def _send_batch(self) -> None:
        """Send up to max_batch clients: those a decision waits for first."""
        protocol = self._protocol
        if protocol is None:
            return
        now = self.reactor.seconds()
        limit = self.redis.max_batch
        waiters: dict[int, list[_Waiter]] = {}
        deltas: dict[int, list[float]] = {}
        wanted, pending = self._wanted, self._pending
        while wanted and len(waiters) < limit:
            key, waiting = wanted.popitem()
            waiters[key] = waiting
            delta = pending.pop(key, None)
            if delta is not None:
                deltas[key] = delta
        while pending and len(waiters) + len(deltas) < limit:
            key, delta = pending.popitem(last=False)
            if key in waiters:
                continue
            deltas[key] = delta
        keys = list(waiters) + [key for key in deltas if key not in waiters]
        settings = self.settings
        cw, hw = settings.client_rate_window, settings.hold_window
        numbers = []
        for key in keys:
            want = 1 if key in waiters else 0
            delta = deltas.get(key)
            if delta is None:
                numbers.append(b"0 0 0 0 -1 %d" % want)
            else:
                refused_at = delta[4]
                numbers.append(
                    b"%r %r %r %r %r %d"
                    % (
                        events(delta[0], now, cw),
                        events(delta[1], now, cw),
                        events(delta[2], now, hw),
                        events(delta[3], now, cw),
                        -1.0 if refused_at == NEVER else max(0.0, now - refused_at),
                        want,
                    )
                )
        batch = _Batch(deltas, waiters)
        self._in_flight.append(batch)
        # A decision waits at most the deadline; updates nobody waits for
        # may take up to the timeout (a Redis across a slow link still
        # shares what it can).
        batch.timer = self.reactor.callLater(
            self.redis.deadline if waiters else self.redis.timeout,
            self._late,
            batch,
        )
        if not self._wanted and self._wanted_call is not None:
            self._wanted_call.cancel()
            self._wanted_call = None
        protocol.command(
            b"EVALSHA",
            UPDATE_SHA,
            len(keys),
            *[self._key(key) for key in keys],
            now + self._offset,
            cw,
            hw,
            self.ttl,
            b" ".join(numbers),
        ).addCallbacks(
            self._answered,
            self._batch_failed,
            callbackArgs=(batch, keys),
            errbackArgs=(batch,),
        )

    def _key(self, key: int) -> bytes:
        return self._prefix + b"c:" + self.keys.describe(key).encode()

    def _answered(self, reply: Any, batch: _Batch, keys: list[int]) -> None:
        self._done(batch)
        waiters, batch.waiters = batch.waiters, {}
        try:
            numbers = [float(x) for x in reply.split()] if waiters else []
            if len(numbers) != 5 * len(waiters):
                raise ValueError(f"{len(numbers)} numbers for {len(waiters)} records")
        except (AttributeError, ValueError):
            log.warn(
                "Redis answered the update script with {reply!r}; deciding on "
                "the local view",
                event="backend_bad_reply",
                reply=reply,
            )
            self._errors["error"] += 1
            numbers = []
        per_minute = 60.0 / self.settings.client_rate_window
        holding = self.local.holding
        at = 0
        # The records come in the order of the keys, those asked for first.
        for key in keys:
            waiting = waiters.get(key)
            if waiting is None:
                break
            if not numbers:
                for each, _ in waiting:
                    each.callback(None)
                continue
            sessions, messages, held, refusals, since = numbers[at : at + 5]
            at += 5
            for each, request in waiting:
                name, concurrency = holding(request)
                each.callback(
                    ClientStats(
                        name,
                        concurrency,
                        sessions * per_minute,
                        messages * per_minute,
                        refusals,
                        None if since < 0 else since,
                        held,
                    )
                )
        if self._state == _SLOW and not any(b.late for b in self._in_flight):
            self._recovered()
        elif self._state == _UP and (self._wanted or self._pending):
            self._schedule(now=bool(self._wanted))

    def _batch_failed(self, failure: Failure, batch: _Batch) -> None:
        self._done(batch)
        self._release(batch)
        error = failure.value
        if isinstance(error, RedisError):
            # The script did not run (NOSCRIPT, OOM, READONLY, a replica, a
            # busy script): nothing was added, so nothing is lost.
            self._restore(batch.deltas)
            self._errors["error"] += 1
            self._state = _DOWN
            self._went_down(f"Redis refused the update: {error}")
            if self._protocol is not None:
                self._protocol.close()
            return
        # The connection went: connectionLost handles the rest.  Whether the
        # batch was applied is unknown; it is not sent twice.

    def _done(self, batch: _Batch) -> None:
        if batch in self._in_flight:
            self._in_flight.remove(batch)
        if batch.timer is not None and batch.timer.active():
            batch.timer.cancel()
        batch.timer = None

    def _release(self, batch: _Batch) -> None:
        """Let the decisions waiting on *batch* go on (with whatever is known)."""
        waiters, batch.waiters = batch.waiters, {}
        for waiting in waiters.values():
            for each, _ in waiting:
                each.callback(None)

    def _restore(self, deltas: dict[int, list[float]]) -> None:
        """Put back updates that did not reach Redis, merged with newer ones."""
        now = self.reactor.seconds()
        for key, delta in deltas.items():
            current = self._pending.get(key)
            if current is None:
                self._pending[key] = delta
                continue
            for what, window in enumerate(self._windows):
                amount = events(delta[what], now, window)
                if amount > 0:
                    current[what] = add_event(current[what], now, window, amount)
            current[4] = max(current[4], delta[4])

    def _late(self, batch: _Batch) -> None:
        """A batch missed the deadline: its decisions go on without it."""
        batch.timer = None
        count = sum(len(waiting) for waiting in batch.waiters.values())
        self._fallbacks += count
        self._release(batch)
        waited = self.redis.deadline if count else self.redis.timeout
        # The reply may be waiting on the socket already: timers run before
        # the reactor reads.  Redis is slow only if it is still missing
        # after this turn's reads.
        self.reactor.callLater(0, self._still_late, batch, waited)

    def _still_late(self, batch: _Batch, waited: float) -> None:
        if batch not in self._in_flight:
            return
        batch.late = True
        self._errors["timeout"] += 1
        self._slow(f"no reply within {waited * 1000:.0f} ms")

    def _slow(self, reason: str) -> None:
        """Redis is late: decide without it until it answers, or drop it."""
        if self._state != _UP:
            return
        self._state = _SLOW
        self._went_down(reason)
        # A reply that never comes means a hung server: drop it.
        self._stall_call = self.reactor.callLater(self.redis.timeout, self._stalled)

    def _queued_late(self) -> None:
        """Decisions queued behind batches in flight waited the deadline out."""
        self._wanted_call = None
        if not self._wanted:
            return
        self._errors["timeout"] += 1
        self._slow(
            f"no reply within {self.redis.deadline * 1000:.0f} ms "
            f"({len(self._in_flight)} batches in flight)"
        )
        self._release_wanted()

    def _stalled(self) -> None:
        self._stall_call = None
        if self._state == _SLOW and self._protocol is not None:
            log.warn(
                "Redis has not answered for {seconds:.1f} s; reconnecting",
                event="backend_stalled",
                seconds=self.redis.timeout,
            )
            self._protocol.abort()

    def _probe(self) -> None:
        """Refresh the epoch key; a new epoch means Redis lost its data."""
        protocol = self._protocol
        if protocol is None:
            return
        self._probing = True
        probe = protocol.command(
            b"EVALSHA", EPOCH_SHA, 1, self._epoch_key, os.urandom(8).hex(), EPOCH_TTL
        )
        timer = self.reactor.callLater(self.redis.timeout, self._probe_late, probe)

        def answered(epoch: Any) -> None:
            self._probing = False
            if timer.active():
                timer.cancel()
            if isinstance(epoch, bytes) and epoch != self._epoch:
                self._lost_data(epoch)
            if self._state == _SLOW and not any(b.late for b in self._in_flight):
                self._recovered()

        def failed(failure: Failure) -> None:
            self._probing = False
            if timer.active():
                timer.cancel()
            if failure.check(RedisError):
                self._errors["error"] += 1
                self._state = _DOWN
                self._went_down(f"Redis refused the probe: {failure.value}")
                if self._protocol is not None:
                    self._protocol.close()

        probe.addCallbacks(answered, failed)

    def _probe_late(self, probe: Deferred[Any]) -> None:
        self._errors["timeout"] += 1
        self._slow(f"no answer to the probe within {self.redis.timeout:.1f} s")
        # Silent for the whole timeout already: drop the connection now.
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._stalled()

    def _lost_data(self, epoch: bytes) -> None:
        """Redis came back without what it held: send it this process's view."""
        known = self._epoch
        self._epoch = epoch
        if known is None:
            return
        records = list(self.local.records())
        log.warn(
            "Redis lost the shared client state (restarted empty, flushed, or "
            "failed over); writing back what this policyd knows of {count} "
            "clients",
            event="backend_resync",
            count=len(records),
        )
        self._reseed(records)

    def _reseed(
        self, records: Iterable[tuple[int, float, float, float, float, float]]
    ) -> None:
        """Replace the pending updates with the local counts of every client."""
        now = self.reactor.seconds()
        pending: OrderedDict[int, list[float]] = OrderedDict()
        for key, sessions, messages, held, refusals, refused_at in records:
            delta = _fresh_delta()
            counts = (sessions, messages, held, refusals)
            for what, window in enumerate(self._windows):
                if counts[what] > 1e-6:
                    delta[what] = add_event(NO_EVENTS, now, window, counts[what])
            delta[4] = refused_at if refusals > 1e-6 else NEVER
            if any(value != NO_EVENTS for value in delta[:4]):
                pending[key] = delta
        while len(pending) > self.redis.max_pending:
            pending.popitem(last=False)
        self._pending = pending
        if self._state == _UP:
            self._schedule(now=False)

    # -- the connection --------------------------------------------------

    def start(self) -> Deferred[None]:
        """Connect; fires when connected, or when the first attempt failed."""
        started = self._started = Deferred()
        self._connect()
        return started

    def stop(self) -> Deferred[None]:
        """Send what is pending (briefly), then close the connection."""
        for call in (self._flush_call, self._retry_call, self._stall_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._retry_call = self._stall_call = None
        # What is pending goes now, all of it (in batches).
        while self._state == _UP and (self._pending or self._wanted):
            self._send_batch()
        protocol = self._protocol
        self._state = _STOPPED
        if protocol is None or protocol.transport is None:
            return succeed(None)
        done = Deferred[None]()
        protocol.lost.addBoth(lambda _: done.callback(None))
        last = protocol.command(b"PING")
        timer = self.reactor.callLater(self.redis.timeout, protocol.abort)

        def close(_: Any) -> None:
            if timer.active():
                timer.cancel()
            protocol.close()

        last.addBoth(close)
        return done

    def _connect(self) -> None:
        self._retry_call = None
        if self._state == _STOPPED:
            return
        self._state = _CONNECTING
        attempt = ensureDeferred(self._open())
        attempt.addTimeout(self.redis.timeout, self.reactor)
        attempt.addCallbacks(self._connected, self._connect_failed)

    async def _open(self) -> tuple[RedisProtocol, float, bytes, str]:
        protocol = RedisProtocol()
        url = self.redis.url
        sentinel = url.scheme == SENTINEL
        if sentinel:
            url = await ask_sentinels(self.reactor, url, self.redis.timeout)
        endpoint = self._endpoint or url.endpoint(self.reactor, self.redis.timeout)
        await connectProtocol(endpoint, protocol)
        try:
            await log_in(protocol, url)
            if sentinel:
                # Sentinel may not have noticed a failover yet: writing to a
                # replica would only fail.
                role = await protocol.command(b"ROLE")
                if not role or role[0] != b"master":
                    raise RedisError(
                        f"ERR {url.describe()}, named master by Sentinel, is a replica"
                    )
            for script, sha in (
                (UPDATE_SCRIPT, UPDATE_SHA),
                (EPOCH_SCRIPT, EPOCH_SHA),
                (HOSTS_SCRIPT, HOSTS_SHA),
            ):
                loaded = await protocol.command(b"SCRIPT", b"LOAD", script)
                if loaded != sha:
                    raise RedisError(f"ERR SCRIPT LOAD gave {loaded!r}, not {sha!r}")
            epoch = await protocol.command(
                b"EVALSHA",
                EPOCH_SHA,
                1,
                self._epoch_key,
                os.urandom(8).hex(),
                EPOCH_TTL,
            )
            seconds, micro = await protocol.command(b"TIME")
        except BaseException:
            protocol.abort()
            raise
        offset = int(seconds) + int(micro) / 1e6 - self.reactor.seconds()
        return protocol, offset, epoch, url.describe()

    def _connected(self, opened: tuple[RedisProtocol, float, bytes, str]) -> None:
        protocol, offset, epoch, self._master = opened
        if self._state == _STOPPED:
            protocol.close()
            self._fire_started()
            return
        self._protocol = protocol
        self._offset = offset
        self._failures = 0
        protocol.lost.addCallback(lambda _: self._connection_lost(protocol))
        self._state = _UP
        if self._epoch is not None and epoch != self._epoch:
            self._lost_data(epoch)
        self._epoch = epoch
        if self._down_since is not None:
            self._recovered()
        else:
            log.info(
                "Sharing client state in Redis at {master}",
                event="backend_connected",
                url=self.redis.url.describe(),
                master=self._master,
            )
        self._fire_started()
        if self._pending or self._wanted:
            self._schedule(now=True)

    def _connect_failed(self, failure: Failure) -> None:
        if self._state == _STOPPED:
            self._fire_started()
            return
        where = self.redis.url.describe()
        if failure.check(RedisError):
            # It answered, and said no: a wrong password, a missing
            # permission, a replica.
            self._errors["error"] += 1
            reason = f"Redis at {where} refused to set up: {failure.value}"
        elif failure.check(DeferredTimeout, CancelledError):
            self._errors["timeout"] += 1
            reason = (
                f"cannot reach Redis at {where}: no connection within "
                f"{self.redis.timeout:.1f} s"
            )
        else:
            self._errors["connect"] += 1
            detail = str(failure.value) or type(failure.value).__name__
            reason = f"cannot reach Redis at {where}: {detail}"
        self._state = _DOWN
        self._went_down(reason)
        self._fire_started()
        self._retry()

    def _connection_lost(self, protocol: RedisProtocol) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        in_flight, self._in_flight = self._in_flight, []
        for batch in in_flight:
            self._done(batch)
            self._release(batch)
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._stall_call = None
        self._probing = self._sharing = False
        if self._state == _STOPPED:
            return
        if self._state in (_UP, _SLOW):
            self._errors["lost"] += 1
        self._state = _DOWN
        self._went_down("the connection to Redis was lost")
        self._retry()

    def _retry(self) -> None:
        delay = min(self.redis.backoff_max, BACKOFF_FIRST * 2**self._failures)
        self._failures += 1
        self._retry_call = self.reactor.callLater(delay, self._connect)

    def _fire_started(self) -> None:
        started, self._started = self._started, None
        if started is not None:
            started.callback(None)

    def _went_down(self, reason: str) -> None:
        """Log the start of an outage (at most once a minute), not each failure."""
        now = self.reactor.seconds()
        # Waiting decisions go on at once.
        self._release_wanted()
        if self._down_since is not None:
            return
        self._down_since = now
        if now - self._down_logged_at < DOWN_LOG_INTERVAL:
            self._downs_not_logged += 1
            return
        self._down_logged_at = now
        log.warn(
            "Redis is unavailable ({reason}); deciding on this policyd's own view "
            "until it is back{earlier}",
            event="backend_down",
            reason=reason,
            earlier=(
                f" ({self._downs_not_logged} shorter outages not logged)"
                if self._downs_not_logged
                else ""
            ),
        )
        self._downs_not_logged = 0

    def _release_wanted(self) -> None:
        """Decisions queued for a batch go on at once, on the local view."""
        if self._wanted_call is not None and self._wanted_call.active():
            self._wanted_call.cancel()
        self._wanted_call = None
        wanted, self._wanted = self._wanted, {}
        for waiting in wanted.values():
            self._fallbacks += len(waiting)
            for each, _ in waiting:
                each.callback(None)

    def _recovered(self) -> None:
        """Redis answers again: say so once, and send what waited."""
        now = self.reactor.seconds()
        since = self._down_since
        self._down_since = None
        self._state = _UP
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._stall_call = None
        if since is not None and self._down_logged_at >= since:
            log.info(
                "Redis is back after {seconds:.1f} s ({master}); {pending} "
                "clients' updates to write, {dropped} dropped (more than "
                "max_pending)",
                event="backend_up",
                seconds=now - since,
                master=self._master,
                pending=len(self._pending),
                dropped=self._dropped,
            )
            self._dropped = 0
        if self._pending or self._wanted:
            self._schedule(now=True)
