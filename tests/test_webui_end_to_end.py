"""A training through the extension inside the stand-in WebUI, watched in a real browser (Debian's Chromium).

The job is submitted over the WebUI's app with --api-auth, the trainer runs as a child process, the WebUI's model
is unloaded first, the LoRA lands in the WebUI's Lora folder (subfolder setting), the WebUI's Lora list is
refreshed server-side, and the page's javascript/train_management.js clicks the Lora cards' refresh buttons.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "webui_stub"))
from browser_support import launch_chromium, require_chromium
from jobs_support import FAST_CONFIG
from stub_webui import running_webui

from kohya_backend.assets.demo import prepare_demo
from kohya_backend.service.api import API_PREFIX

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "webui"
CONFIG = FAST_CONFIG.format(steps=4, name="webui_lora")


def _webui_folders(tmp_path: Path) -> Path:
    """A WebUI data folder holding the demo checkpoint (with its tokenizer) and the demo dataset in the home."""
    demo = tmp_path / "demo"
    prepare_demo(demo, steps=4)
    data = tmp_path / "webui"
    checkpoints = data / "models" / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    shutil.copy(demo / "models" / "demo-sd_1_5.safetensors", checkpoints)
    shutil.copytree(demo / "models" / "tokenizer", checkpoints / "tokenizer")
    shutil.copytree(demo / "datasets" / "demo", data / "train_management" / "datasets" / "demo")
    return data


def _until(done: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := done()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


@pytest.mark.slow
@pytest.mark.browser
def test_a_training_in_the_webui_lands_in_its_lora_cards(tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    require_chromium()
    data = _webui_folders(tmp_path)
    argv = ["--api-auth", "alice:wonder", "--train-python", sys.executable]
    config = {"train_management_lora_subfolder": "trained"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_webui(data, argv, config=config) as ui, playwright_api.sync_playwright() as pw:
        from modules import sd_models
        from modules import ui as webui_ui

        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(ui.url)
        page.wait_for_function("() => typeof trainManagementCheckStamp === 'function'")
        stamp = page.locator("#train_management_delivery_stamp").first
        stamp.wait_for(state="attached")
        assert stamp.evaluate("el => getComputedStyle(el).display") == "none"  # style.css reached the page
        value = page.locator(
            "#train_management_delivery_stamp.prose, #train_management_delivery_stamp .prose"
        )

        client = httpx.Client(base_url=f"{ui.url}{API_PREFIX}", auth=("alice", "wonder"), timeout=60)
        body = {"training_params": {"model": "demo-sd_1_5.safetensors", "dataset": "demo", "fm_type": "sd_1_5"},
                "config_params": CONFIG}  # fmt: skip
        created = client.post("/trainings", json=body)
        assert created.status_code == 201, created.text
        job_id = created.json()["job"]["id"]
        job = _until(lambda: (j := client.get(f"/trainings/{job_id}").json()["job"])["status"]
                     in ("completed", "failed") and j, 240, "the training")  # fmt: skip
        assert job["status"] == "completed", job["reason"] + "\n" + job["log_tail"]

        lora = data / "models" / "Lora" / "trained" / "webui_lora.safetensors"
        assert lora.is_file() and (lora.parent / "webui_lora.json").is_file()
        assert len(sd_models.unloaded) == 1  # the WebUI's model made room before the trainer started
        assert sys.modules["networks"].available_networks.get("webui_lora") == str(lora)

        page.locator("#tabs button", has_text="Train Management").first.click()
        page.locator("#train_management_refresh_jobs").click()
        _until(lambda: {"txt2img", "img2img"} <= set(webui_ui.lora_refreshes), 60, "the Lora cards' refresh")
        assert value.first.text_content().split()[0] == job_id
        for _ in range(3):  # refreshing the list again (no new delivery) must not refresh the cards again
            page.locator("#train_management_refresh_jobs").click()
            page.wait_for_timeout(700)
        assert sorted(webui_ui.lora_refreshes) == ["img2img", "txt2img"]
        page.screenshot(path=str(ARTIFACTS / "train_management_tab.png"), full_page=True)

        # Send to txt2img: the job's LoRA (the final one, weight 0.8) lands in txt2img's prompt, and txt2img shows.
        page.locator("#train_management_jobs td", has_text=job_id).first.click()
        page.wait_for_function(
            f"() => document.querySelector('#train_management_job_status').innerText.includes('{job_id}')"
        )
        page.locator("#train_management_epochs_panel").click()
        page.locator("#train_management_weight input[type=number]").fill("0.8")
        page.locator("#train_management_weight input[type=number]").press("Enter")
        page.locator("#txt2img_prompt textarea").evaluate("box => { box.value = 'a cat'; }")
        page.locator("#train_management_send_txt2img").click()
        page.wait_for_function(
            "() => document.querySelector('#txt2img_prompt textarea').value === 'a cat <lora:webui_lora:0.8>'"
        )
        assert page.locator("#txt2img_prompt textarea").is_visible()  # the txt2img tab is shown
        client.close()
        browser.close()
