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

from kohya_backend.errors import TrainManagementError
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service, create_app
from kohya_backend.service.home import PathOutsideHome
from kohya_backend.service.training import Submission, TrainingService

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
def home(demo_home: Path) -> Path:
    return demo_home


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

    first = client.post(
        "/trainings", json=_training(bucket, "s3-first", output_dir=f"s3://{bucket}/train/loras/")
    )
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
        f"s3://{bucket}/train/loras/s3-first.safetensors",
        f"s3://{bucket}/train/loras/s3-first.json",
    ]
    raw = raw_client(os.environ["AWS_ENDPOINT_URL"])
    uploaded = raw.get_object(Bucket=bucket, Key="train/loras/s3-first.safetensors")
    assert hashlib.sha256(uploaded["Body"].read()).hexdigest() == uploaded["Metadata"]["sha256"]
    sidecar = json.loads(raw.get_object(Bucket=bucket, Key="train/loras/s3-first.json")["Body"].read())
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
    weights = f"s3://{bucket}/train/loras/missing.safetensors"
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


def test_the_model_upload_button_puts_the_chosen_checkpoint_under_the_prefix(
    api: tuple[httpx.Client, TrainingService, str], home: Path
) -> None:
    from kohya_backend.jobs.s3_jobs import human_bytes
    from kohya_backend.ui.s3_upload import S3UploadActions

    _client, service, bucket = api
    actions = S3UploadActions(service, poll_s=0.01)
    name = "demo-sd_1_5.safetensors"
    size = (home / "models" / name).stat().st_size
    uri = f"s3://{bucket}/train/models/{name}"
    assert list(actions.upload_model(None)) == ["Choose a model first."]
    shown = list(actions.upload_model(name))
    assert all(m.startswith(f"Uploading **{name}** to {uri}: ") for m in shown[:-1])
    # `aws s3 cp` put it there without a sha256: this upload sends it whole and records one.
    assert (
        shown[-1]
        == f"✅ **{name}** is on S3 at {uri} (1 file(s); {human_bytes(size, size)} sent, the rest was already there)."
    )
    head = raw_client(os.environ["AWS_ENDPOINT_URL"]).head_object(Bucket=bucket, Key=f"train/models/{name}")
    assert head["ContentLength"] == size and len(head["Metadata"]["sha256"]) == 64
    again = list(actions.upload_model(name))[-1]
    assert f"(1 file(s); {human_bytes(0, size)} sent" in again  # the same bytes are not sent twice
    assert list(actions.upload_model(uri)) == [f"**{uri}** is already on S3."]  # the list's s3:// entries
    missing = list(actions.upload_model("nope.safetensors"))[-1]
    assert missing.startswith("**model 'nope.safetensors' does not exist") and name in missing


def test_s3_values_from_clients_must_lie_in_the_apps_prefix_while_the_cli_is_free(
    api: tuple[httpx.Client, TrainingService, str], home: Path, s3_env: str
) -> None:
    client, service, bucket = api
    other, raw = new_bucket(s3_env), raw_client(s3_env)
    model = home / "models" / "demo-sd_1_5.safetensors"
    image = next((home / "datasets" / "demo" / "10_demo").glob("*.png"))
    # Every near miss exists and the host's credentials reach it: only the check stands in the way.
    for where, key in (
        (other, "train/models/demo-sd_1_5.safetensors"),  # another bucket, the same prefix
        (bucket, "train-other/models/demo-sd_1_5.safetensors"),  # the prefix as a string, not as a folder
        (bucket, "Train/models/demo-sd_1_5.safetensors"),  # keys are case-sensitive
        (bucket, "train/sagemaker/inputs/x/demo-sd_1_5.safetensors"),  # the SageMaker runner's own area
    ):
        raw.upload_file(str(model), where, key)
    raw.upload_file(str(image), other, f"train/datasets/demo/10_demo/{image.name}")
    buckets: list[str] = []
    service.s3.access.client().client.meta.events.register(
        "before-parameter-build.s3", lambda params, **kw: buckets.append(params.get("Bucket"))
    )
    models = (
        f"s3://{other}/train/models/demo-sd_1_5.safetensors",
        f"s3://{bucket}/train-other/models/demo-sd_1_5.safetensors",
        f"s3://{bucket}/Train/models/demo-sd_1_5.safetensors",
        f"s3://{bucket}/train/sagemaker/inputs/x/demo-sd_1_5.safetensors",
        f"s3://{bucket}/train/models/../../train-other/models/demo-sd_1_5.safetensors",
        f"s3://{bucket}/train/models/%2e%2e/%2e%2e/train-other/models/demo-sd_1_5.safetensors",
        f"s3://{bucket}/train/datasets/demo/10_demo/{image.name}",  # inside the prefix, but not a model's area
    )
    refusals = [("model", uri) for uri in models] + [("network_weights", uri) for uri in models[:-1]]
    refusals += [
        ("dataset", f"s3://{other}/train/datasets/demo"),
        ("dataset", f"s3://{bucket}/train/datasets"),  # the area itself, not one dataset
        ("reg_data_dir", f"s3://{other}/train/datasets/demo"),
        ("sample_prompts", f"s3://{other}/train/models/prompts.txt"),
        ("output_dir", f"s3://{bucket}/out/"),
        ("output_dir", f"s3://{other}/train/loras/"),
        ("output_dir", f"s3://{bucket}/train/sagemaker/inputs/"),  # would overwrite the runner's channels
        ("output_dir", f"s3://{bucket}/train/loras/../models/"),
    ]
    for key, uri in refusals:
        body = _training(bucket, "outside")
        if key in ("model", "dataset"):
            body["training_params"][key] = uri
        else:
            body = _training(bucket, "outside", **{key: uri})
        answer = client.post("/trainings", json=body)
        assert answer.status_code == 400, (key, uri, answer.text)
        detail = answer.json()["detail"]
        assert detail["error"] == "PathOutsideHome" and uri in detail["message"], (key, uri)
    formatted = client.post(
        "/config/format",
        json={
            "config_params": FAST_CONFIG.format(steps=2, name="f"),
            "fm_type": "sd_1_5",
            "model": models[0],
        },
    )
    assert formatted.status_code == 400 and formatted.json()["detail"]["error"] == "PathOutsideHome"
    with pytest.raises(PathOutsideHome):
        service.describe_model(models[0])  # what the tab shows for a model typed in
    assert client.get("/trainings").json()["total"] == 0  # nothing was queued
    assert other not in buckets  # nor was anything outside the prefix read with the host's credentials
    # Inside the prefix it is accepted (network_weights from loras/ or models/; output_dir is loras/ or below).
    inside = {
        "network_weights": f"s3://{bucket}/train/loras/earlier.safetensors",
        "sample_prompts": f"s3://{bucket}/train/datasets/demo/prompts.txt",
        "output_dir": f"s3://{bucket}/train/loras/project/",
    }
    accepted = client.post("/trainings", json=_training(bucket, "inside", **inside))
    assert accepted.status_code == 201, accepted.text
    client.post(f"/trainings/{accepted.json()['job']['id']}/cancel")

    # Without a prefix, no s3:// value from a client is accepted.
    plain = build_service(home)
    with pytest.raises(PathOutsideHome, match="no S3 prefix is set"):
        plain.prepare(Submission(f"s3://{bucket}/train/models/demo-sd_1_5.safetensors", "demo", "sd_1_5", ""))
    # The local command line (restrict_paths False), run by the machine's owner, names any object, as kohya's does.
    free = build_service(home, restrict_paths=False, s3_uri=f"s3://{bucket}/train")
    config = FAST_CONFIG.format(steps=2, name="free") + f'output_dir = "s3://{other}/anywhere/"\n'
    _toml, _name, params = free.prepare(
        Submission(models[0], f"s3://{other}/train/datasets/demo", "sd_1_5", config)
    )
    assert params["s3_output"] == f"s3://{other}/anywhere/"
    with pytest.raises(TrainManagementError):  # still parsed strictly
        free.prepare(Submission("s3://Other/x.safetensors", "demo", "sd_1_5", ""))
