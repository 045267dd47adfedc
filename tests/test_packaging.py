"""
Packaging: ``python -m build`` makes an sdist and a wheel that install and run.

The build runs on a copy of the tracked files (as a release would be made
from a clean checkout), and the wheel is installed into a fresh virtualenv,
with its dependencies, like ``pipx install`` would: ``policyd --version``
there says the version policyd/__init__.py holds, the one place it is
written.  It needs the package index the test suite's own set-up uses.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from policyd import __version__

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sdist and a wheel built from the tracked files of this checkout."""
    source = tmp_path_factory.mktemp("source")
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        path = ROOT / name.decode()
        if path.is_file():
            target = source / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist)],
        cwd=source,
        capture_output=True,
        check=True,
        timeout=600,
    )
    return dist


def test_sdist_and_wheel(built: Path) -> None:
    """One sdist and one wheel, named with the version from policyd/__init__.py."""
    (sdist,) = built.glob("*.tar.gz")
    (wheel,) = built.glob("*.whl")
    assert sdist.name == f"policyd-{__version__}.tar.gz"
    assert wheel.name.startswith(f"policyd-{__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "policyd/py.typed" in names
    assert "policyd/cli.py" in names
    assert not any(name.startswith("tests/") for name in names)
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
    assert f"policyd-{__version__}/README.md" in members


def test_wheel_installs_and_runs(built: Path, tmp_path: Path) -> None:
    """In a fresh virtualenv the wheel's `policyd` runs and knows its version."""
    (wheel,) = built.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        capture_output=True,
        check=True,
        timeout=600,
    )
    version = subprocess.run(
        [str(venv / "bin" / "policyd"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert version.stdout.strip() == f"policyd {__version__}"
    shown = subprocess.run(
        [str(venv / "bin" / "policyd"), "config"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert "POLICYD_LISTEN=" in shown.stdout
