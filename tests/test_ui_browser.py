"""The tab in a real browser: Playwright drives Debian's Chromium against `python -m kohya_backend serve --demo`.

Creates a dataset by uploading captioned images, edits a caption, formats a config with a deliberate error (the
line is reported), fixes it, creates a job on the demo model, watches the Trainings List reach `completed`, and
finds the LoRA in HOME/lora. Screenshots go to test-artifacts/ui-browser/.
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
from browser_support import choose, launch_chromium, require_chromium, wait_text, wait_uploaded
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
            wait_text(page, "train_management_worker_message", "Added worker 127.0.0.1-9")
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
            page.click(f"#train_management_jobs td:has-text('{job_id}')")
            wait_text(page, "train_management_job_status", "completed")
            page.wait_for_function(
                "() => document.querySelector('#train_management_log textarea').value.length > 0"
            )
            page.wait_for_selector("#train_management_samples img", timeout=30_000)
            _shot(page, "4-completed")
        finally:
            _shot(page, "last")
            browser.close()
    loras = sorted(p.name for p in (home / "lora").iterdir())
    assert loras == ["browser_lora.json", "browser_lora.preview.png", "browser_lora.safetensors"], loras
    stamp_source = httpx.get(f"{base}/train-management/v1/trainings/{job_id}").json()["job"]["progress"]
    assert stamp_source["delivered"].endswith("browser_lora.safetensors")
    shutil.copy(ARTIFACTS / "4-completed.png", ARTIFACTS / "tab.png")
