"""Logging: escaping client text, the two line formats, and level filtering."""

from __future__ import annotations

import io
import json
import re
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.logger._legacy import publishToNewObserver
from twisted.python.failure import Failure
from twisted.python.log import textFromEventDict

from policyd.logs import escape, format_json, format_text, make_observer
from policyd.request import decode

# 2023-11-14T22:13:20.250Z
WHEN = 1_700_000_000.25
WHEN_TEXT = "2023-11-14T22:13:20.250Z"

_ESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8})|(.))", re.S)
_NAMED = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""Read `escape`'s output back: the inverse that makes it unambiguous.

    ``\xNN`` below 0x80 is that ASCII character; from 0x80 it is the
    undecodable byte NN, which `policyd.request.decode` keeps as U+DCNN.
    """

    def one(match: re.Match[str]) -> str:
        byte, bmp, astral, named = match.groups()
        if byte is not None:
            code = int(byte, 16)
            return chr(code if code < 0x80 else 0xDC00 + code)
        if bmp is not None:
            return chr(int(bmp, 16))
        if astral is not None:
            return chr(int(astral, 16))
        return _NAMED[named]

    return _ESCAPE.sub(one, text)


def _event(fmt: str, **fields: Any) -> LogEvent:
    """A new-style event as `Logger` would emit it, at a fixed time."""
    event: LogEvent = {
        "log_format": fmt,
        "log_level": LogLevel.info,
        "log_namespace": "policyd.test",
        "log_time": WHEN,
    }
    event.update(fields)
    return event


def _capture() -> tuple[Logger, list[LogEvent]]:
    """A Logger whose events land in a list."""
    events: list[LogEvent] = []
    return Logger(
        namespace="policyd.test", observer=cast(ILogObserver, events.append)
    ), events


# Any text: arbitrary code points (surrogates included), client bytes decoded
# with surrogateescape, and text dense in the characters that need escaping.
_HOSTILE = st.one_of(
    st.text(st.characters(exclude_categories=[])),
    st.binary().map(decode),
    st.text(
        st.one_of(
            st.sampled_from(
                [
                    *["\n", "\r", "\t", "\x1b", "\x00", "\\", "\x7f", "\x85"],
                    *["\x9b", "\u2028", "\u2029", "\u202e", "\udcff", "\udc80"],
                    *["\ud800", "x", "0", "1", "a", "f", "u", "U", "é", "中"],
                    *["\U000e0001", "\ue000"],
                ]
            ),
            st.characters(max_codepoint=0x2FF),
        )
    ),
)


class TestEscape:
    """`escape` makes client text safe for one log line."""

    @pytest.mark.parametrize(
        ("raw", "escaped"),
        [
            ("mail.example.com", "mail.example.com"),
            ("", ""),
            ("a b", "a b"),
            ("evil\r\nforged line", "evil\\r\\nforged line"),
            ("\n", "\\n"),
            ("\r", "\\r"),
            ("\t", "\\t"),
            ("\x1b[31mred", "\\x1b[31mred"),
            ("\x00", "\\x00"),
            ("\x07", "\\x07"),
            ("\x0b\x0c", "\\x0b\\x0c"),
            ("\\", "\\\\"),
            ("a\\nb", "a\\\\nb"),  # a literal backslash-n is not a newline
            ("\x7f", "\\x7f"),
            ("\x85", "\\u0085"),  # C1 NEL, a line break to str.splitlines
            ("\x9b", "\\u009b"),  # C1 CSI, a terminal escape
            ("\xa0", "\\u00a0"),  # no-break space
            ("\u2028", "\\u2028"),
            ("\u2029", "\\u2029"),
            ("\u202e", "\\u202e"),  # right-to-left override
            ("\u200b", "\\u200b"),  # zero-width space
            ("\U000e0001", "\\U000e0001"),
            ("\ud800", "\\ud800"),  # a lone surrogate not from surrogateescape
            ("é", "é"),
            ("中文.example", "中文.example"),
            ("δοκιμή", "δοκιμή"),
            ("😀", "😀"),
        ],
    )
    def test_examples(self, raw: str, escaped: str) -> None:
        """Controls, separators and backslash become escapes; printable stays."""
        assert escape(raw) == escaped

    @pytest.mark.parametrize(
        ("raw", "escaped"),
        [
            (b"\xff", "\\xff"),
            (b"\x80", "\\x80"),
            (b"caf\xe9", "caf\\xe9"),  # Latin-1, not UTF-8
            (b"\xc3", "\\xc3"),  # truncated UTF-8
            ("café".encode(), "café"),  # valid UTF-8 is kept
        ],
    )
    def test_undecodable_bytes(self, raw: bytes, escaped: str) -> None:
        r"""Bytes that were not UTF-8 (surrogateescape) show as ``\xNN``."""
        assert escape(decode(raw)) == escaped

    def test_byte_and_character_differ(self) -> None:
        """Undecodable byte 0x85 and the character U+0085 log differently."""
        assert escape(decode(b"\x85")) != escape("\x85")

    @given(_HOSTILE)
    def test_safe_for_one_line(self, text: str) -> None:
        """The result is all printable, has no line break, and encodes as UTF-8."""
        escaped = escape(text)
        assert escaped.isprintable()
        assert len(escaped.splitlines()) <= 1
        escaped.encode("utf-8")  # no lone surrogates left

    @given(_HOSTILE)
    def test_unambiguous(self, text: str) -> None:
        """The escaped text reads back to exactly the original."""
        assert unescape(escape(text)) == text

    @given(st.text(st.characters(categories=["L", "M", "N", "P", "S"])))
    def test_printable_unchanged(self, text: str) -> None:
        """Printable text without backslashes is returned as it is."""
        if "\\" not in text:
            assert escape(text) == text


class TestFormatJson:
    """`format_json`: one JSON object per line."""

    def test_record(self) -> None:
        """time, level, namespace, message, event and the event's own fields."""
        line = format_json(
            _event(
                "Decision {action} for {client}",
                event="decision",
                action="DUNNO",
                client="192.0.2.1",
                score=0.5,
                reasons=["pool_full", "unknown_client"],
            )
        )
        assert line.endswith("\n")
        assert line.count("\n") == 1
        assert json.loads(line) == {
            "time": WHEN_TEXT,
            "level": "info",
            "namespace": "policyd.test",
            "message": "Decision DUNNO for 192.0.2.1",
            "event": "decision",
            "action": "DUNNO",
            "client": "192.0.2.1",
            "score": 0.5,
            "reasons": ["pool_full", "unknown_client"],
        }

    def test_from_logger(self) -> None:
        """A real Logger event has no log_* keys in the record."""
        log, events = _capture()
        log.warn("Closing {connection}", event="protocol_error", connection=7)
        record = json.loads(format_json(events[0]))
        assert record["level"] == "warn"
        assert record["namespace"] == "policyd.test"
        assert record["message"] == "Closing 7"
        assert record["event"] == "protocol_error"
        assert record["connection"] == 7
        assert not [key for key in record if key.startswith("log_")]

    def test_event_defaults_to_log(self) -> None:
        """An event without an ``event`` field is marked ``"event": "log"``."""
        assert json.loads(format_json(_event("hello")))["event"] == "log"

    @pytest.mark.parametrize("key", ["level", "namespace", "traceback"])
    def test_fields_do_not_replace_record_keys(self, key: str) -> None:
        """A field named like a record key (a decision's level) is kept beside it."""
        record = json.loads(format_json(_event("x", **{key: "field value"})))
        assert record[f"{key}_"] == "field value"
        assert record.get(key) != "field value"
        assert record["level"] == "info"

    def test_newlines_stay_on_one_line(self) -> None:
        """A raw newline in a field or the message is JSON-escaped."""
        line = format_json(_event("a\nb {text}", text="c\r\nd"))
        assert line.count("\n") == 1
        record = json.loads(line)
        assert record["message"] == "a\nb c\r\nd"
        assert record["text"] == "c\r\nd"

    def test_unserialisable_value(self) -> None:
        """A value JSON cannot encode is written as its str()."""

        class Peer:
            def __str__(self) -> str:
                return "IPv4Address(TCP, '192.0.2.1', 5000)"

        record = json.loads(format_json(_event("x", peer=Peer(), raw=b"\x00")))
        assert record["peer"] == "IPv4Address(TCP, '192.0.2.1', 5000)"
        assert record["raw"] == "b'\\x00'"

    def test_failure_has_traceback(self) -> None:
        """``log.failure`` adds the traceback, still on one line."""
        log, events = _capture()
        try:
            1 / 0  # noqa: B018 - the point is the exception
        except ZeroDivisionError:
            log.failure("Decision failed for {client}", client="x", event="boom")
        line = format_json(events[0])
        assert line.count("\n") == 1
        record = json.loads(line)
        assert record["level"] == "critical"
        assert record["message"] == "Decision failed for x"
        assert record["event"] == "boom"
        assert "ZeroDivisionError" in record["traceback"]
        assert "Traceback" in record["traceback"]

    def test_legacy_event(self) -> None:
        """Events from twisted.python.log keep only their text, not its internals."""
        events: list[LogEvent] = []
        publishToNewObserver(
            cast(ILogObserver, events.append),
            {"message": ("Port closed",), "isError": 0, "system": "-", "time": WHEN},
            textFromEventDict,
        )
        record = json.loads(format_json(events[0]))
        assert record == {
            "time": WHEN_TEXT,
            "level": "info",
            "namespace": "log_legacy",
            "message": "Port closed",
            "event": "log",
        }


class TestFormatText:
    """`format_text`: one human-readable line per event."""

    def test_line(self) -> None:
        """Time, level, namespace in brackets, then the formatted message."""
        assert format_text(_event("hello {name}", name="world")) == (
            f"{WHEN_TEXT} info [policyd.test] hello world\n"
        )

    @pytest.mark.parametrize(
        "level", [LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error]
    )
    def test_level_name(self, level: LogLevel) -> None:
        """The level is written by its twisted.logger name."""
        line = format_text(_event("x", log_level=level))
        assert line.split(" ")[1] == level.name

    def test_escaped_client_text_one_line(self) -> None:
        """A hostile client value, once escaped, cannot start a new line."""
        line = format_text(
            _event("HELO {helo}", helo=escape("x\r\n2023-01-01T00:00:00Z info forged"))
        )
        assert line.count("\n") == 1
        assert line.endswith("\n")

    def test_failure_traceback_follows(self) -> None:
        """``log.failure``: the message line, then the traceback."""
        log, events = _capture()
        try:
            raise ValueError("bad")
        except ValueError:
            log.failure("It broke")
        first, rest = format_text(events[0]).split("\n", 1)
        assert first.endswith("critical [policyd.test] It broke")
        assert "ValueError: bad" in rest


class _Named:
    """A value with an attribute and a custom format, for format fields."""

    size = 3

    def __format__(self, spec: str) -> str:
        return f"<{spec}>"

    def __repr__(self) -> str:
        return "Named()"


# Formats the way policyd and Twisted write them, and the ones only Twisted's
# own formatter handles.
_FORMATS = [
    "{what} {client} ({name}, helo {helo}) at {level}: {score}",
    "{name!r} {score:>5} {ratio:.2f} {ratio!s:>8}",
    "{{literal}} {name}",
    "{obj.size} {obj:spec} {obj!r}",
    "{items[0]} {name}",
    "{missing} {name}",
    "{call()} and {name}",
    "{0} {name}",
    "unclosed {name",
    "{name!x}",
    "",
]


class TestMessage:
    """Lines are formatted with str.format_map where Twisted's formatEvent agrees."""

    @given(
        fmt=st.sampled_from(_FORMATS),
        name=st.text(max_size=8),
        score=st.integers(),
        ratio=st.floats(allow_nan=False),
    )
    def test_same_text_as_twisted(
        self, fmt: str, name: str, score: int, ratio: float
    ) -> None:
        """Every format reads as twisted.logger.formatEvent writes it.

        Plain fields, conversions, specs, attributes, items, missing fields,
        Twisted's calls and broken formats alike.
        """
        event = _event(
            fmt,
            what="Refused",
            client="192.0.2.1",
            name=name,
            helo="x",
            level="overload",
            score=score,
            ratio=ratio,
            obj=_Named(),
            items=["first"],
            call=lambda: "called",
        )
        assert format_text(event) == (
            f"{WHEN_TEXT} info [policyd.test] {formatEvent(event)}\n"
        )

    def test_no_format(self) -> None:
        """An event without a format (a legacy one) still gets Twisted's text."""
        event = _event("x")
        del event["log_format"]
        assert format_text(event).endswith(f" {formatEvent(event)}\n")


class TestMakeObserver:
    """`make_observer`: level filtering and Twisted's legacy chatter."""

    @pytest.mark.parametrize(
        ("level", "shown"),
        [
            ("debug", ["debug", "info", "warn", "error", "critical"]),
            ("info", ["info", "warn", "error", "critical"]),
            ("warn", ["warn", "error", "critical"]),
            ("error", ["error", "critical"]),
        ],
    )
    @pytest.mark.parametrize("fmt", ["text", "json"])
    def test_filters_by_level(self, level: str, shown: list[str], fmt: str) -> None:
        """Only events at the configured level or above are written."""
        stream = io.StringIO()
        log = Logger(
            namespace="policyd.test", observer=make_observer(level, fmt, stream)
        )
        for name in ("debug", "info", "warn", "error", "critical"):
            getattr(log, name)("message at " + name)
        lines = stream.getvalue().splitlines()
        if fmt == "json":
            records = [json.loads(line) for line in lines]
            written = [(r["level"], r["message"]) for r in records]
        else:
            written = [(line.split(" ")[1], line.split("] ")[1]) for line in lines]
        assert written == [(name, "message at " + name) for name in shown]

    @pytest.mark.parametrize("level", ["debug", "info", "warn", "error"])
    def test_hides_legacy_info(self, level: str) -> None:
        """twisted.python.log info messages are hidden even at debug."""
        stream = io.StringIO()
        observer = make_observer(level, "text", stream)
        publishToNewObserver(
            observer,
            {"message": ("Starting factory",), "isError": 0, "system": "-", "time": 0},
            textFromEventDict,
        )
        assert stream.getvalue() == ""

    @pytest.mark.parametrize("level", ["debug", "info", "warn", "error"])
    def test_shows_legacy_errors(self, level: str) -> None:
        """twisted.python.log errors (log.err) still come through."""
        stream = io.StringIO()
        observer = make_observer(level, "json", stream)
        publishToNewObserver(
            observer,
            {
                "message": (),
                "isError": 1,
                "failure": Failure(RuntimeError("unhandled")),
                "why": "Unhandled error",
                "system": "-",
                "time": 0,
            },
            textFromEventDict,
        )
        record = json.loads(stream.getvalue())
        assert record["level"] == "critical"
        assert record["namespace"] == "log_legacy"
        assert "Unhandled error" in record["message"]

    def test_flushes(self) -> None:
        """Each event is flushed, so a pipe reader sees it at once."""

        class Stream(io.StringIO):
            flushes = 0

            def flush(self) -> None:
                self.flushes += 1
                super().flush()

        stream = Stream()
        log = Logger(namespace="t", observer=make_observer("info", "text", stream))
        log.info("one")
        log.info("two")
        assert stream.flushes == 2
