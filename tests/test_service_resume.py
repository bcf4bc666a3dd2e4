"""Cancel -> Resume continues a job where it stopped by default: a job submitted through the service (as the tab
and the API do) with no save_state in its config saves its training state when cancelled, and Resume starts from
that state. The real trainer runs on the tiny demo model."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from jobs_support import FAST_CONFIG

from kohya_backend.assets.demo import prepare_demo
from kohya_backend.jobs.states import JobStatus
from kohya_backend.service.app import build_service
from kohya_backend.service.training import Submission, TrainingService

pytestmark = pytest.mark.slow


def _until(service: TrainingService, done: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, service.list()["jobs"]
        service.scheduler.tick()
        time.sleep(0.05)


def test_cancel_then_resume_continues_from_the_step_it_stopped_at(tmp_path: Path) -> None:
    prepare_demo(tmp_path / "home", steps=4)
    service = build_service(tmp_path / "home", devices={"cpu": 1})
    config = FAST_CONFIG.format(steps=80, name="exact")
    assert "save_state" not in config
    job = service.submit(Submission("demo-sd_1_5.safetensors", "demo", "sd_1_5", config))
    _until(service, lambda: (service.store.get(job.id).progress.get("step") or 0) >= 3)
    service.cancel(job.id)
    _until(service, lambda: service.store.get(job.id).status is JobStatus.CANCELLED)
    stopped = json.loads((job.folder / "result.json").read_text())
    assert stopped["status"] == "stopped" and 3 <= stopped["step"] < 80
    assert service.store.get(job.id).progress.get("state"), "no state was saved at the cancel"

    service.resume(job.id)
    _until(service, lambda: service.store.get(job.id).status.is_terminal)
    done = service.store.get(job.id)
    assert done.status is JobStatus.COMPLETED, done.reason
    steps = [e["step"] for e in map(json.loads, (job.folder / "events.jsonl").read_text().splitlines())
             if e["kind"] == "step"]  # fmt: skip
    second_run = steps[steps.index(stopped["step"]) + 1 :]
    assert second_run == list(range(stopped["step"] + 1, 81))  # continued, not started over at step 1


def _steps(folder: Path) -> list[int]:
    events = map(json.loads, (folder / "events.jsonl").read_text().splitlines())
    return [e["step"] for e in events if e["kind"] == "step"]


def test_a_continued_job_trains_on_after_its_source_job_and_lora_are_deleted(tmp_path: Path) -> None:
    prepare_demo(tmp_path / "home", steps=4)
    service = build_service(tmp_path / "home", devices={"cpu": 1})
    config = FAST_CONFIG.format(steps=4, name="source")
    source = service.submit(Submission("demo-sd_1_5.safetensors", "demo", "sd_1_5", config))
    _until(service, lambda: service.store.get(source.id).status.is_terminal)
    assert service.store.get(source.id).status is JobStatus.COMPLETED, service.store.get(source.id).reason

    follow = service.continue_training(source.id)
    service.cancel(follow.id)  # still queued: it runs only at a later Resume
    service.delete(source.id)
    (service.home.lora / "source.safetensors").unlink()
    service.resume(follow.id)
    _until(service, lambda: service.store.get(follow.id).status.is_terminal)
    done = service.store.get(follow.id)
    assert done.status is JobStatus.COMPLETED, done.reason
    assert _steps(follow.folder) == [5, 6, 7, 8]  # on from the source's saved state at step 4, as long again
