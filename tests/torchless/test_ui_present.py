"""How the tab words service answers: progress, durations, instance choices, FM labels, rows and plans."""

from __future__ import annotations

import pytest

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.states import JobStatus
from kohya_backend.ui.present import (
    JOB_HEADERS,
    JOB_ID_COLUMN,
    duration,
    error_markdown,
    fm_type_of,
    health_markdown,
    instance_choice,
    instance_name,
    job_markdown,
    job_row,
    no_datasets_markdown,
    no_models_markdown,
    plan_markdown,
    progress_text,
    worker_row,
)


def _job(status: str, **progress: object) -> dict[str, object]:
    return {
        "id": "20260101-000000-abcdef", "output_name": "x", "model": "m.safetensors", "dataset": "d",
        "instance_type": "local", "status": status, "created_at": 0.0, "progress": progress,
    }  # fmt: skip


def _cells(row: list[str], *headers: str) -> list[str]:
    return [row[JOB_HEADERS.index(h)] for h in headers]


def test_progress_eta_and_rows() -> None:
    assert JOB_HEADERS[:2] == ["status", "progress"] and JOB_HEADERS[JOB_ID_COLUMN] == "id"
    running = _job("training", step=25, total_steps=200, avg_loss=0.123456, it_per_s=3.456, eta_s=3725.2)
    assert progress_text(running) == "25/200 (12%)"
    row = job_row(running)
    assert len(row) == len(JOB_HEADERS)
    assert row[:6] == ["training", "25/200 (12%)", "x", "0.1235", "3.46", "1:02:05"]
    assert _cells(row, "instance", "model", "dataset", "id") == [
        "local",
        "m.safetensors",
        "d",
        "20260101-000000-abcdef",
    ]
    finished = job_row(_job("completed", step=200, total_steps=200, it_per_s=3.0, eta_s=0.0))
    assert _cells(finished, "progress", "loss", "it/s", "ETA") == ["200/200 (100%)", "", "", ""]
    assert progress_text(_job("preparing", phase="caching")) == "caching"
    assert progress_text(_job("queued")) == "in queue" == progress_text(_job("queued", phase="queued"))
    assert progress_text({**_job("queued"), "queue_position": 3}) == "#3 in queue"
    waiting = {**_job("queued", phase="waiting for the WebUI to finish generating"), "queue_position": 1}
    assert job_row(waiting)[1] == "#1 in queue: waiting for the WebUI to finish generating"
    assert duration(None) == "" and duration(59.6) == "0:01:00"


def test_a_stalled_training_says_so_in_its_row_and_headline() -> None:
    stalled = {"since": 0.0, "silent_s": 960, "log_tail": "step 3/30\nloading shard 2\n"}
    row = job_row({**_job("training", step=3, total_steps=30), "stalled": stalled})
    assert row[0] == "training (stalled 0:16:00)"
    headline = job_markdown({**_job("training", step=3, total_steps=30), "stalled": stalled})
    assert "Stalled" in headline and "0:16:00" in headline and "step 3/30\nloading shard 2\n```" in headline
    assert "Cancel" in headline
    # a job that reports again (stalled None) reads as plain training
    assert job_row({**_job("training"), "stalled": None})[0] == "training"
    assert "Stalled" not in job_markdown({**_job("training"), "stalled": None})


def test_the_headline_says_what_became_of_an_fp16_files_frozen_weights() -> None:
    message = "upcast 1.97 GB of fp16/bf16 frozen weights to fp32 once (3.93 GB; ...)"
    upcast = _job("training", step=2, frozen_weights={"choice": "upcast", "message": message})
    assert job_markdown(upcast).endswith(f"\n\nFrozen weights: {message}")
    assert "Frozen weights" not in job_markdown(_job("training", step=2))  # an fp32 file: nothing was decided


def test_speed_and_eta_show_for_queued_and_active_jobs_only() -> None:
    assert JobStatus.busy() == {JobStatus.QUEUED, *JobStatus.active()}
    for status in JobStatus:
        row = job_row(_job(status.value, step=1, total_steps=2, it_per_s=2.0, eta_s=5.0))
        shown = status in JobStatus.busy()
        assert _cells(row, "it/s", "ETA") == (["2.00", "0:00:05"] if shown else ["", ""]), status


def test_empty_home_guidance_names_the_folders() -> None:
    models = no_models_markdown(["/home/me/models", "/webui/models/Stable-diffusion"])
    assert "`/home/me/models` or `/webui/models/Stable-diffusion`" in models and "↻" in models
    assert "`/home/me/datasets`" in no_datasets_markdown("/home/me/datasets")


def test_a_hint_for_the_page_is_shown_instead_of_the_command_line_one() -> None:
    error = TrainManagementError(
        "worker 'a' refused its token", "`workers add URL`", web_hint="open the panel"
    )
    assert error_markdown(error).endswith("Hint: open the panel") and "workers add" not in error_markdown(
        error
    )
    assert error_markdown(TrainManagementError("x", "the CLI way")).endswith("Hint: the CLI way")


def test_health_report_text_lists_findings_then_numbers() -> None:
    report = {
        "name": "cats", "images": 3, "resolution": 512, "unreadable": [{"file": "1_c/x.png", "reason": "broken"}],
        "duplicates": {"identical": [["1_c/a.png", "1_c/b.png"]], "near": []},
        "sizes": {"tiny": 1, "tiny_files": [{"file": "1_c/t.png", "width": 8, "height": 8}], "tiny_below": "256x256",
                  "huge": 0, "huge_files": [], "huge_above": "2048x2048", "smallest": (8, 8), "largest": (8, 8)},
        "aspect_ratios": {"portrait": 0, "square": 3, "landscape": 0, "extreme": 0, "extreme_files": [],
                          "buckets": [{"width": 512, "height": 512, "images": 3}], "bucket_settings": "defaults"},
        "captions": {"missing": 1, "missing_files": ["1_c/b.png"], "empty": 0, "empty_files": [],
                     "tokens_counted_with": "CLIP", "max_tokens": 80, "mean_tokens": 40.0,
                     "over": {"75": 1, "150": 0, "225": 0}, "longest": [{"file": "1_c/a.png", "tokens": 80}]},
        "tags": {"distinct": 2, "most_common": [{"tag": "cat", "images": 2}], "least_common": [{"tag": "dog", "images": 1}]},
        "mismatched_extensions": [{"file": "1_c/a.png", "extension": ".png", "content": "JPEG"}],
    }  # fmt: skip
    text = health_markdown(report)
    assert text.startswith("**Health of cats** at 512 px: 3 image(s), 6 finding(s)")
    assert (
        "identical files: `1_c/a.png`, `1_c/b.png`" in text and "without a caption file: `1_c/b.png`" in text
    )
    assert "longer than 75 tokens" in text and "tiny image(s), below 256x256: `1_c/t.png`" in text
    assert "`1_c/a.png` is a JPEG file named .png" in text and "`1_c/x.png` cannot be read: broken" in text
    assert "512x512: 3" in text and "most common: cat (2)" in text and "least common: dog (1)" in text


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
