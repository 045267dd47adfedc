"""
The command line: the one module that touches the process.

It alone reads the environment, uses the real reactor, installs signal
handlers and decides exit codes.

Exit codes: 0 after a clean stop (SIGTERM or SIGINT), 1 when the server cannot
start (e.g. the address is in use), 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.logger import Logger, globalLogBeginner

from policyd import __version__, config
from policyd.logs import make_observer

log = Logger()

EXIT_CANNOT_START = 1
EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"policyd: {message}", file=sys.stderr)
    raise SystemExit(code)


def _load(env: Mapping[str, str]) -> config.Config:
    for name in config.unknown_variables(env):
        print(f"policyd: warning: ignoring unknown variable {name}", file=sys.stderr)
    try:
        return config.load(env)
    except config.ConfigError as e:
        _fail(str(e))


def show_config(env: Mapping[str, str]) -> str:
    """Every variable with its effective value and help, as an env file."""
    _load(env)
    chunks = []
    for setting in config.describe(env):
        origin = "default" if setting.is_default else f"default: {setting.default}"
        comment = textwrap.wrap(
            f"{setting.help} ({origin})", width=76, break_on_hyphens=False
        )
        chunks.append(
            "".join(f"# {line}\n" for line in comment)
            + f"{setting.variable}={shlex.quote(setting.value)}\n"
        )
    return "\n".join(chunks)


def serve(cfg: config.Config) -> NoReturn:
    """Run the policy server in the foreground until SIGTERM or SIGINT."""
    from twisted.internet.task import react

    from policyd.server import PolicyServer

    globalLogBeginner.beginLoggingTo(
        [make_observer(cfg.log_level, cfg.log_format, sys.stdout)],
        discardBuffer=True,
        redirectStandardIO=False,
    )

    async def run(reactor: Any) -> None:
        server = PolicyServer(cfg, reactor, CollectorRegistry())
        try:
            await server.start()
        except Exception as e:  # noqa: BLE001 - any listen failure ends start-up
            log.critical("Cannot start: {error}", event="start_failed", error=str(e))
            _fail(f"cannot start: {e}", EXIT_CANNOT_START)
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: Deferred.fromCoroutine(server.stop())
        )
        log.info(
            "policyd {version} running; SIGTERM or SIGINT stops it",
            event="started",
            version=__version__,
        )
        await Deferred()  # until the reactor stops; react() then exits 0

    react(lambda r: Deferred.fromCoroutine(run(r)))
    raise AssertionError("react() returned")  # pragma: no cover - react exits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyd",
        description="A stress-aware Postfix policy-delegation server. "
        "Configured by POLICYD_* environment variables: see 'policyd config'.",
    )
    parser.add_argument("--version", action="version", version=f"policyd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the policy server in the foreground")
    commands.add_parser(
        "config", help="print every variable with its effective value and help"
    )
    return parser


def main(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> None:
    """Entry point of the ``policyd`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    environment = os.environ if env is None else env
    if args.command == "config":
        sys.stdout.write(show_config(environment))
    elif args.command == "serve":
        serve(_load(environment))
    else:
        parser.print_help(sys.stderr)
        raise SystemExit(EXIT_USAGE)
