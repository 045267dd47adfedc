"""``policyd doctor``: the checks (`policyd.doctor`) and the command.

The checks are pure functions: each case is a small configuration, as
``postconf`` and ``postconf -M`` would print it, and the findings it must
(and must not) give.  The command runs in-process over files (``--postconf``
and ``--master``); tests/test_e2e_doctor.py runs it on a real Postfix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from helpers import run_main

from policyd import ask, config
from policyd.doctor import (
    ERROR,
    INFO,
    WARNING,
    Finding,
    Policyd,
    Postfix,
    check_answers,
    diagnose,
    listeners,
    points_at,
    render_text,
    smtpd_capacity,
)
from policyd.postconf import parse_main, parse_master

DATA = Path(__file__).resolve().parent / "data" / "doctor"

RECOMMENDED = (
    "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination, "
    "check_policy_service { inet:127.0.0.1:10040, timeout=10s, default_action=DUNNO }"
)

# What postconf prints for the parameters doctor reads (Postfix 3.7 defaults)
# with policyd wired as docs/postfix.md recommends.
BASE = {
    "mail_version": "3.7.11",
    "default_process_limit": "100",
    "queue_directory": "/var/spool/postfix",
    "smtpd_policy_service_default_action": "451 4.3.5 Server configuration problem",
    "smtpd_policy_service_timeout": "100s",
    "smtpd_policy_service_max_idle": "300s",
    "smtpd_policy_service_max_ttl": "1000s",
    "smtpd_client_restrictions": "",
    "smtpd_helo_restrictions": "",
    "smtpd_sender_restrictions": "",
    "smtpd_relay_restrictions": (
        "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination"
    ),
    "smtpd_recipient_restrictions": RECOMMENDED,
    "smtpd_data_restrictions": "",
    "smtpd_end_of_data_restrictions": "",
    "smtpd_delay_reject": "yes",
    "smtpd_timeout": "${stress?{10}:{300}}s",
    "smtpd_hard_error_limit": "${stress?{1}:{20}}",
    "smtpd_junk_command_limit": "${stress?{1}:{100}}",
    "smtpd_starttls_timeout": "${stress?{10}:{300}}s",
    "smtpd_client_connection_count_limit": "50",
}
MASTER = "smtp inet n - y - - smtpd\npickup unix n - y 60 1 pickup\n"


def _postconf(params: Mapping[str, str]) -> str:
    return "".join(f"{name} = {value}\n" for name, value in params.items())


def _postfix(master: str | None = MASTER, **changes: str) -> Postfix:
    text = _postconf({**BASE, **changes})
    return Postfix(parse_main(text), None if master is None else parse_master(master))


def _policyd(**settings: str) -> Policyd:
    env = {f"POLICYD_{name.upper()}": value for name, value in settings.items()}
    return Policyd.from_config(config.load(env))


def _ids(findings: list[Finding], *severities: str) -> list[str]:
    wanted = severities or (ERROR, WARNING)
    return [f.id for f in findings if f.severity in wanted]


POLICY = "inet:127.0.0.1:10040"


class TestDiagnose:
    """Which findings a configuration gives."""

    def test_recommended_passes(self) -> None:
        """docs/postfix.md's wiring with the defaults needs no fixing."""
        findings = diagnose(_postfix(), _policyd())
        assert _ids(findings) == []
        assert _ids(findings, INFO) == ["no-postscreen"]

    @pytest.mark.parametrize(
        ("changes", "expected"),
        [
            pytest.param(
                {"smtpd_recipient_restrictions": "reject_unauth_destination"},
                ["no-policy-service"],
                id="no-check",
            ),
            pytest.param(
                {
                    "smtpd_recipient_restrictions": "reject_unauth_destination, "
                    "check_policy_service inet:127.0.0.1:9999"
                },
                ["no-policy-service"],
                id="other-port",
            ),
            pytest.param(
                {
                    "smtpd_recipient_restrictions": "permit_mynetworks, "
                    f"check_policy_service {POLICY}"
                },
                ["default-action", "policy-timeout"],
                id="plain-form-postfix-defaults",
            ),
            pytest.param(
                {
                    "smtpd_recipient_restrictions": "permit_mynetworks, "
                    f"check_policy_service {POLICY}",
                    "smtpd_policy_service_default_action": "DUNNO",
                    "smtpd_policy_service_timeout": "10s",
                },
                [],
                id="plain-form-global-settings",
            ),
            pytest.param(
                {
                    "smtpd_recipient_restrictions": "permit_mynetworks, "
                    f"check_policy_service {{ {POLICY}, {{ default_action = 451 "
                    "4.3.5 down }, timeout=10s }"
                },
                ["default-action"],
                id="braced-451",
            ),
            pytest.param(
                {
                    "smtpd_recipient_restrictions": "permit_mynetworks, "
                    f"check_policy_service {{ {POLICY}, default_action=DUNNO, "
                    "timeout=1s }"
                },
                ["timeout-below-decision"],
                id="timeout-not-above-decision-timeout",
            ),
            pytest.param(
                {"smtpd_policy_service_max_idle": "900s"},
                ["max-idle"],
                id="max-idle-above-idle-timeout",
            ),
            pytest.param(
                {"smtpd_policy_service_max_ttl": "5s"},
                ["max-ttl"],
                id="max-ttl-tiny",
            ),
            pytest.param(
                {
                    "smtpd_recipient_restrictions": "reject_unauth_destination, "
                    "check_policy_service { inet:127.0.0.1:10040, timeout=10s, "
                    "default_action=DUNNO }, permit_mynetworks"
                },
                ["permit-order"],
                id="permit-after-check",
            ),
            pytest.param(
                {
                    "smtpd_client_restrictions": "permit_mynetworks, "
                    f"check_policy_service {{ {POLICY}, timeout=10s, "
                    "default_action=DUNNO, policy_context=connect }"
                },
                ["delay-reject", "smtpd-capacity"],
                id="connect-stage-delayed",
            ),
            pytest.param(
                {"smtpd_timeout": "300s", "smtpd_hard_error_limit": "20"},
                ["stress-default", "stress-default"],
                id="fixed-stress-parameters",
            ),
            pytest.param(
                {"smtpd_client_connection_count_limit": "0"},
                ["anvil-off"],
                id="anvil-off",
            ),
        ],
    )
    def test_findings(self, changes: dict[str, str], expected: list[str]) -> None:
        """Each mistake gives its finding, and nothing else needs fixing."""
        findings = diagnose(_postfix(**changes), _policyd())
        assert sorted(_ids(findings)) == sorted(expected)

    def test_connect_stage_wired(self) -> None:
        """CONNECT-stage wiring with smtpd_delay_reject=no and its capacity passes."""
        postfix = _postfix(
            smtpd_client_restrictions="permit_mynetworks, check_policy_service "
            f"{{ {POLICY}, timeout=10s, default_action=DUNNO, policy_context=c }}",
            smtpd_delay_reject="no",
        )
        assert _ids(diagnose(postfix, _policyd(smtpd_capacity="200"))) == []

    def test_fix_lines(self) -> None:
        """The fix is the whole check with every needed change, in place."""
        postfix = _postfix(
            smtpd_recipient_restrictions=f"permit_mynetworks, check_policy_service "
            f"{{ {POLICY}, policy_context=rcpt }}"
        )
        findings = diagnose(postfix, _policyd())
        [action] = [f for f in findings if f.id == "default-action"]
        assert action.subject == (
            "main.cf smtpd_recipient_restrictions: check_policy_service "
            f"{{ {POLICY}, policy_context=rcpt }}"
        )
        assert action.fix.endswith(
            f"with 'check_policy_service {{ {POLICY}, policy_context=rcpt, "
            "default_action=DUNNO, timeout=10s }'"
        )
        assert "451 4.3.5 Server configuration problem" in action.what

    def test_fix_fixes(self) -> None:
        """Writing the recommended check in place clears every finding it names."""
        broken = f"check_policy_service {POLICY}"
        postfix = _postfix(
            smtpd_recipient_restrictions=f"permit_mynetworks, {broken}",
            smtpd_policy_service_max_idle="700s",
            smtpd_policy_service_max_ttl="10s",
        )
        findings = diagnose(postfix, _policyd())
        assert sorted(_ids(findings)) == [
            "default-action",
            "max-idle",
            "max-ttl",
            "policy-timeout",
        ]
        fixed = findings[0].fix.split(" with ")[1].strip("'")
        postfix = _postfix(
            smtpd_recipient_restrictions=f"permit_mynetworks, {fixed}",
            smtpd_policy_service_max_idle="700s",
            smtpd_policy_service_max_ttl="10s",
        )
        assert _ids(diagnose(postfix, _policyd())) == []

    def test_master_override(self) -> None:
        """A service's -o restriction list is checked, and named in the finding."""
        master = MASTER + (
            "submission inet n - y - 10 smtpd -o {smtpd_recipient_restrictions="
            f"permit_sasl_authenticated, check_policy_service {POLICY}}}\n"
        )
        findings = diagnose(_postfix(master), _policyd(smtpd_capacity="110"))
        assert {f.subject.split(":")[0] for f in findings if f.severity == ERROR} == {
            "master.cf service submission smtpd_recipient_restrictions"
        }

    def test_stress_override_in_master(self) -> None:
        """A fixed -o smtpd_timeout on an smtpd service defeats stress there too."""
        master = "smtp inet n - y - - smtpd -o smtpd_timeout=60s\n"
        [finding] = [
            f for f in diagnose(_postfix(master), _policyd()) if f.severity == WARNING
        ]
        assert finding.id == "stress-default"
        assert finding.fix == "in master.cf service smtp: drop -o smtpd_timeout=60s"

    def test_stress_fix_is_the_default(self) -> None:
        """The fix restores the stress-dependent default expression."""
        findings = diagnose(_postfix(smtpd_junk_command_limit="5"), _policyd())
        [finding] = [f for f in findings if f.id == "stress-default"]
        assert finding.fix == "smtpd_junk_command_limit = ${stress?{1}:{100}}"

    def test_capacity_mismatch(self) -> None:
        """The capacity fix is the sum of maxproc x distinct policy texts."""
        findings = diagnose(_postfix(), _policyd(smtpd_capacity="40"))
        [finding] = [f for f in findings if f.id == "smtpd-capacity"]
        assert finding.fix == "POLICYD_SMTPD_CAPACITY=100"

    def test_postscreen(self) -> None:
        """Behind postscreen, the pass service counts and anvil checks its limit."""
        master = (
            "smtp inet n - y - 1 postscreen\n"
            "smtpd pass - - y - 20 smtpd\n"
            "dnsblog unix - - y - 0 dnsblog\n"
        )
        findings = diagnose(_postfix(master), _policyd(smtpd_capacity="20"))
        assert _ids(findings) == []
        assert _ids(findings, INFO) == ["anvil-limit-high", "postscreen"]

    def test_without_master(self) -> None:
        """Without postconf -M output, the master.cf checks are skipped, said so."""
        findings = diagnose(_postfix(None), _policyd(smtpd_capacity="7"))
        assert _ids(findings) == []
        assert _ids(findings, INFO) == ["no-master"]


class TestCapacity:
    """The connections a Postfix can open to policyd."""

    def test_sum(self) -> None:
        """Each smtpd service: maxproc x distinct texts reaching policyd."""
        params = {
            **BASE,
            "smtpd_client_restrictions": f"check_policy_service {{ {POLICY}, "
            "policy_context=connect }",
            "smtpd_data_restrictions": f"check_policy_service {POLICY}",
            "smtpd_end_of_data_restrictions": f"check_policy_service {POLICY}",
        }
        services = parse_master(
            MASTER
            + "submission inet n - y - 10 smtpd -o smtpd_client_restrictions=\n"
            + "other inet n - y - 5 smtpd -o smtpd_recipient_restrictions=\n"
        )
        where = listeners(("tcp:10040:interface=127.0.0.1",))
        capacity = smtpd_capacity(
            params, services, lambda e: points_at(e, where, "/var/spool/postfix")
        )
        assert [(s.service, s.maxproc, s.connections) for s in capacity.services] == [
            ("smtp", 100, 3),
            ("submission", 10, 2),
            ("other", 5, 2),
        ]
        assert capacity.total == 300 + 20 + 10


class TestPointsAt:
    """Which Postfix endpoints reach POLICYD_LISTEN."""

    @pytest.mark.parametrize(
        ("endpoint", "listen", "reaches"),
        [
            ("inet:127.0.0.1:10040", "tcp:10040:interface=127.0.0.1", True),
            ("inet:localhost:10040", "tcp:10040:interface=127.0.0.1", True),
            ("inet:127.0.0.1:10041", "tcp:10040:interface=127.0.0.1", False),
            ("inet:192.0.2.10:10040", "tcp:10040:interface=127.0.0.1", False),
            ("inet:192.0.2.10:10040", "tcp:10040", True),
            ("inet:[::1]:10040", r"tcp6:10040:interface=\:\:1", True),
            (
                "unix:private/policyd",
                "unix:/var/spool/postfix/private/policyd:mode=666",
                True,
            ),
            ("private/policyd", "unix:/var/spool/postfix/private/policyd", True),
            ("unix:private/other", "unix:/var/spool/postfix/private/policyd", False),
            ("inet:127.0.0.1:10040", "tcp:1 unix:/x tcp:10040", True),
            ("inet:nonsense", "tcp:10040", False),
        ],
    )
    def test_points_at(self, endpoint: str, listen: str, reaches: bool) -> None:
        """
        TCP by address and port; unix paths relative to the queue directory.

        A policyd that listens on every address is reached at any of them.
        """
        assert (
            points_at(endpoint, listeners(listen.split()), "/var/spool/postfix")
            is reaches
        )


class TestAnswers:
    """``--ask``: one request to each endpoint Postfix uses."""

    def test_answer_and_failure(self) -> None:
        """An answer is info; no answer is an error naming what happened."""
        asked: list[ask.Target] = []

        def asking(target: ask.Target) -> str:
            asked.append(target)
            raise ask.AskFailed("connection refused")

        findings = check_answers(_postfix(), _policyd(), asking)
        assert asked == [ask.TCPTarget("127.0.0.1", 10040)]
        assert [(f.id, f.severity) for f in findings] == [("no-answer", ERROR)]
        assert "connection refused" in findings[0].what
        findings = check_answers(_postfix(), _policyd(), lambda _: "DUNNO")
        assert [(f.id, f.severity) for f in findings] == [("answers", INFO)]


def test_render_text() -> None:
    """One block per finding with what/why/fix, and a summary line."""
    text = render_text([Finding("x", ERROR, "subj", "broken", "because", "do this")])
    assert text == (
        "ERROR [x] subj\n  what: broken\n  why:  because\n  fix:  do this\n\n"
        "1 error(s), 0 warning(s), 0 info: needs fixing\n"
    )


class TestCommand:
    """``policyd doctor`` over saved postconf output."""

    @pytest.fixture
    def files(self, tmp_path: Path) -> tuple[Path, Path]:
        """The recommended configuration as saved output, in tmp_path."""
        main, master = tmp_path / "postconf.txt", tmp_path / "master.txt"
        main.write_text(_postconf(BASE))
        master.write_text(MASTER)
        return main, master

    def test_passes(
        self, capsys: pytest.CaptureFixture[str], files: tuple[Path, Path]
    ) -> None:
        """Info only: exit 0, and the summary says so."""
        main, master = files
        code, out, err = run_main(
            capsys, ["doctor", "--postconf", str(main), "--master", str(master)], {}
        )
        assert (code, err) == (0, "")
        assert out.endswith("0 error(s), 0 warning(s), 1 info: nothing to fix\n")

    def test_needs_fixing_json(
        self, capsys: pytest.CaptureFixture[str], files: tuple[Path, Path]
    ) -> None:
        """A warning: exit 1; --json lists the findings and a summary."""
        main, master = files
        code, out, _ = run_main(
            capsys,
            ["doctor", "--json", "--postconf", str(main), "--master", str(master)],
            {"POLICYD_SMTPD_CAPACITY": "7"},
        )
        report = json.loads(out)
        assert code == 1
        assert report["summary"] == {
            "error": 0,
            "warning": 1,
            "info": 1,
            "needs_fixing": True,
        }
        assert report["findings"][0]["id"] == "smtpd-capacity"
        assert set(report["findings"][0]) == {
            "id",
            "severity",
            "subject",
            "what",
            "why",
            "fix",
        }

    def test_real_output(self, capsys: pytest.CaptureFixture[str]) -> None:
        """
        Real Debian output with deploy/postfix/main.cf: only the capacity needs fixing.

        smtp and submission have 100 processes each, both asking policyd.
        """
        code, out, _ = run_main(
            capsys,
            [
                "doctor",
                "--postconf",
                str(DATA / "recommended.postconf"),
                "--master",
                str(DATA / "debian.master"),
            ],
            {},
        )
        assert code == 1
        assert "fix:  POLICYD_SMTPD_CAPACITY=200\n" in out
        assert "1 warning(s)" in out

    def test_docs_sample(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The sample in docs/operations.md is what doctor prints for it."""
        code, out, _ = run_main(
            capsys,
            [
                "doctor",
                "--postconf",
                str(DATA / "mistakes.postconf"),
                "--master",
                str(DATA / "debian.master"),
            ],
            {},
        )
        operations = (DATA.parent.parent.parent / "docs" / "operations.md").read_text()
        assert code == 1
        assert f"```\n$ policyd doctor\n{out}```\n" in operations

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            (None, "policyd: cannot read {path}: No such file or directory\n"),
            ("hello world\n", "policyd: {path} line 1 is not 'name = value'"),
            ("myhostname = mx\n", "policyd: {path} has no mail_version"),
        ],
    )
    def test_unreadable(
        self,
        capsys: pytest.CaptureFixture[str],
        tmp_path: Path,
        content: str | None,
        message: str,
    ) -> None:
        """A missing file or one that is not postconf output: exit 2, one line."""
        path = tmp_path / "postconf.txt"
        if content is not None:
            path.write_text(content)
        code, out, err = run_main(capsys, ["doctor", "--postconf", str(path)], {})
        assert (code, out) == (2, "")
        assert err.startswith(message.format(path=path))
        assert err.count("\n") == 1

    def test_bad_master(
        self, capsys: pytest.CaptureFixture[str], files: tuple[Path, Path]
    ) -> None:
        """A --master file that is postconf output, not postconf -M: exit 2."""
        main, _ = files
        code, _, err = run_main(
            capsys, ["doctor", "--postconf", str(main), "--master", str(main)], {}
        )
        assert code == 2
        assert "is not a master.cf service" in err

    def test_bad_policyd_variable(
        self, capsys: pytest.CaptureFixture[str], files: tuple[Path, Path]
    ) -> None:
        """A bad POLICYD_* value is the usual configuration error, exit 2."""
        main, _ = files
        code, _, err = run_main(
            capsys,
            ["doctor", "--postconf", str(main)],
            {"POLICYD_SMTPD_CAPACITY": "lots"},
        )
        assert code == 2
        assert err.startswith("policyd: POLICYD_SMTPD_CAPACITY='lots' is invalid")

    def test_postconf_fails(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """A failing postconf (no such config dir): exit 2, one line."""
        code, out, err = run_main(
            capsys, ["doctor", "--config-dir", str(tmp_path / "none")], {}
        )
        assert (code, out) == (2, "")
        assert err.startswith("policyd: ")
        assert err.count("\n") == 1
