"""Playing SageMaker's part around moto's server (aws.md, "Testing without AWS").

moto answers SageMaker and CloudWatch Logs over real HTTP, but runs no container: a created training job reports
Completed at once and writes nothing. The stand-in makes a created job start like SageMaker's (InProgress /
Starting), records what was created, adds StopTrainingJob (moto 5.2.5 lacks it) as SageMaker answers it (the job
goes Stopping), moves jobs through their statuses on moto's backend object (the server runs in this process), and
does what SageMaker does around the container: fills an /opt/ml tree from the channels (S3Prefix or ManifestFile), runs the project's real
entrypoint (the Dockerfile's ENTRYPOINT plus `train`, outside a container), puts its output into the job's
CloudWatch log stream, syncs /opt/ml/checkpoints with the checkpoint prefix and uploads model.tar.gz.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.core.exceptions import JsonRESTError
from moto.sagemaker.models import SageMakerModelBackend, sagemaker_backends
from moto.sagemaker.responses import SageMakerResponse
from s3_support import AWS_ENV, REGION

from kohya_backend.jobs.runner import trainer_env
from kohya_backend.jobs.sagemaker_protocol import parse_event_line
from kohya_backend.jobs.sagemaker_request import LOG_GROUP
from kohya_backend.storage.uri import S3Uri, parse_s3_uri

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "sagemaker" / "Dockerfile"
ROLE = "arn:aws:iam::123456789012:role/TrainManagementSageMaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/train-management:1"


def entrypoint() -> list[str]:
    """The Dockerfile's ENTRYPOINT (exec form), with `python` as this interpreter."""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("ENTRYPOINT "):
            command = json.loads(line[len("ENTRYPOINT ") :])
            return [sys.executable if command[0] == "python" else command[0], *command[1:]]
    raise AssertionError(f"{DOCKERFILE} has no ENTRYPOINT")


def client(service: str, endpoint: str) -> Any:
    """A plain boto3 client on moto's server (what SageMaker's own machinery would use)."""
    return boto3.session.Session().client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


@dataclass
class ContainerRun:
    """A finished run of the entrypoint: its exit code, stdout and stderr lines, and the events it printed."""

    code: int
    stdout: list[str]
    stderr: list[str]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for e in (parse_event_line(line) for line in self.stdout) if e is not None]


@dataclass
class SageMakerStandIn:
    """See the module doc. `created` holds every CreateTrainingJob's arguments as moto received them."""

    endpoint: str
    created: list[dict[str, Any]] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    refuse_next_create: tuple[str, str] | None = None
    refuse_describe: tuple[str, str] | None = None
    _streams: int = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> SageMakerStandIn:
        original = SageMakerModelBackend.create_training_job
        stand_in = self

        def create_training_job(backend: Any, **kwargs: Any) -> Any:
            if stand_in.refuse_next_create is not None:
                code, message = stand_in.refuse_next_create
                stand_in.refuse_next_create = None
                raise JsonRESTError(code, message)
            job = original(backend, **kwargs)
            stand_in.created.append(kwargs)
            job.training_job_status, job.secondary_status = "InProgress", "Starting"
            job.secondary_status_transitions = [_transition("Starting", "Launching requested ML instances")]
            job.training_end_time = None
            return job

        def stop_training_job(response: Any) -> Any:
            from moto.core.responses import ActionResult

            name = response._get_param("TrainingJobName")
            stand_in.stops.append(name)
            stand_in.set_status(name, "Stopping", "Stopping", "Stopping the training job")
            return ActionResult({})

        describe = SageMakerModelBackend.describe_training_job

        def describe_training_job(backend: Any, training_job_name: str) -> Any:
            if stand_in.refuse_describe is not None:
                raise JsonRESTError(*stand_in.refuse_describe)
            return describe(backend, training_job_name)

        monkeypatch.setattr(SageMakerModelBackend, "create_training_job", create_training_job)
        monkeypatch.setattr(SageMakerModelBackend, "describe_training_job", describe_training_job)
        monkeypatch.setattr(SageMakerResponse, "stop_training_job", stop_training_job, raising=False)
        return self

    # -- statuses -------------------------------------------------------------------------------------------

    def job(self, name: str) -> Any:
        return sagemaker_backends[DEFAULT_ACCOUNT_ID][REGION].training_jobs[name]

    def set_status(self, name: str, status: str, secondary: str, message: str = "", **attrs: Any) -> None:
        """Move a training job like SageMaker would (attrs e.g. failure_reason, billable_time_in_seconds)."""
        job = self.job(name)
        job.training_job_status, job.secondary_status = status, secondary
        job.secondary_status_transitions = [
            *job.secondary_status_transitions,
            _transition(secondary, message),
        ]
        job.last_modified_time = datetime.now(timezone.utc)
        for key, value in attrs.items():
            setattr(job, key, value)

    def request(self, name: str) -> dict[str, Any]:
        """The CreateTrainingJob arguments of `name`."""
        return next(r for r in self.created if r["training_job_name"] == name)

    # -- the container's world ------------------------------------------------------------------------------

    def fill_opt_ml(self, name: str, root: Path) -> None:
        """What SageMaker does before the container starts: channels, config files, checkpoints restored."""
        request = self.request(name)
        s3 = client("s3", self.endpoint)
        channels = {}
        for channel in request["input_data_config"]:
            source = channel["DataSource"]["S3DataSource"]
            dest = root / "input" / "data" / channel["ChannelName"]
            if source["S3DataType"] == "ManifestFile":
                _download_manifest(s3, parse_s3_uri(source["S3Uri"]), dest)
            else:
                assert source["S3DataType"] == "S3Prefix", source
                _download_prefix(s3, parse_s3_uri(source["S3Uri"]), dest)
            channels[channel["ChannelName"]] = {
                "TrainingInputMode": "File",
                "S3DistributionType": "FullyReplicated",
            }
        config = root / "input" / "config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "hyperparameters.json").write_text(
            json.dumps(request["hyper_parameters"]), encoding="utf-8"
        )
        (config / "inputdataconfig.json").write_text(json.dumps(channels), encoding="utf-8")
        (config / "resourceconfig.json").write_text(
            json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]})
        )
        checkpoints = request.get("checkpoint_config")
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        if checkpoints:
            _download_prefix(
                s3, parse_s3_uri(checkpoints["S3Uri"] + "/"), root / "checkpoints", missing_ok=True
            )

    def run_container(self, root: Path, *, sigterm_at_step: int | None = None) -> ContainerRun:
        """The real entrypoint on `root` (a subprocess). With `sigterm_at_step`, SIGTERM is sent once that step's
        event is read; the pipe holds one page and nothing is read ahead, so the trainer (blocked on its next
        write) is at most a dozen steps further when the signal arrives."""
        stderr_path = root.parent / f"{root.name}.stderr"
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                [*entrypoint(), "train", "--root", str(root)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                bufsize=0,  # unbuffered: nothing is read ahead of the line being looked at
                env={**trainer_env(None), "OMP_NUM_THREADS": "1"},
            )
            assert process.stdout is not None
            fcntl.fcntl(process.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
            lines = []
            for raw in iter(process.stdout.readline, b""):
                line = raw.decode("utf-8").rstrip("\n")
                lines.append(line)
                event = parse_event_line(line)
                if (
                    sigterm_at_step is not None
                    and event is not None
                    and event["kind"] == "step"
                    and event["step"] >= sigterm_at_step
                ):
                    process.send_signal(signal.SIGTERM)
                    sigterm_at_step = None
            code = process.wait(timeout=300)
        return ContainerRun(code, lines, stderr_path.read_text(encoding="utf-8").splitlines())

    def put_logs(self, name: str, run: ContainerRun) -> str:
        """The container's output as SageMaker sends it: one stream per start, `<job>/algo-1-<epoch seconds>`."""
        logs = client("logs", self.endpoint)
        with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
            logs.create_log_group(logGroupName=LOG_GROUP)
        self._streams += 1
        stream = f"{name}/algo-1-{int(time.time()) + self._streams}"
        logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
        now = int(time.time() * 1000)
        lines = [*run.stdout, *run.stderr]
        for start in range(0, len(lines), 500):
            batch = [
                {"timestamp": now + start + i, "message": m} for i, m in enumerate(lines[start : start + 500])
            ]
            logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream, logEvents=batch)
        return stream

    def sync_checkpoints(self, name: str, root: Path) -> None:
        """/opt/ml/checkpoints to CheckpointConfig.S3Uri (SageMaker keeps them in sync during training)."""
        uri = parse_s3_uri(self.request(name)["checkpoint_config"]["S3Uri"] + "/")
        s3 = client("s3", self.endpoint)
        for path in sorted((root / "checkpoints").rglob("*")):
            if path.is_file():
                rel = path.relative_to(root / "checkpoints").as_posix()
                s3.upload_file(str(path), uri.bucket, uri.child(rel).key)

    def upload_model(self, name: str, root: Path) -> str:
        """/opt/ml/model as <S3OutputPath>/<job>/output/model.tar.gz (after the container exited 0)."""
        archive = root.parent / f"{root.name}-model.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted((root / "model").rglob("*")):
                tar.add(path, arcname=path.relative_to(root / "model").as_posix(), recursive=False)
        artifact = self.job(name).model_artifacts["S3ModelArtifacts"]
        uri = parse_s3_uri(artifact)
        client("s3", self.endpoint).upload_file(str(archive), uri.bucket, uri.key)
        return str(artifact)


def _transition(status: str, message: str) -> dict[str, Any]:
    return {"Status": status, "StartTime": datetime.now(timezone.utc), "StatusMessage": message}


def _download_prefix(s3: Any, uri: S3Uri, dest: Path, *, missing_ok: bool = False) -> None:
    """File mode: every object under the prefix, at its path below the prefix's last '/'."""
    base = uri.key.rsplit("/", 1)[0] + "/" if "/" in uri.key else ""
    found = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.key):
        for item in page.get("Contents") or []:
            target = dest / item["Key"][len(base) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(uri.bucket, item["Key"], str(target))
            found += 1
    if not found and not missing_ok:
        raise AssertionError(f"channel {uri} holds no objects")
    dest.mkdir(parents=True, exist_ok=True)


def _download_manifest(s3: Any, uri: S3Uri, dest: Path) -> None:
    """File mode with a ManifestFile: the manifest (a JSON array: {"prefix": "s3://bucket/folder/"}, then suffixes)
    names the objects; each is copied to its suffix under the channel's folder. A malformed manifest, or one naming
    a missing object, fails the job as SageMaker would."""
    manifest = json.loads(s3.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read())
    assert isinstance(manifest, list) and len(manifest) >= 2, manifest
    assert isinstance(manifest[0], dict) and set(manifest[0]) == {"prefix"}, manifest
    prefix = parse_s3_uri(manifest[0]["prefix"])
    assert prefix.key == "" or prefix.key.endswith("/"), manifest
    for suffix in manifest[1:]:
        assert isinstance(suffix, str) and suffix and not suffix.startswith("/"), manifest
        target = dest / suffix
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(prefix.bucket, prefix.key + suffix, str(target))


def wait_for(predicate: Any, what: str, timeout: float = 90.0) -> Any:
    """Poll `predicate()` until it returns something truthy (no fixed sleeps in assertions)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
