"""Submissions over HTTP: automatic output names never collide, an Idempotency-Key returns the job it queued, and
Format config Params runs the family check a submission gets."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from home_support import SD15_KEYS
from PIL import Image
from safetensors.numpy import save_file
from server_support import running

import kohya_backend.service.training as training
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service, create_app
from kohya_backend.service.training import TrainingService

SDXL_KEYS = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "conditioner.embedders.0.transformer.text_model.x",
    "conditioner.embedders.1.model.x",
)
CONFIG = {"resolution": "64,64", "max_train_steps": 2, "mixed_precision": "no"}


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrainingService:
    service = build_service(tmp_path / "home")
    for name, keys in (("sd15", SD15_KEYS), ("sdxl", SDXL_KEYS)):
        save_file(
            {k: np.zeros((2, 2), np.float16) for k in keys}, str(service.home.models / f"{name}.safetensors")
        )
    folder = service.home.datasets / "cats" / "5_cat"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 90, 10, 10)).save(folder / f"{i}.png")
    # Every submission of this test happens "in the same second".
    monkeypatch.setattr(training, "_stamp", lambda: "20260101-120000")
    return service


@pytest.fixture
def api(service: TrainingService) -> Iterator[httpx.Client]:
    with running(create_app(service)) as base, httpx.Client(base_url=base + API_PREFIX, timeout=60) as client:
        yield client


def _job(**config: Any) -> dict[str, Any]:
    return {
        "training_params": {"model": "sd15.safetensors", "dataset": "cats", "fm_type": "sd_1_5"},
        "config_params": {**CONFIG, **config},
    }


def test_automatic_output_names_never_collide(api: httpx.Client) -> None:
    names = [api.post("/trainings", json=_job()).json()["job"]["output_name"] for _ in range(3)]
    assert names == ["cats-20260101-120000", "cats-20260101-120000-2", "cats-20260101-120000-3"]
    answers: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: answers.append(api.post("/trainings", json=_job()))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
    concurrent = {a.json()["job"]["output_name"] for a in answers}
    assert len(concurrent) == 4 and not concurrent & set(names)
    # A name the client chose is still its own: asking for a taken one is refused, not renamed.
    assert api.post("/trainings", json=_job(output_name="mine")).status_code == 201
    taken = api.post("/trainings", json=_job(output_name="mine"))
    assert taken.status_code == 409 and "already used" in taken.json()["detail"]["message"]
    assert api.post("/trainings", json=_job(output_name=names[0])).status_code == 409


def test_an_idempotency_key_returns_the_job_it_queued(api: httpx.Client, service: TrainingService) -> None:
    key = {"Idempotency-Key": "3f0c2d9e-8a41-4c55-9d0e-1b2a3c4d5e6f"}
    first = api.post("/trainings", json=_job(), headers=key)
    again = api.post("/trainings", json=_job(), headers=key)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["job"]["id"] == first.json()["job"]["id"]
    other = api.post("/trainings", json=_job(), headers={"Idempotency-Key": "another-key"})
    assert other.status_code == 201 and other.json()["job"]["id"] != first.json()["job"]["id"]
    assert api.post("/trainings", json=_job()).json()["job"]["id"] not in (first.json()["job"]["id"],)
    assert service.store.list()[1] == 3

    answers: list[httpx.Response] = []
    racing = {"Idempotency-Key": "raced-key"}
    threads = [
        threading.Thread(target=lambda: answers.append(api.post("/trainings", json=_job(), headers=racing)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 201]
    assert len({a.json()["job"]["id"] for a in answers}) == 1 and service.store.list()[1] == 4

    # The same key with another submission (a client reusing keys by mistake) gets no job it did not ask for.
    reused = api.post("/trainings", json=_job(max_train_steps=3), headers=key)
    assert reused.status_code == 422, reused.text
    detail = reused.json()["detail"]
    assert detail["error"] == "KeyReused" and first.json()["job"]["id"] in detail["message"]
    assert service.store.list()[1] == 4
    assert api.post("/trainings", json=_job(), headers=key).status_code == 200  # the first one still answers

    job_id = first.json()["job"]["id"]  # once its job is deleted, the key queues a new one
    api.post(f"/trainings/{job_id}/cancel")
    assert api.delete(f"/trainings/{job_id}").status_code == 204
    renewed = api.post("/trainings", json=_job(), headers=key)
    assert renewed.status_code == 201 and renewed.json()["job"]["id"] != job_id


def test_keys_of_deleted_jobs_are_pruned_at_the_next_start_once_a_day_old(
    api: httpx.Client, service: TrainingService
) -> None:
    kept, dropped, fresh = ({"Idempotency-Key": k} for k in ("kept-job", "deleted-job", "deleted-today"))
    live = api.post("/trainings", json=_job(), headers=kept).json()["job"]["id"]
    for key in (dropped, fresh):
        job_id = api.post("/trainings", json=_job(), headers=key).json()["job"]["id"]
        api.post(f"/trainings/{job_id}/cancel")
        assert api.delete(f"/trainings/{job_id}").status_code == 204
    old = time.time() - training.KEYS_KEPT_S - 60
    for key in (kept, dropped):
        os.utime(service.keys.marker(key["Idempotency-Key"]), (old, old))
    restarted = training.TrainingService(service.home, service.scheduler)
    markers = {
        h["Idempotency-Key"]: restarted.keys.marker(h["Idempotency-Key"]).exists()
        for h in (kept, dropped, fresh)
    }
    # an old key of a live job and a deleted job's key from today stay; only the old key of a deleted job goes
    assert markers == {"kept-job": True, "deleted-job": False, "deleted-today": True}
    assert restarted.keys.known("kept-job") == live


def test_a_key_that_cannot_be_recorded_says_which_job_was_queued(
    api: httpx.Client, service: TrainingService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(service.keys, "remember", full)
    answer = api.post("/trainings", json=_job(), headers={"Idempotency-Key": "k-1"})
    assert answer.status_code == 503, answer.text  # not a 500 with a traceback
    (job,), total = service.store.list()
    detail = answer.json()["detail"]
    assert total == 1 and job.id in detail["message"] and "No space left" in detail["message"]
    assert "do not send it again" in detail["hint"]


@pytest.mark.parametrize("bad", ["", "has space", "x" * 201, "ключ"])
def test_a_malformed_idempotency_key_is_refused(
    api: httpx.Client, service: TrainingService, bad: str
) -> None:
    answer = api.post("/trainings", json=_job(), headers={"Idempotency-Key": bad.encode("utf-8")})
    assert answer.status_code == 400 and "Idempotency-Key" in answer.json()["detail"]["message"]
    assert service.store.list()[1] == 0


def test_format_checks_the_models_family_as_a_submission_does(api: httpx.Client) -> None:
    body = {"fm_type": "sd_1_5", "config_params": CONFIG, "model": "sdxl.safetensors", "dataset": "cats"}
    formatted = api.post("/config/format", json=body)
    submitted = api.post(
        "/trainings",
        json={**_job(), "training_params": {**_job()["training_params"], "model": "sdxl.safetensors"}},
    )
    assert formatted.status_code == submitted.status_code == 400
    assert formatted.json()["detail"]["error"] == submitted.json()["detail"]["error"] == "FamilyMismatchError"
    assert formatted.json()["detail"]["message"] == submitted.json()["detail"]["message"]
    assert api.post("/config/format", json={**body, "fm_type": "sd_xl"}).status_code == 200
    assert api.post("/config/format", json={**body, "model": "sd15.safetensors"}).status_code == 200


def test_gpus_per_job_over_the_api(api: httpx.Client, service: TrainingService) -> None:
    """training_params.gpus asks for N GPUs (data-parallel): the plan counts a step per round of N batches, and
    asking for more GPUs than the machine has, or for 0, is a 400 that says so."""
    two = {**_job(train_batch_size=1), "training_params": {**_job()["training_params"], "gpus": 2}}
    answer = api.post("/trainings", json=two)
    assert answer.status_code == 201, answer.text
    job = service.store.get(answer.json()["job"]["id"])
    plan = job.params["plan"]
    # 2 images x 5 repeats at batch 1: 10 batches, 5 per process: 5 steps per epoch (a CPU stands in for 2 GPUs)
    assert job.params["gpus"] == 2 and (plan["batches_per_process"], plan["steps_per_epoch"]) == (5, 5)
    formatted = api.post(
        "/config/format",
        json={
            "config_params": {**CONFIG, "train_batch_size": 1},
            "fm_type": "sd_1_5",
            "dataset": "cats",
            "gpus": 2,
        },
    )
    assert formatted.status_code == 200 and formatted.json()["plan"]["num_processes"] == 2
    zero = {**two, "training_params": {**two["training_params"], "gpus": 0}}
    refused = api.post("/trainings", json=zero)
    assert refused.status_code == 400 and "GPUs per job must be a whole number from 1" in refused.text
    service.scheduler.devices = {"cuda:0": 1}  # as on a machine with one GPU
    refused = api.post("/trainings", json=two)
    assert refused.status_code == 400 and "asks for 2 GPUs, but this machine has 1 (cuda:0)" in refused.text
