"""
A private, real Postfix instance for tests and scenario runners.

- `find_postfix` finds Debian's Postfix programs (`PostfixTools`); it
  installs nothing (``tests/run`` installs Postfix, as root, when missing).
- `PostfixConfig` / `PostfixInstance` render and run a throw-away instance
  with its own configuration, queue and data directories in a temporary
  directory, started and stopped with ``postfix -c DIR``.  It never reads or
  writes the system instance in ``/etc/postfix`` and ``/var/spool/postfix``.
- `MailLog` reads the instance's own log; `PostfixInstance.send` and
  `PostfixInstance.smtp_source` drive mail through it (with the clients of
  `policyd.testing.smtp`).
- Given a `policyd.testing.netns.NetworkNamespace`, the instance runs inside
  it and clients stay here: the mode in which master(8) can enter stress
  mode, which it never does for a listener bound only to loopback
  (reference §5.2), and the default instance is.

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

What stress mode needs, in a network namespace, found the same way:

- ``inet_interfaces = all`` in the namespace (the listener is the wildcard
  address, not loopback), ``maxproc`` > 1: master then passes
  ``-o stress=`` to smtpd and, when a connection needs the last process,
  ``-o stress=yes`` (visible in ``/proc/PID/cmdline``).  It also logs
  ``warning: service "PORT" (PORT) has reached its process limit "N"``
  (the service is named by its port, there being no host part).
- master keeps stressing new smtpd processes for 1000 s after a service
  last hit its limit, also across ``postfix reload``; only a restart
  (`PostfixInstance.restart`) forgets it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs

from policyd.testing.netns import NetworkNamespace
from policyd.testing.smtp import (
    RELAY_DOMAIN,
    SmtpSourceProcess,
    SmtpSourceResult,
    SmtpTranscript,
    run_smtp_source,
    send_message,
    start_smtp_source,
    wait_for_smtp_greeting,
)
from policyd.testing.system import (
    DEFAULT_TIMEOUT,
    Unavailable,
    find_program,
    free_port,
    pid_alive,
    proc_cwd,
    proc_stat,
    run_program,
    wait_until,
)

# --------------------------------------------------------------------------
# The programs
# --------------------------------------------------------------------------


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
        return run_program([self.postconf, "-dh", "mail_version"]).strip()


def find_postfix() -> PostfixTools:
    """
    Find the Postfix programs the bed needs; `Unavailable` if one is missing.

    A private instance can only be started by root, so a non-root caller gets
    `Unavailable` even when Postfix is installed.  Nothing is installed here:
    ``tests/run`` installs Debian's postfix (as root) when it is missing.
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
    owner = run_program([found["postconf"], "-dh", "mail_owner"]).strip()
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
    #: The restriction list(s) the policy check goes into (None: none).
    policy_restriction: str | tuple[str, ...] | None = "smtpd_recipient_restrictions"
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
        wired = self.policy_restriction
        for name in (wired,) if isinstance(wired, str) else wired or ():
            restrictions.setdefault(name, []).append(self.policy_check)
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

        wait_until(
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
        return run_program([self.tools.postconf, "-c", str(self.config_dir), *args])

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
            "# Generated by policyd.testing.postfix for a throw-away instance.\n"
            + main_cf
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
        return run_program(argv, timeout=timeout)

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
        if pid is None or not pid_alive(pid):
            return False
        stat = proc_stat(pid)
        # master runs in its queue directory; that tells instances apart.
        return (
            stat is not None
            and stat[0] == "master"
            and proc_cwd(pid) == str(self.queue_dir.resolve())
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
            stat = proc_stat(int(entry.name))
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
        wait_until(
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
            wait_until(
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
                wait_until(
                    lambda: not pid_alive(pid), 5.0, lambda: f"master {pid} to die"
                )
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
        run_program(
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

        wait_until(logged, timeout, lambda: f"marker {token!r} in {self.maillog.path}")
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
