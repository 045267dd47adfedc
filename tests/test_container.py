"""
deploy/container: the Containerfile and the compose example.

Without a container engine here, the image is checked piece by piece: the
final stage runs as an unprivileged user, its environment is a valid policyd
configuration, the files it copies exist, and its HEALTHCHECK command, run
for real against a policyd, passes while policyd serves and fails when it
does not.  (The image itself is not built by the tests: no container engine
runs where they run.)
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from policyd import config
from policyd.testing.daemon import PolicydProcess

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
COMPOSE = ROOT / "deploy" / "container" / "compose.yaml"


def instructions() -> list[tuple[str, str]]:
    """The Containerfile's instructions (continuation lines joined)."""
    joined = CONTAINERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the image's last stage."""
    steps = instructions()
    last = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last:]


def image_env() -> dict[str, str]:
    """The ENV of the final stage, as policyd would see it."""
    env: dict[str, str] = {}
    for keyword, rest in final_stage():
        if keyword == "ENV":
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def healthcheck(port: int) -> list[str]:
    """The HEALTHCHECK command, pointed at *port*, run by this Python."""
    (rest,) = [r for k, r in final_stage() if k == "HEALTHCHECK"]
    argv: list[str] = json.loads(rest[rest.index("CMD") + 3 :].strip())
    python, flag, code = argv
    assert (python, flag) == ("python", "-c")
    return [sys.executable, flag, code.replace("127.0.0.1:10041", f"127.0.0.1:{port}")]


class TestImage:
    """What the image runs, as whom, with what."""

    def test_unprivileged(self) -> None:
        """The final stage switches to a user that is not root."""
        users = [r for k, r in final_stage() if k == "USER"]
        assert users
        assert users[-1] not in ("root", "0")

    def test_runs_policyd_serve(self) -> None:
        """The entry point is policyd, the command serve; SIGTERM stops it."""
        stage = dict(final_stage())
        assert json.loads(stage["ENTRYPOINT"]) == ["policyd"]
        assert json.loads(stage["CMD"]) == ["serve"]
        assert stage["STOPSIGNAL"] == "SIGTERM"
        assert stage["EXPOSE"].split() == ["10040", "10041"]

    def test_environment_is_a_valid_configuration(self) -> None:
        """The image's POLICYD_* settings load; it listens where it exposes."""
        env = {k: v for k, v in image_env().items() if k.startswith("POLICYD_")}
        cfg = config.load(env)
        assert cfg.listen == ("tcp:10040:interface=0.0.0.0",)
        assert cfg.metrics_listen == "tcp:10041:interface=0.0.0.0"

    def test_copies_what_exists(self) -> None:
        """Every file the build stage copies from the checkout exists."""
        for keyword, rest in instructions():
            if keyword == "COPY" and not rest.startswith("--from"):
                for source in rest.split()[:-1]:
                    assert (ROOT / source).exists(), source

    def test_healthcheck_follows_policyd(self) -> None:
        """The HEALTHCHECK passes while policyd serves, fails once it is gone."""
        with PolicydProcess() as policyd:
            ok = subprocess.run(healthcheck(policyd.metrics_port), timeout=30)
            assert ok.returncode == 0
            port = policyd.metrics_port
        gone = subprocess.run(
            healthcheck(port), timeout=30, capture_output=True, check=False
        )
        assert gone.returncode != 0


class TestCompose:
    """The compose example: policyd healthy before Postfix, its settings valid."""

    def test_settings_and_order(self) -> None:
        """Policyd's environment loads; Postfix waits for policyd to be healthy."""
        compose = yaml.safe_load(COMPOSE.read_text())
        policyd = compose["services"]["policyd"]
        env = {**image_env(), **policyd["environment"]}
        config.load({k: v for k, v in env.items() if k.startswith("POLICYD_")})
        build = policyd["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
            CONTAINERFILE.resolve()
        )
        postfix = compose["services"]["postfix"]
        assert postfix["depends_on"]["policyd"]["condition"] == "service_healthy"
        assert "default_action=DUNNO" in COMPOSE.read_text()
