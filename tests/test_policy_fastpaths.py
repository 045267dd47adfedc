"""
The fast paths of the identity signals, pinned to their definitions.

At overload in a flood almost every scored client is new, so its names and
HELO are judged without help from a cache.  `policyd.policy.looks_dynamic`
and the HELO checks are written for speed there (no `ipaddress` objects, no
failed parse of a host name, one regex pass).  Here each is compared, on
generated input, with the plain definition it replaced: the same answer for
every name, address and HELO.
"""

from __future__ import annotations

import ipaddress
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from policyd import policy
from policyd.policy import (
    HELO_BARE_IP,
    HELO_FOREIGN_LITERAL,
    HELO_IMPERSONATES,
    HELO_NOT_FQDN,
    NO_HELO,
    PolicySettings,
)
from policyd.request import PolicyRequest

# -- the definitions -----------------------------------------------------------

_TOKENS = [
    "dyn",
    "dynamic",
    "dynip",
    "dsl",
    "adsl",
    "xdsl",
    "vdsl",
    "cable",
    "pool",
    "dhcp",
    "dial",
    "dialup",
    "dialin",
    "ppp",
    "pppoe",
    "broadband",
    "cust",
    "customer",
    "res",
    "resident",
    "catv",
    "ftth",
    "cpe",
    "unassigned",
]
_TOKEN_SEARCH = re.compile(
    r"(?:^|[.\-_0-9])(?:" + "|".join(_TOKENS) + r")(?=$|[.\-_0-9])", re.IGNORECASE
)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# Not a fast path: the same function on both sides.
_unmapped = policy._unmapped


def dynamic_by_definition(name: str, address: str) -> bool:
    """The dynamic-name test as first written: token regex, ipaddress, joins."""
    if not name or name == "unknown":
        return False
    lowered = name.lower().rstrip(".")
    host_part = lowered.rsplit(".", 2)[0] if lowered.count(".") >= 2 else ""
    if host_part and _TOKEN_SEARCH.search(host_part):
        return True
    parsed = _address(address)
    if isinstance(parsed, ipaddress.IPv4Address):
        digits = re.findall(r"[0-9]+", lowered)
        text = " " + " ".join(d.lstrip("0") or "0" for d in digits) + " "
        octets = list(parsed.packed)
        for order in (octets, octets[::-1]):
            if " " + " ".join(map(str, order)) + " " in text:
                return True
        if f"{int(parsed):08x}" in lowered:
            return True
    return False


_LITERAL = re.compile(r"\[(?:ipv6:)?([0-9a-f:.]+)\]\Z", re.IGNORECASE)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


def helo_by_definition(
    helo: str, request: PolicyRequest, settings: PolicySettings
) -> list[str]:
    """The HELO checks as first written: every address parsed, label by label."""
    if not helo:
        return [NO_HELO]
    name = helo.lower().rstrip(".")
    client = _unmapped(_address(request.client_address))
    literal = _LITERAL.match(name)
    if literal is not None:
        claimed = _unmapped(_address(literal.group(1)))
        if claimed is None or client is None or claimed != client:
            return [HELO_FOREIGN_LITERAL]
        return []
    if _address(name) is not None:
        return [HELO_BARE_IP]
    labels = name.split(".")
    if (
        labels[0] in ("localhost", "localhost6")
        or name in ("ip6-localhost", "ip6-loopback")
        or name in settings.my_hostnames
    ):
        this_host = client is not None and (
            client.is_loopback
            or client
            == _unmapped(_address(request.attributes.get("server_address", "")))
        )
        return [] if this_host else [HELO_IMPERSONATES]
    if (
        len(labels) < 2
        or len(name) > 255
        or not all(_LABEL.match(label) for label in labels)
    ):
        return [HELO_NOT_FQDN]
    if labels[-1].isdigit():
        return [HELO_NOT_FQDN]
    return []


# -- generated input -------------------------------------------------------------

_ADDRESS_TEXT = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.text(alphabet="0123456789.:abcdefx%", max_size=24),
    st.sampled_from(["01.2.3.4", "1.2.3", "256.1.1.1", "1.2.3.4.5", "unknown", ""]),
    st.text(max_size=8),
)


@st.composite
def _address_and_name(draw: st.DrawFn) -> tuple[str, str]:
    """An address and a reverse name made of its pieces, ISP words and noise."""
    address = draw(_ADDRESS_TEXT)
    parsed = _address(address)
    pieces: list[str] = []
    if isinstance(parsed, ipaddress.IPv4Address):
        octets = [str(b) for b in parsed.packed]
        pieces += octets + [f"0{o}" for o in octets] + [f"{int(parsed):08x}"]
        pieces.append("-".join(octets))
        pieces.append(".".join(reversed(octets)))
    part = st.one_of(
        st.sampled_from(_TOKENS + [t.upper() for t in _TOKENS[:5]] + pieces + ["x"]),
        st.text(alphabet="abcdefdsl0123456789", max_size=6),
        st.text(max_size=3),
        st.integers(0, 999).map(str),
    )
    separator = st.sampled_from([".", "-", "_", "", "+", " ", "."])
    parts = draw(st.lists(st.tuples(part, separator), max_size=9))
    name = "".join(p + s for p, s in parts) + draw(
        st.sampled_from(["", "example.net", ".example.net", "net.", "co.uk"])
    )
    return address, name


_HOST_LABEL = st.one_of(
    st.from_regex(r"[a-z0-9_][a-z0-9_-]{0,8}[a-z0-9_]?", fullmatch=True),
    st.sampled_from(["localhost", "LocalHost", "localhost6", "com", "123", "-a", ""]),
    st.text(max_size=4),
    st.just("a" * 64),
)


@st.composite
def _helo_case(draw: st.DrawFn) -> tuple[str, PolicyRequest, PolicySettings]:
    """A HELO (literal, bare address, name), a client and a server address."""
    client = draw(
        st.one_of(
            st.ip_addresses().map(str),
            st.sampled_from(
                ["127.0.0.1", "::1", "::ffff:192.0.2.1", "192.0.2.1", "unknown", ""]
            ),
        )
    )
    server = draw(
        st.sampled_from(["", "192.0.2.1", "198.51.100.1", "::ffff:192.0.2.1"])
    )
    literal_of = st.one_of(st.just(client), _ADDRESS_TEXT)
    helo = draw(
        st.one_of(
            literal_of.map(lambda a: f"[{a}]"),
            literal_of.map(lambda a: f"[IPv6:{a}]"),
            _ADDRESS_TEXT,
            st.lists(_HOST_LABEL, min_size=1, max_size=5).map(".".join),
            st.lists(_HOST_LABEL, min_size=1, max_size=5).map(
                lambda ls: ".".join(ls) + "."
            ),
            st.sampled_from(["ip6-localhost", "IP6-LOOPBACK", "mx.example.org", ""]),
            # around the 255-character limit of a name
            st.integers(245, 265).map(lambda n: ("b" * 60 + ".") * 4 + "c" * (n - 244)),
            st.text(max_size=12),
        )
    )
    mine = draw(st.sampled_from([(), ("mx.example.org",)]))
    request = PolicyRequest.from_attributes(
        {
            "request": "smtpd_access_policy",
            "protocol_state": "RCPT",
            "client_address": client,
            "server_address": server,
            "helo_name": helo,
        },
        1,
    )
    return helo, request, PolicySettings(my_hostnames=mine)


# -- the properties -----------------------------------------------------------------


@settings(max_examples=1500, deadline=None)
@given(_address_and_name())
@example(("192.0.2.1", "x-c0000201.example.net"))
@example(("1.2.3.4", "11-2-3-45.example.net"))
@example(("1.2.3.4", "4.3.2.1.in-addr.example.net"))
@example(("1.2.3.4", "host-001-002-003-004.example.net"))
@example(("170.187.204.221", "aabbccdd.example.net"))
@example(("1.2.3.4", "a.dsl"))
@example(("1.2.3.4", "1.2.3.4"))
@example(("01.2.3.4", "1.2.3.4.example.net"))
@example(("192.0.2.1", "d\u017fl-1.example.net"))
def test_looks_dynamic_is_its_definition(case: tuple[str, str]) -> None:
    """
    `looks_dynamic` answers as the regex-and-ipaddress definition.

    For every ASCII name (what DNS gives).  The one difference is by design:
    the ISP words are matched in the lowered name without Unicode case folds,
    so a name with a long s (U+017F, folded to "s") is never *more* dynamic
    than by the definition.
    """
    address, name = case
    fast = policy.looks_dynamic.__wrapped__(name, address)
    if name.isascii():
        assert fast == dynamic_by_definition(name, address)
    else:
        assert not fast or dynamic_by_definition(name, address)


@settings(max_examples=1500, deadline=None)
@given(_helo_case())
def test_helo_signals_are_their_definition(
    case: tuple[str, PolicyRequest, PolicySettings],
) -> None:
    """The HELO checks answer as the label-by-label definition, for any HELO."""
    helo, request, settings_ = case
    assert policy._helo_signals(helo, request, settings_) == helo_by_definition(
        helo, request, settings_
    )
