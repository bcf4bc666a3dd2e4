"""The SageMaker session's own bookkeeping against moto's S3 (no SageMaker call is reached): what a host stopping, or
a Cancel, in the middle of the input uploads leaves behind."""

# ruff: noqa: F811  (the moto fixtures are imported from s3_support and named as test arguments)

from __future__ import annotations

from pathlib import Path

from s3_support import moto_url, new_bucket, s3_env  # noqa: F401
from sagemaker_support import IMAGE, ROLE

from kohya_backend.jobs.runner import RESULT_NAME
from kohya_backend.jobs.sagemaker_catalog import parse_instance_type
from kohya_backend.jobs.sagemaker_session import AwsClients, SageMakerOptions, SageMakerSession
from kohya_backend.jobs.sagemaker_settings import SageMakerSettings
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job
from kohya_backend.storage.client import S3Client
from kohya_backend.storage.uri import S3Uri


def _session(tmp_path: Path, bucket: str) -> SageMakerSession:
    inputs = tmp_path / "inputs"
    (inputs / "dataset" / "10_cat").mkdir(parents=True)
    (inputs / "model.safetensors").write_bytes(b"m" * 300_000)
    (inputs / "dataset" / "10_cat" / "a.png").write_bytes(b"p" * 1000)
    folder = tmp_path / "job"
    folder.mkdir()
    config = (
        f'pretrained_model_name_or_path = "{(inputs / "model.safetensors").as_posix()}"\n'
        f'train_data_dir = "{(inputs / "dataset").as_posix()}"\nmax_train_steps = 2\n'
    )
    job = Job(
        id="20261204-101112-abcdef", status=JobStatus.PREPARING, created_at=0.0, updated_at=0.0,
        fm_type="sd_1_5", model="model.safetensors", dataset="dataset", instance_type="sagemaker:ml.g5.xlarge",
        output_name="lora", config_toml=config, params={}, progress={}, reason=None, pid=None, pgid=None,
        heartbeat_at=None, outputs=[], folder=folder,
    )  # fmt: skip
    return SageMakerSession(
        job,
        clients=AwsClients(None, None, S3Client()),
        settings=SageMakerSettings(ROLE, IMAGE),
        prefix=S3Uri(bucket, "train"),
        choice=parse_instance_type(job.instance_type),
        options=SageMakerOptions(),
        resume=False,
    )


def test_a_host_stopping_during_the_uploads_leaves_the_job_to_the_next_host(
    s3_env: str, tmp_path: Path
) -> None:
    session = _session(tmp_path / "stop", new_bucket(s3_env))
    # The host shuts down while the first input is being sent.
    session.clients.s3.client.meta.events.register(
        "before-call.s3.PutObject", lambda **kw: session.stop_requested.set()
    )
    session.run()
    assert session.outcome is None  # no verdict: the restarted host decides (nothing was created yet)
    assert not (session.job.folder / RESULT_NAME).exists()


def test_a_cancel_during_the_uploads_ends_the_job_without_failing_it(s3_env: str, tmp_path: Path) -> None:
    session = _session(tmp_path / "cancel", new_bucket(s3_env))
    session.clients.s3.client.meta.events.register(
        "before-call.s3.PutObject", lambda **kw: session.cancel_requested.set()
    )
    session.run()
    assert session.outcome is not None and session.outcome.lost is not None
    assert "cancelled while uploading" in session.outcome.lost
    assert not (session.job.folder / RESULT_NAME).exists()


def test_the_session_thread_can_be_joined_when_it_ends(s3_env: str, tmp_path: Path) -> None:
    # The runner's close() joins every session; a method of the session named like one of threading.Thread's own
    # (`_stop`, called by join) made each join raise TypeError.
    session = _session(tmp_path / "join", new_bucket(s3_env))
    session.clients.s3.client.meta.events.register(
        "before-call.s3.PutObject", lambda **kw: session.cancel_requested.set()
    )
    session.start()
    session.join(60)
    assert not session.is_alive() and session.outcome is not None
