"""Remote jobs end to end: two real workers (`python -m kohya_backend worker` on 127.0.0.1) train the tiny demo
model for a client whose scheduler uses the remote runner; LoRAs land in the client's Lora folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jobs_support import FAST_CONFIG
from remote_support import TOKEN, WorkerProcess, running

from kohya_backend.jobs.progress import log_tail
from kohya_backend.jobs.registry import WorkerRegistry
from kohya_backend.jobs.remote import RemoteRunner
from kohya_backend.jobs.remote_session import RemoteOptions
from kohya_backend.jobs.runner import LocalRunner
from kohya_backend.jobs.scheduler import Scheduler
from kohya_backend.jobs.store import JobStore
from kohya_backend.jobs.transfer import TransferStats, Uploader, collect_input
from kohya_backend.jobs.worker_client import WorkerClient
from kohya_backend.models.hashing import Sha256Cache
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import create_app
from kohya_backend.service.home import Home
from kohya_backend.service.training import Submission, TrainingService

pytestmark = pytest.mark.slow
API_TOKEN = "client-api-token"
CONFIG = FAST_CONFIG


def _service(root: Path) -> TrainingService:
    """A client host like build_service's, with a patient-for-seconds (not minutes) remote runner."""
    home = Home(root)
    options = RemoteOptions(lost_after_s=3, max_backoff_s=0.5, events_wait_s=1, chunk_bytes=1 << 20)
    remote = RemoteRunner.for_home(home.root, refresh_s=0.3, options=options)
    scheduler = Scheduler(
        JobStore(home.root),
        [LocalRunner(), remote],
        lora_dir=home.lora,
        devices={"cpu": 1},
        poll_interval_s=0.2,
    )
    return TrainingService(home, scheduler)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    root = tmp_path_factory.mktemp("workers")
    token_file = root / "token.txt"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    started = [WorkerProcess(root / name, token_file).start() for name in ("a", "b")]
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def client_home(
    tmp_path_factory: pytest.TempPathFactory,
    workers: list[WorkerProcess],
    make_demo_home: Callable[..., Path],
) -> Path:
    """A client home with the demo model and dataset, and both workers registered as 'a' and 'b'."""
    root = make_demo_home(tmp_path_factory.mktemp("client"))
    registry = WorkerRegistry(root)
    for name, worker in zip("ab", workers):
        registry.add(worker.url, TOKEN, name=name)
    (root / "models" / "prompts.txt").write_text(
        "a demo picture --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8"
    )
    return root


@pytest.fixture
def api(client_home: Path) -> Iterator[tuple[TrainingService, httpx.Client]]:
    """The client's REST API (real uvicorn) with its scheduler thread."""
    service = _service(client_home)
    service.scheduler.start()
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    try:
        with (
            running(create_app(service, token=API_TOKEN)) as base,
            httpx.Client(base_url=f"{base}{API_PREFIX}", headers=headers, timeout=30) as client,
        ):
            yield service, client
    finally:
        service.scheduler.stop()


def _until(check: Callable[[], bool], what: str, service: TrainingService, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            jobs, _ = service.store.list(limit=5)
            state = "\n".join(f"{j.id} {j.status} {j.reason}\n{log_tail(j.folder)}" for j in jobs)
            raise AssertionError(f"timed out waiting for {what}; jobs:\n{state}")
        time.sleep(0.2)


def _settled(service: TrainingService, job_id: str) -> bool:
    return service.is_settled(job_id)


def _events(service: TrainingService, job_id: str) -> list[dict[str, Any]]:
    text = (service.store.get(job_id).folder / "events.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def _submit(service: TrainingService, name: str, instance: str, steps: int = 2) -> str:
    sub = Submission(
        "demo-sd_1_5.safetensors", "demo", "sd_1_5", CONFIG.format(steps=steps, name=name), instance
    )
    return service.submit(sub).id


def test_pool_jobs_train_on_both_workers_and_deliver_here(
    api: tuple[TrainingService, httpx.Client], workers: list[WorkerProcess], client_home: Path
) -> None:
    service, client = api
    for name, worker in zip("ab", workers):
        added = client.post("/workers", json={"url": worker.url, "token": TOKEN, "name": name})
        assert added.status_code == 201 and TOKEN not in added.text
    assert client.post("/workers", json={"url": "ftp://x", "token": TOKEN}).status_code == 400
    registry = client_home / "workers.json"
    assert registry.stat().st_mode & 0o077 == 0
    _until(
        lambda: all(w["state"] == "online" for w in client.get("/workers").json()["workers"]),
        "online",
        service,
    )
    listing = client.get("/workers").text
    assert TOKEN not in listing and "CPU" in listing
    types = {t["name"]: t for t in client.get("/instance-types").json()["instance_types"]}
    assert {"local", "worker", "worker:a", "worker:b"} <= set(types) and types["worker:a"][
        "state"
    ] == "online"

    body = {"training_params": {"training_instance_type": "worker", "model": "demo-sd_1_5.safetensors",
                                "dataset": "demo", "fm_type": "sd_1_5"}}  # fmt: skip
    ids = []
    sampled = f'sample_prompts = "{client_home / "models" / "prompts.txt"}"\nsample_every_n_steps = 2\n'
    for name, extra in (("pool-one", sampled), ("pool-two", "")):
        config = CONFIG.format(steps=2, name=name) + extra
        answer = client.post("/trainings", json={**body, "config_params": config})
        assert answer.status_code == 201, answer.text
        ids.append(answer.json()["job"]["id"])
    for job_id in ids:
        _until(lambda job_id=job_id: _settled(service, job_id), "both pool jobs", service)
    jobs = [service.show(job_id) for job_id in ids]
    for job in jobs:
        assert job["status"] == "completed", job["reason"] + job["log_tail"]
        assert [t["to"] for t in job["transitions"]] == [
            "queued",
            "preparing",
            "training",
            "saving",
            "completed",
        ]
        assert (client_home / "lora" / f"{job['output_name']}.safetensors").is_file()
        assert (client_home / "lora" / f"{job['output_name']}.json").is_file()
        assert job["progress"]["upload"]["total"] > 5_000_000 and job["progress"]["step"] == 2
        assert "submitted as job" in (Path(job["folder"]) / "train.log").read_text()
    assert {job["progress"]["device"] for job in jobs} == {"cpu"}  # the trainer's device, on the worker
    places = {json.loads((Path(job["folder"]) / "run.json").read_text())["worker"] for job in jobs}
    assert places == {"a", "b"}  # the second job went to the other, free worker
    saved = [e for e in _events(service, ids[0]) if e["kind"] == "saved"]
    assert saved and Path(saved[-1]["path"]).is_file() and saved[-1]["path"].startswith(jobs[0]["folder"])
    samples = [e for e in _events(service, ids[0]) if e["kind"] == "sample"]
    assert samples and all(Path(e["path"]).is_file() for e in samples)  # downloaded next to the job
    assert (client_home / "lora" / "pool-one.preview.png").is_file()  # so the WebUI's card has a preview


def _remote_sessions_alive(service: TrainingService) -> list[str]:
    remote = service.scheduler.runners["worker"]
    assert isinstance(remote, RemoteRunner)
    return [s.name for s in remote._sessions.values() if s.is_alive()]


def test_a_repeated_job_sends_only_changed_files_and_survives_host_restarts(
    workers: list[WorkerProcess], client_home: Path
) -> None:
    service = _service(client_home)
    dataset = client_home / "datasets" / "demo"
    cache = Sha256Cache()  # the one cache, shared with the trainer and the remote runner
    inputs = [
        collect_input(
            "pretrained_model_name_or_path", client_home / "models" / "demo-sd_1_5.safetensors", cache
        ),
        collect_input("train_data_dir", dataset, cache),
        collect_input("tokenizer_cache_dir", client_home / "models" / "tokenizer", cache),
    ]
    with WorkerClient(workers[1].url, TOKEN) as worker:
        Uploader(worker, TransferStats("b")).ensure(inputs)  # an earlier job sent these to worker b
    caption = next(dataset.rglob("*.txt"))
    caption.write_text(caption.read_text() + ", changed", encoding="utf-8")
    job_id = _submit(service, "repeat", "worker:b", steps=24)
    service.scheduler.start()
    try:
        _until(lambda: service.store.get(job_id).status.value == "training", "training", service)
    finally:
        service.scheduler.stop()  # the tab's settings rebuild the scheduler mid-job; the worker trains on
    assert _remote_sessions_alive(service) == []  # stop() closed the runner: nothing writes here any more
    step = service.store.get(job_id).progress.get("step") or 0
    service.scheduler.start()  # the same scheduler again: it re-attaches once
    try:
        _until(lambda: (service.store.get(job_id).progress.get("step") or 0) > step, "more steps", service)
    finally:
        service.scheduler.stop()  # the WebUI goes away mid-job
    assert _remote_sessions_alive(service) == []

    restarted = _service(client_home)
    restarted.scheduler.start()
    try:
        _until(lambda: _settled(restarted, job_id), "the re-attached job", restarted)
    finally:
        restarted.scheduler.stop()
    job = restarted.show(job_id)
    assert job["status"] == "completed", job["reason"] + job["log_tail"]
    upload = job["progress"]["upload"]
    assert upload["sent"] == caption.stat().st_size  # no model bytes, no unchanged dataset bytes
    assert upload["skipped"] == upload["total"] - caption.stat().st_size
    events = _events(restarted, job_id)
    steps = [e["step"] for e in events if e["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # mirrored once each across the restarts
    assert [e["kind"] for e in events].count("submitted") == 1
    remote = json.loads((Path(job["folder"]) / "run.json").read_text())["remote"]["b"]
    there = JobStore(workers[1].home).get(remote["job"]).folder / "events.jsonl"
    mirrored = [e["kind"] for e in events[remote["events_base"] :]]
    assert mirrored == [json.loads(line)["kind"] for line in there.read_text().splitlines()]
    assert (client_home / "lora" / "repeat.safetensors").is_file()


def test_cancel_and_resume_pass_through_to_the_worker(
    workers: list[WorkerProcess], client_home: Path
) -> None:
    service = _service(client_home)
    job_id = _submit(service, "cancelled", "worker:a", steps=30)
    service.scheduler.start()
    try:
        _until(lambda: service.store.get(job_id).status.value == "training", "training", service)
        service.cancel(job_id)
        _until(lambda: _settled(service, job_id), "the cancelled job", service, timeout=60)
        job = service.store.get(job_id)
        assert job.status.value == "cancelled" and "cancelled on worker a" in (job.reason or ""), job.reason
        remote_id = json.loads((job.folder / "run.json").read_text())["remote"]["a"]["job"]
        with WorkerClient(workers[0].url, TOKEN) as worker:
            view = worker.job(remote_id)
            assert view is not None and view["status"] == "cancelled"
        service.resume(job_id)
        _until(lambda: _settled(service, job_id), "the resumed job", service)
    finally:
        service.scheduler.stop()
    job = service.store.get(job_id)
    assert job.status.value == "completed", job.reason
    record = json.loads((job.folder / "run.json").read_text())
    assert record["remote"]["a"]["job"] == remote_id and list(record["remote"]) == ["a"]  # resumed there
    statuses = [t.to_status.value for t in JobStore(workers[0].home).transitions(remote_id)]
    assert statuses[-7:] == [
        "cancelling",
        "cancelled",
        "queued",
        "preparing",
        "training",
        "saving",
        "completed",
    ]


def test_a_refused_token_fails_the_job_with_that_message(
    workers: list[WorkerProcess], tmp_path: Path, make_demo_home: Callable[..., Path]
) -> None:
    make_demo_home(tmp_path)
    service = _service(tmp_path)
    service.scheduler.runners["worker"].registry.add(workers[0].url, "not-the-token", name="wrong")  # type: ignore[attr-defined]
    job_id = _submit(service, "refused", "worker:wrong")
    service.scheduler.start()
    try:
        _until(lambda: _settled(service, job_id), "the refused job", service, timeout=30)
    finally:
        service.scheduler.stop()
    job = service.store.get(job_id)
    assert job.status.value == "failed" and "refused the token" in (job.reason or "")


def test_a_worker_killed_mid_training_interrupts_its_job_which_resumes_elsewhere(
    workers: list[WorkerProcess], client_home: Path
) -> None:
    first, second = workers
    service = _service(client_home)
    job_id = _submit(service, "killed", "worker", steps=40)
    service.scheduler.start()
    try:
        _until(lambda: service.store.get(job_id).status.value == "training", "training", service)
        worker = json.loads((service.store.get(job_id).folder / "run.json").read_text())["worker"]
        victim, other = (first, second) if worker == "a" else (second, first)
        victim.kill()
        victim.kill_trainers()
        _until(lambda: _settled(service, job_id), "the interrupted job", service, timeout=30)
        job = service.store.get(job_id)
        assert job.status.value == "interrupted", job.reason
        assert f"worker {worker}" in (job.reason or "") and "stopped answering" in (job.reason or "")

        service.resume(job_id)
        _until(lambda: _settled(service, job_id), "the job resumed elsewhere", service)
    finally:
        service.scheduler.stop()
        victim.start()
    job = service.store.get(job_id)
    assert job.status.value == "completed", job.reason
    assert json.loads((job.folder / "run.json").read_text())["worker"] == ("b" if worker == "a" else "a")
    assert job.progress["worker"] == other.home.name
    assert (client_home / "lora" / "killed.safetensors").is_file()
    assert os.path.getsize(client_home / "lora" / "killed.safetensors") > 0
