"""One remote job's session: what it refuses before any request reaches a worker."""

from __future__ import annotations

import json
from pathlib import Path

from kohya_backend.jobs import runner
from kohya_backend.jobs.registry import WorkerEntry
from kohya_backend.jobs.remote_session import RemoteOptions, RemoteSession
from kohya_backend.jobs.store import JobStore


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
        hash_cache=tmp_path / "hashes.json",
        options=RemoteOptions(lost_after_s=0.5),
        resume=False,
    )
    session.run()  # in this thread: it must fail before any request (port 9 would only time out)
    assert session.outcome is not None and session.outcome.exit_code == 2
    error = json.loads((job.folder / runner.RESULT_NAME).read_text())["error"]
    assert "not a job id" in error["message"] and "../../jobs.sqlite3" in error["message"]
