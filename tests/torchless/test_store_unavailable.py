"""A job database that cannot be written, or a full disk under the job folders: the API answers 503 (the server's
trouble, not the request's) with what is wrong, and the scheduler waits it out with a growing pause, one warning
per attempt and no traceback, instead of failing every poll interval."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from home_support import stub_dataset, stub_sd15
from server_support import running

import kohya_backend.jobs.store as store_module
from kohya_backend.jobs.runner import LocalRunner
from kohya_backend.jobs.scheduler import STORE_BACKOFF_MAX_S, Scheduler
from kohya_backend.jobs.store import JobStore
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service, create_app
from kohya_backend.service.training import TrainingService

JOB = {
    "training_params": {"model": "sd15.safetensors", "dataset": "cats", "fm_type": "sd_1_5"},
    "config_params": {"resolution": "64,64", "max_train_steps": 2, "mixed_precision": "no"},
}


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection of every JobStore may read but not write, as on a read-only or full disk."""
    original = JobStore._connect

    @contextlib.contextmanager
    def read_only(self: JobStore) -> Iterator[sqlite3.Connection]:
        with original(self) as conn:
            conn.execute("PRAGMA query_only = ON")
            yield conn

    monkeypatch.setattr(JobStore, "_connect", read_only)


@pytest.fixture
def service(tmp_path: Path) -> TrainingService:
    service = build_service(tmp_path / "home")
    stub_sd15(service.home.models / "sd15.safetensors")
    stub_dataset(service.home.datasets / "cats" / "5_cat", caption=None)
    return service


@pytest.fixture
def api(service: TrainingService) -> Iterator[httpx.Client]:
    with running(create_app(service)) as base, httpx.Client(base_url=base + API_PREFIX, timeout=60) as client:
        yield client


def test_a_database_that_cannot_be_written_answers_503(
    api: httpx.Client, service: TrainingService, monkeypatch: pytest.MonkeyPatch
) -> None:
    _read_only(monkeypatch)
    answer = api.post("/trainings", json=JOB)
    assert answer.status_code == 503, answer.text
    detail = answer.json()["detail"]
    assert detail["error"] == "StoreError" and "jobs.sqlite3" in detail["message"]
    assert "writable" in detail["hint"]
    assert api.get("/trainings").status_code == 200  # reading still works
    monkeypatch.undo()
    assert api.post("/trainings", json=JOB).status_code == 201  # and once fixed, the same request succeeds


def test_a_full_disk_under_the_job_folders_answers_503_naming_the_folder(
    api: httpx.Client, service: TrainingService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(path: Path, data: str | bytes, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module, "atomic_write", full)  # the store writes a job's config through it
    answer = api.post("/trainings", json=JOB)
    assert answer.status_code == 503, answer.text
    message = answer.json()["detail"]["message"]
    assert message.startswith(f"no space left on device in {service.home.jobs}")
    assert list(service.home.jobs.iterdir()) == [] and service.store.list()[1] == 0  # nothing half made


def test_the_scheduler_backs_off_while_the_database_cannot_be_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = JobStore(tmp_path / "home")
    scheduler = Scheduler(store, [LocalRunner()], devices={"cpu": 1}, poll_interval_s=1.0)
    original = JobStore._connect

    @contextlib.contextmanager
    def broken(self: JobStore) -> Iterator[sqlite3.Connection]:
        with original(self) as conn:
            conn.execute(
                "SELECT * FROM no_such_table_the_disk_failed"
            )  # an sqlite error, as a failing disk gives
            yield conn

    try:
        with caplog.at_level(logging.DEBUG, logger="kohya_backend.jobs.scheduler"):
            monkeypatch.setattr(JobStore, "_connect", broken)
            waits = [scheduler.run_once() for _ in range(8)]
            monkeypatch.undo()
            assert scheduler.run_once() == 1.0
    finally:
        scheduler.stop()
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, STORE_BACKOFF_MAX_S, STORE_BACKOFF_MAX_S, STORE_BACKOFF_MAX_S]
    records = [r for r in caplog.records if r.name == "kohya_backend.jobs.scheduler"]
    assert len(records) == 9 and all(
        r.exc_info is None for r in records
    )  # no traceback, one line per attempt
    assert "cannot be used" in records[0].getMessage() and "trying again in 2 s" in records[0].getMessage()
    assert "answers again" in records[-1].getMessage()
