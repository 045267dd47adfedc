"""
Scoring and the decision matrix: who is refused, when, and why.

Pure: no Twisted, no clock, no I/O.  A decision is a function of the
request, the stress level, what the tracker knows about the client, and the
settings; time is passed in.  That keeps every cell of the matrix testable
from a table.

At ``normal`` nobody is refused.  Under stress, a client is scored from
what the request shows (its names, its HELO, its behaviour as the tracker saw
it); a score at or above the *bar* makes it *suspicious* and it gets the
temporary action of the level.  The bar is `PolicySettings.suspicious_score`
at ``elevated``, and falls towards `PolicySettings.overload_suspicious_score`
as an overload lasts (`bar`).  A score at or above
`PolicySettings.reject_score` **not counting** the signals a temporary DNS
failure (or a slow link) can cause makes it *very suspicious* and, at
``overload``, it gets a permanent refusal.  Authenticated and allow-listed
clients are never scored.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Sequence
from typing import Final

import attrs

from policyd.actions import DUNNO, Action
from policyd.levels import ELEVATED, LEVEL_NAMES, NORMAL, OVERLOAD, ClientStats
from policyd.request import SESSION_STATES, PolicyRequest, decode

# -- reasons -----------------------------------------------------------------
# Each signal has a stable name: it is a metric label, a log field and a word
# in the refusal text, so the set is fixed and small.

NO_CLIENT_NAME: Final = "no_client_name"
NO_REVERSE_NAME: Final = "no_reverse_name"
DYNAMIC_NAME: Final = "dynamic_name"
NO_HELO: Final = "no_helo"
HELO_NOT_FQDN: Final = "helo_not_fqdn"
HELO_BARE_IP: Final = "helo_bare_ip"
HELO_FOREIGN_LITERAL: Final = "helo_foreign_literal"
HELO_IMPERSONATES: Final = "helo_impersonates"
CONCURRENCY: Final = "concurrency"
MESSAGE_RATE: Final = "message_rate"
SESSION_RATE: Final = "session_rate"
QUICK_RETRY: Final = "quick_retry"
PROCESS_HOLDER: Final = "process_holder"

SIGNALS: Final = (
    NO_CLIENT_NAME,
    NO_REVERSE_NAME,
    DYNAMIC_NAME,
    NO_HELO,
    HELO_NOT_FQDN,
    HELO_BARE_IP,
    HELO_FOREIGN_LITERAL,
    HELO_IMPERSONATES,
    CONCURRENCY,
    MESSAGE_RATE,
    SESSION_RATE,
    QUICK_RETRY,
    PROCESS_HOLDER,
)

# `client_name=unknown` and `reverse_client_name=unknown` can mean a DNS
# lookup that failed temporarily (Postfix does not tell): these never count
# towards a permanent refusal.
DNS_SIGNALS: Final = frozenset({NO_CLIENT_NAME, NO_REVERSE_NAME})

# Signals that can only ever refuse temporarily: the DNS ones, and holding
# processes without progress, which a slow link or a slow DNS on our side can
# also cause (docs/decisions.md, "Process holders").
TEMPORARY_SIGNALS: Final = DNS_SIGNALS | {PROCESS_HOLDER}

# What a client does rather than who it is.  Volume is no sign of a bot: a
# bank's newsletter or a mailing list sends fast over many connections and
# comes back quickly after a 4xx.  These only add to the score of a client
# that already shows an identity signal (the others); alone they never refuse.
BEHAVIOUR_SIGNALS: Final = frozenset(
    {CONCURRENCY, MESSAGE_RATE, SESSION_RATE, QUICK_RETRY}
)

# Outcomes (the ``outcome`` metric label).
PASS: Final = "pass"  # noqa: S105 - an outcome, not a password
EXEMPT: Final = "exempt"
DEFER: Final = "defer"
REJECT: Final = "reject"
OUTCOMES: Final = (PASS, EXEMPT, DEFER, REJECT)

# Exemption reasons.
AUTHENTICATED: Final = "authenticated"
ALLOWED_NETWORK: Final = "allowed_network"
ALLOWED_DOMAIN: Final = "allowed_domain"
EXEMPTIONS: Final = (AUTHENTICATED, ALLOWED_NETWORK, ALLOWED_DOMAIN)

_UNKNOWN = "unknown"
_LITERAL = re.compile(r"\[(?:ipv6:)?([0-9a-f:.]+)\]\Z", re.IGNORECASE)
# Postfix's own valid_hostname() accepts underscores ("grr..": Windows hosts
# use them), so a HELO with one is not held against the client.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\Z")
_MAX_NAME = 255
# Names a client has no business giving in HELO to another host: they say
# "the host you are on" (localhost6 is the IPv6 name on Red Hat systems, and
# localhost.<domain> a common zone entry for 127.0.0.1).
_LOCALHOST_LABELS = frozenset({"localhost", "localhost6"})
_LOCALHOST_NAMES = frozenset({"ip6-localhost", "ip6-loopback"})
# Tokens that ISPs put in the reverse names of dial-up, DSL, cable and pool
# addresses, as whole labels or label parts between separators or digits.
# Matched against the lowered name (IGNORECASE would make the search three
# times slower, for Unicode case folds no DNS name has).
_DYNAMIC_TOKENS = re.compile(
    r"(?<![^.\-_0-9])(?:dyn|dynamic|dynip|dsl|adsl|xdsl|vdsl|cable|pool|dhcp|"
    r"dial|dialup|dialin|ppp|pppoe|broadband|cust|customer|res|resident|catv|"
    r"ftth|cpe|unassigned)(?![^.\-_0-9])"
)
_DIGIT_RUNS = re.compile(r"[0-9]+")
# Where an action text names the reasons of a refusal.
REASONS_PLACEHOLDER: Final = "{reasons}"


@attrs.frozen
class PolicySettings:
    """Weights, thresholds, exemptions and the action of every matrix cell."""

    weights: dict[str, int] = attrs.field(
        factory=lambda: {
            NO_CLIENT_NAME: 2,
            NO_REVERSE_NAME: 2,
            DYNAMIC_NAME: 2,
            NO_HELO: 2,
            HELO_NOT_FQDN: 2,
            HELO_BARE_IP: 3,
            HELO_FOREIGN_LITERAL: 3,
            HELO_IMPERSONATES: 5,
            CONCURRENCY: 3,
            MESSAGE_RATE: 2,
            SESSION_RATE: 2,
            QUICK_RETRY: 3,
            PROCESS_HOLDER: 3,
        }
    )
    suspicious_score: int = 3
    # The lowest the bar goes once overload has lasted (pressure).
    overload_suspicious_score: int = 2
    reject_score: int = 8
    client_concurrency_limit: int = 5
    client_message_rate_limit: float = 30.0
    client_session_rate_limit: float = 30.0
    quick_retry_window: float = 30.0
    # Seconds of process time held without progress (decayed) from which a
    # client is a process holder.
    hold_limit: float = 20.0
    my_hostnames: tuple[str, ...] = ()
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_domains: tuple[str, ...] = ()
    elevated_action: str = "450 4.7.1 Busy; try again later ({reasons})"
    elevated_reject_action: str = "450 4.7.1 Busy; try again later ({reasons})"
    overload_action: str = "421 4.7.0 Overloaded; try again later ({reasons})"
    overload_reject_action: str = "521 5.7.1 Refused: looks like a bot ({reasons})"


@attrs.frozen
class Verdict:
    """A decision, with everything that led to it, as data."""

    action: Action
    outcome: str
    level: int
    score: int
    reasons: tuple[str, ...]
    exemption: str | None = None
    #: The score that was needed to refuse (0 where nobody is scored).
    bar: int = 0

    @property
    def level_name(self) -> str:
        """``normal``, ``elevated`` or ``overload``."""
        return LEVEL_NAMES[self.level]

    @property
    def refused(self) -> bool:
        """Whether the client is refused (temporarily or for good)."""
        return self.outcome in (DEFER, REJECT)


# Parsing an address or matching a reverse name costs microseconds, and a
# client's requests repeat the same strings: under stress, when every request
# is scored, the caches pay for themselves (bounded; pure functions of text).
_CACHE_SIZE: Final = 8192


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _under(name: str, domains: Sequence[str]) -> bool:
    name = name.lower().rstrip(".")
    return any(name == d or name.endswith("." + d) for d in domains)


def exemption(request: PolicyRequest, settings: PolicySettings) -> str | None:
    """Why *request*'s client must never be refused, or None."""
    if request.sasl_username:
        return AUTHENTICATED
    if settings.allow_networks:
        address = _address(request.client_address)
        if address is not None and any(
            address in network for network in settings.allow_networks
        ):
            return ALLOWED_NETWORK
    if (
        settings.allow_domains
        and request.client_name
        and request.client_name != _UNKNOWN
        and _under(request.client_name, settings.allow_domains)
    ):
        return ALLOWED_DOMAIN
    return None


def _ipv4(address: str) -> bytes | None:
    """The four bytes of a dotted-quad IPv4 address, or None.

    What `ipaddress.IPv4Address` accepts (four decimal octets up to 255, no
    leading zeros), in a fifth of its time: policyd parses every scored
    client's address, and in a flood most are new.
    """
    if ":" in address:
        return None
    try:
        return socket.inet_pton(socket.AF_INET, address)
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def looks_dynamic(name: str, address: str) -> bool:
    """
    Whether a reverse name looks like a dial-up, DSL, cable or pool address.

    Two patterns: the client's address written into the name (all four
    octets, in either order, with any separators, decimal or hex), and
    ISP tokens such as ``dyn``, ``dsl``, ``pool``, ``dhcp`` or ``cust``.
    """
    if not name or name == _UNKNOWN:
        return False
    lowered = name.lower().rstrip(".")
    # The registered domain (the last two labels) says who the ISP is, not
    # what kind of address this is: look at the labels left of it.
    if lowered.count(".") >= 2 and _DYNAMIC_TOKENS.search(lowered.rsplit(".", 2)[0]):
        return True
    packed = _ipv4(address)
    if packed is None:
        return False
    runs = _DIGIT_RUNS.findall(lowered)
    # Whole numbers only, four in a row: 1.2.3.4 is not in "11-2-3-45".
    if len(runs) >= 4:
        octets = address.split(".")  # canonical: inet_pton took it
        backwards = octets[::-1]
        numbers = [run.lstrip("0") or "0" for run in runs]
        for start in range(len(numbers) - 3):
            four = numbers[start : start + 4]
            if four in (octets, backwards):
                return True
    # Not the twelve zero-padded digits run together: Microsoft's own
    # outbound servers are named so (mail-oln040092066050.outbound.
    # protection.outlook.com is 40.92.66.50).
    return f"{int.from_bytes(packed, 'big'):08x}" in lowered


def _helo_signals(
    helo: str, request: PolicyRequest, settings: PolicySettings
) -> list[str]:
    if not helo:
        return [NO_HELO]
    name = helo.lower().rstrip(".")
    if name[:1] == "[":
        literal = _LITERAL.match(name)
        if literal is not None:
            claimed = _unmapped(_address(literal.group(1)))
            client = _unmapped(_address(request.client_address))
            if claimed is None or client is None or claimed != client:
                return [HELO_FOREIGN_LITERAL]
            return []
    # Only a name of digits and dots, or one with a colon, can be an address:
    # a host name goes without a parse (which fails slowly, by exception).
    if (":" in name or name.replace(".", "").isdigit()) and _address(name) is not None:
        return [HELO_BARE_IP]
    labels = name.split(".")
    if (
        labels[0] in _LOCALHOST_LABELS
        or name in _LOCALHOST_NAMES
        or name in settings.my_hostnames
    ):
        # From this host itself the claim is true (and "localhost" is the
        # right name for it, FQDN or not).
        client = _unmapped(_address(request.client_address))
        return [] if _is_this_host(client, request) else [HELO_IMPERSONATES]
    if len(labels) < 2 or len(name) > _MAX_NAME or not _HOST_NAME.match(name):
        return [HELO_NOT_FQDN]
    if labels[-1].isdigit():
        return [HELO_NOT_FQDN]
    return []


def _unmapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """*address*, with an IPv4-mapped IPv6 address (::ffff:a.b.c.d) as IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _is_this_host(
    client: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    request: PolicyRequest,
) -> bool:
    """Whether the client is this host itself (loopback, or our own address).

    A local program (cron, a web application, a content filter reinjecting)
    that says HELO localhost or our own name is telling the truth.
    """
    if client is None:
        return False
    if client.is_loopback:
        return True
    server = _unmapped(_address(request.attributes.get("server_address", "")))
    return server is not None and server == client


IdentityKey = tuple[str, bytes | None, bytes | None, bytes | None, bytes | None]


def identity_key(request: PolicyRequest) -> IdentityKey:
    """What `identity` reads from *request*, raw: equal keys, equal identities."""
    raw = request.raw
    return (
        request.client_address,
        raw.get(b"client_name"),
        raw.get(b"reverse_client_name"),
        # Not judged before HELO: a session's CONNECT and its RCPTs differ.
        None if request.protocol_state in SESSION_STATES else raw.get(b"helo_name"),
        raw.get(b"server_address"),
    )


def identity(
    request: PolicyRequest, settings: PolicySettings, key: IdentityKey | None = None
) -> tuple[str, ...]:
    """
    The suspicious traits of who *request*'s client says it is.

    Its names (verified and reverse) and, from ``HELO``/``EHLO`` on, its HELO:
    at ``CONNECT`` (or ``XCLIENT``) the HELO is not known yet, so not judged.
    A function of its `identity_key` (and the settings), read from the
    request unless *key* is given, so the same for every request of a
    session that repeats them.
    """
    address, name, reverse, helo, _ = identity_key(request) if key is None else key
    found: list[str] = []
    if name == b"unknown":
        found.append(NO_CLIENT_NAME)
    reverse_name = decode(reverse or b"")
    if reverse_name == _UNKNOWN:
        found.append(NO_REVERSE_NAME)
    elif looks_dynamic(reverse_name, address):
        found.append(DYNAMIC_NAME)
    if helo is not None:
        found += _helo_signals(decode(helo), request, settings)
    return tuple(found)


def signals(
    request: PolicyRequest,
    client: ClientStats,
    now_since_refusal: float | None,
    settings: PolicySettings,
    known_identity: tuple[str, ...] | None = None,
) -> list[str]:
    """
    The suspicious traits *request* shows, from what its stage offers.

    Who the client is (`identity`; *known_identity* when the caller has it
    from an earlier request of the session), then what it does: processes
    held at once, message and session rates, a quick retry after a refusal,
    holding processes without progress.
    """
    found = list(
        identity(request, settings) if known_identity is None else known_identity
    )
    if client.concurrency > settings.client_concurrency_limit:
        found.append(CONCURRENCY)
    if client.message_rate > settings.client_message_rate_limit:
        found.append(MESSAGE_RATE)
    if client.session_rate > settings.client_session_rate_limit:
        found.append(SESSION_RATE)
    if (
        now_since_refusal is not None
        and now_since_refusal < settings.quick_retry_window
    ):
        found.append(QUICK_RETRY)
    if client.held > settings.hold_limit:
        found.append(PROCESS_HOLDER)
    return found


def max_pressure(settings: PolicySettings) -> int:
    """How many steps a lasting overload can lower the bar."""
    return max(0, settings.suspicious_score - settings.overload_suspicious_score)


def bar(level: int, pressure: int, settings: PolicySettings) -> int:
    """
    The score from which a client is refused at *level*.

    ``POLICYD_SUSPICIOUS_SCORE`` at ``elevated``; at ``overload`` it falls
    one point per step of *pressure* (the tracker's count of how long the
    overload has lasted), down to ``POLICYD_OVERLOAD_SUSPICIOUS_SCORE``: by
    default, once overload has lasted, a single identity sign is enough for a
    temporary refusal.
    """
    if level == OVERLOAD:
        return max(
            min(settings.overload_suspicious_score, settings.suspicious_score),
            settings.suspicious_score - pressure,
        )
    return settings.suspicious_score


def decide(
    request: PolicyRequest,
    level: int,
    client: ClientStats,
    settings: PolicySettings,
    pressure: int = 0,
    known_identity: tuple[str, ...] | None = None,
    verdicts: dict[tuple[tuple[str, ...], int, int], Verdict] | None = None,
) -> Verdict:
    """
    The verdict for *request* at stress *level* (and overload *pressure*).

    *known_identity*: the client's `identity`, when the caller knows it
    (from an earlier request of the session with the same `identity_key`).
    *verdicts*: a memo of `judge` the caller keeps for these *settings*
    (and empties when they change): under a flood the same few sets of
    signals come up again and again.
    """
    if level == NORMAL:
        return Verdict(DUNNO, PASS, level, 0, ())
    exempt = exemption(request, settings)
    if exempt is not None:
        return Verdict(DUNNO, EXEMPT, level, 0, (), exempt)
    found = signals(request, client, client.since_refusal, settings, known_identity)
    needed = bar(level, pressure, settings)
    if not found:
        # Most clients show nothing suspicious: no score to add up (it is 0,
        # and a client without reasons is never refused, whatever the bar).
        return Verdict(DUNNO, PASS, level, 0, (), bar=needed)
    if verdicts is None:
        return judge(tuple(found), level, needed, settings)
    key = (tuple(found), level, needed)
    verdict = verdicts.get(key)
    if verdict is None:
        if len(verdicts) >= VERDICTS_KEPT:
            verdicts.clear()
        verdict = verdicts[key] = judge(key[0], level, needed, settings)
    return verdict


#: The most verdicts a `decide` memo keeps (see *verdicts*): the signals
#: found, the level and the bar make few combinations.
VERDICTS_KEPT: Final = 4096


def judge(
    found: tuple[str, ...], level: int, needed: int, settings: PolicySettings
) -> Verdict:
    """The verdict on a client showing *found*, at *level*, with the bar at *needed*."""
    weights = settings.weights
    score = sum(weights[s] for s in found)
    # A signal weighted 0 is switched off, and a negative one speaks for the
    # client: neither is a reason to refuse, in the reply, the log or the
    # metric.
    reasons = tuple(s for s in found if weights[s] > 0)
    if score < needed or all(s in BEHAVIOUR_SIGNALS for s in reasons):
        return Verdict(DUNNO, PASS, level, score, reasons, bar=needed)
    firm = sum(weights[s] for s in found if s not in TEMPORARY_SIGNALS)
    # For good only if who it claims to be is suspect in itself, DNS aside:
    # behaviour (a queue flushed after a deferral comes back fast, on many
    # connections) on top of a missing PTR must never lose mail for good.
    very = firm >= settings.reject_score and (
        sum(
            weights[s]
            for s in found
            if s not in TEMPORARY_SIGNALS and s not in BEHAVIOUR_SIGNALS
        )
        >= settings.suspicious_score
    )
    if level == OVERLOAD:
        template = settings.overload_reject_action if very else settings.overload_action
    elif level == ELEVATED:
        template = settings.elevated_reject_action if very else settings.elevated_action
    else:
        raise ValueError(f"unknown stress level {level}")
    action = refusal(template, reasons)
    return Verdict(action, outcome_of(action), level, score, reasons, bar=needed)


# The classes of clients holding smtpd processes (a metric label).
CLEAN: Final = "clean"
SUSPICIOUS: Final = "suspicious"
HOLDER_CLASSES: Final = (CLEAN, SUSPICIOUS, EXEMPT)


def holder_class(
    request: PolicyRequest, client: ClientStats, settings: PolicySettings
) -> str:
    """
    Whether *request*'s client is exempt, suspicious or clean.

    Suspicious means policyd refuses it once overload has lasted (at the
    lowest bar); clean ones it never refuses for load, so when they hold
    the processes the overload is a legitimate surge, which policyd cannot
    relieve.
    """
    verdict = decide(request, OVERLOAD, client, settings, max_pressure(settings))
    if verdict.exemption is not None:
        return EXEMPT
    return SUSPICIOUS if verdict.refused else CLEAN


# Keywords that refuse temporarily; every other keyword allowed in a matrix
# cell (DUNNO, WARN, INFO) lets the client through.
_DEFER_KEYWORDS: Final = frozenset({"DEFER", "DEFER_IF_PERMIT", "DEFER_IF_REJECT"})


def outcome_of(action: Action) -> str:
    """`REJECT`, `DEFER` or `PASS`: what *action* does to the client."""
    label = action.label
    if label == "REJECT" or label.startswith("5"):
        return REJECT
    if label in _DEFER_KEYWORDS or label.startswith("4"):
        return DEFER
    return PASS


# Replies after which smtpd hangs up at once (Postfix 2.6+ for 521).
_HANGUP_CODES: Final = frozenset({"421", "521"})


def hangs_up(action: Action) -> bool:
    """Whether Postfix disconnects the client at once after *action*."""
    return action.label in _HANGUP_CODES


def refusal(template: str, reasons: Sequence[str]) -> Action:
    """The action of *template* with ``{reasons}`` filled in."""
    return _refusal(template, tuple(reasons))


# Few templates (four matrix cells) times few sets of reasons: a refusal's
# action is parsed and validated once, not for every bot.
@functools.lru_cache(maxsize=1024)
def _refusal(template: str, reasons: tuple[str, ...]) -> Action:
    return Action.parse(template.replace(REASONS_PLACEHOLDER, " ".join(reasons)))
