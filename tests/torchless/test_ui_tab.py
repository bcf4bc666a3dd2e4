"""The tab builds on the installed gradio line (3.41 in .venv, 4.40 in .venv-gradio4) without torch, and the
standalone app serves it with the API, behind gradio's login when a token is set."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_support import running

from kohya_backend.config.schema import template_toml
from kohya_backend.errors import TrainManagementError
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service
from kohya_backend.service.datasets import DatasetService
from kohya_backend.service.training import TrainingService
from kohya_backend.train.plan import format_with_plan
from kohya_backend.ui.hooks import UiHooks
from kohya_backend.ui.standalone import DEMO_PROMPTS, build_app, demo_config, prepare_demo_home, serve
from kohya_backend.ui.tab import DELIVERY_STAMP_ID, ELEM_ID, create_tab

ROOT = Path(__file__).resolve().parents[2]


def _blocks_by_id(blocks: Any) -> dict[str, Any]:
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


@pytest.fixture
def service(tmp_path: Path) -> TrainingService:
    return build_service(tmp_path / "home")


def test_the_tab_builds_without_warnings_with_the_contract_elements(service: TrainingService) -> None:
    datasets = DatasetService(service.home, jobs=service.store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blocks = create_tab(service, datasets)
    gradio_warnings = [str(w.message) for w in caught if "gradio" in w.filename and w.category is UserWarning]
    assert gradio_warnings == []
    found = _blocks_by_id(blocks)
    assert {ELEM_ID, DELIVERY_STAMP_ID, "train_management_config", "train_management_jobs"} <= set(found)
    # a CPU-only machine: its template, with the training state saved for an exact Resume
    expected = template_toml("sd_1_5", cuda=False).replace("save_state = false", "save_state = true")
    assert found["train_management_config"].value == expected
    assert found["train_management_ds_generate"].visible is False
    hint = found["train_management_ds_hint"].value  # what to do in the page, not a command line
    assert "zip it and upload the zip" in hint and "python -m" not in hint
    assert "zip" in found["train_management_ds_folder"].label
    hooked = _blocks_by_id(
        create_tab(
            service, datasets, UiHooks(interrogate=lambda p: p.name, default_config=lambda fm: f"# {fm}\n")
        )
    )
    assert hooked["train_management_ds_generate"].visible is True
    assert hooked["train_management_config"].value == "# sd_1_5\n"


def test_importing_and_building_the_tab_imports_no_torch(tmp_path: Path) -> None:
    code = f"""
import json, sys
import kohya_backend.ui, kohya_backend.ui.hooks
light = "gradio" not in sys.modules
from kohya_backend.service.app import build_service
from kohya_backend.service.datasets import DatasetService
from kohya_backend.ui.tab import create_tab
service = build_service({str(tmp_path / "home")!r})
create_tab(service, DatasetService(service.home, jobs=service.store))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
print(json.dumps({{"light": light, "heavy": heavy}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"light": True, "heavy": []}


def test_the_demo_config_is_valid_and_small(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64\n")
    formatted = format_with_plan(demo_config("sd_1_5", prompts=prompts), "sd_1_5", require_paths=False)
    assert formatted["warnings"] == []
    assert 'resolution = "64,64"' in formatted["toml"] and "max_train_steps = 30" in formatted["toml"]
    assert 'tokenizer_cache_dir = "tokenizer"' in formatted["toml"]


def test_the_demo_leaves_a_home_with_a_model_and_a_dataset_alone_without_reading_them(
    service: TrainingService, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kohya_backend.data.scan as scan
    import kohya_backend.models.keys as keys

    (service.home.models / "mine.safetensors").write_bytes(b"not read")
    (service.home.datasets / "mine").mkdir()
    monkeypatch.setattr(scan, "scan_dataset", lambda *a, **k: pytest.fail("the demo check scanned a dataset"))
    monkeypatch.setattr(keys, "read_keys", lambda *a, **k: pytest.fail("the demo check read a checkpoint"))
    assert prepare_demo_home(service.home) is False
    assert sorted(p.name for p in service.home.models.iterdir()) == [DEMO_PROMPTS, "mine.safetensors"]


def test_serving_off_loopback_needs_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kohya_backend.service.app as api_app

    monkeypatch.delenv("TRAIN_MANAGEMENT_TOKEN", raising=False)
    with pytest.raises(TrainManagementError, match=r"refusing to serve on 0\.0\.0\.0 without a token"):
        serve(tmp_path / "home", host="0.0.0.0", port=1)
    assert not (tmp_path / "home").exists()
    # One implementation of the token/loopback rule (the CLI's `serve` is this one): the API module has none.
    assert not hasattr(api_app, "serve")


@pytest.fixture
def app_url(service: TrainingService, request: pytest.FixtureRequest) -> Iterator[str]:
    with running(build_app(service, token=request.param, demo=False)) as url:
        yield url


@pytest.mark.parametrize("app_url", ["tok-123"], indirect=True)
def test_with_a_token_the_tab_and_the_api_both_need_it(app_url: str) -> None:
    assert httpx.get(f"{app_url}/config").status_code == 401
    assert httpx.get(f"{app_url}{API_PREFIX}/trainings").status_code == 401
    assert (
        httpx.get(f"{app_url}{API_PREFIX}/trainings", headers={"Authorization": "Bearer tok-123"}).status_code
        == 200
    )
    with httpx.Client(base_url=app_url) as browser:
        refused = browser.post("/login", data={"username": "me", "password": "wrong"})
        assert refused.status_code in (400, 401) and browser.get("/config").status_code == 401
        assert browser.post("/login", data={"username": "anyone", "password": "tok-123"}).status_code == 200
        config = browser.get("/config")
        assert config.status_code == 200 and "train_management_delivery_stamp" in config.text


@pytest.mark.parametrize("app_url", [None], indirect=True)
def test_without_a_token_the_tab_is_served_at_the_root(app_url: str) -> None:
    page = httpx.get(f"{app_url}/")
    assert page.status_code == 200 and "Train Management" in page.text
    config = httpx.get(f"{app_url}/config").json()
    # The tab's css and style.css once each: no selector ruled twice, the stamp hidden and the mono font set once.
    css = re.sub(r"/\*.*?\*/", "", config["css"], flags=re.S)
    selectors = [s.strip() for rule in re.findall(r"([^{}]+)\{", css) for s in rule.split(",")]
    assert len(selectors) == len(set(selectors)) and css.count("font-family") == 1, selectors
    assert f"#{DELIVERY_STAMP_ID}" in selectors
    mono = [
        c for c in config["components"] if "train-management-mono" in (c["props"].get("elem_classes") or [])
    ]
    assert {c["props"]["elem_id"] for c in mono} == {f"{ELEM_ID}_{n}" for n in ("config", "formatted", "log")}
    assert any(c.get("props", {}).get("elem_id") == ELEM_ID for c in config["components"])
    assert httpx.get(f"{app_url}{API_PREFIX}/version").json()["api"] == "1.0"


def _then_names(blocks: Any, elem_id: str, handler: str) -> list[str]:
    """Names of the callbacks chained with .then() after `handler` runs on a click of element `elem_id`
    (gradio 3 refers to dependencies by index, gradio 4 by id)."""
    deps = _dependencies(blocks)
    target = _blocks_by_id(blocks)[elem_id]._id
    started = [
        dep.get("id", i)
        for i, (dep, name) in enumerate(deps)
        if name == handler
        and any((t[0] if isinstance(t, (list, tuple)) else t) == target for t in dep["targets"])
    ]
    assert started, f"{handler} is not wired to {elem_id}"
    return [str(name) for dep, name in deps if dep.get("trigger_after") in started]


def test_a_dataset_task_that_ends_before_the_page_holds_its_ticket_still_shows_its_outcome(
    service: TrainingService,
) -> None:
    # The poll fires on a finished-count change; a task done before its ticket reached the page would be passed by
    # unless the click itself asks for the outcome once the ticket is stored.
    blocks = create_tab(service, DatasetService(service.home, jobs=service.store))
    assert "finished" in _then_names(blocks, "train_management_ds_create", "create")
    assert "finished" in _then_names(blocks, "train_management_ds_validate", "validate")
    assert "finished" in _then_names(blocks, "train_management_ds_check_health", "health")


def _dependencies(blocks: Any) -> list[tuple[dict[str, Any], str | None]]:
    """(dependency, its callback's name) of every event of the tab (None for a browser-only one)."""
    deps = blocks.config["dependencies"]
    key = "id" if "id" in deps[0] else None
    out = []
    for i, dep in enumerate(deps):
        fn = (blocks.fns[dep[key]] if key else blocks.fns[i]).fn
        out.append((dep, getattr(fn, "__name__", None)))
    return out


def test_nothing_the_page_runs_by_itself_sends_inputs_on_gradio_4(service: TrainingService) -> None:
    # gradio 4.40's page warns "Too many arguments provided for the endpoint" for every event that sends inputs;
    # the load, the poll and what the poll refreshes run without the user, so they send none there.
    from kohya_backend.ui.compat import SESSION_KEYED

    blocks = create_tab(service, DatasetService(service.home, jobs=service.store))
    found = _blocks_by_id(blocks)
    polled = {found[f"{ELEM_ID}_poll"]._id, found[f"{ELEM_ID}_ds_tasks_poll"]._id}
    by_itself = []
    for dep, name in _dependencies(blocks):
        triggers = [
            tuple(t) if isinstance(t, (list, tuple)) else (t, dep.get("trigger")) for t in dep["targets"]
        ]
        events = {event for _, event in triggers} | ({dep["trigger"]} if "trigger" in dep else set())
        if "load" in events or any(target in polled for target, _ in triggers):
            by_itself.append((name, dep["inputs"]))
    # the poll (gradio wraps its function), the page's load, the page's script, and what the poll refreshes
    assert sorted(str(name) for name, _ in by_itself if name in ("page_load", "refresh", "finished", None)) == [
        "None", "finished", "page_load", "refresh",
    ]  # fmt: skip
    assert len(by_itself) == 5
    for name, inputs in by_itself:
        if name not in ("refresh", "finished") or SESSION_KEYED:
            assert inputs == [], name
    # Lists the page fills itself answer the user's choice (.input), never their own change (.change).
    filled = {
        found[f"{ELEM_ID}_{n}"]._id for n in ("model", "dataset", "job", "ds_dataset", "ds_image", "instance")
    }
    for dep, name in _dependencies(blocks):
        for target in dep["targets"]:
            target_id, event = target if isinstance(target, (list, tuple)) else (target, dep.get("trigger"))
            assert not (target_id in filled and event == "change"), name


def test_the_theme_uses_local_fonts_and_the_page_loads_nothing_from_other_hosts(
    service: TrainingService,
) -> None:
    blocks = create_tab(service, DatasetService(service.home, jobs=service.store))
    assert blocks.theme._stylesheets == []  # gradio's default theme would load two Google Fonts
    from kohya_backend.ui.offline import strip_offsite

    page = (
        b'<head><link rel="preconnect" href="https://fonts.googleapis.com" />'
        b'<script src="https://cdnjs.cloudflare.com/ajax/libs/iframe-resizer/4.3.6/iframeResizer.contentWindow.min.js"'
        b' async></script><script src="./assets/index.js"></script></head>'
    )
    assert strip_offsite(page) == b'<head><script src="./assets/index.js"></script></head>'


@pytest.mark.parametrize("app_url", [None], indirect=True)
def test_the_served_page_names_no_other_host(app_url: str) -> None:
    page = httpx.get(f"{app_url}/")
    assert page.status_code == 200 and "<script" in page.text
    assert not re.search(r'(src|href)="https?://(?!127\.0\.0\.1)', page.text), page.text[:2000]
    assert int(page.headers["content-length"]) == len(page.content)
