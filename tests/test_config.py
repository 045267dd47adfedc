"""Configuration: defaults, accepted forms, and errors an admin can act on."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import attrs
import pytest

from policyd import config
from policyd.actions import DUNNO, MAX_ACTION_LENGTH, Action
from policyd.policy import SIGNALS
from policyd.resp import RedisURL

# The defaults as docs/configuration.md and `policyd config` document them.
DOCUMENTED_DEFAULTS = {
    "POLICYD_LISTEN": "tcp:10040:interface=127.0.0.1",
    "POLICYD_ALLOW_PEERS": "127.0.0.0/8 ::1",
    "POLICYD_METRICS_LISTEN": "tcp:10041:interface=127.0.0.1",
    "POLICYD_LOG_LEVEL": "info",
    "POLICYD_LOG_FORMAT": "text",
    "POLICYD_DECISION_TIMEOUT": "1s",
    "POLICYD_FALLBACK_ACTION": "DUNNO",
    "POLICYD_REQUEST_TIMEOUT": "10s",
    "POLICYD_IDLE_TIMEOUT": "600s",
    "POLICYD_MAX_LINE_LENGTH": "8192",
    "POLICYD_MAX_ATTRIBUTES": "128",
    "POLICYD_MAX_REQUEST_BYTES": "65536",
    "POLICYD_SMTPD_CAPACITY": "100",
    "POLICYD_POSTFIX_CONFIG_DIR": "",
    "POLICYD_HOST_FROM": "peer",
    "POLICYD_HOST_CAPACITIES": "",
    "POLICYD_BACKEND": "memory",
    "POLICYD_REDIS_URL": "redis://127.0.0.1:6379/0",
    "POLICYD_REDIS_PREFIX": "policyd:",
    "POLICYD_REDIS_DEADLINE": "20ms",
    "POLICYD_REDIS_TIMEOUT": "2s",
    "POLICYD_BUSY_WINDOW": "10s",
    "POLICYD_TRANSACTION_TIMEOUT": "30s",
    "POLICYD_CLOSE_LINGER": "5s",
    "POLICYD_ELEVATED_ENTER": "0.7",
    "POLICYD_ELEVATED_EXIT": "0.5",
    "POLICYD_OVERLOAD_ENTER": "0.9",
    "POLICYD_OVERLOAD_EXIT": "0.75",
    "POLICYD_LEVEL_MIN_DWELL": "30s",
    "POLICYD_RATE_CAPACITY": "0",
    "POLICYD_RATE_WINDOW": "10s",
    "POLICYD_POSTFIX_STRESS_HOLD": "60s",
    "POLICYD_POSTFIX_STRESS_LEVEL": "overload",
    "POLICYD_POSTFIX_STRESS_MIN_LOAD": "0.5",
    "POLICYD_CLIENT_IPV4_PREFIX": "32",
    "POLICYD_CLIENT_IPV6_PREFIX": "64",
    "POLICYD_MAX_TRACKED_CLIENTS": "100000",
    "POLICYD_CLIENT_RATE_WINDOW": "60s",
    "POLICYD_DRY_RUN": "0",
    "POLICYD_REFUSAL_LOG_LIMIT": "100",
    "POLICYD_DRY_RUN_WARN": "0",
    "POLICYD_SUSPICIOUS_SCORE": "3",
    "POLICYD_OVERLOAD_SUSPICIOUS_SCORE": "2",
    "POLICYD_BAR_STEP": "10s",
    "POLICYD_REJECT_SCORE": "8",
    "POLICYD_WEIGHT_NO_CLIENT_NAME": "2",
    "POLICYD_WEIGHT_NO_REVERSE_NAME": "2",
    "POLICYD_WEIGHT_DYNAMIC_NAME": "2",
    "POLICYD_WEIGHT_NO_HELO": "2",
    "POLICYD_WEIGHT_HELO_NOT_FQDN": "2",
    "POLICYD_WEIGHT_HELO_BARE_IP": "3",
    "POLICYD_WEIGHT_HELO_FOREIGN_LITERAL": "3",
    "POLICYD_WEIGHT_HELO_IMPERSONATES": "5",
    "POLICYD_WEIGHT_CONCURRENCY": "3",
    "POLICYD_WEIGHT_MESSAGE_RATE": "2",
    "POLICYD_WEIGHT_SESSION_RATE": "2",
    "POLICYD_WEIGHT_QUICK_RETRY": "3",
    "POLICYD_WEIGHT_PROCESS_HOLDER": "3",
    "POLICYD_HOLD_LIMIT": "20s",
    "POLICYD_HOLD_GRACE": "5s",
    "POLICYD_HOLD_WINDOW": "10m",
    "POLICYD_CLIENT_CONCURRENCY_LIMIT": "5",
    "POLICYD_CLIENT_MESSAGE_RATE_LIMIT": "30",
    "POLICYD_CLIENT_SESSION_RATE_LIMIT": "30",
    "POLICYD_QUICK_RETRY_WINDOW": "30s",
    "POLICYD_MY_HOSTNAMES": "",
    "POLICYD_ALLOW_NETWORKS": "",
    "POLICYD_ALLOW_DOMAINS": "",
    "POLICYD_ALLOW_NETWORKS_FILE": "",
    "POLICYD_ALLOW_DOMAINS_FILE": "",
    "POLICYD_ELEVATED_ACTION": "450 4.7.1 Busy; try again later ({reasons})",
    "POLICYD_ELEVATED_REJECT_ACTION": "450 4.7.1 Busy; try again later ({reasons})",
    "POLICYD_OVERLOAD_ACTION": "421 4.7.0 Overloaded; try again later ({reasons})",
    "POLICYD_OVERLOAD_REJECT_ACTION": "521 5.7.1 Refused: looks like a bot ({reasons})",
}

WEIGHTS = [f"POLICYD_WEIGHT_{signal.upper()}" for signal in SIGNALS]
ACTIONS = [
    "POLICYD_ELEVATED_ACTION",
    "POLICYD_ELEVATED_REJECT_ACTION",
    "POLICYD_OVERLOAD_ACTION",
    "POLICYD_OVERLOAD_REJECT_ACTION",
]

# Every reason at once, as the longest {reasons} can be.
_ALL_REASONS = " ".join(SIGNALS)
# A template that is exactly MAX_ACTION_LENGTH long with every reason in it,
# and one a character longer.
_LONGEST_TEMPLATE = (
    "450 4.7.1 " + "x" * (MAX_ACTION_LENGTH - 11 - len(_ALL_REASONS)) + " {reasons}"
)
_TOO_LONG_TEMPLATE = "450 4.7.1 y" + _LONGEST_TEMPLATE.removeprefix("450 4.7.1 ")

_NET = ipaddress.ip_network

# Good forms: variable -> [(raw value, the Config attribute it loads as)].
GOOD: dict[str, list[tuple[str, Any]]] = {
    "POLICYD_LISTEN": [
        ("tcp:10040:interface=127.0.0.1", ("tcp:10040:interface=127.0.0.1",)),
        ("tcp:0:interface=127.0.0.1", ("tcp:0:interface=127.0.0.1",)),
        ("tcp:65535", ("tcp:65535",)),
        (
            "tcp:10040:interface=127.0.0.1 tcp6:10040:interface=\\:\\:1",
            ("tcp:10040:interface=127.0.0.1", "tcp6:10040:interface=\\:\\:1"),
        ),
        (
            "  tcp:10040:interface=127.0.0.1\n\tunix:/run/policyd/policy.sock  ",
            ("tcp:10040:interface=127.0.0.1", "unix:/run/policyd/policy.sock"),
        ),
        (
            "unix:/run/policyd/policy.sock:mode=660",
            ("unix:/run/policyd/policy.sock:mode=660",),
        ),
        (
            "unix:/var/spool/postfix/private/policyd:mode=666",
            ("unix:/var/spool/postfix/private/policyd:mode=666",),
        ),
        ("systemd:domain=INET:index=0", ("systemd:domain=INET:index=0",)),
        ("systemd:domain=INET6:index=1", ("systemd:domain=INET6:index=1",)),
        ("systemd:domain=UNIX:name=policyd", ("systemd:domain=UNIX:name=policyd",)),
    ],
    "POLICYD_ALLOW_PEERS": [
        ("127.0.0.0/8 ::1", (_NET("127.0.0.0/8"), _NET("::1/128"))),
        ("192.0.2.10, 192.0.2.11", (_NET("192.0.2.10/32"), _NET("192.0.2.11/32"))),
        ("10.0.0.0/8 2001:db8::/32", (_NET("10.0.0.0/8"), _NET("2001:db8::/32"))),
        ("any", (_NET("0.0.0.0/0"), _NET("::/0"))),
        (" ANY ", (_NET("0.0.0.0/0"), _NET("::/0"))),
    ],
    "POLICYD_METRICS_LISTEN": [
        ("none", None),
        ("NONE", None),
        (" None ", None),
        ("tcp:9100:interface=127.0.0.1", "tcp:9100:interface=127.0.0.1"),
        (" tcp:9100 ", "tcp:9100"),
        (
            "unix:/run/policyd/metrics.sock:mode=660",
            "unix:/run/policyd/metrics.sock:mode=660",
        ),
        ("systemd:domain=INET:name=metrics", "systemd:domain=INET:name=metrics"),
    ],
    "POLICYD_LOG_LEVEL": [
        ("debug", "debug"),
        ("info", "info"),
        ("warn", "warn"),
        ("error", "error"),
        ("INFO", "info"),
        ("Warn", "warn"),
        (" error ", "error"),
        ("warning", "warn"),
        ("WARNING", "warn"),
    ],
    "POLICYD_LOG_FORMAT": [
        ("text", "text"),
        ("json", "json"),
        ("JSON", "json"),
        ("Text", "text"),
    ],
    "POLICYD_DECISION_TIMEOUT": [
        ("10", 10.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("1m", 60.0),
        (".5", 0.5),
        (" 2s ", 2.0),
        ("1ms", 0.001),
        ("60", 60.0),
    ],
    "POLICYD_FALLBACK_ACTION": [
        ("DUNNO", DUNNO),
        ("dunno", Action.parse("dunno")),
        ("DEFER", Action.parse("DEFER")),
        ("DEFER_IF_PERMIT Try later", Action.parse("DEFER_IF_PERMIT Try later")),
        ("DEFER_IF_REJECT", Action.parse("DEFER_IF_REJECT")),
        ("WARN policyd failed", Action.parse("WARN policyd failed")),
        ("INFO", Action.parse("INFO")),
        ("450 4.7.1 Try again later", Action.parse("450 4.7.1 Try again later")),
        (" 451 4.3.5 Policy problem ", Action.parse("451 4.3.5 Policy problem")),
    ],
    "POLICYD_REQUEST_TIMEOUT": [
        ("10", 10.0),
        ("100ms", 0.1),
        ("5m", 300.0),
        ("1h", 3600.0),
    ],
    "POLICYD_IDLE_TIMEOUT": [
        ("600", 600.0),
        ("1", 1.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("24h", 86400.0),
    ],
    "POLICYD_MAX_LINE_LENGTH": [("64", 64), ("8192", 8192), (" 1048576 ", 1048576)],
    "POLICYD_MAX_ATTRIBUTES": [("8", 8), ("128", 128), ("10000", 10000)],
    "POLICYD_MAX_REQUEST_BYTES": [
        ("256", 256),
        ("65536", 65536),
        ("16777216", 1 << 24),
    ],
    # Stress detection.  Each threshold is set alone, so its good values are
    # those that still nest with the other three defaults (0.7/0.5, 0.9/0.75).
    "POLICYD_POSTFIX_CONFIG_DIR": [("", ""), ("/etc/postfix-out", "/etc/postfix-out")],
    "POLICYD_SMTPD_CAPACITY": [
        ("auto", 0),
        (" AUTO ", 0),
        ("100", 100),
        ("1", 1),
        (" 2500 ", 2500),
        ("1000000", 1_000_000),
    ],
    "POLICYD_HOST_FROM": [
        ("peer", "peer"),
        ("policy_context", "policy_context"),
        ("POLICY_CONTEXT", "policy_context"),
    ],
    "POLICYD_HOST_CAPACITIES": [
        ("", ()),
        ("mx1=200", (("mx1", 200),)),
        (
            "mx1=200, 192.0.2.21=50 2001:db8::25=10",
            (("mx1", 200), ("192.0.2.21", 50), ("2001:db8::25", 10)),
        ),
        # Addresses as policyd names peers: compressed, lower case.
        ("2001:DB8:0:0::25=10", (("2001:db8::25", 10),)),
    ],
    "POLICYD_ALLOW_NETWORKS_FILE": [("", ""), (" ", "")],
    "POLICYD_ALLOW_DOMAINS_FILE": [("", "")],
    "POLICYD_BACKEND": [
        ("memory", "memory"),
        ("redis", "redis"),
        (" Redis ", "redis"),
    ],
    "POLICYD_REDIS_URL": [
        ("redis://127.0.0.1:6379/0", RedisURL("redis", host="127.0.0.1")),
        (
            "redis://:s%40cret@redis.example.net:6380/3",
            RedisURL(
                "redis",
                host="redis.example.net",
                port=6380,
                db=3,
                password="s@cret",  # noqa: S106 - a test value
            ),
        ),
        (
            "redis://policyd:pw@[2001:db8::6]/1",
            RedisURL(
                "redis",
                host="2001:db8::6",
                db=1,
                username="policyd",
                password="pw",  # noqa: S106 - a test value
            ),
        ),
        ("redis://redis?db=2", RedisURL("redis", host="redis", db=2)),
        (
            "rediss://redis.example.net?ca=/etc/ssl/redis-ca.pem",
            RedisURL(
                "rediss", host="redis.example.net", ca_file="/etc/ssl/redis-ca.pem"
            ),
        ),
        (
            "redis+sentinel://:pw@10.0.0.1,[2001:db8::7]:26380/mymaster/2",
            RedisURL(
                "redis+sentinel",
                db=2,
                password="pw",  # noqa: S106 - a test value
                sentinels=(("10.0.0.1", 26379), ("2001:db8::7", 26380)),
                service="mymaster",
            ),
        ),
        (
            "unix:///run/redis/redis.sock?db=4",
            RedisURL("unix", path="/run/redis/redis.sock", db=4),
        ),
        (
            "unix://:pw@/run/redis/redis.sock",
            RedisURL(
                "unix",
                path="/run/redis/redis.sock",
                password="pw",  # noqa: S106 - a test value
            ),
        ),
    ],
    "POLICYD_REDIS_PREFIX": [
        ("policyd:", "policyd:"),
        (" mx-cluster-1: ", "mx-cluster-1:"),
        ("{policyd}", "{policyd}"),
    ],
    "POLICYD_REDIS_DEADLINE": [
        ("20ms", 0.02),
        ("1ms", 0.001),
        ("0.5", 0.5),
    ],
    "POLICYD_REDIS_TIMEOUT": [
        ("2s", 2.0),
        ("100ms", 0.1),
        ("1m", 60.0),
    ],
    "POLICYD_BUSY_WINDOW": [
        ("10s", 10.0),
        ("100ms", 0.1),
        ("2.5", 2.5),
        ("1m", 60.0),
        ("1h", 3600.0),
    ],
    "POLICYD_TRANSACTION_TIMEOUT": [
        ("60s", 60.0),
        ("1", 1.0),
        ("10m", 600.0),
        ("24h", 86400.0),
    ],
    "POLICYD_CLOSE_LINGER": [
        ("5s", 5.0),
        ("0", 0.0),
        ("250ms", 0.25),
        ("1h", 3600.0),
    ],
    "POLICYD_ELEVATED_ENTER": [
        ("0.7", 0.7),
        ("0.51", 0.51),
        ("0.9", 0.9),
        (" .8 ", 0.8),
    ],
    "POLICYD_POSTFIX_STRESS_MIN_LOAD": [("0.5", 0.5), ("0", 0.0), ("1", 1.0)],
    "POLICYD_ELEVATED_EXIT": [
        ("0.5", 0.5),
        ("0.01", 0.01),
        ("0.69", 0.69),
        ("5e-1", 0.5),
    ],
    "POLICYD_OVERLOAD_ENTER": [
        ("0.9", 0.9),
        ("0.76", 0.76),
        ("1", 1.0),
        ("1.0", 1.0),
    ],
    "POLICYD_OVERLOAD_EXIT": [
        ("0.75", 0.75),
        ("0.5", 0.5),
        ("0.89", 0.89),
    ],
    "POLICYD_LEVEL_MIN_DWELL": [
        ("30s", 30.0),
        ("0", 0.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
    ],
    "POLICYD_RATE_CAPACITY": [
        ("0", 0.0),
        ("500", 500.0),
        ("12.5", 12.5),
        (" 1e3 ", 1000.0),
    ],
    "POLICYD_RATE_WINDOW": [
        ("10s", 10.0),
        ("1", 1.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
    ],
    "POLICYD_POSTFIX_STRESS_HOLD": [
        ("60s", 60.0),
        ("0", 0.0),
        ("1000", 1000.0),
        ("24h", 86400.0),
    ],
    "POLICYD_POSTFIX_STRESS_LEVEL": [
        ("overload", "overload"),
        ("elevated", "elevated"),
        ("ignore", "ignore"),
        ("OVERLOAD", "overload"),
        (" Elevated ", "elevated"),
    ],
    "POLICYD_CLIENT_IPV4_PREFIX": [("32", 32), ("24", 24), ("8", 8)],
    "POLICYD_CLIENT_IPV6_PREFIX": [("64", 64), ("48", 48), ("16", 16), ("128", 128)],
    "POLICYD_MAX_TRACKED_CLIENTS": [
        ("100000", 100_000),
        ("100", 100),
        ("100000000", 100_000_000),
    ],
    "POLICYD_CLIENT_RATE_WINDOW": [
        ("60s", 60.0),
        ("1", 1.0),
        ("10m", 600.0),
        ("24h", 86400.0),
    ],
    # Decisions.
    "POLICYD_DRY_RUN": [
        ("1", True),
        ("yes", True),
        ("TRUE", True),
        (" on ", True),
        ("0", False),
        ("no", False),
        ("False", False),
        ("OFF", False),
        ("", False),
    ],
    "POLICYD_DRY_RUN_WARN": [("1", True), ("on", True), ("0", False), ("", False)],
    "POLICYD_REFUSAL_LOG_LIMIT": [("100", 100), ("0", 0), ("1000000", 1000000)],
    "POLICYD_SUSPICIOUS_SCORE": [("3", 3), ("1", 1), ("1000", 1000), (" 12 ", 12)],
    "POLICYD_OVERLOAD_SUSPICIOUS_SCORE": [("2", 2), ("1", 1), (" 3 ", 3)],
    "POLICYD_BAR_STEP": [("10s", 10.0), ("0", 0.0), ("1m", 60.0), ("1h", 3600.0)],
    "POLICYD_HOLD_LIMIT": [("20s", 20.0), ("0", 0.0), ("2m", 120.0)],
    "POLICYD_HOLD_GRACE": [("5s", 5.0), ("0", 0.0), ("1h", 3600.0)],
    "POLICYD_HOLD_WINDOW": [("10m", 600.0), ("1", 1.0), ("24h", 86400.0)],
    "POLICYD_REJECT_SCORE": [("8", 8), ("1", 1), ("1000", 1000), ("+20", 20)],
    **{
        name: [
            ("2", 2),
            ("0", 0),
            ("-100", -100),
            ("100", 100),
            ("-3", -3),
            (" 7 ", 7),
        ]
        for name in WEIGHTS
    },
    "POLICYD_CLIENT_CONCURRENCY_LIMIT": [
        ("5", 5),
        ("1", 1),
        ("50", 50),
        ("100000", 100000),
    ],
    "POLICYD_CLIENT_MESSAGE_RATE_LIMIT": [
        ("30", 30.0),
        ("0", 0.0),
        ("12.5", 12.5),
        (" 1e3 ", 1000.0),
    ],
    "POLICYD_CLIENT_SESSION_RATE_LIMIT": [
        ("30", 30.0),
        ("0", 0.0),
        ("120", 120.0),
    ],
    "POLICYD_QUICK_RETRY_WINDOW": [
        ("30s", 30.0),
        ("0", 0.0),
        ("2m", 120.0),
        ("24h", 86400.0),
    ],
    "POLICYD_MY_HOSTNAMES": [
        ("", ()),
        ("mx.example.org", ("mx.example.org",)),
        ("MX.Example.ORG.", ("mx.example.org",)),
        (
            "mx.example.org, mail.example.org",
            ("mx.example.org", "mail.example.org"),
        ),
        ("mx1.example.org\tmx2.example.org ,", ("mx1.example.org", "mx2.example.org")),
        ("mail_01.example.org", ("mail_01.example.org",)),
        ("localhost", ("localhost",)),
        ("xn--bcher-kva.example", ("xn--bcher-kva.example",)),
    ],
    "POLICYD_ALLOW_NETWORKS": [
        ("", ()),
        ("192.0.2.0/24", (_NET("192.0.2.0/24"),)),
        ("192.0.2.7", (_NET("192.0.2.7/32"),)),
        ("192.0.2.7/24", (_NET("192.0.2.0/24"),)),  # host bits are dropped
        ("2001:db8::/32", (_NET("2001:db8::/32"),)),
        ("2001:DB8::1", (_NET("2001:db8::1/128"),)),
        (
            "192.0.2.0/24, 2001:db8::/32 10.0.0.0/8",
            (_NET("192.0.2.0/24"), _NET("2001:db8::/32"), _NET("10.0.0.0/8")),
        ),
        (" ,127.0.0.0/8,,::1 ", (_NET("127.0.0.0/8"), _NET("::1/128"))),
    ],
    "POLICYD_ALLOW_DOMAINS": [
        ("", ()),
        ("example.com", ("example.com",)),
        ("Example.COM.", ("example.com",)),
        ("example.com partner.example.org", ("example.com", "partner.example.org")),
        ("example.com,example.net", ("example.com", "example.net")),
    ],
    **{
        name: [
            (DOCUMENTED_DEFAULTS[name], DOCUMENTED_DEFAULTS[name]),
            ("450 4.7.1 Busy", "450 4.7.1 Busy"),
            ("  421 4.7.0 Busy ({reasons})  ", "421 4.7.0 Busy ({reasons})"),
            ("421 {reasons}", "421 {reasons}"),
            ("554 5.7.1 Go away: {reasons}", "554 5.7.1 Go away: {reasons}"),
            ("REJECT", "REJECT"),
            ("reject {reasons}", "reject {reasons}"),
            ("DEFER", "DEFER"),
            ("DEFER_IF_PERMIT Busy ({reasons})", "DEFER_IF_PERMIT Busy ({reasons})"),
            ("DEFER_IF_REJECT Busy", "DEFER_IF_REJECT Busy"),
            ("DUNNO", "DUNNO"),
            ("WARN suspicious: {reasons}", "WARN suspicious: {reasons}"),
            ("INFO suspicious", "INFO suspicious"),
            (_LONGEST_TEMPLATE, _LONGEST_TEMPLATE),
        ]
        for name in ACTIONS
    },
}

_ENDPOINT_FORM = r"e\.g\. (tcp|unix|systemd):"
_DURATION = "expected a duration"
_FRACTION = r"expected a number from 0 to 1, e\.g\. 0\.7"
_NUMBER = r"expected a number of zero or more"
_CAPACITY = r"whole number from 1 to 1000000"
_LEVEL = r"expected one of: overload, elevated, ignore"
_FLAG = r"expected 1/yes/true/on or 0/no/false/off"
_SCORE = r"whole number from 1 to 1000"
_WEIGHT = r"whole number from -100 to 100"
_HOSTNAME = r"is not a host or domain name; expected names separated by spaces"
_NETWORK = r"is not a network; expected CIDR networks or addresses"
_CELL = r"expected a 4xx/5xx code with text, REJECT, DEFER.*DUNNO, WARN or INFO"

# Bad values: variable -> [(raw value, regex the message must contain, saying
# which form is accepted)].
BAD: dict[str, list[tuple[str, str]]] = {
    "POLICYD_LISTEN": [
        ("", _ENDPOINT_FORM),
        ("   ", _ENDPOINT_FORM),
        ("10040", _ENDPOINT_FORM),
        ("127.0.0.1:10040", _ENDPOINT_FORM),
        ("foo:bar", _ENDPOINT_FORM),
        ("TCP:10040", _ENDPOINT_FORM),
        ("tcp", _ENDPOINT_FORM),
        ("tcp:abc", _ENDPOINT_FORM),
        ("tcp:70000", r"port from 0 to 65535"),
        ("tcp:-1", r"port from 0 to 65535"),
        ("tcp:10040:bogus=1", _ENDPOINT_FORM),
        ("tcp:10040:interface=127.0.0.1 garbage", _ENDPOINT_FORM),
        ("unix:/run/policyd.sock:mode=999", _ENDPOINT_FORM),
        ("unix:/run/policyd.sock:mode=rw", _ENDPOINT_FORM),
        ("ssl:10041", _ENDPOINT_FORM),
        ("systemd:", _ENDPOINT_FORM),
        ("systemd:domain=INET", _ENDPOINT_FORM),
        ("systemd:index=0", _ENDPOINT_FORM),
        ("systemd:domain=inet:index=0", _ENDPOINT_FORM),
        ("systemd:domain=AF_INET:index=0", _ENDPOINT_FORM),
        ("systemd:domain=INET:index=0:name=policyd", _ENDPOINT_FORM),
        ("systemd:domain=INET:index=", _ENDPOINT_FORM),
        ("systemd:domain=INET:index=abc", _ENDPOINT_FORM),
        ("systemd:domain=INET:index=-1", _ENDPOINT_FORM),
        ("systemd:domain=INET:name=", _ENDPOINT_FORM),
        ("systemd:domain=INET:index=0:mode=660", _ENDPOINT_FORM),
    ],
    "POLICYD_ALLOW_PEERS": [
        ("", r"at least one network .*'any'"),
        (" , ", r"at least one network"),
        ("192.0.2.0/33", _NETWORK),
        ("mx1.example.com", _NETWORK),
        ("anywhere", _NETWORK),
    ],
    "POLICYD_METRICS_LISTEN": [
        ("", _ENDPOINT_FORM),
        ("garbage", _ENDPOINT_FORM),
        ("off", _ENDPOINT_FORM),
        ("tcp:9100 tcp:9101", r"one endpoint description, or none"),
        ("none tcp:9100", _ENDPOINT_FORM),
        ("tcp:99999", r"port from 0 to 65535"),
        ("systemd:domain=INET:index=x", _ENDPOINT_FORM),
    ],
    "POLICYD_LOG_LEVEL": [
        ("", r"expected one of: debug, info, warn, error"),
        ("critical", r"expected one of: debug, info, warn, error"),
        ("verbose", r"expected one of: debug, info, warn, error"),
        ("1", r"expected one of: debug, info, warn, error"),
    ],
    "POLICYD_LOG_FORMAT": [
        ("", r"expected one of: text, json"),
        ("yaml", r"expected one of: text, json"),
        ("jsonl", r"expected one of: text, json"),
    ],
    "POLICYD_DECISION_TIMEOUT": [
        ("", _DURATION),
        ("0", _DURATION + r" between 0\.001s and 60s"),
        ("0s", _DURATION),
        ("0.5ms", _DURATION),
        ("61", _DURATION + r" between 0\.001s and 60s"),
        ("2m", _DURATION),
        ("-1", _DURATION),
        ("abc", _DURATION + r" such as 10, 1\.5s, 250ms, 5m or 1h"),
        ("1d", _DURATION),
        ("1e3", _DURATION),
        ("inf", _DURATION),
        ("nan", _DURATION),
        ("1s500ms", _DURATION),
        ("1,5s", _DURATION),
    ],
    "POLICYD_FALLBACK_ACTION": [
        ("", r"non-empty"),
        ("   ", r"non-empty"),
        ("REJECT", r"must not refuse mail for good: use DUNNO"),
        ("reject Go away", r"must not refuse mail for good"),
        ("550 x", r"must not refuse mail for good"),
        ("554 5.7.1 Access denied", r"must not refuse mail for good"),
        ("521 5.7.1 Go away", r"must not refuse mail for good"),
        ("DISCARD", r"must not refuse mail for good"),
        ("HOLD", r"must not refuse mail for good"),
        ("REDIRECT abuse@example.org", r"must not refuse mail for good"),
        ("OK", r"4xx/5xx code or one of"),
        ("RELAY", r"4xx/5xx code or one of"),
        ("permit", r"4xx/5xx code or one of"),
        ("blah", r"4xx/5xx code or one of"),
        ("450", r"must be followed by text"),
        ("550", r"must be followed by text"),
        ("DEFER\x00", r"printable ASCII"),
        ("DEFER café", r"printable ASCII"),
        ("450 " + "x" * 500, r"at most 400 characters"),
    ],
    "POLICYD_REQUEST_TIMEOUT": [
        ("", _DURATION),
        ("0", _DURATION + r" between 0\.1s and 3600s"),
        ("50ms", _DURATION),
        ("2h", _DURATION),
        ("soon", _DURATION),
    ],
    "POLICYD_IDLE_TIMEOUT": [
        ("", _DURATION),
        ("0", _DURATION + r" between 1s and 86400s"),
        ("500ms", _DURATION),
        ("25h", _DURATION),
        ("forever", _DURATION),
    ],
    "POLICYD_MAX_LINE_LENGTH": [
        ("", r"whole number from 64 to 1048576"),
        ("63", r"whole number from 64 to 1048576"),
        ("1048577", r"whole number from 64 to 1048576"),
        ("0", r"whole number from 64 to 1048576"),
        ("-8192", r"whole number from 64 to 1048576"),
        ("8k", r"whole number from 64 to 1048576"),
        ("8192.0", r"whole number from 64 to 1048576"),
        ("1e4", r"whole number from 64 to 1048576"),
        ("0x2000", r"whole number from 64 to 1048576"),
        ("lots", r"whole number from 64 to 1048576"),
    ],
    "POLICYD_MAX_ATTRIBUTES": [
        ("", r"whole number from 8 to 10000"),
        ("7", r"whole number from 8 to 10000"),
        ("10001", r"whole number from 8 to 10000"),
        ("many", r"whole number from 8 to 10000"),
    ],
    "POLICYD_MAX_REQUEST_BYTES": [
        ("", r"whole number from 256 to 16777216"),
        ("255", r"whole number from 256 to 16777216"),
        ("16777217", r"whole number from 256 to 16777216"),
        ("64k", r"whole number from 256 to 16777216"),
    ],
    "POLICYD_POSTFIX_CONFIG_DIR": [("postfix", "expected an absolute path")],
    "POLICYD_SMTPD_CAPACITY": [
        ("", _CAPACITY),
        ("0", _CAPACITY),
        ("-1", _CAPACITY),
        ("1000001", _CAPACITY),
        ("100.0", _CAPACITY),
        ("1e3", _CAPACITY),
        ("lots", _CAPACITY),
    ],
    "POLICYD_HOST_FROM": [
        ("server_address", "expected one of"),
        ("", "expected one of"),
    ],
    "POLICYD_HOST_CAPACITIES": [
        ("mx1", "is not HOST=PROCESSES"),
        ("mx1:200", "is not HOST=PROCESSES"),
        ("=200", "is not HOST=PROCESSES"),
        ("-mx=5", "is not HOST=PROCESSES"),
        ("mx1=0", "from 1 to 1000000"),
        ("mx1=lots", "from 1 to 1000000"),
        ("mx1=5 mx1=6", "given twice"),
        ("2001:db8::25=5 2001:DB8::25=6", "given twice"),
    ],
    "POLICYD_ALLOW_NETWORKS_FILE": [
        ("allow-networks", "expected an absolute path"),
        ("/nonexistent/policyd/allow-networks", "cannot read"),
    ],
    "POLICYD_ALLOW_DOMAINS_FILE": [
        ("domains.txt", "expected an absolute path"),
        ("/nonexistent/policyd/allow-domains", "cannot read"),
    ],
    "POLICYD_BACKEND": [
        ("postgres", "expected one of: memory, redis"),
        ("", "expected one of: memory, redis"),
    ],
    "POLICYD_REDIS_URL": [
        ("", "no Redis URL given"),
        ("127.0.0.1:6379", "the scheme must be redis://, rediss://, unix:// or"),
        ("http://redis", "the scheme must be"),
        ("redis://", "no host"),
        ("redis://redis:99999", "the port must be a number from 1 to 65535"),
        ("redis://redis:port", "the port must be a number"),
        ("redis://redis/zero", "the database must be a number"),
        ("redis://redis/1?db=2", "the database is given twice"),
        ("redis://redis?timeout=5", "unknown URL parameter 'timeout'"),
        ("redis://redis?ca=/x.pem", "unknown URL parameter 'ca'"),
        ("rediss://redis?ca=", "needs the path of a PEM file"),
        ("redis://redis?db=1&db=2", "given twice"),
        ("redis://redis#x", "no #fragment"),
        ("redis://policyd@redis", "a user without a password"),
        ("redis+sentinel://policyd@s1/mymaster", "a user without a password"),
        ("redis+sentinel://s1:26379", "name the master the Sentinels watch"),
        ("redis+sentinel://s1:port/mymaster", "the port must be a number"),
        ("redis+sentinel://s1,/mymaster", "every Sentinel needs a host"),
        ("redis+sentinel://s1/mymaster/x", "the database must be a number"),
        ("redis+sentinel://s1/mymaster?ca=/x", "unknown URL parameter 'ca'"),
        ("unix://redis/run/redis.sock", "names a socket path, not a host"),
        ("unix://", "needs the socket's absolute path"),
    ],
    "POLICYD_REDIS_PREFIX": [
        ("", "printable ASCII characters without spaces"),
        ("my prefix", "without spaces"),
        ("x" * 65, "1 to 64"),
        ("pr\u00e9fixe", "printable ASCII"),
    ],
    "POLICYD_REDIS_DEADLINE": [
        ("0", _DURATION + r" between 0\.001s and 10s"),
        ("soon", _DURATION),
    ],
    "POLICYD_REDIS_TIMEOUT": [
        ("0", _DURATION + r" between 0\.1s and 60s"),
        ("2 minutes", _DURATION),
    ],
    "POLICYD_BUSY_WINDOW": [
        ("", _DURATION),
        ("0", _DURATION + r" between 0\.1s and 3600s"),
        ("50ms", _DURATION),
        ("2h", _DURATION),
        ("soon", _DURATION),
    ],
    "POLICYD_TRANSACTION_TIMEOUT": [
        ("", _DURATION),
        ("0", _DURATION + r" between 1s and 86400s"),
        ("500ms", _DURATION),
        ("25h", _DURATION),
        ("1d", _DURATION),
    ],
    "POLICYD_CLOSE_LINGER": [
        ("", _DURATION),
        ("-1", _DURATION),
        ("2h", _DURATION + r" between 0s and 3600s"),
        ("forever", _DURATION),
    ],
    "POLICYD_ELEVATED_ENTER": [
        ("", _FRACTION),
        ("70%", _FRACTION),
        ("-0.1", _FRACTION),
        ("1.1", _FRACTION),
        ("high", _FRACTION),
        ("nan", _FRACTION),
        ("inf", _FRACTION),
    ],
    "POLICYD_ELEVATED_EXIT": [("", _FRACTION), ("1.5", _FRACTION), ("-1", _FRACTION)],
    "POLICYD_POSTFIX_STRESS_MIN_LOAD": [("half", _FRACTION), ("2", _FRACTION)],
    "POLICYD_OVERLOAD_ENTER": [("", _FRACTION), ("2", _FRACTION), ("0,9", _FRACTION)],
    "POLICYD_OVERLOAD_EXIT": [("", _FRACTION), ("75", _FRACTION), ("x", _FRACTION)],
    "POLICYD_LEVEL_MIN_DWELL": [
        ("", _DURATION),
        ("-1", _DURATION),
        ("2h", _DURATION + r" between 0s and 3600s"),
        ("forever", _DURATION),
    ],
    "POLICYD_RATE_CAPACITY": [
        ("", _NUMBER),
        ("-5", _NUMBER),
        ("-0.1", _NUMBER),
        ("inf", _NUMBER),
        ("nan", _NUMBER),
        ("10/s", _NUMBER),
        ("many", _NUMBER),
    ],
    "POLICYD_RATE_WINDOW": [
        ("", _DURATION),
        ("0", _DURATION + r" between 1s and 300s"),
        ("500ms", _DURATION),
        ("6m", _DURATION),
        ("10x", _DURATION),
    ],
    "POLICYD_POSTFIX_STRESS_HOLD": [
        ("", _DURATION),
        ("-1", _DURATION),
        ("25h", _DURATION + r" between 0s and 86400s"),
        ("1d", _DURATION),
    ],
    "POLICYD_POSTFIX_STRESS_LEVEL": [
        ("", _LEVEL),
        ("yes", _LEVEL),
        ("normal", _LEVEL),
        ("2", _LEVEL),
        ("off", _LEVEL),
    ],
    "POLICYD_CLIENT_IPV4_PREFIX": [
        ("", r"whole number from 8 to 32"),
        ("7", r"whole number from 8 to 32"),
        ("33", r"whole number from 8 to 32"),
        ("/24", r"whole number from 8 to 32"),
        ("24.0", r"whole number from 8 to 32"),
    ],
    "POLICYD_CLIENT_IPV6_PREFIX": [
        ("", r"whole number from 16 to 128"),
        ("15", r"whole number from 16 to 128"),
        ("129", r"whole number from 16 to 128"),
        ("/64", r"whole number from 16 to 128"),
    ],
    "POLICYD_MAX_TRACKED_CLIENTS": [
        ("", r"whole number from 100 to 100000000"),
        ("99", r"whole number from 100 to 100000000"),
        ("100000001", r"whole number from 100 to 100000000"),
        ("1e6", r"whole number from 100 to 100000000"),
        ("100k", r"whole number from 100 to 100000000"),
    ],
    "POLICYD_CLIENT_RATE_WINDOW": [
        ("", _DURATION),
        ("0", _DURATION + r" between 1s and 86400s"),
        ("500ms", _DURATION),
        ("25h", _DURATION),
    ],
    # Decisions.
    "POLICYD_DRY_RUN": [
        ("2", _FLAG),
        ("y", _FLAG),
        ("enabled", _FLAG),
        ("-1", _FLAG),
        ("yes please", _FLAG),
    ],
    "POLICYD_DRY_RUN_WARN": [("warn", _FLAG), ("10", _FLAG)],
    "POLICYD_REFUSAL_LOG_LIMIT": [
        ("-1", r"expected a whole number from 0 to 1000000"),
        ("lots", r"expected a whole number from 0 to 1000000"),
        ("1000001", r"expected a whole number from 0 to 1000000"),
    ],
    "POLICYD_SUSPICIOUS_SCORE": [
        ("", _SCORE),
        ("0", _SCORE),
        ("-1", _SCORE),
        ("1001", _SCORE),
        ("3.5", _SCORE),
        ("three", _SCORE),
    ],
    "POLICYD_REJECT_SCORE": [("", _SCORE), ("0", _SCORE), ("1e3", _SCORE)],
    "POLICYD_OVERLOAD_SUSPICIOUS_SCORE": [("0", _SCORE), ("2.5", _SCORE)],
    "POLICYD_BAR_STEP": [
        ("-1", _DURATION),
        ("2h", _DURATION + r" between 0s and 3600s"),
    ],
    "POLICYD_HOLD_LIMIT": [("", _DURATION), ("forever", _DURATION)],
    "POLICYD_HOLD_GRACE": [("-5", _DURATION), ("2h", _DURATION)],
    "POLICYD_HOLD_WINDOW": [("0", _DURATION), ("2d", _DURATION)],
    **{
        name: [
            ("", _WEIGHT),
            ("101", _WEIGHT),
            ("-101", _WEIGHT),
            ("1.5", _WEIGHT),
            ("two", _WEIGHT),
            ("- 2", _WEIGHT),
        ]
        for name in WEIGHTS
    },
    "POLICYD_CLIENT_CONCURRENCY_LIMIT": [
        ("", r"whole number from 1 to 100000"),
        ("0", r"whole number from 1 to 100000"),
        ("100001", r"whole number from 1 to 100000"),
        ("5.0", r"whole number from 1 to 100000"),
    ],
    "POLICYD_CLIENT_MESSAGE_RATE_LIMIT": [
        ("", _NUMBER),
        ("-1", _NUMBER),
        ("inf", _NUMBER),
        ("nan", _NUMBER),
        ("30/min", _NUMBER),
    ],
    "POLICYD_CLIENT_SESSION_RATE_LIMIT": [("", _NUMBER), ("-0.5", _NUMBER)],
    "POLICYD_QUICK_RETRY_WINDOW": [
        ("", _DURATION),
        ("-1", _DURATION),
        ("25h", _DURATION + r" between 0s and 86400s"),
        ("soon", _DURATION),
    ],
    "POLICYD_MY_HOSTNAMES": [
        ("-mx.example.org", _HOSTNAME),
        ("mx-.example.org", _HOSTNAME),
        ("mx..example.org", _HOSTNAME),
        (".", _HOSTNAME),
        ("*.example.org", _HOSTNAME),
        ("mx.example.org;mail.example.org", _HOSTNAME),
        ("postmaster@example.org", _HOSTNAME),
        ("[192.0.2.1]", _HOSTNAME),
        ("bücher.example", _HOSTNAME),
        ("good.example.org bad!.example.org", r"'bad!\.example\.org' is not"),
    ],
    "POLICYD_ALLOW_NETWORKS": [
        ("192.0.2.0/33", _NETWORK),
        ("300.1.1.1", _NETWORK),
        ("192.0.2.0/abc", _NETWORK),
        ("2001:db8::/129", _NETWORK),
        ("2001:db8::g", _NETWORK),
        ("example.com", _NETWORK),
        ("192.0.2.0/24;10.0.0.0/8", _NETWORK),
        ("10.0.0.0/8 10.0.0.0/-1", r"'10\.0\.0\.0/-1' is not a network"),
    ],
    "POLICYD_ALLOW_DOMAINS": [
        (".example.com", _HOSTNAME),
        ("example.com/24", _HOSTNAME),
        ("exa mple!.com", _HOSTNAME),
        ("user@example.com", _HOSTNAME),
    ],
    **{
        name: [
            ("", r"non-empty"),
            ("   ", r"non-empty"),
            ("450", r"must be followed by text"),
            ("550", r"must be followed by text"),
            ("OK", r"4xx/5xx code or one of"),
            ("OK {reasons}", r"4xx/5xx code or one of"),
            ("RELAY", r"4xx/5xx code or one of"),
            ("permit", r"4xx/5xx code or one of"),
            ("{reasons}", r"4xx/5xx code or one of"),
            ("450{reasons}", r"4xx/5xx code or one of"),
            ("600 6.0.0 x", r"4xx/5xx code or one of"),
            ("450 4.7.1 Busy\t{reasons}", r"printable ASCII"),
            ("450 4.7.1 Busy\nREJECT", r"printable ASCII"),
            ("450 4.7.1 Café", r"printable ASCII"),
            (
                "450 4.7.1 " + "x" * 300 + " ({reasons})",
                r"at most 400 characters \(checked with every reason filled",
            ),
            (_TOO_LONG_TEMPLATE, r"at most 400 characters"),
            ("DISCARD {reasons}", _CELL),
            ("HOLD", _CELL),
            ("REDIRECT abuse@example.org", _CELL),
            ("BCC abuse@example.org", _CELL),
            ("FILTER smtp:[127.0.0.1]:10025", _CELL),
            ("PREPEND X-Suspicious: {reasons}", _CELL),
        ]
        for name in ACTIONS
    },
}


def _cases(table: dict[str, list[tuple[str, Any]]]) -> list[Any]:
    return [
        pytest.param(name, raw, expected, id=f"{name}={raw[:30]!r}")
        for name, rows in table.items()
        for raw, expected in rows
    ]


def _attribute(name: str) -> str:
    return name.removeprefix("POLICYD_").lower()


class TestDefaults:
    """With no variables set, policyd runs on the documented defaults."""

    def test_variables(self) -> None:
        """The variables are exactly the documented ones, in declaration order."""
        assert config.variables() == tuple(DOCUMENTED_DEFAULTS)

    def test_declared_defaults(self) -> None:
        """Each variable's declared default is the documented text."""
        assert {s.variable: s.default for s in config.describe({})} == (
            DOCUMENTED_DEFAULTS
        )

    def test_load_empty(self) -> None:
        """An empty environment loads, with the defaults converted."""
        cfg = config.load({})
        assert cfg.listen == ("tcp:10040:interface=127.0.0.1",)
        assert cfg.metrics_listen == "tcp:10041:interface=127.0.0.1"
        assert cfg.log_level == "info"
        assert cfg.log_format == "text"
        assert cfg.decision_timeout == 1.0
        assert cfg.fallback_action == DUNNO
        assert cfg.request_timeout == 10.0
        assert cfg.idle_timeout == 600.0
        assert cfg.max_line_length == 8192
        assert cfg.max_attributes == 128
        assert cfg.max_request_bytes == 65536

    def test_load_empty_stress(self) -> None:
        """The stress detection defaults load as the numbers docs/stress.md gives."""
        cfg = config.load({})
        assert cfg.smtpd_capacity == 100
        assert (cfg.busy_window, cfg.transaction_timeout) == (10.0, 30.0)
        assert (cfg.elevated_enter, cfg.elevated_exit) == (0.7, 0.5)
        assert (cfg.overload_enter, cfg.overload_exit) == (0.9, 0.75)
        assert cfg.level_min_dwell == 30.0
        assert (cfg.rate_capacity, cfg.rate_window) == (0.0, 10.0)
        assert cfg.postfix_stress_hold == 60.0
        assert cfg.postfix_stress_level == "overload"
        assert (cfg.client_ipv4_prefix, cfg.client_ipv6_prefix) == (32, 64)
        assert cfg.max_tracked_clients == 100_000
        assert cfg.client_rate_window == 60.0

    def test_load_empty_decisions(self) -> None:
        """The decision defaults load as docs/decisions.md gives them."""
        cfg = config.load({})
        assert (cfg.dry_run, cfg.dry_run_warn) == (False, False)
        assert (cfg.suspicious_score, cfg.reject_score) == (3, 8)
        assert {name: getattr(cfg, _attribute(name)) for name in WEIGHTS} == {
            name: int(DOCUMENTED_DEFAULTS[name]) for name in WEIGHTS
        }
        assert cfg.client_concurrency_limit == 5
        assert cfg.client_message_rate_limit == cfg.client_session_rate_limit == 30.0
        assert cfg.quick_retry_window == 30.0
        assert cfg.my_hostnames == cfg.allow_networks == cfg.allow_domains == ()
        for name in ACTIONS:
            assert getattr(cfg, _attribute(name)) == DOCUMENTED_DEFAULTS[name]

    def test_weight_for_every_signal(self) -> None:
        """Each signal has its POLICYD_WEIGHT_ variable, and nothing else does."""
        assert [n for n in config.variables() if n.startswith("POLICYD_WEIGHT_")] == (
            WEIGHTS
        )

    def test_loopback_only(self) -> None:
        """By default nothing listens beyond the loopback interface."""
        cfg = config.load({})
        assert cfg.metrics_listen is not None
        for description in (*cfg.listen, cfg.metrics_listen):
            assert description.endswith(":interface=127.0.0.1")

    def test_idle_above_postfix_max_idle(self) -> None:
        """The idle timeout exceeds smtpd_policy_service_max_idle (300s)."""
        assert config.load({}).idle_timeout > 300

    def test_every_variable_has_help(self) -> None:
        """Every variable carries help text (docs and `policyd config` use it)."""
        for setting in config.describe({}):
            assert len(setting.help) > 20, setting.variable
            assert setting.help.rstrip().endswith("."), setting.variable

    def test_frozen(self) -> None:
        """The loaded configuration cannot be changed afterwards."""
        cfg = config.load({})
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            cfg.log_level = "debug"


class TestAccepted:
    """Each variable accepts the forms its help text promises."""

    def test_table_covers_every_variable(self) -> None:
        """The good-value table has rows for every variable."""
        assert set(GOOD) == set(config.variables())

    @pytest.mark.parametrize(("name", "raw", "expected"), _cases(GOOD))
    def test_good(self, name: str, raw: str, expected: Any) -> None:
        """The value loads and converts to the expected typed value."""
        assert getattr(config.load({name: raw}), _attribute(name)) == expected

    def test_systemd_needs_no_inherited_socket(self) -> None:
        """A systemd endpoint loads outside socket activation (e.g. `config`)."""
        env = {"POLICYD_LISTEN": "systemd:domain=INET:index=0"}
        assert "LISTEN_FDS" not in env
        assert config.load(env).listen == ("systemd:domain=INET:index=0",)

    def test_other_variables_ignored(self) -> None:
        """Unrelated and unknown variables do not affect loading."""
        cfg = config.load({"PATH": "/bin", "POLICYD_LISTN": "x", "HOME": "/"})
        assert cfg == config.load({})

    def test_several_variables(self) -> None:
        """Several variables at once each take their value."""
        cfg = config.load(
            {
                "POLICYD_LOG_LEVEL": "debug",
                "POLICYD_LOG_FORMAT": "json",
                "POLICYD_METRICS_LISTEN": "none",
                "POLICYD_DECISION_TIMEOUT": "250ms",
            }
        )
        assert (cfg.log_level, cfg.log_format) == ("debug", "json")
        assert cfg.metrics_listen is None
        assert cfg.decision_timeout == 0.25


class TestRejected:
    """A bad value raises ConfigError naming variable, value and accepted form."""

    def test_table_covers_every_variable(self) -> None:
        """The bad-value table has rows for every variable."""
        assert set(BAD) == set(config.variables())

    @pytest.mark.parametrize(("name", "raw", "form"), _cases(BAD))
    def test_bad(self, name: str, raw: str, form: str) -> None:
        """The error carries the variable and value and says what is accepted."""
        with pytest.raises(config.ConfigError) as info:
            config.load({name: raw})
        error = info.value
        assert (error.variable, error.value) == (name, raw)
        message = str(error)
        assert message.startswith(f"{name}={raw!r} is invalid: ")
        assert re.search(form, error.problem), error.problem
        assert "\n" not in message  # one line on stderr

    def test_first_bad_variable_reported(self) -> None:
        """With several bad values, the first in declaration order is named."""
        with pytest.raises(config.ConfigError) as info:
            config.load({"POLICYD_MAX_ATTRIBUTES": "1", "POLICYD_LOG_LEVEL": "loud"})
        assert info.value.variable == "POLICYD_LOG_LEVEL"

    def test_bad_value_not_masked_by_good_ones(self) -> None:
        """One bad value fails the load even when the rest are fine."""
        env = {name: rows[0][0] for name, rows in GOOD.items()}
        env["POLICYD_IDLE_TIMEOUT"] = "0"
        with pytest.raises(config.ConfigError, match="POLICYD_IDLE_TIMEOUT"):
            config.load(env)

    def test_control_characters_shown_escaped(self) -> None:
        """A value with a newline is shown as a repr, keeping the message one line."""
        with pytest.raises(config.ConfigError) as info:
            config.load({"POLICYD_LOG_LEVEL": "info\nPOLICYD_X=1"})
        assert "\n" not in str(info.value)
        assert "'info\\nPOLICYD_X=1'" in str(info.value)


class TestConverters:
    """The converter factories on their own."""

    @pytest.mark.parametrize(
        ("raw", "seconds"),
        [("10", 10.0), ("1.5s", 1.5), ("250ms", 0.25), ("5m", 300.0), ("1h", 3600.0)],
    )
    def test_duration_units(self, raw: str, seconds: float) -> None:
        """Durations take no unit (seconds) or ms, s, m, h."""
        assert config.duration(0, 86400)(raw) == pytest.approx(seconds)

    @pytest.mark.parametrize(("raw", "ok"), [("1", True), ("2", True), ("3", False)])
    def test_duration_bounds_inclusive(self, raw: str, ok: bool) -> None:
        """Both bounds of a duration are allowed; beyond them is an error."""
        convert = config.duration(1, 2)
        if ok:
            assert convert(raw) == float(raw)
        else:
            with pytest.raises(ValueError, match="between 1s and 2s"):
                convert(raw)

    @pytest.mark.parametrize(("raw", "ok"), [("4", False), ("5", True), ("9", False)])
    def test_integer_bounds(self, raw: str, ok: bool) -> None:
        """Whole numbers are checked against both bounds."""
        convert = config.integer(5, 8)
        if ok:
            assert convert(raw) == int(raw)
        else:
            with pytest.raises(ValueError, match="from 5 to 8"):
                convert(raw)

    def test_choice_case_insensitive(self) -> None:
        """Choices compare case-insensitively and return the canonical word."""
        assert config.choice("a", "b")(" B ") == "b"

    def test_endpoints_split_on_whitespace(self) -> None:
        """Endpoint lists split on any run of whitespace."""
        assert config.endpoints("tcp:1 \n tcp:2\ttcp:3") == ("tcp:1", "tcp:2", "tcp:3")

    def test_optional_endpoint_none(self) -> None:
        """``none`` disables an optional endpoint."""
        assert config.optional_endpoint("None") is None

    def test_fallback_strips(self) -> None:
        """The fallback action is trimmed before validation."""
        assert config.fallback_action("  DEFER  ") == Action.parse("DEFER")


class TestUnknownVariables:
    """`unknown_variables` flags likely typos."""

    @pytest.mark.parametrize(
        ("env", "unknown"),
        [
            ({}, []),
            ({"POLICYD_LISTN": "tcp:1"}, ["POLICYD_LISTN"]),
            ({"POLICYD_LOGLEVEL": "debug"}, ["POLICYD_LOGLEVEL"]),
            ({"POLICYD_LISTEN": "tcp:1", "POLICYD_LOG_LEVEL": "debug"}, []),
            ({"PATH": "/bin", "POLICY_LISTEN": "x", "POLICYDX": "x"}, []),
            (
                {"POLICYD_Z": "1", "POLICYD_A": "1", "POLICYD_LISTEN": "tcp:1"},
                ["POLICYD_A", "POLICYD_Z"],
            ),
        ],
    )
    def test_unknown(self, env: dict[str, str], unknown: list[str]) -> None:
        """POLICYD_ names that policyd does not read are listed, sorted."""
        assert config.unknown_variables(env) == unknown

    def test_every_variable_known(self) -> None:
        """No declared variable is ever reported as unknown."""
        env = dict.fromkeys(config.variables(), "x")
        assert config.unknown_variables(env) == []


class TestDescribe:
    """`describe` reports the effective value and default of every variable."""

    def test_defaults(self) -> None:
        """Without variables, every value is its default."""
        settings = config.describe({})
        assert [s.variable for s in settings] == list(config.variables())
        for setting in settings:
            assert setting.value == setting.default
            assert setting.is_default

    def test_effective_values(self) -> None:
        """A set variable shows its raw value and still reports the default."""
        env = {"POLICYD_LOG_LEVEL": "DEBUG", "POLICYD_METRICS_LISTEN": "none"}
        settings = {s.variable: s for s in config.describe(env)}
        level = settings["POLICYD_LOG_LEVEL"]
        assert (level.value, level.default, level.is_default) == (
            "DEBUG",
            "info",
            False,
        )
        metrics = settings["POLICYD_METRICS_LISTEN"]
        assert metrics.value == "none"
        assert not metrics.is_default
        assert settings["POLICYD_LOG_FORMAT"].is_default

    def test_help_matches_declaration(self) -> None:
        """The help text does not depend on the environment."""
        assert [s.help for s in config.describe({})] == [
            s.help for s in config.describe({"POLICYD_LOG_LEVEL": "debug"})
        ]

    def test_does_not_validate(self) -> None:
        """An invalid value is still described (load is what rejects it)."""
        (setting,) = [
            s
            for s in config.describe({"POLICYD_MAX_ATTRIBUTES": "lots"})
            if s.variable == "POLICYD_MAX_ATTRIBUTES"
        ]
        assert setting.value == "lots"


# Threshold sets that nest (exit < enter, elevated <= overload), as raw values.
NESTED = [
    pytest.param({}, id="defaults"),
    pytest.param(
        {"POLICYD_ELEVATED_ENTER": "0.9", "POLICYD_OVERLOAD_ENTER": "0.9"},
        id="equal enters: straight to overload",
    ),
    pytest.param(
        {"POLICYD_ELEVATED_EXIT": "0.6", "POLICYD_OVERLOAD_EXIT": "0.6"},
        id="equal exits",
    ),
    pytest.param(
        {
            "POLICYD_ELEVATED_ENTER": "0.3",
            "POLICYD_ELEVATED_EXIT": "0.2",
            "POLICYD_OVERLOAD_ENTER": "0.5",
            "POLICYD_OVERLOAD_EXIT": "0.4",
        },
        id="all lower",
    ),
    pytest.param(
        {
            "POLICYD_ELEVATED_ENTER": "1",
            "POLICYD_ELEVATED_EXIT": "0.99",
            "POLICYD_OVERLOAD_ENTER": "1",
            "POLICYD_OVERLOAD_EXIT": "0.99",
        },
        id="all at the top",
    ),
]

# Threshold sets that do not nest: the variable named, the value shown (as
# written, or the default when the variable was not set), and the problem.
TANGLED = [
    pytest.param(
        {"POLICYD_ELEVATED_EXIT": "0"},
        "POLICYD_ELEVATED_EXIT",
        "0",
        "must be above 0, or the elevated level could never be left",
        id="elevated exit at zero traps the level",
    ),
    pytest.param(
        {"POLICYD_ELEVATED_EXIT": "0.7"},
        "POLICYD_ELEVATED_EXIT",
        "0.7",
        "must be below POLICYD_ELEVATED_ENTER=0.7 (the default)",
        id="elevated exit at its enter",
    ),
    pytest.param(
        {"POLICYD_ELEVATED_EXIT": "0.70", "POLICYD_ELEVATED_ENTER": "0.70"},
        "POLICYD_ELEVATED_EXIT",
        "0.70",
        "must be below POLICYD_ELEVATED_ENTER=0.70",
        id="value shown as written",
    ),
    pytest.param(
        {"POLICYD_ELEVATED_ENTER": "0.4"},
        "POLICYD_ELEVATED_ENTER",
        "0.4",
        "must be above POLICYD_ELEVATED_EXIT=0.5 (the default)",
        id="elevated enter below the default exit: the one set is named",
    ),
    pytest.param(
        {"POLICYD_BACKEND": "redis", "POLICYD_REDIS_DEADLINE": "1s"},
        "POLICYD_REDIS_DEADLINE",
        "1s",
        "must be below POLICYD_DECISION_TIMEOUT=1s (the default), or a decision "
        "waiting for Redis would get the fallback action",
        id="redis deadline at the decision timeout",
    ),
    pytest.param(
        {"POLICYD_BACKEND": "redis", "POLICYD_DECISION_TIMEOUT": "10ms"},
        "POLICYD_DECISION_TIMEOUT",
        "10ms",
        "must be above POLICYD_REDIS_DEADLINE=20ms (the default), or a decision "
        "waiting for Redis would get the fallback action",
        id="decision timeout below the default redis deadline",
    ),
    pytest.param(
        {"POLICYD_OVERLOAD_EXIT": "0.9"},
        "POLICYD_OVERLOAD_EXIT",
        "0.9",
        "must be below POLICYD_OVERLOAD_ENTER=0.9 (the default)",
        id="overload exit at its enter",
    ),
    pytest.param(
        {"POLICYD_OVERLOAD_EXIT": "0.95"},
        "POLICYD_OVERLOAD_EXIT",
        "0.95",
        "must be below POLICYD_OVERLOAD_ENTER=0.9 (the default)",
        id="overload exit above its enter",
    ),
    pytest.param(
        {"POLICYD_OVERLOAD_ENTER": "0.6"},
        "POLICYD_OVERLOAD_ENTER",
        "0.6",
        "must be above POLICYD_OVERLOAD_EXIT=0.75 (the default)",
        id="overload enter below the default exit",
    ),
    pytest.param(
        {"POLICYD_OVERLOAD_ENTER": "0.6", "POLICYD_OVERLOAD_EXIT": "0.55"},
        "POLICYD_OVERLOAD_ENTER",
        "0.6",
        "must be at least POLICYD_ELEVATED_ENTER=0.7 (the default)",
        id="overload enter below elevated enter",
    ),
    pytest.param(
        {"POLICYD_ELEVATED_EXIT": "0.6", "POLICYD_OVERLOAD_EXIT": "0.55"},
        "POLICYD_OVERLOAD_EXIT",
        "0.55",
        "must be at least POLICYD_ELEVATED_EXIT=0.6",
        id="overload exit below elevated exit",
    ),
]


class TestThresholds:
    """The level thresholds must nest; the error names a variable to change."""

    @pytest.mark.parametrize("env", NESTED)
    def test_nested(self, env: dict[str, str]) -> None:
        """Thresholds that nest load as written."""
        cfg = config.load(env)
        for name, raw in env.items():
            assert getattr(cfg, _attribute(name)) == float(raw)

    @pytest.mark.parametrize(("env", "variable", "value", "problem"), TANGLED)
    def test_tangled(
        self, env: dict[str, str], variable: str, value: str, problem: str
    ) -> None:
        """
        Thresholds that do not nest raise ConfigError naming one variable.

        The variable named is the one the admin set (the first of the pair if
        both or neither were); the problem names the other with its value,
        marked "(the default)" when it was not set.
        """
        with pytest.raises(config.ConfigError) as info:
            config.load(env)
        error = info.value
        assert (error.variable, error.value, error.problem) == (
            variable,
            value,
            problem,
        )
        assert str(error) == f"{variable}={value!r} is invalid: {problem}"
        mentioned = {variable, *re.findall(r"POLICYD_[A-Z_]+", problem)}
        assert set(env) & mentioned  # something the admin set is named

    def test_form_errors_first(self) -> None:
        """A value that does not even convert is reported before any relation."""
        with pytest.raises(config.ConfigError) as info:
            config.load(
                {"POLICYD_ELEVATED_EXIT": "0.9", "POLICYD_MAX_TRACKED_CLIENTS": "1"}
            )
        assert info.value.variable == "POLICYD_MAX_TRACKED_CLIENTS"
