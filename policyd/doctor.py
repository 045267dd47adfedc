"""
``policyd doctor``: check a Postfix configuration against what policyd needs.

Pure functions over `policyd.postconf`'s values: a Postfix configuration
and policyd's own settings in, `Finding` values out.  Each finding says
what is wrong, why it matters and the exact line to write.  Reading files,
running ``postconf``, asking policyd and the exit status belong to
`policyd.cli`.

The advice follows docs/postfix.md (policyd's wiring) and Postfix's
STRESS_README (reference §4.1, §5.3, §5.7, §5.8).
"""

from __future__ import annotations

import ipaddress
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

import attrs
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.utils import getProcessOutputAndValue

from policyd import ask
from policyd.config import Config
from policyd.postconf import (
    PolicyCheck,
    PostconfError,
    Service,
    expand,
    parse_main,
    parse_master,
    policy_checks,
    seconds,
    split_list,
)

ERROR: Final = "error"
WARNING: Final = "warning"
INFO: Final = "info"
SEVERITIES: Final = (ERROR, WARNING, INFO)

#: The restriction lists smtpd evaluates, in the order of the SMTP stages.
RESTRICTIONS: Final = (
    "smtpd_client_restrictions",
    "smtpd_helo_restrictions",
    "smtpd_sender_restrictions",
    "smtpd_relay_restrictions",
    "smtpd_recipient_restrictions",
    "smtpd_data_restrictions",
    "smtpd_end_of_data_restrictions",
)

#: Postfix's defaults of the policy client settings (reference §4.1).
POLICY_DEFAULTS: Final = {
    "timeout": "100s",
    "max_idle": "300s",
    "max_ttl": "1000s",
    "default_action": "451 4.3.5 Server configuration problem",
}

#: Longest policy timeout doctor accepts: policyd answers in milliseconds.
MAX_TIMEOUT: Final = 10.0

#: STRESS_README's stress-dependent defaults (reference §5.3).
STRESS_DEFAULTS: Final = {
    "smtpd_timeout": "${stress?{10}:{300}}s",
    "smtpd_hard_error_limit": "${stress?{1}:{20}}",
    "smtpd_junk_command_limit": "${stress?{1}:{100}}",
    "smtpd_starttls_timeout": "${stress?{10}:{300}}s",
}


@attrs.frozen
class Finding:
    """One thing doctor has to say, with the line that fixes it."""

    id: str
    severity: str
    #: The service or parameter it concerns.
    subject: str
    what: str
    why: str
    #: The exact main.cf/master.cf line or POLICYD_ setting to write.
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        """The finding as a JSON object."""
        return attrs.asdict(self)


@attrs.frozen
class Policyd:
    """What doctor needs of policyd's own configuration."""

    listen: tuple[str, ...]
    decision_timeout: float = 1.0
    idle_timeout: float = 600.0
    smtpd_capacity: int = 100

    @classmethod
    def from_config(cls, cfg: Config) -> Policyd:
        """The settings of a loaded configuration."""
        return cls(
            cfg.listen, cfg.decision_timeout, cfg.idle_timeout, cfg.smtpd_capacity
        )


@attrs.frozen
class Postfix:
    """A Postfix configuration: ``postconf`` and, if known, ``postconf -M``."""

    params: Mapping[str, str] = attrs.field(hash=False)
    services: tuple[Service, ...] | None = None

    def value(self, name: str, service: Service | None = None) -> str:
        """The effective value of *name* (for *service*, with its ``-o``)."""
        if service is not None:
            return service.param(name, self.params)
        return expand(self.params.get(name, ""), self.params)


# -- where policyd listens ---------------------------------------------------


@attrs.frozen
class Listener:
    """One endpoint of ``POLICYD_LISTEN``: inet (host None: every address) or unix."""

    kind: str
    host: str | None = None
    port: int = 0
    path: str = ""


def listeners(listen: Iterable[str]) -> tuple[Listener, ...]:
    """The TCP and unix endpoints of ``POLICYD_LISTEN`` (systemd ones are unknown)."""
    found = []
    for description in listen:
        scheme, *words = ask.split_description(description)
        if scheme[1] in ("tcp", "tcp6"):
            port, host = "", None
            for key, value in words:
                if key in (None, "port") and not port:
                    port = value
                elif key == "interface":
                    host = value
            if host is not None and _is_unspecified(host):
                host = None
            if port.isdigit():
                found.append(Listener("inet", host, int(port)))
        elif scheme[1] == "unix":
            path = next((v for k, v in words if k in (None, "address")), "")
            if path:
                found.append(Listener("unix", path=os.path.normpath(path)))
    return tuple(found)


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _same_host(postfix_host: str, policyd_host: str) -> bool:
    if postfix_host.lower() == policyd_host.lower():
        return True
    try:
        theirs = ipaddress.ip_address(policyd_host)
    except ValueError:
        return False
    if postfix_host.lower() == "localhost":
        return theirs.is_loopback
    try:
        return ipaddress.ip_address(postfix_host) == theirs
    except ValueError:
        return False


def postfix_socket(endpoint: str, queue_directory: str) -> tuple[str, str, int]:
    """
    Where a ``check_policy_service`` connects, or `PostconfError`.

    ``("inet", host, port)`` or ``("unix", absolute path, 0)``; a relative
    unix path is relative to the queue directory, as Postfix resolves it.
    """
    kind, colon, rest = endpoint.partition(":")
    if colon and kind == "inet":
        host, _, port = rest.rpartition(":")
        if port.isdigit() and host:
            return "inet", host.strip("[]"), int(port)
        raise PostconfError(f"{endpoint!r} is not inet:HOST:PORT")
    path = rest if colon and kind in ("unix", "local") else endpoint
    if not colon or kind in ("unix", "local"):
        return "unix", os.path.normpath(os.path.join(queue_directory, path)), 0
    raise PostconfError(f"{endpoint!r} is not inet:HOST:PORT or unix:PATH")


def points_at(endpoint: str, policyd: Iterable[Listener], queue_directory: str) -> bool:
    """Whether a ``check_policy_service`` *endpoint* reaches policyd."""
    try:
        kind, where, port = postfix_socket(endpoint, queue_directory)
    except PostconfError:
        return False
    for listener in policyd:
        if listener.kind != kind:
            continue
        if kind == "unix" and listener.path == where:
            return True
        if (
            kind == "inet"
            and listener.port == port
            and (listener.host is None or _same_host(where, listener.host))
        ):
            return True
    return False


# -- the policy checks of a configuration ------------------------------------


@attrs.frozen
class Located:
    """A ``check_policy_service`` and where it is written."""

    check: PolicyCheck
    #: ``main.cf`` or ``master.cf service NAME``.
    where: str
    #: The items of its restriction list.
    items: tuple[str, ...]
    service: Service | None = None

    @property
    def subject(self) -> str:
        """Where, for a finding: ``main.cf smtpd_recipient_restrictions``."""
        return f"{self.where} {self.check.restriction}"


def smtpd_services(services: Iterable[Service]) -> list[Service]:
    """The smtpd services: ``inet`` listeners and ``pass`` ones behind postscreen."""
    return [s for s in services if s.command == "smtpd" and s.type in ("inet", "pass")]


def _list_checks(
    restriction: str, value: str, where: str, service: Service | None
) -> list[Located]:
    items = tuple(split_list(value))
    return [
        Located(check, where, items, service)
        for check in policy_checks(restriction, value)
    ]


def located_checks(postfix: Postfix) -> list[Located]:
    """
    Every ``check_policy_service`` of the configuration, expanded.

    Those of main.cf's lists, and those of the smtpd services' ``-o``
    overrides of them.
    """
    found = []
    for restriction in RESTRICTIONS:
        found += _list_checks(restriction, postfix.value(restriction), "main.cf", None)
    for service in smtpd_services(postfix.services or ()):
        for name, _ in service.options:
            if name in RESTRICTIONS:
                found += _list_checks(
                    name,
                    service.param(name, postfix.params),
                    f"master.cf service {service.name}",
                    service,
                )
    return found


def _normal(text: str) -> str:
    return " ".join(text.replace(",", " ").split())


# -- capacity ----------------------------------------------------------------


@attrs.frozen
class ServiceCapacity:
    """One smtpd service's share of the policy connections."""

    service: str
    #: Its process limit; None if it cannot be read.
    maxproc: int | None
    #: Distinct ``check_policy_service`` texts that reach policyd: each is
    #: one connection per smtpd process.
    connections: int

    @property
    def total(self) -> int:
        """Connections this service can hold at once."""
        return (self.maxproc or 0) * self.connections


@attrs.frozen
class Capacity:
    """How many policy connections a Postfix can open to policyd at once."""

    services: tuple[ServiceCapacity, ...]

    @property
    def total(self) -> int:
        """The sum over the services: what ``POLICYD_SMTPD_CAPACITY`` should be."""
        return sum(s.total for s in self.services)


def smtpd_capacity(
    params: Mapping[str, str],
    services: Iterable[Service],
    reaches_policyd: Callable[[str], bool],
) -> Capacity:
    """
    The sum of maxproc x distinct policyd checks, over the smtpd services.

    smtpd opens one connection per distinct ``check_policy_service`` text,
    lazily, and keeps it; each service uses main.cf's restriction lists
    unless its ``-o`` overrides them.
    """
    shares = []
    for service in smtpd_services(services):
        texts = set()
        for restriction in RESTRICTIONS:
            for check in policy_checks(restriction, service.param(restriction, params)):
                if reaches_policyd(check.endpoint):
                    texts.add(_normal(check.text))
        shares.append(
            ServiceCapacity(service.name, service.process_limit(params), len(texts))
        )
    return Capacity(tuple(shares))


# -- the checks --------------------------------------------------------------


def _render(endpoint: str, settings: Iterable[tuple[str, str]]) -> str:
    parts = [endpoint] + [
        f"{{ {name} = {value} }}"
        if (" " in value or "," in value)
        else f"{name}={value}"
        for name, value in settings
    ]
    return f"check_policy_service {{ {', '.join(parts)} }}"


def _effective(located: Located, name: str, postfix: Postfix) -> str:
    """A policy client setting: the check's own, else main.cf's, else Postfix's."""
    own = located.check.setting(name)
    if own is not None:
        return own
    value = postfix.value(f"smtpd_policy_service_{name}", located.service)
    return value or POLICY_DEFAULTS[name]


def recommended(located: Located, postfix: Postfix, policyd: Policyd) -> str:
    """The check's text with every setting doctor would change changed."""
    settings = dict(located.check.settings)
    action = _effective(located, "default_action", postfix)
    if action.split()[0].upper() != "DUNNO":
        settings["default_action"] = "DUNNO"
    timeout = seconds(_effective(located, "timeout", postfix))
    if timeout is None or timeout > MAX_TIMEOUT or timeout <= policyd.decision_timeout:
        settings["timeout"] = f"{max(10, math.floor(policyd.decision_timeout) + 1)}s"
    idle = seconds(_effective(located, "max_idle", postfix))
    if idle is None or idle >= policyd.idle_timeout:
        settings["max_idle"] = f"{max(1, math.floor(policyd.idle_timeout / 2))}s"
    ttl = seconds(_effective(located, "max_ttl", postfix))
    if ttl is None or ttl < 60:
        settings["max_ttl"] = "1000s"
    return _render(located.check.endpoint, settings.items())


def _fix(located: Located, postfix: Postfix, policyd: Policyd) -> str:
    return (
        f"in {located.subject}, replace '{located.check.line}' with "
        f"'{recommended(located, postfix, policyd)}'"
    )


def check_service(
    located: Located, postfix: Postfix, policyd: Policyd
) -> list[Finding]:
    """The client settings of one check that reaches policyd."""
    findings = []
    subject = f"{located.subject}: {located.check.line}"
    fix = _fix(located, postfix, policyd)
    action = _effective(located, "default_action", postfix)
    if action.split()[0].upper() != "DUNNO":
        findings.append(
            Finding(
                "default-action",
                ERROR,
                subject,
                f"when policyd does not answer, Postfix applies '{action}'",
                "a policyd restart or crash then defers all mail checked here; "
                "with DUNNO mail flows as if policyd were not configured",
                fix,
            )
        )
    raw = _effective(located, "timeout", postfix)
    timeout = seconds(raw)
    if timeout is None or timeout > MAX_TIMEOUT:
        findings.append(
            Finding(
                "policy-timeout",
                WARNING,
                subject,
                f"Postfix waits up to {raw} for each connect, write and read",
                "a policyd that hangs holds each smtpd process about twice that "
                "long per request (two attempts); policyd answers in "
                "milliseconds, 10s is a safety net",
                fix,
            )
        )
    if timeout is not None and timeout <= policyd.decision_timeout:
        findings.append(
            Finding(
                "timeout-below-decision",
                ERROR,
                subject,
                f"Postfix's timeout ({raw}) is not above POLICYD_DECISION_TIMEOUT "
                f"({policyd.decision_timeout:g}s)",
                "Postfix gives up before policyd sends its fallback action, and "
                "applies default_action after a retry instead",
                fix,
            )
        )
    raw = _effective(located, "max_idle", postfix)
    idle = seconds(raw)
    if idle is None or idle >= policyd.idle_timeout:
        findings.append(
            Finding(
                "max-idle",
                WARNING,
                subject,
                f"max_idle ({raw}) is not below POLICYD_IDLE_TIMEOUT "
                f"({policyd.idle_timeout:g}s)",
                "policyd then closes idle connections that smtpd still counts on; "
                "smtpd's next request finds a closed connection and pays a "
                "one-second retry",
                f"{fix}, or POLICYD_IDLE_TIMEOUT={math.ceil((idle or 0) * 2)}s",
            )
        )
    raw = _effective(located, "max_ttl", postfix)
    ttl = seconds(raw)
    if ttl is None or ttl < 60:
        findings.append(
            Finding(
                "max-ttl",
                WARNING,
                subject,
                f"max_ttl ({raw}) closes every policy connection within a minute",
                "each smtpd process reconnects that often; policyd keeps "
                "connections open and Postfix's default is 1000s",
                fix,
            )
        )
    return findings


def _wiring_snippet(policyd: Policyd, postfix: Postfix) -> str:
    endpoint = "inet:127.0.0.1:10040"
    queue = postfix.value("queue_directory")
    for listener in listeners(policyd.listen):
        if listener.kind == "inet":
            endpoint = f"inet:{listener.host or '127.0.0.1'}:{listener.port}"
        else:
            relative = os.path.relpath(listener.path, queue) if queue else ""
            use = (
                relative
                if relative and not relative.startswith("..")
                else listener.path
            )
            endpoint = f"unix:{use}"
        break
    return (
        "smtpd_recipient_restrictions = permit_mynetworks, "
        "permit_sasl_authenticated, reject_unauth_destination, "
        f"check_policy_service {{ {endpoint}, timeout=10s, default_action=DUNNO }}"
    )


def check_wiring(
    postfix: Postfix, policyd: Policyd
) -> tuple[list[Finding], list[Located]]:
    """Whether any check reaches policyd; its settings and list order."""
    queue = postfix.value("queue_directory")
    where = listeners(policyd.listen)
    found = located_checks(postfix)
    ours = [lc for lc in found if points_at(lc.check.endpoint, where, queue)]
    findings: list[Finding] = []
    if not ours:
        others = sorted({lc.check.endpoint for lc in found})
        elsewhere = f"; the checks there go to {', '.join(others)}" if others else ""
        findings.append(
            Finding(
                "no-policy-service",
                ERROR,
                "smtpd_*_restrictions",
                "no check_policy_service reaches policyd at "
                f"{' '.join(policyd.listen)} (POLICYD_LISTEN){elsewhere}",
                "Postfix never asks policyd, so it protects nothing",
                _wiring_snippet(policyd, postfix),
            )
        )
        return findings, ours
    seen: set[tuple[str, str, str]] = set()
    for located in ours:
        key = (located.where, located.check.restriction, _normal(located.check.text))
        if key in seen:
            continue
        seen.add(key)
        findings += check_service(located, postfix, policyd)
        findings += check_order(located)
    return findings, ours


def check_order(located: Located) -> list[Finding]:
    """The permits for your own clients come before the policy check."""
    findings = []
    before = located.items[: located.check.position]
    after = located.items[located.check.position + 2 :]
    connect = located.check.restriction == "smtpd_client_restrictions"
    for permit in ("permit_mynetworks", "permit_sasl_authenticated"):
        # At CONNECT no client has authenticated yet: the permit can only
        # matter later.
        if permit in before or (connect and permit == "permit_sasl_authenticated"):
            continue
        if permit not in after and permit == "permit_sasl_authenticated":
            continue
        findings.append(
            Finding(
                "permit-order",
                WARNING,
                f"{located.subject}: {located.check.line}",
                f"{permit} is not before the policy check",
                "your own networks and authenticated users should be let "
                "through before policyd is asked, so that it never touches them",
                f"in {located.subject}, put {permit} before check_policy_service",
            )
        )
    return findings


def check_connect_stage(postfix: Postfix, ours: Sequence[Located]) -> list[Finding]:
    """At CONNECT, policyd in smtpd_client_restrictions needs no delayed reject."""
    findings = []
    seen = set()
    for located in ours:
        if located.check.restriction != "smtpd_client_restrictions":
            continue
        delay = postfix.value("smtpd_delay_reject", located.service) or "yes"
        if delay.lower() == "no" or located.where in seen:
            continue
        seen.add(located.where)
        override = located.service is not None and any(
            name == "smtpd_delay_reject" for name, _ in located.service.options
        )
        fix = (
            f"in master.cf service {located.service.name}: -o smtpd_delay_reject=no"
            if located.service is not None and override
            else "smtpd_delay_reject = no"
        )
        findings.append(
            Finding(
                "delay-reject",
                ERROR,
                f"{located.where} smtpd_delay_reject",
                f"policyd is in smtpd_client_restrictions but smtpd_delay_reject "
                f"is {delay}",
                "Postfix then evaluates the client restrictions at RCPT TO, not "
                "when the client connects: a refusal no longer frees the smtpd "
                "process before the client has used it (review your other "
                "client, HELO and sender restrictions when you change it)",
                fix,
            )
        )
    return findings


def check_capacity(
    postfix: Postfix, policyd: Policyd, reaches: Callable[[str], bool]
) -> list[Finding]:
    """POLICYD_SMTPD_CAPACITY equals the connections Postfix can open."""
    if postfix.services is None:
        return []
    capacity = smtpd_capacity(postfix.params, postfix.services, reaches)
    unknown = [s.service for s in capacity.services if s.maxproc is None]
    if capacity.total == 0 or unknown:
        return []
    if capacity.total == policyd.smtpd_capacity:
        return []
    parts = " + ".join(
        f"{s.service} {s.maxproc}x{s.connections}"
        for s in capacity.services
        if s.connections
    )
    return [
        Finding(
            "smtpd-capacity",
            WARNING,
            "POLICYD_SMTPD_CAPACITY",
            f"POLICYD_SMTPD_CAPACITY is {policyd.smtpd_capacity}, but the smtpd "
            f"services can hold {capacity.total} policy connections "
            f"({parts}: maxproc x distinct check_policy_service texts)",
            "policyd's load ratio is connections in use over this capacity: "
            "too high and it sees stress late, too low and it refuses "
            "clients while Postfix still has processes free",
            f"POLICYD_SMTPD_CAPACITY={capacity.total}",
        )
    ]


def check_stress(postfix: Postfix) -> list[Finding]:
    """STRESS_README: leave the stress-dependent defaults in place."""
    findings = []
    targets: list[tuple[str, Service | None]] = [("main.cf", None)]
    targets += [
        (f"master.cf service {s.name}", s)
        for s in smtpd_services(postfix.services or ())
    ]
    for where, service in targets:
        for name, default in STRESS_DEFAULTS.items():
            if service is None:
                value = postfix.params.get(name)
            else:
                value = dict(service.options).get(name)
            if value is None or "${stress?" in value or "$stress" in value:
                continue
            fix = (
                f"{name} = {default}"
                if service is None
                else f"in master.cf service {service.name}: drop -o {name}={value}"
            )
            findings.append(
                Finding(
                    "stress-default",
                    WARNING,
                    f"{where} {name}",
                    f"{name} is fixed at {value}, the same with or without stress",
                    "Postfix's default tightens it when master(8) runs out of "
                    "smtpd processes (STRESS_README), freeing processes from "
                    "slow and junk clients",
                    fix,
                )
            )
    return findings


def _postscreen(services: Iterable[Service]) -> Service | None:
    return next(
        (s for s in services if s.type == "inet" and s.command == "postscreen"), None
    )


def _smtp_service(services: Sequence[Service]) -> Service | None:
    """The smtpd that serves port 25: the pass service behind postscreen, or smtp."""
    if _postscreen(services) is not None:
        passing = [s for s in smtpd_services(services) if s.type == "pass"]
        return passing[0] if passing else None
    for service in smtpd_services(services):
        if service.type == "inet" and service.name.rpartition(":")[2] in ("smtp", "25"):
            return service
    return None


def check_anvil(postfix: Postfix) -> list[Finding]:
    """The per-client connection limit can bite before one client takes all."""
    if postfix.services is None:
        return []
    service = _smtp_service(postfix.services)
    if service is None:
        return []
    raw = postfix.value("smtpd_client_connection_count_limit", service)
    maxproc = service.process_limit(postfix.params)
    try:
        limit = int(raw)
    except ValueError:
        return []
    if maxproc is None:
        return []
    subject = f"smtpd_client_connection_count_limit (service {service.name})"
    fix = f"smtpd_client_connection_count_limit = {max(1, maxproc // 2)}"
    if limit == 0:
        return [
            Finding(
                "anvil-off",
                WARNING,
                subject,
                "smtpd_client_connection_count_limit is 0: one client may hold "
                "any number of smtpd processes",
                f"a single client can take all {maxproc} processes of "
                f"{service.name} before policyd sees it; anvil's limit costs "
                "nothing (STRESS_README)",
                fix,
            )
        ]
    if limit >= maxproc:
        return [
            Finding(
                "anvil-limit-high",
                INFO,
                subject,
                f"smtpd_client_connection_count_limit ({limit}) is not below "
                f"{service.name}'s process limit ({maxproc})",
                "the limit never bites: one client can take every process",
                fix,
            )
        ]
    return []


def check_postscreen(postfix: Postfix) -> list[Finding]:
    """Say whether postscreen screens port 25 (policyd never sees what it drops)."""
    if postfix.services is None:
        return [
            Finding(
                "no-master",
                INFO,
                "master.cf",
                "no postconf -M output given: process limits, capacity, anvil "
                "and postscreen are not checked",
                "those checks need the services and their maxproc",
                "give --master FILE with the output of 'postconf -M'",
            )
        ]
    screen = _postscreen(postfix.services)
    if screen is not None:
        return [
            Finding(
                "postscreen",
                INFO,
                f"master.cf service {screen.name}",
                "postscreen screens this port before smtpd",
                "clients it drops never reach smtpd or policyd; policyd sees "
                "only those it passes",
            )
        ]
    return [
        Finding(
            "no-postscreen",
            INFO,
            "master.cf",
            "no postscreen in front of smtpd",
            "every client gets an smtpd process; postscreen (STRESS_README) "
            "would drop many bots for the cost of one process",
            "smtp inet n - y - 1 postscreen (and smtpd pass - - y - - smtpd)",
        )
    ]


def diagnose(postfix: Postfix, policyd: Policyd) -> list[Finding]:
    """Every finding, errors first."""
    where = listeners(policyd.listen)
    queue = postfix.value("queue_directory")

    def reaches(endpoint: str) -> bool:
        return points_at(endpoint, where, queue)

    wiring, ours = check_wiring(postfix, policyd)
    findings = [
        *wiring,
        *check_connect_stage(postfix, ours),
        *check_capacity(postfix, policyd, reaches),
        *check_stress(postfix),
        *check_anvil(postfix),
        *check_postscreen(postfix),
    ]
    return sort(findings)


def sort(findings: Iterable[Finding]) -> list[Finding]:
    """Errors, then warnings, then info, each in the order found."""
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def policyd_endpoints(postfix: Postfix, policyd: Policyd) -> list[str]:
    """The distinct endpoints of the checks that reach policyd, as written."""
    where = listeners(policyd.listen)
    queue = postfix.value("queue_directory")
    found: dict[str, None] = {}
    for located in located_checks(postfix):
        if points_at(located.check.endpoint, where, queue):
            found[located.check.endpoint] = None
    return list(found)


def ask_target(endpoint: str, queue_directory: str) -> ask.Target:
    """Where to connect for a ``check_policy_service`` endpoint."""
    kind, where, port = postfix_socket(endpoint, queue_directory)
    if kind == "unix":
        return ask.UNIXTarget(where)
    return ask.TCPTarget(where, port)


def check_answers(
    postfix: Postfix,
    policyd: Policyd,
    asking: Callable[[ask.Target], str],
) -> list[Finding]:
    """
    Ask policyd once at each endpoint the checks use.

    *asking* returns the action or raises `ask.AskFailed`.
    """
    findings = []
    queue = postfix.value("queue_directory")
    for endpoint in policyd_endpoints(postfix, policyd):
        target = ask_target(endpoint, queue)
        try:
            action = asking(target)
        except ask.AskFailed as e:
            findings.append(
                Finding(
                    "no-answer",
                    ERROR,
                    endpoint,
                    f"asking {target} failed: {e}",
                    "Postfix gets the same: every request waits for the timeout "
                    "and ends in default_action",
                    "start policyd (policyd serve) with this POLICYD_LISTEN, or "
                    "point check_policy_service where it listens",
                )
            )
        else:
            findings.append(
                Finding(
                    "answers",
                    INFO,
                    endpoint,
                    f"policyd at {target} answers: {action}",
                    "Postfix can reach it there",
                )
            )
    return findings


def summary(findings: Sequence[Finding]) -> dict[str, int]:
    """How many findings of each severity."""
    return {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}


def needs_fixing(findings: Iterable[Finding]) -> bool:
    """Whether any finding is an error or a warning."""
    return any(f.severity != INFO for f in findings)


def render_text(findings: Sequence[Finding]) -> str:
    """One block per finding, grouped by severity, and a summary line."""
    blocks = []
    for finding in findings:
        lines = [
            f"{finding.severity.upper()} [{finding.id}] {finding.subject}",
            f"  what: {finding.what}",
            f"  why:  {finding.why}",
        ]
        if finding.fix:
            lines.append(f"  fix:  {finding.fix}")
        blocks.append("\n".join(lines))
    counts = summary(findings)
    verdict = "needs fixing" if needs_fixing(findings) else "nothing to fix"
    blocks.append(
        f"{counts[ERROR]} error(s), {counts[WARNING]} warning(s), "
        f"{counts[INFO]} info: {verdict}"
    )
    return "\n\n".join(blocks) + "\n"


# -- POLICYD_SMTPD_CAPACITY=auto -----------------------------------------------


def postconf_program() -> str | None:
    """The postconf program: on $PATH, or in an sbin directory."""
    return shutil.which("postconf") or shutil.which(
        "postconf", path="/usr/sbin:/usr/local/sbin:/sbin"
    )


def auto_capacity(listen: Sequence[str], postfix: Postfix) -> Capacity:
    """
    What POLICYD_SMTPD_CAPACITY should be for this Postfix: `smtpd_capacity`.

    `PostconfError` if it cannot be told: no master.cf services, a maxproc
    that cannot be read, or no smtpd service that reaches policyd.
    """
    if postfix.services is None:
        raise PostconfError("no master.cf services (postconf -M) to count")
    where = listeners(listen)
    queue = postfix.value("queue_directory")
    capacity = smtpd_capacity(
        postfix.params, postfix.services, lambda e: points_at(e, where, queue)
    )
    unknown = [s.service for s in capacity.services if s.maxproc is None]
    if unknown:
        raise PostconfError(f"cannot read the process limit of {', '.join(unknown)}")
    if capacity.total == 0:
        raise PostconfError(
            "no smtpd service calls policyd here (no check_policy_service "
            "reaches POLICYD_LISTEN)"
        )
    return capacity


def describe_capacity(capacity: Capacity) -> str:
    """``smtp 100x1 + submission 20x1``: how the capacity adds up."""
    return " + ".join(
        f"{s.service} {s.maxproc}x{s.connections}"
        for s in capacity.services
        if s.connections
    )


def _postconf_argv(config_dir: str, *args: str) -> list[str]:
    program = postconf_program()
    if program is None:
        raise PostconfError("postconf not found (is Postfix installed here?)")
    return [program, *(("-c", config_dir) if config_dir else ()), *args]


def _failed(argv: Sequence[str], output: str, code: object) -> PostconfError:
    lines = output.strip().splitlines()
    return PostconfError(f"{' '.join(argv)} failed: {lines[-1] if lines else code}")


def _postfix(main: str, master: str) -> Postfix:
    return Postfix(
        parse_main(main, "postconf output"),
        parse_master(master, "postconf -M output"),
    )


def read_postfix(config_dir: str = "") -> Postfix:
    """The Postfix configuration of this host (``postconf``, ``postconf -M``)."""
    texts = []
    for args in ((), ("-M",)):
        argv = _postconf_argv(config_dir, *args)
        try:
            done = subprocess.run(  # noqa: S603 - postconf with our own arguments
                argv, capture_output=True, text=True, errors="replace", timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PostconfError(f"running {' '.join(argv)} failed: {e}") from None
        if done.returncode != 0:
            raise _failed(argv, done.stderr or done.stdout, done.returncode)
        texts.append(done.stdout)
    return _postfix(*texts)


async def read_postfix_async(reactor: IReactorProcess, config_dir: str = "") -> Postfix:
    """`read_postfix`, without blocking *reactor* (a reload while serving)."""
    texts = []
    for args in ((), ("-M",)):
        argv = _postconf_argv(config_dir, *args)
        out, err, code = await getProcessOutputAndValue(
            argv[0], argv[1:], env=dict(os.environ), reactor=reactor
        )
        if code != 0:
            raise _failed(argv, err.decode(errors="replace"), code)
        texts.append(out.decode(errors="replace"))
    return _postfix(*texts)
