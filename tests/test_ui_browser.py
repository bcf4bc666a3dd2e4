"""The tab in a real browser: Playwright drives Debian's Chromium against `python -m kohya_backend serve --demo`.

Creates a dataset by uploading captioned images, edits a caption, deletes an image (asked first; the editor then
shows the image the gallery marks), formats a config with a deliberate error (the line is reported) and sees a
refusal replace that answer, keeps the editor's draft across a reload and in a preset, fixes the config, creates a
job on the demo model, watches the Trainings List reach `completed` (status and progress visible at 1366 and 800
px), opens the job with the keyboard, downloads its LoRA, and finds it in HOME/lora. The page asks no other host
for anything. Screenshots go to test-artifacts/ui-browser/.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_support import (
    choose,
    editor_text,
    launch_chromium,
    marked_thumbnail,
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
ARTIFACTS = ROOT / "test-artifacts" / "ui-browser"
# The demo config (64 px, tiny model) with a type error on line 5; the fix replaces that line.
CONFIG_LINES = [
    'tokenizer_cache_dir = "tokenizer"',
    'caption_extension = ".txt"',
    'resolution = "64,64"',
    "enable_bucket = false",
    'network_dim = "eight"',
    "network_alpha = 4",
    "train_batch_size = 2",
    "max_train_steps = 24",
    'optimizer_type = "AdamW"',
    "unet_lr = 1e-3",
    'lr_scheduler = "constant"',
    'mixed_precision = "no"',
    'save_precision = "fp16"',
    'output_name = "browser_lora"',
]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (240, 210, 40)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    require_chromium()
    home = tmp_path_factory.mktemp("ui-home")
    port = free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "server.log", "w")  # noqa: SIM115 (closed in the teardown)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "kohya_backend",
        "serve",
        "--demo",
        "--home",
        str(home),
        "--port",
        f"{port}",
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (ARTIFACTS / "server.log").read_text()
            try:
                if httpx.get(f"{base}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the standalone app did not start"
            time.sleep(0.5)
        yield base, home
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, (name, colour) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (64, 64), (250, 250, 250))
        image.paste(colour, (8 + index * 4, 8, 48 + index * 4, 48))
        path = folder / f"{name}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(f"shape, {name} square, white background\n")
        files += [path, path.with_suffix(".txt")]
    return files


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_dataset_format_train_and_deliver_in_the_browser(server: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    base, home = server
    uploads = _images(tmp_path / "uploads")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        offsite = record_offsite(page, base)
        try:
            page.goto(base)
            page.wait_for_selector("#train_management_config textarea", timeout=60_000)
            wait_text(page, "train_management_model_info", "SD 1.5")

            # Remote GPU workers: add one (nothing listens on its port: it shows as offline), then remove it.
            page.click("#train_management_workers")
            page.fill(
                "#train_management_worker_url textarea, #train_management_worker_url input",
                "http://127.0.0.1:9",
            )
            token = page.locator("#train_management_worker_token input")
            assert token.get_attribute("type") == "password"
            token.fill("browser-worker-token")
            page.click("#train_management_worker_add")
            wait_text(page, "train_management_worker_message", "Worker 127.0.0.1-9 does not answer")
            assert "offline" in wait_text(page, "train_management_workers_table", "http://127.0.0.1:9")
            assert token.input_value() == ""
            page.click("#train_management_instance input")
            page.wait_for_selector('#train_management_instance li[data-value*="[worker:127.0.0.1-9]"]')
            page.keyboard.press("Escape")
            _shot(page, "0-worker-added")
            page.click("#train_management_worker_remove")
            wait_text(page, "train_management_worker_message", "Removed worker 127.0.0.1-9")
            assert "browser-worker-token" not in (home / "workers.json").read_text()  # gone with the worker

            # Datasets: upload four captioned images as "shapes" with 5 repeats, then edit a caption.
            page.click("button:has-text('Datasets')")
            page.fill("#train_management_ds_name textarea, #train_management_ds_name input", "shapes")
            page.fill("#train_management_ds_repeats input", "5")
            page.set_input_files("#train_management_ds_files input[type=file]", [str(p) for p in uploads])
            wait_uploaded(page, "train_management_ds_files", [p.name for p in uploads])
            page.click("#train_management_ds_create")
            wait_text(page, "train_management_ds_create_message", "Created dataset shapes", 60)
            assert sorted(p.name for p in (home / "datasets/shapes/5_shapes").iterdir()) == sorted(
                p.name for p in uploads
            )
            wait_text(page, "train_management_ds_report", "4 image(s), 20 with repeats")
            caption = page.locator("#train_management_ds_caption textarea")
            page.locator("#train_management_ds_gallery .grid-container .thumbnail-item").first.click()
            page.wait_for_function(
                "() => document.querySelector('#train_management_ds_caption textarea').value.includes('blue')"
            )
            caption.fill("shape, blue square, edited in the browser")
            page.click("#train_management_ds_save")
            wait_text(page, "train_management_ds_message", "Saved the caption")
            assert (home / "datasets/shapes/5_shapes/blue.txt").read_text() == (
                "shape, blue square, edited in the browser\n"
            )
            # The full validation decodes every image in the background: a truncated one only it can see.
            broken = home / "datasets/shapes/5_shapes/zz-broken.png"
            broken.write_bytes((home / "datasets/shapes/5_shapes/blue.png").read_bytes()[:60])
            page.click("#train_management_ds_validate")
            assert "zz-broken.png" in wait_text(page, "train_management_ds_report", "Problem", 60)
            broken.unlink()
            _shot(page, "1-dataset-created")
            _delete_an_image_the_gallery_marks(page, home)

            # Training: the new dataset, a config with an error on line 5, then the fix.
            page.click("button:has-text('Training')")
            choose(page, "train_management_dataset", "shapes")
            prompts = (
                home / "models" / "browser-prompts.txt"
            )  # samples for the Samples gallery (and a preview)
            prompts.write_text("a blue square, white background --w 64 --h 64 --s 6 --d 3\n")
            config = [*CONFIG_LINES, f'sample_prompts = "{prompts.as_posix()}"', "sample_every_n_steps = 12"]
            editor = page.locator("#train_management_config textarea")
            editor.fill("\n".join(config) + "\n")
            page.click("#train_management_format")
            issues = wait_text(page, "train_management_issues", "line 5")
            assert "network_dim" in issues
            _shot(page, "2-format-error")
            _a_refusal_replaces_the_format_answer(page)
            _drafts_and_presets_keep_the_editor(page, "\n".join(config) + "\n")
            editor = page.locator("#train_management_config textarea")
            editor.fill("\n".join(config).replace('network_dim = "eight"', "network_dim = 4") + "\n")
            page.click("#train_management_format")
            wait_text(page, "train_management_issues", "No problems found")
            plan = wait_text(page, "train_management_plan", "total steps")
            assert "5_shapes" in plan and "24" in plan
            _shot(page, "3-format-plan")

            page.click("#train_management_create")
            message = wait_text(page, "train_management_create_message", "queued", 60)
            job_id = message.split("Job ")[1].split()[0]
            wait_text(page, "train_management_jobs", "completed", 180)
            _status_fits_narrow_windows(page)
            # The row is one tab stop after the Refresh button; Enter opens its job.
            page.focus("#train_management_refresh_jobs")
            page.keyboard.press("Tab")
            assert page.evaluate("() => document.activeElement.tagName") == "TR"
            page.keyboard.press("Enter")
            wait_text(page, "train_management_job_status", "completed")
            assert job_id in inner_job_status(page)
            page.wait_for_function(
                "() => document.querySelector('#train_management_log textarea').value.length > 0"
            )
            page.wait_for_selector("#train_management_samples img", timeout=30_000)
            _shot(page, "4-completed")
            _the_lora_downloads_from_the_page(page, home)
            page.click("#train_management_delete")  # asked first; Keep leaves the job
            wait_text(page, "train_management_delete_confirm", f"Delete job {job_id}")
            page.click("#train_management_delete_confirm_no")
            page.wait_for_selector("#train_management_delete_confirm", state="hidden")
        finally:
            _shot(page, "last")
            browser.close()
    assert offsite == [], offsite
    loras = sorted(p.name for p in (home / "lora").iterdir())
    assert loras == ["browser_lora.json", "browser_lora.preview.png", "browser_lora.safetensors"], loras
    stamp_source = httpx.get(f"{base}/train-management/v1/trainings/{job_id}").json()["job"]["progress"]
    assert stamp_source["delivered"].endswith("browser_lora.safetensors")
    shutil.copy(ARTIFACTS / "4-completed.png", ARTIFACTS / "tab.png")


def inner_job_status(page: Any) -> str:
    return str(page.inner_text("#train_management_job_status"))


def _delete_an_image_the_gallery_marks(page: Any, home: Path) -> None:
    """Point 3: a delete asks first, then the editor holds the image the gallery marks (the next one)."""
    folder = home / "datasets/shapes/5_shapes"
    page.locator("#train_management_ds_gallery .grid-container .thumbnail-item").nth(1).click()
    page.wait_for_function(
        "() => document.querySelector('#train_management_ds_caption textarea').value.includes('green')"
    )
    page.click("#train_management_ds_delete_image")
    wait_text(page, "train_management_ds_image_confirm", "Delete 5_shapes/green.png")
    assert (folder / "green.png").exists()  # nothing deleted before the confirmation
    page.click("#train_management_ds_image_confirm_yes")
    wait_text(page, "train_management_ds_message", "Deleted 5_shapes/green.png. Now showing 5_shapes/red.png")
    assert not (folder / "green.png").exists() and (folder / "red.png").exists()
    page.wait_for_function(
        "() => document.querySelector('#train_management_ds_caption textarea').value.includes('red square')"
    )
    assert marked_thumbnail(page, "train_management_ds_gallery") == 1  # the place the editor's image is at
    assert page.locator("#train_management_ds_image input").input_value() == "5_shapes/red.png"
    page.fill("#train_management_ds_caption textarea", "shape, red square, saved after a delete")
    page.click("#train_management_ds_save")
    wait_text(page, "train_management_ds_message", "Saved the caption of `5_shapes/red.png`".replace("`", ""))
    assert (folder / "red.txt").read_text() == "shape, red square, saved after a delete\n"
    assert (folder / "yellow.txt").read_text() == "shape, yellow square, white background\n"


def _a_refusal_replaces_the_format_answer(page: Any) -> None:
    """Point 1: Create's refusal replaces Format's answer (no old line-5 error under it) and lists every reason."""
    choose(page, "train_management_model", "demo-sd_1_5.safetensors")
    page.click("#train_management_create")
    refusal = wait_text(page, "train_management_create_message", "The job was refused")
    assert "line 5" in refusal and "network_dim" in refusal
    page.wait_for_function(
        "() => !document.querySelector('#train_management_issues').innerText.includes('line 5')"
    )
    page.click("#train_management_format")  # and Format's answer replaces the refusal
    wait_text(page, "train_management_issues", "line 5")
    page.wait_for_function(
        "() => !document.querySelector('#train_management_create_message').innerText.includes('refused')"
    )


def _drafts_and_presets_keep_the_editor(page: Any, text: str) -> None:
    """Point 2: the editor survives a reload; Load FM Type defaults asks first; a preset brings the text back."""
    page.reload()
    page.wait_for_selector("#train_management_config textarea", timeout=60_000)
    page.wait_for_function(
        f"() => document.querySelector('#train_management_config textarea').value === {text!r}"
    )
    page.click("#train_management_reset")
    wait_text(page, "train_management_editor_confirm", "Replace your edits in config_params with the SD 1.5")
    page.click("#train_management_editor_confirm_no")
    assert editor_text(page) == text
    page.click("#train_management_presets")
    page.fill("#train_management_preset_name textarea, #train_management_preset_name input", "browser preset")
    page.click("#train_management_preset_save")
    wait_text(page, "train_management_preset_message", "Saved preset browser preset")
    page.click("#train_management_reset")
    page.click("#train_management_editor_confirm_yes")
    page.wait_for_function(
        "() => document.querySelector('#train_management_config textarea').value.includes('# Demo')"
    )
    choose(page, "train_management_preset", "browser preset")
    page.click("#train_management_preset_load")  # the editor holds the defaults: nothing to ask
    page.wait_for_function(
        f"() => document.querySelector('#train_management_config textarea').value === {text!r}"
    )
    choose(page, "train_management_dataset", "shapes")


def _status_fits_narrow_windows(page: Any) -> None:
    """Point 4: at 1366 and 800 px the job's status and progress are on screen; the table scrolls inside."""
    for width in (1366, 800):
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(300)
        assert within_viewport(page, "#train_management_jobs th:has-text('status')"), width
        assert within_viewport(page, "#train_management_jobs td:has-text('completed')"), width
        assert within_viewport(page, "#train_management_jobs th:has-text('progress')"), width
        assert page.evaluate("() => document.documentElement.scrollWidth") <= width
        _shot(page, f"5-jobs-{width}px")
    page.set_viewport_size({"width": 1500, "height": 1100})


def _the_lora_downloads_from_the_page(page: Any, home: Path) -> None:
    """Point 8: the standalone page links the job's LoRA (and samples) for download."""
    link = (
        page.locator("#train_management_downloads tr", has_text="browser_lora.safetensors").locator("a").first
    )
    link.wait_for(timeout=30_000)
    answer = page.request.get(link.get_attribute("href"))
    assert answer.ok and answer.body() == (home / "lora/browser_lora.safetensors").read_bytes()
    assert (
        page.locator("#train_management_downloads tr", has_text=".png").locator("a").count() >= 1
    )  # a sample
