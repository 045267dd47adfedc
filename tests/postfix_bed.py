"""
A real-Postfix test bed: a private Postfix instance plus policyd as a process.

Importable from the end-to-end tests and from benchmark or scenario runners;
nothing here depends on pytest.  The pieces:

- `find_postfix` finds Debian's Postfix programs.  Nothing here installs
  anything: tests/run installs what the tests need (as root), and a runner
  that wants to install more does so itself, explicitly.
- `PostfixConfig` / `PostfixInstance` render and run a throw-away instance
  with its own configuration, queue and data directories in a temporary
  directory, started and stopped with ``postfix -c DIR``.  It never reads or
  writes the system instance in ``/etc/postfix`` and ``/var/spool/postfix``.
- `PolicydProcess` runs ``python -m policyd serve`` with JSON logging and
  collects its log events from stdout in a background thread.
- `send_message` (smtplib, optionally with XCLIENT) and `run_smtp_source`
  (or `start_smtp_source`, in the background) drive mail through the
  instance; `MailLog` reads the instance's own log.
- `NetworkNamespace` (with `find_ip`) is a private network
  namespace joined to this one by a veth pair.  Given one, `PostfixInstance`
  and `PolicydProcess` run inside it; clients stay here.  This is the mode
  in which master(8) can enter stress mode: it never does for a listener
  bound only to loopback (reference §5.2), and the default instance is.

What ``postfix -c DIR`` needs, found by trying on Debian 12 / Postfix 3.7:

- Nothing in the default ``main.cf``.  ``alternate_config_directories`` and
  ``multi_instance_directories`` are only checked by the set-gid programs
  (postdrop, postqueue) when run by a non-root user; ``postfix``,
  ``master`` and the daemons trust ``-c``/``MAIL_CONFIG`` from root.  The
  instance must be started by root anyway (master binds and then switches to
  ``mail_owner``).  ``MAIL_CONFIG`` reaches the daemons through the default
  ``import_environment``.
- ``daemon_directory``, ``shlib_directory``, ``meta_directory`` and
  ``command_directory`` keep their compiled-in defaults (the shared package
  files); ``post-install create-missing`` (run by ``postfix start``) only
  creates the missing queue directories of *our* ``queue_directory``.
- ``data_directory`` must be owned by ``mail_owner`` (master creates
  ``master.lock`` there after dropping privileges, "Permission denied"
  otherwise); the instance root must be searchable by ``mail_owner``.
- ``maillog_file`` must start with one of ``maillog_file_prefixes`` and needs
  a ``postlog unix-dgram ... postlogd`` service in master.cf
  (``postfix check`` refuses to start without it).
- Speed: Postfix re-reads a configuration file until its mtime is about two
  seconds old ("cool down"), so freshly written files are backdated; and
  ``postfix reload`` leaves a ``postsuper &`` behind that holds the
  caller's stdout/stderr, so commands write to files, not pipes.  Start,
  reload and stop then take well under a second each.

The listeners are named (``smtp``, ``stress``, ...) so that a scenario runner
can add more, and everything that differs between scenarios (listen
address, ports, process limits, which restriction list the policy check
sits in, ``smtpd_delay_reject``, extra main.cf/master.cf lines) is a field
of `PostfixConfig`.

What the network-namespace mode needs, found the same way:

- ``inet_interfaces = all`` in the namespace (the listener is the wildcard
  address, not loopback), ``maxproc`` > 1: master then passes
  ``-o stress=`` to smtpd and, when a connection needs the last process,
  ``-o stress=yes`` (visible in ``/proc/PID/cmdline``).  It also logs
  ``warning: service "PORT" (PORT) has reached its process limit "N"``
  (the service is named by its port, there being no host part).
- master keeps stressing new smtpd processes for 1000 s after a service
  last hit its limit, also across ``postfix reload``; only a restart
  (`PostfixInstance.restart`) forgets it.
- ``ip netns exec`` execs its command, so policyd's pid is the one Popen
  returns; ``postfix -c DIR start`` inside leaves master and every daemon
  there.  postlog and the daemons' unix sockets are files, reachable from
  either namespace.  The namespace's ``lo`` must be brought up (policyd
  and Postfix talk over its 127.0.0.1).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

import attrs
from prometheus_client.parser import text_string_to_metric_families

# Where Debian (and most packagers) put the Postfix programs; searched after
# $PATH because /usr/sbin is often missing from a non-login root's PATH.
SBIN_DIRS: Final = ("/usr/sbin", "/usr/local/sbin", "/sbin")

#: The domain the instance accepts mail for; every recipient must be in it.
RELAY_DOMAIN: Final = "example.test"

#: How long to wait for things that normally take milliseconds.
DEFAULT_TIMEOUT: Final = 15.0

_POLL_INTERVAL: Final = 0.02


# --------------------------------------------------------------------------
# Prerequisites
# --------------------------------------------------------------------------


class Unavailable(Exception):
    """A prerequisite of the test bed is missing; the message says which."""


@attrs.frozen
class PostfixTools:
    """The Postfix programs the bed runs, as absolute paths."""

    postfix: str
    postconf: str
    postlog: str
    smtp_source: str
    mail_owner: str

    def mail_version(self) -> str:
        """The installed Postfix version, e.g. ``3.7.11``."""
        return _run([self.postconf, "-dh", "mail_version"]).strip()


def find_program(name: str) -> str | None:
    """The absolute path of program *name* on ``$PATH`` or in `SBIN_DIRS`."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    return shutil.which(name, path=path)


def _run(argv: Sequence[str], timeout: float = 60.0) -> str:
    """
    Run *argv*, return its stdout, raise with its output if it fails.

    Output goes to files, not pipes: ``postfix reload`` leaves a
    ``postsuper &`` running that would hold a pipe open, and waiting for the
    pipe's EOF would cost seconds.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        done = subprocess.run(
            argv, stdout=out, stderr=err, timeout=timeout, check=False
        )
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}: "
            f"{stderr.strip() or stdout.strip()}"
        )
    return stdout


def find_postfix() -> PostfixTools:
    """
    Find the Postfix programs the bed needs; `Unavailable` if one is missing.

    A private instance can only be started by root, so a non-root caller gets
    `Unavailable` even when Postfix is installed.  Nothing is installed here:
    tests/run installs Debian's postfix (as root) when it is missing.
    """
    if os.geteuid() != 0:
        raise Unavailable(
            "the Postfix test bed needs root: master(8) must start as root to "
            "bind its listeners and switch to mail_owner"
        )
    wanted = ("postfix", "postconf", "postlog", "smtp-source")
    found = {name: path for name in wanted if (path := find_program(name))}
    missing = [name for name in wanted if name not in found]
    if missing:
        raise Unavailable(f"Postfix programs not found: {', '.join(missing)}")
    owner = _run([found["postconf"], "-dh", "mail_owner"]).strip()
    try:
        pwd.getpwnam(owner)
    except KeyError:
        raise Unavailable(f"mail_owner {owner!r} does not exist") from None
    return PostfixTools(
        postfix=found["postfix"],
        postconf=found["postconf"],
        postlog=found["postlog"],
        smtp_source=found["smtp-source"],
        mail_owner=owner,
    )


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """
    A TCP port on *host* that nothing listens on right now.

    Chosen below the kernel's ephemeral range so that the port cannot be
    taken as the local port of some outgoing connection while the listener
    that should own it is down (e.g. between two policyd runs).
    """
    low, _ = _ephemeral_range()
    low = max(low, 2048)
    for _ in range(200):
        port = 1024 + secrets.randbelow(low - 1024)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found on {host} below {low}")


def wait_for_smtp_greeting(
    host: str, port: int, timeout: float = DEFAULT_TIMEOUT
) -> str:
    """Connect until the server at *host*:*port* sends its 220 greeting."""
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0) as conn:
                greeting = conn.makefile("rb").readline().decode("ascii", "replace")
                with contextlib.suppress(OSError):
                    conn.sendall(b"QUIT\r\n")
                if greeting.startswith("220"):
                    return greeting.strip()
                last_error = f"greeting {greeting!r}"
        except OSError as e:
            last_error = str(e)
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"no 220 greeting from {host}:{port} within {timeout}s: {last_error}"
            )
        time.sleep(_POLL_INTERVAL * 5)


def _poll(
    condition: Callable[[], bool], timeout: float, what: Callable[[], str]
) -> None:
    """Wait until *condition* holds, checking every few milliseconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what()}")
        time.sleep(_POLL_INTERVAL)


def wait_until(
    condition: Callable[[], bool],
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "a condition",
) -> None:
    """Wait until *condition* holds (checked every few ms); TimeoutError if not."""
    _poll(condition, timeout, lambda: what)


# --------------------------------------------------------------------------
# Network namespaces
# --------------------------------------------------------------------------

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
    tests/run installs (as root) when it is missing.
    """
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root (ip netns add)")
    ip = find_program("ip")
    if ip is None:
        raise Unavailable("ip(8) (Debian package iproute2) is not installed")
    return ip


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        return _run([self.ip, *args], timeout=30.0)

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
        for line in _run([ip, "netns", "list"]).splitlines():
            match = _NETNS_NAME.fullmatch(line.split(" ", 1)[0])
            if match is None or _pid_exists(int(match.group(1))):
                continue
            name = match.group(0)
            if _run([ip, "netns", "pids", name]).split():
                continue
            with contextlib.suppress(RuntimeError):
                _run([ip, "netns", "del", name])
                deleted.append(name)
            with contextlib.suppress(RuntimeError):
                _run([ip, "link", "del", f"pfb{match.group(2)}h"])
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
            _poll(
                lambda: not any(_alive(pid) for pid in leftovers),
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


# --------------------------------------------------------------------------
# Postfix configuration
# --------------------------------------------------------------------------


def _pairs(
    value: Mapping[str, str] | Sequence[tuple[str, str]],
) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((str(k), str(v)) for k, v in items)


@attrs.frozen
class SmtpListener:
    """One smtpd(8) service in master.cf."""

    #: Name the tests use to pick the listener ("smtp", "stress", ...).
    name: str
    port: int
    #: master.cf process limit; small, so that tests can saturate it.
    maxproc: int = 10
    #: Extra ``-o name=value`` overrides, e.g. ``{"stress": "yes"}``.
    options: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)


def _listeners(value: Iterable[SmtpListener]) -> tuple[SmtpListener, ...]:
    return tuple(value)


def default_listeners(maxproc: int = 10) -> tuple[SmtpListener, ...]:
    """A normal listener and one forced into stress mode, on free ports."""
    return (
        SmtpListener("smtp", free_port(), maxproc),
        SmtpListener("stress", free_port(), maxproc, {"stress": "yes"}),
    )


@attrs.frozen
class PostfixConfig:
    """
    Everything that differs between test-bed instances.

    The defaults give a loopback-only instance that relays ``example.test``
    to the discard transport and asks the policy server at every RCPT.
    """

    #: Port of the policy server on *policy_host*.
    policy_port: int
    listeners: tuple[SmtpListener, ...] = attrs.field(
        factory=default_listeners, converter=_listeners
    )
    #: Address the listeners bind to; ``"all"`` binds every interface (for
    #: a private network namespace, where master may enter stress mode).
    listen_address: str = "127.0.0.1"
    inet_protocols: str = "ipv4"
    policy_host: str = "127.0.0.1"
    #: Per-client settings of check_policy_service (reference §4.1).
    policy_settings: tuple[tuple[str, str], ...] = attrs.field(
        default=(("timeout", "10s"), ("default_action", "DUNNO")), converter=_pairs
    )
    #: The restriction list the policy check is appended to; None: no policy
    #: check at all (a Postfix without policyd, for comparison).
    policy_restriction: str | None = "smtpd_recipient_restrictions"
    delay_reject: bool = True
    #: Kept narrow so loopback clients never match permit_mynetworks (the
    #: restriction lists do not use it either) nor the anvil exemption.
    mynetworks: str = ""
    xclient_hosts: str = "127.0.0.0/8"
    hostname: str = "mx.policyd.test"
    #: Extra main.cf settings; they win over the generated ones.
    main_extra: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    #: Extra master.cf lines, appended verbatim.
    master_extra: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @property
    def policy_endpoint(self) -> str:
        """The ``inet:host:port`` string smtpd connects to."""
        return f"inet:{self.policy_host}:{self.policy_port}"

    @property
    def policy_check(self) -> str:
        """The check_policy_service restriction with its settings."""
        settings = "".join(
            f", {{ {k} = {v} }}" if (" " in v or "," in v) else f", {k}={v}"
            for k, v in self.policy_settings
        )
        return f"check_policy_service {{ {self.policy_endpoint}{settings} }}"

    def listener(self, name: str) -> SmtpListener:
        """The listener called *name*."""
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)

    @property
    def connect_host(self) -> str:
        """Where a client on this host reaches the listeners."""
        return "127.0.0.1" if self.listen_address == "all" else self.listen_address

    def main_cf(self, root: Path, mail_owner: str) -> dict[str, str]:
        """The main.cf settings of an instance living in *root*."""
        restrictions: dict[str, list[str]] = {
            "smtpd_client_restrictions": [],
            "smtpd_helo_restrictions": [],
            "smtpd_sender_restrictions": [],
            "smtpd_relay_restrictions": ["reject_unauth_destination"],
            "smtpd_recipient_restrictions": ["reject_unauth_destination"],
            "smtpd_data_restrictions": [],
            "smtpd_end_of_data_restrictions": [],
        }
        if self.policy_restriction is not None:
            restrictions.setdefault(self.policy_restriction, []).append(
                self.policy_check
            )
        settings = {
            "compatibility_level": "3.6",
            "config_directory": str(root / "etc"),
            "queue_directory": str(root / "spool"),
            "data_directory": str(root / "data"),
            "mail_owner": mail_owner,
            "maillog_file": str(root / "maillog"),
            "maillog_file_prefixes": str(root),
            "myhostname": self.hostname,
            "mydomain": "policyd.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "mynetworks": self.mynetworks,
            "inet_interfaces": self.listen_address,
            "inet_protocols": self.inet_protocols,
            "relay_domains": RELAY_DOMAIN,
            "transport_maps": "",
            "default_transport": "discard:",
            "relay_transport": "discard:",
            "local_transport": "discard:",
            "virtual_transport": "discard:",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP policyd test bed",
            "smtpd_authorized_xclient_hosts": self.xclient_hosts,
            "smtpd_delay_reject": "yes" if self.delay_reject else "no",
            **{name: ", ".join(items) for name, items in restrictions.items()},
        }
        settings.update(self.main_extra)
        return settings

    def master_cf(self) -> str:
        """The whole master.cf: listeners, the needed daemons, no chroot."""
        lines = [
            "# service type private unpriv chroot wakeup maxproc command + args",
        ]
        for listener in self.listeners:
            service = (
                str(listener.port)
                if self.listen_address == "all"
                else f"{self.listen_address}:{listener.port}"
            )
            lines.append(f"{service} inet n - n - {listener.maxproc} smtpd")
            lines.extend(
                f"  -o {{ {k} = {v} }}" if " " in v else f"  -o {k}={v}"
                for k, v in listener.options
            )
        lines += [
            "pickup    unix  n - n 60   1 pickup",
            "cleanup   unix  n - n -    0 cleanup",
            "qmgr      unix  n - n 300  1 qmgr",
            "rewrite   unix  - - n -    - trivial-rewrite",
            "bounce    unix  - - n -    0 bounce",
            "defer     unix  - - n -    0 bounce",
            "trace     unix  - - n -    0 bounce",
            "verify    unix  - - n -    1 verify",
            "flush     unix  n - n 1000? 0 flush",
            "proxymap  unix  - - n -    - proxymap",
            "showq     unix  n - n -    - showq",
            "error     unix  - - n -    - error",
            "retry     unix  - - n -    - error",
            "discard   unix  - - n -    - discard",
            "anvil     unix  - - n -    1 anvil",
            "scache    unix  - - n -    1 scache",
            "postlog   unix-dgram n - n - 1 postlogd",
            *self.master_extra,
        ]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# The mail log
# --------------------------------------------------------------------------


class MailLog:
    """The instance's ``maillog_file``, read from byte offsets (marks)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        """The current end of the log; pass it as *since* to see newer lines."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def text(self, since: int = 0) -> str:
        """The log from offset *since* on."""
        try:
            with self.path.open("rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def lines(
        self, pattern: str | re.Pattern[str] | None = None, since: int = 0
    ) -> list[str]:
        """Lines after *since*, only those matching *pattern* if given."""
        lines = self.text(since).splitlines()
        if pattern is None:
            return lines
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return [line for line in lines if regex.search(line)]

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        since: int = 0,
        count: int = 1,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> list[str]:
        """Wait until *count* lines after *since* match *pattern*; return them."""
        found: list[str] = []

        def enough() -> bool:
            found[:] = self.lines(pattern, since)
            return len(found) >= count

        _poll(
            enough,
            timeout,
            lambda: (
                f"{count} maillog lines matching {pattern!r}, got "
                f"{len(found)}; log tail:\n{self.tail(since)}"
            ),
        )
        return found

    def offset_after(self, token: str) -> int | None:
        """The offset just past the first line containing *token*, if any."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        found = data.find(token.encode("utf-8"))
        if found < 0:
            return None
        end = data.find(b"\n", found)
        return len(data) if end < 0 else end + 1

    def tail(self, since: int = 0, lines: int = 30) -> str:
        """The last few lines after *since*, for error messages."""
        return "\n".join(self.lines(since=since)[-lines:])


# --------------------------------------------------------------------------
# The private Postfix instance
# --------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of *pid*, or None if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may contain spaces; the rest is split.
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    state, ppid = raw[raw.rindex(")") + 2 :].split()[:2]
    return comm, state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


class PostfixInstance:
    """
    A private Postfix instance in a temporary directory.

    Use as a context manager, or call `start` and `stop` (which is safe to
    call more than once, also after a failed start).  The directory is
    removed on `close` unless *keep* is true.

    With *netns*, master(8) and so every daemon runs inside that network
    namespace, and clients here reach the listeners at the namespace's veth
    address.  With ``listen_address="all"`` the listeners are then not
    loopback-only, so master puts smtpd into stress mode when a listener
    reaches its process limit (reference §5.2), which it never does on the
    default loopback-only instance.
    """

    def __init__(
        self,
        config: PostfixConfig,
        tools: PostfixTools,
        *,
        root: Path | None = None,
        keep: bool = False,
        netns: NetworkNamespace | None = None,
    ) -> None:
        self.config = config
        self.tools = tools
        self.keep = keep
        self.netns = netns
        self.root = Path(root or tempfile.mkdtemp(prefix="policyd-postfix-"))
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "data"
        self.maillog = MailLog(self.root / "maillog")
        self._master_pid: int | None = None

    # -- files ---------------------------------------------------------------

    def postconf(self, *args: str) -> str:
        """Run ``postconf -c DIR ARGS`` (e.g. ``-h mail_version``); return stdout."""
        return _run([self.tools.postconf, "-c", str(self.config_dir), *args])

    def write_config(self) -> None:
        """Create the directories and (re)write main.cf and master.cf."""
        owner = pwd.getpwnam(self.tools.mail_owner)
        for parent in self.root.resolve().parents:
            if not parent.stat().st_mode & 0o001:
                raise RuntimeError(
                    f"{parent} is not searchable by {self.tools.mail_owner}, so "
                    f"Postfix cannot reach {self.root}; set TMPDIR (e.g. to /tmp)"
                )
        for directory in (self.root, self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(mode=0o755, exist_ok=True)
            directory.chmod(0o755)  # mkdtemp makes 0700; mail_owner must enter
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        settings = self.config.main_cf(self.root, self.tools.mail_owner)
        main_cf = "".join(f"{name} = {value}\n" for name, value in settings.items())
        (self.config_dir / "main.cf").write_text(
            "# Generated by tests/postfix_bed.py for a throw-away instance.\n" + main_cf
        )
        (self.config_dir / "master.cf").write_text(self.config.master_cf())
        # Postfix re-reads a configuration file until its mtime is two seconds
        # old ("pausing to let main.cf cool down", dict_load_file_xt()), which
        # would cost every postfix/postconf/daemon start up to 2 s.  The files
        # are complete, so backdate them.
        cool = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (cool, cool))

    # -- life cycle --------------------------------------------------------------

    def postfix(self, command: str, timeout: float = 30.0) -> str:
        """Run ``postfix -c DIR <command>`` (in the namespace); raise if it fails."""
        argv = [self.tools.postfix, "-c", str(self.config_dir), command]
        if self.netns is not None:
            argv = self.netns.wrap(argv)
        return _run(argv, timeout=timeout)

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start the instance and wait until every listener greets with 220."""
        self.write_config()
        try:
            self.postfix("start", timeout=timeout)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nmaillog:\n{self.maillog.tail()}") from None
        self._master_pid = self.master_pid()
        # Also stop it if the caller (a script, a crashed runner) never does.
        atexit.register(self.stop)
        self.wait_until_ready(timeout)

    def ensure_running(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start the instance again if it is not running (a test stopped it)."""
        if self.master_pid() is None:
            self.start(timeout)

    def wait_until_ready(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """
        Wait until every listener answers with a 220 greeting.

        Each probe is one SMTP session (greeting, QUIT); with a policy check
        at CONNECT stage (``smtpd_delay_reject=no``) it is also one request.
        """
        for listener in self.config.listeners:
            wait_for_smtp_greeting(*self.address(listener.name), timeout)

    def _is_master(self, pid: int | None) -> bool:
        """Whether *pid* is this instance's master (not a recycled pid)."""
        if pid is None or not _alive(pid):
            return False
        stat = _proc_stat(pid)
        # master runs in its queue directory; that tells instances apart.
        return (
            stat is not None
            and stat[0] == "master"
            and _cwd(pid) == str(self.queue_dir.resolve())
        )

    def master_pid(self) -> int | None:
        """The pid of this instance's master(8), if it is running."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        for candidate in (pid, self._master_pid):
            if self._is_master(candidate):
                return candidate
        return None

    def children(self, command: str | None = None) -> list[int]:
        """Live child processes of master, only those named *command* if given."""
        master = self.master_pid()
        if master is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            stat = _proc_stat(int(entry.name))
            if stat is None or stat[2] != master or stat[1] in ("Z", "X"):
                continue
            if command is None or stat[0] == command:
                pids.append(int(entry.name))
        return sorted(pids)

    def smtpd_pids(self) -> list[int]:
        """The smtpd(8) processes of this instance that are alive now."""
        return self.children("smtpd")

    def reconfigure(
        self, config: PostfixConfig, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """
        Switch to *config* with ``postfix reload``.

        Waits until every smtpd process that was started under the old
        configuration has exited, so that no policy connection survives from
        before: each test then starts with fresh smtpd processes.  master
        keeps its listening sockets across a reload, so there is no need (and,
        with a CONNECT-stage policy check, no wish) to probe them again.
        """
        if config.listeners != self.config.listeners:
            # A changed listener set is simpler (and as quick) as a restart.
            self.stop()
            self.config = config
            self.start(timeout)
            return
        old = set(self.smtpd_pids())
        self.config = config
        self.write_config()
        self.postfix("reload", timeout=timeout)
        _poll(
            lambda: not old & set(self.smtpd_pids()),
            timeout,
            lambda: (
                f"old smtpd processes {sorted(old & set(self.smtpd_pids()))} to exit"
            ),
        )

    def restart(
        self, config: PostfixConfig | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """
        Stop and start again (with *config*, if given): a fresh master(8).

        Unlike a reload, this forgets master's stress state: once a service
        has hit its process limit, master starts every new smtpd process of
        it with ``stress=yes`` for 1000 s, across ``postfix reload``.
        """
        self.stop()
        if config is not None:
            self.config = config
        self.start(timeout)

    def use_policy_port(self, port: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Point the policy check at *port* (reload only if it changed)."""
        if port != self.config.policy_port:
            self.reconfigure(attrs.evolve(self.config, policy_port=port), timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the instance: ``postfix stop``, then kill a master left over."""
        pid = self.master_pid()
        if pid is None:
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.postfix("stop", timeout=timeout)
        with contextlib.suppress(TimeoutError):
            _poll(
                lambda: not self._is_master(pid),
                timeout,
                lambda: f"master {pid} to exit",
            )
        if self._is_master(pid):
            # master is a process group leader (it calls setsid); this is what
            # postfix-script itself does after five seconds.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                _poll(lambda: not _alive(pid), 5.0, lambda: f"master {pid} to die")
        self._master_pid = None
        atexit.unregister(self.stop)

    def close(self) -> None:
        """Stop and remove the instance directory (unless *keep*)."""
        try:
            self.stop()
        finally:
            if not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_marker(self, text: str, timeout: float = DEFAULT_TIMEOUT) -> int:
        """
        Write *text* to the maillog through postlogd; return the offset after it.

        postlogd writes records in the order it receives them, so lines after
        the marker were logged after it: a precise `MailLog` mark for "what
        happened since", unlike a file size taken while records are in flight.
        """
        token = f"{text} [{secrets.token_hex(4)}]"
        _run(
            [
                self.tools.postlog,
                *("-c", str(self.config_dir), "-t", "policyd-bed", "-p", "info"),
                token,
            ]
        )
        offset: list[int] = []

        def logged() -> bool:
            found = self.maillog.offset_after(token)
            offset[:] = [] if found is None else [found]
            return bool(offset)

        _poll(logged, timeout, lambda: f"marker {token!r} in {self.maillog.path}")
        return offset[0]

    # -- clients -----------------------------------------------------------

    def address(self, listener: str = "smtp") -> tuple[str, int]:
        """(host, port) where a client in this namespace reaches *listener*."""
        host = self.config.connect_host if self.netns is None else self.netns.address
        return host, self.config.listener(listener).port

    def send(self, listener: str = "smtp", **kwargs: Any) -> SmtpTranscript:
        """`send_message` to *listener*."""
        host, port = self.address(listener)
        return send_message(host, port, **kwargs)

    def smtp_source(self, listener: str = "smtp", **kwargs: Any) -> SmtpSourceResult:
        """`run_smtp_source` against *listener*."""
        host, port = self.address(listener)
        return run_smtp_source(self.tools.smtp_source, host, port, **kwargs)

    def start_smtp_source(
        self, listener: str = "smtp", **kwargs: Any
    ) -> SmtpSourceProcess:
        """`start_smtp_source` against *listener* (runs in the background)."""
        host, port = self.address(listener)
        return start_smtp_source(self.tools.smtp_source, host, port, **kwargs)


# --------------------------------------------------------------------------
# policyd as a subprocess
# --------------------------------------------------------------------------

Event = dict[str, Any]


class PolicydProcess:
    """
    ``python -m policyd serve`` with JSON logs at debug level.

    Its stdout is read in a background thread; every JSON line becomes an
    event in `events`.  Lines that are not JSON go to `stray_lines` (there
    should be none), stderr to `stderr_lines`.

    With *netns*, policyd runs inside that network namespace: the policy
    listener on the namespace's own 127.0.0.1 (where a Postfix instance in
    the same namespace asks it), the metrics listener, unless given, on the
    namespace's veth address so that `http_get` reaches it from here.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        listen: str = "tcp:0:interface=127.0.0.1",
        metrics_listen: str | None = None,
        python: str = sys.executable,
        source_root: Path | None = None,
        netns: NetworkNamespace | None = None,
    ) -> None:
        self.extra_env = dict(env or {})
        self.listen = listen
        self.netns = netns
        if metrics_listen is None:
            host = "127.0.0.1" if netns is None else netns.address
            metrics_listen = f"tcp:0:interface={host}"
        self.metrics_listen = metrics_listen
        interface = re.search(r"(?:^|:)interface=([^:]+)", metrics_listen)
        #: Where `http_get` connects: the metrics listener's interface.
        self.metrics_host = interface.group(1) if interface else "127.0.0.1"
        self.python = python
        self.source_root = source_root or Path(__file__).resolve().parents[1]
        self.events: list[Event] = []
        self.stray_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.port = 0
        self.metrics_port = 0
        self.returncode: int | None = None
        self._changed = threading.Condition()
        self._process: subprocess.Popen[str] | None = None
        self._readers: list[threading.Thread] = []

    # -- life cycle ----------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The child's environment: ours minus POLICYD_*, plus the bed's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
        # Run the work tree's policyd even when another copy is installed.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.source_root), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env.update(
            POLICYD_LISTEN=self.listen,
            POLICYD_METRICS_LISTEN=self.metrics_listen,
            POLICYD_LOG_FORMAT="json",
            POLICYD_LOG_LEVEL="debug",
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> PolicydProcess:
        """
        Start policyd and wait until both listeners are up; learn the ports.

        The events of an earlier run (see `restart`) are discarded.
        """
        if self.running:
            raise RuntimeError("policyd is already running")
        self.returncode = None
        with self._changed:
            self.events.clear()
            self.stray_lines.clear()
            self.stderr_lines.clear()
        argv = [self.python, "-m", "policyd", "serve"]
        process = subprocess.Popen(
            argv if self.netns is None else self.netns.wrap(argv),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self._process = process
        atexit.register(self.kill)
        assert process.stdout is not None
        assert process.stderr is not None
        self._readers = [
            threading.Thread(
                target=self._read_stdout, args=(process.stdout,), daemon=True
            ),
            threading.Thread(
                target=self._read_stderr, args=(process.stderr,), daemon=True
            ),
        ]
        for reader in self._readers:
            reader.start()
        try:
            listening = self.wait_for(
                lambda e: e.get("event") == "listening",
                timeout=timeout,
                what="the 'listening' event",
            )
            self.port = int(listening["port"])
            if self.metrics_listen != "none":
                metrics = self.wait_for(
                    lambda e: e.get("event") == "metrics_listening",
                    timeout=timeout,
                    what="the 'metrics_listening' event",
                )
                self.metrics_port = int(metrics["port"])
        except BaseException:
            self.kill()
            raise
        return self

    def restart(self, timeout: float = DEFAULT_TIMEOUT) -> PolicydProcess:
        """Start again on the same policy port (Postfix's config is unchanged)."""
        if self.running:
            raise RuntimeError("policyd is still running")
        if self.port:
            self.listen = re.sub(r"^tcp:\d+", f"tcp:{self.port}", self.listen)
        return self.start(timeout)

    @property
    def pid(self) -> int:
        """The process id (of the current or last run)."""
        if self._process is None:
            raise RuntimeError("policyd was never started")
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def _reap(self, timeout: float) -> int:
        assert self._process is not None
        self.returncode = self._process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout=5.0)
        return self.returncode

    def terminate(self, timeout: float = 10.0) -> int:
        """Send SIGTERM and wait for the exit; return the exit code."""
        if self._process is None:
            raise RuntimeError("policyd was never started")
        if self.running:
            self._process.send_signal(signal.SIGTERM)
        return self._reap(timeout)

    def kill(self) -> None:
        """SIGKILL the process if it still runs (cleanup path)."""
        if self._process is None:
            return
        if self.running:
            self._process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._reap(10.0)
        atexit.unregister(self.kill)

    def __enter__(self) -> PolicydProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    # -- events ------------------------------------------------------------------

    def _read_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            text = line.rstrip("\n")
            try:
                event = json.loads(text)
            except ValueError:
                event = None
            with self._changed:
                if isinstance(event, dict):
                    self.events.append(event)
                elif text:
                    self.stray_lines.append(text)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.stderr_lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _finished(self) -> bool:
        """Whether the process exited and its output has been read to the end."""
        return (
            self._process is not None
            and self._process.poll() is not None
            and not any(reader.is_alive() for reader in self._readers)
        )

    def snapshot(self, predicate: Callable[[Event], bool] | None = None) -> list[Event]:
        """The events so far, only those matching *predicate* if given."""
        with self._changed:
            return [e for e in self.events if predicate is None or predicate(e)]

    def wait_for_all(
        self,
        predicate: Callable[[Event], bool],
        count: int,
        timeout: float = DEFAULT_TIMEOUT,
        what: str = "events",
    ) -> list[Event]:
        """Wait until *count* events match *predicate*; return all that match."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [e for e in self.events if predicate(e)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                exited = self._finished()
                if remaining <= 0 or exited:
                    reason = (
                        "policyd exited" if exited else f"timed out after {timeout}s"
                    )
                    raise TimeoutError(
                        f"{reason} waiting for {count} x {what}, got {len(found)}; "
                        f"{self.describe_output()}"
                    )
                self._changed.wait(min(remaining, 0.5))

    def wait_for(
        self,
        predicate: Callable[[Event], bool],
        timeout: float = DEFAULT_TIMEOUT,
        what: str = "an event",
    ) -> Event:
        """Wait for the first event matching *predicate* and return it."""
        return self.wait_for_all(predicate, 1, timeout, what)[0]

    def requests(self, **attributes: str) -> list[Event]:
        """The ``request`` events whose attributes include *attributes*."""
        return self.snapshot(lambda e: _is_request(e, attributes))

    def wait_for_requests(
        self, count: int, timeout: float = DEFAULT_TIMEOUT, **attributes: str
    ) -> list[Event]:
        """Wait until *count* request events match *attributes*; return them."""
        return self.wait_for_all(
            lambda e: _is_request(e, attributes),
            count,
            timeout,
            what=f"request events with {attributes}",
        )

    def describe_output(self, lines: int = 15) -> str:
        """The last events, stray lines and stderr, for error messages."""
        with self._changed:
            events = [json.dumps(e)[:400] for e in self.events[-lines:]]
            stray, stderr = self.stray_lines[-lines:], self.stderr_lines[-lines:]
        return (
            "last policyd events:\n  "
            + "\n  ".join(events)
            + ("\nstdout non-JSON:\n  " + "\n  ".join(stray) if stray else "")
            + ("\nstderr:\n  " + "\n  ".join(stderr) if stderr else "")
        )

    # -- HTTP --------------------------------------------------------------------

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET *path* from the metrics listener; (status, body) even for errors."""
        url = f"http://{self.metrics_host}:{self.metrics_port}{path}"
        try:
            # No proxy from the environment: the listener is on this host (or
            # in the bed's namespace), never behind an HTTP proxy.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(url, timeout=timeout) as response:
                return int(response.status), response.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def metrics_text(self) -> str:
        """The body of ``/metrics``."""
        status, body = self.http_get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}: {body[:200]}")
        return body

    def healthz(self) -> tuple[int, str]:
        """Status and body of ``/healthz``."""
        return self.http_get("/healthz")

    def metric(
        self, name: str, labels: Mapping[str, str] | None = None
    ) -> float | None:
        """
        The value of the samples called *name* whose labels include *labels*.

        *name* is the exposed sample name (``policyd_connections_total``);
        matching series are summed; None if there is no such sample.
        """
        wanted = dict(labels or {})
        values = [
            sample.value
            for family in text_string_to_metric_families(self.metrics_text())
            for sample in family.samples
            if sample.name == name and wanted.items() <= sample.labels.items()
        ]
        return sum(values) if values else None


def _is_request(event: Event, attributes: Mapping[str, str]) -> bool:
    if event.get("event") != "request":
        return False
    got = event.get("attributes")
    return isinstance(got, dict) and all(got.get(k) == v for k, v in attributes.items())


# --------------------------------------------------------------------------
# SMTP clients
# --------------------------------------------------------------------------


@attrs.frozen
class SmtpStep:
    """One SMTP command and the server's reply."""

    command: str
    code: int
    text: str


@attrs.frozen
class SmtpTranscript:
    """Every command `send_message` sent and what Postfix answered."""

    steps: tuple[SmtpStep, ...]
    #: The client's TCP port: policyd sees it as ``client_port`` (also after
    #: an XCLIENT without PORT), which tells this session's requests apart.
    local_port: int = 0

    def replies(self, command: str) -> list[SmtpStep]:
        """The steps whose command starts with *command* (e.g. ``RCPT``)."""
        return [s for s in self.steps if s.command.upper().startswith(command.upper())]

    def code(self, command: str) -> int:
        """The reply code of the only or first *command*; KeyError if not sent."""
        found = self.replies(command)
        if not found:
            raise KeyError(f"{command} was not sent: {self}")
        return found[0].code

    @property
    def accepted(self) -> bool:
        """Whether the message was queued (DATA end answered 250)."""
        return any(s.command == "DATA-END" and s.code == 250 for s in self.steps)

    @property
    def disconnected(self) -> bool:
        """Whether the server hung up before the client said QUIT and got 221."""
        return bool(self.steps) and self.steps[-1].command == "DISCONNECTED"

    def __str__(self) -> str:
        return "; ".join(f"{s.command} -> {s.code} {s.text}" for s in self.steps)


_XTEXT_SAFE = frozenset(chr(c) for c in range(33, 127)) - {"+", "="}


def xtext(value: str) -> str:
    """RFC 3461 xtext, the encoding of XCLIENT attribute values."""
    return "".join(
        ch if ch in _XTEXT_SAFE else "".join(f"+{b:02X}" for b in ch.encode("utf-8"))
        for ch in value
    )


def send_message(
    host: str,
    port: int,
    *,
    sender: str = "sender@example.org",
    recipients: Sequence[str] = (f"rcpt@{RELAY_DOMAIN}",),
    helo: str = "client.example.net",
    xclient: Mapping[str, str] | None = None,
    ehlo_after_xclient: bool = True,
    mail_options: Sequence[str] = (),
    body: str | None = None,
    timeout: float = 30.0,
) -> SmtpTranscript:
    """
    Send one message and record every reply.

    With *xclient*, EHLO is followed by ``XCLIENT name=value ...`` (values
    xtext-encoded; ``ADDR``, ``NAME``, ``REVERSE_NAME``, ``HELO``, ``PROTO``,
    ``PORT``, ``LOGIN``, ...) to present another client identity.  smtpd
    answers 220 and is back at the greeting stage; the client then says
    EHLO again (with *helo*), unless *ehlo_after_xclient* is false, in which
    case the HELO name from XCLIENT stays in effect.  *mail_options* go on
    MAIL FROM (e.g. ``SMTPUTF8``).  DATA is sent only if a recipient was
    accepted.  A refused XCLIENT is followed by QUIT only.  A server
    disconnect ends the transcript with a ``DISCONNECTED`` step.
    """
    steps: list[SmtpStep] = []
    local_port = 0

    def record(command: str, reply: tuple[int, bytes | str]) -> int:
        code, text = reply
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        steps.append(SmtpStep(command, code, text))
        return code

    client = smtplib.SMTP(timeout=timeout)
    try:
        record("CONNECT", client.connect(host, port))
        if client.sock is not None:
            local_port = int(client.sock.getsockname()[1])
        record("EHLO", client.ehlo(helo))
        if xclient:
            arguments = " ".join(f"{k.upper()}={xtext(v)}" for k, v in xclient.items())
            if record("XCLIENT", client.docmd("XCLIENT", arguments)) != 220:
                # Refused (e.g. a 421 from a connect-stage policy check, which
                # also hangs up): say QUIT as a client would, which records
                # whether the server is still there.
                record("QUIT", client.docmd("QUIT"))
                return SmtpTranscript(tuple(steps), local_port)
            client.ehlo_resp = client.helo_resp = None
            client.esmtp_features = {}
            client.does_esmtp = False
            if ehlo_after_xclient:
                record("EHLO", client.ehlo(helo))
        record("MAIL", client.mail(sender, list(mail_options)))
        accepted = 0
        for recipient in recipients:
            if record(f"RCPT {recipient}", client.rcpt(recipient)) in (250, 251):
                accepted += 1
        if accepted:
            if record("DATA", client.docmd("DATA")) == 354:
                message = body or (
                    f"From: <{sender}>\r\nTo: <{recipients[0]}>\r\n"
                    "Subject: policyd end-to-end test\r\n\r\nHello.\r\n"
                )
                client.send(smtplib.quotedata(message).encode("utf-8") + b"\r\n.\r\n")
                record("DATA-END", client.getreply())
        else:
            record("RSET", client.rset())
        record("QUIT", client.docmd("QUIT"))
    except smtplib.SMTPServerDisconnected as e:
        steps.append(SmtpStep("DISCONNECTED", 0, str(e)))
    finally:
        client.close()
    return SmtpTranscript(tuple(steps), local_port)


def ehlo_features(
    host: str, port: int, helo: str = "client.example.net"
) -> dict[str, str]:
    """The ESMTP extensions *host*:*port* advertises to us (e.g. XCLIENT)."""
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.ehlo(helo)
        return dict(client.esmtp_features)


@attrs.frozen
class SmtpSourceResult:
    """Outcome of one smtp-source(1) run."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> SmtpSourceResult:
        """Raise unless smtp-source exited 0."""
        if self.returncode != 0:
            raise AssertionError(
                f"{' '.join(self.argv)} exited {self.returncode}: "
                f"{self.stderr.strip() or self.stdout.strip()}"
            )
        return self


def smtp_source_argv(
    program: str,
    host: str,
    port: int,
    *,
    sessions: int = 1,
    messages: int = 1,
    recipients: int = 1,
    sender: str = "sender@example.org",
    recipient: str = f"rcpt@{RELAY_DOMAIN}",
    helo: str = "client.example.net",
    keep_open: bool = False,
    number_recipients: bool = False,
    tolerant: bool = False,
    delay: int = 0,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """
    The smtp-source command line for *host*:*port*.

    *sessions* is ``-s`` (parallel sessions), *messages* ``-m`` (total, not per
    session), *recipients* ``-r``; *keep_open* adds ``-d`` (several messages
    per connection), *number_recipients* ``-N`` (smtp-source 3.7 *prepends*
    a sequence number to the recipient localpart), *tolerant* ``-A`` (don't
    abort on a non-2xx reply), *delay* ``-w`` (whole seconds to wait before
    each next message of a session; with *keep_open* the session stays
    connected, holding its smtpd process, while it waits).  Without ``-A``
    any rejection makes smtp-source exit non-zero.
    """
    argv = [
        program,
        "-s", str(sessions),
        "-m", str(messages),
        "-r", str(recipients),
        "-f", sender,
        "-t", recipient,
        "-M", helo,
    ]  # fmt: skip
    argv += ["-d"] * keep_open + ["-N"] * number_recipients + ["-A"] * tolerant
    if delay > 0:
        argv += ["-w", str(delay)]
    argv += [*extra_args, f"inet:{host}:{port}"]
    return argv


class SmtpSourceProcess:
    """
    smtp-source(1) running in the background; `wait` for its result.

    Use as a context manager: leaving the block kills a run still going, so
    a failing test never leaves load generators behind.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = tuple(argv)
        self.started = time.monotonic()
        #: Wall-clock start, comparable with policyd's event times.
        self.started_at = time.time()
        self._process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        atexit.register(self.kill)

    @property
    def pid(self) -> int:
        """The process id."""
        return self._process.pid

    def running(self) -> bool:
        """Whether smtp-source is still running."""
        return self._process.poll() is None

    def wait(self, timeout: float = 60.0) -> SmtpSourceResult:
        """Wait for the exit (killing it after *timeout* and raising)."""
        try:
            stdout, stderr = self._process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        atexit.unregister(self.kill)
        return SmtpSourceResult(
            self.argv, self._process.returncode, stdout, stderr,
            time.monotonic() - self.started,
        )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL smtp-source if it still runs, and reap it."""
        if self._process.returncode is None:  # not reaped by `wait` yet
            if self._process.poll() is None:
                self._process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.communicate(timeout=10.0)
        atexit.unregister(self.kill)

    def __enter__(self) -> SmtpSourceProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def start_smtp_source(
    program: str, host: str, port: int, **options: Any
) -> SmtpSourceProcess:
    """Start smtp-source against *host*:*port* (options of `smtp_source_argv`)."""
    return SmtpSourceProcess(smtp_source_argv(program, host, port, **options))


def run_smtp_source(
    program: str, host: str, port: int, *, timeout: float = 60.0, **options: Any
) -> SmtpSourceResult:
    """
    Run smtp-source against *host*:*port* and wait (at most *timeout*).

    *options* are those of `smtp_source_argv`.
    """
    return start_smtp_source(program, host, port, **options).wait(timeout)


@attrs.frozen
class Bed:
    """A Postfix instance, the policyd it asks, and where the test's log starts."""

    postfix: PostfixInstance
    policyd: PolicydProcess
    #: `MailLog.mark` when the test began; lines before it belong to others.
    log_mark: int = 0

    def log_lines(self, pattern: str | re.Pattern[str] | None = None) -> list[str]:
        """Maillog lines written since the test began, matching *pattern*."""
        return self.postfix.maillog.lines(pattern, self.log_mark)


@contextlib.contextmanager
def running_bed(
    tools: PostfixTools,
    policyd_env: Mapping[str, str] | None = None,
    config: PostfixConfig | None = None,
    netns: NetworkNamespace | None = None,
) -> Iterator[Bed]:
    """
    Run policyd and a Postfix instance that asks it (for scripts, benchmarks).

    *config*'s ``policy_port`` is replaced by the port policyd listens on.
    With *netns*, both run inside that network namespace (see
    `PostfixInstance` and `PolicydProcess`).
    """
    with PolicydProcess(policyd_env, netns=netns) as policyd:
        config = attrs.evolve(
            config or PostfixConfig(policy_port=policyd.port), policy_port=policyd.port
        )
        with PostfixInstance(config, tools, netns=netns) as postfix:
            yield Bed(postfix, policyd, postfix.log_marker("begin"))
