"""The SQLite job store on real files: CRUD, paging, transitions, migrations, concurrency and crashes."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs import (
    SCHEMA_VERSION,
    InvalidJobId,
    InvalidTransition,
    Job,
    JobActive,
    JobNotFound,
    JobStatus,
    JobStore,
    StoreError,
    validate_job_id,
)
from kohya_backend.jobs.states import ALLOWED_TRANSITIONS

S = JobStatus
RUN_TO_END = (S.PREPARING, S.TRAINING, S.SAVING, S.TRAINING, S.SAVING, S.COMPLETED)
CONFIG = 'pretrained_model_name_or_path = "base.safetensors"\nlearning_rate = 0.0001\n'


def _submit(store: JobStore, name: str = "lora", **params: Any) -> Job:
    return store.create(
        fm_type="sd15",
        model="base.safetensors",
        dataset="ds",
        instance_type="local",
        output_name=name,
        config_toml=CONFIG,
        params=params,
    )


def _check_consistent(home: Path) -> list[Job]:
    """Integrity ok, and every job's status is the end of a valid, gap-free transition chain."""
    with sqlite3.connect(home / "jobs.sqlite3") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    store = JobStore(home)
    jobs, total = store.list(limit=1000)
    assert total == len(jobs)
    for job in jobs:
        chain = store.transitions(job.id)
        assert chain[0].from_status is None and chain[0].to_status is S.QUEUED
        for prev, cur in itertools.pairwise(chain):
            assert cur.from_status is prev.to_status
            assert cur.to_status in ALLOWED_TRANSITIONS[prev.to_status]
        assert chain[-1].to_status is job.status
        assert (job.folder / "config.toml").read_text(encoding="utf-8") == job.config_toml
    return jobs


# -- workers for real processes (module level so spawn can import them) ---------------------------


def _open_and_submit(home: str, worker: int) -> str:
    return _submit(JobStore(Path(home)), f"open-{worker}").id


def _create_and_run(home: str, worker: int, count: int, shared: str) -> list[str]:
    store = JobStore(Path(home))
    ids = []
    for i in range(count):
        job = _submit(store, f"w{worker}-{i}", worker=worker, i=i)
        for status in RUN_TO_END:
            store.transition(job.id, status, f"w{worker} -> {status}")
        store.update_progress(shared, {f"w{worker}-{i}": i})
        ids.append(job.id)
    return ids


def _claim_queued(home: str, worker: int) -> tuple[list[str], int]:
    store = JobStore(Path(home))
    claimed, losses = [], 0
    while (job := store.next_queued()) is not None:
        try:
            store.transition(job.id, S.PREPARING, f"claimed by {worker}", expect=[S.QUEUED])
        except InvalidTransition:
            losses += 1
            continue
        claimed.append(job.id)
    return claimed, losses


def _write_forever(home: str) -> None:
    store = JobStore(Path(home))
    i = 0
    while True:
        job = _submit(store, f"k{i}", i=i)
        store.transition(job.id, S.PREPARING, "start")
        store.update_progress(job.id, {"step": i})
        store.add_output(job.id, f"out/k{i}.safetensors")
        store.transition(job.id, S.FAILED if i % 3 else S.INTERRUPTED, "stop")
        if i % 4 == 0:
            store.delete(job.id)
        i += 1


# -- create / get / list --------------------------------------------------------------------------


def test_create_stores_row_folder_and_first_transition(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    before = time.time()
    job = _submit(store, "my_lora", network_dim=8, note="x")
    validate_job_id(job.id)
    assert job.id[:15] == time.strftime("%Y%m%d-%H%M%S", time.gmtime(job.created_at))
    assert job.status is S.QUEUED and job.reason == "submitted"
    assert before <= job.created_at == job.updated_at <= time.time()
    assert (job.fm_type, job.model, job.dataset, job.instance_type, job.output_name) == (
        "sd15",
        "base.safetensors",
        "ds",
        "local",
        "my_lora",
    )
    assert job.params == {"network_dim": 8, "note": "x"}
    assert job.progress == {} and job.outputs == []
    assert job.pid is None and job.pgid is None and job.heartbeat_at is None
    assert job.folder == store.job_dir(job.id) == tmp_path / "jobs" / job.id
    assert (job.folder / "config.toml").read_text(encoding="utf-8") == CONFIG
    assert [p.name for p in job.folder.iterdir()] == ["config.toml"]
    assert store.get(job.id) == job
    [first] = store.transitions(job.id)
    assert (first.job_id, first.from_status, first.to_status, first.reason) == (
        job.id,
        None,
        S.QUEUED,
        "submitted",
    )


def test_store_survives_reopening(tmp_path: Path) -> None:
    job = _submit(JobStore(tmp_path))
    JobStore(tmp_path).transition(job.id, S.PREPARING, "go")
    assert JobStore(tmp_path).get(job.id).status is S.PREPARING


def test_get_missing_job_raises_job_not_found(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    with pytest.raises(JobNotFound, match="20200101-000000-abcdef does not exist"):
        store.get("20200101-000000-abcdef")
    for call in (
        lambda: store.transitions("20200101-000000-abcdef"),
        lambda: store.update_progress("20200101-000000-abcdef", {"step": 1}),
        lambda: store.set_process("20200101-000000-abcdef", 1, 1),
        lambda: store.add_output("20200101-000000-abcdef", "x"),
        lambda: store.event_offset("20200101-000000-abcdef"),
        lambda: store.transition("20200101-000000-abcdef", S.PREPARING, "x"),
        lambda: store.delete("20200101-000000-abcdef"),
    ):
        with pytest.raises(JobNotFound):
            call()


@pytest.mark.parametrize(
    "bad",
    ["../x", "", "..", "20261125-153012-ab12cd/../..", "20261125-153012-AB12CD", "20261125-153012-ab12c",
     "/etc/passwd", "20261125-153012-ab12cd\n", "20261125-153012-ab12cd\x00", "\u0662\u0660\u0662\u0666\u0661\u0661\u0662\u0665-153012-ab12cd"],
)  # fmt: skip
def test_invalid_ids_are_rejected_before_any_path_is_built(tmp_path: Path, bad: str) -> None:
    store = JobStore(tmp_path / "home")
    (tmp_path / "x").mkdir()
    for call in (
        lambda: store.get(bad),
        lambda: store.job_dir(bad),
        lambda: store.delete(bad),
        lambda: store.transition(bad, S.PREPARING, "x"),
        lambda: store.record_event_offset(bad, 1),
    ):
        with pytest.raises(InvalidJobId, match="not a valid job id"):
            call()
    assert (tmp_path / "x").is_dir()


def test_list_pages_newest_first_with_total(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    ids = [_submit(store, f"n{i}").id for i in range(7)]
    page, total = store.list(limit=3)
    assert total == 7 and [j.id for j in page] == ids[::-1][:3]
    page, total = store.list(offset=3, limit=3)
    assert total == 7 and [j.id for j in page] == ids[::-1][3:6]
    page, total = store.list(offset=6, limit=3)
    assert [j.id for j in page] == [ids[0]]
    page, total = store.list(offset=10)
    assert page == [] and total == 7
    page, _ = store.list(newest_first=False, offset=1, limit=2)
    assert [j.id for j in page] == ids[1:3]


def test_list_filters_by_status(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    ids = [_submit(store, f"n{i}").id for i in range(6)]
    store.transition(ids[1], S.CANCELLED, "user")
    store.transition(ids[3], S.PREPARING, "go")
    store.transition(ids[4], S.FAILED, "dataset missing")
    page, total = store.list(status=[S.QUEUED])
    assert total == 3 and [j.id for j in page] == [ids[5], ids[2], ids[0]]
    page, total = store.list(status=[S.CANCELLED, S.FAILED], newest_first=False)
    assert total == 2 and [(j.id, j.status) for j in page] == [(ids[1], S.CANCELLED), (ids[4], S.FAILED)]
    page, total = store.list(status=S.terminal(), limit=1)
    assert total == 2 and len(page) == 1
    assert store.list(status=S.PREPARING)[1] == 1  # type: ignore[arg-type]
    assert store.list(status=[]) == ([], 0)
    assert store.list(status=["preparing"])[1] == 1  # type: ignore[list-item]


def test_iter_jobs_reads_every_page_oldest_first(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    ids = [_submit(store, f"n{i}").id for i in range(7)]
    store.transition(ids[2], S.PREPARING, "go")
    store.transition(ids[5], S.CANCELLED, "user")
    assert [j.id for j in store.iter_jobs(page=2)] == ids
    assert [j.id for j in store.iter_jobs(status=S.busy(), page=2)] == [i for i in ids if i != ids[5]]
    assert [j.id for j in store.iter_jobs(status=S.active(), page=1)] == [ids[2]]
    assert list(store.iter_jobs(status=[])) == []


def test_list_rejects_bad_paging(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    for kwargs in ({"offset": -1}, {"limit": 0}, {"limit": 100_000}):
        with pytest.raises(TrainManagementError, match="bad page") as info:
            store.list(**kwargs)  # type: ignore[arg-type]
        assert info.value.hint


# -- transitions ----------------------------------------------------------------------------------


def test_transition_walks_the_lifecycle_and_logs_each_step(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = _submit(store)
    for status in RUN_TO_END:
        updated = store.transition(job.id, status, f"now {status}")
        assert updated.status is status and updated.reason == f"now {status}"
        assert updated.updated_at >= job.updated_at
    chain = store.transitions(job.id)
    assert [(t.from_status, t.to_status) for t in chain] == [
        (None, S.QUEUED),
        (S.QUEUED, S.PREPARING),
        (S.PREPARING, S.TRAINING),
        (S.TRAINING, S.SAVING),
        (S.SAVING, S.TRAINING),
        (S.TRAINING, S.SAVING),
        (S.SAVING, S.COMPLETED),
    ]
    assert [t.reason for t in chain[1:]] == [f"now {s}" for s in RUN_TO_END]
    assert all(a.at <= b.at for a, b in itertools.pairwise(chain))


def test_forbidden_transition_changes_nothing(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = _submit(store)
    with pytest.raises(InvalidTransition, match=r"cannot move from 'queued' to 'completed'"):
        store.transition(job.id, S.COMPLETED, "skip ahead")
    assert store.get(job.id) == job
    assert len(store.transitions(job.id)) == 1
    store.transition(job.id, S.CANCELLED, "user")
    with pytest.raises(InvalidTransition):
        store.transition(job.id, S.TRAINING, "no")
    with pytest.raises(ValueError):
        store.transition(job.id, "exploded", "no")  # type: ignore[arg-type]


def test_compare_and_set_loser_gets_invalid_transition(tmp_path: Path) -> None:
    a, b = JobStore(tmp_path), JobStore(tmp_path)
    job = _submit(a)
    stale = b.get(job.id)
    a.transition(job.id, S.PREPARING, "runner A", expect=[S.QUEUED])
    with pytest.raises(InvalidTransition, match="expected one of: queued") as info:
        b.transition(stale.id, S.PREPARING, "runner B", expect=[stale.status])
    assert info.value.current is S.PREPARING
    # The edge preparing -> failed exists, but the caller's premise (still queued) is wrong.
    with pytest.raises(InvalidTransition):
        b.transition(stale.id, S.FAILED, "runner B gave up", expect=[S.QUEUED])
    assert [t.reason for t in a.transitions(job.id)] == ["submitted", "runner A"]
    assert a.get(job.id).status is S.PREPARING


def test_resume_requeues_and_clears_the_old_process(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = _submit(store)
    store.transition(job.id, S.PREPARING, "go")
    store.set_process(job.id, 4242, 4242)
    assert (store.get(job.id).pid, store.get(job.id).pgid) == (4242, 4242)
    store.transition(job.id, S.INTERRUPTED, "process 4242 vanished")
    assert store.get(job.id).pid == 4242
    resumed = store.transition(job.id, S.QUEUED, "resumed by user", expect=S.resumable())
    assert resumed.status is S.QUEUED and resumed.pid is None and resumed.pgid is None


# -- progress, process, outputs, names, queue, events -----------------------------------------------


def test_update_progress_merges_and_keeps_heartbeat(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = _submit(store)
    store.update_progress(job.id, {"step": 1, "total_steps": 10, "loss": 0.5, "eta_s": None})
    first = store.get(job.id)
    assert first.progress == {"step": 1, "total_steps": 10, "loss": 0.5, "eta_s": None}
    assert first.heartbeat_at is not None and first.heartbeat_at >= job.created_at
    store.update_progress(job.id, {"step": 2, "lr": 1e-4}, heartbeat=False)
    second = store.get(job.id)
    assert second.progress == {"step": 2, "total_steps": 10, "loss": 0.5, "eta_s": None, "lr": 1e-4}
    assert second.heartbeat_at == first.heartbeat_at
    with pytest.raises(TypeError):
        store.update_progress(job.id, [1, 2])  # type: ignore[arg-type]


def test_set_process_and_clear(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = _submit(store)
    store.set_process(job.id, os.getpid(), os.getpgid(0))
    assert (store.get(job.id).pid, store.get(job.id).pgid) == (os.getpid(), os.getpgid(0))
    store.set_process(job.id, None, None)
    assert (store.get(job.id).pid, store.get(job.id).pgid) == (None, None)


def test_outputs_keep_order_and_ignore_duplicates(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job, other = _submit(store), _submit(store, "other")
    for path in ("lora-000001.safetensors", "lora.safetensors", "lora-000001.safetensors"):
        store.add_output(job.id, path)
    assert store.get(job.id).outputs == ["lora-000001.safetensors", "lora.safetensors"]
    assert store.list(newest_first=False)[0][0].outputs == ["lora-000001.safetensors", "lora.safetensors"]
    assert store.get(other.id).outputs == []


def test_output_name_taken(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    assert not store.output_name_taken("style")
    job = _submit(store, "style")
    assert store.output_name_taken("style") and not store.output_name_taken("Style2")
    store.transition(job.id, S.CANCELLED, "user")
    assert store.output_name_taken("style")
    store.delete(job.id)
    assert not store.output_name_taken("style")


def test_next_queued_is_fifo_and_skips_claimed_jobs(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    assert store.next_queued() is None
    ids = [_submit(store, f"q{i}").id for i in range(3)]
    assert store.next_queued().id == ids[0]  # type: ignore[union-attr]
    store.transition(ids[0], S.PREPARING, "claimed")
    assert store.next_queued().id == ids[1]  # type: ignore[union-attr]
    store.transition(ids[1], S.CANCELLED, "user")
    store.transition(ids[0], S.FAILED, "oom")
    store.transition(ids[0], S.QUEUED, "resumed")
    assert store.next_queued().id == ids[0]  # type: ignore[union-attr]


def test_event_offset_round_trips(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = _submit(store)
    assert store.event_offset(job.id) == 0
    store.record_event_offset(job.id, 17)
    assert JobStore(tmp_path).event_offset(job.id) == 17
    with pytest.raises(TrainManagementError, match="negative"):
        store.record_event_offset(job.id, -1)


# -- delete -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [(), (S.PREPARING,), (S.PREPARING, S.TRAINING), (S.PREPARING, S.CANCELLING)])
def test_delete_refuses_queued_and_running_jobs(tmp_path: Path, path: tuple[JobStatus, ...]) -> None:
    store = JobStore(tmp_path)
    job = _submit(store)
    for status in path:
        store.transition(job.id, status, "go")
    with pytest.raises(JobActive, match="cannot be deleted"):
        store.delete(job.id)
    assert store.get(job.id).status is (path[-1] if path else S.QUEUED)
    assert (job.folder / "config.toml").is_file()


@pytest.mark.parametrize("end", [S.COMPLETED, S.FAILED, S.CANCELLED, S.INTERRUPTED])
def test_delete_removes_rows_and_folder(tmp_path: Path, end: JobStatus) -> None:
    store = JobStore(tmp_path)
    keep = _submit(store, "keep")
    job = _submit(store, "gone")
    (job.folder / "events.jsonl").write_text("{}\n", encoding="utf-8")
    store.add_output(job.id, "gone.safetensors")
    for status in (S.PREPARING, S.TRAINING, S.SAVING, end) if end is not S.CANCELLED else (S.CANCELLED,):
        store.transition(job.id, status, "go")
    store.delete(job.id)
    with pytest.raises(JobNotFound):
        store.get(job.id)
    assert not job.folder.exists()
    assert store.list() == ([store.get(keep.id)], 1)
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM transitions WHERE job_id = ?", (job.id,)).fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM outputs").fetchone() == (0,)


# -- schema and migrations ------------------------------------------------------------------------


def test_fresh_database_is_migrated_from_version_0(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    sqlite3.connect(db).close()  # an empty file: user_version 0, no tables
    store = JobStore(tmp_path)
    assert store.SCHEMA_VERSION == SCHEMA_VERSION >= 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "transitions", "outputs"} <= tables
    job = _submit(JobStore(tmp_path))  # reopening does not migrate twice
    assert JobStore(tmp_path).get(job.id).status is S.QUEUED


def test_newer_database_is_refused(tmp_path: Path) -> None:
    JobStore(tmp_path)
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}") as info:
        JobStore(tmp_path)
    assert "update the extension" in str(info.value)


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "jobs.sqlite3").write_bytes(b"this is not sqlite, it is a text file" * 100)
    with pytest.raises(StoreError, match=r"jobs\.sqlite3") as info:
        JobStore(tmp_path)
    assert info.value.hint


# -- real processes -------------------------------------------------------------------------------


def test_processes_opening_a_fresh_store_migrate_once(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.starmap(_open_and_submit, [(str(tmp_path), w) for w in range(4)])
    assert len(set(ids)) == 4
    jobs = _check_consistent(tmp_path)
    assert sorted(j.id for j in jobs) == sorted(ids)


def test_four_processes_create_and_transition_concurrently(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    shared = _submit(store, "shared").id
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_create_and_run, [(str(tmp_path), w, 50, shared) for w in range(4)])
    created = [jid for ids in results for jid in ids]
    assert len(created) == len(set(created)) == 200
    jobs = _check_consistent(tmp_path)
    by_id = {j.id: j for j in jobs}
    assert set(created) <= set(by_id) and len(by_id) == 201
    for w, ids in enumerate(results):
        for i, jid in enumerate(ids):
            job = by_id[jid]
            assert job.status is S.COMPLETED and job.params == {"worker": w, "i": i}
            assert job.output_name == f"w{w}-{i}"
            assert [t.reason for t in store.transitions(jid)] == ["submitted"] + [
                f"w{w} -> {s}" for s in RUN_TO_END
            ]
    # 200 read-modify-write merges into one job from four processes: none lost.
    assert by_id[shared].progress == {f"w{w}-{i}": i for w in range(4) for i in range(50)}


def test_four_processes_race_to_claim_queued_jobs(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    ids = {_submit(store, f"c{i}").id for i in range(60)}
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_claim_queued, [(str(tmp_path), w) for w in range(4)])
    claimed = [jid for got, _ in results for jid in got]
    assert len(claimed) == len(set(claimed)) == 60 and set(claimed) == ids
    for jid in ids:
        chain = store.transitions(jid)
        assert [(t.from_status, t.to_status) for t in chain] == [(None, S.QUEUED), (S.QUEUED, S.PREPARING)]
        owner = next(w for w, (got, _) in enumerate(results) if jid in got)
        assert chain[1].reason == f"claimed by {owner}"
    _check_consistent(tmp_path)


def test_store_is_consistent_after_sigkill_mid_write(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    JobStore(tmp_path)
    seen = 0
    for delay in (0.0, 0.007, 0.013, 0.021, 0.031):
        child = ctx.Process(target=_write_forever, args=(str(tmp_path),))
        child.start()
        deadline = time.monotonic() + 20
        # Let the child get going (at least a few more jobs written), then kill it wherever it is.
        while JobStore(tmp_path).list(limit=1)[1] < seen + 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        jobs = _check_consistent(tmp_path)
        assert len(jobs) >= seen + 5
        seen = len(jobs)
    store = JobStore(tmp_path)
    job = _submit(store, "after")
    assert store.transition(job.id, S.PREPARING, "still writable").status is S.PREPARING
