"""The parsed, immutable form of one Postfix policy request."""

from __future__ import annotations

from collections.abc import Mapping
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
