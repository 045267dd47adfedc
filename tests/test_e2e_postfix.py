"""
End-to-end tests: a real, private Postfix instance asking a real policyd.

Each test gets a fresh policyd and fresh smtpd processes (the `postfix_bed`
fixture reloads the module's instance onto the new policyd), so the request
events and connection counts a test sees are its own.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

import pytest

from policyd.testing.bed import Bed, running_bed
from policyd.testing.postfix import PostfixConfig, PostfixTools
from policyd.testing.smtp import RELAY_DOMAIN, ehlo_features

pytestmark = pytest.mark.postfix

#: Postfix's complaints when the policy conversation goes wrong (§1.5, §1.6).
POLICY_TROUBLE = re.compile(
    r"problem talking to server|Server configuration problem"
    r"|premature end-of-input|missing attribute action|while reading input attribute"
)


def _by_instance(events: list[dict[str, object]]) -> dict[str, list[dict[str, str]]]:
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for event in events:
        attributes = event["attributes"]
        assert isinstance(attributes, dict)
        groups[attributes["instance"]].append(attributes)
    return groups


def test_smtp_source_one_request_per_recipient(postfix_bed: Bed) -> None:
    """
    Every RCPT of every message becomes one policy request with the envelope.

    smtp-source sends N messages with R recipients each; policyd sees N x R
    ``smtpd_access_policy`` requests at ``protocol_state=RCPT`` (the default
    ``smtpd_delay_reject=yes``), with the sender and each recipient, and an
    ``instance`` shared by exactly the R requests of one transaction.  All
    messages are accepted (policyd answers DUNNO) and delivered to discard.
    """
    messages, recipients = 4, 3
    result = postfix_bed.postfix.smtp_source(
        sessions=2,
        messages=messages,
        recipients=recipients,
        sender="sender@example.org",
        recipient=f"rcpt@{RELAY_DOMAIN}",
        number_recipients=True,
        keep_open=True,
    )
    result.check()  # without -A, any non-2xx reply would make this fail
    requests = postfix_bed.policyd.wait_for_requests(messages * recipients)
    assert len(requests) == messages * recipients
    for event in requests:
        attributes = event["attributes"]
        assert attributes["request"] == "smtpd_access_policy"
        assert attributes["protocol_state"] == "RCPT"
        assert attributes["sender"] == "sender@example.org"
        assert attributes["recipient"].endswith(f"rcpt@{RELAY_DOMAIN}")
        assert attributes["instance"]
        assert attributes["client_address"] == "127.0.0.1"
        assert event["action"] == "DUNNO"
    all_recipients = [e["attributes"]["recipient"] for e in requests]
    assert len(set(all_recipients)) == messages * recipients  # -N numbers them
    transactions = _by_instance(requests)
    assert len(transactions) == messages
    for attributes in transactions.values():
        assert len(attributes) == recipients
        # smtpd creates the queue file after the first accepted RCPT (§2.1).
        queue_ids = {a["queue_id"] for a in attributes} - {""}
        assert len(queue_ids) == 1
    delivered = postfix_bed.postfix.maillog.wait_for(
        r"postfix/discard\[\d+\]: \w+: to=<.*status=sent",
        since=postfix_bed.log_mark,
        count=messages * recipients,
    )
    assert len(delivered) == messages * recipients
    assert postfix_bed.log_lines(r"reject:") == []
    status, _ = postfix_bed.policyd.healthz()
    assert status == 200


def test_xclient_identity_reaches_policyd(postfix_bed: Bed) -> None:
    """
    A client identity presented with XCLIENT is what policyd is told.

    ADDR, NAME and HELO arrive as ``client_address``, ``client_name`` (and,
    with no REVERSE_NAME, ``reverse_client_name``) and ``helo_name``; a NAME
    of ``[UNAVAILABLE]`` becomes ``client_name=unknown`` while REVERSE_NAME
    still fills ``reverse_client_name``.  An EHLO after XCLIENT replaces the
    HELO name.  LOGIN (when this smtpd has SASL support) arrives as
    ``sasl_username`` with ``sasl_method=XCLIENT``.
    """
    postfix = postfix_bed.postfix
    first = postfix.send(
        sender="first@example.org",
        recipients=[f"first@{RELAY_DOMAIN}"],
        xclient={
            "ADDR": "192.0.2.10",
            "NAME": "mail.example.net",
            "HELO": "xclient-helo.example.net",
            "PROTO": "ESMTP",
        },
        ehlo_after_xclient=False,
    )
    assert first.code("XCLIENT") == 220, first
    assert first.accepted, first

    xclient_verbs = ehlo_features(*postfix.address()).get("xclient", "").split()
    has_login = "LOGIN" in xclient_verbs
    identity = {
        "ADDR": "198.51.100.20",
        "NAME": "[UNAVAILABLE]",
        "REVERSE_NAME": "ptr.example.org",
    }
    if has_login:
        identity["LOGIN"] = "alice"
    second = postfix.send(
        sender="second@example.org",
        recipients=[f"second@{RELAY_DOMAIN}"],
        helo="ehlo-after-xclient.example.org",
        xclient=identity,
    )
    assert second.code("XCLIENT") == 220, second
    assert second.accepted, second

    policyd = postfix_bed.policyd
    [one] = policyd.wait_for_requests(1, recipient=f"first@{RELAY_DOMAIN}")
    assert one["attributes"]["client_address"] == "192.0.2.10"
    assert one["attributes"]["client_name"] == "mail.example.net"
    assert one["attributes"]["reverse_client_name"] == "mail.example.net"
    assert one["attributes"]["helo_name"] == "xclient-helo.example.net"
    assert one["attributes"]["protocol_name"] == "ESMTP"

    [two] = policyd.wait_for_requests(1, recipient=f"second@{RELAY_DOMAIN}")
    assert two["attributes"]["client_address"] == "198.51.100.20"
    assert two["attributes"]["client_name"] == "unknown"
    assert two["attributes"]["reverse_client_name"] == "ptr.example.org"
    assert two["attributes"]["helo_name"] == "ehlo-after-xclient.example.org"
    if has_login:
        assert two["attributes"]["sasl_method"] == "XCLIENT"
        assert two["attributes"]["sasl_username"] == "alice"
    postfix.maillog.wait_for(
        r"client=mail\.example\.net\[192\.0\.2\.10\]", since=postfix_bed.log_mark
    )


def test_stress_listener_sets_stress_attribute(postfix_bed: Bed) -> None:
    """
    Requests from the ``-o stress=yes`` listener carry ``stress=yes``.

    The normal listener (loopback-only, so master never stresses it) sends
    ``stress`` empty.  The two are told apart by ``server_port``.
    """
    postfix = postfix_bed.postfix
    stressed = postfix.send("stress", recipients=[f"stressed@{RELAY_DOMAIN}"])
    normal = postfix.send("smtp", recipients=[f"normal@{RELAY_DOMAIN}"])
    assert stressed.accepted, stressed
    assert normal.accepted, normal
    policyd = postfix_bed.policyd
    [hot] = policyd.wait_for_requests(1, recipient=f"stressed@{RELAY_DOMAIN}")
    [cold] = policyd.wait_for_requests(1, recipient=f"normal@{RELAY_DOMAIN}")
    assert hot["attributes"]["stress"] == "yes"
    assert hot["attributes"]["server_port"] == str(postfix.address("stress")[1])
    assert cold["attributes"]["stress"] == ""
    assert cold["attributes"]["server_port"] == str(postfix.address("smtp")[1])


@pytest.mark.parametrize(
    ("sender", "recipient"),
    [
        # VERP: the bounce address encodes the recipient after '+', '=' for '@'.
        ("list-bounces+alice=example.net@lists.example.org", f"verp@{RELAY_DOMAIN}"),
        # SRS: several '=' separators in the local part.
        ("SRS0=HHH=TT=example.com=alice@forwarder.example.org", f"srs@{RELAY_DOMAIN}"),
        # And '=' in the recipient, plus the null sender (sent as empty).
        ("", f"user=tag=x@{RELAY_DOMAIN}"),
    ],
    ids=["verp", "srs", "null-sender"],
)
def test_equals_signs_survive(postfix_bed: Bed, sender: str, recipient: str) -> None:
    """
    Values containing ``=`` arrive intact: the line splits at the first ``=``.

    VERP and SRS senders and a recipient with ``=`` reach policyd unchanged;
    the null sender ``<>`` arrives as an empty ``sender``.
    """
    transcript = postfix_bed.postfix.send(sender=sender, recipients=[recipient])
    assert transcript.accepted, transcript
    [event] = postfix_bed.policyd.wait_for_requests(1, recipient=recipient)
    assert event["attributes"]["sender"] == sender
    assert event["attributes"]["recipient"] == recipient


def test_smtputf8_addresses_arrive_as_text(postfix_bed: Bed) -> None:
    """
    Non-ASCII addresses of an SMTPUTF8 transaction reach policyd unchanged.

    smtpd passes the raw UTF-8 bytes through; policyd decodes them, so the
    logged sender and recipient equal what the client sent.
    """
    sender, recipient = "jösé@exämple.org", f"ünïcode@{RELAY_DOMAIN}"
    transcript = postfix_bed.postfix.send(
        sender=sender, recipients=[recipient], mail_options=["SMTPUTF8"]
    )
    assert transcript.accepted, transcript
    [event] = postfix_bed.policyd.wait_for_requests(1, recipient=recipient)
    assert event["attributes"]["sender"] == sender
    assert event["action"] == "DUNNO"


def test_persistent_policy_connections(postfix_bed: Bed) -> None:
    """
    Postfix reuses one policy connection per smtpd process across sessions.

    30 SMTP sessions (one message, two recipients each, at most three at a
    time) give 60 requests on no more policy connections than there were
    smtpd processes (a handful); after the run the idle smtpd processes still
    hold them open (``policyd_active_connections``), and Postfix logs no
    trouble talking to policyd.
    """
    postfix, policyd = postfix_bed.postfix, postfix_bed.policyd
    sessions, messages, recipients = 3, 30, 2
    postfix.smtp_source(
        sessions=sessions,
        messages=messages,
        recipients=recipients,
        number_recipients=True,
    ).check()
    requests = policyd.wait_for_requests(messages * recipients)
    assert len(requests) == messages * recipients
    smtpd_pids = {
        int(m.group(1))
        for line in postfix_bed.log_lines(r"postfix/smtpd\[\d+\]: connect from")
        if (m := re.search(r"smtpd\[(\d+)\]", line))
    }
    connections = {e["connection"] for e in requests}
    assert (
        1
        <= len(connections)
        <= len(smtpd_pids)
        <= postfix.config.listener("smtp").maxproc
    )
    assert policyd.metric("policyd_connections_total") == len(connections)
    assert policyd.metric("policyd_active_connections") == len(connections)
    assert policyd.metric("policyd_requests_total", {"action": "DUNNO"}) == len(
        requests
    )
    endpoint = re.escape(f"{postfix.config.policy_host}:{policyd.port}")
    assert postfix_bed.log_lines(POLICY_TROUBLE) == []
    assert postfix_bed.log_lines(rf"warning: .*{endpoint}") == []


def test_fail_open_while_policyd_is_down(postfix_bed: Bed) -> None:
    """
    With policyd stopped, Postfix (``default_action=DUNNO``) still accepts mail.

    smtpd logs that it cannot connect to the policy endpoint and then applies
    the default action; once policyd is back on the same port, the next
    request reaches it again.
    """
    postfix, policyd = postfix_bed.postfix, postfix_bed.policyd
    endpoint = re.escape(f"{postfix.config.policy_host}:{policyd.port}")
    assert policyd.terminate() == 0

    down = postfix.send(recipients=[f"while-down@{RELAY_DOMAIN}"])
    assert down.code(f"RCPT while-down@{RELAY_DOMAIN}") == 250, down
    assert down.accepted, down
    postfix.maillog.wait_for(
        rf"warning: connect to {endpoint}: Connection refused",
        since=postfix_bed.log_mark,
    )
    postfix.maillog.wait_for(
        rf"warning: problem talking to server {endpoint}: Connection refused",
        since=postfix_bed.log_mark,
    )
    assert postfix_bed.log_lines(r"reject:") == []

    policyd.restart()
    again = postfix.send(recipients=[f"after-restart@{RELAY_DOMAIN}"])
    assert again.accepted, again
    [event] = policyd.wait_for_requests(1, recipient=f"after-restart@{RELAY_DOMAIN}")
    assert event["action"] == "DUNNO"


def test_sigterm_with_idle_postfix_connections(postfix_bed: Bed) -> None:
    """
    SIGTERM stops policyd promptly, exit code 0, despite idle connections.

    After a few sessions the idle smtpd processes keep their policy
    connections open (Postfix would for up to max_idle, 300 s); policyd must
    not wait for them to go away.
    """
    postfix, policyd = postfix_bed.postfix, postfix_bed.policyd
    postfix.smtp_source(sessions=3, messages=6).check()
    requests = policyd.wait_for_requests(6)
    connections = {e["connection"] for e in requests}
    assert policyd.metric("policyd_active_connections") == len(connections) >= 1
    assert postfix.smtpd_pids()  # the smtpd processes are idle, not gone

    started = time.monotonic()
    assert policyd.terminate(timeout=10) == 0, policyd.describe_output()
    assert time.monotonic() - started < 5.0
    assert policyd.snapshot(lambda e: e.get("event") == "stopped")
    assert policyd.stderr == []
    assert policyd.stray_lines == []


def test_connect_stage_with_delay_reject_off(postfix_tools: PostfixTools) -> None:
    """
    With ``smtpd_delay_reject=no`` a client-restriction check runs at CONNECT.

    On its own instance (policy check in ``smtpd_client_restrictions``),
    policyd gets one ``protocol_state=CONNECT`` request per session, before
    HELO and MAIL (empty ``helo_name``, ``sender``, ``recipient`` and
    ``instance``), none per RCPT; after XCLIENT, smtpd asks again with
    ``protocol_state=XCLIENT`` and the presented identity (reference §6.4).
    """
    config = PostfixConfig(
        policy_port=0,  # replaced by policyd's port
        delay_reject=False,
        policy_restriction="smtpd_client_restrictions",
    )
    with running_bed(postfix_tools, config=config) as bed:
        plain = bed.postfix.send(recipients=[f"a@{RELAY_DOMAIN}", f"b@{RELAY_DOMAIN}"])
        spoofed = bed.postfix.send(
            recipients=[f"c@{RELAY_DOMAIN}"],
            xclient={"ADDR": "192.0.2.1", "NAME": "x.example.net"},
        )
        assert plain.accepted, plain
        assert spoofed.accepted, spoofed
        policyd = bed.policyd
        [connect] = policyd.wait_for_requests(1, client_port=str(plain.local_port))
        assert connect["attributes"]["protocol_state"] == "CONNECT"
        assert connect["attributes"]["client_address"] == "127.0.0.1"
        for name in ("helo_name", "sender", "recipient", "instance"):
            assert connect["attributes"][name] == "", name
        before, after = policyd.wait_for_requests(
            2, client_port=str(spoofed.local_port)
        )
        assert before["attributes"]["protocol_state"] == "CONNECT"
        assert before["attributes"]["client_address"] == "127.0.0.1"
        assert after["attributes"]["protocol_state"] == "XCLIENT"
        assert after["attributes"]["client_address"] == "192.0.2.1"
        assert after["attributes"]["client_name"] == "x.example.net"
        assert policyd.requests(protocol_state="RCPT") == []
