"""Debian's Chromium for the Playwright tests: where it is, the flags it runs with, and how to start it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip


def require_chromium() -> None:
    """Skip the test when Debian's Chromium is not installed (tools/setup.sh dev installs it)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's Chromium is not installed (tools/setup.sh dev installs it)")


def launch_chromium(playwright: Any) -> Any:
    """A headless Chromium from a sync_playwright() context (never Playwright's own download)."""
    require_chromium()
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
