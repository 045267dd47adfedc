"""
policyd as a child process, for the tests and the scenario runners.

`PolicydProcess` runs ``python -m policyd serve`` (or a command that execs
it, such as a socket-activation trampoline) and reads its stdout and stderr
line by line in background threads.  Every line is kept, every JSON object
on stdout is also an event, and the caller waits for events or text, reads
``/metrics`` and ``/healthz``, signals, restarts and reaps the process.

It serves both kinds of caller:

- the command-line tests, which give the exact ``POLICYD_*`` settings
  (``defaults=False``), start the process without waiting for anything
  (`PolicydProcess.spawn`), and look at exit statuses, stdout and stderr;
- the Postfix test bed (`policyd.testing.bed`), which runs it with JSON
  logs at debug level on port 0, learns the ports from the log
  (`PolicydProcess.start`), perhaps inside a network namespace, and waits
  for the ``request`` events Postfix's questions cause.

Nothing here depends on pytest: a wait that fails raises `TimeoutError`,
saying what the process last wrote.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, TypeVar

from prometheus_client.parser import text_string_to_metric_families

import policyd
from policyd.testing.netns import NetworkNamespace
from policyd.testing.system import DEFAULT_TIMEOUT

#: One JSON log record of policyd.
Event = dict[str, Any]

_T = TypeVar("_T")

# The directory the policyd package imported here comes from: the child
# gets it first on PYTHONPATH, so that it runs the same code (the work
# tree's policyd even when another copy is installed).
_POLICYD_ROOT: Final = str(Path(policyd.__file__).resolve().parents[1])


def _default_sigint() -> None:
    """Run in the child before exec: SIGINT back to its default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PolicydProcess:
    """
    policyd as a child process whose output is read as it comes.

    The child's environment is ours without its ``POLICYD_*`` variables,
    then the defaults (unless *defaults* is false), then *env*: the
    ``POLICYD_*`` settings and any other variable (``LISTEN_FDS``, say).
    The defaults are both listeners on 127.0.0.1 port 0 and JSON logs at
    debug level, so that every request is an event and `start` can learn the
    ports from the log.  Without them policyd falls back on its own defaults
    for whatever *env* does not set, as on a real install.

    *argv* replaces ``python -m policyd serve`` (it must end up running
    policyd in the same process, e.g. through ``os.execv``); *pass_fds* are
    inherited by it.  With *netns*, policyd runs inside that network
    namespace: the default policy listener on the namespace's own 127.0.0.1
    (where a Postfix instance in the same namespace asks it), the default
    metrics listener on the namespace's veth address so that `http_get`
    reaches it from here.

    `spawn` starts the process, `start` also waits until it listens.  Every
    stdout line is in `stdout`, every stderr line in `stderr` (each with its
    newline), and every stdout line that is a JSON object also in `events`.
    As a context manager it is started on entry (unless `spawn` or `start`
    already did), and killed if still running, and reaped, on exit.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        defaults: bool = True,
        argv: Sequence[str] | None = None,
        pass_fds: Sequence[int] = (),
        netns: NetworkNamespace | None = None,
    ) -> None:
        self.netns = netns
        #: The variables the child gets over our environment (without our
        #: own POLICYD_* variables).
        self.settings: dict[str, str] = {}
        if defaults:
            metrics_host = "127.0.0.1" if netns is None else netns.address
            self.settings.update(
                POLICYD_LISTEN="tcp:0:interface=127.0.0.1",
                POLICYD_METRICS_LISTEN=f"tcp:0:interface={metrics_host}",
                POLICYD_LOG_FORMAT="json",
                POLICYD_LOG_LEVEL="debug",
            )
        self.settings.update(env or {})
        self.argv: tuple[str, ...] = (
            tuple(argv)
            if argv is not None
            else (sys.executable, "-m", "policyd", "serve")
        )
        self.pass_fds = tuple(pass_fds)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.events: list[Event] = []
        #: The policy and metrics ports, once `start` has learnt them.
        self.port = 0
        self.metrics_port = 0
        self.returncode: int | None = None
        self._changed = threading.Condition()
        self._process: subprocess.Popen[str] | None = None
        self._readers: list[threading.Thread] = []

    @property
    def metrics_host(self) -> str:
        """Where `http_get` connects: the metrics listener's interface."""
        listen = self.settings.get("POLICYD_METRICS_LISTEN", "")
        interface = re.search(r"(?:^|:)interface=([^:\s]+)", listen)
        return interface.group(1) if interface else "127.0.0.1"

    # -- life cycle ----------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The child's environment: ours minus POLICYD_*, then `settings`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
        env["PYTHONPATH"] = os.pathsep.join(
            [_POLICYD_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env.update(self.settings)
        return env

    def spawn(self) -> PolicydProcess:
        """
        Start the process and the readers of its output; wait for nothing.

        The output of an earlier run (see `restart`) is discarded.
        """
        if self.running:
            raise RuntimeError("policyd is already running")
        self.returncode = None
        with self._changed:
            self.stdout.clear()
            self.stderr.clear()
            self.events.clear()
        argv = list(self.argv)
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
            pass_fds=self.pass_fds,
            # A shell runs background jobs with SIGINT ignored, and a child
            # inherits that: give policyd the default, as a terminal would.
            preexec_fn=_default_sigint,
        )
        self._process = process
        atexit.register(self.kill)
        if process.stdout is None or process.stderr is None:
            raise RuntimeError("Popen gave no pipes")
        self._readers = [
            threading.Thread(
                target=self._read,
                args=(process.stdout, self.stdout, True),
                daemon=True,
            ),
            threading.Thread(
                target=self._read,
                args=(process.stderr, self.stderr, False),
                daemon=True,
            ),
        ]
        for reader in self._readers:
            reader.start()
        return self

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> PolicydProcess:
        """
        `spawn`, then wait until the listeners are up; learn their ports.

        The policy port is that of the first ``listening`` event, the
        metrics port that of the ``metrics_listening`` event (unless the
        metrics listener is ``none``): this needs JSON logs, as by default.
        If policyd does not get there, it is killed.
        """
        self.spawn()
        try:
            listening = self.wait_for_event("listening", timeout=timeout)
            self.port = int(listening["port"])
            if self.settings.get("POLICYD_METRICS_LISTEN") != "none":
                metrics = self.wait_for_event("metrics_listening", timeout=timeout)
                self.metrics_port = int(metrics["port"])
        except BaseException:
            self.kill()
            raise
        return self

    def restart(self, timeout: float = DEFAULT_TIMEOUT) -> PolicydProcess:
        """Start again on the same policy port (Postfix's config is unchanged)."""
        if self.running:
            raise RuntimeError("policyd is still running")
        listen = self.settings.get("POLICYD_LISTEN")
        if self.port and listen is not None:
            self.settings["POLICYD_LISTEN"] = re.sub(
                r"^tcp:\d+", f"tcp:{self.port}", listen
            )
        return self.start(timeout)

    def _started(self) -> subprocess.Popen[str]:
        if self._process is None:
            raise RuntimeError("policyd was never started")
        return self._process

    @property
    def pid(self) -> int:
        """The process id (of the current or last run)."""
        return self._started().pid

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def signal(self, signum: int) -> None:
        """Send *signum* to the process."""
        self._started().send_signal(signum)

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """
        Wait for the exit and the end of its output; return the exit status.

        `subprocess.TimeoutExpired` if it is still running after *timeout*.
        """
        process = self._started()
        self.returncode = process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout=timeout)
        if not any(reader.is_alive() for reader in self._readers):
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        return self.returncode

    def terminate(self, timeout: float = 10.0) -> int:
        """Send SIGTERM and wait for the exit; return the exit status."""
        if self.running:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the process if it still runs, and reap it (cleanup path)."""
        if self._process is None:
            return
        if self.running:
            self._process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(10.0)
        atexit.unregister(self.kill)

    def __enter__(self) -> PolicydProcess:
        return self if self._process is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    # -- output ------------------------------------------------------------------

    def _read(self, stream: IO[str], lines: list[str], parse: bool) -> None:
        """Append each line of *stream* to *lines*; *parse*: JSON ones to `events`."""
        for line in stream:
            event = _json_object(line) if parse else None
            with self._changed:
                lines.append(line)
                if event is not None:
                    self.events.append(event)
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

    def _wait(
        self, check: Callable[[], _T | None], timeout: float, what: Callable[[], str]
    ) -> _T:
        """Wait until *check* (called with the output locked) returns a value."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = check()
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                exited = self._finished()
                if remaining <= 0 or exited:
                    reason = (
                        "policyd exited" if exited else f"timed out after {timeout}s"
                    )
                    raise TimeoutError(
                        f"{reason} waiting for {what()}; {self.describe_output()}"
                    )
                self._changed.wait(min(remaining, 0.5))

    @property
    def stray_lines(self) -> list[str]:
        """Non-empty stdout lines that are not JSON objects (with JSON logs: none)."""
        with self._changed:
            return [
                line.rstrip("\n")
                for line in self.stdout
                if line.strip() and _json_object(line) is None
            ]

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
        found: list[Event] = []

        def enough() -> list[Event] | None:
            found[:] = [e for e in self.events if predicate(e)]
            return list(found) if len(found) >= count else None

        return self._wait(
            enough, timeout, lambda: f"{count} x {what}, got {len(found)}"
        )

    def wait_for(
        self,
        predicate: Callable[[Event], bool],
        timeout: float = DEFAULT_TIMEOUT,
        what: str = "an event",
    ) -> Event:
        """The first event matching *predicate*, waiting for it if need be."""
        return self.wait_for_all(predicate, 1, timeout, what)[0]

    def wait_for_event(
        self,
        event: str,
        match: Callable[[Event], bool] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        **fields: object,
    ) -> Event:
        """
        The first *event* event whose *fields* have those values and that *match*es.

        Waits for it (at most *timeout*) if there is none yet.
        """

        def wanted(record: Event) -> bool:
            return (
                record.get("event") == event
                and all(record.get(k) == v for k, v in fields.items())
                and (match is None or match(record))
            )

        what = f"the {event!r} event" + (f" with {fields}" if fields else "")
        return self.wait_for(wanted, timeout, what)

    def wait_for_text(self, text: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """The first stdout line containing *text*, waiting for it if need be."""
        return self._wait(
            lambda: next((line for line in self.stdout if text in line), None),
            timeout,
            lambda: f"a line with {text!r}",
        )

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

    def output(self) -> str:
        """Everything read so far, stdout and stderr, for failure messages."""
        with self._changed:
            return f"stdout={''.join(self.stdout)!r} stderr={''.join(self.stderr)!r}"

    def describe_output(self, lines: int = 15) -> str:
        """The last events, stray lines and stderr, for error messages."""
        with self._changed:
            events = [json.dumps(e)[:400] for e in self.events[-lines:]]
            stray = self.stray_lines[-lines:]
            stderr = [line.rstrip("\n") for line in self.stderr[-lines:]]
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


def _json_object(line: str) -> Event | None:
    """*line* as a JSON object, or None if it is not one."""
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _is_request(event: Event, attributes: Mapping[str, str]) -> bool:
    if event.get("event") != "request":
        return False
    got = event.get("attributes")
    return isinstance(got, dict) and all(got.get(k) == v for k, v in attributes.items())
