"""
End-to-end proof of the decisions (issue 4): real Postfix, real policyd.

Postfix is put "under stress" the simplest deterministic way: the bed's
``stress`` listener runs smtpd with ``-o stress=yes``, so every request from
it carries ``stress=yes``, which lifts policyd's level to at least
``POLICYD_POSTFIX_STRESS_LEVEL`` (``overload`` by default, ``elevated`` when
told) for ``POLICYD_POSTFIX_STRESS_HOLD``.  The ``smtp`` listener carries no
stress flag: once the hold (2 s here) and the dwell time (1 s) have passed,
policyd is back at ``normal`` and a client that was refused gets through.

Each client is presented with XCLIENT (the bed's loopback client is an
authorised XCLIENT host), its HELO name too (no EHLO after XCLIENT).  What
Postfix 3.7 makes of that, found by trying:

* ``NAME=mail.example.org`` is trusted as the *verified* name:
  ``client_name`` and ``reverse_client_name`` both become
  ``mail.example.org``, no DNS asked.
* ``NAME=[UNAVAILABLE]`` alone makes ``client_name=unknown`` but leaves
  ``reverse_client_name`` at the name of the real connection (``localhost``
  for 127.0.0.1).  A client without any reverse DNS needs
  ``REVERSE_NAME=[UNAVAILABLE]`` as well.
* Under stress (``stress=yes``) smtpd's ``smtpd_hard_error_limit`` is 1: after
  a 450 at RCPT the next command gets ``421 4.7.0 ... Error: too many
  errors`` and smtpd hangs up.  421 and 521 hang up at once.

The identities (addresses from the documentation ranges)::

    bot             192.0.2.66   no names at all, HELO foo       suspicious (6)
    dynamic         203.0.113.8  pool-8.dsl.isp.example, HELO foo suspicious (4)
    clean           192.0.2.25   mail.example.org, same HELO     score 0
    sasl            192.0.2.87   like bot, XCLIENT LOGIN=alice   authenticated
    allowed-net     198.51.100.7 like bot, in ALLOW_NETWORKS     exempt
    allowed-domain  203.0.113.7  pool-7.dsl.partner.example      exempt (domain)
    impersonator    192.0.2.99   like bot, HELO localhost        suspicious (9)

The recipient's local part names the identity, which is how a test finds
policyd's request event and Postfix's log lines for each one.

The last test wires policyd into ``smtpd_client_restrictions`` with
``smtpd_delay_reject=no`` on its own instance: there, Postfix asks again
after XCLIENT (``protocol_state=XCLIENT``), and a 421 answers the XCLIENT
command itself.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from policyd.testing.bed import Bed, running_bed
from policyd.testing.daemon import Event, PolicydProcess
from policyd.testing.postfix import PostfixConfig, PostfixInstance, PostfixTools
from policyd.testing.smtp import (
    RELAY_DOMAIN,
    SmtpTranscript,
    bot_xclient,
    ehlo_features,
)
from policyd.testing.system import wait_until

pytestmark = pytest.mark.postfix

#: Stress levels in the order of the policyd_stress_level metric (0, 1, 2).
LEVELS = ("normal", "elevated", "overload")

#: Postfix's stress=yes holds the level for 2 s; a lower level is taken
#: after 1 s (defaults 60 s and 30 s).  The stressed listener stands for a
#: saturated Postfix, so stress=yes counts whatever policyd's own load.
FAST = {
    "POLICYD_POSTFIX_STRESS_HOLD": "2s",
    "POLICYD_LEVEL_MIN_DWELL": "1s",
    "POLICYD_POSTFIX_STRESS_MIN_LOAD": "0",
}

#: The allow-lists of the RCPT-stage tests.
ENV = {
    **FAST,
    "POLICYD_ALLOW_NETWORKS": "198.51.100.0/24",
    "POLICYD_ALLOW_DOMAINS": "partner.example",
}

#: How long "after the stress has passed" may take to arrive: hold + dwell
#: + the once-a-second sweep, with a wide margin for a busy machine.
BACK_TO_NORMAL_TIMEOUT = 15.0

#: policyd's default refusal per level: code, enhanced status code, text
#: (the action is ``CODE DSN TEXT (reasons)``).
REFUSAL = {
    "overload": (421, "4.7.0", "Overloaded; try again later"),
    "elevated": (450, "4.7.1", "Busy; try again later"),
}


def _action(level: str, reasons: tuple[str, ...]) -> str:
    """The action policyd answers at *level* for *reasons*."""
    code, dsn, text = REFUSAL[level]
    return f"{code} {dsn} {text} ({' '.join(reasons)})"


def _reply(level: str, reasons: tuple[str, ...], what: str) -> tuple[int, str]:
    """
    The SMTP reply (code, text) the client sees for that action.

    *what* is Postfix's prefix: ``<rcpt>: Recipient address rejected`` at
    RCPT, ``<name[address]>: Client host rejected`` at CONNECT or XCLIENT.
    """
    code, dsn, text = REFUSAL[level]
    return code, f"{dsn} {what}: {text} ({' '.join(reasons)})"


#: smtpd's answer to the command after an error, under stress (with the
#: bed's myhostname).
TOO_MANY_ERRORS = "4.7.0 mx.policyd.test Error: too many errors"


@attrs.frozen
class Client:
    """An SMTP client identity presented with XCLIENT, and its expected fate."""

    label: str
    xclient: Mapping[str, str]
    #: Why policyd refuses it under stress (at RCPT); empty if it does not.
    reasons: tuple[str, ...] = ()
    #: Its score under stress, without per-client history.
    score: int = 0
    #: The exemption that lets it through, if any.
    exemption: str | None = None

    @property
    def address(self) -> str:
        """The client address Postfix reports."""
        return self.xclient["ADDR"]

    @property
    def suspicious(self) -> bool:
        """Whether policyd refuses it under stress."""
        return bool(self.reasons)

    def recipient(self, tag: str = "") -> str:
        """A recipient that names this client (and *tag*) in every log."""
        return f"{self.label}{'-' + tag if tag else ''}@{RELAY_DOMAIN}"


BOT = Client(
    "bot",
    bot_xclient("192.0.2.66"),
    ("no_client_name", "no_reverse_name", "helo_not_fqdn"),
    6,
)
DYNAMIC = Client(
    "dynamic",
    {
        "ADDR": "203.0.113.8",
        "NAME": "pool-8.dsl.isp.example",
        "HELO": "foo",
        "PROTO": "ESMTP",
    },
    ("dynamic_name", "helo_not_fqdn"),
    4,
)
CLEAN = Client(
    "clean",
    {
        "ADDR": "192.0.2.25",
        "NAME": "mail.example.org",
        "HELO": "mail.example.org",
        "PROTO": "ESMTP",
    },
)
AUTHENTICATED = Client(
    "sasl", bot_xclient("192.0.2.87", LOGIN="alice"), exemption="authenticated"
)
ALLOWED_NETWORK = Client(
    "allowed-net", bot_xclient("198.51.100.7"), exemption="allowed_network"
)
ALLOWED_DOMAIN = Client(
    "allowed-domain",
    # Dynamic-looking with a bare HELO (score 4), but under partner.example.
    {
        "ADDR": "203.0.113.7",
        "NAME": "pool-7.dsl.partner.example",
        "HELO": "foo",
        "PROTO": "ESMTP",
    },
    exemption="allowed_domain",
)
IMPERSONATOR = Client(
    "impersonator",
    bot_xclient("192.0.2.99", HELO="localhost"),
    ("no_client_name", "no_reverse_name", "helo_impersonates"),
    9,
)

#: The clients of the stress test: two refused, four let through.
UNDER_STRESS = (BOT, DYNAMIC, CLEAN, AUTHENTICATED, ALLOWED_NETWORK, ALLOWED_DOMAIN)


def _send(bed: Bed, listener: str, client: Client, tag: str = "") -> SmtpTranscript:
    """One message from *client* (presented with XCLIENT) to *listener*."""
    return bed.postfix.send(
        listener,
        recipients=[client.recipient(tag)],
        xclient=client.xclient,
        ehlo_after_xclient=False,
    )


def _decisions(policyd: PolicydProcess) -> dict[tuple[str, str], float]:
    """The non-zero ``policyd_decisions_total`` series: (outcome, reason) → n."""
    return {
        (sample.labels["outcome"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(policyd.metrics_text())
        for sample in family.samples
        if sample.name == "policyd_decisions_total" and sample.value
    }


def _refusals(policyd: PolicydProcess) -> list[Event]:
    return policyd.snapshot(lambda e: e.get("event") == "refusal")


def _level(policyd: PolicydProcess) -> str:
    value = policyd.metric("policyd_stress_level")
    assert value is not None
    return LEVELS[int(value)]


def _request(policyd: PolicydProcess, recipient: str) -> Event:
    """The only request event for *recipient* (RCPT-stage wiring)."""
    [event] = policyd.wait_for_requests(1, recipient=recipient)
    return event


def _delivered(bed: Bed, recipients: list[str]) -> None:
    """Wait until the discard transport has taken every one of *recipients*."""
    for recipient in recipients:
        bed.postfix.maillog.wait_for(
            rf"postfix/discard\[\d+\]: \w+: to=<{re.escape(recipient)}>.*status=sent",
            since=bed.log_mark,
        )


def _wait_for_normal(policyd: PolicydProcess) -> float:
    """Wait until policyd's level is back at normal; return how long it took."""
    started = time.monotonic()
    wait_until(
        lambda: _level(policyd) == "normal",
        timeout=BACK_TO_NORMAL_TIMEOUT,
        what="policyd_stress_level back at 0",
    )
    return time.monotonic() - started


def _assert_refused_at_rcpt(
    transcript: SmtpTranscript,
    client: Client,
    level: str,
    tag: str = "",
    *,
    quick_retry: bool = False,
) -> None:
    """
    *transcript* ends with policyd's refusal at RCPT and a hang-up.

    With *quick_retry*, the client came back within seconds of a refusal,
    which is one more reason.
    """
    reasons = client.reasons + (("quick_retry",) if quick_retry else ())
    code, text = _reply(
        level, reasons, f"<{client.recipient(tag)}>: Recipient address rejected"
    )
    [step] = transcript.replies("RCPT")
    assert (step.code, step.text) == (code, text), transcript
    assert not transcript.accepted, transcript
    assert transcript.disconnected, transcript
    if code == 450:
        # Not policyd's doing: under stress smtpd allows one error only.
        assert [(s.command, s.code, s.text) for s in transcript.steps[-2:-1]] == [
            ("RSET", 421, TOO_MANY_ERRORS)
        ], transcript


@pytest.fixture
def policyd_env() -> dict[str, str]:
    """The short hold and dwell, and the allow-lists (a test may parametrize)."""
    return dict(ENV)


@pytest.fixture(scope="module")
def xclient_login(postfix_instance: PostfixInstance) -> None:
    """Skip unless this smtpd takes XCLIENT LOGIN (it needs SASL support)."""
    verbs = ehlo_features(*postfix_instance.address()).get("xclient", "").split()
    if "LOGIN" not in verbs:
        pytest.skip(f"smtpd offers no XCLIENT LOGIN (only {verbs})")


@pytest.mark.usefixtures("xclient_login")
def test_no_stress_everyone_delivers(postfix_bed: Bed) -> None:
    """
    Without stress nobody is refused, however suspicious.

    A fresh policyd and the normal listener (no ``stress=yes``): every
    identity, the bot and the HELO-localhost impersonator included, gets its
    message delivered.  policyd stays at ``normal``, answers ``DUNNO`` to
    every request without scoring it (``outcome="pass",reason="normal"``
    once per request), and logs no refusal.
    """
    everyone = (*UNDER_STRESS, IMPERSONATOR)
    for client in everyone:
        transcript = _send(postfix_bed, "smtp", client)
        assert transcript.accepted, f"{client.label}: {transcript}"
    policyd = postfix_bed.policyd
    for client in everyone:
        event = _request(policyd, client.recipient())
        assert event["attributes"]["client_address"] == client.address
        assert event["attributes"]["stress"] == ""
        assert event["action"] == "DUNNO", client.label
    _delivered(postfix_bed, [c.recipient() for c in everyone])
    assert _level(policyd) == "normal"
    assert _decisions(policyd) == {("pass", "normal"): len(everyone)}
    assert _refusals(policyd) == []
    assert policyd.snapshot(lambda e: e.get("event") == "stress_level") == []
    assert postfix_bed.log_lines(r"reject:") == []


@pytest.mark.usefixtures("xclient_login")
@pytest.mark.parametrize(
    ("policyd_env", "level"),
    [
        (ENV, "overload"),
        ({**ENV, "POLICYD_POSTFIX_STRESS_LEVEL": "elevated"}, "elevated"),
    ],
    ids=["overload", "elevated"],
)
def test_stress_refuses_only_suspicious_clients(
    postfix_bed: Bed, policyd_env: dict[str, str], level: str
) -> None:
    """
    Under stress the bot-like clients are refused at RCPT; the others deliver.

    Every message goes to the ``-o stress=yes`` listener, so policyd is at
    *level* (Postfix's stress is a floor at ``overload``, or at ``elevated``
    with ``POLICYD_POSTFIX_STRESS_LEVEL=elevated``):

    * the bot (no reverse DNS, ``HELO foo``) and the dynamic-looking client
      get ``421 4.7.0 ... Overloaded; try again later (<reasons>)`` and
      Postfix hangs up at once, or at ``elevated``
      ``450 4.7.1 ... Busy; try again later (<reasons>)``, after which
      stressed smtpd's one-error limit closes the session;
    * the clean client (``client_name=mail.example.org``, as XCLIENT
      presents it), the SASL-authenticated one, and those allow-listed by
      network and by verified domain deliver, although the last three look
      exactly as suspicious.

    Each refusal is one ``event="refusal"`` log event with the client, its
    names, HELO, level, action, score and reasons, and Postfix's log has the
    matching ``NOQUEUE: reject``; ``policyd_decisions_total`` counts one
    per reason of each refusal, one per exemption and one clean pass.
    """
    for client in UNDER_STRESS:
        transcript = _send(postfix_bed, "stress", client)
        if client.suspicious:
            _assert_refused_at_rcpt(transcript, client, level)
        else:
            assert transcript.accepted, f"{client.label}: {transcript}"

    policyd = postfix_bed.policyd
    refused = [c for c in UNDER_STRESS if c.suspicious]
    passed = [c for c in UNDER_STRESS if not c.suspicious]
    code = REFUSAL[level][0]
    for client in UNDER_STRESS:
        event = _request(policyd, client.recipient())
        attributes = event["attributes"]
        assert attributes["stress"] == "yes"
        assert attributes["protocol_state"] == "RCPT"
        assert attributes["client_address"] == client.address
        if client.suspicious:
            assert event["action"] == _action(level, client.reasons), event
        else:
            assert event["action"] == "DUNNO", (client.label, event)
    # What Postfix tells policyd about a client presented with NAME=...:
    # a verified name, no DNS involved.
    clean = _request(policyd, CLEAN.recipient())["attributes"]
    assert (clean["client_name"], clean["reverse_client_name"]) == (
        "mail.example.org",
        "mail.example.org",
    )
    sasl = _request(policyd, AUTHENTICATED.recipient())["attributes"]
    assert (sasl["sasl_method"], sasl["sasl_username"]) == ("XCLIENT", "alice")

    events = policyd.wait_for_all(
        lambda e: e.get("event") == "refusal", len(refused), what="refusal events"
    )
    assert len(events) == len(refused)
    for client, event in zip(refused, events, strict=True):
        assert event["client"] == client.address
        assert event["name"] == client.xclient["NAME"].replace(
            "[UNAVAILABLE]", "unknown"
        )
        assert event["helo"] == "foo"
        assert event["stress_level"] == level
        assert event["action"] == _action(level, client.reasons)
        assert event["outcome"] == "defer"
        assert event["score"] == client.score
        assert event["reasons"] == list(client.reasons)
        assert event["state"] == "RCPT"
        assert event["dry_run"] is False

    expected: dict[tuple[str, str], float] = {("pass", "none"): 1}
    for client in refused:
        for reason in client.reasons:
            expected[("defer", reason)] = expected.get(("defer", reason), 0) + 1
    for client in passed:
        if client.exemption is not None:
            expected[("exempt", client.exemption)] = 1
    assert _decisions(policyd) == expected
    assert _level(policyd) == level

    for client in refused:
        rcpt = client.recipient()
        name = client.xclient["NAME"].replace("[UNAVAILABLE]", "unknown")
        postfix_bed.postfix.maillog.wait_for(
            rf"NOQUEUE: reject: RCPT from {re.escape(name)}"
            rf"\[{re.escape(client.address)}\]: {code} .*<{re.escape(rcpt)}>",
            since=postfix_bed.log_mark,
        )
    _delivered(postfix_bed, [c.recipient() for c in passed])
    assert len(postfix_bed.log_lines(r"NOQUEUE: reject:")) == len(refused)


def test_refused_client_delivers_after_stress_passes(postfix_bed: Bed) -> None:
    """
    A bot refused under stress delivers when it retries after the stress.

    The bot gets 421 from the stressed listener; retrying at once (still
    stressed) it gets 421 again, now also for ``quick_retry`` (score 9, but
    the reverse-DNS signals never count towards a permanent refusal, so
    still not 521).  The normal listener sends no ``stress=yes``: once the
    2 s hold and the 1 s dwell have passed, policyd's level falls back to
    ``normal`` (``policyd_stress_level`` 0), and the same bot, retrying
    through it, delivers.
    """
    policyd = postfix_bed.policyd
    first = _send(postfix_bed, "stress", BOT)
    _assert_refused_at_rcpt(first, BOT, "overload")
    again = _send(postfix_bed, "stress", BOT, "again")
    _assert_refused_at_rcpt(again, BOT, "overload", "again", quick_retry=True)
    events = policyd.wait_for_all(
        lambda e: e.get("event") == "refusal", 2, what="two refusals"
    )
    assert [(e["outcome"], e["score"]) for e in events] == [
        ("defer", 6),
        ("defer", 9),
    ]
    assert events[1]["reasons"] == [*BOT.reasons, "quick_retry"]

    waited = _wait_for_normal(policyd)
    retry = _send(postfix_bed, "smtp", BOT, "later")
    assert retry.accepted, retry
    event = _request(policyd, BOT.recipient("later"))
    assert event["attributes"]["client_address"] == BOT.address
    assert event["attributes"]["stress"] == ""
    assert event["action"] == "DUNNO"
    _delivered(postfix_bed, [BOT.recipient("later")])

    assert len(_refusals(policyd)) == 2
    decisions = _decisions(policyd)
    assert decisions[("pass", "normal")] == 1
    assert decisions[("defer", "quick_retry")] == 1
    assert decisions[("defer", "no_client_name")] == 2
    changes = [
        (e["old_level"], e["new_level"])
        for e in policyd.snapshot(lambda e: e.get("event") == "stress_level")
    ]
    assert changes == [("normal", "overload"), ("overload", "normal")]
    print(f"\nback to normal {waited:.2f}s after the last refusal")  # pytest -s


def test_quick_retrying_impersonator_gets_521(postfix_bed: Bed) -> None:
    """
    At overload, the very suspicious get a permanent 521 and a hang-up.

    A client without reverse DNS whose HELO claims to be ``localhost``
    scores 9, but only 5 without the reverse-DNS signals: 421.  Coming back
    at once adds ``quick_retry`` (3): 8 without the DNS signals reaches the
    reject score, and Postfix answers ``521 5.7.1 ... Refused: looks like a
    bot (...)`` and hangs up.
    """
    first = _send(postfix_bed, "stress", IMPERSONATOR)
    _assert_refused_at_rcpt(first, IMPERSONATOR, "overload")
    again = _send(postfix_bed, "stress", IMPERSONATOR, "again")
    rcpt = IMPERSONATOR.recipient("again")
    reasons = " ".join((*IMPERSONATOR.reasons, "quick_retry"))
    [step] = again.replies("RCPT")
    assert (step.code, step.text) == (
        521,
        f"5.7.1 <{rcpt}>: Recipient address rejected: "
        f"Refused: looks like a bot ({reasons})",
    ), again
    assert again.disconnected, again

    policyd = postfix_bed.policyd
    events = policyd.wait_for_all(
        lambda e: e.get("event") == "refusal", 2, what="two refusals"
    )
    assert [(e["outcome"], e["score"], e["helo"]) for e in events] == [
        ("defer", 9, "localhost"),
        ("reject", 12, "localhost"),
    ]
    decisions = _decisions(policyd)
    assert decisions[("reject", "helo_impersonates")] == 1
    assert decisions[("reject", "quick_retry")] == 1
    assert decisions[("defer", "helo_impersonates")] == 1
    postfix_bed.postfix.maillog.wait_for(
        rf"NOQUEUE: reject: RCPT from unknown\[192\.0\.2\.99\]: 521 5\.7\.1 "
        rf"<{re.escape(rcpt)}>",
        since=postfix_bed.log_mark,
    )


def test_connect_stage_wiring_refuses_at_xclient(postfix_tools: PostfixTools) -> None:
    """
    Wired at CONNECT, policyd refuses the bot right after XCLIENT.

    policyd sits in ``smtpd_client_restrictions`` with
    ``smtpd_delay_reject=no`` (its own instance).  Each session asks once at
    ``CONNECT`` for the real connection (the XCLIENT proxy, 127.0.0.1,
    allow-listed as a trusted front end would be), and again at ``XCLIENT``
    with the presented identity.  Under stress:

    * the bot's XCLIENT is answered ``421 4.7.0 <unknown[192.0.2.66]>:
      Client host rejected: Overloaded; try again later (no_client_name
      no_reverse_name)`` and Postfix hangs up: it never reaches MAIL.  Its
      names alone make it suspicious (score 4): the HELO it presents is not
      judged at this stage;
    * the clean client and the allow-listed one pass and deliver;
    * no request is made at RCPT.

    After the stress, the bot delivers through the normal listener.
    """
    config = PostfixConfig(
        policy_port=0,  # replaced by policyd's port
        delay_reject=False,
        policy_restriction="smtpd_client_restrictions",
    )
    env = {**FAST, "POLICYD_ALLOW_NETWORKS": "127.0.0.0/8 198.51.100.0/24"}
    with running_bed(postfix_tools, env, config) as bed:
        bot = _send(bed, "stress", BOT)
        reasons = ("no_client_name", "no_reverse_name")
        reply = _reply(
            "overload", reasons, f"<unknown[{BOT.address}]>: Client host rejected"
        )
        assert [(s.command, s.code) for s in bot.steps] == [
            ("CONNECT", 220),
            ("EHLO", 250),
            ("XCLIENT", 421),
            ("DISCONNECTED", 0),
        ], bot
        [step] = bot.replies("XCLIENT")
        assert (step.code, step.text) == reply, bot
        for client in (CLEAN, ALLOWED_NETWORK):
            transcript = _send(bed, "stress", client)
            assert transcript.accepted, f"{client.label}: {transcript}"

        policyd = bed.policyd
        connect, xclient = policyd.wait_for_requests(2, client_port=str(bot.local_port))
        assert connect["attributes"]["protocol_state"] == "CONNECT"
        assert connect["attributes"]["client_address"] == "127.0.0.1"
        assert connect["attributes"]["stress"] == "yes"
        assert connect["action"] == "DUNNO"
        assert xclient["attributes"]["protocol_state"] == "XCLIENT"
        assert xclient["attributes"]["client_address"] == BOT.address
        assert xclient["attributes"]["client_name"] == "unknown"
        assert xclient["attributes"]["reverse_client_name"] == "unknown"
        assert xclient["attributes"]["helo_name"] == "foo"
        assert xclient["action"] == _action("overload", reasons)
        [refusal] = _refusals(policyd)
        assert refusal["client"] == BOT.address
        assert refusal["state"] == "XCLIENT"
        assert refusal["stress_level"] == "overload"
        assert refusal["score"] == 4
        assert refusal["reasons"] == list(reasons)
        assert refusal["instance"] == ""
        for client in (CLEAN, ALLOWED_NETWORK):
            [passed] = policyd.wait_for_requests(
                1, protocol_state="XCLIENT", client_address=client.address
            )
            assert passed["action"] == "DUNNO", (client.label, passed)
        _delivered(bed, [CLEAN.recipient(), ALLOWED_NETWORK.recipient()])
        bed.postfix.maillog.wait_for(
            r"NOQUEUE: reject: XCLIENT from unknown\[192\.0\.2\.66\]: "
            + re.escape(f"{reply[0]} {reply[1]}"),
            since=bed.log_mark,
        )
        decisions = _decisions(policyd)
        assert decisions[("defer", "no_client_name")] == 1
        assert decisions[("defer", "no_reverse_name")] == 1
        assert ("defer", "helo_not_fqdn") not in decisions

        waited = _wait_for_normal(policyd)
        later = _send(bed, "smtp", BOT, "later")
        assert later.accepted, later
        _, retried = policyd.wait_for_requests(2, client_port=str(later.local_port))
        assert retried["attributes"]["protocol_state"] == "XCLIENT"
        assert retried["attributes"]["stress"] == ""
        assert retried["action"] == "DUNNO"
        _delivered(bed, [BOT.recipient("later")])
        assert len(_refusals(policyd)) == 1
        assert policyd.requests(protocol_state="RCPT") == []
        print(f"\n[connect] back to normal after {waited:.2f}s")  # pytest -s
