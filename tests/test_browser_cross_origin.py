"""Other websites cannot act on the API through the user's browser: real Chromium, a page from another origin.

The attack page (served by a second local server on another port) tries what a hostile site can: a fetch with a
text/plain body, an untyped (Blob) body, a JSON fetch (which needs a CORS preflight), a text/plain form post whose
body reads as JSON, registering a worker, and opening the tab's WebSocket. Nothing may change: no job, no worker.
The same page served from the app's own origin creates the job and the worker (so the attack is well-formed), and
served from a DNS-rebound name (Chromium's host resolver maps it to 127.0.0.1) it is refused by the Host check.
Both the standalone app and the API mounted in the stand-in AUTOMATIC1111.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS, require_chromium
from home_support import SD15_KEYS
from PIL import Image
from safetensors.numpy import save_file
from server_support import running

from kohya_backend.jobs.registry import WorkerRegistry
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service
from kohya_backend.service.training import TrainingService

pytestmark = [pytest.mark.browser]

REBOUND = "rebound.test"  # a name an attacker controls, answered with 127.0.0.1 (DNS rebinding)
JOB = {
    "training_params": {"model": "sd15.safetensors", "dataset": "cats", "fm_type": "sd_1_5"},
    "config_params": {
        "output_name": "stolen",
        "resolution": "64,64",
        "max_train_steps": 2,
        "mixed_precision": "no",
    },
}
WORKER = {"url": "http://127.0.0.1:9", "token": "attacker-token-0123456789", "name": "evil"}

# The form's one field is `name=value` in a text/plain body: name and value together read as the job's JSON.
_JOB_TEXT = json.dumps(JOB)
ATTACK = """<!doctype html><html><body>
<iframe name="sink" id="sink"></iframe>
<form id="form" method="POST" target="sink" enctype="text/plain" action="API/trainings">
<input type="hidden" name='FORM_NAME' value='FORM_VALUE'></form>
<script>
const api = "API", socketUrl = "SOCKET", job = JOB, worker = WORKER, results = {};
async function attempt(name, send) {
  try { const r = await send(); results[name] = r.type === "opaque" ? "opaque" : r.status; }
  catch (e) { results[name] = "failed"; }
}
function socket() {
  return new Promise(resolve => {
    if (!socketUrl) { resolve("skipped"); return; }
    const ws = new WebSocket(socketUrl);
    ws.onopen = () => { ws.close(); resolve("open"); };
    ws.onerror = () => resolve("refused");
  });
}
(async () => {
  await attempt("text_plain", () => fetch(api + "/trainings", {method: "POST", mode: "no-cors", body: job}));
  await attempt("untyped", () => fetch(api + "/trainings", {method: "POST", mode: "no-cors", body: new Blob([job])}));
  await attempt("json", () => fetch(api + "/trainings",
    {method: "POST", headers: {"Content-Type": "application/json"}, body: job}));
  await attempt("worker_text", () => fetch(api + "/workers", {method: "POST", mode: "no-cors", body: worker}));
  await attempt("worker_json", () => fetch(api + "/workers",
    {method: "POST", headers: {"Content-Type": "application/json"}, body: worker}));
  results.socket = await socket();
  document.getElementById("sink").onload = () => { results.form = "posted"; window.attackDone = results; };
  document.getElementById("form").submit();
})();
</script></body></html>"""


def attack_page(api: str, socket_url: str = "") -> str:
    cut = _JOB_TEXT.rindex('"no"') + 1  # name = the JSON up to inside the last string, value = the rest
    page = ATTACK.replace("FORM_NAME", _JOB_TEXT[:cut]).replace("FORM_VALUE", _JOB_TEXT[cut:])
    page = page.replace("JOB", json.dumps(_JOB_TEXT)).replace("WORKER", json.dumps(json.dumps(WORKER)))
    return page.replace("SOCKET", socket_url).replace("API", api)


def _inputs(models: Path, datasets: Path) -> None:
    models.mkdir(parents=True, exist_ok=True)
    save_file({k: np.zeros((2, 2), dtype=np.float16) for k in SD15_KEYS}, str(models / "sd15.safetensors"))
    folder = datasets / "cats" / "5_cat"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 90, 10, 10)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # The rebound page is fulfilled by Playwright (no address: "public" to Chromium), which would have it ask
        # before reaching 127.0.0.1 (Local Network Access); a browser that lets it through must still get nothing.
        args = [
            *CHROMIUM_ARGS,
            f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1",
            "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests,"
            "PrivateNetworkAccessSendPreflights,PrivateNetworkAccessRespectPreflightResults",
        ]
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def attacker() -> Iterator[dict[str, str]]:
    """A second local server (another origin) that serves whatever attack page a test puts in the dict."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    pages: dict[str, str] = {}
    app = FastAPI()

    @app.get("/attack.html", response_class=HTMLResponse)
    def attack() -> str:
        return pages["html"]

    with running(app) as base:
        pages["base"] = base
        yield pages


def run_attack(browser: Any, url: str, html: str | None = None) -> dict[str, Any]:
    """Open the attack page at `url` (served there by Playwright when `html` is given) and wait for its results."""
    page = browser.new_page()
    try:
        if html is not None:
            page.route(url, lambda route: route.fulfill(status=200, content_type="text/html", body=html))
        page.goto(url)
        page.wait_for_function("window.attackDone !== undefined", timeout=30_000)
        return dict(page.evaluate("window.attackDone"))
    finally:
        page.close()


def _counts(service: TrainingService) -> tuple[int, list[str]]:
    return service.store.list()[1], [w.name for w in WorkerRegistry(service.home.root).entries()]


def test_other_sites_cannot_use_the_standalone_app(
    browser: Any, attacker: dict[str, str], tmp_path: Path
) -> None:
    from kohya_backend.ui.standalone import build_app

    service = build_service(tmp_path / "home")
    _inputs(service.home.models, service.home.datasets)
    with running(build_app(service)) as base:
        api, socket_url = f"{base}{API_PREFIX}", base.replace("http://", "ws://") + "/queue/join"
        attacker["html"] = attack_page(api, socket_url)
        foreign = run_attack(browser, f"{attacker['base']}/attack.html")
        assert foreign["json"] == "failed" and foreign["worker_json"] == "failed"  # the preflight is refused
        assert foreign["socket"] == "refused" and foreign["form"] == "posted"
        assert _counts(service) == (0, [])

        port = base.rsplit(":", 1)[1]
        rebound_api = f"http://{REBOUND}:{port}{API_PREFIX}"
        rebound = run_attack(browser, f"http://{REBOUND}:{port}/attack.html", attack_page(rebound_api))
        assert rebound["json"] == 421 and rebound["worker_json"] == 421  # same origin, but not our name
        assert _counts(service) == (0, [])

        own = run_attack(browser, f"{base}/attack.html", attack_page(api, socket_url))
        assert own["json"] == 201 and own["worker_json"] == 201 and own["socket"] == "open"
        assert own["text_plain"] == 415 and own["untyped"] == 415  # not JSON, even from the app's own page
        assert _counts(service) == (1, ["evil"])


def test_other_sites_cannot_use_the_api_mounted_in_the_webui(
    browser: Any, attacker: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "webui_stub"))
    from stub_webui import running_webui

    from kohya_backend.host.runtime import RUNTIME

    monkeypatch.setenv("TRAIN_MANAGEMENT_TRAINER_ENV", str(tmp_path / "no-trainer-env"))
    data = tmp_path / "webui"
    _inputs(data / "models" / "Stable-diffusion", data / "train_management" / "datasets")
    with running_webui(data, ["--train-python", sys.executable]) as ui:
        service = RUNTIME.service
        assert service is not None
        api = f"{ui.url}{API_PREFIX}"
        attacker["html"] = attack_page(api)
        foreign = run_attack(browser, f"{attacker['base']}/attack.html")
        assert foreign["json"] == "failed" and foreign["form"] == "posted"
        assert _counts(service) == (0, [])
        port = ui.url.rsplit(":", 1)[1]
        rebound = run_attack(
            browser,
            f"http://{REBOUND}:{port}/attack.html",
            attack_page(f"http://{REBOUND}:{port}{API_PREFIX}"),
        )
        assert rebound["json"] == 421 and _counts(service) == (0, [])
        own = run_attack(browser, f"{ui.url}/attack.html", attack_page(api))
        assert own["json"] == 201 and own["worker_json"] == 201 and own["text_plain"] == 415
        assert _counts(service) == (1, ["evil"])
