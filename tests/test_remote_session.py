"""One remote job's session: what it refuses before any request reaches a worker, and how it takes the LoRA."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from remote_support import TOKEN, WorkerThread
from safetensors.numpy import save_file

from kohya_backend.jobs import remote_session, runner
from kohya_backend.jobs.registry import WorkerEntry
from kohya_backend.jobs.remote_session import RemoteOptions, RemoteSession
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import JobStore
from kohya_backend.jobs.transfer import TransferStats, Uploader, collect_input
from kohya_backend.jobs.worker_client import WorkerClient
from kohya_backend.models.hashing import Sha256Cache, sha256_file
from kohya_backend.service.worker import build_worker


def test_a_remote_job_id_that_is_not_an_id_never_reaches_a_url(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "home")
    job = store.create(
        fm_type="sd_1_5",
        model="m.safetensors",
        dataset="d",
        instance_type="worker:box",
        output_name="x",
        config_toml='output_name = "x"\n',
        params={},
    )
    record = {"runner": "worker", "worker": "box", "remote": {"box": {"job": "../../jobs.sqlite3"}}}
    runner.write_json_atomic(job.folder / runner.RUN_NAME, record)
    entry = WorkerEntry("box", "http://127.0.0.1:9", "token-never-used-0123", 0.0)
    session = RemoteSession(
        job,
        entry,
        client_id="c",
        options=RemoteOptions(lost_after_s=0.5),
        resume=False,
    )
    session.run()  # in this thread: it must fail before any request (port 9 would only time out)
    assert session.outcome is not None and session.outcome.exit_code == 2
    error = json.loads((job.folder / runner.RESULT_NAME).read_text())["error"]
    assert "not a job id" in error["message"] and "../../jobs.sqlite3" in error["message"]


def _worker_job(client: WorkerClient, root: Path) -> str:
    """A job queued on the worker from a tiny (untrainable) SD 1.5 checkpoint and a one-image dataset."""
    (root / "models").mkdir(parents=True)
    keys = ("model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x")
    save_file({k: np.zeros((2, 2), dtype=np.float16) for k in keys}, str(root / "models" / "m.safetensors"))
    (root / "d" / "1_x").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "d" / "1_x" / "a.png")
    cache = Sha256Cache(root / "hashes.json")
    inputs = [
        collect_input("pretrained_model_name_or_path", root / "models" / "m.safetensors", cache),
        collect_input("train_data_dir", root / "d", cache),
    ]
    Uploader(client, TransferStats("w")).ensure(inputs)
    spec = {"client_key": "c:1:w", "fm_type": "sd_1_5", "output_name": "x", "config_params": {},
            "inputs": {i.key: i.spec() for i in inputs}}  # fmt: skip
    return str(client.submit(spec)["id"])


def test_the_downloaded_lora_is_not_read_again_and_after_a_restart_it_is_hashed_not_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []

    def counting_sha256_file(path: Path) -> str:
        hashed.append(path)
        return sha256_file(path)

    monkeypatch.setattr(remote_session, "sha256_file", counting_sha256_file)
    worker = build_worker(tmp_path / "worker", reserve_bytes=0, devices={"cpu": 1})
    with WorkerThread(worker) as served, WorkerClient(served.url, TOKEN) as client:
        remote_id = _worker_job(client, tmp_path / "client")
        there = worker.service.store.get(remote_id).folder / "output"
        there.mkdir()
        (there / "x.safetensors").write_bytes(os.urandom(4096))
        for status in (JobStatus.PREPARING, JobStatus.TRAINING, JobStatus.SAVING, JobStatus.COMPLETED):
            worker.service.store.transition(remote_id, status, "as the worker's scheduler would")
        view = client.job(remote_id)
        assert view is not None and view["output"]["path"] == "output/x.safetensors"
        job = JobStore(tmp_path / "home").create(
            fm_type="sd_1_5", model="m.safetensors", dataset="d", instance_type="worker:w", output_name="x",
            config_toml='output_name = "x"\n', params={},
        )  # fmt: skip
        local = job.folder / "output" / "x.safetensors"
        entry = WorkerEntry("w", served.url, TOKEN, 0.0)
        session = RemoteSession(job, entry, client_id="c", options=RemoteOptions(), resume=False)
        try:
            session._fetch(remote_id, local)  # what mirroring the worker's `saved` event does
            assert session._complete(remote_id, view).exit_code == 0
        finally:
            session._client.close()
        assert hashed == [] and sha256_file(local) == view["output"]["sha256"]
        inode = local.stat().st_ino
        restarted = RemoteSession(job, entry, client_id="c", options=RemoteOptions(), resume=False)
        try:
            assert restarted._complete(remote_id, view).exit_code == 0
        finally:
            restarted._client.close()
        assert hashed == [local] and local.stat().st_ino == inode  # hashed once, not downloaded again


def test_a_worker_that_sends_no_settled_flag_is_followed_until_its_job_settles(tmp_path: Path) -> None:
    worker = build_worker(tmp_path / "worker", reserve_bytes=0, devices={"cpu": 1})
    real_events = worker.jobs.events

    async def events_of_a_1_0_worker(job_id: str, after: int, wait_s: float) -> dict[str, object]:
        answer = await real_events(job_id, after, wait_s)
        del answer["settled"]  # the field came with protocol 1.1
        return answer

    worker.jobs.events = events_of_a_1_0_worker  # type: ignore[method-assign]
    with WorkerThread(worker) as served, WorkerClient(served.url, TOKEN) as client:
        remote_id = _worker_job(client, tmp_path / "client")
        for status in (JobStatus.PREPARING, JobStatus.TRAINING, JobStatus.FAILED):
            worker.service.store.transition(remote_id, status, "as the worker's scheduler would")
        job = JobStore(tmp_path / "home").create(
            fm_type="sd_1_5", model="m.safetensors", dataset="d", instance_type="worker:w", output_name="x",
            config_toml='output_name = "x"\n', params={},
        )  # fmt: skip
        options = RemoteOptions(events_wait_s=0.2)
        session = RemoteSession(job, WorkerEntry("w", served.url, TOKEN, 0.0), client_id="c", options=options,
                                resume=False)  # fmt: skip
        outcome: list[runner.RunStatus] = []
        follower = threading.Thread(
            target=lambda: outcome.append(session._follow(remote_id, {"events_base": 0, "log_base": 0})),
            daemon=True,
        )
        follower.start()
        follower.join(30)
        session.stop_requested.set()  # ends a follower that never stopped
        follower.join(30)
        session._client.close()
    assert outcome and outcome[0].exit_code == 2  # failed there: settled, not followed forever
