"""kohya_backend.host without a WebUI: settings, credentials, the process runtime and the hooks' edge cases."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kohya_backend.errors import TrainManagementError
from kohya_backend.host import hooks
from kohya_backend.host.auth import _matches, parse_credentials, webui_credentials
from kohya_backend.host.runtime import HostConfig, HostRuntime, local_devices
from kohya_backend.host.settings import SETTINGS, HostSettings, home_folder, lora_folder
from kohya_backend.jobs.runner import LocalRunner
from kohya_backend.jobs.scheduler import StartDeferred
from kohya_backend.jobs.store import Job


def test_settings_read_the_values_the_webui_hands_back() -> None:
    assert HostSettings.from_values({}) == HostSettings()
    read = HostSettings.from_values(
        {"train_management_concurrency": "3.0", "train_management_unload_model": "False",
         "train_management_keep_epochs": 1, "train_management_home": "  /data/tm ",
         "train_management_lora_subfolder": None, "train_management_stall_minutes": "45.0"}
    )  # fmt: skip
    assert read == HostSettings(
        home="/data/tm", unload_model=False, keep_epochs=True, concurrency=3, stall_minutes=45
    )
    assert HostSettings.from_values({"train_management_stall_minutes": 9999}).stall_minutes == 240
    assert HostSettings.from_values({"train_management_stall_minutes": "soon"}).stall_minutes == 15
    assert HostSettings.from_values({"train_management_concurrency": 99}).concurrency == 8
    assert HostSettings.from_values({"train_management_concurrency": "lots"}).concurrency == 1
    assert len({s.key for s in SETTINGS}) == len(SETTINGS) and all(
        s.key.startswith("train_management_") for s in SETTINGS
    )


def test_home_folder_prefers_the_flag_then_the_setting(tmp_path: Path) -> None:
    assert home_folder(None, "", tmp_path) == tmp_path / "train_management"
    assert home_folder(None, "relative/home", tmp_path) == tmp_path / "relative" / "home"
    assert home_folder("/flag/home", "/setting/home", tmp_path) == Path("/flag/home")
    assert home_folder("  ", "/setting/home", tmp_path) == Path("/setting/home")


@pytest.mark.parametrize(
    "bad", ["../outside", "a/../../b", "/etc", "C:\\Windows", "\\\\server\\share", "a\\..\\.."]
)
def test_the_lora_subfolder_never_leaves_the_lora_folder(tmp_path: Path, bad: str) -> None:
    with pytest.raises(TrainManagementError, match="leaves the Lora folder"):
        lora_folder(tmp_path, bad)


def test_the_lora_subfolder_nests_inside_the_lora_folder(tmp_path: Path) -> None:
    assert lora_folder(tmp_path, "") == tmp_path
    assert lora_folder(tmp_path, "trained/") == tmp_path / "trained"
    assert lora_folder(tmp_path, "a/b") == tmp_path / "a" / "b"
    assert lora_folder(tmp_path, "a\\b") == tmp_path / "a" / "b"


def test_credentials_follow_the_webuis_format_and_precedence(tmp_path: Path) -> None:
    assert parse_credentials(['alice:wonder, "bob" : pass:word ,'], where="x") == {
        "alice": "wonder", "bob": "pass:word"
    }  # fmt: skip
    with pytest.raises(TrainManagementError, match="user:password"):
        parse_credentials(["alice"], where="--api-auth")
    auth_file = tmp_path / "auth.txt"
    auth_file.write_text("carol:c1\ndave:d1,erin:e1\n", encoding="utf-8")
    assert webui_credentials("alice:a", "bob:b", str(auth_file)) == {"alice": "a"}
    assert webui_credentials(None, "bob:b", str(auth_file)) == {
        "bob": "b",
        "carol": "c1",
        "dave": "d1",
        "erin": "e1",
    }
    assert webui_credentials(None, None, None) is None
    with pytest.raises(TrainManagementError, match="gradio-auth-path"):
        webui_credentials(None, None, str(tmp_path / "missing.txt"))
    users = {"alice": "a", "bob": "b"}
    assert _matches(users, "bob", "b") and not _matches(users, "bob", "a") and not _matches(users, "", "")


def _job(tmp_path: Path) -> Job:
    from kohya_backend.jobs.store import JobStore

    store = JobStore(tmp_path / "store")
    return store.create(fm_type="sd_1_5", model="m", dataset="d", instance_type="local", output_name="o",
                        config_toml="", params={})  # fmt: skip


def test_unloading_never_blocks_the_scheduler_and_never_fails_a_start(tmp_path: Path) -> None:
    job = _job(tmp_path)
    calls: list[str] = []
    lock = threading.Lock()
    now = [100.0]
    before = hooks.unload_before_start(
        lambda: True, lambda: calls.append("unload"), lock, wait_s=120, clock=lambda: now[0]
    )
    with lock:  # a generation holds the WebUI's queue lock
        started = time.monotonic()
        with pytest.raises(StartDeferred) as waiting:
            before(job, "cuda:0")
        assert time.monotonic() - started < 5  # asked, not waited (a wait lasts as long as the generation)
        assert waiting.value.phase == hooks.WAITING_PHASE == "waiting for the WebUI to finish generating"
        now[0] += 119
        with pytest.raises(StartDeferred):
            before(job, "cuda:0")
        now[0] += 2
        before(job, "cuda:0")  # busy past the limit: start without unloading
    assert calls == []
    before(job, "cuda:0")  # the generation has ended: unload (holding the lock), then start
    assert calls == ["unload"] and not lock.locked()

    def broken() -> None:
        raise RuntimeError("no model loaded")

    hooks.unload_before_start(lambda: True, broken, lock)(job, "cpu")  # logged, not raised
    assert not lock.locked()
    hooks.unload_before_start(lambda: False, lambda: calls.append("unload"), lock)(job, "cpu")
    assert calls == ["unload"]


def test_the_trainer_check_refuses_or_hands_the_interpreter_on(tmp_path: Path) -> None:
    job = _job(tmp_path)
    applied: list[list[str]] = []
    ready = hooks.use_trainer(lambda: (["/env/bin/python"], None), applied.append, "hint")
    missing = hooks.use_trainer(lambda: (None, "not set up"), applied.append, "run install.py")
    order: list[str] = []
    chained = hooks.chain(missing, lambda j, d: order.append("unload"))
    with pytest.raises(TrainManagementError, match="not set up") as caught:
        chained(job, "cuda:1")
    assert caught.value.hint == "run install.py" and order == [] and applied == []
    ready(job, "cuda:1")
    assert applied == [["/env/bin/python"]]


def test_refreshing_loras_without_the_builtin_lora_extension_is_harmless(tmp_path: Path) -> None:
    refreshed: list[int] = []

    class Networks:
        def list_available_networks(self) -> None:
            refreshed.append(1)

    hooks.refresh_loras(lambda: None)(_job(tmp_path), [])
    hooks.refresh_loras(lambda: Networks())(_job(tmp_path), [])
    assert refreshed == [1]


def _config(tmp_path: Path, **changes: Any) -> HostConfig:
    values: dict[str, Any] = {
        "home": tmp_path / "home", "models_dirs": (tmp_path / "ckpt",), "lora_dir": tmp_path / "Lora",
        "python": None, "gpus": (), "per_device": 1, "keep_epochs": False,
    }  # fmt: skip
    values.update(changes)
    return HostConfig(**values)


def test_the_runtime_builds_once_starts_once_and_rebuilds_for_new_folders(tmp_path: Path) -> None:
    runtime = HostRuntime()
    try:
        service = runtime.ensure(_config(tmp_path))
        assert runtime.datasets is not None and runtime.datasets.home is service.home
        assert runtime.start() is True and runtime.start() is False
        again = runtime.ensure(_config(tmp_path, per_device=2, keep_epochs=True, python=("/py",)))
        assert again is service and service.scheduler.devices == {"cpu": 2} and service.scheduler.keep_epochs
        local = service.scheduler.runners["local"]
        assert isinstance(local, LocalRunner) and local.python == ("/py",)
        moved = runtime.ensure(_config(tmp_path, home=tmp_path / "other"))
        assert moved is not service and moved.home.root == (tmp_path / "other").resolve()
        assert runtime.started and moved.scheduler._thread is not None and moved.scheduler._thread.is_alive()
        deadline = time.monotonic() + 10
        while service.scheduler._thread is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.scheduler._thread is None  # the old one was stopped
    finally:
        runtime.reset()
    assert local_devices(("cuda:0", "cuda:2"), 2) == {"cuda:0": 2, "cuda:2": 2}
    assert local_devices((), 0) == {"cpu": 1}


def test_extension_access_follows_the_webuis_flag_or_its_rule() -> None:
    from types import SimpleNamespace

    from kohya_backend.host.exposure import api_refusal, extension_access_disabled, workers_refusal

    assert extension_access_disabled(SimpleNamespace(disable_extension_access=True, listen=False)) is True
    assert extension_access_disabled(SimpleNamespace(disable_extension_access=False, listen=True)) is False
    # A build that does not set it: computed the WebUI's way.
    assert extension_access_disabled(SimpleNamespace(listen=True)) is True
    assert extension_access_disabled(SimpleNamespace(server_name="0.0.0.0")) is True
    assert (
        extension_access_disabled(SimpleNamespace(share=True, enable_insecure_extension_access=True)) is False
    )
    assert extension_access_disabled(SimpleNamespace()) is False
    assert api_refusal(False, False, "/p") is None and api_refusal(True, True, "/p") is None
    assert "REST API (/p) is not mounted" in (api_refusal(True, False, "/p") or "")
    assert (
        workers_refusal(False, False, Path("/h")) is None and workers_refusal(True, True, Path("/h")) is None
    )
    assert "--home /h" in (workers_refusal(True, False, Path("/h")) or "")


def test_flag_workers_report_a_token_over_plain_http(tmp_path: Path) -> None:
    from kohya_backend.host.workers import register_flag_workers

    token = tmp_path / "token.txt"
    token.write_text("a-long-enough-worker-token-0123456789\n", encoding="utf-8")
    assert register_flag_workers(tmp_path / "home", ["http://127.0.0.1:7870"], str(token)) == []
    (message,) = register_flag_workers(tmp_path / "home", ["http://gpu-box.example.com:7870"], str(token))
    assert "--train-worker http://gpu-box.example.com:7870" in message and "plain http" in message
    assert register_flag_workers(tmp_path / "home", ["https://gpu-box.example.com"], str(token)) == []


def test_the_s3_prefix_setting_reaches_the_lists_and_clearing_it_falls_back_to_cloud_toml(
    tmp_path: Path,
) -> None:
    assert (
        HostSettings.from_values({"train_management_s3_prefix": " s3://bkt/train "}).s3_prefix
        == "s3://bkt/train"
    )
    home = tmp_path / "home"
    home.mkdir()
    (home / "cloud.toml").write_text('[s3]\nuri = "s3://from-file/p"\n')
    runtime = HostRuntime()
    try:
        service = runtime.ensure(_config(tmp_path, s3_prefix="s3://from-setting/x"))
        assert str(service.s3.prefix) == "s3://from-setting/x"
        assert runtime.ensure(_config(tmp_path, s3_prefix="s3://other-bkt/y")) is service
        assert str(service.s3.prefix) == "s3://other-bkt/y"
        runtime.ensure(_config(tmp_path, s3_prefix=""))
        assert str(service.s3.prefix) == "s3://from-file/p"
    finally:
        runtime.reset()


def test_the_sagemaker_settings_reach_the_runner_and_clearing_them_falls_back_to_cloud_toml(
    tmp_path: Path,
) -> None:
    from kohya_backend.jobs.sagemaker import SageMakerRunner

    role = "arn:aws:iam::123456789012:role/FromSetting"
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/train-management:2"
    read = HostSettings.from_values(
        {"train_management_sagemaker_role_arn": f" {role} ", "train_management_sagemaker_image_uri": image}
    )
    assert (read.sagemaker_role_arn, read.sagemaker_image_uri) == (role, image)
    home = tmp_path / "home"
    home.mkdir()
    (home / "cloud.toml").write_text(
        '[s3]\nuri = "s3://bkt/train"\n[sagemaker]\nrole_arn = "arn:aws:iam::123456789012:role/FromFile"\n'
    )
    runtime = HostRuntime()
    try:
        service = runtime.ensure(_config(tmp_path))
        runner = service.scheduler.runners["sagemaker"]
        assert isinstance(runner, SageMakerRunner) and not runner.settings.configured
        assert [e["state"] for e in service.instance_types() if e["name"] == "sagemaker"] == ["error"]
        assert (
            runtime.ensure(_config(tmp_path, sagemaker_role_arn=role, sagemaker_image_uri=image)) is service
        )
        assert (runner.settings.role_arn, runner.settings.image_uri) == (role, image)
        assert "sagemaker:ml.g5.2xlarge:spot" in [e["name"] for e in service.instance_types()]
        runtime.ensure(_config(tmp_path))
        assert runner.settings.role_arn.endswith("role/FromFile") and not runner.settings.image_uri
        with pytest.raises(TrainManagementError, match="not an IAM role ARN"):
            runtime.ensure(_config(tmp_path, sagemaker_role_arn="my-role"))
    finally:
        runtime.reset()
