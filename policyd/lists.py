"""
Allow-lists kept in files: one entry a line, ``#`` comments, blank lines.

``POLICYD_ALLOW_NETWORKS_FILE`` and ``POLICYD_ALLOW_DOMAINS_FILE`` name them;
they are read at start-up and again on SIGHUP (`policyd.server.PolicyServer.
reload`), so that an admin can add a partner without a restart.  A bad line
is an error naming the file and the line: at start-up policyd does not
start, on a reload it keeps the lists it had.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TypeVar

__all__ = ["ListFileError", "read_domains", "read_networks"]

T = TypeVar("T")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ListFileError(Exception):
    """A list file cannot be read, or one of its lines is not an entry."""


def _read(path: str, convert: Callable[[str], tuple[T, ...]]) -> tuple[T, ...]:
    try:
        with open(path, encoding="utf-8") as lines:
            text = lines.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ListFileError(f"cannot read {path}: {e}") from None
    entries: list[T] = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            entries.extend(convert(entry))
        except ValueError as e:
            raise ListFileError(f"{path}, line {number}: {e}") from None
    return tuple(entries)


def read_networks(path: str) -> tuple[Network, ...]:
    """The networks in *path*: CIDR or addresses, one a line."""
    from policyd.config import networks

    return _read(path, networks)


def read_domains(path: str) -> tuple[str, ...]:
    """The domains in *path*, one a line (lower-cased)."""
    from policyd.config import hostnames

    return _read(path, hostnames)
