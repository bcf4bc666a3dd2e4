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
    """Pick `value` in a gr.Dropdown (3.41 renders the options as li[data-value], 4.40 as li[aria-label])."""
    page.click(f"#{elem_id} input")
    page.click(f'#{elem_id} li[data-value="{value}"], #{elem_id} li[aria-label="{value}"]')


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


def record_offsite(page: Any, base: str) -> list[str]:
    """Every URL the page requests from another host (filled as it loads; data: and blob: URLs are local)."""
    found: list[str] = []

    def seen(request: Any) -> None:
        url = str(request.url)
        if not url.startswith((base, "data:", "blob:")):
            found.append(url)

    page.on("request", seen)
    return found


def record_console(page: Any, needle: str) -> list[str]:
    """The console messages of the page that contain `needle` (filled as they come)."""
    found: list[str] = []
    page.on("console", lambda message: found.append(message.text) if needle in message.text else None)
    return found


def within_viewport(page: Any, selector: str) -> bool:
    """Whether the first element matching `selector` lies wholly inside the window's width."""
    box = page.locator(selector).first.bounding_box()
    width = page.viewport_size["width"]
    return box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width


def editor_text(page: Any) -> str:
    """What the config editor holds."""
    return str(page.locator("#train_management_config textarea").input_value())


def marked_thumbnail(page: Any, elem_id: str) -> int | None:
    """The place of the thumbnail a gallery marks as selected (None when none is)."""
    marked = page.evaluate(
        f"""() => Array.from(document.querySelectorAll('#{elem_id} .grid-container .thumbnail-item'))
        .findIndex(b => b.classList.contains('selected'))"""
    )
    return None if marked < 0 else int(marked)
