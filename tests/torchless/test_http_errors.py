"""One mapping from the project's errors to HTTP answers: each class carries its status and its own fields."""

from __future__ import annotations

import pytest

from kohya_backend.errors import ConfigError, ConfigIssue, DatasetError, TrainManagementError
from kohya_backend.jobs.registry import WorkerConflict, WorkerNotFound
from kohya_backend.jobs.remote import WorkerBusy
from kohya_backend.jobs.states import InvalidTransition, JobStatus
from kohya_backend.jobs.store import InvalidJobId, JobActive, JobNotFound
from kohya_backend.service.blobs import BlobTooLarge, InsufficientStorage
from kohya_backend.service.datasets import DatasetExists, DatasetInUse
from kohya_backend.service.home import NotInHome, PathOutsideHome
from kohya_backend.service.http_errors import error_body, http_error
from kohya_backend.service.training import OutputNameTaken
from kohya_backend.service.worker_gc import BlobInUse
from kohya_backend.service.worker_jobs import MissingBlobs


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (TrainManagementError("x"), 400),
        (PathOutsideHome("x"), 400),
        (InvalidJobId("x"), 400),
        (JobNotFound("x"), 404),
        (NotInHome("x"), 404),
        (WorkerNotFound("x"), 404),
        (OutputNameTaken("x"), 409),
        (JobActive("x"), 409),
        (InvalidTransition("j", JobStatus.COMPLETED, JobStatus.QUEUED, frozenset()), 409),
        (DatasetExists("x"), 409),
        (DatasetInUse("x", None, ["j3"]), 409),
        (WorkerConflict("x"), 409),
        (WorkerBusy("x", None, ["j1"]), 409),
        (MissingBlobs(["a" * 64]), 409),
        (BlobInUse("x", None, ["j2"]), 409),
        (BlobTooLarge("x"), 413),
        (InsufficientStorage("x"), 507),
    ],
)
def test_each_error_answers_with_its_status(error: TrainManagementError, status: int) -> None:
    answer = http_error(error)
    assert answer.status_code == status
    assert answer.detail["error"] == type(error).__name__ and answer.detail["message"] == error.message


def test_answers_carry_what_a_client_acts_on() -> None:
    issue = ConfigIssue("bad", key="network_dim", line=3, column=1)
    assert error_body(ConfigError([issue]))["issues"][0]["line"] == 3
    assert error_body(DatasetError("broken", files=["10_a/x.png"]))["files"] == ["10_a/x.png"]
    assert error_body(WorkerBusy("busy", "wait", ["j1", "j2"]))["jobs"] == ["j1", "j2"]
    assert error_body(MissingBlobs(["b" * 64]))["missing"] == ["b" * 64]
    assert error_body(TrainManagementError("m", "h")) == {
        "error": "TrainManagementError",
        "message": "m",
        "hint": "h",
    }
