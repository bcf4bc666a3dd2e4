"""Where the SageMaker runner's settings come from: `serve --sagemaker-role-arn ARN --sagemaker-image-uri URI`,
the WebUI settings of the same names, or `HOME/cloud.toml` (first given wins). Nothing secret is kept: region and
credentials come from boto3's standard chain. The S3 prefix is the app's (`[s3] uri`, `--s3-uri`); job inputs,
checkpoints and outputs go under `<prefix>/sagemaker/`.

    [sagemaker]
    role_arn = "arn:aws:iam::123456789012:role/TrainManagementSageMaker"
    image_uri = "123456789012.dkr.ecr.us-east-1.amazonaws.com/train-management:latest"
    max_runtime_hours = 24       # StoppingCondition.MaxRuntimeInSeconds
    spot_max_wait_hours = 48     # MaxWaitTimeInSeconds of spot jobs (at least max_runtime_hours)
    min_volume_gb = 30           # the training volume: inputs twice plus room, at least this
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.storage.settings import CLOUD_FILE, read_cloud_section

SECTION = "sagemaker"
KNOWN_KEYS = ("role_arn", "image_uri", "max_runtime_hours", "spot_max_wait_hours", "min_volume_gb")
# botocore's patterns for CreateTrainingJob's RoleArn; TrainingImage is at most 255 characters.
_ROLE_ARN = re.compile(r"arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+")
MAX_IMAGE_CHARS = 255
DEFAULT_MAX_RUNTIME_S = 24 * 3600
DEFAULT_MIN_VOLUME_GB = 30
MAX_RUNTIME_LIMIT_S = 28 * 24 * 3600  # SageMaker's own ceiling for a training job


@dataclass(frozen=True)
class SageMakerSettings:
    """The execution role and image jobs run with, and their limits; `problem` says why it cannot run jobs."""

    role_arn: str = ""
    image_uri: str = ""
    max_runtime_s: int = DEFAULT_MAX_RUNTIME_S
    spot_max_wait_s: int = 2 * DEFAULT_MAX_RUNTIME_S
    min_volume_gb: int = DEFAULT_MIN_VOLUME_GB

    @property
    def configured(self) -> bool:
        """True once a role and an image are set (either alone is a half-done setup)."""
        return bool(self.role_arn and self.image_uri)

    @property
    def mentioned(self) -> bool:
        """True when any SageMaker setting is given (a half-done setup is then shown with what is missing)."""
        return bool(self.role_arn or self.image_uri)

    def missing(self) -> list[str]:
        """What is not set yet, as the flags name it."""
        return [
            name
            for name, value in (
                ("--sagemaker-role-arn", self.role_arn),
                ("--sagemaker-image-uri", self.image_uri),
            )
            if not value
        ]


def check_role_arn(value: str, where: str) -> str:
    """`value` if it is an IAM role ARN SageMaker accepts, else TrainManagementError saying what it looks like."""
    if not _ROLE_ARN.fullmatch(value):
        raise TrainManagementError(
            f"{where}: {value[:200]!r} is not an IAM role ARN",
            "give the SageMaker execution role, e.g. arn:aws:iam::123456789012:role/TrainManagementSageMaker",
        )
    return value


def check_image_uri(value: str, where: str) -> str:
    """`value` if it can be a training image (an ECR image URI), else TrainManagementError."""
    if not value or len(value) > MAX_IMAGE_CHARS or any(c.isspace() for c in value):
        raise TrainManagementError(
            f"{where}: {value[:200]!r} is not a container image URI (at most {MAX_IMAGE_CHARS} characters, no spaces)",
            "give the image you pushed to ECR, e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/train-management:1",
        )
    return value


def _hours(table: dict[str, Any], key: str, default_s: int, path: Path) -> int:
    value = table.get(key)
    if value is None:
        return default_s
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise TrainManagementError(
            f"{path}: [{SECTION}] {key} must be a positive number of hours", f"e.g. {key} = 24"
        )
    seconds = int(float(value) * 3600)
    if seconds > MAX_RUNTIME_LIMIT_S:
        raise TrainManagementError(
            f"{path}: [{SECTION}] {key} = {value} is more than SageMaker's limit of 28 days",
            f"e.g. {key} = 24",
        )
    return seconds


def load_sagemaker_settings(
    home: Path, *, role_arn: str | None = None, image_uri: str | None = None
) -> SageMakerSettings:
    """The settings of a home: `role_arn` / `image_uri` (flags or WebUI settings) when given, else cloud.toml's."""
    path = Path(home) / CLOUD_FILE
    table = read_cloud_section(home, SECTION, KNOWN_KEYS)
    role = (role_arn or "").strip() or str(table.get("role_arn") or "").strip()
    image = (image_uri or "").strip() or str(table.get("image_uri") or "").strip()
    if role:
        check_role_arn(role, "the SageMaker role ARN" if role_arn else f"{path}: [{SECTION}] role_arn")
    if image:
        check_image_uri(image, "the SageMaker image URI" if image_uri else f"{path}: [{SECTION}] image_uri")
    runtime = _hours(table, "max_runtime_hours", DEFAULT_MAX_RUNTIME_S, path)
    wait = _hours(table, "spot_max_wait_hours", 2 * runtime, path)
    if wait < runtime:
        raise TrainManagementError(
            f"{path}: [{SECTION}] spot_max_wait_hours must be at least max_runtime_hours (SageMaker's rule)",
            "e.g. max_runtime_hours = 24 and spot_max_wait_hours = 48",
        )
    volume = table.get("min_volume_gb", DEFAULT_MIN_VOLUME_GB)
    if isinstance(volume, bool) or not isinstance(volume, int) or not 1 <= volume <= 16384:
        raise TrainManagementError(
            f"{path}: [{SECTION}] min_volume_gb must be 1 to 16384", "e.g. min_volume_gb = 30"
        )
    return SageMakerSettings(role, image, runtime, min(wait, MAX_RUNTIME_LIMIT_S), volume)
