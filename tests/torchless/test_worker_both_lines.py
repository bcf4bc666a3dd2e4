"""The worker API and the worker registry routes on both lines (pydantic 1 and 2), without torch.

The worker's scheduler is not started (training needs torch): these tests cover auth, blob uploads, submission
checks and materialisation, and the client's /workers routes over real HTTP.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
from home_support import SD15_KEYS
from PIL import Image
from safetensors.numpy import save_file
from server_support import running

from kohya_backend.jobs.transfer import TransferStats, Uploader, collect_input
from kohya_backend.jobs.worker_client import WorkerClient, WorkerRejected
from kohya_backend.jobs.worker_protocol import WORKER_PREFIX
from kohya_backend.models.hashing import Sha256Cache
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service, create_app
from kohya_backend.service.worker import build_worker, create_worker_app

TOKEN = "both-lines-worker-token"


def _client_home(root: Path) -> Path:
    (root / "models").mkdir(parents=True)
    save_file(
        {k: np.zeros((2, 2), dtype=np.float16) for k in SD15_KEYS}, str(root / "models" / "sd15.safetensors")
    )
    folder = root / "datasets" / "cats" / "5_cat"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 60, 10, 10)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a cat, photo {i}\n", encoding="utf-8")
    return root


def test_worker_accepts_blobs_and_a_job_on_this_line(tmp_path: Path) -> None:
    client_home = _client_home(tmp_path / "client")
    worker = build_worker(tmp_path / "worker", reserve_bytes=0, devices={"cpu": 1})
    with running(create_worker_app(worker, token=TOKEN)) as base:
        assert httpx.get(f"{base}{WORKER_PREFIX}/health").status_code == 200
        assert httpx.post(f"{base}{WORKER_PREFIX}/jobs", content=b"{").status_code == 401
        with WorkerClient(base, TOKEN) as client:
            cache = Sha256Cache(tmp_path / "hashes.json")
            inputs = [
                collect_input(
                    "pretrained_model_name_or_path", client_home / "models" / "sd15.safetensors", cache
                ),
                collect_input("train_data_dir", client_home / "datasets" / "cats", cache),
            ]
            stats = TransferStats("w")
            Uploader(client, stats).ensure(inputs)
            assert stats.sent == stats.total and stats.files == 7
            spec = {
                "client_key": "c:1:w",
                "fm_type": "sd_1_5",
                "output_name": "cats",
                "config_params": {"resolution": "64,64", "network_dim": 4, "max_train_steps": 2},
                "inputs": {item.key: item.spec() for item in inputs},
            }
            job = client.submit(spec)
            assert job["status"] == "queued" and client.submit(spec)["id"] == job["id"]
            again = TransferStats("w")
            Uploader(client, again).ensure(inputs)
            assert again.sent == 0 and again.skipped == again.total
            spec["config_params"] = {"sample_prompts": "/etc/passwd"}
            try:
                client.submit({**spec, "client_key": "c:2:w"})
            except WorkerRejected as exc:
                assert exc.status == 400
            else:
                raise AssertionError("a path in config_params was accepted")


def test_workers_routes_never_show_tokens(tmp_path: Path) -> None:
    service = build_service(tmp_path / "home")
    with running(create_app(service, token="api")) as base:
        headers = {"Authorization": "Bearer api"}
        with httpx.Client(base_url=base + API_PREFIX, headers=headers, timeout=30) as http:
            assert httpx.get(f"{base}{API_PREFIX}/workers").status_code == 401
            made = http.post("/workers", json={"url": "http://127.0.0.1:9/", "token": "secret-worker-token"})
            assert made.status_code == 201 and made.json()["worker"]["name"] == "127.0.0.1-9"
            assert made.json()["worker"]["state"] == "offline"  # asked at once: nothing listens on port 9
            assert made.json()["worker"]["warning"] is None  # loopback: the token never leaves the machine
            far = http.post(
                "/workers", json={"url": "http://gpu-box.invalid:9", "token": "secret-worker-token"}
            )
            assert far.status_code == 201 and "plain http" in far.json()["worker"]["warning"]
            labels = {t["name"]: t["label"] for t in http.get("/instance-types").json()["instance_types"]}
            assert labels["worker:gpu-box.invalid-9"].endswith("token over plain http!")
            assert http.delete("/workers/gpu-box.invalid-9").status_code == 204
            listing = http.get("/workers")
            assert listing.status_code == 200 and "secret-worker-token" not in listing.text
            assert listing.json()["workers"][0]["url"] == "http://127.0.0.1:9"
            types = [t["name"] for t in http.get("/instance-types").json()["instance_types"]]
            assert types == ["local", "worker", "worker:127.0.0.1-9"]
            # fp16 is judged for the machine that trains: refused here (CPU), left to a worker's own check
            fp16 = {"fm_type": "sd_1_5", "config_params": 'mixed_precision = "fp16"\n'}
            assert http.post("/config/format", json=fp16).status_code == 400
            for remote in ("worker", "worker:127.0.0.1-9"):
                answer = http.post("/config/format", json={**fp16, "training_instance_type": remote})
                assert answer.status_code == 200, answer.text
            assert (
                http.post("/workers", json={"url": "http://h/", "token": "x", "name": "../x"}).status_code
                == 400
            )
            assert http.delete("/workers/nope").status_code == 404
            assert http.delete("/workers/127.0.0.1-9").status_code == 204
            assert http.get("/workers").json()["workers"] == []
    assert (tmp_path / "home" / "workers.json").stat().st_mode & 0o077 == 0
    for runner in service.scheduler.runners.values():
        close = getattr(runner, "close", None)
        if close is not None:
            close()
