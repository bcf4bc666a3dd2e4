"""Debian's Chromium for the Playwright tests: where it is, the flags it runs with, how to start it, and how to
wait for what a gradio page shows (both gradio lines)."""

from __future__ import annotations

import time
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


def choose(page: Any, elem_id: str, value: str) -> None:
    """Pick `value` in a gr.Dropdown (3.41 and 4.x render the options as li[data-value])."""
    page.click(f"#{elem_id} input")
    page.click(f'#{elem_id} li[data-value="{value}"]')


def inner_text(page: Any, elem_id: str) -> str:
    """The text an element shows."""
    return str(page.inner_text(f"#{elem_id}"))


def wait_text(page: Any, elem_id: str, needle: str, timeout_s: float = 30) -> str:
    """Wait until the element shows `needle`; its whole text."""
    deadline = time.monotonic() + timeout_s
    shown = ""
    while time.monotonic() < deadline:
        shown = inner_text(page, elem_id)
        if needle in shown:
            return shown
        time.sleep(0.25)
    raise AssertionError(f"#{elem_id} never showed {needle!r}; it shows: {shown!r}")


def wait_uploaded(page: Any, elem_id: str, names: list[str], timeout_s: float = 60) -> None:
    """Wait until gr.File lists every file and none is still uploading (a click before that sends no bytes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        shown = inner_text(page, elem_id).replace("\n.", ".")  # gradio 4 shows a name's stem and suffix apart
        if all(name in shown for name in names) and "uploading" not in shown.lower():
            return
        time.sleep(0.25)
    raise AssertionError(f"the upload did not finish: {inner_text(page, elem_id)!r}")
