"""Reclaiming a worker's disk: DELETE /blobs/{sha256} guarded by the jobs that may still train, and `worker gc`
(through the real CLI, beside a running worker) removing what no such job uses and nobody used lately."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from remote_support import TOKEN, WorkerThread

import kohya_backend
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import JobStore, StoreError
from kohya_backend.jobs.transfer import LocalInput, TransferStats, Uploader, collect_input
from kohya_backend.jobs.worker_client import WorkerClient, WorkerRejected
from kohya_backend.models.hashing import Sha256Cache
from kohya_backend.service.worker import Worker, build_worker
from kohya_backend.service.worker_gc import MIN_AGE_S, _prune_keys
from kohya_backend.service.worker_jobs import BY_SHA256, KEYS_DIR, materialise_lock

ROOT = str(Path(kohya_backend.__file__).resolve().parent.parent)
MONTH_AGO = time.time() - 30 * 86400


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Worker, WorkerClient]]:
    worker = build_worker(tmp_path / "worker", reserve_bytes=0, devices={"cpu": 1})
    with WorkerThread(worker) as running, WorkerClient(running.url, TOKEN) as client:
        yield worker, client


def _inputs(demo_assets: Path, dataset: Path, cache: Sha256Cache) -> list[LocalInput]:
    return [
        collect_input(
            "pretrained_model_name_or_path", demo_assets / "models" / "demo-sd_1_5.safetensors", cache
        ),
        collect_input("train_data_dir", dataset, cache),
        collect_input("tokenizer_cache_dir", demo_assets / "models" / "tokenizer", cache),
    ]


def _submit(client: WorkerClient, inputs: list[LocalInput], key: str) -> str:
    Uploader(client, TransferStats("w")).ensure(inputs)
    spec: dict[str, Any] = {
        "client_key": key,
        "fm_type": "sd_1_5",
        "output_name": key.replace(":", "-"),
        "config_params": {"resolution": "64,64", "max_train_steps": 2, "network_dim": 4},
        "inputs": {item.key: item.spec() for item in inputs},
    }
    return str(client.submit(spec)["id"])


def _put(client: WorkerClient, data: bytes, send: int | None = None) -> str:
    sha = hashlib.sha256(data).hexdigest()
    part = data[: len(data) if send is None else send]
    client.put_blob(sha, 0, len(data), iter([part]), len(part))
    return sha


def _age(*roots: Path) -> None:
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                os.utime(Path(folder) / name, (MONTH_AGO, MONTH_AGO))


def test_a_blob_linked_by_a_job_that_may_still_train_is_not_deleted(
    served: tuple[Worker, WorkerClient], demo_assets: Path, tmp_path: Path
) -> None:
    worker, client = served
    inputs = _inputs(demo_assets, demo_assets / "datasets" / "demo", Sha256Cache(tmp_path / "h.json"))
    job = _submit(client, inputs, "c:1")
    model_sha = inputs[0].files[0].sha256
    with pytest.raises(WorkerRejected) as refused:
        client.delete_blob(model_sha)
    assert refused.value.status == 409 and refused.value.detail["jobs"] == [job]
    stray = _put(client, b"stray")
    assert client.delete_blob(stray) == {"sha256": stray, "partial": False, "freed_bytes": 5, "links_left": 0}
    with pytest.raises(WorkerRejected) as gone:
        client.delete_blob(stray)
    assert gone.value.status == 404
    half = _put(client, b"half an upload", send=4)
    assert client.delete_blob(half)["partial"] is True and client.blob_offset(half) == (False, 0)

    client.cancel(job)
    with pytest.raises(WorkerRejected):  # cancelled: it may be resumed, so its inputs stay
        client.delete_blob(model_sha)
    assert client.delete_job(job) is True and client.delete_job(job) is False
    answer = client.delete_blob(model_sha)
    assert answer["links_left"] == 0 and answer["freed_bytes"] == inputs[0].size
    assert not (worker.service.home.models / BY_SHA256 / model_sha).exists()
    assert client.blob_offset(model_sha) == (False, 0)


def _gc(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "kohya_backend", "worker", "gc", "--home", str(home), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_worker_gc_removes_what_no_job_that_may_train_uses(
    served: tuple[Worker, WorkerClient], demo_assets: Path, tmp_path: Path
) -> None:
    worker, client = served
    cache = Sha256Cache(tmp_path / "h.json")
    kept = _inputs(demo_assets, demo_assets / "datasets" / "demo", cache)
    kept_job = _submit(client, kept, "c:kept")
    changed = tmp_path / "demo"
    shutil.copytree(demo_assets / "datasets" / "demo", changed)
    caption = next(changed.rglob("*.txt"))
    caption.write_text(caption.read_text() + ", only in the deleted job", encoding="utf-8")
    dropped = _inputs(demo_assets, changed, cache)
    dropped_job = _submit(client, dropped, "c:dropped")
    stray = _put(client, b"nobody uses this")
    partial = _put(client, b"an upload nobody finished", send=5)
    client.cancel(kept_job)  # cancelled: resumable, so it keeps everything it links
    client.cancel(dropped_job)
    client.delete_job(dropped_job)
    home = worker.service.home
    _age(home.root / "blobs", home.models, home.datasets, home.root / KEYS_DIR)
    unique = hashlib.sha256(caption.read_bytes()).hexdigest()

    result = _gc(home.root, "--older-than-days", "7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "removed 2 blob(s), 1 materialised input(s), 1 partial upload(s) and 1 key"
    )
    states = client.query_blobs([unique, stray, partial, *{f.sha256 for i in kept for f in i.files}])
    assert set(states["missing"]) == {unique, stray, partial}  # the kept job's blobs are all there
    assert len(list((home.datasets).iterdir())) == 1 and len(list((home.root / "worker-keys").iterdir())) == 1
    assert (home.models / BY_SHA256 / kept[0].files[0].sha256 / kept[0].name).is_file()

    fresh = _put(client, b"just uploaded")
    again = _gc(home.root, "--older-than-days", "0")  # nothing touched in the last minutes goes
    assert again.stdout.startswith("removed 0 blob(s), 0 materialised") and "kept as recent" in again.stdout
    assert client.blob_offset(fresh) == (True, 13)
    missing = _gc(tmp_path / "not-a-worker")
    assert missing.returncode == 2 and "not a worker's home" in missing.stderr
    assert not (tmp_path / "not-a-worker").exists()


def _job(store: JobStore) -> str:
    return store.create(
        fm_type="sd_1_5", model="m.safetensors", dataset="d", instance_type="local", output_name="o",
        config_toml="", params={},
    ).id  # fmt: skip


def test_gc_prunes_only_old_keys_of_jobs_that_are_really_gone(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    keys = tmp_path / KEYS_DIR
    keys.mkdir()
    alive, deleted = _job(store), _job(store)
    store.transition(deleted, JobStatus.CANCELLED, "test")
    store.delete(deleted)
    markers = {
        "alive": alive, "deleted-old": deleted, "deleted-fresh": deleted, "half-written-fresh": "",
        "half-written-old": alive[:5],
    }  # fmt: skip
    for name, text in markers.items():
        (keys / name).write_text(text, encoding="utf-8")
        if name.endswith("old") or name == "alive":
            os.utime(keys / name, (MONTH_AGO, MONTH_AGO))
    cutoff = time.time() - MIN_AGE_S

    assert _prune_keys(keys, store, cutoff) == 2  # a fresh key may be a submission being written right now
    assert sorted(p.name for p in keys.iterdir()) == ["alive", "deleted-fresh", "half-written-fresh"]

    (keys / "deleted-old").write_text(deleted, encoding="utf-8")
    os.utime(keys / "deleted-old", (MONTH_AGO, MONTH_AGO))
    store.db_path.write_bytes(b"not a database, as a busy or broken one answers nothing" * 100)
    with pytest.raises(StoreError):  # the store cannot say the job is gone: nothing is removed
        _prune_keys(keys, store, cutoff)
    assert (keys / "deleted-old").is_file() and (keys / "alive").is_file()


def _blocked(action: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run `action` in a thread; after a second it must still wait (for the lock the test holds)."""
    done: list[object] = []
    thread = threading.Thread(target=lambda: done.append(action()), daemon=True)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive() and not done
    return thread, done


def test_gc_blob_deletion_and_submission_take_turns_on_the_materialise_lock(
    served: tuple[Worker, WorkerClient], demo_assets: Path, tmp_path: Path
) -> None:
    worker, client = served
    home = worker.service.home
    inputs = _inputs(demo_assets, demo_assets / "datasets" / "demo", Sha256Cache(tmp_path / "h.json"))
    Uploader(client, TransferStats("w")).ensure(inputs)
    stray = _put(client, b"nobody uses this")
    waiting = []
    with materialise_lock(home.root):  # what a submission holds from materialising its inputs to queueing it
        gc = subprocess.Popen(
            [sys.executable, "-m", "kohya_backend", "worker", "gc", "--home", str(home.root)],
            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        waiting.append(_blocked(lambda: client.delete_blob(stray)))
        waiting.append(_blocked(lambda: _submit(client, inputs, "c:locked")))
        time.sleep(2.0)
        assert gc.poll() is None  # the gc waits too, before it scans the jobs
    assert gc.wait(60) == 0
    for thread, _done in waiting:
        thread.join(60)
    assert waiting[0][1] == [{"sha256": stray, "partial": False, "freed_bytes": 16, "links_left": 0}]
    assert worker.service.store.get(str(waiting[1][1][0])).status.value == "queued"
