"""Reply actions: what may reach the wire, and how it is encoded and labelled."""

from __future__ import annotations

import re

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.actions import (
    DUNNO,
    FALLBACK_KEYWORDS,
    KEYWORDS,
    MAX_ACTION_LENGTH,
    Action,
    InvalidAction,
)

# Printable ASCII plus the characters that break framing or Postfix's parser.
_NASTY = st.lists(
    st.sampled_from(
        [chr(c) for c in range(0x20, 0x7F)]
        + ["\r", "\n", "\t", "\x00", "\x7f", "\x85", "é", "\u2028", " "]
        + ["DUNNO", "REJECT", "450", "550", "OK", "DEFER_IF_PERMIT", "x" * 200]
    ),
    max_size=40,
).map("".join)
# Mostly well-formed: a keyword or code, a separator, then arbitrary text.
_HEADS = [*sorted(KEYWORDS), "dunno", "OK", "RELAY", "450", "550", "421", "4501", "5"]
_CANDIDATES = st.one_of(
    _NASTY,
    st.builds(
        lambda head, sep, tail: head + sep + tail,
        st.sampled_from(_HEADS),
        st.sampled_from(["", " ", "  ", "\t"]),
        st.text(
            alphabet=st.sampled_from(
                [chr(c) for c in range(0x20, 0x7F)] + ["\r", "\n", "\x00", "é"]
            ),
            max_size=MAX_ACTION_LENGTH + 10,
        ),
    ),
)


class TestParseAccepts:
    """What `Action.parse` lets through, and how it labels it."""

    @pytest.mark.parametrize(
        ("text", "label"),
        [
            ("DUNNO", "DUNNO"),
            ("dunno", "DUNNO"),
            ("Dunno", "DUNNO"),
            ("DUNNO ignored text", "DUNNO"),
            ("REJECT", "REJECT"),
            ("reject Go away", "REJECT"),
            ("DEFER", "DEFER"),
            ("DEFER_IF_PERMIT Service temporarily unavailable", "DEFER_IF_PERMIT"),
            ("defer_if_reject try later", "DEFER_IF_REJECT"),
            ("WARN", "WARN"),
            ("INFO shadow mode", "INFO"),
            ("PREPEND X-Policyd: stressed", "PREPEND"),
            ("HOLD", "HOLD"),
            ("DISCARD", "DISCARD"),
            ("FILTER smtp:[127.0.0.1]:10025", "FILTER"),
            ("REDIRECT postmaster@example.org", "REDIRECT"),
            ("BCC audit@example.org", "BCC"),
            ("450 4.7.1 Try again later", "450"),
            ("421 4.7.0 Server busy, closing", "421"),
            ("521 5.7.1 Go away", "521"),
            ("550 x", "550"),
            ("499 text", "499"),
            ("400 text", "400"),
            ("599 text", "599"),
        ],
    )
    def test_label(self, text: str, label: str) -> None:
        """Keywords (any case) label as the upper-case keyword, codes as the code."""
        action = Action.parse(text)
        assert action.label == label
        assert action.text == text

    @pytest.mark.parametrize("keyword", sorted(KEYWORDS))
    def test_every_keyword(self, keyword: str) -> None:
        """Every access(5) keyword in KEYWORDS parses, bare and with text."""
        assert Action.parse(keyword).label == keyword
        assert Action.parse(keyword.lower() + " some text").label == keyword

    def test_longest(self) -> None:
        """An action of exactly MAX_ACTION_LENGTH characters is accepted."""
        text = "450 " + "x" * (MAX_ACTION_LENGTH - 4)
        assert len(text) == MAX_ACTION_LENGTH
        assert Action.parse(text).text == text


class TestParseRejects:
    """What `Action.parse` refuses (reference §1.5: the dangerous replies)."""

    @pytest.mark.parametrize(
        "text",
        [
            pytest.param("", id="empty-means-OK"),
            pytest.param(" ", id="blank"),
            pytest.param(" DUNNO", id="leading-space"),
            pytest.param("DUNNO ", id="trailing-space"),
            pytest.param("\tDUNNO", id="leading-tab"),
            pytest.param("550", id="bare-number-means-OK"),
            pytest.param("450", id="bare-4xx"),
            pytest.param("12345", id="all-digits"),
            pytest.param("450 ", id="code-trailing-space"),
            pytest.param("OK", id="OK-opens-relay"),
            pytest.param("ok", id="ok-lower"),
            pytest.param("OK fine", id="OK-text"),
            pytest.param("RELAY", id="RELAY"),
            pytest.param("permit", id="restriction-name"),
            pytest.param("blah", id="unknown-word"),
            pytest.param("HANGUP", id="hangup-test-feature"),
            pytest.param("DUNNOX", id="keyword-prefix"),
            pytest.param("350 text", id="3xx"),
            pytest.param("650 text", id="6xx"),
            pytest.param("4501 text", id="four-digit-code"),
            pytest.param("450text", id="code-glued-to-text"),
            pytest.param("5.7.1 text", id="dsn-without-code"),
            pytest.param("DUNNO\n", id="LF"),
            pytest.param("DUNNO\r", id="CR"),
            pytest.param("dunno\r\n", id="CRLF"),
            pytest.param("REJECT a\nb", id="LF-inside"),
            pytest.param("REJECT a\rb", id="CR-inside"),
            pytest.param("REJECT a\tb", id="tab-inside"),
            pytest.param("REJECT a\x00b", id="NUL"),
            pytest.param("REJECT a\x7fb", id="DEL"),
            pytest.param("REJECT a\x1b[31mb", id="ESC"),
            pytest.param("REJECT café", id="non-ASCII"),
            pytest.param("REJECT \x85", id="C1-control"),
            pytest.param("REJECT \u2028", id="line-separator"),
            pytest.param("REJECT \udcff", id="undecodable-byte"),
            pytest.param(
                "450 " + "x" * (MAX_ACTION_LENGTH - 3), id="one-over-max-length"
            ),
            pytest.param("DUNNO " + "x" * 10_000, id="far-over-max-length"),
        ],
    )
    def test_invalid(self, text: str) -> None:
        """Postfix would misread these (or they break the framing): refused."""
        with pytest.raises(InvalidAction):
            Action.parse(text)

    def test_invalid_action_is_value_error(self) -> None:
        """InvalidAction is a ValueError, so converters can treat it as one."""
        with pytest.raises(ValueError, match="bare number"):
            Action.parse("550")


class TestWire:
    """The bytes sent to Postfix."""

    @pytest.mark.parametrize(
        "text",
        ["DUNNO", "dunno", "DEFER_IF_PERMIT Try later", "450 4.7.1 Try again later"],
    )
    def test_wire(self, text: str) -> None:
        """The wire form is exactly ``action=<text>``, LF, then the empty line."""
        assert Action.parse(text).wire == b"action=" + text.encode("ascii") + b"\n\n"

    def test_dunno_constant(self) -> None:
        """The module's DUNNO is the parsed DUNNO action."""
        assert Action.parse("DUNNO") == DUNNO
        assert DUNNO.wire == b"action=DUNNO\n\n"
        assert DUNNO.label == "DUNNO"

    def test_frozen(self) -> None:
        """An action cannot be changed after parsing (its wire is precomputed)."""
        action = Action.parse("DUNNO")
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            action.text = "OK"  # type: ignore[misc]

    def test_repr_hides_wire(self) -> None:
        """The repr shows the text and label, not the redundant wire bytes."""
        assert "wire" not in repr(Action.parse("DUNNO"))

    @given(_CANDIDATES)
    def test_accepted_never_breaks_framing(self, text: str) -> None:
        """Whatever parses is printable ASCII, one line, and labelled boundedly."""
        try:
            action = Action.parse(text)
        except InvalidAction:
            return
        wire = action.wire
        assert wire.startswith(b"action=")
        assert wire.endswith(b"\n\n")
        assert wire.count(b"\n") == 2
        assert b"\r" not in wire
        assert re.fullmatch(rb"action=[\x20-\x7e]+\n\n", wire)
        assert len(action.text) <= MAX_ACTION_LENGTH
        assert action.text == action.text.strip() != ""
        assert not action.text.isdigit()
        assert action.label in KEYWORDS or re.fullmatch(r"[45][0-9]{2}", action.label)


class TestFallback:
    """`Action.parse_fallback`: an action for when policyd itself fails."""

    @pytest.mark.parametrize(
        "text",
        [
            "DUNNO",
            "dunno",
            "DEFER",
            "DEFER Try later",
            "DEFER_IF_PERMIT Service temporarily unavailable",
            "DEFER_IF_REJECT",
            "WARN policyd failed",
            "INFO",
            "450 4.7.1 Try again later",
            "451 4.3.5 Policy server problem",
            "421 4.7.0 Busy",
        ],
    )
    def test_accepts_pass_or_defer(self, text: str) -> None:
        """Actions that pass mail or defer it are accepted as the fallback."""
        assert Action.parse_fallback(text).text == text

    @pytest.mark.parametrize(
        "text",
        [
            "REJECT",
            "reject Go away",
            "550 x",
            "554 5.7.1 Access denied",
            "521 5.7.1 Go away",
            "DISCARD",
            "HOLD",
            "FILTER smtp:[127.0.0.1]:10025",
            "REDIRECT postmaster@example.org",
            "BCC audit@example.org",
            "PREPEND X-Policyd: failed",
        ],
    )
    def test_refuses_losing_mail(self, text: str) -> None:
        """Anything that refuses, drops or reroutes mail is refused as fallback."""
        with pytest.raises(InvalidAction, match="must not refuse mail"):
            Action.parse_fallback(text)

    @pytest.mark.parametrize("text", ["", "OK", "RELAY", "450", "550", "DUNNO\n"])
    def test_refuses_invalid(self, text: str) -> None:
        """What `Action.parse` refuses is refused as a fallback too."""
        with pytest.raises(InvalidAction):
            Action.parse_fallback(text)

    @given(_CANDIDATES)
    def test_accepted_fallback_never_refuses(self, text: str) -> None:
        """Every accepted fallback is a pass/defer keyword or a 4xx code."""
        try:
            action = Action.parse_fallback(text)
        except InvalidAction:
            return
        assert action.label in FALLBACK_KEYWORDS or re.fullmatch(
            r"4[0-9]{2}", action.label
        )
