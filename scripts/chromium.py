"""Headless Chromium: a report as a browser shows it (its DOM) and as a picture (a screenshot).

Used by scripts/screenshot_report.py (docs/report.png) and by the report tests.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _chromium(args: list[str], profile: Path, chromium: str | None) -> subprocess.CompletedProcess:
    """Run headless Chromium with a throwaway profile and no network features."""
    binary = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise FileNotFoundError("chromium is not installed; install it with `apt-get install -y chromium`")
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def screenshot(
    html_file: Path, png: Path, width: int = 1280, height: int = 2400, chromium: str | None = None
) -> Path:
    """Render an HTML file in headless Chromium and save a width x height PNG screenshot of it."""
    with tempfile.TemporaryDirectory() as profile:
        _chromium(
            [
                f"--screenshot={Path(png).resolve()}",
                f"--window-size={width},{height}",
                Path(html_file).resolve().as_uri(),
            ],
            Path(profile),
            chromium,
        )
    return Path(png)


def dump_dom(html_file: Path, chromium: str | None = None) -> str:
    """The DOM of an HTML file after headless Chromium loaded it (what a browser really shows)."""
    with tempfile.TemporaryDirectory() as profile:
        return _chromium(["--dump-dom", Path(html_file).resolve().as_uri()], Path(profile), chromium).stdout
