"""``policyd doctor`` on a real, running Postfix (the private test-bed instance).

Each test starts its own instance with `PostfixInstance`, and doctor reads
its configuration through ``--config-dir`` (``postconf -c DIR`` and
``postconf -c DIR -M``), exactly as an admin would on the system one; one
test also saves that output and checks it again from files.  A real
``policyd serve`` answers ``--ask``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from helpers import run_main

from policyd.testing.daemon import PolicydProcess
from policyd.testing.postfix import (
    PostfixConfig,
    PostfixInstance,
    PostfixTools,
    SmtpListener,
)
from policyd.testing.system import free_port

pytestmark = pytest.mark.postfix


@pytest.fixture(scope="module")
def policyd() -> Iterator[PolicydProcess]:
    """A running policyd on 127.0.0.1 and a port of its choosing."""
    process = PolicydProcess()
    try:
        yield process.start()
    finally:
        process.kill()


def _env(policyd: PolicydProcess, capacity: int) -> dict[str, str]:
    """The POLICYD_* settings doctor compares the Postfix configuration with."""
    return {
        "POLICYD_LISTEN": f"tcp:{policyd.port}:interface=127.0.0.1",
        "POLICYD_SMTPD_CAPACITY": str(capacity),
    }


def test_recommended_wiring_passes(
    postfix_tools: PostfixTools,
    policyd: PolicydProcess,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """
    deploy/postfix/main.cf's wiring on a live Postfix: exit 0, info only.

    One smtpd listener of 10 processes, the check with timeout=10s and
    default_action=DUNNO after permit_mynetworks, POLICYD_SMTPD_CAPACITY=10;
    ``--ask`` reaches the running policyd and reports its DUNNO.
    """
    base = PostfixConfig(
        policy_port=policyd.port, listeners=[SmtpListener("smtp", free_port(), 10)]
    )
    config = attrs.evolve(
        base,
        main_extra={
            "smtpd_recipient_restrictions": "permit_mynetworks, "
            f"permit_sasl_authenticated, reject_unauth_destination, "
            f"{base.policy_check}"
        },
    )
    with PostfixInstance(config, postfix_tools) as instance:
        assert instance.master_pid() is not None
        code, out, err = run_main(
            capsys,
            ["doctor", "--ask", "--config-dir", str(instance.config_dir)],
            _env(policyd, 10),
        )
    assert (code, err) == (0, ""), out
    assert f"policyd at 127.0.0.1:{policyd.port} answers: DUNNO" in out
    assert out.endswith("0 error(s), 0 warning(s), 2 info: nothing to fix\n")


def test_classic_mistakes(
    postfix_tools: PostfixTools,
    policyd: PolicydProcess,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """
    The classic mistakes on a live Postfix: exit 1, each with its fix.

    No default_action (Postfix's 451), the 100 s default timeout, and
    POLICYD_SMTPD_CAPACITY at its default 100 for two listeners of 10
    processes; and the test bed's list has no permit_mynetworks before the
    check.  The same findings come from the saved postconf output.
    """
    config = PostfixConfig(policy_port=policyd.port, policy_settings=())
    endpoint = f"inet:127.0.0.1:{policyd.port}"
    with PostfixInstance(config, postfix_tools) as instance:
        assert instance.master_pid() is not None
        live = run_main(
            capsys,
            ["doctor", "--json", "--config-dir", str(instance.config_dir)],
            _env(policyd, 100),
        )
        (tmp_path / "postconf.txt").write_text(instance.postconf())
        (tmp_path / "master.txt").write_text(instance.postconf("-M"))
    saved = run_main(
        capsys,
        [
            "doctor",
            "--json",
            "--postconf",
            str(tmp_path / "postconf.txt"),
            "--master",
            str(tmp_path / "master.txt"),
        ],
        _env(policyd, 100),
    )
    assert saved == live
    code, out, err = live
    assert (code, err) == (1, "")
    findings = {f["id"]: f for f in json.loads(out)["findings"]}
    needs_fixing = {i for i, f in findings.items() if f["severity"] != "info"}
    assert needs_fixing == {
        "default-action",
        "policy-timeout",
        "smtpd-capacity",
        "permit-order",
    }
    fixed = f"check_policy_service {{ {endpoint}, default_action=DUNNO, timeout=10s }}"
    assert findings["default-action"]["fix"].endswith(f"with '{fixed}'")
    assert (
        "451 4.3.5 Server configuration problem" in findings["default-action"]["what"]
    )
    assert "100s" in findings["policy-timeout"]["what"]
    assert findings["smtpd-capacity"]["fix"] == "POLICYD_SMTPD_CAPACITY=20"
