"""The tab on the gradio 4 line (Forge's): Chromium drives `python -m kohya_backend serve` run by .venv-gradio4
(4.40). Dataset creation and full validation run in the background and reach the page through its poll; an open
page logs no "Too many arguments provided for the endpoint" (gradio 4.40's page client logs it for every event
that sends inputs, so nothing the page runs by itself sends any); the page asks no other host for anything; a
deleted image leaves the editor on the image the gallery marks; the editor's draft survives a reload; a job's status
and progress stay on screen at 800 px. The gradio 3.41 line does the same inside tests/test_ui_browser.py.

No training here (the gradio 4 environment has no torch), so the run takes seconds.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_support import (
    editor_text,
    launch_chromium,
    marked_thumbnail,
    record_console,
    record_offsite,
    require_chromium,
    wait_text,
    wait_uploaded,
    within_viewport,
)
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
        offsite = record_offsite(page, base)
        warned = record_console(page, "Too many arguments provided for the endpoint")
        try:
            page.goto(base)
            page.wait_for_selector("#train_management_config textarea", timeout=60_000)
            # The page's load event has run (it fills the model info, naming the folder for checkpoints).
            wait_text(page, "train_management_model_info", "put an SD 1.5 or SDXL .safetensors")
            assert str(home / "models") in page.inner_text("#train_management_model_info")
            page.wait_for_timeout(5_000)  # the poll has run at least twice
            assert warned == [], "an idle page sent inputs"
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
            (folder / "zz-broken.png").unlink()
            _delete_an_image(page, folder)
            page.click("button:has-text('Training')")  # the training form has it as its dataset
            page.wait_for_function(
                "() => document.querySelector('#train_management_dataset input').value === 'polled'"
            )
            _draft_and_narrow_window(page, home)
        finally:
            page.screenshot(path=str(ARTIFACTS / f"{line}-last.png"), full_page=True)
            browser.close()
    assert offsite == [], offsite


def _delete_an_image(page: Any, folder: Path) -> None:
    """Point 3 on gradio 4: the delete asks first; the editor then holds the image the gallery marks."""
    page.locator("#train_management_ds_gallery .grid-container .thumbnail-item").nth(1).click()
    page.wait_for_function(
        "() => document.querySelector('#train_management_ds_caption textarea').value.includes('green')"
    )
    page.click("#train_management_ds_delete_image")
    wait_text(page, "train_management_ds_image_confirm", "Delete 2_polled/green.png")
    page.click("#train_management_ds_image_confirm_yes")
    wait_text(page, "train_management_ds_message", "Now showing 2_polled/red.png")
    assert not (folder / "green.png").exists()
    page.wait_for_function(
        "() => document.querySelector('#train_management_ds_caption textarea').value.includes('red')"
    )
    assert marked_thumbnail(page, "train_management_ds_gallery") == 1


def _draft_and_narrow_window(page: Any, home: Path) -> None:
    """Points 2 and 4 on gradio 4: the draft survives a reload; a job's status and progress fit 800 px."""
    from kohya_backend.jobs.store import JobStore

    JobStore(home).create(
        fm_type="sd_1_5",
        model="m.safetensors",
        dataset="polled",
        instance_type="local",
        output_name="a_rather_long_output_name_for_a_narrow_window",
        config_toml="",
        params={},
    )  # fmt: skip  (the server's scheduler fails it: a row either way)
    page.locator("#train_management_config textarea").fill("network_dim = 12\n# a draft\n")
    page.reload()
    page.wait_for_selector("#train_management_config textarea", timeout=60_000)
    page.wait_for_function(
        "() => document.querySelector('#train_management_config textarea').value.includes('# a draft')"
    )
    assert editor_text(page) == "network_dim = 12\n# a draft\n"
    page.wait_for_selector("#train_management_jobs td:has-text('a_rather_long_output_name')", timeout=30_000)
    page.set_viewport_size({"width": 800, "height": 900})
    page.wait_for_timeout(300)
    for cell in (
        "th:has-text('status')",
        "th:has-text('progress')",
        "tbody td >> nth=0",
        "tbody td >> nth=1",
    ):
        assert within_viewport(page, f"#train_management_jobs {cell}"), cell
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 800
    page.screenshot(path=str(ARTIFACTS / "gradio4-800px.png"), full_page=False)
