"""What kohya_backend offers a host such as the WebUI: its folders, the trainer's interpreter, devices and hooks."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.runner import RUN_NAME, read_json
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job
from kohya_backend.service.app import build_service
from kohya_backend.service.home import Home, PathOutsideHome


def test_a_models_dirs_override_names_models_relative_to_it(tmp_path: Path) -> None:
    checkpoints = tmp_path / "webui" / "models" / "Stable-diffusion"
    (checkpoints / "sdxl").mkdir(parents=True)
    (checkpoints / "sdxl" / "base.safetensors").write_bytes(b"not a real checkpoint")
    home = Home(tmp_path / "home", models_dirs=[checkpoints])
    assert home.models == checkpoints.resolve()
    assert home.roots()["models"] == home.models
    assert not (tmp_path / "home" / "models").exists()
    assert home.model_path("sdxl/base.safetensors") == (checkpoints / "sdxl" / "base.safetensors").resolve()
    assert [m["name"] for m in home.list_models()] == ["sdxl/base.safetensors"]
    with pytest.raises(PathOutsideHome):
        home.model_path("../../../home/jobs.sqlite3")


def _submit(service_home: Path, **kwargs: object) -> tuple[list[tuple[str, str]], Job, object]:
    """A service whose trainer 'interpreter' exits at once, with a recording before_local_start hook."""
    calls: list[tuple[str, str]] = []

    def before(job: Job, device: str) -> None:
        calls.append((job.id, device))
        if kwargs.get("refuse"):
            raise TrainManagementError("the trainer's environment is not ready", "run install.py again")

    service = build_service(
        service_home,
        python=[sys.executable, "-c", "import sys; sys.exit(0)"],
        devices={"cpu": 2},
        keep_epochs=True,
        before_local_start=before,
        poll_interval_s=0.05,
    )
    job = service.scheduler.submit(
        fm_type="sd_1_5",
        model="m.safetensors",
        dataset="d",
        instance_type="local",
        output_name="n",
        config_toml="",
        params={},
    )
    return calls, job, service


def _settled(service: object, job_id: str) -> Job:
    scheduler = service.scheduler  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while True:
        scheduler.tick()
        job = scheduler.store.get(job_id)
        if job.status.is_terminal:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_build_service_passes_interpreter_devices_and_the_before_start_hook(tmp_path: Path) -> None:
    calls, job, service = _submit(tmp_path / "home")
    scheduler = service.scheduler  # type: ignore[attr-defined]
    assert scheduler.devices == {"cpu": 2} and scheduler.keep_epochs is True
    done = _settled(service, job.id)
    assert calls == [(job.id, "cpu")]
    command = read_json(done.folder / RUN_NAME)["command"]  # type: ignore[index]
    assert command[:3] == [sys.executable, "-c", "import sys; sys.exit(0)"]
    assert done.status is JobStatus.FAILED  # exit 0 without a result is not a finished training


def test_a_refusing_before_start_hook_fails_the_job_without_starting_a_trainer(tmp_path: Path) -> None:
    calls, job, service = _submit(tmp_path / "home", refuse=True)
    done = _settled(service, job.id)
    assert calls == [(job.id, "cpu")]
    assert done.status is JobStatus.FAILED
    assert "not ready" in (done.reason or "") and "run install.py again" in (done.reason or "")
    assert not (done.folder / RUN_NAME).exists()


def test_a_deferring_before_start_hook_keeps_jobs_queued_in_order_and_the_scheduler_free(
    tmp_path: Path,
) -> None:
    import threading

    from kohya_backend.host.hooks import WAITING_PHASE, unload_before_start

    generating = threading.Lock()
    unloads: list[str] = []
    service = build_service(
        tmp_path / "home",
        python=[sys.executable, "-c", "import sys; sys.exit(0)"],
        devices={"cpu": 1},
        before_local_start=unload_before_start(lambda: True, lambda: unloads.append("x"), generating),
    )
    scheduler = service.scheduler

    def submit(name: str) -> Job:
        return scheduler.submit(fm_type="sd_1_5", model="m.safetensors", dataset="d", instance_type="local",
                                output_name=name, config_toml="", params={})  # fmt: skip

    first, second = submit("first"), submit("second")
    with generating:  # the WebUI generates: nothing starts, and a tick returns at once
        began = time.monotonic()
        scheduler.tick()
        scheduler.tick()
        assert time.monotonic() - began < 10  # a tick that waited for the generation would block far longer
        waiting = scheduler.store.get(first.id)
        assert waiting.status is JobStatus.QUEUED and waiting.progress["phase"] == WAITING_PHASE
        assert scheduler.store.get(second.id).progress.get("phase") is None  # it does not jump the queue
        assert scheduler.cancel(second.id).status is JobStatus.CANCELLED  # commands still apply
    assert unloads == []
    done = _settled(service, first.id)
    assert unloads == ["x"] and not generating.locked()
    moves = [(t.from_status, t.to_status) for t in scheduler.store.transitions(first.id)]
    assert moves[:2] == [(None, JobStatus.QUEUED), (JobStatus.QUEUED, JobStatus.PREPARING)]  # waited queued
    assert done.status is JobStatus.FAILED  # the stand-in trainer exits without a result
