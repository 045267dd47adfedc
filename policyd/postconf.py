"""
Postfix's configuration as ``postconf`` prints it, read into plain values.

``policyd doctor`` checks a configuration from ``postconf`` (main.cf, every
parameter with its effective value) and ``postconf -M`` (master.cf, one
service per line).  Reading them is kept here, pure and without Twisted,
so that the checks (`policyd.doctor`) and a later automatic
``POLICYD_SMTPD_CAPACITY`` can share it.

Postfix's own syntax, as postconf(5) and master(5) document it:

- main.cf: ``name = value``; a line starting with white space continues
  the previous one.  ``$name`` and ``${name}`` refer to other parameters.
- Lists (restrictions, ``-o`` values): items separated by white space or
  commas; ``{ ... }`` groups text with spaces into one item (Postfix 3.0).
- ``check_policy_service { ENDPOINT, name=value, { name = value with spaces } }``
  or the older ``check_policy_service ENDPOINT``.
- master.cf: ``service type private unpriv chroot wakeup maxproc command
  args``; ``-o name=value`` or ``-o { name = value }`` overrides a main.cf
  parameter for that service only; ``postconf -Mf`` folds long lines with
  leading white space.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

import attrs


class PostconfError(ValueError):
    """Text that is not what ``postconf`` prints; the message says why."""


# Parameters that only a full ``postconf`` output (not ``postconf -n``, not
# a main.cf) is sure to contain: the checks need the defaults too.
REQUIRED: Final = ("mail_version", "default_process_limit")

_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """Lines with their continuations joined, without comments or blanks."""
    current: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and current:
            current.append(line.strip())
            continue
        if current:
            yield start, " ".join(current)
        current, start = [line.strip()], number
    if current:
        yield start, " ".join(current)


def parse_main(text: str, source: str = "postconf output") -> dict[str, str]:
    """
    ``name = value`` lines (``postconf`` output) as a dict.

    Raises `PostconfError` for a line that is not ``name = value``, and for
    text without `REQUIRED` (``postconf -n`` output or a main.cf lacks the
    defaults the checks rely on).
    """
    params: dict[str, str] = {}
    for number, line in _logical_lines(text):
        name, equals, value = line.partition("=")
        name = name.strip()
        if not equals or not _NAME.match(name):
            raise PostconfError(
                f"{source} line {number} is not 'name = value': {line[:60]!r}"
            )
        params[name] = value.strip()
    missing = [name for name in REQUIRED if name not in params]
    if missing:
        raise PostconfError(
            f"{source} has no {' or '.join(missing)}: save the full output of "
            "'postconf' (not 'postconf -n', not main.cf)"
        )
    return params


def expand(value: str, params: Mapping[str, str], depth: int = 10) -> str:
    """
    *value* with ``$name``, ``${name}`` and ``$(name)`` replaced, recursively.

    Conditional forms (``${name?text}``, ``${name:text}``) and unknown names
    stay as written: the checks treat what they cannot resolve as text.
    """

    def replace(match: re.Match[str]) -> str:
        name = match["a"] or match["b"] or match["c"]
        if name not in params or depth <= 0:
            return match[0]
        return expand(params[name], params, depth - 1)

    return re.sub(r"\$(?:\{(?P<a>\w+)\}|\((?P<b>\w+)\)|(?P<c>\w+))", replace, value)


# -- lists -------------------------------------------------------------------


def split_list(value: str) -> list[str]:
    """
    The items of a Postfix list, or `PostconfError` for unbalanced braces.

    Items are separated by white space or commas; a ``{ ... }`` group (with
    nested groups) is kept whole, braces included.
    """
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise PostconfError(f"unbalanced '}}' in {value[:80]!r}")
        if depth == 0 and (char.isspace() or char == ","):
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(char)
        if depth == 0 and char == "}":
            items.append("".join(current))
            current = []
    if depth:
        raise PostconfError(f"unbalanced '{{' in {value[:80]!r}")
    if current:
        items.append("".join(current))
    return items


def unbrace(item: str) -> str:
    """The text inside ``{ ... }``, stripped; any other item unchanged."""
    if item.startswith("{") and item.endswith("}"):
        return item[1:-1].strip()
    return item


@attrs.frozen
class PolicyCheck:
    """One ``check_policy_service`` in a restriction list."""

    #: The restriction list it is in, e.g. ``smtpd_recipient_restrictions``.
    restriction: str
    #: Its argument as written: ``inet:127.0.0.1:10040`` or ``{ ... }``.
    text: str
    #: Where it connects, e.g. ``inet:127.0.0.1:10040`` or ``unix:private/x``.
    endpoint: str
    #: Its own settings (``timeout``, ``default_action``, ...), in order.
    settings: tuple[tuple[str, str], ...]
    #: Its position in the list (the items before it come first).
    position: int

    def setting(self, name: str) -> str | None:
        """The value of its own *name* setting, if given."""
        return dict(self.settings).get(name)

    @property
    def line(self) -> str:
        """How it reads in the list: ``check_policy_service TEXT``."""
        return f"check_policy_service {self.text}"


def _settings(inside: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    items = [unbrace(item) for item in split_list(inside)]
    if not items:
        raise PostconfError("check_policy_service { } names no endpoint")
    endpoint, *rest = items
    settings = []
    for item in rest:
        name, equals, value = item.partition("=")
        if not equals:
            raise PostconfError(
                f"check_policy_service setting {item!r} is not name=value"
            )
        settings.append((name.strip(), value.strip()))
    return endpoint, tuple(settings)


def policy_checks(restriction: str, value: str) -> list[PolicyCheck]:
    """Every ``check_policy_service`` in the list *value* of *restriction*."""
    items = split_list(value)
    checks = []
    for position, item in enumerate(items):
        if item != "check_policy_service":
            continue
        if position + 1 >= len(items):
            raise PostconfError(f"{restriction}: check_policy_service without a server")
        text = items[position + 1]
        if text.startswith("{"):
            endpoint, settings = _settings(unbrace(text))
        else:
            endpoint, settings = text, ()
        checks.append(PolicyCheck(restriction, text, endpoint, settings, position))
    return checks


# -- master.cf ---------------------------------------------------------------


@attrs.frozen
class Service:
    """One master.cf service, as ``postconf -M`` prints it."""

    name: str
    type: str
    private: str
    unpriv: str
    chroot: str
    wakeup: str
    #: The process limit as written: a number, or ``-`` for the default.
    maxproc: str
    command: str
    #: The ``-o name=value`` overrides, in order.
    options: tuple[tuple[str, str], ...] = ()
    #: Other arguments, as written.
    args: tuple[str, ...] = ()

    def process_limit(self, params: Mapping[str, str]) -> int | None:
        """The process limit (``-``: ``default_process_limit``); None if unknown."""
        raw = (
            params.get("default_process_limit", "100")
            if self.maxproc == "-"
            else self.maxproc
        )
        try:
            return int(expand(raw, params))
        except ValueError:
            return None

    def param(self, name: str, params: Mapping[str, str]) -> str:
        """The effective value of main.cf *name* for this service, expanded."""
        value = dict(self.options).get(name, params.get(name, ""))
        return expand(value, params)


_TYPES: Final = frozenset({"inet", "unix", "unix-dgram", "fifo", "pass"})


def _master_words(line: str) -> list[str]:
    """White-space separated words, a ``{ ... }`` group kept whole."""
    words: list[str] = []
    current: list[str] = []
    depth = 0
    for char in line:
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(0, depth - 1)
        if depth == 0 and char.isspace():
            if current:
                words.append("".join(current))
                current = []
            continue
        current.append(char)
    if current:
        words.append("".join(current))
    return words


def parse_master(text: str, source: str = "postconf -M output") -> tuple[Service, ...]:
    """
    Services of ``postconf -M`` (or ``-Mf``) output, or of a master.cf.

    Raises `PostconfError` for a line that is not a service, and for text
    without any service.
    """
    services = []
    for number, line in _logical_lines(text):
        words = _master_words(line)
        if len(words) < 8 or words[1] not in _TYPES:
            raise PostconfError(
                f"{source} line {number} is not a master.cf service "
                f"(name type private unpriv chroot wakeup maxproc command): "
                f"{line[:60]!r}"
            )
        name, kind, private, unpriv, chroot, wakeup, maxproc, command, *rest = words
        options: list[tuple[str, str]] = []
        args: list[str] = []
        arguments = iter(rest)
        for word in arguments:
            if word == "-o":
                override = unbrace(next(arguments, ""))
            elif word.startswith("-o") and len(word) > 2:
                override = unbrace(word[2:])
            else:
                args.append(word)
                continue
            key, equals, value = override.partition("=")
            if not equals:
                raise PostconfError(
                    f"{source} line {number}: -o {override!r} is not name=value"
                )
            options.append((key.strip(), value.strip()))
        services.append(
            Service(
                name,
                kind,
                private,
                unpriv,
                chroot,
                wakeup,
                maxproc,
                command,
                tuple(options),
                tuple(args),
            )
        )
    if not services:
        raise PostconfError(f"{source} has no master.cf service")
    return tuple(services)


# -- durations ---------------------------------------------------------------

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def seconds(value: str) -> float | None:
    """A Postfix time value (``10``, ``10s``, ``5m``) in seconds; None if not one."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([smhdw]?)\s*", value)
    if match is None:
        return None
    return int(match[1]) * _UNITS[match[2] or "s"]
