"""The REST API mounted in the stand-in WebUI, on both gradio lines: its own request guard (Host, Origin, JSON
bodies), the WebUI's --cors-allow-origins honoured, and its own OpenAPI schema under the prefix; and the tab's
buttons, which run through gradio's own routes on the WebUI's app, refused to other sites likewise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from home_support import SD15_KEYS
from PIL import Image
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "webui_stub"))
from gradio_support import GRADIO_MAJOR, event_index, predict, queued
from stub_webui import running_webui

from kohya_backend.host.runtime import RUNTIME
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.presets import PresetStore

TRAINER = ["--train-python", sys.executable]
ALLOWED = "http://127.0.0.1:3999"


@pytest.fixture(autouse=True)
def _no_trainer_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAIN_MANAGEMENT_TRAINER_ENV", str(tmp_path / "no-trainer-env"))


def _inputs(data: Path) -> None:
    """A checkpoint the WebUI lists and a dataset in the extension's home (default: DATA/train_management)."""
    models = data / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    save_file({k: np.zeros((2, 2), dtype=np.float16) for k in SD15_KEYS}, str(models / "sd15.safetensors"))
    folder = data / "train_management" / "datasets" / "cats" / "5_cat"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 90, 10, 10)).save(folder / f"{i}.png")


def _job(name: str) -> dict[str, object]:
    return {
        "training_params": {"model": "sd15.safetensors", "dataset": "cats", "fm_type": "sd_1_5"},
        "config_params": {
            "output_name": name,
            "resolution": "64,64",
            "max_train_steps": 2,
            "mixed_precision": "no",
        },
    }


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_the_mounted_api_refuses_other_sites_and_foreign_hosts(tmp_path: Path, forge: bool) -> None:
    data = tmp_path / "webui"
    _inputs(data)
    argv = [*TRAINER, "--cors-allow-origins", f"{ALLOWED},not-an-origin"]
    with running_webui(data, argv, forge=forge) as ui:
        api = f"{ui.url}{API_PREFIX}"
        own = ui.url
        store = RUNTIME.service.store if RUNTIME.service else None
        assert store is not None
        for origin in ("http://127.0.0.1:1", "http://evil.example", "null"):
            answer = httpx.post(f"{api}/trainings", json=_job("x"), headers={"Origin": origin}, timeout=30)
            assert answer.status_code == 403, answer.text
            assert answer.json()["detail"]["error"] == "ForeignOrigin"
        refer = httpx.post(f"{api}/workers", json={"url": "http://127.0.0.1:9", "token": "t" * 20},
                           headers={"Referer": "http://evil.example/page"}, timeout=30)  # fmt: skip
        assert refer.status_code == 403
        plain = httpx.post(f"{api}/trainings", content=b'{"training_params": {}}', timeout=30,
                           headers={"Content-Type": "text/plain", "Origin": own})  # fmt: skip
        assert plain.status_code == 415
        rebound = httpx.get(f"{api}/trainings", headers={"Host": "evil.example"}, timeout=30)
        assert rebound.status_code == 421
        assert store.list()[1] == 0 and httpx.get(f"{api}/workers", timeout=30).json()["workers"] == []
        # The app's own page, and the origin the WebUI's --cors-allow-origins names, may.
        mine = httpx.post(f"{api}/trainings", json=_job("mine"), headers={"Origin": own}, timeout=30)
        assert mine.status_code == 201, mine.text
        allowed = httpx.post(f"{api}/trainings", json=_job("theirs"), headers={"Origin": ALLOWED}, timeout=30)
        assert allowed.status_code == 201, allowed.text
        assert store.list()[1] == 2
        preflight = httpx.options(
            f"{api}/trainings",
            headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"},
            timeout=30,
        )  # fmt: skip
        assert preflight.headers.get("access-control-allow-origin") == ALLOWED
        spec = httpx.get(f"{api}/openapi.json", timeout=30)
        assert spec.status_code == 200 and "/trainings" in spec.json()["paths"]
        assert spec.json()["servers"][0]["url"] == API_PREFIX
        assert httpx.get(f"{api}/docs", timeout=30).status_code == 200


def test_the_webuis_flags_make_the_guards_policy() -> None:
    from types import SimpleNamespace

    from kohya_backend.host.exposure import webui_policy
    from kohya_backend.service.guard import parse_origin

    local, problems = webui_policy(SimpleNamespace(cors_allow_origins="http://a.example,*x", listen=False))
    assert local.origins == ("http://a.example",) and problems and "'*x' is not an origin" in problems[0]
    assert local.hosts is not None and not local.host_allowed("gpu-box.example")
    named, _ = webui_policy(
        SimpleNamespace(server_name="gpu-box.example", train_allowed_hosts=["proxy.example"])
    )
    assert named.host_allowed("gpu-box.example:7860") and named.host_allowed("proxy.example")
    assert not named.host_allowed("evil.example")
    # A proxy that rewrites Host still serves the page under its own name: that page's requests may act.
    assert named.origin_allowed(parse_origin("https://proxy.example"), "127.0.0.1:7860")
    assert named.origin_allowed(parse_origin("http://PROXY.example:8443"), "127.0.0.1:7860")
    assert not named.origin_allowed(parse_origin("https://proxy.example.evil.example"), "127.0.0.1:7860")
    assert not local.origin_allowed(parse_origin("https://proxy.example"), "127.0.0.1:7860")
    anything, _ = webui_policy(SimpleNamespace(train_allowed_hosts=["*"]))
    assert anything.hosts is None and anything.origin_hosts == frozenset()  # any Host, but not any page
    assert not anything.origin_allowed(parse_origin("http://evil.example"), "127.0.0.1:7860")
    shared, _ = webui_policy(SimpleNamespace(share=True))
    assert shared.hosts is None  # gradio's share tunnel names are not known in advance


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_other_sites_cannot_press_the_tabs_buttons(tmp_path: Path, forge: bool) -> None:
    """gradio's predict route and queue on the WebUI's app check no Origin: the tab's events check it themselves.
    Another site's request, sent straight to /run/predict or through the queue, saves no preset; the page's own
    origin, and one the WebUI's --cors-allow-origins names, do."""
    argv = [*TRAINER, "--cors-allow-origins", ALLOWED]
    with running_webui(tmp_path / "webui", argv, forge=forge) as ui:
        assert RUNTIME.service is not None
        presets = PresetStore(RUNTIME.service.home.root)
        save = event_index(ui.demo, "train_management_preset_save")
        key_help = event_index(ui.demo, "train_management_key", "input")

        def preset(name: str) -> list[str]:
            return [name, "network_dim = 4\n", "SD 1.5"]

        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Referer": "http://evil.example/page"}, {"Origin": "http://127.0.0.1:1"}):  # fmt: skip
            answer = predict(ui.url, save, preset("evil"), headers)
            assert answer.status_code != 200 or "error" in answer.json(), answer.text
        refused = queued(ui.url, save, preset("evil"), "http://evil.example")
        assert refused["success"] is False, refused
        assert "may not change anything here" in json.dumps(refused)
        if (
            GRADIO_MAJOR < 4
        ):  # 3.41's predict route takes the request's headers from the body when it has some
            own_headers = {
                "headers": {"origin": ui.url, "host": ui.url.split("//")[1]},
                "client": {"host": "x"},
            }
            forged = predict(
                ui.url, save, preset("evil"), {"Origin": "http://evil.example"}, request=own_headers
            )
            assert forged.status_code != 200 or "error" in forged.json(), forged.text
        assert presets.names() == []
        # What changes nothing stays open (the key help), and the page's own origin and the allowed one may act.
        shown = predict(ui.url, key_help, ["network_dim"], {"Origin": "http://evil.example"})
        assert shown.status_code == 200 and "network_dim" in json.dumps(shown.json()["data"])
        assert queued(ui.url, save, preset("mine"), ui.url)["success"] is True
        assert predict(ui.url, save, preset("direct"), {"Origin": ui.url}).status_code == 200
        assert predict(ui.url, save, preset("allowed"), {"Origin": ALLOWED}).status_code == 200
        assert (
            predict(ui.url, save, preset("script"), {}).status_code == 200
        )  # no browser: no Origin, no Referer
        assert presets.names() == ["allowed", "direct", "mine", "script"]
