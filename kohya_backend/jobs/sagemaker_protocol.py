"""What the SageMaker container and the host agree on: channels, hyperparameters, the `/opt/ml` paths, and the
event lines the container prints (the host reads them back from the job's CloudWatch log stream).

SageMaker copies each input channel's S3 prefix to `/opt/ml/input/data/<channel>/`, passes HyperParameters as
strings in `/opt/ml/input/config/hyperparameters.json`, tars `/opt/ml/model/` to `model.tar.gz` after a clean
exit, turns `/opt/ml/output/failure` into the job's FailureReason, and keeps `/opt/ml/checkpoints/` in sync with
the CheckpointConfig prefix (restored there when a managed spot job restarts). Everything here is torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kohya_backend.job_folder import CONFIG_NAME, RESULT_NAME

DEFAULT_ROOT = Path("/opt/ml")
CHECKPOINTS_LOCAL_PATH = "/opt/ml/checkpoints"
# A line the container prints on stdout for each trainer event; everything else in the log is for people.
EVENT_PREFIX = "@train-management-event "
# SageMaker keeps FailureReason to 1024 characters.
MAX_FAILURE_CHARS = 1000

HP_FM_TYPE = "fm_type"
HP_JOB_ID = "job_id"
HP_OUTPUT_NAME = "output_name"
HP_MODEL_NAME = "model_name"  # the host's names of the model and dataset, for the LoRA's sidecar
HP_DATASET_NAME = "dataset_name"
HP_GPUS = "gpus"  # GPUs per job: the container trains data-parallel in this many processes
# Hyperparameters that are not config keys (output_name is both: the config key it names).
RESERVED_HYPERPARAMETERS = frozenset({HP_FM_TYPE, HP_JOB_ID, HP_MODEL_NAME, HP_DATASET_NAME, HP_GPUS})
# The SageMaker Python SDK adds these for its own script mode; a bring-your-own container ignores them.
SDK_HYPERPARAMETER_PREFIX = "sagemaker_"

CONFIG_CHANNEL = "config"
CONFIG_FILE = CONFIG_NAME
# Channel -> the config key whose file or folder it carries.
CHANNEL_KEYS: dict[str, str] = {
    "model": "pretrained_model_name_or_path",
    "dataset": "train_data_dir",
    "reg": "reg_data_dir",
    "weights": "network_weights",
    "prompts": "sample_prompts",
    "tokenizer": "tokenizer_cache_dir",
}
KEY_CHANNELS: dict[str, str] = {key: channel for channel, key in CHANNEL_KEYS.items()}
FOLDER_CHANNELS = frozenset({"dataset", "reg", "tokenizer"})
REQUIRED_CHANNELS = ("model", "dataset", CONFIG_CHANNEL)

RESULT_FILE = RESULT_NAME
# Trainer event fields that hold paths; the container rewrites them to `output/<relative>` (or None).
PATH_FIELDS = ("path", "output")


@dataclass(frozen=True)
class ContainerPaths:
    """The `/opt/ml` tree (or the same tree under another root, for tests and local runs)."""

    root: Path

    @property
    def hyperparameters(self) -> Path:
        """The CreateTrainingJob HyperParameters, every value a string."""
        return self.root / "input" / "config" / "hyperparameters.json"

    @property
    def input_config(self) -> Path:
        """inputdataconfig.json: the channels SageMaker filled."""
        return self.root / "input" / "config" / "inputdataconfig.json"

    @property
    def resource_config(self) -> Path:
        """resourceconfig.json: current_host and hosts."""
        return self.root / "input" / "config" / "resourceconfig.json"

    def channel(self, name: str) -> Path:
        """The folder one input channel was copied into."""
        return self.root / "input" / "data" / name

    @property
    def model(self) -> Path:
        """Tarred to model.tar.gz after a clean exit: the LoRA and its sidecars."""
        return self.root / "model"

    @property
    def failure(self) -> Path:
        """The reason of a failed run (becomes FailureReason)."""
        return self.root / "output" / "failure"

    @property
    def checkpoints(self) -> Path:
        """Synced with the CheckpointConfig prefix: the training state, restored after a spot interruption."""
        return self.root / "checkpoints"


def event_line(event: dict[str, Any]) -> str:
    """The log line that carries one trainer event (JSON on one line after EVENT_PREFIX)."""
    return EVENT_PREFIX + json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def parse_event_line(line: str) -> dict[str, Any] | None:
    """The event an event line carries, or None for any other log line (or a damaged event line)."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(line[len(EVENT_PREFIX) :])
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("kind"), str) else None
