"""
The documentation site: mkdocs (Material theme) over docs/, built strictly.

``mkdocs build --strict`` fails on a page missing from the navigation, a
link to a page or anchor that does not exist, or an unknown file: the same
pages read on GitHub and on the site stay whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_strict_build(tmp_path: Path) -> None:
    """Mkdocs build --strict succeeds and writes every page."""
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for page in (ROOT / "docs").glob("*.md"):
        built = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (site / built).is_file(), page.name


def test_every_page_in_the_navigation() -> None:
    """Each docs/*.md page is in mkdocs.yml's nav, and the nav names no other."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = {next(iter(item.values())) for item in config["nav"]}
    pages = {page.name for page in (ROOT / "docs").glob("*.md")}
    assert in_nav == pages
