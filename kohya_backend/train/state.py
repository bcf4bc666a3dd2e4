"""Self-sufficient saved training state: config, progress, RNG, optimizer, scheduler and network weights.

Each state is one folder `state-{step:08d}` that appears only when complete (written under a temporary name,
fsynced, then renamed), so a crash mid-save never leaves a folder that `latest_state` would pick.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from kohya_backend.errors import TrainingError
from kohya_backend.fileio import fsync_dir
from kohya_backend.job_folder import CONFIG_NAME
from kohya_backend.job_folder import STATE_NAME as _STATE_NAME
from kohya_backend.job_folder import STATE_PREFIX as STATE_PREFIX

STATE_FORMAT = 1
TEMP_PREFIX = ".tmp-state-"
PROGRESS_FILE = "train_state.json"
CONFIG_FILE = CONFIG_NAME  # the config a state was trained with, as a job folder holds it
NETWORK_FILE = "network.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
SCALER_FILE = "grad_scaler.pt"  # only in states of fp16 runs (the loss scale and its growth tracker)


@dataclass
class TrainingProgress:
    """Where a saved run stood: the step and epoch to continue from, and the config it was trained with."""

    step: int
    epoch: int
    batches_done_in_epoch: int
    config_toml: str
    extra: dict = field(default_factory=dict)


def rng_states() -> dict[str, Any]:
    """Every random stream training draws from (python, numpy, torch CPU, CUDA), loadable with weights_only."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` captured; CUDA states only when the same number of GPUs is present."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np_saved = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_saved["bit_generator"],
            "state": {"key": np_saved["key"].numpy().astype(np.uint32), "pos": np_saved["pos"]},
            "has_gauss": np_saved["has_gauss"],
            "gauss": np_saved["gauss"],
        }
    )
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def _fsync_files(folder: Path) -> None:
    for item in folder.iterdir():
        with item.open("rb") as handle:
            os.fsync(handle.fileno())


def _save_torch(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so that a failed write raises OSError with its errno (ENOSPC) rather than
    torch's own "PytorchStreamWriter failed writing file" error."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def _no_space(exc: BaseException | None) -> bool:
    """Whether a failed write failed for want of disk space (or quota): OSError's errno, or the text of
    safetensors' own error, in the exception or the one it arose from (torch's writer, failing on a file whose
    write raised, reports "unexpected pos" with the OSError as its context)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _write_state_files(
    folder: Path,
    *,
    network: torch.nn.Module,
    optimizer: Any,
    lr_scheduler: Any,
    config_toml: str,
    progress: dict,
    grad_scaler: Any,
) -> None:
    save_model(network, str(folder / NETWORK_FILE), force_contiguous=True)
    _save_torch(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    _save_torch(lr_scheduler.state_dict(), folder / SCHEDULER_FILE)
    if grad_scaler is not None:
        _save_torch(grad_scaler.state_dict(), folder / SCALER_FILE)
    _save_torch(rng_states(), folder / RNG_FILE)
    (folder / CONFIG_FILE).write_text(config_toml, encoding="utf-8")
    # Written last: a folder without this file is never a valid state.
    (folder / PROGRESS_FILE).write_text(json.dumps(progress, indent=2), encoding="utf-8")


def _progress_record(step: int, epoch: int, batches_done_in_epoch: int, extra: dict | None) -> dict:
    record = {
        "format": STATE_FORMAT,
        "step": step,
        "epoch": epoch,
        "batches_done_in_epoch": batches_done_in_epoch,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "extra": extra or {},
    }
    try:
        json.dumps(record)
    except (TypeError, ValueError) as exc:
        raise TrainingError(
            f"the extra training state cannot be saved as JSON: {exc}",
            "pass only numbers, strings, lists, dicts",
        ) from exc
    return record


def save_training_state(
    state_dir: Path,
    *,
    step: int,
    epoch: int,
    batches_done_in_epoch: int,
    network: torch.nn.Module,
    optimizer: Any,
    lr_scheduler: Any,
    config_toml: str,
    extra: dict | None = None,
    keep_last: int | None = None,
    grad_scaler: Any = None,
) -> Path:
    """Write `state_dir/state-{step:08d}` atomically and keep only the newest `keep_last` states.

    `grad_scaler` (fp16 runs): its state is saved too, so a resumed run continues with the same loss scale.
    """
    progress = _progress_record(step, epoch, batches_done_in_epoch, extra)
    state_dir.mkdir(parents=True, exist_ok=True)
    final = state_dir / f"{STATE_PREFIX}{step:08d}"
    temp = state_dir / f"{TEMP_PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        _write_state_files(
            temp,
            network=network,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            config_toml=config_toml,
            progress=progress,
            grad_scaler=grad_scaler,
        )
        _fsync_files(temp)
        fsync_dir(temp)
        if final.exists():
            # Saving the same step again: move the old copy aside first, the new one replaces it whole.
            old = state_dir / f"{TEMP_PREFIX}{step:08d}-replaced-{os.getpid()}"
            final.rename(old)
            temp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            temp.rename(final)
        fsync_dir(state_dir)
    except Exception as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if _no_space(exc):
            kept = latest_state(state_dir)
            raise TrainingError(
                f"no space left on device in {state_dir}: the training state of step {step} was not saved"
                + (f"; the previous one ({kept.name}) is kept" if kept else ""),
                f"free space on the disk of {state_dir}, then resume the job: it continues from the newest "
                "saved state",
            ) from exc
        if not isinstance(exc, OSError):
            raise
        raise TrainingError(
            f"could not save the training state to {final}: {exc}", "check free disk space and permissions"
        ) from exc
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if keep_last is not None:
        rotate_states(state_dir, keep_last=keep_last)
    return final


def _read_progress(path: Path) -> dict | None:
    try:
        record = json.loads((path / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    required = (NETWORK_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, CONFIG_FILE)
    if not all((path / name).is_file() for name in required):
        return None
    return record


def list_states(state_dir: Path) -> list[Path]:
    """Complete state folders in `state_dir`, oldest step first; half-written ones are left out."""
    if not state_dir.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for child in state_dir.iterdir():
        match = _STATE_NAME.match(child.name)
        if match and child.is_dir() and _read_progress(child) is not None:
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_state(state_dir: Path) -> Path | None:
    """The complete state with the highest step in `state_dir`, or None when there is none."""
    states = list_states(state_dir)
    return states[-1] if states else None


def rotate_states(state_dir: Path, *, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete states and leftovers of crashed saves; return removed."""
    if keep_last < 1:
        raise TrainingError(
            f"keep_last must be at least 1, got {keep_last}", "keep at least the newest state"
        )
    removed = list_states(state_dir)[:-keep_last]
    removed += [p for p in state_dir.iterdir() if p.name.startswith(TEMP_PREFIX) and p.is_dir()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_training_state(
    path: Path, *, network: torch.nn.Module, optimizer: Any, lr_scheduler: Any, grad_scaler: Any = None
) -> TrainingProgress:
    """Restore network, optimizer, scheduler, RNG (and the fp16 loss scaler, when both the run and the state have
    one) from a saved state and return where training stood."""
    record = _read_progress(path)
    if record is None:
        raise TrainingError(
            f"{path} is not a complete saved training state (missing or broken {PROGRESS_FILE} or state files)",
            "resume from another state-* folder, or start without resume",
        )
    if record.get("format") != STATE_FORMAT:
        raise TrainingError(
            f"{path} was saved in state format {record.get('format')}, this trainer reads {STATE_FORMAT}",
            "resume with the trainer version that saved it, or start without resume",
        )
    try:
        load_model(network, str(path / NETWORK_FILE), strict=True)
        optimizer.load_state_dict(_load_torch(path / OPTIMIZER_FILE))
        lr_scheduler.load_state_dict(_load_torch(path / SCHEDULER_FILE))
        if grad_scaler is not None and (path / SCALER_FILE).is_file():
            grad_scaler.load_state_dict(_load_torch(path / SCALER_FILE))
        rng = _load_torch(path / RNG_FILE)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TrainingError(
            f"the saved state {path} does not fit this training run: {exc}",
            "resume with the same network_dim, network_alpha, optimizer and trained parts as the saved run",
        ) from exc
    set_rng_states(rng)
    return TrainingProgress(
        step=int(record["step"]),
        epoch=int(record["epoch"]),
        batches_done_in_epoch=int(record["batches_done_in_epoch"]),
        config_toml=(path / CONFIG_FILE).read_text(encoding="utf-8"),
        extra=dict(record.get("extra") or {}),
    )
