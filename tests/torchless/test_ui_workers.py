"""The tab's "Remote GPU workers" panel against a real worker served on 127.0.0.1 (both gradio lines, no torch):
add with a wrong and a right token, the state table and the Training Instance Type list, remove, refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_support import running

from kohya_backend.jobs.registry import WorkerRegistry
from kohya_backend.service.app import build_service
from kohya_backend.service.datasets import DatasetService
from kohya_backend.service.training import TrainingService
from kohya_backend.service.worker import build_worker, create_worker_app
from kohya_backend.service.workers_api import remote_runner
from kohya_backend.ui.create_job import CreateJobActions
from kohya_backend.ui.hooks import UiHooks
from kohya_backend.ui.present import WORKER_HEADERS
from kohya_backend.ui.tab import create_tab
from kohya_backend.ui.workers import WorkersActions

TOKEN = "panel-worker-token-0123456789"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TrainingService]:
    service = build_service(tmp_path / "home")
    yield service
    remote_runner(service).close()


@pytest.fixture
def worker_url(tmp_path: Path) -> Iterator[str]:
    worker = build_worker(tmp_path / "worker", reserve_bytes=0, devices={"cpu": 1})
    with running(create_worker_app(worker, token=TOKEN)) as base:
        yield base


def _rows(actions: WorkersActions) -> list[list[str]]:
    table, _choices = actions.refresh(None)
    assert list(table.columns) == WORKER_HEADERS
    return [list(row) for row in table.values.tolist()]


def test_add_check_list_choose_and_remove_a_worker(service: TrainingService, worker_url: str) -> None:
    actions = WorkersActions(service)
    message, token_field = actions.add(worker_url, "not-the-token", "")
    name = f"127.0.0.1-{worker_url.rsplit(':', 1)[1]}"
    # What is wrong comes first, with what to do in this panel (no "✅ Added" for a worker that cannot train).
    assert message.startswith(f"⚠️ **Worker {name} refused the token**") and "✅" not in message
    assert "paste the token from the worker's token file above and press **Add worker** again" in message
    assert "workers add" not in message and token_field == ""
    message, token_field = actions.add(f" {worker_url}/ ", TOKEN, "")  # the same URL: its token is updated
    assert (
        message.startswith(f"✅ Added worker **{name}**")
        and ": online, CPU." in message
        and token_field == ""
    )
    assert TOKEN not in message
    conflict, _ = actions.add(worker_url, TOKEN, "gpu1")  # the registry's own rule, shown as it words it
    assert conflict.startswith("❌ **The worker was not added.**") and "already registered" in conflict
    assert [e.name for e in WorkerRegistry(service.home.root).entries()] == [name]

    # The tab's own check is the state shown at once, without waiting for the pool's next round.
    [row] = _rows(actions)
    assert row[:3] == [name, "online", "CPU"] and row[3].endswith(" GiB") and row[4] == worker_url
    assert TOKEN not in repr(actions.refresh(None))
    choices = CreateJobActions(service, UiHooks()).instance_choices("local")["choices"]
    assert f"worker {name}: CPU, online [worker:{name}]" in choices

    job = service.scheduler.submit(
        fm_type="sd_1_5", model="m.safetensors", dataset="d", instance_type=f"worker:{name}",
        output_name="o", config_toml="", params={},
    )  # fmt: skip
    busy = actions.remove(name)
    assert busy.startswith("❌ **The worker was not removed.**") and job.id in busy
    service.scheduler.cancel(job.id)
    assert "❌ **The worker was not removed.**" in actions.remove("nope") and name in actions.remove("nope")
    assert actions.remove(name) == f"Removed worker **{name}**: it is no longer a Training Instance Type."
    assert _rows(actions) == [] and actions.refresh(name)[1]["choices"] == []
    assert actions.remove(None) == "Choose the worker to remove."


@pytest.mark.parametrize(
    ("url", "token", "name", "why"),
    [
        ("ftp://gpu-box:7870", TOKEN, "", "is not an http:// or https:// URL"),
        ("http://user:pw@gpu-box:7870", TOKEN, "", "carries credentials"),
        ("http://gpu-box:7870", "", "", "the worker token is empty"),
        ("http://gpu-box:7870", TOKEN, "../up", "../up"),
        ("", TOKEN, "", "Enter the URL the worker printed"),
    ],
)
def test_bad_entries_are_refused_with_the_reason(
    service: TrainingService, url: str, token: str, name: str, why: str
) -> None:
    message, token_field = WorkersActions(service).add(url, token, name)
    assert why in message and token_field == ""
    assert WorkerRegistry(service.home.root).entries() == []


def test_the_registrys_plain_http_warning_is_shown(service: TrainingService) -> None:
    # 0.0.0.0 is not loopback (the token would leave this machine in clear) and refuses at once here.
    message, _ = WorkersActions(service).add("http://0.0.0.0:9", TOKEN, "clear")
    assert (
        message.startswith("⚠️ **Worker clear does not answer** at `http://0.0.0.0:9`") and "✅" not in message
    )
    assert "jobs sent to it wait until it does" in message
    assert "⚠️ the worker token goes to 0.0.0.0 over plain http" in message and "TLS reverse proxy" in message
    [row] = _rows(WorkersActions(service))
    assert row[4] == "http://0.0.0.0:9 ⚠️ plain http: the token is readable on the way"
    local, _ = WorkersActions(service).add("http://127.0.0.1:9", TOKEN, "here")
    assert "plain http" not in local and local.startswith("⚠️ **Worker here does not answer**")


def test_a_locked_host_refuses_changes_and_says_why(service: TrainingService, worker_url: str) -> None:
    WorkersActions(service).add(worker_url, TOKEN, "kept")
    locked = WorkersActions(service, locked="the WebUI listens on the network without a login")
    message, token_field = locked.add(worker_url, TOKEN, "other")
    assert message == "❌ the WebUI listens on the network without a login" and token_field == ""
    assert locked.remove("kept") == "❌ the WebUI listens on the network without a login"
    assert [e.name for e in WorkerRegistry(service.home.root).entries()] == ["kept"]
    assert [row[0] for row in _rows(locked)] == ["kept"]  # the list is still shown


def _by_id(blocks: Any) -> dict[str, Any]:
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def test_the_panel_is_in_the_tab_with_a_password_field(service: TrainingService) -> None:
    datasets = DatasetService(service.home, jobs=service.store)
    found = _by_id(create_tab(service, datasets, UiHooks(workers_locked="reason shown here")))
    assert found["train_management_worker_token"].type == "password"
    assert found["train_management_workers"].label == "Remote GPU workers"
    assert {"train_management_refresh_instances", "train_management_workers_table"} <= set(found)
    assert "⚠️ reason shown here" in found["train_management_workers_intro"].value
