"""How the scheduler treats remote jobs when the worker list is broken or names a worker no longer there.

The client's scheduler here is real (build_service: local and remote runners); its local trainer is a real child
process that exits at once (these tests are about scheduling, not training), and ticks are driven by the test.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from remote_support import TOKEN, WorkerThread, running

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.registry import WorkerNotFound, WorkerRegistry
from kohya_backend.jobs.remote import RemoteRunner, WorkerBusy, remove_worker
from kohya_backend.jobs.remote_session import RemoteOptions
from kohya_backend.jobs.runner import RUN_NAME, LocalRunner, write_json_atomic
from kohya_backend.jobs.scheduler import Scheduler
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job, JobStore
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service, create_app
from kohya_backend.service.training import Submission, TrainingService
from kohya_backend.service.worker import build_worker

MODEL = "demo-sd_1_5.safetensors"
CONFIG = (
    'resolution = "64,64"\nmax_train_steps = 2\nnetwork_dim = 4\nmixed_precision = "no"\noutput_name = "{}"\n'
)
QUICK_EXIT = (sys.executable, "-c", "import sys; sys.exit(0)")  # prefix: the trainer command exits at once


@pytest.fixture
def home(demo_assets: Path, tmp_path: Path) -> Path:
    """A client home sharing the demo's model and dataset, with one (unreachable) worker 'box' registered."""
    root = tmp_path / "home"
    for name in ("models", "datasets"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(demo_assets / name)
    WorkerRegistry(root).add("http://127.0.0.1:9", TOKEN, name="box")
    return root


@pytest.fixture
def service(home: Path) -> Iterator[TrainingService]:
    built = build_service(home, devices={"cpu": 1}, python=QUICK_EXIT)
    yield built
    built.scheduler.stop()


def _submit(service: TrainingService, name: str, instance: str) -> str:
    return service.submit(Submission(MODEL, "demo", "sd_1_5", CONFIG.format(name), instance)).id


def _status(service: TrainingService, job_id: str) -> JobStatus:
    return service.store.get(job_id).status


def _tick_until_settled(service: TrainingService, job_id: str) -> None:
    deadline = time.monotonic() + 30
    while not service.is_settled(job_id):
        assert time.monotonic() < deadline, service.store.get(job_id)
        service.scheduler.tick()
        time.sleep(0.1)


def test_an_unreadable_worker_list_is_an_entrys_error_and_local_jobs_still_start(
    service: TrainingService, home: Path
) -> None:
    remote = _submit(service, "remote", "worker:box")
    (home / "workers.json").write_text("{not json", encoding="utf-8")
    local = _submit(service, "local", "local")  # submitting (and its fp16 check) still works
    with running(create_app(service)) as base:
        answer = httpx.get(f"{base}{API_PREFIX}/instance-types", timeout=10)
    assert answer.status_code == 200, answer.text
    types = {t["name"]: t for t in answer.json()["instance_types"]}
    assert types["local"]["devices"] == ["cpu"]
    assert types["worker"]["state"] == "error" and "workers.json" in types["worker"]["error"]
    service.scheduler.tick()  # the remote job ahead of it must not stall the tick
    assert _status(service, local) is not JobStatus.QUEUED
    assert _status(service, remote) is JobStatus.QUEUED
    _tick_until_settled(service, local)


def test_an_unreadable_worker_list_after_a_restart_interrupts_its_jobs_with_the_reason(
    service: TrainingService, home: Path
) -> None:
    job_id = _submit(service, "followed", "worker:box")
    job = service.store.transition(job_id, JobStatus.PREPARING, "sent to worker box")
    write_json_atomic(job.folder / RUN_NAME, {"runner": "worker", "worker": "box", "remote": {}})
    (home / "workers.json").write_text("[1, 2", encoding="utf-8")
    service.scheduler.tick()  # recovery after a restart: the other jobs are recovered, this one says why
    job = service.store.get(job_id)
    assert job.status is JobStatus.INTERRUPTED
    assert "cannot follow the job" in (job.reason or "") and "workers.json" in (job.reason or "")


def test_a_worker_used_by_queued_jobs_is_not_removed_and_a_vanished_one_fails_its_jobs(
    service: TrainingService, home: Path
) -> None:
    queued = _submit(service, "aimed", "worker:box")
    with running(create_app(service)) as base:
        refused = httpx.delete(f"{base}{API_PREFIX}/workers/box", timeout=10)
    assert refused.status_code == 409 and refused.json()["detail"]["jobs"] == [queued]
    assert "cancel them" in refused.json()["detail"]["hint"]
    with pytest.raises(WorkerBusy, match=queued):
        remove_worker(WorkerRegistry(home), service.store, "box")
    service.scheduler.tick()
    assert _status(service, queued) is JobStatus.QUEUED  # box does not answer: the job waits for it

    WorkerRegistry(home).remove("box")  # behind the scheduler's back (an edited workers.json)
    service.scheduler.tick()
    job = service.store.get(queued)
    assert job.status is JobStatus.FAILED, job.reason
    assert "'box' is not registered any more" in (job.reason or "") and "--name box" in (job.reason or "")
    with pytest.raises(WorkerNotFound, match="'worker:box': no worker named 'box' is registered"):
        service.resume(queued)  # refused at once, rather than queued with no worker to take it
    assert _status(service, queued) is JobStatus.FAILED


class CountingStore(JobStore):
    """The real store, counting how often the scheduler lists the queue (its per-tick cost)."""

    queue_listings = 0

    def list(self, *args: Any, **kwargs: Any) -> tuple[list[Job], int]:  # type: ignore[override]
        if kwargs.get("status") == [JobStatus.QUEUED] and kwargs.get("limit", 0) > 1:
            self.queue_listings += 1
        return super().list(*args, **kwargs)


def test_with_no_free_slot_and_no_worker_with_room_the_queue_is_not_listed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = CountingStore(home)
    remote = RemoteRunner.for_home(home, options=RemoteOptions(lost_after_s=1, events_wait_s=1))
    sleeper = LocalRunner((sys.executable, "-c", "import time; time.sleep(60)"))  # holds the only slot
    scheduler = Scheduler(store, [sleeper, remote], devices={"cpu": 1}, poll_interval_s=0.1)

    def submit(name: str, instance: str = "local") -> str:
        return scheduler.submit(
            fm_type="sd_1_5", model="m.safetensors", dataset="d", instance_type=instance,
            output_name=name, config_toml="", params={},
        ).id  # fmt: skip

    try:
        running_id = submit("running")
        scheduler.tick()
        assert store.get(running_id).status is JobStatus.PREPARING
        waiting = submit("waiting")
        scheduler.tick()  # the first look at the (empty) worker list
        store.queue_listings = 0
        for _ in range(5):
            scheduler.tick()
        assert store.queue_listings == 0 and store.get(waiting).status is JobStatus.QUEUED

        worker = build_worker(tmp_path / "worker", devices={"cpu": 1})
        with WorkerThread(worker) as served:  # a worker with a free slot: remote jobs go, local ones wait
            remote.registry.add(served.url, TOKEN, name="w")
            remote.pool.refresh()
            aimed = submit("aimed", "worker:w")
            scheduler.tick()
            assert store.get(aimed).status is not JobStatus.QUEUED and store.queue_listings > 0
            assert store.get(waiting).status is JobStatus.QUEUED
            scheduler.stop()  # before the worker goes
    finally:
        _cancel_all(scheduler, store)


def _cancel_all(scheduler: Scheduler, store: JobStore) -> None:
    """Cancel every queued or running job and tick until their (sleeping) trainers are gone."""
    unsettled = [JobStatus.QUEUED, *JobStatus.active()]
    deadline = time.monotonic() + 30
    while store.list(status=unsettled, limit=1)[1] and time.monotonic() < deadline:
        for job in store.list(status=unsettled, limit=50)[0]:
            if job.status is not JobStatus.CANCELLING:
                scheduler.cancel(job.id)
        scheduler.tick()
        time.sleep(0.1)
    scheduler.stop()
    assert store.list(status=unsettled, limit=1)[1] == 0


def test_a_refused_token_is_looked_at_once_and_refuses_new_jobs_until_the_token_changes(
    tmp_path: Path,
) -> None:
    remote = RemoteRunner.for_home(tmp_path / "home", refresh_s=3600)
    try:
        with WorkerThread(build_worker(tmp_path / "worker", devices={"cpu": 1})) as served:
            remote.registry.add(served.url, "not-the-worker-token-0123", name="w")
            remote.pool.refresh()
            assert remote.pool.states()["w"].state == "unauthorized"
            assert (
                remote.may_place() is True
            )  # a state not seen before: jobs aimed at w go (and fail, saying why)
            assert remote.may_place() is False  # nothing changed since: the queue need not be listed again
            with pytest.raises(TrainManagementError, match="refused its token at the last check"):
                remote.check_instance_type("worker:w")  # a new job would only fail: refused at once
            remote.registry.add(served.url, TOKEN)  # the right token, same URL: the old token's state is void
            remote.check_instance_type("worker:w")
            assert remote.may_place() is True
            remote.pool.refresh()
            assert remote.pool.states()["w"].state == "online"
            assert remote.may_place() is True and remote.may_place() is True  # a free slot on w
    finally:
        remote.close()
