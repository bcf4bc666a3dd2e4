"""Training from and to S3 end to end, against moto's S3 server over real HTTP: the `train` command and the REST
API (with its scheduler and real trainer processes) on the tiny demo model, its model and dataset put on S3 the
way the original solution's guide does it (`aws s3 cp` the checkpoint, `aws s3 sync` the dataset)."""

# ruff: noqa: F811  (the moto fixtures are imported from s3_support and named as test arguments)

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jobs_support import FAST_CONFIG
from s3_support import moto_url, new_bucket, raw_client, s3_env  # noqa: F401
from server_support import running

from kohya_backend.assets.demo import prepare_demo
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service, create_app
from kohya_backend.service.training import TrainingService

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _put_demo(endpoint: str, home: Path, bucket: str, prefix: str = "train") -> None:
    """What `aws s3 cp model s3://b/train/models/` and `aws s3 sync datasets/demo s3://b/train/datasets/demo` do."""
    raw = raw_client(endpoint)
    model = home / "models" / "demo-sd_1_5.safetensors"
    raw.upload_file(str(model), bucket, f"{prefix}/models/{model.name}")
    demo = home / "datasets" / "demo"
    for path in sorted(demo.rglob("*")):
        if path.is_file():
            raw.upload_file(str(path), bucket, f"{prefix}/datasets/demo/{path.relative_to(demo).as_posix()}")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    root = tmp_path / "home"
    prepare_demo(root, fm_type="sd_1_5", steps=2)
    return root


def _events(job_folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (job_folder / "events.jsonl").read_text().splitlines()]


def test_train_command_reads_model_and_dataset_from_s3_and_uploads_the_lora(
    s3_env: str, home: Path, tmp_path: Path
) -> None:
    bucket = new_bucket(s3_env)
    _put_demo(s3_env, home, bucket)
    config = tmp_path / "s3.toml"
    text = FAST_CONFIG.format(steps=2, name="from-s3").replace(
        'tokenizer_cache_dir = "tokenizer"',
        f'tokenizer_cache_dir = "{(home / "models" / "tokenizer").as_posix()}"',
    )
    config.write_text(
        text
        + f'pretrained_model_name_or_path = "s3://{bucket}/train/models/demo-sd_1_5.safetensors"\n'
        + f'train_data_dir = "s3://{bucket}/train/datasets/demo"\n'
        + f'output_dir = "s3://{bucket}/loras/"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "kohya_backend", "train", "--config", str(config)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for what in ("model", "dataset"):  # the console shows each download's progress, and where it ended
        size = r"[\d.]+/[\d.]+ (GB|MB|KB|B)"
        assert re.search(rf"^downloading {what} {size}$", done.stderr, re.M), done.stderr[-2000:]
    assert "S3 inputs ready:" in done.stderr
    assert f"uploaded s3://{bucket}/loras/from-s3.safetensors" in done.stdout
    head = raw_client(s3_env).head_object(Bucket=bucket, Key="loras/from-s3.safetensors")
    assert head["ContentLength"] > 1000 and len(head["Metadata"]["sha256"]) == 64
    listed = subprocess.run(
        [sys.executable, "-m", "kohya_backend", "s3", "ls", f"s3://{bucket}/train/datasets/demo/"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert listed.returncode == 0 and "16 object(s)" in listed.stderr, listed.stderr
    wrong = subprocess.run(
        [sys.executable, "-m", "kohya_backend", "s3", "download", f"s3://{bucket}/nope.bin", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert wrong.returncode == 2 and f"s3://{bucket}/nope.bin" in wrong.stderr and "404" in wrong.stderr


def _wait(client: httpx.Client, job_id: str, states: set[str], timeout: float = 150) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/trainings/{job_id}").json()["job"]
        if job["status"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not reach {states}: {job.get('status')} {job.get('reason')}")


@pytest.fixture
def api(s3_env: str, home: Path) -> Iterator[tuple[httpx.Client, TrainingService, str]]:
    bucket = new_bucket(s3_env)
    _put_demo(s3_env, home, bucket)
    service = build_service(home, poll_interval_s=0.2, s3_uri=f"s3://{bucket}/train")
    service.scheduler.start()
    try:
        with (
            running(create_app(service)) as url,
            httpx.Client(base_url=f"{url}{API_PREFIX}", timeout=60) as c,
        ):
            yield c, service, bucket
    finally:
        service.scheduler.stop()


def _training(bucket: str, name: str, **extra: str) -> dict[str, Any]:
    lines = "".join(f'{key} = "{value}"\n' for key, value in extra.items())
    return {
        "training_params": {
            "model": f"s3://{bucket}/train/models/demo-sd_1_5.safetensors",
            "dataset": f"s3://{bucket}/train/datasets/demo",
            "fm_type": "sd_1_5",
        },
        "config_params": FAST_CONFIG.format(steps=2, name=name) + lines,
    }


def test_api_lists_s3_assets_and_trains_from_s3_downloading_once(
    api: tuple[httpx.Client, TrainingService, str], home: Path
) -> None:
    client, _service, bucket = api
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    on_s3 = models[f"s3://{bucket}/train/models/demo-sd_1_5.safetensors"]
    assert on_s3["source"] == "s3" and on_s3["family"] == "sd_1_5" and on_s3["error"] is None
    assert on_s3["size"] == (home / "models" / "demo-sd_1_5.safetensors").stat().st_size
    assert models["demo-sd_1_5.safetensors"]["source"] == "local"
    datasets = {d["name"]: d for d in client.get("/datasets").json()["datasets"]}
    assert datasets[f"s3://{bucket}/train/datasets/demo"]["summary"]["images"] == 8
    assert datasets[f"s3://{bucket}/train/datasets/demo"]["summary"]["subsets"] == {"10_demo": 8}

    first = client.post("/trainings", json=_training(bucket, "s3-first", output_dir=f"s3://{bucket}/out/"))
    assert first.status_code == 201, first.text
    job = _wait(client, first.json()["job"]["id"], {"completed", "failed"})
    assert job["status"] == "completed", job["reason"]
    folder = Path(job["folder"])
    events = _events(folder)
    downloads = [e for e in events if e["kind"] == "download"]
    assert {e["what"] for e in downloads} == {"model", "dataset"}
    assert downloads[-1]["done"] == downloads[-1]["total"]
    fetched = next(e for e in events if e["kind"] == "downloaded")
    assert fetched["fetched"] == fetched["total"] > 0
    assert [t["to"] for t in job["transitions"]][:3] == ["queued", "preparing", "training"]
    lora = home / "lora" / "s3-first.safetensors"
    assert lora.is_file() and job["progress"]["s3_outputs"] == [
        f"s3://{bucket}/out/s3-first.safetensors",
        f"s3://{bucket}/out/s3-first.json",
    ]
    raw = raw_client(os.environ["AWS_ENDPOINT_URL"])
    uploaded = raw.get_object(Bucket=bucket, Key="out/s3-first.safetensors")
    assert hashlib.sha256(uploaded["Body"].read()).hexdigest() == uploaded["Metadata"]["sha256"]
    sidecar = json.loads(raw.get_object(Bucket=bucket, Key="out/s3-first.json")["Body"].read())
    assert sidecar["sd version"] == "SD1"

    second = client.post("/trainings", json=_training(bucket, "s3-second")).json()["job"]
    job2 = _wait(client, second["id"], {"completed", "failed"})
    assert job2["status"] == "completed", job2["reason"]
    again = next(e for e in _events(Path(job2["folder"])) if e["kind"] == "downloaded")
    assert again["fetched"] == 0 and again["total"] == fetched["total"]  # the second job downloads nothing


def test_missing_objects_fail_before_training_with_bucket_key_and_code(
    api: tuple[httpx.Client, TrainingService, str],
) -> None:
    client, _service, bucket = api
    body = _training(bucket, "no-model")
    body["training_params"]["model"] = f"s3://{bucket}/train/models/missing.safetensors"
    refused = client.post("/trainings", json=body)
    assert refused.status_code == 404
    assert f"s3://{bucket}/train/models/missing.safetensors" in refused.json()["detail"]["message"]
    weights = f"s3://{bucket}/loras/missing.safetensors"
    queued = client.post("/trainings", json=_training(bucket, "no-weights", network_weights=weights))
    assert queued.status_code == 201, queued.text
    job = _wait(client, queued.json()["job"]["id"], {"completed", "failed"})
    assert job["status"] == "failed"
    assert weights in job["reason"] and "AWS error 404" in job["reason"]
    assert "training" not in [t["to"] for t in job["transitions"]]
    assert "start:" not in (Path(job["folder"]) / "train.log").read_text()  # no trainer was started
    bad = client.post("/trainings", json=_training(bucket, "bad-uri", output_dir="s3://Bad_Bucket/x"))
    assert bad.status_code == 400 and "bucket name" in bad.text


def test_upload_to_s3_puts_a_local_dataset_under_the_prefix(
    api: tuple[httpx.Client, TrainingService, str], home: Path
) -> None:
    client, _service, bucket = api
    for sent in ("all", "none"):  # `aws s3 sync` recorded no sha256: the first upload sends, the second not
        started = client.post("/s3/uploads", json={"kind": "dataset", "name": "demo"})
        assert started.status_code == 202, started.text
        ticket = started.json()["upload"]["ticket"]
        deadline = time.monotonic() + 60
        while (status := client.get(f"/s3/uploads/{ticket}").json()["upload"])["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert status["state"] == "done", status
        result = status["result"]
        assert result["uri"] == f"s3://{bucket}/train/datasets/demo/" and result["files"] == 16
        assert result["sent"] == (result["bytes"] if sent == "all" else 0)
    head = raw_client(os.environ["AWS_ENDPOINT_URL"]).head_object(
        Bucket=bucket,
        Key="train/datasets/demo/10_demo/"
        + sorted(p.name for p in (home / "datasets" / "demo" / "10_demo").iterdir())[0],
    )
    assert len(head["Metadata"]["sha256"]) == 64
    missing = client.post("/s3/uploads", json={"kind": "dataset", "name": "nope"})
    assert missing.status_code == 404


def test_the_tabs_upload_button_reports_progress_and_errors(
    api: tuple[httpx.Client, TrainingService, str], home: Path
) -> None:
    from kohya_backend.ui.s3_upload import upload_dataset

    _client, service, bucket = api
    assert list(upload_dataset(service, None)) == ["Choose a dataset first."]
    shown = list(upload_dataset(service, "demo", poll_s=0.01))
    assert all(m.startswith("Uploading **demo** to ") for m in shown[:-1])
    assert shown[-1].startswith(f"✅ **demo** is on S3 at s3://{bucket}/train/datasets/demo/ (16 file(s);")
    assert "the rest was already there" in shown[-1]
    assert list(upload_dataset(service, "nope"))[-1].startswith("**")  # the error, as the tab shows one
    plain = build_service(home)  # no prefix anywhere: the button says how to set one
    message = list(upload_dataset(plain, "demo"))[-1]
    assert "no S3 prefix is set" in message and "--s3-uri" in message
    gone = build_service(home, s3_uri="s3://tm-no-such-bucket-here/train")  # fails inside the upload task
    message = list(upload_dataset(gone, "demo", poll_s=0.01))[-1]
    assert message.startswith("❌ Upload failed:") and "NoSuchBucket" in message
