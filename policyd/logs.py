"""Logging: twisted.logger events to stdout, as text or JSON lines.

Values that come from SMTP clients (HELO names, addresses, senders) are
passed through `escape` before they reach a log event, so a client cannot
forge log lines with CR/LF or smuggle terminal escapes or invalid UTF-8 into
the log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any, Final, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)

LEVELS: Final = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_char(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if char.isprintable():
        return char
    # \xNN with NN >= 80 means an undecodable byte (above), so non-ASCII
    # characters take \u or \U: every escape reads back to one character.
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape(text: str) -> str:
    r"""Make a client-supplied string safe and unambiguous for a log line.

    Control and other non-printable characters and backslashes become
    backslash escapes; bytes that were not valid UTF-8 (kept as surrogates by
    `policyd.request.decode`) become ``\xNN``.  Printable text, non-ASCII
    included, is kept as it is.
    """
    if text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to do
    return "".join(map(_escape_char, text))


# Keys twisted.logger and its legacy bridge put on events: not user fields.
_INTERNAL = frozenset({"message", "isError", "system", "format", "time", "why"})
# Keys of the JSON record itself; an event field of the same name (say, a
# decision's "level") is written as "level_" rather than replacing it.
_RECORD_KEYS = frozenset({"time", "level", "namespace", "message", "traceback"})


def _timestamp(event: LogEvent) -> str:
    when = datetime.fromtimestamp(event.get("log_time", 0.0), tz=UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _failure_text(event: LogEvent) -> str | None:
    failure = event.get("log_failure")
    return None if failure is None else str(failure.getTraceback())


def _level_name(event: LogEvent) -> str:
    level = event.get("log_level")
    return level.name if level is not None else "info"


def _message(event: LogEvent) -> str:
    """The event's text: its format filled in with its fields.

    `str.format_map` when the format is plain (``{name}``, ``{name!r}``,
    ``{name:.1f}``): what `twisted.logger.formatEvent` makes of it, in a
    fifth of the time (it formats through the pure-Python `string.Formatter`,
    and under a flood policyd logs up to POLICYD_REFUSAL_LOG_LIMIT lines a
    second).  Anything else (no format, a missing field, Twisted's
    ``{callable()}``) goes to formatEvent, which handles every case.
    """
    fmt = event.get("log_format")
    if isinstance(fmt, str):
        try:
            return fmt.format_map(event)
        except (KeyError, IndexError, AttributeError, TypeError, ValueError):
            pass
    return formatEvent(event)


def format_text(event: LogEvent) -> str:
    """One human-readable line (plus a traceback, if the event has one)."""
    line = (
        f"{_timestamp(event)} {_level_name(event)} "
        f"[{event.get('log_namespace', '-')}] {_message(event)}\n"
    )
    traceback = _failure_text(event)
    return line if traceback is None else line + traceback


def format_json(event: LogEvent) -> str:
    """One JSON object on one line, with the event's fields as keys."""
    record: dict[str, Any] = {
        "time": _timestamp(event),
        "level": _level_name(event),
        "namespace": event.get("log_namespace", "-"),
        "message": _message(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in _INTERNAL:
            record[f"{key}_" if key in _RECORD_KEYS else key] = value
    traceback = _failure_text(event)
    if traceback is not None:
        record["traceback"] = traceback
    record.setdefault("event", "log")
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


def make_observer(level: str, fmt: str, stream: IO[str]) -> ILogObserver:
    """An observer writing events at *level* or above to *stream*."""
    formatter: Callable[[LogEvent], str] = format_json if fmt == "json" else format_text

    def write(event: LogEvent) -> None:
        stream.write(formatter(event))
        stream.flush()

    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    # Twisted's legacy log.msg() chatter ("Starting factory", "Port closed")
    # says nothing an admin needs at info; its errors still come through.
    predicate.setLogLevelForNamespace("log_legacy", max(LEVELS[level], LogLevel.warn))
    return FilteringLogObserver(cast(ILogObserver, write), [predicate])
