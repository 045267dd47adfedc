"""
The systemd units in deploy/systemd and policyd's readiness notification.

The units are checked by ``systemd-analyze`` where it exists (Debian's
systemd package; ``verify`` and an offline ``security`` review need no
running systemd), with ExecStart pointed at this checkout's policyd so that
the command exists.  ``Type=notify`` is only true if policyd says READY=1
once it listens: a real policyd process tells a datagram socket the test
binds, as systemd's NOTIFY_SOCKET would be.
"""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import capture_logs, events_named, required_program

from policyd.cli import sd_notify
from policyd.testing.daemon import PolicydProcess

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
SERVICE = UNITS / "policyd.service"
UNIX_SOCKET = UNITS / "policyd-unix.socket"
TCP_SOCKET = UNITS / "policyd.socket"


def unit(path: Path) -> configparser.ConfigParser:
    """A unit file's sections and settings (repeated settings: the last)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units in a directory of their own, ExecStart on this policyd."""
    for path in UNITS.iterdir():
        if path.is_file():
            shutil.copy(path, tmp_path / path.name)
    service = tmp_path / SERVICE.name
    here = Path(sys.executable).with_name("policyd")
    service.write_text(
        service.read_text().replace("/opt/policyd/bin/policyd", str(here))
    )
    return tmp_path


def systemd_analyze() -> str:
    """The systemd-analyze program (Debian's systemd)."""
    return required_program("systemd-analyze", "systemd")


class TestUnits:
    """The units as systemd reads them."""

    def test_verify(self, units: Path) -> None:
        """systemd-analyze verify finds nothing wrong with any of them."""
        names = ["policyd.service", "policyd.socket", "policyd-unix.socket"]
        result = subprocess.run(
            [systemd_analyze(), "verify", "--man=no", *names],
            cwd=units,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == "", result.stderr

    def test_security_review(self, units: Path) -> None:
        """Systemd's own exposure score of the service is low (below 2.0)."""
        result = subprocess.run(
            [
                systemd_analyze(),
                "security",
                "--offline=true",
                "--no-pager",
                str(units / "policyd.service"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        last = result.stdout.strip().splitlines()[-1]
        score = float(last.split("policyd.service:")[1].split()[0])
        assert score < 2.0, result.stdout

    def test_configuration_error_is_not_restarted(self) -> None:
        """Exit status 2 (a bad POLICYD_* value) stops the restart loop."""
        service = unit(SERVICE)["Service"]
        assert service["Restart"] == "on-failure"
        assert service["RestartPreventExitStatus"] == "2"

    def test_ready_means_listening(self) -> None:
        """Type=notify: systemd waits for policyd's READY=1, sent once it listens."""
        service = unit(SERVICE)["Service"]
        assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")

    def test_reload_is_sighup(self) -> None:
        """Systemctl reload sends policyd SIGHUP (it reads its list files again)."""
        assert unit(SERVICE)["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"

    def test_unix_socket_for_postfix(self) -> None:
        """The unix socket is Postfix's private/policyd, for root and postfix only."""
        socket_unit = unit(UNIX_SOCKET)["Socket"]
        assert socket_unit["ListenStream"] == "/var/spool/postfix/private/policyd"
        assert (socket_unit["SocketGroup"], socket_unit["SocketMode"]) == (
            "postfix",
            "0660",
        )
        assert socket_unit["Service"] == "policyd.service"
        assert "POLICYD_LISTEN=systemd:domain=UNIX:index=0" in UNIX_SOCKET.read_text()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing for systemd's NOTIFY_SOCKET, and its path."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(15)
        yield sock, path


class TestNotify:
    """sd_notify: what policyd tells systemd, and when."""

    def test_without_systemd(self) -> None:
        """No NOTIFY_SOCKET: nothing is sent."""
        assert sd_notify("READY=1", {}) is False

    def test_path(self, notify_socket: tuple[socket.socket, str]) -> None:
        """The state goes to the socket named by NOTIFY_SOCKET."""
        sock, path = notify_socket
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": path}) is True
        assert sock.recv(1024) == b"READY=1"

    def test_abstract(self) -> None:
        """An abstract socket is written with a leading @."""
        name = f"policyd-test-{os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name)
            sock.settimeout(5)
            assert sd_notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
            assert sock.recv(1024) == b"STOPPING=1"

    def test_unreachable_is_logged_not_fatal(self, tmp_path: Path) -> None:
        """A socket that is not there is a warning, and False."""
        with capture_logs() as logs:
            sent = sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "none")})
        assert sent is False
        (event,) = events_named(logs, "notify_failed")
        assert event["state"] == "READY=1"

    def test_policyd_ready_once_listening(
        self, notify_socket: tuple[socket.socket, str]
    ) -> None:
        """A real policyd says READY=1 after it listens, STOPPING=1 on SIGTERM."""
        sock, path = notify_socket
        policyd = PolicydProcess({"NOTIFY_SOCKET": path})
        policyd.spawn()
        try:
            ready = sock.recv(1024)
            assert ready.startswith(b"READY=1\n")
            # Ready means listening: the port answers now.
            listening = policyd.wait_for_event("listening")
            with socket.create_connection(
                ("127.0.0.1", int(listening["port"])), timeout=5
            ):
                pass
            assert policyd.terminate() == 0
            assert sock.recv(1024) == b"STOPPING=1"
        finally:
            policyd.kill()
