"""SageMaker jobs end to end against moto's server (S3, SageMaker and CloudWatch Logs on 127.0.0.1 over real HTTP,
boto3 unchanged), with the test playing SageMaker's part (sagemaker_support): the real scheduler and runner upload
the inputs, create the training job, follow it and deliver the LoRA; the real container entrypoint trains the tiny
demo model on an /opt/ml tree filled from the channels.
"""

# ruff: noqa: F811  (the moto fixtures are imported from s3_support and named as test arguments)

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from jobs_support import FAST_CONFIG, statuses
from s3_support import moto_url, new_bucket, raw_client, s3_env  # noqa: F401
from sagemaker_support import IMAGE, ROLE, SageMakerStandIn, wait_for

from kohya_backend.assets.demo import prepare_demo
from kohya_backend.jobs.runner import EVENTS_NAME, LOG_NAME, LocalRunner
from kohya_backend.jobs.sagemaker import SageMakerRunner
from kohya_backend.jobs.sagemaker_container import channel_value
from kohya_backend.jobs.sagemaker_protocol import ContainerPaths
from kohya_backend.jobs.sagemaker_request import JOB_ID_TAG
from kohya_backend.jobs.sagemaker_session import SageMakerOptions
from kohya_backend.jobs.sagemaker_settings import SageMakerSettings
from kohya_backend.jobs.scheduler import Scheduler
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import JobStore
from kohya_backend.service.home import Home, PathOutsideHome
from kohya_backend.service.s3_assets import S3Assets
from kohya_backend.service.training import Submission, TrainingService
from kohya_backend.train.events import read_events

pytestmark = pytest.mark.slow
FAST = SageMakerOptions(poll_min_s=0.1, poll_max_s=0.3, lost_after_s=20)
SETTINGS = SageMakerSettings(role_arn=ROLE, image_uri=IMAGE, max_runtime_s=3600, spot_max_wait_s=7200)
SAMPLED = FAST_CONFIG + 'sample_prompts = "{prompts}"\nsample_every_n_steps = {steps}\n'


@pytest.fixture
def stand_in(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> SageMakerStandIn:
    return SageMakerStandIn(s3_env).install(monkeypatch)


@pytest.fixture
def home(tmp_path: Path, s3_env: str) -> Iterator[tuple[Path, str]]:
    """A home with the demo model, tokenizer, dataset and a sample prompt, and a fresh bucket for its prefix."""
    root = tmp_path / "home"
    prepare_demo(root, fm_type="sd_1_5", steps=2)
    (root / "models" / "prompts.txt").write_text(
        "a demo picture --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8"
    )
    yield root, f"s3://{new_bucket(s3_env)}/train"


def _service(root: Path, prefix: str) -> TrainingService:
    """A host like build_service's, with a SageMaker runner patient for seconds (not minutes)."""
    home = Home(root)
    s3 = S3Assets.for_home(home, prefix)
    runner = SageMakerRunner(SETTINGS, prefix=lambda: s3.prefix, s3=s3.access.client, options=FAST)
    scheduler = Scheduler(
        JobStore(home.root),
        [LocalRunner(), runner],
        lora_dir=home.lora,
        devices={"cpu": 1},
        poll_interval_s=0.1,
    )
    return TrainingService(home, scheduler, s3=s3)


def _submit(service: TrainingService, instance_type: str, name: str, steps: int = 3) -> str:
    config = SAMPLED.format(steps=steps, name=name, prompts=(service.home.models / "prompts.txt").as_posix())
    job = service.submit(
        Submission("demo-sd_1_5.safetensors", "demo", "sd_1_5", config, instance_type=instance_type)
    )
    return job.id


def _created(stand_in: SageMakerStandIn, count: int) -> str:
    wait_for(lambda: len(stand_in.created) >= count, f"CreateTrainingJob #{count}")
    return str(stand_in.created[count - 1]["training_job_name"])


def _status(service: TrainingService, job_id: str, wanted: JobStatus) -> dict[str, Any]:
    wait_for(lambda: service.store.get(job_id).status is wanted, f"job {job_id} to be {wanted}")
    return service.show(job_id)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_channels(endpoint: str, request: dict[str, Any], root: Path) -> dict[str, str]:
    """Every channel is a prefix the runner uploaded: each local input file is there with its sha256."""
    s3 = raw_client(endpoint)
    uris = {}
    for channel in request["input_data_config"]:
        uri = channel["DataSource"]["S3DataSource"]["S3Uri"]
        bucket, _, key = uri[len("s3://") :].partition("/")
        assert "/sagemaker/inputs/" in uri and key.endswith("/"), uri  # content-addressed channels
        objects = s3.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]
        for item in objects:
            meta = s3.head_object(Bucket=bucket, Key=item["Key"])["Metadata"]
            assert len(meta["sha256"]) == 64
        uris[channel["ChannelName"]] = uri
        names = {o["Key"][len(key) :] for o in objects}
        if channel["ChannelName"] == "model":
            local = root / "models" / "demo-sd_1_5.safetensors"
            assert names == {local.name}
            meta = s3.head_object(Bucket=bucket, Key=key + local.name)["Metadata"]
            assert meta["sha256"] == _sha256(local)
        if channel["ChannelName"] == "dataset":
            expected = {
                p.relative_to(root / "datasets" / "demo").as_posix()
                for p in (root / "datasets" / "demo").rglob("*")
                if p.is_file()
            }
            assert names == expected
    assert set(uris) == {"model", "dataset", "tokenizer", "prompts", "config"}
    return uris


def _check_valid_for_sagemaker(request: dict[str, Any]) -> None:
    """The request against SageMaker's own service model: every string's pattern and length, every list's size."""
    import re

    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("CreateTrainingJob").input_shape
    camel = {
        "".join(w.title() for w in k.split("_")): v for k, v in request.items() if v not in (None, False)
    }
    for member in shape.required_members:
        assert member in camel, member

    def check(s: Any, value: Any, where: str) -> None:
        meta = s.metadata
        if s.type_name == "string":
            assert meta.get("min", 0) <= len(value) <= meta.get("max", 10**9), where
            if "pattern" in meta and "\\p{" not in meta["pattern"]:
                assert re.fullmatch(meta["pattern"], value), (where, value)
            if s.enum:
                assert value in s.enum, (where, value)
        elif s.type_name in ("integer", "long"):
            assert value >= meta.get("min", 0), where
        elif s.type_name == "structure":
            for key, item in value.items():
                check(s.members[key], item, f"{where}.{key}")
        elif s.type_name == "list":
            assert meta.get("min", 0) <= len(value) <= meta.get("max", 10**9), where
            for i, item in enumerate(value):
                check(s.member, item, f"{where}[{i}]")
        elif s.type_name == "map":
            assert len(value) <= meta.get("max", 10**9), where
            for key, item in value.items():
                check(s.key, key, f"{where} key")
                check(s.value, item, f"{where}[{key}]")

    for key, value in camel.items():
        check(shape.members[key], value, key)


def _play_run(stand_in: SageMakerStandIn, name: str, root: Path, **run: Any) -> Any:
    """Downloading, then Training with the real entrypoint; its output goes to the job's log stream."""
    stand_in.set_status(name, "InProgress", "Downloading", "Downloading input data")
    stand_in.fill_opt_ml(name, root)
    stand_in.set_status(
        name, "InProgress", "Training", "Training image download completed. Training in progress."
    )
    result = stand_in.run_container(root, **run)
    stand_in.put_logs(name, result)
    return result


def test_a_job_trains_on_sagemaker_and_its_lora_lands_in_the_lora_folder(
    home: tuple[Path, str], stand_in: SageMakerStandIn, s3_env: str, tmp_path: Path
) -> None:
    root, prefix = home
    service = _service(root, prefix)
    entries = {e["name"]: e for e in service.instance_types()}
    assert (
        entries["sagemaker:ml.g5.2xlarge"]["label"]
        == "SageMaker ml.g5.2xlarge: 1x NVIDIA A10G 24 GB, on-demand"
    )
    assert entries["sagemaker:ml.g5.2xlarge:spot"]["spot"] is True
    service.scheduler.start()
    try:
        job_id = _submit(service, "sagemaker:ml.g5.2xlarge", "cloud-lora")
        name = _created(stand_in, 1)
        request = stand_in.request(name)
        _check_valid_for_sagemaker(request)
        assert name.startswith("tm-cloud-lora-") and name.endswith(f"{job_id}-1")
        assert request["algorithm_specification"]["TrainingImage"] == IMAGE
        assert request["role_arn"] == ROLE
        assert request["resource_config"] == {
            "InstanceType": "ml.g5.2xlarge",
            "InstanceCount": 1,
            "VolumeSizeInGB": 30,
        }
        assert request["stopping_condition"] == {"MaxRuntimeInSeconds": 3600}
        assert not request["enable_managed_spot_training"]
        assert request["checkpoint_config"] == {
            "S3Uri": f"{prefix}/sagemaker/jobs/{job_id}/checkpoints",
            "LocalPath": "/opt/ml/checkpoints",
        }
        assert request["output_data_config"]["S3OutputPath"] == f"{prefix}/sagemaker/jobs/{job_id}/output"
        assert {"Key": JOB_ID_TAG, "Value": job_id} in request["tags"]
        assert request["hyper_parameters"]["fm_type"] == "sd_1_5"
        assert request["hyper_parameters"]["output_name"] == "cloud-lora"
        _check_channels(s3_env, request, root)
        shown = _status(service, job_id, JobStatus.PREPARING)
        wait_for(
            lambda: (service.show(job_id)["progress"].get("cloud") or {}).get("secondary") == "Starting",
            "Starting",
        )

        # Training: the job is `training` from SageMaker's status alone, before any log line arrived.
        stand_in.set_status(name, "InProgress", "Downloading", "Downloading input data")
        opt_ml = tmp_path / "opt-ml"
        stand_in.fill_opt_ml(name, opt_ml)
        stand_in.set_status(name, "InProgress", "Training", "Training in progress.")
        _status(service, job_id, JobStatus.TRAINING)

        # A restart of the host re-attaches to the training job by name (no second CreateTrainingJob).
        service.scheduler.stop()
        service = _service(root, prefix)
        service.scheduler.start()
        run = stand_in.run_container(opt_ml)
        assert run.code == 0, run.stderr[-20:]
        stand_in.put_logs(name, run)
        wait_for(lambda: service.show(job_id)["progress"].get("step") == 3, "step 3 from the log stream")
        progress = service.show(job_id)["progress"]
        assert progress["loss"] is not None and progress["eta_s"] is not None and progress["total_steps"] == 3

        stand_in.upload_model(name, opt_ml)
        stand_in.set_status(name, "InProgress", "Uploading", "Uploading generated training model")
        wait_for(
            lambda: service.store.get(job_id).status in (JobStatus.SAVING, JobStatus.COMPLETED), "saving"
        )
        stand_in.set_status(
            name,
            "Completed",
            "Completed",
            "Training job completed",
            billable_time_in_seconds=321,
            training_time_in_seconds=400,
        )
        shown = _status(service, job_id, JobStatus.COMPLETED)
    finally:
        service.scheduler.stop()
    assert len(stand_in.created) == 1
    assert statuses(service.store, job_id) == [
        JobStatus.QUEUED,
        JobStatus.PREPARING,
        JobStatus.TRAINING,
        JobStatus.SAVING,
        JobStatus.COMPLETED,
    ]
    lora_dir = service.home.lora
    lora = lora_dir / "cloud-lora.safetensors"
    assert lora.is_file() and (lora_dir / "cloud-lora.json").is_file()
    assert (lora_dir / "cloud-lora.preview.png").is_file()  # the container's sample became the preview
    assert _sha256(lora) == _sha256(opt_ml / "model" / "cloud-lora.safetensors")
    sidecar = json.loads((lora_dir / "cloud-lora.json").read_text())
    assert f"job {job_id}" in sidecar["notes"] and sidecar["sd version"] == "SD1"
    assert shown["progress"]["cloud"]["billable_s"] == 321
    folder = service.store.get(job_id).folder
    log = (folder / LOG_NAME).read_text()
    assert "step 3/3" in log  # the container's own progress line, from CloudWatch
    assert "billable time: 321 s" in log
    assert "@train-management-event" not in log  # event lines went to events.jsonl
    events = read_events(folder / EVENTS_NAME)
    saved = [e for e in events if e["kind"] == "saved"]
    assert saved and saved[-1]["path"] == str(folder / "output" / "cloud-lora.safetensors")


def test_spot_interruption_resumes_from_the_checkpoint_prefix(
    home: tuple[Path, str], stand_in: SageMakerStandIn, tmp_path: Path
) -> None:
    root, prefix = home
    service = _service(root, prefix)
    service.scheduler.start()
    try:
        job_id = _submit(service, "sagemaker:ml.g4dn.xlarge:spot", "spot-lora", steps=24)
        name = _created(stand_in, 1)
        request = stand_in.request(name)
        assert request["enable_managed_spot_training"] is True
        stopping = request["stopping_condition"]
        assert stopping == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}

        # The spot instance is reclaimed: SIGTERM mid-training, the container saves its state and exits.
        first = _play_run(stand_in, name, tmp_path / "first", sigterm_at_step=2)
        assert first.code == 0, first.stderr[-20:]
        stopped = [e for e in first.events if e["kind"] == "stopped"]
        assert stopped and 2 <= stopped[0]["step"] < 24
        stand_in.sync_checkpoints(name, tmp_path / "first")
        stand_in.set_status(
            name, "InProgress", "Interrupted", "Training job interrupted due to spot capacity"
        )
        wait_for(
            lambda: "spot interruption" in (service.show(job_id)["progress"].get("phase") or ""), "spot phase"
        )

        # SageMaker restarts it on a new instance with /opt/ml/checkpoints restored from the prefix.
        stand_in.set_status(name, "InProgress", "Starting", "Restarting the training job")
        second = _play_run(stand_in, name, tmp_path / "second")
        assert second.code == 0, second.stderr[-20:]
        resumed = [e for e in second.events if e["kind"] == "log" and "resumed from" in e["message"]]
        assert resumed and f"at step {stopped[0]['step']}" in resumed[0]["message"]
        steps = [e["step"] for e in second.events if e["kind"] == "step"]
        assert steps[0] == stopped[0]["step"] + 1 and steps[-1] == 24
        stand_in.upload_model(name, tmp_path / "second")
        stand_in.set_status(
            name, "Completed", "Completed", "", billable_time_in_seconds=120, training_time_in_seconds=400
        )
        _status(service, job_id, JobStatus.COMPLETED)
    finally:
        service.scheduler.stop()
    assert JobStatus.INTERRUPTED not in statuses(service.store, job_id)
    assert len(stand_in.created) == 1  # SageMaker itself restarted it
    assert (service.home.lora / "spot-lora.safetensors").is_file()
    log = (service.store.get(job_id).folder / LOG_NAME).read_text()
    assert "70% saved by spot" in log


def test_cancel_stops_the_training_job_and_resume_starts_a_new_one_from_the_saved_state(
    home: tuple[Path, str], stand_in: SageMakerStandIn, s3_env: str
) -> None:
    root, prefix = home
    service = _service(root, prefix)
    service.scheduler.start()
    try:
        job_id = _submit(service, "sagemaker:ml.g5.xlarge", "cancelled-lora")
        first = _created(stand_in, 1)
        stand_in.set_status(first, "InProgress", "Training", "Training in progress.")
        _status(service, job_id, JobStatus.TRAINING)

        # AWS refuses to answer while the job trains: ours is interrupted (the training job goes on), and Resume
        # follows the same training job again.
        stand_in.refuse_describe = (
            "AccessDeniedException",
            "not authorized to perform sagemaker:DescribeTrainingJob",
        )
        shown = _status(service, job_id, JobStatus.INTERRUPTED)
        assert "AccessDeniedException" in shown["reason"] and f"{first} goes on" in shown["reason"]
        stand_in.refuse_describe = None
        service.resume(job_id)
        _status(service, job_id, JobStatus.TRAINING)
        assert len(stand_in.created) == 1

        service.cancel(job_id)
        wait_for(lambda: stand_in.stops == [first], "StopTrainingJob")
        assert service.store.get(job_id).status is JobStatus.CANCELLING
        stand_in.set_status(first, "Stopped", "Stopped", "Training job stopped", billable_time_in_seconds=60)
        shown = _status(service, job_id, JobStatus.CANCELLED)
        assert f"{prefix}/sagemaker/jobs/{job_id}/checkpoints/" in shown["reason"]
        assert "resume continues" in shown["reason"]

        # Resume: a new training job (the next attempt) with the same checkpoints and channels; nothing uploaded.
        service.resume(job_id)
        second = _created(stand_in, 2)
        assert second == first[: -len("-1")] + "-2"
        old, new = stand_in.request(first), stand_in.request(second)
        assert new["checkpoint_config"] == old["checkpoint_config"]
        assert new["input_data_config"] == old["input_data_config"]
        log = (service.store.get(job_id).folder / LOG_NAME).read_text()
        assert log.count("B were in S3 already") == 2 and "uploaded 0 B" in log

        # A FailureReason reaches the user with what to do about it.
        reason = "CapacityError: Unable to provision requested ML compute capacity. Please retry."
        stand_in.set_status(second, "Failed", "Failed", reason, failure_reason=reason)
        shown = _status(service, job_id, JobStatus.FAILED)
        assert reason in shown["reason"] and "no free instance of this type" in shown["reason"]

        # A quota refusal at creation is a job error with the quota hint.
        stand_in.refuse_next_create = (
            "ResourceLimitExceeded",
            "The account-level service limit 'ml.g5.xlarge for training job usage' is 0 Instances",
        )
        refused = _submit(service, "sagemaker:ml.g5.xlarge", "refused-lora")
        shown = _status(service, refused, JobStatus.FAILED)
        assert "ResourceLimitExceeded" in shown["reason"] and "Service Quotas" in shown["reason"]
    finally:
        service.scheduler.stop()


def test_s3_models_and_datasets_become_channels_where_they_are(
    home: tuple[Path, str], stand_in: SageMakerStandIn, s3_env: str, tmp_path: Path
) -> None:
    root, prefix = home
    bucket, _, base = prefix[len("s3://") :].partition("/")
    raw = raw_client(s3_env)
    model_file = root / "models" / "demo-sd_1_5.safetensors"
    raw.upload_file(str(model_file), bucket, f"{base}/models/demo-sd_1_5.safetensors")
    raw.upload_file(
        str(model_file), bucket, f"{base}/models/demo-sd_1_5.safetensors.old"
    )  # beside it, same start
    raw.upload_file(str(root / "models" / "prompts.txt"), bucket, f"{base}/models/prompts.txt")
    raw.put_object(Bucket=bucket, Key=f"{base}/models/prompts.txt.bak", Body=b"an old prompt\n")
    for path in sorted((root / "datasets" / "demo").rglob("*.*")):
        raw.upload_file(
            str(path), bucket, f"{base}/datasets/demo/{path.relative_to(root / 'datasets' / 'demo')}"
        )
    other = new_bucket(s3_env)
    raw.upload_file(str(model_file), other, f"{base}/models/demo-sd_1_5.safetensors")
    service = _service(root, prefix)
    service.scheduler.start()
    try:
        model, dataset = f"{prefix}/models/demo-sd_1_5.safetensors", f"{prefix}/datasets/demo"
        prompts = f"{prefix}/models/prompts.txt"
        # What the SageMaker role would read comes from the app's prefix only, as for local jobs.
        outside = SAMPLED.format(steps=3, name="outside", prompts=prompts) + (
            f'network_weights = "s3://{other}/{base}/models/demo-sd_1_5.safetensors"\n'
        )
        with pytest.raises(PathOutsideHome, match=other):
            service.submit(
                Submission(model, dataset, "sd_1_5", outside, instance_type="sagemaker:ml.g5.2xlarge")
            )
        config = SAMPLED.format(steps=3, name="from-s3", prompts=prompts)
        job = service.submit(
            Submission(model, dataset, "sd_1_5", config, instance_type="sagemaker:ml.g5.2xlarge")
        )
        name = _created(stand_in, 1)
        request = stand_in.request(name)
        _check_valid_for_sagemaker(request)
        sources = {c["ChannelName"]: c["DataSource"]["S3DataSource"] for c in request["input_data_config"]}
        assert sources["dataset"] == {
            "S3DataType": "S3Prefix",
            "S3Uri": dataset + "/",
            "S3DataDistributionType": "FullyReplicated",
        }
        for channel, uri in (("model", model), ("prompts", prompts)):
            # One object, exactly: a manifest (content-addressed under the runner's inputs) naming it.
            assert sources[channel]["S3DataType"] == "ManifestFile"
            manifest = sources[channel]["S3Uri"]
            assert manifest.startswith(f"{prefix}/sagemaker/inputs/") and manifest.endswith("/manifest.json")
            listed = json.loads(
                raw.get_object(Bucket=bucket, Key=manifest[len(f"s3://{bucket}/") :])["Body"].read()
            )
            assert listed == [{"prefix": f"{prefix}/models/"}, uri.rsplit("/", 1)[1]]
        for source in sources.values():  # every channel lies in the app's prefix
            assert source["S3Uri"].startswith(
                (f"{prefix}/models/", f"{prefix}/datasets/", f"{prefix}/sagemaker/")
            )
        uploaded = raw.list_objects_v2(Bucket=bucket, Prefix=f"{base}/sagemaker/inputs/")["Contents"]
        assert not [o for o in uploaded if o["Key"].endswith((".safetensors", ".png"))]  # nothing sent twice
        opt_ml = tmp_path / "opt-ml"
        stand_in.fill_opt_ml(name, opt_ml)
        model_channel = opt_ml / "input" / "data" / "model"
        assert [p.name for p in model_channel.rglob("*") if p.is_file()] == ["demo-sd_1_5.safetensors"]
        # The container takes the prompts channel's one file (two files there would fail the job).
        assert (
            channel_value(ContainerPaths(opt_ml), "prompts")
            == opt_ml / "input" / "data" / "prompts" / "prompts.txt"
        )
        assert len(list((opt_ml / "input" / "data" / "dataset" / "10_demo").glob("*.png"))) == 8
        stand_in.set_status(
            name, "Failed", "Failed", "stopped by the test", failure_reason="AlgorithmError: test"
        )
        _status(service, job.id, JobStatus.FAILED)
    finally:
        service.scheduler.stop()
