"""The REST API over real HTTP: a uvicorn server on a free port, the scheduler thread and the tiny demo model."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from jobs_support import FAST_CONFIG
from server_support import stranger

from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service, create_app
from kohya_backend.service.training import TrainingService

TOKEN = "s3cret-token"

CONFIG = FAST_CONFIG


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A running API server (with its scheduler thread) and an authenticated client for it."""

    def __init__(self, service: TrainingService, token: str | None) -> None:
        self.service = service
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}{API_PREFIX}"
        config = uvicorn.Config(
            create_app(service, token=token), host="127.0.0.1", port=port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.base, headers=headers, timeout=30)

    def __enter__(self) -> Server:
        self.service.scheduler.start()
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.service.scheduler.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, make_demo_home: Callable[..., Path]) -> Path:
    return make_demo_home(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def api(home: Path) -> Iterator[Server]:
    with Server(build_service(home, poll_interval_s=0.2), TOKEN) as server:
        yield server


def _training(name: str, *, steps: int = 2, **params: Any) -> dict[str, Any]:
    training_params = {
        "training_instance_type": "local",
        "model": "demo-sd_1_5.safetensors",
        "dataset": "demo",
        "fm_type": "sd_1_5",
        **params,
    }
    return {"training_params": training_params, "config_params": CONFIG.format(steps=steps, name=name)}


def _wait_for(api: Server, job_id: str, states: set[str], timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.client.get(f"/trainings/{job_id}").json()["job"]
        if job["status"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not reach {states}: {job['status']} {job['reason']}")


def test_version_is_open_and_the_rest_needs_the_token(api: Server) -> None:
    assert httpx.get(f"{api.base}/version").json()["api"] == "1.0"
    with stranger() as other:  # another client: after a few refusals it waits, `api.client` does not
        for path in ("/models", "/datasets", "/trainings"):
            answer = other.get(f"{api.base}{path}")
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"] == "Bearer"
        wrong = other.get(f"{api.base}/trainings", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        for path in ("/instance-types", "/trainings"):
            assert (
                other.get(f"{api.base}{path}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code
                == 429
            )
        assert other.post(f"{api.base}/trainings", json=_training("x")).status_code == 429
    assert api.client.get("/trainings").status_code == 200


def test_listings_show_models_datasets_and_instance_types(api: Server, home: Path) -> None:
    (home / "models" / "broken.safetensors").write_bytes(b"not a checkpoint")
    models = {m["name"]: m for m in api.client.get("/models").json()["models"]}
    assert models["demo-sd_1_5.safetensors"]["family"] == "sd_1_5"
    assert models["broken.safetensors"]["family"] is None and models["broken.safetensors"]["error"]
    (home / "datasets" / "flat").mkdir(exist_ok=True)
    datasets = {d["name"]: d for d in api.client.get("/datasets").json()["datasets"]}
    assert datasets["demo"]["summary"]["images"] == 8
    assert datasets["demo"]["summary"]["subsets"]["10_demo"]["n_repeats"] == 10
    assert datasets["flat"]["error"]["message"]
    types = api.client.get("/instance-types").json()["instance_types"]
    assert types[0]["name"] == "local" and "CPU" in types[0]["label"]
    assert api.client.get("/openapi.json").status_code == 200


def test_config_format_returns_canonical_toml_and_plan_or_issues(api: Server) -> None:
    text = CONFIG.format(steps=3, name="fmt") + 'train_data_dir = "demo"\n'
    answer = api.client.post("/config/format", json={"config_params": text, "fm_type": "sd_1_5"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert "max_train_steps = 3" in body["toml"]
    assert body["plan"]["total_steps"] == 3
    as_json = api.client.post(
        "/config/format", json={"config_params": {"network_dim": 8}, "fm_type": "sd_xl"}
    ).json()
    assert "network_dim = 8" in as_json["toml"]
    bad = api.client.post(
        "/config/format", json={"config_params": "network_dim = 8\nnetwork_dimm = 4\n", "fm_type": "sd_1_5"}
    )
    assert bad.status_code == 400
    issue = bad.json()["detail"]["issues"][0]
    assert issue["key"] == "network_dimm" and issue["line"] == 2
    broken = api.client.post("/config/format", json={"config_params": "a = = 1", "fm_type": "sd_1_5"})
    assert broken.status_code == 400 and broken.json()["detail"]["issues"][0]["line"] == 1
    assert api.client.post("/config/format", json={"fm_type": "sd_1_5"}).status_code == 422


def test_submit_trains_and_delivers_the_lora(api: Server, home: Path) -> None:
    answer = api.client.post("/trainings", json=_training("api-lora"))
    assert answer.status_code == 201, answer.text
    job = answer.json()["job"]
    assert job["status"] == "queued" and job["plan"]["total_steps"] == 2
    assert f'pretrained_model_name_or_path = "{(home / "models").resolve().as_posix()}' in job["config_toml"]
    done = _wait_for(api, job["id"], {"completed", "failed", "interrupted"})
    assert done["status"] == "completed", done["reason"] + done["log_tail"]
    assert (home / "lora" / "api-lora.safetensors").is_file()
    steps = [t["to"] for t in done["transitions"]]
    assert steps == ["queued", "preparing", "training", "saving", "completed"]
    page = api.client.get("/trainings", params={"status": "completed"}).json()
    assert job["id"] in [j["id"] for j in page["jobs"]]
    assert api.client.get("/trainings", params={"status": "failed"}).json()["total"] == 0
    events = api.client.get(f"/trainings/{job['id']}/events", params={"after": 0}).json()
    kinds = [e["kind"] for e in events["events"]]
    assert "step" in kinds and events["next"] == len(kinds)
    later = api.client.get(f"/trainings/{job['id']}/events", params={"after": events["next"], "timeout": 1})
    assert later.json()["events"] == []
    with api.client.stream(
        "GET", f"/trainings/{job['id']}/events", headers={"Accept": "text/event-stream"}
    ) as stream:
        text = "".join(stream.iter_text())
    data = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert data[0]["kind"] == kinds[0] and data[-1] == {"status": "completed", "next": len(kinds)}
    logs = api.client.get(f"/trainings/{job['id']}/logs", params={"tail": 3}).text
    assert 0 < len(logs.splitlines()) <= 3
    followed = api.client.get(f"/trainings/{job['id']}/logs", params={"follow": "true"}).text
    assert followed.endswith(logs)
    assert api.client.post(f"/trainings/{job['id']}/cancel").status_code == 409
    assert api.client.post(f"/trainings/{job['id']}/resume").status_code == 409
    assert api.client.post("/trainings", json=_training("api-lora")).status_code == 409
    assert api.client.delete(f"/trainings/{job['id']}").status_code == 204
    assert api.client.get(f"/trainings/{job['id']}").status_code == 404
    assert (home / "lora" / "api-lora.safetensors").is_file()


def test_cancel_resume_and_delete_a_queued_job(api: Server) -> None:
    api.service.scheduler.stop()  # keep the job queued while we act on it
    try:
        job = api.client.post("/trainings", json=_training("to-cancel")).json()["job"]
        assert api.client.delete(f"/trainings/{job['id']}").status_code == 409
        assert api.client.post(f"/trainings/{job['id']}/cancel").json()["job"]["status"] == "cancelled"
        assert api.client.post(f"/trainings/{job['id']}/resume").json()["job"]["status"] == "queued"
        assert api.client.post(f"/trainings/{job['id']}/cancel").json()["job"]["status"] == "cancelled"
        assert api.client.delete(f"/trainings/{job['id']}").status_code == 204
    finally:
        api.service.scheduler.start()


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"model": "missing.safetensors"}, 404, "demo-sd_1_5.safetensors"),
        ({"dataset": "nope"}, 404, "demo"),
        ({"fm_type": "sd_xl"}, 400, "FM type sd_xl"),
        ({"fm_type": "sd_3"}, 400, "sd_3"),
        ({"training_instance_type": "ml.g5.xlarge"}, 400, "local"),
        ({"model": "../models/demo-sd_1_5.safetensors"}, 400, ".."),
        ({"model": "/etc/passwd"}, 400, "outside"),
        ({"dataset": "../../"}, 400, ".."),
    ],
)
def test_bad_training_params_are_refused(
    api: Server, change: dict[str, str], status: int, needle: str
) -> None:
    answer = api.client.post("/trainings", json=_training("bad-params", **change))
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert needle in detail["message"] + (detail["hint"] or "")


@pytest.mark.parametrize(
    "extra",
    [
        'tokenizer_cache_dir = "../../etc"\n',
        'network_weights = "/etc/hosts"\n',
        'reg_data_dir = "/tmp"\n',
        'train_data_dir = "../models"\n',
        'sample_prompts = "link/prompts.txt"\n',
        'dataset_config = "demo/datasets.toml"\n',  # its image_dir entries could name any folder
    ],
)
def test_config_paths_leaving_the_home_are_refused(
    api: Server, home: Path, tmp_path: Path, extra: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "prompts.txt").write_text("a cat\n")
    link = home / "jobs" / "link"
    if not link.is_symlink():
        link.symlink_to(outside, target_is_directory=True)
    config = CONFIG.format(steps=2, name="paths").replace('tokenizer_cache_dir = "tokenizer"\n', "") + extra
    if "tokenizer_cache_dir" not in extra:
        config += 'tokenizer_cache_dir = "tokenizer"\n'
    body = {**_training("paths"), "config_params": config}
    answer = api.client.post("/trainings", json=body)
    assert answer.status_code == 400, answer.text
    assert "outside" in answer.json()["detail"]["message"] or ".." in answer.json()["detail"]["message"]
    formatted = api.client.post("/config/format", json={"config_params": config, "fm_type": "sd_1_5"})
    assert formatted.status_code == 400


def test_bad_config_and_bad_ids(api: Server) -> None:
    body = {**_training("bad-config"), "config_params": "network_dim = -3\n"}
    answer = api.client.post("/trainings", json=body)
    assert answer.status_code == 400
    assert answer.json()["detail"]["issues"][0]["key"] == "network_dim"
    as_json = {**_training("bad-json"), "config_params": {"learning_rate": "fast"}}
    assert api.client.post("/trainings", json=as_json).status_code == 400
    assert api.client.get("/trainings/..%2F..%2Fetc").status_code in (400, 404)
    assert api.client.get("/trainings/not-an-id").status_code == 400
    assert api.client.get("/trainings/20200101-000000-abcdef").status_code == 404
    assert api.client.post("/trainings/20200101-000000-abcdef/cancel").status_code == 404
    assert api.client.get("/trainings/not-an-id/logs").status_code == 400
    assert api.client.get("/trainings/20200101-000000-abcdef/events").status_code == 404
    assert api.client.get("/trainings", params={"status": "sleeping"}).status_code == 400
    assert api.client.get("/trainings", params={"limit": 0}).status_code == 400


def test_concurrent_clients_while_a_job_trains(api: Server, home: Path) -> None:
    job = api.client.post("/trainings", json=_training("busy", steps=6)).json()["job"]
    text = CONFIG.format(steps=3, name="fmt") + 'train_data_dir = "demo"\n'

    def work(i: int) -> list[int]:
        codes = []
        for _ in range(4):
            codes.append(api.client.get("/trainings").status_code)
            codes.append(api.client.get("/models").status_code)
            fmt = api.client.post("/config/format", json={"config_params": text, "fm_type": "sd_1_5"})
            codes.append(fmt.status_code)
            codes.append(api.client.get(f"/trainings/{job['id']}").status_code)
        return codes

    with ThreadPoolExecutor(8) as pool:
        results = [code for codes in pool.map(work, range(8)) for code in codes]
    assert results == [200] * len(results)
    done = _wait_for(api, job["id"], {"completed", "failed", "interrupted"})
    assert done["status"] == "completed", done["reason"]
    assert (home / "lora" / "busy.safetensors").is_file()


def test_open_server_without_token(home: Path, tmp_path: Path) -> None:
    service = build_service(tmp_path / "open-home")
    with Server(service, None) as server:
        assert httpx.get(f"{server.base}/trainings").json()["total"] == 0
