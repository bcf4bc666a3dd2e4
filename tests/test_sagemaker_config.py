"""The SageMaker runner's parts that need no AWS: the instance-type catalogue and its Format rules, the settings
(flags and HOME/cloud.toml), training job names, the CreateTrainingJob request, status mapping and error hints."""

from __future__ import annotations

import errno
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.exceptions import ClientError
from botocore.validate import ParamValidator

from kohya_backend.assets.demo import prepare_demo
from kohya_backend.errors import ConfigError, TrainManagementError
from kohya_backend.jobs.progress import summarize
from kohya_backend.jobs.sagemaker_catalog import INSTANCES, check_config, choices, parse_instance_type
from kohya_backend.jobs.sagemaker_request import (
    ChannelSource,
    JobLayout,
    channel_digest,
    create_request,
    explain,
    failure_hint,
    object_manifest,
    our_state,
    training_job_name,
    volume_size_gb,
)
from kohya_backend.jobs.sagemaker_settings import SageMakerSettings, load_sagemaker_settings
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job
from kohya_backend.service.app import build_service
from kohya_backend.storage.uri import S3Uri

ROLE = "arn:aws:iam::123456789012:role/TrainManagementSageMaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/train-management:1"
SAGEMAKER = botocore.session.get_session().get_service_model("sagemaker")


def _job(tmp_path: Path, *, output_name: str = "my lora", job_id: str = "20261204-101112-abcdef") -> Job:
    return Job(
        id=job_id,
        status=JobStatus.QUEUED,
        created_at=0.0,
        updated_at=0.0,
        fm_type="sd_1_5",
        model="demo-sd_1_5.safetensors",
        dataset="demo",
        instance_type="sagemaker:ml.g5.2xlarge",
        output_name=output_name,
        config_toml="",
        params={},
        progress={},
        reason=None,
        pid=None,
        pgid=None,
        heartbeat_at=None,
        outputs=[],
        folder=tmp_path,
    )


# -- the catalogue ------------------------------------------------------------------------------------------


def test_every_catalogue_type_is_a_sagemaker_training_instance_type() -> None:
    shape = SAGEMAKER.operation_model("CreateTrainingJob").input_shape.members["ResourceConfig"]
    known = set(shape.members["InstanceType"].enum)
    assert set(INSTANCES) <= known
    names = [c.name for c in choices()]
    assert len(names) == 2 * len(INSTANCES) and len(set(names)) == len(names)
    assert "sagemaker:ml.g5.2xlarge" in names and "sagemaker:ml.g5.2xlarge:spot" in names
    entry = parse_instance_type("sagemaker:ml.g4dn.xlarge:spot").entry()
    assert entry["gpu"] == "NVIDIA T4" and entry["gpu_memory_gb"] == 16 and entry["bf16"] is False
    assert entry["label"] == "SageMaker ml.g4dn.xlarge: 1x NVIDIA T4 16 GB, spot"


@pytest.mark.parametrize(
    "text", ["sagemaker:ml.m5.xlarge", "sagemaker:ml.g5.2xlarge:cheap", "worker:ml.g5.2xlarge", "sagemaker"]
)
def test_unknown_instance_types_are_refused_with_the_list(text: str) -> None:
    with pytest.raises(TrainManagementError) as caught:
        parse_instance_type(text)
    assert "ml.g5.2xlarge" in str(caught.value.hint)


def _issues(instance: str, fm_type: str, **values: Any) -> list[tuple[str, str | None]]:
    found = check_config(parse_instance_type(instance), fm_type, {"mixed_precision": "fp16", **values})
    return [(i.severity, i.key) for i in found]


def test_precision_and_memory_rules_follow_the_gpu() -> None:
    # bf16: none on T4 (Turing) and V100 (Volta); Ampere and newer have it.
    assert ("error", "mixed_precision") in _issues(
        "sagemaker:ml.g4dn.xlarge", "sd_1_5", mixed_precision="bf16"
    )
    assert ("error", "mixed_precision") in _issues(
        "sagemaker:ml.p3.2xlarge", "sd_1_5", mixed_precision="bf16"
    )
    assert _issues("sagemaker:ml.g5.xlarge", "sd_1_5", mixed_precision="bf16") == []
    assert _issues("sagemaker:ml.g4dn.xlarge", "sd_1_5") == []  # fp16 on a T4 is fine
    # SDXL on 16 GB needs gradient checkpointing, and in fp32 not even that is enough.
    assert _issues("sagemaker:ml.g4dn.xlarge", "sd_xl") == [("error", "gradient_checkpointing")]
    assert _issues("sagemaker:ml.g4dn.xlarge", "sd_xl", gradient_checkpointing=True) == []
    assert _issues(
        "sagemaker:ml.g4dn.xlarge", "sd_xl", gradient_checkpointing=True, mixed_precision="no"
    ) == [("error", "mixed_precision")]
    # 24 GB takes SDXL without checkpointing, tightly; 48 GB comfortably.
    assert _issues("sagemaker:ml.g5.xlarge", "sd_xl") == [("warning", "gradient_checkpointing")]
    assert _issues("sagemaker:ml.g6e.xlarge", "sd_xl") == []
    assert ("warning", None) in _issues("sagemaker:ml.g5.12xlarge", "sd_1_5")  # GPUs per job decides how many


def test_gpus_per_job_are_refused_above_what_the_instance_type_has(tmp_path: Path) -> None:
    (tmp_path / "cloud.toml").write_text(
        f'[s3]\nuri = "s3://bucket/train"\n[sagemaker]\nrole_arn = "{ROLE}"\n'
    )
    runner = build_service(tmp_path, sagemaker_image_uri=IMAGE).scheduler.runner_for(
        "sagemaker:ml.g5.12xlarge"
    )
    check = runner.check_gpus
    check("sagemaker:ml.g5.12xlarge", 4)
    check("sagemaker:ml.g5.12xlarge:spot", 2)
    with pytest.raises(TrainManagementError, match=r"asks for 8 GPUs, but ml\.g5\.12xlarge has 4") as caught:
        check("sagemaker:ml.g5.12xlarge", 8)
    assert "sagemaker instance-types" in (caught.value.hint or "")
    with pytest.raises(TrainManagementError, match=r"asks for 2 GPUs, but ml\.g5\.2xlarge has 1"):
        check("sagemaker:ml.g5.2xlarge", 2)


def test_format_checks_the_config_for_the_chosen_sagemaker_instance(tmp_path: Path) -> None:
    prepare_demo(tmp_path, fm_type="sd_1_5", steps=2)
    (tmp_path / "cloud.toml").write_text(
        f'[s3]\nuri = "s3://bucket/train"\n[sagemaker]\nrole_arn = "{ROLE}"\n'
    )
    service = build_service(tmp_path, sagemaker_image_uri=IMAGE)
    names = [e["name"] for e in service.instance_types()]
    assert "sagemaker:ml.g4dn.xlarge" in names and "sagemaker:ml.p5.48xlarge:spot" in names
    config = 'mixed_precision = "bf16"\nresolution = "64,64"\n'
    with pytest.raises(ConfigError) as caught:
        service.format_config(config, "sd_1_5", instance_type="sagemaker:ml.g4dn.xlarge")
    issue = caught.value.issues[0]
    assert issue.key == "mixed_precision" and issue.line == 1 and "NVIDIA T4" in issue.message
    out = service.format_config(config, "sd_1_5", instance_type="sagemaker:ml.g5.2xlarge")
    assert 'mixed_precision = "bf16"' in out["toml"]
    tight = service.format_config(
        'mixed_precision = "fp16"\n', "sd_xl", instance_type="sagemaker:ml.g5.2xlarge"
    )
    assert any(w["key"] == "gradient_checkpointing" for w in tight["warnings"])


def test_sagemaker_types_are_offered_only_once_set_up(tmp_path: Path) -> None:
    assert not [e for e in build_service(tmp_path).instance_types() if e["name"].startswith("sagemaker")]
    half = build_service(tmp_path, s3_uri="s3://bucket/train", sagemaker_role_arn=ROLE)
    entries = [e for e in half.instance_types() if e["name"].startswith("sagemaker")]
    assert (
        len(entries) == 1
        and entries[0]["state"] == "error"
        and "--sagemaker-image-uri" in entries[0]["error"]
    )
    with pytest.raises(TrainManagementError) as caught:
        half.format_config("", "sd_1_5", instance_type="sagemaker:ml.g5.2xlarge")
    assert "--sagemaker-image-uri" in caught.value.message and "cloud.toml" in str(caught.value.hint)


# -- settings -----------------------------------------------------------------------------------------------


def test_settings_come_from_flags_before_cloud_toml(tmp_path: Path) -> None:
    other = "arn:aws:iam::210987654321:role/Other"
    (tmp_path / "cloud.toml").write_text(
        f'[sagemaker]\nrole_arn = "{ROLE}"\nimage_uri = "{IMAGE}"\nmax_runtime_hours = 2\nmin_volume_gb = 50\n'
    )
    settings = load_sagemaker_settings(tmp_path)
    assert (settings.role_arn, settings.image_uri, settings.configured) == (ROLE, IMAGE, True)
    assert (settings.max_runtime_s, settings.spot_max_wait_s, settings.min_volume_gb) == (7200, 14400, 50)
    assert load_sagemaker_settings(tmp_path, role_arn=other).role_arn == other
    assert load_sagemaker_settings(tmp_path / "none").configured is False


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('role_arn = "my-role"', "not an IAM role ARN"),
        ('image_uri = "has spaces in it"', "not a container image URI"),
        ("max_runtime_hours = 10\nspot_max_wait_hours = 5", "at least max_runtime_hours"),
        ("max_runtime_hours = 1000", "28 days"),
        ("min_volume_gb = 0", "min_volume_gb"),
        ('region = "eu-west-1"', "unknown key(s) region"),
    ],
)
def test_bad_settings_are_refused_with_the_file_and_key(tmp_path: Path, toml: str, words: str) -> None:
    (tmp_path / "cloud.toml").write_text(f"[sagemaker]\n{toml}\n")
    with pytest.raises(TrainManagementError) as caught:
        load_sagemaker_settings(tmp_path)
    assert words in caught.value.message and "cloud.toml" in caught.value.message


# -- the request --------------------------------------------------------------------------------------------


def test_training_job_names_are_valid_unique_and_recognisable(tmp_path: Path) -> None:
    pattern = SAGEMAKER.operation_model("CreateTrainingJob").input_shape.members["TrainingJobName"].metadata
    long = _job(tmp_path, output_name="ünïcode & a very long name, far more than sixty-three characters " * 2)
    for job in (_job(tmp_path), long, _job(tmp_path, output_name="---")):
        for attempt in (1, 2, 123):
            name = training_job_name(job, attempt)
            assert re.fullmatch(pattern["pattern"], name) and len(name) <= 63, name
            assert name.endswith(f"{job.id}-{attempt}")
    assert training_job_name(_job(tmp_path), 1) == "tm-my-lora-20261204-101112-abcdef-1"
    assert training_job_name(_job(tmp_path), 1) != training_job_name(_job(tmp_path), 2)


def test_the_request_passes_botocore_validation_and_carries_the_job(tmp_path: Path) -> None:
    layout = JobLayout(S3Uri("bucket", "train"), "20261204-101112-abcdef")
    digest = channel_digest([("a.safetensors", "0" * 64, 10)])
    assert (
        digest == channel_digest([("a.safetensors", "0" * 64, 10)]) != channel_digest([("b", "0" * 64, 10)])
    )
    settings = SageMakerSettings(ROLE, IMAGE, 3600, 7200, 30)
    for spot in (False, True):
        request = create_request(
            name="tm-x-1",
            job=_job(tmp_path),
            choice=parse_instance_type("sagemaker:ml.g5.2xlarge" + (":spot" if spot else "")),
            settings=settings,
            layout=layout,
            channels={
                "model": ChannelSource(layout.channel(digest).child("manifest.json"), "ManifestFile"),
                "config": ChannelSource(layout.channel(digest)),
            },
            input_bytes=40 << 30,
        )
        shape = SAGEMAKER.operation_model("CreateTrainingJob").input_shape
        report = ParamValidator().validate(request, shape)
        assert not report.has_errors(), report.generate_report()
        assert request["EnableManagedSpotTraining"] is spot
        assert ("MaxWaitTimeInSeconds" in request["StoppingCondition"]) is spot
        assert request["ResourceConfig"]["VolumeSizeInGB"] == 90  # 2 x 40 GB of inputs + 10 GB of room
        assert (
            request["CheckpointConfig"]["S3Uri"]
            == "s3://bucket/train/sagemaker/jobs/20261204-101112-abcdef/checkpoints"
        )
        assert request["InputDataConfig"][1]["DataSource"]["S3DataSource"] == {
            "S3DataType": "ManifestFile",
            "S3Uri": f"s3://bucket/train/sagemaker/inputs/{digest}/manifest.json",
            "S3DataDistributionType": "FullyReplicated",
        }
        assert request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3DataType"] == "S3Prefix"
        assert request["HyperParameters"]["gpus"] == "1"  # GPUs per job: the container's processes
    # A manifest names exactly one object: its folder as the prefix, its name as the one suffix.
    assert json.loads(object_manifest(S3Uri("b-1", "train/models/sd 1.5.safetensors"))) == [
        {"prefix": "s3://b-1/train/models/"},
        "sd 1.5.safetensors",
    ]
    assert json.loads(object_manifest(S3Uri("b-1", "top.ckpt"))) == [{"prefix": "s3://b-1/"}, "top.ckpt"]
    four = replace(_job(tmp_path), params={"gpus": 4}, instance_type="sagemaker:ml.g5.12xlarge")
    request = create_request(
        name="tm-x-2", job=four, choice=parse_instance_type(four.instance_type), settings=settings,
        layout=layout, channels={"model": ChannelSource(layout.channel(digest))}, input_bytes=1,
    )  # fmt: skip
    assert (
        request["HyperParameters"]["gpus"] == "4"
        and request["ResourceConfig"]["InstanceType"] == "ml.g5.12xlarge"
    )
    assert volume_size_gb(0, 30) == 30 and volume_size_gb(100 << 30, 30) == 210


def test_statuses_map_onto_ours_and_events_move_the_job() -> None:
    assert our_state("Starting")[0] == "preparing" and our_state("Downloading")[0] == "preparing"
    assert our_state("Training") == ("training", "training")
    assert our_state("Uploading")[0] == "saving"
    assert our_state("Interrupted")[0] == "training" and "spot" in our_state("Interrupted")[1]
    assert our_state("SomethingNew") == ("", "somethingnew")
    summary = summarize(
        [{"kind": "cloud", "state": "training", "phase": "training", "secondary": "Training"}], []
    )
    assert (
        summary.stepped and not summary.final_saved and summary.progress["cloud"]["secondary"] == "Training"
    )
    summary = summarize([{"kind": "cloud", "state": "saving", "phase": "uploading the LoRA"}], [])
    assert summary.final_saved and summary.progress["phase"] == "uploading the LoRA"
    assert not summarize([{"kind": "cloud", "state": "preparing", "phase": "x"}], []).stepped


def test_aws_errors_become_hints() -> None:
    quota = ClientError(
        {"Error": {"Code": "ResourceLimitExceeded", "Message": "The account-level service limit is 0"}},
        "CreateTrainingJob",
    )
    error = explain(quota, "creating SageMaker training job x")
    assert error.code == "ResourceLimitExceeded" and "Service Quotas" in str(error.hint)
    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "CreateTrainingJob")
    assert "iam:PassRole" in str(explain(denied, "creating").hint)
    local = explain(
        OSError(errno.EDQUOT, "Disk quota exceeded"), "writing the job's config"
    )  # not AWS's quota
    assert local.code == "OSError" and "AWS error" not in local.message and "Disk quota" in local.message
    assert "Service Quotas" not in str(local.hint) and "on this machine" in local.message
    assert "no free instance" in failure_hint(
        "CapacityError: Unable to provision requested ML compute capacity"
    )
    assert "image" in failure_hint("ClientError: Cannot pull image from ECR")
    assert "log" in failure_hint("AlgorithmError: the trainer failed")


def test_a_missing_region_fails_the_start_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from kohya_backend.jobs.sagemaker import _boto3_client
    from kohya_backend.jobs.sagemaker_request import SageMakerError

    for key in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    with pytest.raises(SageMakerError) as caught:
        _boto3_client("sagemaker")
    assert "AWS_DEFAULT_REGION" in str(caught.value.hint)
