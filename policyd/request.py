"""The parsed, immutable form of one Postfix policy request."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType

import attrs

# Postfix sends raw bytes from the SMTP session (SMTPUTF8 names, or garbage
# from a broken client).  Decoding with surrogateescape never fails and keeps
# the original bytes recoverable for logging and comparison.
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"

EXPECTED_REQUEST = "smtpd_access_policy"


def decode(raw: bytes | bytearray) -> str:
    """Decode a raw protocol value without ever failing."""
    return raw.decode(_ENCODING, _ERRORS)


def encode(text: str) -> bytes:
    """Encode a value decoded by `decode` back to its original bytes."""
    return text.encode(_ENCODING, _ERRORS)


class RawAttributes(Mapping[str, str]):
    """
    A request's attributes, decoded only when read.

    The protocol keeps the raw ``bytes -> bytes`` pairs; most requests are
    answered from a handful of fields, so decoding all thirty on every request
    would be wasted work.  Reading it is like reading a ``dict[str, str]``.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: Mapping[bytes, bytes]) -> None:
        self._raw = raw

    def __getitem__(self, name: str) -> str:
        return decode(self._raw[encode(name)])

    def __iter__(self) -> Iterator[str]:
        return map(decode, self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"RawAttributes({dict(self)!r})"


@attrs.frozen(slots=True)
class PolicyRequest:
    """One ``smtpd_access_policy`` request, as Postfix sent it.

    The fields a policy needs are lifted out of the attribute map; everything
    Postfix sent (known or not) stays available in *attributes*.  Missing
    attributes read as the empty string, which is also how current Postfix
    sends unavailable values.
    """

    attributes: Mapping[str, str]
    protocol_state: str
    client_address: str
    client_name: str
    reverse_client_name: str
    helo_name: str
    sender: str
    recipient: str
    instance: str
    sasl_username: str
    stress: bool
    # Which policy connection (so which smtpd process) sent it; 0 if unknown.
    connection: int = 0

    @classmethod
    def from_raw(cls, raw: Mapping[bytes, bytes], connection: int = 0) -> PolicyRequest:
        """
        Build a request from the raw ``name -> value`` pairs of the wire.

        Only the fields a policy reads are decoded now; the rest stay raw in
        *attributes* until somebody reads them (the debug log, say).
        """
        get = raw.get
        empty = b""
        return cls(
            attributes=RawAttributes(raw),
            protocol_state=get(b"protocol_state", empty)
            .decode(_ENCODING, _ERRORS)
            .upper(),
            client_address=get(b"client_address", empty).decode(_ENCODING, _ERRORS),
            client_name=get(b"client_name", empty).decode(_ENCODING, _ERRORS),
            reverse_client_name=get(b"reverse_client_name", empty).decode(
                _ENCODING, _ERRORS
            ),
            helo_name=get(b"helo_name", empty).decode(_ENCODING, _ERRORS),
            sender=get(b"sender", empty).decode(_ENCODING, _ERRORS),
            recipient=get(b"recipient", empty).decode(_ENCODING, _ERRORS),
            instance=get(b"instance", empty).decode(_ENCODING, _ERRORS),
            sasl_username=get(b"sasl_username", empty).decode(_ENCODING, _ERRORS),
            stress=get(b"stress") == b"yes",
            connection=connection,
        )

    @classmethod
    def from_attributes(
        cls, attributes: Mapping[str, str], connection: int = 0
    ) -> PolicyRequest:
        """Build a request from already-decoded ``name -> value`` pairs."""
        get = attributes.get
        return cls(
            attributes=MappingProxyType(dict(attributes)),
            protocol_state=get("protocol_state", "").upper(),
            client_address=get("client_address", ""),
            client_name=get("client_name", ""),
            reverse_client_name=get("reverse_client_name", ""),
            helo_name=get("helo_name", ""),
            sender=get("sender", ""),
            recipient=get("recipient", ""),
            instance=get("instance", ""),
            sasl_username=get("sasl_username", ""),
            stress=get("stress", "") == "yes",
            connection=connection,
        )
