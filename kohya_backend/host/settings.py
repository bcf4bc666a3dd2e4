"""The extension's WebUI settings (one section in the Training category) and the folders they lead to.

The adapter turns each SettingSpec into the WebUI's OptionInfo; everything that reads, checks or combines the
values lives here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

from kohya_backend.errors import TrainManagementError

SECTION_ID = "train_management"
SECTION_LABEL = "Train Management"
SECTION_CATEGORY = "training"
DEFAULT_HOME_NAME = "train_management"
MAX_CONCURRENCY = 8

HOME = "train_management_home"
LORA_SUBFOLDER = "train_management_lora_subfolder"
UNLOAD_MODEL = "train_management_unload_model"
KEEP_EPOCHS = "train_management_keep_epochs"
CONCURRENCY = "train_management_concurrency"
STALL_MINUTES = "train_management_stall_minutes"
MAX_STALL_MINUTES = 240
S3_PREFIX = "train_management_s3_prefix"
SAGEMAKER_ROLE_ARN = "train_management_sagemaker_role_arn"
SAGEMAKER_IMAGE_URI = "train_management_sagemaker_image_uri"


@dataclass(frozen=True)
class SettingSpec:
    """One setting: its key, default, label, widget kind ('text', 'checkbox', 'slider') and the widget's args.

    `reload` is True when a change takes effect only after Reload UI (the folders); the others apply at once.
    """

    key: str
    default: Any
    label: str
    kind: str
    info: str = ""
    component_args: dict[str, Any] = field(default_factory=dict)
    reload: bool = False


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        HOME,
        "",
        "Home folder (datasets, jobs and the job database)",
        "text",
        info=f"empty: {DEFAULT_HOME_NAME}/ in the WebUI's data folder; --train-home overrides it",
        reload=True,
    ),
    SettingSpec(
        LORA_SUBFOLDER,
        "",
        "Subfolder of the Lora folder for finished LoRAs",
        "text",
        info="empty: the Lora folder itself",
        reload=True,
    ),
    SettingSpec(
        UNLOAD_MODEL,
        True,
        "Unload the WebUI's model before a training starts on this machine",
        "checkbox",
        info="frees its GPU memory for the trainer; the next generation loads it again",
    ),
    SettingSpec(
        KEEP_EPOCHS,
        False,
        "Keep intermediate epochs in the Lora folder",
        "checkbox",
        info="off: only the final LoRA is delivered",
    ),
    SettingSpec(
        CONCURRENCY,
        1,
        "Trainings at once per GPU (or on the CPU)",
        "slider",
        component_args={"minimum": 1, "maximum": MAX_CONCURRENCY, "step": 1},
    ),
    SettingSpec(
        STALL_MINUTES,
        15,
        "Minutes without progress before a training is shown as stalled",
        "slider",
        info="loading and caching do not count; a stalled training is stopped at once when cancelled",
        component_args={"minimum": 1, "maximum": MAX_STALL_MINUTES, "step": 1},
    ),
    SettingSpec(
        S3_PREFIX,
        "",
        "S3 prefix (its models/ and datasets/ join the Model and Dataset lists)",
        "text",
        info="s3://bucket/prefix; empty: HOME/cloud.toml's, or none. Credentials come from boto3's standard chain "
        "(AWS_PROFILE, AWS_ACCESS_KEY_ID, an instance role; AWS_ENDPOINT_URL for MinIO)",
    ),
    SettingSpec(
        SAGEMAKER_ROLE_ARN,
        "",
        "SageMaker execution role ARN (with the S3 prefix and the image: SageMaker instance types)",
        "text",
        info="arn:aws:iam::<account>:role/<name>; empty: HOME/cloud.toml's [sagemaker] role_arn (README: AWS setup)",
    ),
    SettingSpec(
        SAGEMAKER_IMAGE_URI,
        "",
        "SageMaker training image URI",
        "text",
        info="the image built from docker/sagemaker/Dockerfile and pushed to ECR; empty: HOME/cloud.toml's",
    ),
)


@dataclass(frozen=True)
class HostSettings:
    """The settings' current values, with the types the backend needs."""

    home: str = ""
    lora_subfolder: str = ""
    unload_model: bool = True
    keep_epochs: bool = False
    concurrency: int = 1
    stall_minutes: int = 15
    s3_prefix: str = ""
    sagemaker_role_arn: str = ""
    sagemaker_image_uri: str = ""

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> HostSettings:
        """Read the settings from the WebUI's option values (missing keys take their defaults)."""
        defaults = {spec.key: spec.default for spec in SETTINGS}

        def get(key: str) -> Any:
            value = values.get(key)
            return defaults[key] if value is None else value

        return cls(
            home=str(get(HOME)).strip(),
            lora_subfolder=str(get(LORA_SUBFOLDER)).strip(),
            unload_model=_as_bool(get(UNLOAD_MODEL)),
            keep_epochs=_as_bool(get(KEEP_EPOCHS)),
            concurrency=_as_count(get(CONCURRENCY)),
            stall_minutes=_as_count(get(STALL_MINUTES), default=15, most=MAX_STALL_MINUTES),
            s3_prefix=str(get(S3_PREFIX)).strip(),
            sagemaker_role_arn=str(get(SAGEMAKER_ROLE_ARN)).strip(),
            sagemaker_image_uri=str(get(SAGEMAKER_IMAGE_URI)).strip(),
        )


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _as_count(value: Any, *, default: int = 1, most: int = MAX_CONCURRENCY) -> int:
    """A whole number in 1..`most` (sliders hand back floats; config.json may hold a string); `default` when it is
    none."""
    try:
        count = int(float(value))
    except (TypeError, ValueError):
        return default
    return min(max(count, 1), most)


def home_folder(flag: str | None, setting: str, data_path: Path) -> Path:
    """The home folder: --train-home, else the setting, else <data_path>/train_management."""
    chosen = (flag or "").strip() or setting.strip()
    if not chosen:
        return Path(data_path) / DEFAULT_HOME_NAME
    path = Path(chosen).expanduser()
    return path if path.is_absolute() else Path(data_path) / path


def lora_folder(lora_root: Path, subfolder: str) -> Path:
    """Where finished LoRAs go: the WebUI's Lora folder, or a subfolder of it (never a path that leaves it)."""
    text = subfolder.strip().rstrip("/\\")
    if not text:
        return Path(lora_root)
    windows = PureWindowsPath(text)
    parts = windows.parts if "\\" in text else Path(text).parts
    if Path(text).is_absolute() or windows.drive or windows.root or ".." in parts:
        raise TrainManagementError(
            f"the Lora subfolder setting {subfolder!r} leaves the Lora folder {lora_root}",
            "give a plain folder name such as 'trained' in Settings > Train Management",
        )
    return Path(lora_root).joinpath(*parts)
