"""PolicyRequest: the parsed request, and the byte-exact value codec."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.request import EXPECTED_REQUEST, PolicyRequest, decode, encode

# What Postfix 3.x sends for one RCPT check (reference §2.1), trimmed.
POSTFIX_RCPT = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "client_address": "192.0.2.10",
    "client_name": "mail.example.com",
    "reverse_client_name": "mail.example.com",
    "helo_name": "mail.example.com",
    "sender": "alice+tag=x@example.com",
    "recipient": "bob@example.org",
    "recipient_count": "0",
    "queue_id": "",
    "instance": "1a2b.65f0c1d2.3e4f5.0",
    "size": "0",
    "sasl_method": "",
    "sasl_username": "",
    "stress": "",
    "client_port": "52114",
    "mail_version": "3.7.11",
}

LIFTED = (
    "protocol_state",
    "client_address",
    "client_name",
    "reverse_client_name",
    "helo_name",
    "sender",
    "recipient",
    "instance",
    "sasl_username",
)


class TestFromAttributes:
    """`PolicyRequest.from_attributes` lifts the fields a policy needs."""

    def test_expected_request_type(self) -> None:
        """The only request type Postfix sends is smtpd_access_policy."""
        assert EXPECTED_REQUEST == "smtpd_access_policy"

    def test_lifts_fields(self) -> None:
        """Each lifted field equals the attribute of the same name."""
        request = PolicyRequest.from_attributes(POSTFIX_RCPT)
        for name in LIFTED:
            assert getattr(request, name) == POSTFIX_RCPT[name], name
        assert request.stress is False

    def test_keeps_every_attribute(self) -> None:
        """All attributes, known or not, stay available in ``attributes``."""
        attributes = {**POSTFIX_RCPT, "tls_sni": "mx.example.org", "x_future": "1"}
        request = PolicyRequest.from_attributes(attributes)
        assert dict(request.attributes) == attributes

    def test_missing_is_empty(self) -> None:
        """A missing attribute reads as the empty string (as Postfix sends it)."""
        request = PolicyRequest.from_attributes({"request": "smtpd_access_policy"})
        for name in LIFTED:
            assert getattr(request, name) == "", name
        assert request.stress is False

    @pytest.mark.parametrize(
        ("attributes", "stress"),
        [
            ({"stress": "yes"}, True),
            ({"stress": ""}, False),
            ({}, False),
            ({"stress": "no"}, False),
        ],
    )
    def test_stress(self, attributes: dict[str, str], stress: bool) -> None:
        """``stress=yes`` is True; empty or absent (pre-2.5 Postfix) is False."""
        assert PolicyRequest.from_attributes(attributes).stress is stress

    @pytest.mark.parametrize(
        ("sent", "state"),
        [
            ("RCPT", "RCPT"),
            ("rcpt", "RCPT"),
            ("End-of-Message", "END-OF-MESSAGE"),
            ("", ""),
        ],
    )
    def test_protocol_state_upper(self, sent: str, state: str) -> None:
        """protocol_state is upper-cased so comparisons need no case folding."""
        request = PolicyRequest.from_attributes({"protocol_state": sent})
        assert request.protocol_state == state

    def test_values_kept_verbatim(self) -> None:
        """Values other than protocol_state are not trimmed or case-folded."""
        request = PolicyRequest.from_attributes(
            {"helo_name": " MiXeD.Example ", "sender": "SRS0=ab=cd=example.com=x@y"}
        )
        assert request.helo_name == " MiXeD.Example "
        assert request.sender == "SRS0=ab=cd=example.com=x@y"

    def test_attributes_immutable(self) -> None:
        """``attributes`` cannot be changed through the request."""
        request = PolicyRequest.from_attributes(POSTFIX_RCPT)
        mapping: Any = request.attributes
        with pytest.raises(TypeError):
            mapping["client_address"] = "203.0.113.1"
        with pytest.raises(TypeError):
            del mapping["client_address"]

    def test_attributes_copied(self) -> None:
        """Changing the caller's dict later does not change the request."""
        attributes = dict(POSTFIX_RCPT)
        request = PolicyRequest.from_attributes(attributes)
        attributes["client_address"] = "203.0.113.1"
        attributes["new"] = "x"
        assert request.attributes["client_address"] == "192.0.2.10"
        assert "new" not in request.attributes

    @pytest.mark.parametrize("name", ["client_address", "helo_name", "raw"])
    def test_frozen(self, name: str) -> None:
        """The request's fields, decoded now or when read, cannot be reassigned."""
        request = PolicyRequest.from_attributes(POSTFIX_RCPT)
        with pytest.raises(AttributeError):
            setattr(request, name, "203.0.113.1")
        assert getattr(request, name) != "203.0.113.1"

    @given(st.dictionaries(st.text(), st.text()))
    def test_any_attributes(self, attributes: dict[str, str]) -> None:
        """Any name/value map builds a request whose attributes equal it."""
        request = PolicyRequest.from_attributes(attributes)
        assert dict(request.attributes) == attributes
        assert request.client_address == attributes.get("client_address", "")
        assert request.stress is (attributes.get("stress") == "yes")


class TestCodec:
    """`decode` never fails and `encode` gives back the bytes Postfix sent."""

    @given(st.binary())
    def test_round_trip_bytes(self, raw: bytes) -> None:
        """encode(decode(b)) == b for any bytes, valid UTF-8 or not."""
        text = decode(raw)
        assert isinstance(text, str)
        assert encode(text) == raw

    @given(st.binary())
    def test_round_trip_bytearray(self, raw: bytes) -> None:
        """A bytearray (the protocol's buffer) decodes as well."""
        assert encode(decode(bytearray(raw))) == raw

    @given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
    def test_utf8_is_plain_text(self, text: str) -> None:
        """Valid UTF-8 decodes to the same text Python would give."""
        assert decode(text.encode("utf-8")) == text
        assert encode(text) == text.encode("utf-8")

    @pytest.mark.parametrize(
        ("raw", "text"),
        [
            (b"", ""),
            (b"example.com", "example.com"),
            ("δοκιμή.example".encode(), "δοκιμή.example"),
            (b"\xff", "\udcff"),
            (b"a\x80b", "a\udc80b"),
            (b"\xc3", "\udcc3"),  # a truncated two-byte sequence
        ],
    )
    def test_decode_examples(self, raw: bytes, text: str) -> None:
        """Invalid bytes become lone surrogates U+DC80..U+DCFF (surrogateescape)."""
        assert decode(raw) == text
        assert encode(text) == raw


class TestFromRaw:
    """`PolicyRequest.from_raw`: the wire's bytes, decoded only when read."""

    RAW: ClassVar[dict[bytes, bytes]] = {
        b"request": b"smtpd_access_policy",
        b"protocol_state": b"rcpt",
        b"client_address": b"192.0.2.1",
        b"helo_name": b"caf\xc3\xa9.example",
        b"sender": b"bounce+x=example.org@example.net",
        b"stress": b"yes",
        b"x_unknown": b"\xff\xfe",
    }

    def test_same_fields_as_from_attributes(self) -> None:
        """from_raw lifts the same fields, decoded the same way, as from_attributes."""
        decoded = {decode(k): decode(v) for k, v in self.RAW.items()}
        raw = PolicyRequest.from_raw(self.RAW, 7)
        text = PolicyRequest.from_attributes(decoded, 7)
        for name in (*PolicyRequest._fields, *LIFTED):
            assert getattr(raw, name) == getattr(text, name), name
        assert dict(raw.attributes) == dict(text.attributes)

    def test_attributes_read_like_a_dict(self) -> None:
        """The lazy attributes support get, in, len, iteration and items."""
        attributes = PolicyRequest.from_raw(self.RAW).attributes
        assert attributes["sender"] == "bounce+x=example.org@example.net"
        assert attributes.get("missing", "-") == "-"
        assert "helo_name" in attributes
        assert "missing" not in attributes
        assert len(attributes) == len(self.RAW)
        assert sorted(attributes) == sorted(decode(k) for k in self.RAW)
        assert encode(attributes["x_unknown"]) == b"\xff\xfe"

    def test_missing_fields_are_empty(self) -> None:
        """Fields Postfix did not send read as empty strings, stress as False."""
        request = PolicyRequest.from_raw({b"request": b"smtpd_access_policy"})
        assert (request.client_address, request.instance, request.stress) == (
            "",
            "",
            False,
        )


# Names that matter (the fields a request lifts, and what scoring reads),
# short ones that collide as prefixes, and odd bytes.
_NAMES = st.one_of(
    st.sampled_from(
        [
            b"request",
            b"client_address",
            b"instance",
            b"protocol_state",
            b"stress",
            b"client_name",
            b"helo_name",
            b"policy_context",
            b"x",
            b"client",
            b"xclient_address",
        ]
    ),
    st.binary(min_size=1, max_size=4).filter(
        lambda b: b"=" not in b and b"\n" not in b
    ),
)
_VALUES = st.one_of(
    st.sampled_from([b"", b"yes", b"RCPT", b"rcpt", b"192.0.2.1", b"a=b", b"="]),
    st.binary(max_size=6).filter(lambda b: b"\n" not in b),
    # a value that looks like a line of its own, after the first "="
    st.sampled_from([b"client_address=10.0.0.1", b"x\x00stress=yes"]),
)


class TestFromBlock:
    """`PolicyRequest.from_block`: fields found in the lines, not split out."""

    @given(st.lists(st.tuples(_NAMES, _VALUES), min_size=1, max_size=12))
    def test_reads_like_a_dict_of_the_lines(
        self, pairs: list[tuple[bytes, bytes]]
    ) -> None:
        """Every field, get and the whole mapping read as a line-by-line dict does.

        Names sent twice (the last line wins), names that are prefixes of
        others or hide in values, missing fields, any bytes.
        """
        block = b"\n".join(name + b"=" + value for name, value in pairs)
        lines = dict(pairs)
        fast = PolicyRequest.from_block(block, 3)
        plain = PolicyRequest.from_raw(lines, 3)
        for name in (*PolicyRequest._fields[1:], *LIFTED):
            assert getattr(fast, name) == getattr(plain, name), name
        for key in {*lines, b"missing", b"request", b"client"}:
            assert fast.raw.get(key) == lines.get(key), key
            assert fast.raw.get(key, b"-") == lines.get(key, b"-"), key
        assert dict(fast.raw) == lines
        assert len(fast.raw) == len(lines)
        # Once split, the same answers.
        for key in lines:
            assert fast.raw[key] == lines[key]
