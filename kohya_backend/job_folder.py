"""The job-folder contract between the trainer (`python -m kohya_backend train --job DIR` writes a job folder) and
everything that reads one (events, progress, remote sessions, delivery, the worker, the tab): the file names, where
outputs go, and the typed records of the events and the result.

Torch-free and import-light: the WebUI process reads job folders with it, and the trainer writes them with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

CONFIG_NAME = "config.toml"  # the canonical config_params the job trains with
EVENTS_NAME = "events.jsonl"  # the trainer's progress events, one JSON object a line
LOG_NAME = "train.log"  # the trainer's console output
RESULT_NAME = "result.json"  # how the trainer ended (ResultRecord)
RUN_NAME = "run.json"  # how the host ran it (process, or remote worker and its job)
OUTPUT_DIR = "output"  # the trainer's output_dir: LoRAs, samples, saved states
SAMPLE_DIR = "sample"  # sample images, under OUTPUT_DIR
LORA_SUFFIX = ".safetensors"
GRID_SUFFIX = "-epochs.png"  # the epoch comparison grid beside the LoRA: <output_name>-epochs.png
STATE_PREFIX = "state-"  # a complete saved state: <output_name>-state/state-NNNNNNNN
STATE_NAME = re.compile(r"^state-(\d{8,})$")


def output_stem(output_name: str | None) -> str:
    """The LoRA's file name without extension: output_name, or "last" when unset (kohya's name)."""
    return output_name or "last"


def state_dir_for(output_dir: Path, output_stem: str) -> Path:
    """The folder save_state writes into for a LoRA named output_stem (also where a job's resume looks)."""
    return output_dir / f"{output_stem}-state"


@dataclass(frozen=True)
class JobFolder:
    """The paths of one job folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def events(self) -> Path:
        return self.root / EVENTS_NAME

    @property
    def log(self) -> Path:
        return self.root / LOG_NAME

    @property
    def result(self) -> Path:
        return self.root / RESULT_NAME

    @property
    def run(self) -> Path:
        return self.root / RUN_NAME

    @property
    def output(self) -> Path:
        return self.root / OUTPUT_DIR

    @property
    def samples(self) -> Path:
        return self.output / SAMPLE_DIR

    def lora(self, output_stem: str) -> Path:
        """The finished LoRA of a job whose output_name is `output_stem`."""
        return self.output / f"{output_stem}{LORA_SUFFIX}"

    def grid(self, output_stem: str) -> Path:
        """The epoch comparison grid the trainer renders when it saved epochs and samples."""
        return self.output / f"{output_stem}{GRID_SUFFIX}"

    def state_dir(self, output_stem: str) -> Path:
        """Where the job's saved training states go."""
        return state_dir_for(self.output, output_stem)

    def has_saved_state(self) -> bool:
        """True when the output folder holds a complete saved training state to resume from."""
        if not self.output.is_dir():
            return False
        return any(
            STATE_NAME.match(p.name) and p.is_dir() for p in self.output.glob(f"*-state/{STATE_PREFIX}*")
        )


# ------------------------------------------------------------------------------------------- the trainer's events
class StartEvent(TypedDict):
    fm_type: str
    output_dir: str
    device: str


class StepEvent(TypedDict):  # may carry extra numbers too (kohya's max-norm logs with scale_weight_norms)
    step: int
    epoch: int
    loss: float
    avg_loss: float
    lrs: list[float]
    it_per_s: float | None
    eta_s: float | None
    total_steps: int
    total_epochs: int


class CachingEvent(TypedDict, total=False):
    what: str  # "latents" or "text"
    done: int
    total: int
    from_disk: int


class WeightsEvent(TypedDict):
    """After the first step: an fp16 file's kept frozen weights upcast to fp32 once, or kept (models/upcast.py)."""

    choice: Literal["upcast", "kept"]
    mode: str  # "auto" (decided by memory), or TRAIN_MANAGEMENT_FROZEN_WEIGHTS's "upcast"/"keep"
    message: str
    stored_gb: float
    fp32_gb: float
    estimated_peak_gb: float
    available_gb: float


class EpochEvent(TypedDict):
    epoch: int
    step: int
    avg_loss: float | None


class SavedEvent(TypedDict):
    path: str
    step: int
    epoch: int
    final: bool


class SampleEvent(TypedDict):
    path: str
    step: int
    epoch: int


class GridEvent(TypedDict):
    path: str  # the epoch comparison grid image
    columns: list[str]


class StateSavedEvent(TypedDict):
    path: str
    step: int
    epoch: int


class DoneEvent(TypedDict):
    step: int
    epoch: int
    output: str
    peak_cuda_gb: float | None


class StoppedEvent(TypedDict):
    step: int
    epoch: int


class MessageEvent(TypedDict, total=False):
    message: str
    hint: str | None


# Every event also carries "t" (unix time) and "kind"; the fields of each kind are the record's.
EVENT_RECORDS: dict[str, Any] = {
    "start": StartEvent,
    "plan": dict,  # the plan's fields (data/plan.TrainingPlan.to_dict)
    "caching": CachingEvent,
    "weights": WeightsEvent,
    "step": StepEvent,
    "epoch": EpochEvent,
    "saved": SavedEvent,
    "sample": SampleEvent,
    "grid": GridEvent,
    "state_saved": StateSavedEvent,
    "done": DoneEvent,
    "stopped": StoppedEvent,
    "error": MessageEvent,
    "warning": MessageEvent,
    "log": MessageEvent,
}
EVENT_KINDS: tuple[str, ...] = tuple(EVENT_RECORDS)


class ErrorRecord(TypedDict):
    message: str
    hint: str | None


class ResultRecord(TypedDict):
    """result.json: how the trainer ended."""

    status: Literal["completed", "stopped", "failed"]
    output: str | None
    step: int
    epoch: int
    error: ErrorRecord | None
