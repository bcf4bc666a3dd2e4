"""How the tab words service answers: progress, durations, instance choices, FM labels, rows and plans."""

from __future__ import annotations

import pytest

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.states import JobStatus
from kohya_backend.ui.present import (
    JOB_HEADERS,
    duration,
    fm_type_of,
    instance_choice,
    instance_name,
    job_row,
    plan_markdown,
    progress_text,
    worker_row,
)


def _job(status: str, **progress: object) -> dict[str, object]:
    return {
        "id": "20260101-000000-abcdef", "output_name": "x", "model": "m.safetensors", "dataset": "d",
        "instance_type": "local", "status": status, "created_at": 0.0, "progress": progress,
    }  # fmt: skip


def test_progress_eta_and_rows() -> None:
    running = _job("training", step=25, total_steps=200, avg_loss=0.123456, it_per_s=3.456, eta_s=3725.2)
    assert progress_text(running) == "25/200 (12%)"
    row = job_row(running)
    assert len(row) == len(JOB_HEADERS)
    assert row[5:10] == ["training", "25/200 (12%)", "0.1235", "3.46", "1:02:05"]
    finished = job_row(_job("completed", step=200, total_steps=200, it_per_s=3.0, eta_s=0.0))
    assert finished[6:10] == ["200/200 (100%)", "", "", ""]
    assert progress_text(_job("preparing", phase="caching")) == "caching"
    assert progress_text(_job("queued")) == "" == progress_text(_job("queued", phase="queued"))
    waiting = _job("queued", phase="waiting for the WebUI to finish generating")
    assert job_row(waiting)[6] == "waiting for the WebUI to finish generating"
    assert duration(None) == "" and duration(59.6) == "0:01:00"


def test_speed_and_eta_show_for_queued_and_active_jobs_only() -> None:
    assert JobStatus.busy() == {JobStatus.QUEUED, *JobStatus.active()}
    for status in JobStatus:
        row = job_row(_job(status.value, step=1, total_steps=2, it_per_s=2.0, eta_s=5.0))
        shown = status in JobStatus.busy()
        assert row[8:10] == (["2.00", "0:00:05"] if shown else ["", ""]), status


def test_instance_choices_and_fm_labels_round_trip() -> None:
    choice = instance_choice({"name": "gpu-box", "label": "worker gpu-box (RTX 4090)"})
    assert choice == "worker gpu-box (RTX 4090) [gpu-box]" and instance_name(choice) == "gpu-box"
    assert instance_name("local") == "local"
    with pytest.raises(TrainManagementError, match="no Training Instance Type"):
        instance_name(None)
    assert fm_type_of("SDXL") == "sd_xl" and fm_type_of("sd_1_5") == "sd_1_5"
    with pytest.raises(TrainManagementError, match="FM type 'SD 3' is unknown"):
        fm_type_of("SD 3")


def test_plan_text_without_a_dataset_or_with_a_broken_one() -> None:
    assert plan_markdown({"plan": None, "dataset_error": None}) == "Choose a dataset to see the plan."
    broken = plan_markdown({"plan": None, "dataset_error": {"message": "no images", "files": ["10_x/a.png"]}})
    assert broken == "**The dataset cannot be trained on:** no images\n- `10_x/a.png`"


def test_worker_rows_show_state_why_and_load_never_the_token() -> None:
    worker = {"name": "gpu1", "url": "https://gpu-box/w1", "token": "secret", "state": "offline",
              "error": "connection refused", "gpu": "?", "free_disk_gb": None, "jobs_here": 0}  # fmt: skip
    assert worker_row(worker) == ["gpu1", "offline (connection refused)", "?", "", "https://gpu-box/w1"]
    busy = {**worker, "state": "busy", "error": None, "gpu": "NVIDIA A100 (80 GB)", "free_disk_gb": 412.4,
            "jobs_here": 1}  # fmt: skip
    assert worker_row(busy)[1:4] == ["busy, 1 job(s) from here", "NVIDIA A100 (80 GB)", "412 GiB"]
    plain = worker_row(
        {**busy, "url": "http://gpu-box:7870", "warning": "the worker token goes to gpu-box ..."}
    )
    assert plain[4] == "http://gpu-box:7870 ⚠️ plain http: the token is readable on the way"
