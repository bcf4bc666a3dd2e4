"""scripts/*.py loaded by the WebUI's own rules into the stand-in WebUI (tests/webui_stub), on both gradio lines.

Everything but the WebUI is real: the tab, the API over HTTP on 127.0.0.1, the scheduler thread, the hooks.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "webui_stub"))
from stub_webui import running_webui

from kohya_backend.host import hooks
from kohya_backend.host.runtime import RUNTIME
from kohya_backend.jobs.states import JobStatus
from kohya_backend.service.api import API_PREFIX

SCHEDULER_THREAD = "train-management-scheduler"
TRAINER = ["--train-python", sys.executable]


@pytest.fixture(autouse=True)
def _no_trainer_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No trainer environment unless a test passes --train-python (never the repository's .venv-trainer)."""
    monkeypatch.setenv("TRAIN_MANAGEMENT_TRAINER_ENV", str(tmp_path / "no-trainer-env"))
    monkeypatch.delenv("TRAIN_MANAGEMENT_PYTHON", raising=False)


def _block(demo: Any, elem_id: str) -> Any:
    found = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, f"{elem_id}: {len(found)} blocks"
    return found[0]


def _scheduler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == SCHEDULER_THREAD and t.is_alive()]


def _reported() -> list[str]:
    from modules import script_callbacks, script_loading, scripts

    return [*script_callbacks.reported, *scripts.reported, *script_loading.reported]


def test_scripts_load_by_the_webui_rules_and_register_tab_and_settings(tmp_path: Path) -> None:
    with running_webui(tmp_path / "webui", TRAINER) as ui:
        from modules import options, script_callbacks, scripts, shared

        assert _reported() == []
        assert script_callbacks.registered_scripts() == ["train_management.py"]
        assert [m.__name__ for m in scripts.loaded] == ["lora_script.py", "train_management.py"]
        assert "train_management" not in sys.modules  # executed as a script, never imported
        assert _block(ui.demo, "tab_train_management").label == "Train Management"
        _block(ui.demo, "train_management_delivery_stamp")
        assert (
            _block(ui.demo, "train_management_ds_generate").visible is True
        )  # the WebUI has an interrogator
        labels = {k: v for k, v in shared.opts.data_labels.items() if k.startswith("train_management_")}
        assert len(labels) == 9 and labels["train_management_s3_prefix"].component.__name__ == "Textbox"
        assert {v.section for v in labels.values()} == {("train_management", "Train Management")}
        assert {v.category_id for v in labels.values()} == {
            "training"
        } and "training" in options.categories.mapping
        kinds = {k: v.component.__name__ for k, v in labels.items()}
        assert kinds["train_management_concurrency"] == "Slider"
        assert (
            kinds["train_management_sagemaker_role_arn"]
            == kinds["train_management_sagemaker_image_uri"]
            == "Textbox"
        )
        assert kinds["train_management_unload_model"] == "Checkbox"
        assert kinds["train_management_home"] == "Textbox"
        assert "Reload UI" in labels["train_management_home"].comment_after
        assert shared.cmd_opts.train_python == sys.executable  # preload.py's flag reached the parser


def test_folders_map_to_the_webuis_and_the_api_is_open_on_a_local_webui_without_auth(tmp_path: Path) -> None:
    data = tmp_path / "webui"
    config = {"train_management_lora_subfolder": "trained"}
    with running_webui(data, TRAINER, config=config) as ui:
        from modules import sd_models

        service = RUNTIME.service
        assert service is not None
        assert service.home.root == (data / "train_management").resolve()
        assert service.home.models == Path(sd_models.model_path).resolve()
        assert service.home.lora == (data / "models" / "Lora" / "trained").resolve()
        (Path(sd_models.model_path) / "sdxl").mkdir()
        (Path(sd_models.model_path) / "sdxl" / "base.safetensors").write_bytes(b"x" * 16)
        sd_models.list_models()
        answer = httpx.get(f"{ui.url}{API_PREFIX}/models", timeout=30)
        assert answer.status_code == 200
        assert [m["name"] for m in answer.json()["models"]] == [
            i.name for i in sd_models.checkpoints_list.values()
        ]
        assert httpx.get(f"{ui.url}{API_PREFIX}/trainings", timeout=30).json()["total"] == 0


def test_with_ckpt_dir_the_checkpoints_of_both_folders_are_listed_and_usable(tmp_path: Path) -> None:
    data = tmp_path / "webui"
    ckpt_dir = tmp_path / "my-checkpoints"
    (ckpt_dir / "sdxl").mkdir(parents=True)
    (ckpt_dir / "sdxl" / "mine.safetensors").write_bytes(b"x" * 16)
    stable_diffusion = data / "models" / "Stable-diffusion"
    stable_diffusion.mkdir(parents=True)
    (stable_diffusion / "base.safetensors").write_bytes(b"y" * 16)
    with running_webui(data, ["--ckpt-dir", str(ckpt_dir), *TRAINER]) as ui:
        from modules import sd_models

        service = RUNTIME.service
        assert service is not None and service.home.models == ckpt_dir.resolve()
        webui_names = sorted(info.name for info in sd_models.checkpoints_list.values())
        assert webui_names == ["base.safetensors", "sdxl/mine.safetensors"]  # the WebUI lists both folders
        listed = httpx.get(f"{ui.url}{API_PREFIX}/models", timeout=30).json()["models"]
        assert sorted(m["name"] for m in listed) == webui_names
        assert sorted(_clicked(ui.demo, "train_management_refresh_models")(None)["choices"]) == webui_names
        for info in sd_models.checkpoints_list.values():
            assert service.home.model_path(info.name) == Path(os.path.abspath(info.filename))


def _clicked(demo: Any, elem_id: str) -> Any:
    """The callback a click on `elem_id` runs first (gradio 3.41 lists events, 4.x keys them by id)."""
    block_id = _block(demo, elem_id)._id
    if isinstance(demo.fns, dict):
        return next(f.fn for f in demo.fns.values() if (block_id, "click") in [tuple(t) for t in f.targets])
    return next(f.fn for f, d in zip(demo.fns, demo.dependencies) if block_id in d["targets"])


NETWORK_FLAGS = {"listen": ["--listen"], "share": ["--share"], "server-name": ["--server-name", "0.0.0.0"]}


@pytest.mark.parametrize("flags", list(NETWORK_FLAGS.values()), ids=list(NETWORK_FLAGS))
def test_on_the_network_without_credentials_the_api_and_worker_changes_stay_closed(
    tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from kohya_backend.jobs.registry import WorkerRegistry

    with running_webui(tmp_path / "webui", [*flags, *TRAINER]) as ui:
        from modules import shared

        assert shared.cmd_opts.disable_extension_access is True  # the WebUI's own rule
        assert RUNTIME.service is not None
        home = RUNTIME.service.home.root
        assert httpx.get(f"{ui.url}{API_PREFIX}/trainings", timeout=30).status_code == 404  # not mounted
        sent = httpx.post(
            f"{ui.url}{API_PREFIX}/workers", json={"url": "http://evil:1", "token": "t"}, timeout=30
        )
        assert sent.status_code in (404, 405)
        printed = capsys.readouterr().err
        assert f"its REST API ({API_PREFIX}) is not mounted" in printed
        assert "--api-auth user:password" in printed and "--enable-insecure-extension-access" in printed
        add = _clicked(ui.demo, "train_management_worker_add")
        message, token = add("http://127.0.0.1:9", "a-worker-token", "")
        assert message.startswith("❌ Adding and removing workers in the tab is turned off") and token == ""
        assert "--gradio-auth user:password" in message and f"workers add URL --home {home}" in message
        assert _clicked(ui.demo, "train_management_worker_remove")("any").startswith("❌ Adding and removing")
        assert WorkerRegistry(home).entries() == []
        assert "⚠️ Adding and removing workers" in _block(ui.demo, "train_management_workers_intro").value


def test_on_the_network_credentials_or_the_webuis_opt_in_open_them(tmp_path: Path) -> None:
    with running_webui(tmp_path / "webui", ["--listen", "--api-auth", "alice:wonder", *TRAINER]) as ui:
        url = f"{ui.url}{API_PREFIX}/trainings"
        assert httpx.get(url, timeout=30).status_code == 401
        assert httpx.get(url, auth=("alice", "wonder"), timeout=30).status_code == 200
        message, _ = _clicked(ui.demo, "train_management_worker_add")("ftp://x", "t", "")
        assert "turned off" in message  # --api-auth guards the API, not the page: the tab stays locked
    with running_webui(tmp_path / "webui2", ["--listen", "--gradio-auth", "bob:builder", *TRAINER]) as ui:
        assert (
            httpx.get(f"{ui.url}{API_PREFIX}/trainings", auth=("bob", "builder"), timeout=30).status_code
            == 200
        )
        message, _ = _clicked(ui.demo, "train_management_worker_add")("ftp://x", "t", "")
        assert "The worker was not added" in message and "http:// or https://" in message  # the tab may add
    argv = ["--listen", "--enable-insecure-extension-access", *TRAINER]
    with running_webui(tmp_path / "webui3", argv) as ui:
        from modules import shared

        assert shared.cmd_opts.disable_extension_access is False
        assert httpx.get(f"{ui.url}{API_PREFIX}/trainings", timeout=30).status_code == 200
        message, _ = _clicked(ui.demo, "train_management_worker_add")("ftp://x", "t", "")
        assert "The worker was not added" in message


@pytest.mark.parametrize("auth_flag", ["--api-auth", "--gradio-auth"])
def test_the_api_requires_the_webuis_credentials_when_it_has_any(tmp_path: Path, auth_flag: str) -> None:
    with running_webui(tmp_path / "webui", [auth_flag, "alice:wonder,bob:builder", *TRAINER]) as ui:
        url = f"{ui.url}{API_PREFIX}/trainings"
        bare = httpx.get(url, timeout=30)
        assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(url, auth=("alice", "builder"), timeout=30).status_code == 401
        assert httpx.get(url, auth=("mallory", "wonder"), timeout=30).status_code == 401
        assert httpx.get(url, auth=("alice", "wonder"), timeout=30).status_code == 200
        assert httpx.get(url, auth=("bob", "builder"), timeout=30).status_code == 200
        assert httpx.get(f"{ui.url}{API_PREFIX}/version", timeout=30).status_code == 401


def test_api_only_mode_gets_no_ui_but_the_api_and_the_saved_settings(tmp_path: Path) -> None:
    home = tmp_path / "elsewhere"
    config = {"train_management_home": str(home), "train_management_concurrency": 2.0}
    argv = ["--nowebui", "--api-auth", "alice:wonder", *TRAINER]
    with running_webui(tmp_path / "webui", argv, config=config) as ui:
        from modules import shared

        assert _reported() == [] and ui.demo is None
        assert not any(k.startswith("train_management_") for k in shared.opts.data_labels)  # no settings page
        assert RUNTIME.service is not None and RUNTIME.service.home.root == home.resolve()
        assert RUNTIME.service.scheduler.devices == {"cpu": 2}
        answer = httpx.get(f"{ui.url}{API_PREFIX}/trainings", auth=("alice", "wonder"), timeout=30)
        assert answer.status_code == 200
        assert len(_scheduler_threads()) == 1


def test_reload_ui_keeps_one_service_and_one_scheduler_thread(tmp_path: Path) -> None:
    with running_webui(tmp_path / "webui", TRAINER) as ui:
        service, first_url = RUNTIME.service, ui.url
        threads = _scheduler_threads()
        assert len(threads) == 1
        ui.reload()
        assert _reported() == []
        assert RUNTIME.service is service and _scheduler_threads() == threads
        assert ui.url != first_url
        assert httpx.get(f"{ui.url}{API_PREFIX}/trainings", timeout=30).status_code == 200
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{first_url}{API_PREFIX}/trainings", timeout=5)


def test_settings_apply_at_once_or_after_reload_ui(tmp_path: Path) -> None:
    with running_webui(tmp_path / "webui", TRAINER) as ui:
        from modules import shared

        service = RUNTIME.service
        assert service is not None and service.scheduler.devices == {"cpu": 1}
        shared.opts.set("train_management_concurrency", 3.0)
        shared.opts.set("train_management_keep_epochs", True)
        assert service.scheduler.devices == {"cpu": 3} and service.scheduler.keep_epochs is True
        assert service.scheduler.stall_after_s == 15 * 60
        shared.opts.set("train_management_stall_minutes", 30.0)
        assert service.scheduler.stall_after_s == 30 * 60
        new_home = tmp_path / "new-home"
        shared.opts.set("train_management_home", str(new_home))
        assert RUNTIME.service is service  # folders change on Reload UI
        ui.reload()
        assert RUNTIME.service is not service and RUNTIME.service is not None
        assert RUNTIME.service.home.root == new_home.resolve()
        assert RUNTIME.started and len(_scheduler_threads()) == 1


def _queued_job(name: str) -> Any:
    assert RUNTIME.service is not None
    return RUNTIME.service.scheduler.submit(
        fm_type="sd_1_5", model="m.safetensors", dataset="d", instance_type="local",
        output_name=name, config_toml="", params={},
    )  # fmt: skip


def _settled(job_id: str) -> Any:
    assert RUNTIME.service is not None
    store = RUNTIME.service.store
    deadline = time.monotonic() + 60
    while not store.get(job_id).status.is_terminal:
        assert time.monotonic() < deadline, store.get(job_id)
        time.sleep(0.1)
    return store.get(job_id)


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_the_webuis_model_is_unloaded_before_a_local_training_when_the_setting_is_on(
    tmp_path: Path, forge: bool
) -> None:
    with running_webui(tmp_path / "webui", TRAINER, forge=forge) as _ui:
        from modules import sd_models, shared

        def unloads() -> int:
            if forge:
                from backend import memory_management

                return memory_management.calls.count("unload_all_models")
            return len(sd_models.unloaded)

        first = _settled(_queued_job("one").id)
        assert (
            first.status is JobStatus.FAILED
        )  # no dataset or model: the trainer refuses, after the hook ran
        assert unloads() == 1
        if forge:  # Forge's sd_models.unload_model_weights does nothing: its memory manager must be used
            from backend import memory_management

            assert sd_models.unloaded == [] and "soft_empty_cache" in memory_management.calls
        shared.opts.set("train_management_unload_model", False)
        _settled(_queued_job("two").id)
        assert unloads() == 1


def test_a_generation_in_progress_keeps_the_job_queued_without_holding_the_scheduler(tmp_path: Path) -> None:
    with running_webui(tmp_path / "webui", TRAINER) as _ui:
        from modules import call_queue, sd_models

        assert RUNTIME.service is not None
        scheduler = RUNTIME.service.scheduler
        with call_queue.queue_lock:  # a long generation
            job = _queued_job("after-generation")
            deadline = time.monotonic() + 30
            while scheduler.store.get(job.id).progress.get("phase") != hooks.WAITING_PHASE:
                assert time.monotonic() < deadline, scheduler.store.get(job.id)
                time.sleep(0.05)
            began = time.monotonic()
            scheduler.tick()  # the scheduler thread is not parked inside a tick (it would hold the tick lock)
            assert time.monotonic() - began < 10  # a parked tick would hold the lock far longer
            assert scheduler.store.get(job.id).status is JobStatus.QUEUED and sd_models.unloaded == []
        assert (
            _settled(job.id).status is JobStatus.FAILED
        )  # started once the lock was free (no model: refused)
        assert len(sd_models.unloaded) == 1


def test_a_local_training_waits_for_the_trainers_environment(tmp_path: Path) -> None:
    with running_webui(tmp_path / "webui") as _ui:
        from modules import sd_models

        job = _settled(_queued_job("early").id)
        assert job.status is JobStatus.FAILED
        assert "not ready" in (job.reason or "") and "--train-python" in (job.reason or "")
        assert sd_models.unloaded == []  # refused before the WebUI's model was touched


def test_a_delivered_lora_refreshes_the_webuis_lora_list(tmp_path: Path) -> None:
    with running_webui(tmp_path / "webui", TRAINER) as _ui:
        networks = sys.modules["networks"]
        assert RUNTIME.service is not None
        lora = RUNTIME.service.home.lora / "fresh.safetensors"
        lora.write_bytes(b"x")
        assert "fresh" not in networks.available_networks
        on_delivered = RUNTIME.service.scheduler.on_delivered
        assert on_delivered is not None
        on_delivered(_queued_job("fresh"), [lora])
        assert networks.available_networks["fresh"] == str(lora)


def test_the_webuis_interrogator_captions_under_its_queue_lock(tmp_path: Path) -> None:
    with running_webui(tmp_path / "webui", TRAINER) as _ui:
        from modules import call_queue, shared

        image = tmp_path / "red.png"
        Image.new("RGB", (48, 32), (200, 10, 10)).save(image)
        interrogate = hooks.interrogate_hook(shared.interrogator, call_queue.queue_lock, wait_s=0.2)
        assert interrogate is not None
        assert interrogate(image) == "a red picture, 48x32"
        with call_queue.queue_lock, pytest.raises(Exception, match="busy"):
            interrogate(image)
        assert shared.interrogator.calls == 1
        assert hooks.interrogate_hook(None) is None


def test_workers_named_on_the_command_line_are_registered(tmp_path: Path) -> None:
    from kohya_backend.jobs.registry import WorkerRegistry

    token = tmp_path / "worker-token.txt"
    token.write_text("a-long-enough-worker-token-0123456789\n", encoding="utf-8")
    argv = [*TRAINER, "--train-worker", "http://127.0.0.1:7870", "--train-worker", "http://127.0.0.1:7871",
            "--train-worker-token-file", str(token)]  # fmt: skip
    with running_webui(tmp_path / "webui", argv) as ui:
        assert RUNTIME.service is not None
        entries = WorkerRegistry(RUNTIME.service.home.root).entries()
        assert sorted(e.url.rstrip("/") for e in entries) == [
            "http://127.0.0.1:7870",
            "http://127.0.0.1:7871",
        ]
        ui.reload()  # registering again at the next app_started changes nothing
        assert len(WorkerRegistry(RUNTIME.service.home.root).entries()) == 2
    with running_webui(tmp_path / "webui2", [*TRAINER, "--train-worker", "http://127.0.0.1:7870"]) as _ui:
        assert RUNTIME.service is not None and WorkerRegistry(RUNTIME.service.home.root).entries() == []
