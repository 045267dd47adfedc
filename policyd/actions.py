"""Reply actions: validated once, encoded once, labelled for metrics.

Postfix evaluates the ``action=`` value as an access(5) table result, and some
values are traps (reference §1.5): an empty action or a bare number means OK
(permit), an unknown word is a configuration error that answers ``451 4.3.5``
for all mail, and a CR or LF breaks the framing.  Every action policyd sends
goes through `Action.parse`, so none of those can reach the wire.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

# access(5) keywords that may start an action.  OK and RELAY are left out on
# purpose: a policy server placed before relay control would open a relay.
KEYWORDS: Final = frozenset(
    {
        "DUNNO",
        "REJECT",
        "DEFER",
        "DEFER_IF_REJECT",
        "DEFER_IF_PERMIT",
        "WARN",
        "INFO",
        "PREPEND",
        "HOLD",
        "DISCARD",
        "FILTER",
        "REDIRECT",
        "BCC",
    }
)

# Keywords that are safe when policyd itself fails: they never lose mail.
FALLBACK_KEYWORDS: Final = frozenset(
    {"DUNNO", "DEFER", "DEFER_IF_REJECT", "DEFER_IF_PERMIT", "WARN", "INFO"}
)

# Postfix cuts the SMTP reply at 510 characters after prefixing
# "<code> <dsn> <address>: Recipient address rejected: "; stay well inside.
MAX_ACTION_LENGTH: Final = 400

_CODE = re.compile(r"[45][0-9][0-9]\Z")
_PRINTABLE = re.compile(r"[\x20-\x7e]+\Z")


class InvalidAction(ValueError):
    """An action that Postfix would misread; the message says why."""


@attrs.frozen(slots=True)
class Action:
    """One reply action, e.g. ``DUNNO`` or ``450 4.7.1 Try again later``.

    *wire* is the complete reply (``action=...`` and the empty line) so the
    protocol answers with a single write of precomputed bytes; *label* is the
    bounded value used for the ``action`` metric label: the keyword, or the
    three-digit SMTP code.
    """

    text: str
    label: str
    wire: bytes = attrs.field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Action:
        """Validate *text* as a reply action, or raise `InvalidAction`.

        Accepted: an access(5) keyword (optionally followed by text), or a
        4xx/5xx code followed by text.  Refused: empty, a bare number, OK or
        RELAY, anything that is not printable ASCII, and anything longer than
        `MAX_ACTION_LENGTH`.
        """
        if not text or text != text.strip():
            raise InvalidAction(
                "an action must be non-empty, without leading or trailing spaces"
            )
        if len(text) > MAX_ACTION_LENGTH:
            raise InvalidAction(
                f"an action must be at most {MAX_ACTION_LENGTH} characters"
            )
        if not _PRINTABLE.match(text):
            raise InvalidAction(
                "an action must be printable ASCII (no CR, LF, tabs or 8-bit bytes)"
            )
        first, _, rest = text.partition(" ")
        keyword = first.upper()
        if _CODE.match(first):
            if not rest.strip():
                raise InvalidAction(
                    "a 4xx/5xx code must be followed by text: Postfix reads a "
                    "bare number as OK"
                )
            label = first
        elif keyword in KEYWORDS:
            label = keyword
        else:
            raise InvalidAction(
                "an action must start with a 4xx/5xx code or one of "
                + ", ".join(sorted(KEYWORDS))
            )
        return cls(
            text=text, label=label, wire=b"action=" + text.encode("ascii") + b"\n\n"
        )

    @classmethod
    def parse_fallback(cls, text: str) -> Action:
        """Validate an action used when policyd itself fails.

        Failing must never lose mail, so only actions that pass or defer are
        accepted: DUNNO, DEFER, DEFER_IF_PERMIT, DEFER_IF_REJECT, WARN, INFO,
        or a 4xx code with text.
        """
        action = cls.parse(text)
        if action.label not in FALLBACK_KEYWORDS and not action.label.startswith("4"):
            raise InvalidAction(
                "a fallback action must not refuse mail for good: use DUNNO, "
                "DEFER, DEFER_IF_PERMIT, DEFER_IF_REJECT, WARN, INFO or a 4xx "
                "code with text"
            )
        return action


DUNNO: Final = Action.parse("DUNNO")
