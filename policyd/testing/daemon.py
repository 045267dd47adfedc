"""
policyd as a child process, for the Postfix test bed and scenario runners.

`PolicydProcess` runs ``python -m policyd serve`` with JSON logs at debug
level on port 0, learns its ports from the log, perhaps inside a network
namespace (`policyd.testing.netns`), and reads its output in background
threads: the caller waits for the ``request`` events that Postfix's
questions cause, reads ``/metrics`` and ``/healthz``, and terminates,
restarts or kills it.

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
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

from prometheus_client.parser import text_string_to_metric_families

import policyd
from policyd.testing.netns import NetworkNamespace
from policyd.testing.system import DEFAULT_TIMEOUT

#: One JSON log record of policyd.
Event = dict[str, Any]

# The directory the policyd package imported here comes from: the child
# gets it first on PYTHONPATH, so that it runs the same code (the work
# tree's policyd even when another copy is installed).
_POLICYD_ROOT: Final = str(Path(policyd.__file__).resolve().parents[1])


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
        self.source_root = source_root or Path(_POLICYD_ROOT)
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
        # Run the same policyd as this process, even when another copy is
        # installed.
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
        if process.stdout is None or process.stderr is None:
            raise RuntimeError("Popen gave no pipes")
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
        if self._process is None:
            raise RuntimeError("policyd was never started")
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
