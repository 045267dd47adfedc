"""Configuration: one frozen class, read once from ``POLICYD_*`` variables.

Every setting is an environment variable with a default written the way an
admin would write it, a converter that turns it into a typed value (or raises
`ValueError` whose message states the accepted form), and help text.  The
docs and ``policyd config`` are generated from these declarations.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, cast

import attrs
import environ
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from policyd.actions import Action, InvalidAction
from policyd.policy import SIGNALS as _ALL_REASONS
from policyd.protocol import MAX_ATTRIBUTES, MAX_LINE_LENGTH, MAX_REQUEST_BYTES
from policyd.resp import RedisURL, hide_password, parse_url

PREFIX = "POLICYD"


class ConfigError(Exception):
    """A variable has a value policyd cannot use."""

    def __init__(self, variable: str, value: str, problem: str) -> None:
        super().__init__(variable, value, problem)
        self.variable = variable
        self.value = value
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.variable}={self.value!r} is invalid: {self.problem}"


# -- converters: each takes the raw string and raises ValueError on bad input --

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?\s*\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(minimum: float, maximum: float) -> Callable[[str], float]:
    """Seconds, as ``10``, ``1.5s``, ``250ms``, ``5m`` or ``1h``."""

    def convert(raw: str) -> float:
        match = _DURATION.match(raw)
        if match is None:
            raise ValueError(
                "expected a duration such as 10, 1.5s, 250ms, 5m or 1h "
                f"(between {minimum:g}s and {maximum:g}s)"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if not minimum <= seconds <= maximum:
            raise ValueError(
                f"expected a duration between {minimum:g}s and {maximum:g}s"
            )
        return seconds

    return convert


def integer(minimum: int, maximum: int) -> Callable[[str], int]:
    """A whole number within bounds."""

    def convert(raw: str) -> int:
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise ValueError(
                f"expected a whole number from {minimum} to {maximum}"
            ) from None
        if not minimum <= value <= maximum:
            raise ValueError(f"expected a whole number from {minimum} to {maximum}")
        return value

    return convert


def choice(
    *choices: str, aliases: Mapping[str, str] | None = None
) -> Callable[[str], str]:
    """One of a fixed set of words, case-insensitive; *aliases* map to them."""

    def convert(raw: str) -> str:
        value = raw.strip().lower()
        value = (aliases or {}).get(value, value)
        if value not in choices:
            raise ValueError("expected one of: " + ", ".join(choices))
        return value

    return convert


_SYSTEMD_FIELDS = frozenset({"domain", "index", "name"})


def _check_endpoint(description: str) -> None:
    if description.startswith("systemd:"):
        # The systemd parser resolves inherited descriptors while parsing, so
        # outside a socket-activated start only the syntax can be checked.
        fields = dict(part.partition("=")[::2] for part in description.split(":")[1:])
        if fields.get("domain") not in {"INET", "INET6", "UNIX"}:
            raise ValueError(
                "a systemd endpoint needs domain=INET, INET6 or UNIX, e.g. "
                "systemd:domain=INET:index=0"
            )
        if ("index" in fields) == ("name" in fields):
            raise ValueError(
                "a systemd endpoint needs exactly one of index= or name=, e.g. "
                "systemd:domain=INET:index=0"
            )
        # Twisted would only fail on these at start-up, and would read a
        # negative index from the end of the inherited descriptors.
        if "index" in fields and not re.fullmatch(r"[0-9]+", fields["index"]):
            raise ValueError(
                "a systemd endpoint's index= must be a whole number from 0, e.g. "
                "systemd:domain=INET:index=0"
            )
        if "name" in fields and not fields["name"]:
            raise ValueError(
                "a systemd endpoint's name= must not be empty, e.g. "
                "systemd:domain=INET:name=policyd"
            )
        if not fields.keys() <= _SYSTEMD_FIELDS:
            raise ValueError(
                "a systemd endpoint takes only domain=, index= and name=, e.g. "
                "systemd:domain=INET:index=0"
            )
        return
    try:
        endpoint = serverFromString(MemoryReactor(), description)
    # Endpoint parsers may fail in any way: a missing optional module (ssl
    # without pyOpenSSL), an unreadable certificate file, a bad argument.
    except Exception as e:  # noqa: BLE001 - reported as a configuration error
        raise ValueError(
            f"{description!r} is not a server endpoint description ({e}); "
            "expected e.g. tcp:10040:interface=127.0.0.1, "
            "unix:/run/policyd/policy.sock:mode=660 or systemd:domain=INET:index=0"
        ) from None
    # TCP endpoints do not check the port range until they bind.
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ValueError(
            f"{description!r} has port {port}; expected a port from 0 to 65535, "
            "e.g. tcp:10040:interface=127.0.0.1"
        )


def endpoints(raw: str) -> tuple[str, ...]:
    """One or more Twisted server endpoint descriptions, separated by spaces."""
    descriptions = tuple(raw.split())
    if not descriptions:
        raise ValueError(
            "expected at least one endpoint description, "
            "e.g. tcp:10040:interface=127.0.0.1"
        )
    for description in descriptions:
        _check_endpoint(description)
    return descriptions


def fraction(raw: str) -> float:
    """A number from 0 to 1, e.g. 0.7."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number from 0 to 1, e.g. 0.7") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError("expected a number from 0 to 1, e.g. 0.7")
    return value


def positive_number(raw: str) -> float:
    """A number of zero or more, e.g. 500 or 12.5."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number of zero or more, e.g. 500") from None
    if not 0.0 <= value < float("inf"):
        raise ValueError("expected a number of zero or more, e.g. 500")
    return value


def optional_endpoint(raw: str) -> str | None:
    """One endpoint description, or ``none`` to disable."""
    if raw.strip().lower() == "none":
        return None
    descriptions = endpoints(raw)
    if len(descriptions) != 1:
        raise ValueError("expected one endpoint description, or none to disable")
    return descriptions[0]


# What a matrix cell may answer: a refusal, or (to switch a cell off, or to
# only log) DUNNO, WARN or INFO.  HOLD, DISCARD, FILTER, REDIRECT, BCC and
# PREPEND accept the mail and add work under stress, or lose it (DISCARD),
# and Postfix skips them with a warning at the CONNECT stage.
_CELL_KEYWORDS = frozenset(
    {"REJECT", "DEFER", "DEFER_IF_PERMIT", "DEFER_IF_REJECT", "DUNNO", "WARN", "INFO"}
)


def action_template(raw: str) -> str:
    """A reply action, where ``{reasons}`` stands for the refusal's reasons."""
    text = raw.strip()
    # Check the longest text the template can produce: every reason at once.
    longest = text.replace("{reasons}", " ".join(_ALL_REASONS))
    try:
        action = Action.parse(longest)
    except InvalidAction as e:
        raise ValueError(
            f"{e} (checked with every reason filled into {{reasons}})"
        ) from None
    if action.label not in _CELL_KEYWORDS and not action.label[0].isdigit():
        raise ValueError(
            "expected a 4xx/5xx code with text, REJECT, DEFER, DEFER_IF_PERMIT, "
            "DEFER_IF_REJECT, or DUNNO, WARN or INFO to refuse nobody"
        )
    return text


def networks(
    raw: str,
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDR networks or addresses, separated by spaces or commas."""
    result = []
    for item in raw.replace(",", " ").split():
        try:
            result.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"{item!r} is not a network; expected CIDR networks or addresses "
                "separated by spaces or commas, e.g. 192.0.2.0/24 2001:db8::/32"
            ) from None
    return tuple(result)


#: What ``any`` stands for in POLICYD_ALLOW_PEERS.
EVERYWHERE: Final = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)


def peer_networks(
    raw: str,
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDR networks or addresses (at least one), or ``any``."""
    if raw.strip().lower() == "any":
        return EVERYWHERE
    result = networks(raw)
    if not result:
        raise ValueError(
            "expected at least one network (CIDR, separated by spaces or commas), "
            "or 'any' to let every peer connect"
        )
    return result


_HOST_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._:-]*[A-Za-z0-9])?\Z")


def host_capacities(raw: str) -> tuple[tuple[str, int], ...]:
    """``HOST=PROCESSES`` pairs, separated by spaces or commas."""
    result: dict[str, int] = {}
    for item in raw.replace(",", " ").split():
        name, sep, number = item.partition("=")
        if not sep or not _HOST_ID.match(name):
            raise ValueError(
                f"{item!r} is not HOST=PROCESSES; expected pairs such as "
                "'mx1=200 192.0.2.21=50' (HOST: a policy_context value or an "
                "IP address, PROCESSES: the smtpd process limit there)"
            )
        try:
            count = int(number, 10)
        except ValueError:
            count = 0
        if not 1 <= count <= 1_000_000:
            raise ValueError(
                f"{item!r}: the process limit must be a whole number from 1 to 1000000"
            )
        # An address as policyd names a peer (compressed, lower case), so
        # that 2001:DB8::21 matches the host 2001:db8::21.
        with contextlib.suppress(ValueError):
            name = str(ipaddress.ip_address(name))
        if name in result:
            raise ValueError(f"{name!r} is given twice")
        result[name] = count
    return tuple(result.items())


_HOSTNAME = re.compile(
    r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*\Z"
)


def hostnames(raw: str) -> tuple[str, ...]:
    """Host or domain names, separated by spaces or commas; lower-cased."""
    result = []
    for item in raw.replace(",", " ").split():
        name = item.lower().rstrip(".")
        if not _HOSTNAME.match(name):
            raise ValueError(
                f"{item!r} is not a host or domain name; expected names separated "
                "by spaces or commas, e.g. example.com mail.example.com"
            )
        result.append(name)
    return tuple(result)


def redis_url(raw: str) -> RedisURL:
    """A Redis URL (`policyd.resp.parse_url`)."""
    return parse_url(raw)


_KEY_PREFIX = re.compile(r"[!-~]{1,64}\Z")


def key_prefix(raw: str) -> str:
    """Text before every Redis key: printable, no spaces, at most 64 bytes."""
    value = raw.strip()
    if not _KEY_PREFIX.match(value):
        raise ValueError(
            "expected 1 to 64 printable ASCII characters without spaces, "
            "e.g. policyd: or mx-cluster-1:"
        )
    return value


#: POLICYD_SMTPD_CAPACITY=auto, as the configuration holds it until the
#: capacity is read from Postfix (`policyd.doctor.auto_capacity`).
AUTO_CAPACITY: Final = 0


def capacity(raw: str) -> int:
    """A process count from 1 to 1000000, or ``auto`` (`AUTO_CAPACITY`)."""
    if raw.strip().lower() == "auto":
        return AUTO_CAPACITY
    try:
        return integer(1, 1_000_000)(raw)
    except ValueError:
        raise ValueError("expected a whole number from 1 to 1000000, or auto") from None


def list_file(raw: str) -> str:
    """The absolute path of a list file, or empty for none."""
    path = raw.strip()
    if path and not path.startswith("/"):
        raise ValueError("expected an absolute path, e.g. /etc/policyd/allow-networks")
    return path


def flag(raw: str) -> bool:
    """A yes/no switch: 1/yes/true/on or 0/no/false/off."""
    value = raw.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off", ""):
        return False
    raise ValueError("expected 1/yes/true/on or 0/no/false/off")


def fallback_action(raw: str) -> Action:
    """An action that never refuses mail for good."""
    try:
        return Action.parse_fallback(raw.strip())
    except InvalidAction as e:
        raise ValueError(str(e)) from None


def _setting(default: str, converter: Callable[[str], Any], help: str) -> Any:
    return environ.var(default, converter=converter, help=help)


@environ.config(prefix=PREFIX, frozen=True)
class Config:
    """Everything policyd can be told, with the defaults it runs on."""

    listen: tuple[str, ...] = _setting(
        "tcp:10040:interface=127.0.0.1",
        endpoints,
        "Where Postfix connects: one or more Twisted server endpoint descriptions "
        "separated by spaces, e.g. 'tcp:10040:interface=127.0.0.1', "
        "'unix:/var/spool/postfix/private/policyd:mode=660' or "
        "'systemd:domain=INET:index=0' for socket activation.",
    )
    allow_peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _setting(
        "127.0.0.0/8 ::1",
        peer_networks,
        "Who may connect to the policy service over TCP: CIDR networks or "
        "addresses, separated by spaces or commas, or 'any'.  Connections "
        "from elsewhere are closed at once, unanswered (counted in "
        "policyd_peers_refused_total).  Add your MX hosts when policyd "
        "listens beyond loopback.  Unix-socket peers are not checked: the "
        "socket's file permissions decide.",
    )
    metrics_listen: str | None = _setting(
        "tcp:10041:interface=127.0.0.1",
        optional_endpoint,
        "Where the HTTP server for /metrics (Prometheus) and /healthz listens, "
        "as one endpoint description; 'none' disables it.",
    )
    log_level: str = _setting(
        "info",
        choice("debug", "info", "warn", "error", aliases={"warning": "warn"}),
        "Least severe log level written to stdout: debug (one line per request), "
        "info, warn or error.",
    )
    log_format: str = _setting(
        "text",
        choice("text", "json"),
        "Log format: 'text' for people, 'json' for one JSON object per line.",
    )
    decision_timeout: float = _setting(
        "1s",
        duration(0.001, 60),
        "Longest a decision may take; a slower one gets the fallback action. Keep it "
        "far below the 'timeout=' of check_policy_service in Postfix.",
    )
    fallback_action: Action = _setting(
        "DUNNO",
        fallback_action,
        "Answer when a decision fails or times out. Only actions that pass or defer "
        "mail are accepted (DUNNO, DEFER..., WARN, INFO, or a 4xx code with text).",
    )
    request_timeout: float = _setting(
        "10s",
        duration(0.1, 3600),
        "A connection that has sent part of a request but not its end within this "
        "long is closed without a reply (Postfix writes a request in one go).",
    )
    idle_timeout: float = _setting(
        "600s",
        duration(1, 86400),
        "An idle connection is closed after this long. Keep it above Postfix's "
        "smtpd_policy_service_max_idle (300s by default) so that Postfix, not "
        "policyd, closes idle connections.",
    )
    max_line_length: int = _setting(
        str(MAX_LINE_LENGTH),
        integer(64, 1 << 20),
        "Longest accepted attribute line in bytes; a longer one closes the "
        "connection without a reply.",
    )
    max_attributes: int = _setting(
        str(MAX_ATTRIBUTES),
        integer(8, 10000),
        "Most attributes in one request (Postfix 3.x sends about 30); more closes "
        "the connection without a reply.",
    )
    max_request_bytes: int = _setting(
        str(MAX_REQUEST_BYTES),
        integer(256, 1 << 24),
        "Largest accepted request in bytes; a larger one closes the connection "
        "without a reply.",
    )
    # -- stress detection (docs/stress.md explains the defaults) --
    smtpd_capacity: int = _setting(
        "100",
        capacity,
        "How many smtpd processes of one Postfix host can use policyd at once: "
        "the sum of the maxproc values of the smtpd services (master.cf) that "
        "call it; count a service twice if it calls policyd from two "
        "restriction lists with different check_policy_service texts. "
        "Postfix's default_process_limit is 100. 'auto' reads it from this "
        "host's Postfix (postconf, postconf -M) at start-up and on SIGHUP, as "
        "policyd doctor counts it. Each host served has its own load against "
        "this (see POLICYD_HOST_FROM, POLICYD_HOST_CAPACITIES).",
    )
    postfix_config_dir: str = _setting(
        "",
        list_file,
        "The Postfix configuration directory that POLICYD_SMTPD_CAPACITY=auto "
        "reads (postconf -c DIR), e.g. /etc/postfix-out for a second instance; "
        "empty: Postfix's default.",
    )
    host_from: str = _setting(
        "peer",
        choice("peer", "policy_context"),
        "How policyd tells the Postfix hosts it serves apart, each with its own "
        "load and stress level: 'peer', by the address of the policy "
        "connection (every loopback or unix-socket peer is the one host "
        "'local'); 'policy_context', by the policy_context attribute that "
        "check_policy_service { ..., policy_context=NAME } sends (Postfix 3.1+; "
        "connections without it are told apart by peer).",
    )
    host_capacities: tuple[tuple[str, int], ...] = _setting(
        "",
        host_capacities,
        "Process limits of named hosts, overriding POLICYD_SMTPD_CAPACITY for "
        "them: HOST=PROCESSES pairs separated by spaces or commas, HOST being an "
        "IP address (POLICYD_HOST_FROM=peer) or a policy_context value.",
    )
    # -- sharing client state between MX hosts (docs/cluster.md) --
    backend: str = _setting(
        "memory",
        choice("memory", "redis"),
        "Where per-client state lives: 'memory' (this process) or 'redis' "
        "(shared by every policyd on POLICYD_REDIS_URL, so that a client "
        "refused by one MX is known to the others). The load of each Postfix "
        "host is always counted here.",
    )
    redis_url: RedisURL = _setting(
        "redis://127.0.0.1:6379/0",
        redis_url,
        "The Redis of POLICYD_BACKEND=redis: redis://[[USER]:PASSWORD@]HOST"
        "[:PORT][/DB], rediss://... for TLS (?ca=/path/ca.pem to trust a "
        "private authority), unix://[[USER]:PASSWORD@]/path/redis.sock"
        "[?db=N], or redis+sentinel://SENTINEL[:PORT],SENTINEL.../NAME[/DB] "
        "(a user and password as above) for the master that Redis Sentinel "
        "names NAME.",
    )
    redis_prefix: str = _setting(
        "policyd:",
        key_prefix,
        "Put before every Redis key policyd writes; policyd instances that "
        "share clients must use the same prefix (and the same "
        "POLICYD_CLIENT_RATE_WINDOW, POLICYD_HOLD_WINDOW and prefix lengths).",
    )
    redis_deadline: float = _setting(
        "20ms",
        duration(0.001, 10),
        "Longest a decision waits for Redis; after it, or at once while Redis "
        "is known to be down, the client is decided on what this policyd "
        "knows itself. Must be below POLICYD_DECISION_TIMEOUT.",
    )
    redis_timeout: float = _setting(
        "2s",
        duration(0.1, 60),
        "Connecting to Redis may take this long; a connection whose reply is "
        "this late is dropped and made again (with a growing delay between "
        "attempts, up to 5s).",
    )
    busy_window: float = _setting(
        "10s",
        duration(0.1, 3600),
        "A connection that sent a request within this long counts as a busy smtpd "
        "process (one inside an SMTP transaction counts until "
        "POLICYD_TRANSACTION_TIMEOUT).",
    )
    transaction_timeout: float = _setting(
        "30s",
        duration(1, 86400),
        "A connection whose last request belonged to an SMTP transaction (had an "
        "instance) counts as busy for this long after it, unless a later request "
        "shows the transaction ended (a new instance, none, or END-OF-MESSAGE). "
        "Covers the DATA phase, where Postfix asks nothing with the default "
        "wiring.",
    )
    close_linger: float = _setting(
        "5s",
        duration(0, 3600),
        "A busy connection that closes still counts as busy for up to this long "
        "(never past its busy window): at its process limit, master replaces "
        "every smtpd process after its session, and the load must not seem to "
        "dip while it does.",
    )
    elevated_enter: float = _setting(
        "0.7",
        fraction,
        "Load ratio (busy smtpd processes / POLICYD_SMTPD_CAPACITY, or request "
        "rate / POLICYD_RATE_CAPACITY, the larger) at which the level becomes "
        "elevated.",
    )
    elevated_exit: float = _setting(
        "0.5",
        fraction,
        "Load ratio below which an elevated level may fall back to normal, after "
        "POLICYD_LEVEL_MIN_DWELL. Must be below POLICYD_ELEVATED_ENTER.",
    )
    overload_enter: float = _setting(
        "0.9",
        fraction,
        "Load ratio at which the level becomes overload. Must be at least "
        "POLICYD_ELEVATED_ENTER.",
    )
    overload_exit: float = _setting(
        "0.75",
        fraction,
        "Load ratio below which overload may fall back to elevated, after "
        "POLICYD_LEVEL_MIN_DWELL. Must be below POLICYD_OVERLOAD_ENTER.",
    )
    level_min_dwell: float = _setting(
        "30s",
        duration(0, 3600),
        "A level is left for a lower one only after the load has stayed below its "
        "exit threshold this long, so that the level does not flap. Rising is "
        "immediate.",
    )
    rate_capacity: float = _setting(
        "0",
        positive_number,
        "Policy requests per second that count as full load (load ratio 1.0); 0 "
        "leaves the request rate out of the load. Set it from your own peak "
        "traffic: requests per second depend on recipients per message.",
    )
    rate_window: float = _setting(
        "10s",
        duration(1, 300),
        "The request rate is averaged over this many seconds (whole seconds).",
    )
    postfix_stress_hold: float = _setting(
        "60s",
        duration(0, 86400),
        "After a request carrying Postfix's stress=yes, the level stays at least "
        "POLICYD_POSTFIX_STRESS_LEVEL for this long. Postfix marks smtpd "
        "processes started while it is at its process limit, for their whole life.",
    )
    postfix_stress_level: str = _setting(
        "overload",
        choice("overload", "elevated", "ignore"),
        "The level that Postfix's stress=yes implies: overload, elevated, or ignore "
        "(policyd's own measure alone decides).",
    )
    postfix_stress_min_load: float = _setting(
        "0.5",
        fraction,
        "Postfix's stress=yes counts only while the load ratio is at least this: "
        "master keeps marking new smtpd processes for 1000 s after it last hit "
        "the process limit, so on its own stress=yes means 'was saturated lately'. "
        "0 counts it whatever the load.",
    )
    client_ipv4_prefix: int = _setting(
        "32",
        integer(8, 32),
        "IPv4 clients are counted per address prefix of this length (32: each "
        "address on its own).",
    )
    client_ipv6_prefix: int = _setting(
        "64",
        integer(16, 128),
        "IPv6 clients are counted per prefix of this length (64: one site or "
        "subscriber).",
    )
    max_tracked_clients: int = _setting(
        "100000",
        integer(100, 100_000_000),
        "Most clients (address prefixes) remembered at once; the least recently "
        "seen is forgotten first. Memory is a few hundred bytes per client.",
    )
    client_rate_window: float = _setting(
        "60s",
        duration(1, 86400),
        "Per-client session, message and refusal counts decay exponentially with "
        "this time constant; rates are reported per minute.",
    )

    # -- decisions (docs/decisions.md explains the matrix) --
    dry_run: bool = _setting(
        "0",
        flag,
        "1 to never refuse: log and count what would have happened instead.",
    )
    refusal_log_limit: int = _setting(
        "100",
        integer(0, 1_000_000),
        "Most refusal log events per second; beyond it refusals are still counted "
        "(policyd_decisions_total) and summed up in one warning. 0: log every one.",
    )
    dry_run_warn: bool = _setting(
        "0",
        flag,
        "In dry run, answer WARN with the action policyd would have sent, so that "
        "it shows in Postfix's log (instead of DUNNO).",
    )
    suspicious_score: int = _setting(
        "3",
        integer(1, 1000),
        "Score from which a client is suspicious: under stress it gets the "
        "temporary action of the level.",
    )
    overload_suspicious_score: int = _setting(
        "2",
        integer(1, 1000),
        "The lowest score from which a client is suspicious at the overload "
        "level, reached once overload has lasted (see POLICYD_BAR_STEP): the "
        "bar falls from POLICYD_SUSPICIOUS_SCORE one point per step. 2 (the "
        "weight of one identity sign) refuses, temporarily, a client with a "
        "single sign. At or above POLICYD_SUSPICIOUS_SCORE the bar stays fixed.",
    )
    bar_step: float = _setting(
        "10s",
        duration(0, 3600),
        "How long overload must last, with the load above POLICYD_OVERLOAD_EXIT, "
        "to lower the bar by one point, and how long the load must stay below "
        "it to raise the bar again by one. 0 lowers it as soon as overload "
        "begins.",
    )
    reject_score: int = _setting(
        "8",
        integer(1, 1000),
        "Score, counted without the reverse-DNS signals (a temporary DNS failure "
        "looks the same), from which a suspicious client is very suspicious and "
        "gets the *_REJECT_ACTION of the level.",
    )
    weight_no_client_name: int = _setting(
        "2",
        integer(-100, 100),
        "Score for a client without a verified reverse name (client_name=unknown).",
    )
    weight_no_reverse_name: int = _setting(
        "2",
        integer(-100, 100),
        "Score for a client without any PTR record (reverse_client_name=unknown).",
    )
    weight_dynamic_name: int = _setting(
        "2",
        integer(-100, 100),
        "Score for a reverse name that looks like a dial-up, DSL, cable or pool "
        "address (the address written into it, or tokens such as dyn, dsl, pool, "
        "dhcp, cust).",
    )
    weight_no_helo: int = _setting(
        "2",
        integer(-100, 100),
        "Score for a client that sent no HELO/EHLO (judged from the HELO stage on).",
    )
    weight_helo_not_fqdn: int = _setting(
        "2",
        integer(-100, 100),
        "Score for a HELO name that is not a fully qualified domain name (a bare "
        "word, or invalid characters).",
    )
    weight_helo_bare_ip: int = _setting(
        "3",
        integer(-100, 100),
        "Score for a HELO that is a bare IP address instead of a name or an "
        "[address literal].",
    )
    weight_helo_foreign_literal: int = _setting(
        "3",
        integer(-100, 100),
        "Score for a HELO address literal ([192.0.2.1]) that is not the client's "
        "own address.",
    )
    weight_helo_impersonates: int = _setting(
        "5",
        integer(-100, 100),
        "Score for a HELO claiming to be localhost or one of POLICYD_MY_HOSTNAMES.",
    )
    weight_concurrency: int = _setting(
        "3",
        integer(-100, 100),
        "Score for a client holding more smtpd processes than "
        "POLICYD_CLIENT_CONCURRENCY_LIMIT.",
    )
    weight_message_rate: int = _setting(
        "2",
        integer(-100, 100),
        "Score for a client starting more messages per minute than "
        "POLICYD_CLIENT_MESSAGE_RATE_LIMIT.",
    )
    weight_session_rate: int = _setting(
        "2",
        integer(-100, 100),
        "Score for a client opening more sessions per minute than "
        "POLICYD_CLIENT_SESSION_RATE_LIMIT (seen only with connect-stage wiring).",
    )
    weight_quick_retry: int = _setting(
        "3",
        integer(-100, 100),
        "Score for a client coming back within POLICYD_QUICK_RETRY_WINDOW of being "
        "refused (real MTAs wait minutes before retrying).",
    )
    weight_process_holder: int = _setting(
        "3",
        integer(-100, 100),
        "Score for a client that held smtpd processes without progress for more "
        "than POLICYD_HOLD_LIMIT (it counts towards temporary refusals only).",
    )
    hold_limit: float = _setting(
        "20s",
        duration(0, 86400),
        "Process time a client (address prefix) may hold without progress, decayed "
        "over POLICYD_HOLD_WINDOW, before it scores POLICYD_WEIGHT_PROCESS_HOLDER.",
    )
    hold_grace: float = _setting(
        "5s",
        duration(0, 3600),
        "The part of every wait between two requests of one session that is not "
        "held against the client (round trips of a slow link, Postfix's own DNS "
        "lookups). The wait from DATA to the end of the message is never held "
        "against it.",
    )
    hold_window: float = _setting(
        "10m",
        duration(1, 86400),
        "Time constant with which the process time a client held without "
        "progress is forgotten.",
    )
    client_concurrency_limit: int = _setting(
        "5",
        integer(1, 100000),
        "smtpd processes one client (address prefix) may hold before it scores "
        "POLICYD_WEIGHT_CONCURRENCY.",
    )
    client_message_rate_limit: float = _setting(
        "30",
        positive_number,
        "Messages per minute one client may start before it scores "
        "POLICYD_WEIGHT_MESSAGE_RATE (0 means every client is over it: to switch "
        "the signal off, set its weight to 0).",
    )
    client_session_rate_limit: float = _setting(
        "30",
        positive_number,
        "Sessions per minute one client may open before it scores "
        "POLICYD_WEIGHT_SESSION_RATE (0 means every client is over it: to switch "
        "the signal off, set its weight to 0).",
    )
    quick_retry_window: float = _setting(
        "30s",
        duration(0, 86400),
        "A client that returns within this long after a refusal scores "
        "POLICYD_WEIGHT_QUICK_RETRY.",
    )
    my_hostnames: tuple[str, ...] = _setting(
        "",
        hostnames,
        "Names this MX is known by (e.g. Postfix's $myhostname); a HELO claiming "
        "one of them scores POLICYD_WEIGHT_HELO_IMPERSONATES. localhost always "
        "does.",
    )
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        _setting(
            "",
            networks,
            "Clients in these networks (CIDR, IPv4 and IPv6, separated by spaces or "
            "commas) are never refused.",
        )
    )
    allow_domains: tuple[str, ...] = _setting(
        "",
        hostnames,
        "Clients whose verified name (client_name) is one of these domains or under "
        "one are never refused.",
    )
    allow_networks_file: str = _setting(
        "",
        list_file,
        "A file of more networks never refused: one CIDR network or address a "
        "line, '#' comments. Read at start-up and again on SIGHUP (systemctl "
        "reload policyd); a reload with a bad line keeps the lists it had.",
    )
    allow_domains_file: str = _setting(
        "",
        list_file,
        "A file of more domains never refused (verified client names): one a "
        "line, '#' comments. Read at start-up and again on SIGHUP.",
    )
    elevated_action: str = _setting(
        "450 4.7.1 Busy; try again later ({reasons})",
        action_template,
        "Answer to a suspicious client at the elevated level; {reasons} is replaced "
        "by the signals that made it suspicious.",
    )
    elevated_reject_action: str = _setting(
        "450 4.7.1 Busy; try again later ({reasons})",
        action_template,
        "Answer to a very suspicious client at the elevated level (temporary by "
        "default: elevated never refuses for good unless you say so).",
    )
    overload_action: str = _setting(
        "421 4.7.0 Overloaded; try again later ({reasons})",
        action_template,
        "Answer to a suspicious client at the overload level; 421 makes Postfix "
        "hang up at once, freeing the smtpd process.",
    )
    overload_reject_action: str = _setting(
        "521 5.7.1 Refused: looks like a bot ({reasons})",
        action_template,
        "Answer to a very suspicious client at the overload level: a permanent "
        "refusal; 521 hangs up at once (Postfix 2.6+).",
    )


@attrs.frozen
class Setting:
    """One variable as ``policyd config`` shows it."""

    variable: str
    value: str
    default: str
    help: str

    @property
    def is_default(self) -> bool:
        """Whether the value comes from the built-in default."""
        return self.value == self.default


def _declarations() -> Iterator[tuple[attrs.Attribute[Any], str, str, str]]:
    for field in attrs.fields(cast(Any, Config)):
        entry = field.metadata[environ._environ_config.CNF_KEY]
        yield field, f"{PREFIX}_{field.name.upper()}", entry.default, entry.help


def variables() -> tuple[str, ...]:
    """Every variable name policyd reads."""
    return tuple(name for _, name, _, _ in _declarations())


def describe(env: Mapping[str, str]) -> list[Setting]:
    """The effective raw value, default and help of every variable."""
    return [
        Setting(name, env.get(name, default), default, help_text)
        for _, name, default, help_text in _declarations()
    ]


def load(env: Mapping[str, str]) -> Config:
    """Read the configuration from *env*, or raise `ConfigError`.

    The error names the first variable, in declaration order, that has an
    unusable value, and says what form is accepted.
    """
    for field, name, default, _ in _declarations():
        raw = env.get(name, default)
        convert = cast(Callable[[str], object], field.converter)
        try:
            convert(raw)
        except ValueError as e:
            # A URL's password stays out of the error (and so the logs).
            raise ConfigError(name, hide_password(raw), str(e)) from None
    loaded = environ.to_config(Config, dict(env))
    _check_thresholds(loaded, env)
    _check_list_files(loaded)
    return loaded


def _check_list_files(cfg: Config) -> None:
    """Each allow-list file must be readable, every line an entry."""
    from policyd.lists import ListFileError, read_domains, read_networks

    for name, path, read in (
        ("allow_networks_file", cfg.allow_networks_file, read_networks),
        ("allow_domains_file", cfg.allow_domains_file, read_domains),
    ):
        if not path:
            continue
        try:
            read(path)
        except ListFileError as e:
            raise ConfigError(f"{PREFIX}_{name.upper()}", path, str(e)) from None


# Two settings that must stand in a relation: what the first must be to the
# second, and the same said of the second (when the admin set only that one).
_RELATIONS: Final = {
    "<": ("must be below", "must be above"),
    ">=": ("must be at least", "must be at most"),
}


def _check_thresholds(cfg: Config, env: Mapping[str, str]) -> None:
    """
    Settings that must agree: exit < enter, elevated <= overload, and so on.

    The error blames the setting the admin set (the first of the pair if both
    or neither were), and names the other with its value, marked when it is
    the default: POLICYD_ELEVATED_ENTER=0.4 alone is "must be above
    POLICYD_ELEVATED_EXIT=0.5 (the default)".
    """
    pairs: list[tuple[str, str, str, bool, str]] = [
        ("elevated_exit", "<", "elevated_enter", True, ""),
        ("overload_exit", "<", "overload_enter", True, ""),
        ("overload_enter", ">=", "elevated_enter", True, ""),
        ("overload_exit", ">=", "elevated_exit", True, ""),
        (
            "redis_deadline",
            "<",
            "decision_timeout",
            cfg.backend == "redis",
            ", or a decision waiting for Redis would get the fallback action",
        ),
    ]
    defaults = {name: default for _, name, default, _ in _declarations()}

    def variable(field: str) -> str:
        return f"{PREFIX}_{field.upper()}"

    def raw(field: str) -> str:
        return env.get(variable(field), defaults[variable(field)])

    if not cfg.elevated_exit > 0:
        raise ConfigError(
            variable("elevated_exit"),
            raw("elevated_exit"),
            "must be above 0, or the elevated level could never be left",
        )
    for left, relation, right, applies, why in pairs:
        a, b = getattr(cfg, left), getattr(cfg, right)
        holds = a < b if relation == "<" else a >= b
        if not applies or holds:
            continue
        forward, backward = _RELATIONS[relation]
        blamed, words, other = left, forward, right
        if variable(right) in env and variable(left) not in env:
            blamed, words, other = right, backward, left
        note = "" if variable(other) in env else " (the default)"
        raise ConfigError(
            variable(blamed),
            raw(blamed),
            f"{words} {variable(other)}={raw(other)}{note}{why}",
        )


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """``POLICYD_*`` names in *env* that policyd does not know (likely typos)."""
    known = set(variables())
    return sorted(k for k in env if k.startswith(PREFIX + "_") and k not in known)
