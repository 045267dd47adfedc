"""
Private network namespaces for the test bed (``ip netns``).

master(8) never enters stress mode for a listener bound only to loopback
(reference §5.2), and the bed's default instance is.  A `NetworkNamespace`
is a private namespace joined to this one by a veth pair: Postfix and
policyd run inside (`policyd.testing.postfix.PostfixInstance` and
`policyd.testing.daemon.PolicydProcess` take it as *netns*), listening on
every address there, and the clients stay here.

What the namespace needs, found by trying on Debian 12:

- ``ip netns exec`` execs its command, so policyd's pid is the one Popen
  returns; ``postfix -c DIR start`` inside leaves master and every daemon
  there.  postlog and the daemons' unix sockets are files, reachable from
  either namespace.
- The namespace's ``lo`` must be brought up (policyd and Postfix talk over
  its 127.0.0.1).
- Creating one needs root and ip(8) (Debian's iproute2), which `find_ip`
  looks for; it installs nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import signal
from collections.abc import Sequence
from types import TracebackType
from typing import Final

from policyd.testing.system import (
    Unavailable,
    find_program,
    pid_alive,
    pid_exists,
    run_program,
    wait_until,
)

#: Where `NetworkNamespace` takes its /30 subnets from.  Private, and used
#: only on the veth pairs between this namespace and the bed's own ones.
NETNS_SUPERNET: Final = ipaddress.IPv4Network("10.200.0.0/16")

# Namespaces are called pfbed-<creator pid>-<tag>, their veth ends
# pfb<tag>h (here) and pfb<tag>n (inside), so that a later run can tell
# leftovers of a killed run from a namespace another run is still using.
_NETNS_NAME: Final = re.compile(r"pfbed-(\d+)-([0-9a-f]{6})")


def find_ip() -> str:
    """
    The path of ip(8); `Unavailable` if it is missing or we are not root.

    Network namespaces need root.  ip(8) comes with Debian's iproute2, which
    ``tests/run`` installs (as root) when it is missing.
    """
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root (ip netns add)")
    ip = find_program("ip")
    if ip is None:
        raise Unavailable("ip(8) (Debian package iproute2) is not installed")
    return ip


class NetworkNamespace:
    """
    A private network namespace, joined to this one by a veth pair.

    The layout, with a /30 from `NETNS_SUPERNET`::

        this namespace                  the private namespace ("ip netns")
        pfb<tag>h  10.200.X.Y+1/30 <--> pfb<tag>n  10.200.X.Y+2/30 (address)
                                        lo         127.0.0.1 (up)

    Programs run inside through `wrap` (``ip netns exec NAME ...``, which
    execs the program, so its pid is the program's).  A server inside that
    listens on every address is reachable from here at `address`; one on
    the namespace's 127.0.0.1 only from inside.  There is no route beyond
    the veth pair: nothing inside can reach any other network.

    `destroy` (also registered with atexit) kills what still runs inside,
    deletes the namespace and the veth pair; it is safe to call twice and
    after a failed `create`.
    """

    def __init__(self, ip: str = "ip") -> None:
        self.ip = ip
        tag = secrets.token_hex(3)
        self.name = f"pfbed-{os.getpid()}-{tag}"
        self.host_veth = f"pfb{tag}h"
        self.ns_veth = f"pfb{tag}n"
        self.subnet = NETNS_SUPERNET  # replaced by a /30 in `create`
        self.host_address = ""
        self.address = ""
        self.created = False

    def _ip(self, *args: str) -> str:
        return run_program([self.ip, *args], timeout=30.0)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """*argv* run inside the namespace."""
        return [self.ip, "netns", "exec", self.name, *argv]

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        """A random /30 that overlaps no address or route of this namespace."""
        taken: list[ipaddress.IPv4Network] = []
        for entry in json.loads(self._ip("-j", "-4", "addr", "show") or "[]"):
            for info in entry.get("addr_info", []):
                taken.append(
                    ipaddress.IPv4Network(
                        f"{info['local']}/{info['prefixlen']}", strict=False
                    )
                )
        for route in json.loads(self._ip("-j", "-4", "route", "show") or "[]"):
            if route.get("dst", "default") != "default":
                taken.append(ipaddress.IPv4Network(route["dst"], strict=False))
        subnets = NETNS_SUPERNET.num_addresses // 4
        for _ in range(100):
            candidate = ipaddress.IPv4Network(
                (
                    int(NETNS_SUPERNET.network_address)
                    + 4 * secrets.randbelow(subnets),
                    30,
                )
            )
            if not any(candidate.overlaps(net) for net in taken):
                return candidate
        raise Unavailable(f"no free /30 in {NETNS_SUPERNET} for a veth pair")

    @classmethod
    def sweep(cls, ip: str = "ip") -> list[str]:
        """
        Delete namespaces (and veth pairs) left behind by killed runs.

        Only a namespace whose creator process is gone and that has no
        process inside is deleted; return the names deleted.
        """
        deleted = []
        for line in run_program([ip, "netns", "list"]).splitlines():
            match = _NETNS_NAME.fullmatch(line.split(" ", 1)[0])
            if match is None or pid_exists(int(match.group(1))):
                continue
            name = match.group(0)
            if run_program([ip, "netns", "pids", name]).split():
                continue
            with contextlib.suppress(RuntimeError):
                run_program([ip, "netns", "del", name])
                deleted.append(name)
            with contextlib.suppress(RuntimeError):
                run_program([ip, "link", "del", f"pfb{match.group(2)}h"])
        return deleted

    def create(self) -> NetworkNamespace:
        """Create the namespace and the veth pair, bring them up."""
        with contextlib.suppress(RuntimeError):
            self.sweep(self.ip)
        self.subnet = self._pick_subnet()
        host, inside = list(self.subnet.hosts())
        self.host_address, self.address = str(host), str(inside)
        try:
            self._ip("netns", "add", self.name)
        except RuntimeError as e:
            raise Unavailable(f"cannot create a network namespace: {e}") from None
        self.created = True
        atexit.register(self.destroy)
        try:
            # Both ends in one command: the pair never exists half-configured
            # in this namespace.
            self._ip(
                "link", "add", self.host_veth, "type", "veth",
                "peer", "name", self.ns_veth, "netns", self.name,
            )  # fmt: skip
            self._ip("addr", "add", f"{host}/30", "dev", self.host_veth)
            self._ip("link", "set", self.host_veth, "up")
            self._ip(
                "-n", self.name, "addr", "add", f"{inside}/30", "dev", self.ns_veth
            )
            self._ip("-n", self.name, "link", "set", self.ns_veth, "up")
            self._ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def pids(self) -> list[int]:
        """The processes running inside the namespace."""
        if not self.created:
            return []
        try:
            return [int(pid) for pid in self._ip("netns", "pids", self.name).split()]
        except RuntimeError:
            return []

    def destroy(self) -> None:
        """Kill what still runs inside, delete the namespace and the veth pair."""
        if not self.created:
            return
        # Everything inside was started by the bed (Postfix, policyd); a
        # process left there would keep the namespace, and the veth pair in
        # it, alive after "ip netns del".
        leftovers = self.pids()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_until(
                lambda: not any(pid_alive(pid) for pid in leftovers),
                5.0,
                lambda: f"processes {leftovers} in {self.name} to die",
            )
        with contextlib.suppress(RuntimeError):
            self._ip("netns", "del", self.name)
        # Deleting the namespace destroys the pair once nothing holds it;
        # delete this end explicitly in case something still does.
        with contextlib.suppress(RuntimeError):
            self._ip("link", "del", self.host_veth)
        self.created = False
        atexit.unregister(self.destroy)

    def __enter__(self) -> NetworkNamespace:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()
