"""Deleting a job here deletes its copies on the workers that ran it: at once when they answer, later when not."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from remote_support import TOKEN, WorkerThread

from kohya_backend.jobs.registry import WorkerEntry, WorkerRegistry
from kohya_backend.jobs.remote import RemoteRunner
from kohya_backend.jobs.remote_cleanup import PENDING_NAME, PendingDeletes
from kohya_backend.jobs.runner import RUN_NAME, write_json_atomic
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import JobActive, JobNotFound
from kohya_backend.jobs.transfer import TransferStats, Uploader, collect_input
from kohya_backend.jobs.worker_client import WorkerClient
from kohya_backend.models.hashing import Sha256Cache
from kohya_backend.service.app import build_service
from kohya_backend.service.training import TrainingService
from kohya_backend.service.worker import build_worker


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[WorkerThread, WorkerClient]]:
    served = WorkerThread(build_worker(tmp_path / "worker", reserve_bytes=0, devices={"cpu": 1}))
    with served, WorkerClient(served.url, TOKEN) as client:
        yield served, client


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TrainingService]:
    built = build_service(tmp_path / "home", devices={"cpu": 1})
    yield built
    built.scheduler.stop()


def _remote_job(client: WorkerClient, demo_assets: Path, key: str) -> str:
    cache = Sha256Cache(demo_assets / "hashes.json")
    inputs = [
        collect_input(
            "pretrained_model_name_or_path", demo_assets / "models" / "demo-sd_1_5.safetensors", cache
        ),
        collect_input("train_data_dir", demo_assets / "datasets" / "demo", cache),
    ]
    Uploader(client, TransferStats("w")).ensure(inputs)
    spec = {"client_key": key, "fm_type": "sd_1_5", "output_name": "x", "config_params": {"resolution": "64,64"},
            "inputs": {i.key: i.spec() for i in inputs}}  # fmt: skip
    return str(client.submit(spec)["id"])


def _local_job(service: TrainingService, copies: dict[str, str]) -> str:
    """A job of this host that ran on those workers (their run.json entries), settled so it can be deleted."""
    job = service.store.create(
        fm_type="sd_1_5", model="m.safetensors", dataset="d", instance_type="worker", output_name="x",
        config_toml='output_name = "x"\n', params={},
    )  # fmt: skip
    record = {
        "runner": "worker",
        "worker": next(iter(copies), None),
        "remote": {w: {"job": j} for w, j in copies.items()},
    }
    write_json_atomic(job.folder / RUN_NAME, record)
    service.store.transition(job.id, JobStatus.CANCELLED, "cancelled on the worker")
    return job.id


def test_deleting_a_job_deletes_its_copy_on_the_worker_or_records_it_for_later(
    service: TrainingService, worker: tuple[WorkerThread, WorkerClient], demo_assets: Path
) -> None:
    served, client = worker
    home = service.home.root
    registry = WorkerRegistry(home)
    registry.add(served.url, TOKEN, name="w")
    registry.add("http://127.0.0.1:9", TOKEN, name="off")
    remote = _remote_job(client, demo_assets, "host:1:w")
    client.cancel(remote)
    note = service.delete(_local_job(service, {"w": remote}), wait_remote=True)
    assert note == "deleted its copy on worker w" and client.job(remote) is None
    assert not (home / PENDING_NAME).exists()

    running = _remote_job(client, demo_assets, "host:2:w")  # still queued there: cancelled now, deleted later
    away = "20200101-000000-abcdef"
    note = service.delete(_local_job(service, {"w": running, "off": away}), wait_remote=True)
    assert note is not None and "worker off, w did not answer (or still ran the job" in note
    assert json.loads((home / PENDING_NAME).read_text()) == {"w": [running], "off": [away]}
    view = client.job(running)
    assert view is not None and view["status"] == "cancelled"

    registry.add(served.url.replace("127.0.0.1", "localhost"), TOKEN, name="off")  # 'off' is back, elsewhere
    runner = service.scheduler.runners["worker"]
    assert isinstance(runner, RemoteRunner)
    runner.pool.refresh_soon()  # the monitor deletes pending copies on the workers that answer
    deadline = time.monotonic() + 30
    while (home / PENDING_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (home / PENDING_NAME).exists() and client.job(running) is None


def test_the_api_deletes_in_the_background_and_says_so(
    service: TrainingService, worker: tuple[WorkerThread, WorkerClient], demo_assets: Path
) -> None:
    served, client = worker
    WorkerRegistry(service.home.root).add(served.url, TOKEN, name="w")
    remote = _remote_job(client, demo_assets, "host:3:w")
    client.cancel(remote)
    note = service.delete(_local_job(service, {"w": remote}))  # what the API and the tab call
    assert note == "its copy on worker w is deleted there in the background (retried until it answers)"
    deadline = time.monotonic() + 30
    while client.job(remote) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.job(remote) is None
    assert service.delete(_local_job(service, {})) is None  # a job with no copies: nothing to say


def test_recording_a_delete_does_not_wait_for_a_slow_worker_being_flushed(tmp_path: Path) -> None:
    silent = socket.socket()  # accepts connections (the kernel does) and never answers: a stalled worker
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    registry = WorkerRegistry(tmp_path)
    registry.add(f"http://127.0.0.1:{silent.getsockname()[1]}", TOKEN, name="slow")
    pending = PendingDeletes(tmp_path)
    first, second = "20260101-000000-aaaaaa", "20260101-000000-bbbbbb"
    pending.add({"slow": first})
    left: list[dict[str, list[str]]] = []

    def client_for(entry: WorkerEntry) -> WorkerClient:
        return WorkerClient(entry.url, entry.token, read_timeout_s=3.0)

    flushing = threading.Thread(target=lambda: left.append(pending.flush(registry, client_for)), daemon=True)
    try:
        flushing.start()
        time.sleep(0.5)  # the flush now waits on the worker
        started = time.monotonic()
        pending.add({"slow": second})  # what deleting another job here does meanwhile
        assert time.monotonic() - started < 1.0 and flushing.is_alive()
        flushing.join(30)
    finally:
        silent.close()
    assert left == [{"slow": [first, second]}]  # nothing was deleted; the id added meanwhile is kept
    assert pending.pending() == {"slow": [first, second]}


def test_the_copies_are_recorded_before_the_job_goes_and_a_failed_record_does_not_fail_the_delete(
    service: TrainingService,
) -> None:
    home = service.home.root
    WorkerRegistry(home).add("http://127.0.0.1:9", TOKEN, name="off")
    away = "20200101-000000-abcdef"
    job_id = _local_job(service, {"off": away})
    blocker = sqlite3.connect(service.store.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the database is busy: the delete waits before the job goes
    notes: list[str | None] = []
    deleting = threading.Thread(target=lambda: notes.append(service.delete(job_id, wait_remote=True)))
    deleting.start()
    try:
        deadline = time.monotonic() + 10
        while not (home / PENDING_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.store.job_dir(job_id).is_dir()  # the job is still here
        assert json.loads((home / PENDING_NAME).read_text()) == {"off": [away]}  # a crash now loses nothing
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        deleting.join(60)
    assert notes and notes[0] is not None and "did not answer" in notes[0]

    queued = service.store.create(
        fm_type="sd_1_5", model="m.safetensors", dataset="d", instance_type="worker", output_name="q",
        config_toml='output_name = "q"\n', params={},
    )  # fmt: skip
    write_json_atomic(queued.folder / RUN_NAME, {"remote": {"off": {"job": "20200101-000000-aaaaaa"}}})
    with pytest.raises(JobActive):  # the job stays, and so does its copy: nothing is recorded
        service.delete(queued.id)
    assert json.loads((home / PENDING_NAME).read_text()) == {"off": [away]}

    (home / PENDING_NAME).unlink()
    (home / PENDING_NAME).mkdir()  # the record cannot be written: the job is deleted all the same
    other = _local_job(service, {"off": "20200101-000000-bbbbbb"})
    note = service.delete(other)
    assert note is not None and "could not be recorded" in note and "20200101-000000-bbbbbb" in note
    with pytest.raises(JobNotFound):
        service.store.get(other)
