"""
What the test bed needs from this machine: programs, processes, ports, time.

The small pieces every other module of `policyd.testing` builds on:

- `find_program` looks a program up on ``$PATH`` and in the sbin
  directories (where Postfix and ip(8) live); `Unavailable` says that a
  prerequisite is missing.  Nothing here installs anything: ``tests/run``
  installs what the tests need, and a runner that wants to install more
  does so itself, explicitly.
- `run_program` runs a command to completion with its output in files.
- `pid_exists`, `pid_alive`, `proc_stat` and `proc_cwd` read ``/proc``.
- `free_port` picks a TCP port nothing listens on.
- `wait_until` waits, bounded, for a condition.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

# Where Debian (and most packagers) put the Postfix programs and ip(8);
# searched after $PATH because /usr/sbin is often missing from a non-login
# root's PATH.
SBIN_DIRS: Final = ("/usr/sbin", "/usr/local/sbin", "/sbin")

#: How long to wait for things that normally take milliseconds.
DEFAULT_TIMEOUT: Final = 15.0

_POLL_INTERVAL: Final = 0.02


class Unavailable(Exception):
    """A prerequisite of the test bed is missing; the message says which."""


def find_program(name: str) -> str | None:
    """The absolute path of program *name* on ``$PATH`` or in `SBIN_DIRS`."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    return shutil.which(name, path=path)


def run_program(argv: Sequence[str], timeout: float = 60.0) -> str:
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


# --------------------------------------------------------------------------
# Processes (/proc)
# --------------------------------------------------------------------------


def pid_exists(pid: int) -> bool:
    """Whether a process *pid* exists (perhaps as a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of *pid*, or None if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may contain spaces; the rest is split.
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    state, ppid = raw[raw.rindex(")") + 2 :].split()[:2]
    return comm, state, int(ppid)


def pid_alive(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie."""
    stat = proc_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def proc_cwd(pid: int) -> str | None:
    """The working directory of process *pid*, if it can be read."""
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


# --------------------------------------------------------------------------
# Ports and waiting
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


def wait_until(
    condition: Callable[[], bool],
    timeout: float = DEFAULT_TIMEOUT,
    what: str | Callable[[], str] = "a condition",
) -> None:
    """
    Wait until *condition* holds (checked every few ms); TimeoutError if not.

    *what* names the condition in the error; a callable is asked only then,
    so it may describe the state at the timeout.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            described = what if isinstance(what, str) else what()
            raise TimeoutError(f"timed out after {timeout}s waiting for {described}")
        time.sleep(_POLL_INTERVAL)
