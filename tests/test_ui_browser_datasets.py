"""Dataset creation and full validation run in the background and reach the page through its poll on the gradio 4
line: Chromium drives `python -m kohya_backend serve` run by .venv-gradio4 (4.40). The gradio 3.41 line does the
same inside tests/test_ui_browser.py.

No training here (the gradio 4 environment has no torch), so the run takes seconds.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser_support import launch_chromium, require_chromium, wait_text, wait_uploaded
from PIL import Image
from server_support import free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "ui-browser-datasets"
PYTHONS = {"gradio4": ROOT / ".venv-gradio4" / "bin" / "python"}


@pytest.fixture(params=list(PYTHONS))
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """The standalone app (no demo) run by the gradio line's interpreter: (URL, home, line)."""
    require_chromium()
    python = PYTHONS[request.param]
    assert python.exists(), "the test environments are missing: run `bash tools/setup.sh dev`"
    home, port = tmp_path / "home", free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / f"server-{request.param}.log", "w")  # noqa: SIM115 (closed in the teardown)
    process = subprocess.Popen(
        [str(python), "-m", "kohya_backend", "serve", "--home", str(home), "--port", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (ARTIFACTS / f"server-{request.param}.log").read_text()
            try:
                if httpx.get(f"{base}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the standalone app did not start"
            time.sleep(0.3)
        yield base, home, request.param
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def _uploads(folder: Path) -> list[Path]:
    folder.mkdir()
    files = []
    for name, colour in (("red", (220, 40, 40)), ("green", (40, 170, 60)), ("blue", (40, 70, 210))):
        Image.new("RGB", (96, 64), colour).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} rectangle\n")
        files += [folder / f"{name}.png", folder / f"{name}.txt"]
    return files


def test_create_and_validate_a_dataset_finish_through_the_poll(
    served: tuple[str, Path, str], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    base, home, line = served
    uploads = _uploads(tmp_path / "uploads")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(base)
            page.wait_for_selector("#train_management_config textarea", timeout=60_000)
            # The page's load events have run (the last fills the model info): gradio 3.41's gr.File stays at
            # "Uploading..." for a file given while they still run.
            wait_text(page, "train_management_model_info", "No model chosen")
            page.click("button:has-text('Datasets')")
            page.fill("#train_management_ds_name textarea, #train_management_ds_name input", "polled")
            page.fill("#train_management_ds_repeats input", "2")
            page.set_input_files("#train_management_ds_files input[type=file]", [str(p) for p in uploads])
            wait_uploaded(page, "train_management_ds_files", [p.name for p in uploads])
            page.click("#train_management_ds_create")
            created = wait_text(page, "train_management_ds_create_message", "Created dataset polled", 60)
            assert "with 3 image(s)" in created
            assert sorted(p.name for p in (home / "datasets/polled/2_polled").iterdir()) == sorted(
                p.name for p in uploads
            )
            wait_text(page, "train_management_ds_report", "3 image(s), 6 with repeats")  # browsing it
            # The full validation decodes every image in the background: a truncated one only it can see.
            folder = home / "datasets/polled/2_polled"
            (folder / "zz-broken.png").write_bytes((folder / "red.png").read_bytes()[:60])
            page.click("#train_management_ds_validate")
            assert "zz-broken.png" in wait_text(page, "train_management_ds_report", "Problem", 60)
            page.screenshot(path=str(ARTIFACTS / f"{line}-validated.png"), full_page=True)
            page.click("button:has-text('Training')")  # the training form has it as its dataset
            page.wait_for_function(
                "() => document.querySelector('#train_management_dataset input').value === 'polled'"
            )
        finally:
            page.screenshot(path=str(ARTIFACTS / f"{line}-last.png"), full_page=True)
            browser.close()
