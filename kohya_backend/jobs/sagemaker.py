"""The SageMaker runner: trains jobs as SageMaker training jobs through the scheduler's Runner interface.

Instance types: `sagemaker:<type>` and `sagemaker:<type>:spot` (sagemaker_catalog lists them). start() returns
at once; a SageMakerSession thread per job uploads its inputs (content-addressed, nothing twice), creates the
training job and mirrors it into the job folder, so the scheduler's event ingestion, progress, settling and
delivery work as for local jobs. After a restart, attach() follows the training job named in run.json again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kohya_backend.errors import ConfigIssue, TrainManagementError
from kohya_backend.jobs.runner import RUN_NAME, RunHandle, RunStatus, read_json
from kohya_backend.jobs.sagemaker_catalog import RUNNER_NAME, check_config, choices, parse_instance_type
from kohya_backend.jobs.sagemaker_request import SageMakerError
from kohya_backend.jobs.sagemaker_session import AwsClients, SageMakerOptions, SageMakerSession
from kohya_backend.jobs.sagemaker_settings import SageMakerSettings, load_sagemaker_settings
from kohya_backend.jobs.store import Job
from kohya_backend.storage.client import S3Client
from kohya_backend.storage.uri import S3Uri


class NotConfigured(TrainManagementError):
    """SageMaker jobs need a role, an image and an S3 prefix, and one of them is not set."""

    http_status = 409


def _boto3_client(service: str) -> Any:
    """A boto3 client from the standard chain (credentials, region, AWS_ENDPOINT_URL) with standard retries."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise SageMakerError(
            "SageMaker jobs need the boto3 package, which is not installed in this Python environment",
            "pip install boto3 (requirements.txt pins the version this project is tested with)",
        ) from exc

    from botocore.exceptions import NoRegionError

    config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=60)
    try:
        return boto3.session.Session().client(service, config=config)
    except NoRegionError as exc:
        raise SageMakerError(
            f"no AWS region is set for {service}",
            "set AWS_DEFAULT_REGION (or `region` in ~/.aws/config) to the region of your ECR image and role",
        ) from exc


class SageMakerRunner:
    """Runs jobs as SageMaker training jobs (see the module doc); one SageMakerSession thread per running job.

    `prefix()` gives the app's S3 prefix (it may change, e.g. the WebUI setting) and `s3()` its S3 client;
    `sagemaker` and `logs` are boto3 clients (default: made on first use from boto3's standard chain).
    """

    name = RUNNER_NAME
    reads_s3 = True  # s3:// models and datasets become channels as they are (nothing is downloaded here)

    def __init__(
        self,
        settings: SageMakerSettings,
        *,
        prefix: Callable[[], S3Uri | None],
        s3: Callable[[], S3Client],
        sagemaker: Any = None,
        logs: Any = None,
        options: SageMakerOptions | None = None,
    ) -> None:
        self.settings = settings
        self.prefix = prefix
        self.s3 = s3
        self.options = options or SageMakerOptions()
        self._sagemaker = sagemaker
        self._logs = logs
        self._sessions: dict[str, SageMakerSession] = {}
        self._lock = threading.Lock()
        self._pending = True  # queued jobs may be waiting (a restart): look once

    @classmethod
    def for_home(
        cls,
        home_root: Path,
        *,
        prefix: Callable[[], S3Uri | None],
        s3: Callable[[], S3Client],
        role_arn: str | None = None,
        image_uri: str | None = None,
    ) -> SageMakerRunner:
        """The runner of a home: `role_arn` / `image_uri` (flags, WebUI settings) or HOME/cloud.toml's."""
        return cls(
            load_sagemaker_settings(home_root, role_arn=role_arn, image_uri=image_uri), prefix=prefix, s3=s3
        )

    def configure(
        self, *, role_arn: str | None = None, image_uri: str | None = None, home_root: Path
    ) -> None:
        """Take new settings (the WebUI's changed); running jobs keep theirs."""
        self.settings = load_sagemaker_settings(home_root, role_arn=role_arn, image_uri=image_uri)

    def _clients(self) -> AwsClients:
        with self._lock:
            if self._sagemaker is None:
                self._sagemaker = _boto3_client("sagemaker")
            if self._logs is None:
                self._logs = _boto3_client("logs")
            return AwsClients(self._sagemaker, self._logs, self.s3())

    # -- placing --------------------------------------------------------------------------------------------

    def _ready(self) -> S3Uri:
        """The S3 prefix, once role, image and prefix are all set; NotConfigured saying what is missing."""
        missing = self.settings.missing()
        prefix = self.prefix()
        if prefix is None:
            missing.append("--s3-uri")
        if missing or prefix is None:
            raise NotConfigured(
                f"SageMaker is not set up: {', '.join(missing)} not given",
                "pass `serve --s3-uri s3://bucket/prefix --sagemaker-role-arn ARN --sagemaker-image-uri URI`, set "
                "them in Settings > Train Management, or write them into HOME/cloud.toml (README: AWS setup)",
            )
        return prefix

    def check_instance_type(self, instance_type: str) -> None:
        """Refuse an unknown instance type, or any while SageMaker is not set up."""
        parse_instance_type(instance_type)
        self._ready()
        self._pending = True

    def check_gpus(self, instance_type: str, gpus: int) -> None:
        """Refuse more GPUs per job than the instance type has (its processes train data-parallel on them)."""
        spec = parse_instance_type(instance_type).spec
        if gpus > spec.gpus:
            raise TrainManagementError(
                f"the job asks for {gpus} GPUs, but {spec.name} has {spec.gpus}",
                f"ask for at most {spec.gpus}, or choose an instance type with {gpus} GPUs "
                "(`sagemaker instance-types` lists them)",
            )

    def check_config(self, instance_type: str, fm_type: str, values: Mapping[str, Any]) -> list[ConfigIssue]:
        """What Format says about a formatted config on this instance type (bf16, GPU memory)."""
        return check_config(parse_instance_type(instance_type), fm_type, values)

    def place(self, job: Job) -> str | None:
        """A job starts on SageMaker at once (SageMaker queues or refuses it itself)."""
        return job.instance_type

    def may_place(self) -> bool:
        """True once after each submission or resume (and after a restart): only then may a job wait here."""
        pending, self._pending = self._pending, False
        return pending

    # -- the Runner interface -------------------------------------------------------------------------------

    def start(self, job: Job, *, resume: bool, device: str | None = None) -> RunHandle:
        """Start a session for `job` (uploads, CreateTrainingJob, following); returns at once."""
        choice = parse_instance_type(job.instance_type)
        prefix = self._ready()
        return self._launch(job, prefix, choice.name, resume=resume)

    def _launch(self, job: Job, prefix: S3Uri, instance_type: str, *, resume: bool) -> RunHandle:
        session = SageMakerSession(
            job,
            clients=self._clients(),
            settings=self.settings,
            prefix=prefix,
            choice=parse_instance_type(instance_type),
            options=self.options,
            resume=resume,
        )
        with self._lock:
            old = self._sessions.get(job.id)
            if old is not None:
                old.stop_requested.set()
            self._sessions[job.id] = session
        session.start()
        return RunHandle(job.id, self.name, 0, 0, 0.0, instance_type)

    def poll(self, handle: RunHandle) -> RunStatus:
        """Alive while the session runs; then its outcome (exit code 0/2, or `lost` with the reason)."""
        with self._lock:
            session = self._sessions.get(handle.job_id)
        if session is None:
            return RunStatus(False, None, lost="the SageMaker runner lost track of this job; resume it")
        if session.outcome is None:
            if session.is_alive():
                return RunStatus(True)
            return RunStatus(False, None, lost="the SageMaker runner stopped following this job; resume it")
        return session.outcome

    def cancel(self, handle: RunHandle, *, grace_s: float) -> None:
        """StopTrainingJob (sent by the session; SageMaker gives the container 120 s to save its state)."""
        with self._lock:
            session = self._sessions.get(handle.job_id)
        if session is not None:
            session.cancel_requested.set()

    def attach(self, job: Job) -> RunHandle | None:
        """After a restart: follow the training job run.json names again (None when none was created)."""
        record = read_json(job.folder / RUN_NAME) or {}
        if record.get("runner") != RUNNER_NAME or not isinstance(record.get("training_job"), str):
            return None
        return self._launch(job, self._ready(), job.instance_type, resume=False)

    def close(self) -> None:
        """Stop following (training jobs go on; a new runner re-attaches to them)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.stop_requested.set()
        for session in sessions:
            session.join(30)

    # -- listings -------------------------------------------------------------------------------------------

    def instance_types(self) -> list[dict[str, Any]]:
        """Every GPU instance type, on-demand and spot, once SageMaker is set up; one entry saying what is missing
        when it is half set up; none when it is not mentioned at all."""
        try:
            self._ready()
        except NotConfigured as exc:
            if not self.settings.mentioned:
                return []
            return [
                {
                    "name": RUNNER_NAME,
                    "kind": RUNNER_NAME,
                    "label": "SageMaker: not set up",
                    "state": "error",
                    "error": str(exc),
                    "devices": [],
                }
            ]
        return [choice.entry() for choice in choices()]
