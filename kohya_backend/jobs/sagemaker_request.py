"""A job as SageMaker sees it: the training job's name, the CreateTrainingJob request, where its objects live
under the app's S3 prefix, what SageMaker's statuses mean for ours, and what its errors mean for the user.

Layout under the prefix: `sagemaker/inputs/<digest>/...` holds the channels (content-addressed: the digest is the
sha256 of the files' names and hashes, so a model or dataset already there is never sent again), including the
manifests of inputs already on S3 (a ManifestFile channel names exactly one object, where an S3Prefix channel on its
key would also copy `x.safetensors.old` beside it), and
`sagemaker/jobs/<job id>/` the job's checkpoints (CheckpointConfig) and outputs (S3OutputPath). Every attempt of a
job (a Resume is a new training job) shares the checkpoint prefix, so it continues from the saved state.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.allocation import gpus_of
from kohya_backend.jobs.sagemaker_catalog import InstanceChoice
from kohya_backend.jobs.sagemaker_protocol import (
    CHECKPOINTS_LOCAL_PATH,
    HP_DATASET_NAME,
    HP_FM_TYPE,
    HP_GPUS,
    HP_JOB_ID,
    HP_MODEL_NAME,
    HP_OUTPUT_NAME,
)
from kohya_backend.jobs.sagemaker_settings import SageMakerSettings
from kohya_backend.jobs.store import Job
from kohya_backend.storage.client import from_aws_sdk
from kohya_backend.storage.uri import S3Uri

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
JOB_ID_TAG = "train-management:job-id"
OUTPUT_NAME_TAG = "train-management:output-name"
MAX_NAME_CHARS = 63
_NAME_SLUG = 24
_GIB = 1 << 30
_VOLUME_ROOM_BYTES = 10 * _GIB  # latents and text caches, states, the LoRA and samples
TERMINAL = frozenset({"Completed", "Failed", "Stopped"})

# SecondaryStatus -> (our state, what the list shows). SageMaker adds statuses over time; unknown ones keep the
# job where it is, showing SageMaker's own word.
_SECONDARY: Mapping[str, tuple[str, str]] = {
    "Pending": ("preparing", "waiting for SageMaker"),
    "Starting": ("preparing", "starting the instance"),
    "LaunchingMLInstances": ("preparing", "starting the instance"),
    "PreparingTrainingStack": ("preparing", "starting the instance"),
    "Downloading": ("preparing", "downloading the inputs"),
    "DownloadingTrainingImage": ("preparing", "downloading the training image"),
    "Restarting": ("preparing", "restarting after an interruption"),
    "Training": ("training", "training"),
    "Interrupted": (
        "training",
        "spot interruption: waiting for capacity, then it resumes from its checkpoint",
    ),
    "Uploading": ("saving", "uploading the LoRA"),
    "Stopping": ("", "stopping"),
}


@dataclass(frozen=True)
class JobLayout:
    """Where one job's objects live under the app's S3 prefix."""

    prefix: S3Uri
    job_id: str

    @property
    def inputs(self) -> S3Uri:
        """The content-addressed channels of every job."""
        return self.prefix.child("sagemaker/inputs/")

    @property
    def checkpoints(self) -> S3Uri:
        """CheckpointConfig.S3Uri: the training state, shared by every attempt of the job."""
        return self.prefix.child(f"sagemaker/jobs/{self.job_id}/checkpoints/")

    @property
    def output(self) -> S3Uri:
        """OutputDataConfig.S3OutputPath: <training job>/output/model.tar.gz lands below it."""
        return self.prefix.child(f"sagemaker/jobs/{self.job_id}/output/")

    def channel(self, digest: str) -> S3Uri:
        """The prefix of one content-addressed channel."""
        return self.inputs.child(f"{digest}/")


S3_PREFIX = "S3Prefix"
MANIFEST_FILE = "ManifestFile"


@dataclass(frozen=True)
class ChannelSource:
    """A channel's S3DataSource: every object below a prefix (S3Prefix), or those a manifest object lists."""

    uri: S3Uri
    data_type: str = S3_PREFIX


def object_manifest(uri: S3Uri) -> bytes:
    """A ManifestFile naming exactly the object `uri`: its folder as the prefix, its name as the one suffix (SageMaker
    copies it into the channel's folder under that name)."""
    folder, _, name = uri.key.rpartition("/")
    prefix = f"s3://{uri.bucket}/{folder + '/' if folder else ''}"
    return json.dumps([{"prefix": prefix}, name], ensure_ascii=False).encode("utf-8")


def channel_digest(files: Iterable[tuple[str, str, int]]) -> str:
    """The content address of a channel: sha256 of its (relative path, sha256, size) lines, sorted."""
    lines = sorted(f"{rel}\0{sha}\0{size}\n" for rel, sha, size in files)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def training_job_name(job: Job, attempt: int) -> str:
    """`tm-<output name>-<job id>-<attempt>`: unique per job and attempt (SageMaker never reuses a name), valid
    for SageMaker (letters, digits and '-', at most 63 characters) and recognisable in its console."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", job.output_name).strip("-")[:_NAME_SLUG].strip("-")
    tail = re.sub(r"[^A-Za-z0-9]+", "-", f"{job.id}-{attempt}").strip("-")
    name = f"tm-{slug}-{tail}" if slug else f"tm-{tail}"
    return name[-MAX_NAME_CHARS:].lstrip("-")


def volume_size_gb(input_bytes: int, minimum_gb: int) -> int:
    """The training volume: the inputs twice (the channels, and the caches made from them) plus room."""
    return max(minimum_gb, math.ceil((2 * input_bytes + _VOLUME_ROOM_BYTES) / _GIB))


def create_request(
    *,
    name: str,
    job: Job,
    choice: InstanceChoice,
    settings: SageMakerSettings,
    layout: JobLayout,
    channels: Mapping[str, ChannelSource],
    input_bytes: int,
) -> dict[str, Any]:
    """The CreateTrainingJob arguments of one attempt of `job`."""
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": settings.max_runtime_s}
    if choice.spot:
        stopping["MaxWaitTimeInSeconds"] = max(settings.spot_max_wait_s, settings.max_runtime_s)
    hyper = {
        HP_FM_TYPE: job.fm_type,
        HP_OUTPUT_NAME: job.output_name,
        HP_JOB_ID: job.id,
        HP_MODEL_NAME: job.model[:2500],
        HP_DATASET_NAME: job.dataset[:2500],
        HP_GPUS: str(gpus_of(job.params)),
    }
    return {
        "TrainingJobName": name,
        "HyperParameters": hyper,
        "AlgorithmSpecification": {"TrainingImage": settings.image_uri, "TrainingInputMode": "File"},
        "RoleArn": settings.role_arn,
        "InputDataConfig": [
            {
                "ChannelName": channel,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": source.data_type,
                        "S3Uri": str(source.uri),
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "InputMode": "File",
            }
            for channel, source in sorted(channels.items())
        ],
        "OutputDataConfig": {"S3OutputPath": str(layout.output).rstrip("/")},
        "ResourceConfig": {
            "InstanceType": choice.spec.name,
            "InstanceCount": 1,
            "VolumeSizeInGB": volume_size_gb(input_bytes, settings.min_volume_gb),
        },
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": choice.spot,
        "CheckpointConfig": {
            "S3Uri": str(layout.checkpoints).rstrip("/"),
            "LocalPath": CHECKPOINTS_LOCAL_PATH,
        },
        "Tags": [
            {"Key": JOB_ID_TAG, "Value": job.id},
            {"Key": OUTPUT_NAME_TAG, "Value": re.sub(r"[^\w.:/=+\-@ ]", "_", job.output_name)[:256]},
        ],
    }


def our_state(secondary: str) -> tuple[str, str]:
    """(our state or '' to stay, the phase shown) for a SageMaker SecondaryStatus."""
    return _SECONDARY.get(secondary, ("", secondary.lower() or "waiting for SageMaker"))


def status_message(description: Mapping[str, Any]) -> str:
    """The StatusMessage of the newest SecondaryStatusTransition ('' when there is none)."""
    transitions = description.get("SecondaryStatusTransitions") or []
    return str(transitions[-1].get("StatusMessage") or "") if transitions else ""


class SageMakerError(TrainManagementError):
    """SageMaker (or CloudWatch Logs) refused or failed a request; `code` is its error code."""

    def __init__(self, message: str, hint: str | None = None, *, code: str = "") -> None:
        super().__init__(message, hint)
        self.code = code

    def details(self) -> dict[str, object]:
        return {"code": self.code} if self.code else {}


_QUOTA_HINT = (
    "ask for more in Service Quotas (Amazon SageMaker: '<instance type> for training job usage', or '... for spot "
    "training job usage' for spot), wait for other training jobs to end, or pick another instance type"
)
_DENIED_HINT = (
    "the credentials need sagemaker:CreateTrainingJob, DescribeTrainingJob, StopTrainingJob and AddTags, "
    "logs:DescribeLogStreams and GetLogEvents, S3 read/write on the prefix, and iam:PassRole on the execution role "
    "(README: AWS setup)"
)
_RETRYABLE = frozenset(
    {"ThrottlingException", "Throttling", "ServiceUnavailable", "InternalFailure", "RequestTimeout"}
)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore error ('' for others)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Code") or "")
    return ""


def is_retryable(exc: BaseException) -> bool:
    """Network trouble or throttling: worth trying again after a pause."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import ReadTimeoutError

    return isinstance(exc, (BotoConnectionError, ReadTimeoutError)) or error_code(exc) in _RETRYABLE


def explain(exc: BaseException, action: str) -> SageMakerError:
    """A SageMakerError for a failed request: what failed, AWS's code and message, and what to do."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return SageMakerError(
            f"{action}: no AWS credentials were found",
            "set AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) and AWS_DEFAULT_REGION",
            code=type(exc).__name__,
        )
    code = error_code(exc)
    if not code and not from_aws_sdk(
        exc
    ):  # a failure on this machine ("Disk quota exceeded" is not AWS's quota)
        return SageMakerError(
            f"{action} failed on this machine: {type(exc).__name__}: {exc}",
            "see the host's log; resume the job to try again",
            code=type(exc).__name__,
        )
    response = getattr(exc, "response", None)
    text = str((response.get("Error") or {}).get("Message") or "") if isinstance(response, dict) else str(exc)
    where = f"{action}: {text}" if text else action
    if code == "ResourceLimitExceeded" or "quota" in text.lower():
        return SageMakerError(f"{where} (AWS error {code or 'quota'})", _QUOTA_HINT, code=code)
    if (
        code in ("AccessDeniedException", "AccessDenied", "UnrecognizedClientException")
        or "not authorized" in text
    ):
        return SageMakerError(f"{where} (AWS error {code})", _DENIED_HINT, code=code)
    if code == "ValidationException":
        return SageMakerError(
            f"{where} (AWS error {code})",
            "check the role ARN, the image URI and that the instance type exists in this region",
            code=code,
        )
    return SageMakerError(
        f"{where} (AWS error {code or type(exc).__name__})",
        "check the network, the region (AWS_DEFAULT_REGION) and the credentials; resume the job to try again",
        code=code or type(exc).__name__,
    )


def failure_hint(reason: str) -> str:
    """What to do about a training job's FailureReason."""
    text = reason.lower()
    if "capacity" in text:
        return "SageMaker had no free instance of this type: try again later, another instance type or region"
    if "resourcelimitexceeded" in text or "quota" in text:
        return _QUOTA_HINT
    if "image" in text or "ecr" in text or "cannotpullcontainer" in text:
        return "check --sagemaker-image-uri (pushed to ECR in this region?) and that the role may pull it"
    if "accessdenied" in text or "access denied" in text or "not authorized" in text:
        return _DENIED_HINT
    return "the job's log (from CloudWatch) shows what happened; fix it, then resume or submit the job again"
