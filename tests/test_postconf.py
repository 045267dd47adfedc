"""Reading ``postconf`` and ``postconf -M`` output (`policyd.postconf`).

Pure functions over text: the lists and brace forms of postconf(5), the
services and ``-o`` overrides of master(5), and the rejection of text that
is not postconf output.  ``tests/data/doctor`` holds real output of Debian's
Postfix 3.7 with deploy/postfix/main.cf merged into the stock main.cf, and
the stock master.cf with a submission service added; mistakes.postconf
is the same Postfix with the main.cf of docs/operations.md's doctor sample.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.postconf import (
    PostconfError,
    expand,
    parse_main,
    parse_master,
    policy_checks,
    seconds,
    split_list,
)

DATA = Path(__file__).resolve().parent / "data" / "doctor"

HEADER = "mail_version = 3.7.11\ndefault_process_limit = 100\n"


class TestSplitList:
    """Items of a Postfix list."""

    @pytest.mark.parametrize(
        ("value", "items"),
        [
            ("a b c", ["a", "b", "c"]),
            ("a, b,c ,, d", ["a", "b", "c", "d"]),
            ("  ", []),
            (
                "permit_mynetworks, check_policy_service { inet:h:1, timeout=10s }",
                [
                    "permit_mynetworks",
                    "check_policy_service",
                    "{ inet:h:1, timeout=10s }",
                ],
            ),
            (
                "x {a, {b c}, d}y z",
                ["x", "{a, {b c}, d}", "y", "z"],
            ),
        ],
    )
    def test_items(self, value: str, items: list[str]) -> None:
        """Spaces and commas separate; a brace group, nested too, is one item."""
        assert split_list(value) == items

    @pytest.mark.parametrize("value", ["a { b", "a } b", "{ { }"])
    def test_unbalanced(self, value: str) -> None:
        """Unbalanced braces are an error, not a silently wrong list."""
        with pytest.raises(PostconfError, match="unbalanced"):
            split_list(value)


class TestPolicyChecks:
    """``check_policy_service`` in a restriction list."""

    def test_plain_form(self) -> None:
        """The pre-3.0 form has an endpoint and no settings of its own."""
        [check] = policy_checks(
            "smtpd_recipient_restrictions",
            "reject_unauth_destination, check_policy_service inet:127.0.0.1:10040",
        )
        assert check.endpoint == "inet:127.0.0.1:10040"
        assert check.settings == ()
        assert check.position == 1
        assert check.line == "check_policy_service inet:127.0.0.1:10040"

    @pytest.mark.parametrize(
        "text",
        [
            "{ inet:127.0.0.1:10040, timeout=10s, default_action=DUNNO }",
            "{inet:127.0.0.1:10040 timeout=10s default_action=DUNNO}",
            "{ inet:127.0.0.1:10040, { timeout = 10s }, { default_action = DUNNO } }",
        ],
    )
    def test_brace_forms(self, text: str) -> None:
        """Commas or spaces separate settings; a setting may have its own braces."""
        [check] = policy_checks("l", f"check_policy_service {text}")
        assert check.endpoint == "inet:127.0.0.1:10040"
        assert check.settings == (("timeout", "10s"), ("default_action", "DUNNO"))

    def test_value_with_spaces(self) -> None:
        """A value with spaces and commas, in its own braces, stays whole."""
        [check] = policy_checks(
            "l",
            "check_policy_service { unix:private/p, "
            "{ default_action = 451 4.3.5 Try again, later } }",
        )
        assert check.endpoint == "unix:private/p"
        assert check.setting("default_action") == "451 4.3.5 Try again, later"

    def test_several(self) -> None:
        """Every check of a list is found, each with its position."""
        checks = policy_checks(
            "l", "check_policy_service a:1 permit check_policy_service { b:2 }"
        )
        assert [(c.endpoint, c.position) for c in checks] == [("a:1", 0), ("b:2", 3)]

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("check_policy_service", "without a server"),
            ("check_policy_service { }", "names no endpoint"),
            ("check_policy_service { inet:h:1, timeout }", "not name=value"),
        ],
    )
    def test_broken(self, value: str, message: str) -> None:
        """A check Postfix could not use either is an error naming the problem."""
        with pytest.raises(PostconfError, match=message):
            policy_checks("l", value)


class TestParseMain:
    """``postconf`` output."""

    def test_values(self) -> None:
        """``name = value``, continuation lines joined, comments skipped."""
        params = parse_main(
            HEADER + "# comment\nsmtpd_recipient_restrictions = a,\n    b\nempty =\n"
        )
        assert params["smtpd_recipient_restrictions"] == "a, b"
        assert params["empty"] == ""

    def test_real_output(self) -> None:
        """Real ``postconf`` output reads whole, with the defaults doctor needs."""
        params = parse_main((DATA / "recommended.postconf").read_text())
        assert params["smtpd_policy_service_timeout"] == "100s"
        assert "check_policy_service {" in params["smtpd_recipient_restrictions"]
        assert params["smtpd_timeout"] == "${stress?{10}:{300}}s"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (HEADER + "this is not postconf\n", "line 3 is not 'name = value'"),
            ("", "has no mail_version or default_process_limit"),
            ("myhostname = mx\n", "not 'postconf -n'"),
            ("\x7fELF\x02\x01\x01\n", "line 1 is not 'name = value'"),
        ],
    )
    def test_not_postconf_output(self, text: str, message: str) -> None:
        """Text that is not full postconf output is refused, saying why."""
        with pytest.raises(PostconfError, match=message):
            parse_main(text, "f")


class TestExpand:
    """``$name`` references."""

    def test_forms(self) -> None:
        """$name, ${name} and $(name) expand, recursively; unknown ones stay."""
        params = {"a": "x $b", "b": "y", "c": "${a} $(b) $nope"}
        assert expand("$c", params) == "x y y $nope"

    def test_conditional_stays(self) -> None:
        """A conditional form is not a reference: it stays as written."""
        assert expand("${stress?{10}:{300}}s", {"stress": "yes"}) == (
            "${stress?{10}:{300}}s"
        )

    def test_loop_ends(self) -> None:
        """A parameter that refers to itself does not recurse forever."""
        assert "$a" in expand("$a", {"a": "x $a"})


class TestParseMaster:
    """``postconf -M`` output."""

    def test_real_output(self) -> None:
        """Real output: every service, with -o overrides in both forms."""
        services = {
            (s.name, s.type): s
            for s in parse_master((DATA / "debian.master").read_text())
        }
        smtp = services["smtp", "inet"]
        assert (smtp.type, smtp.chroot, smtp.maxproc, smtp.command) == (
            "inet",
            "y",
            "-",
            "smtpd",
        )
        assert services["submission", "inet"].options == (
            ("syslog_name", "postfix/submission"),
            ("smtpd_client_restrictions", "permit_sasl_authenticated, reject"),
            ("smtpd_sasl_auth_enable", "yes"),
        )
        assert services["relay", "unix"].options == (
            ("syslog_name", "postfix/$service_name"),
        )
        assert services["maildrop", "unix"].args[0] == "flags=DRXhu"

    def test_folded_lines(self) -> None:
        """``postconf -Mf`` folds a service over indented lines."""
        [service] = parse_master(
            "submission inet n - y - 20 smtpd\n"
            "    -o syslog_name=postfix/submission\n"
            "    -o { smtpd_recipient_restrictions = permit_sasl_authenticated, "
            "reject }\n"
        )
        assert service.maxproc == "20"
        assert service.options == (
            ("syslog_name", "postfix/submission"),
            ("smtpd_recipient_restrictions", "permit_sasl_authenticated, reject"),
        )

    def test_process_limit(self) -> None:
        """A maxproc of ``-`` is default_process_limit; a number is itself."""
        default, own = parse_master("a inet n - n - - smtpd\nb inet n - n - 7 smtpd\n")
        params = {"default_process_limit": "40"}
        assert default.process_limit(params) == 40
        assert own.process_limit(params) == 7

    def test_override_wins(self) -> None:
        """A service's -o value replaces main.cf's, expanded."""
        [service] = parse_master("a inet n - n - - smtpd -o x=$y\n")
        assert service.param("x", {"x": "main", "y": "own"}) == "own"
        assert service.param("z", {"z": "main"}) == "main"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", "has no master.cf service"),
            ("mail_version = 3.7.11\n", "line 1 is not a master.cf service"),
            ("smtp bogus n - n - - smtpd\n", "line 1 is not a master.cf service"),
            ("smtp inet n - n - - smtpd -o novalue\n", "is not name=value"),
        ],
    )
    def test_not_master_output(self, text: str, message: str) -> None:
        """Text that is not postconf -M output is refused, saying why."""
        with pytest.raises(PostconfError, match=message):
            parse_master(text, "f")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("10", 10), ("10s", 10), ("5m", 300), ("1h", 3600), ("2d", 172800), ("x", None)],
)
def test_seconds(value: str, expected: float | None) -> None:
    """Postfix time values: seconds by default, s/m/h/d/w units."""
    assert seconds(value) == expected
