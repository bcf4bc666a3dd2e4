"""Write and read kohya-format LoRA files: tensors in the save precision, string metadata, the hashes the WebUI
and its extensions index LoRAs by, and an atomic write so a failed save never leaves a partial file behind."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from kohya_backend.errors import ConfigError, ConfigIssue, ModelError, TrainManagementError
from kohya_backend.fileio import WriteFn, atomic_write
from kohya_backend.models.hashing import legacy_hash_bytes

SAVE_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
_HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


def _save_dtype(save_precision: str) -> torch.dtype:
    try:
        return SAVE_DTYPES[save_precision]
    except KeyError:
        raise ConfigError(
            [
                ConfigIssue(
                    f"unknown save precision {save_precision!r}",
                    key="save_precision",
                    hint=f"use one of {', '.join(SAVE_DTYPES)}",
                )
            ]
        ) from None


def _check_metadata(metadata: Mapping[str, str]) -> None:
    bad = sorted(k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str))
    if bad:
        raise TrainManagementError(
            f"LoRA metadata values must be strings; not strings: {', '.join(map(str, bad))}",
            hint="build metadata with kohya_backend.lora.metadata.training_metadata",
        )


def tensor_data_hash(file_bytes: bytes) -> str:
    """sha256 of a safetensors file's tensor data: the bytes after the 8-byte length and the JSON header."""
    header_len = int.from_bytes(file_bytes[:8], "little")
    return hashlib.sha256(memoryview(file_bytes)[8 + header_len :]).hexdigest()


def lora_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as kohya computes them: on the file written with ss_* keys only.

    Only the training (ss_*) metadata takes part, so keys a user adds later (or modelspec.*) leave them unchanged.
    """
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors_bytes(dict(tensors), training_only)
    return {"sshs_model_hash": tensor_data_hash(data), "sshs_legacy_hash": legacy_hash_bytes(data)}


def _prepare_tensors(state_dict: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {
        key: value.detach().to(device="cpu", dtype=dtype).contiguous() for key, value in state_dict.items()
    }


def save_lora(
    path: Path,
    state_dict: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    *,
    save_precision: str,
    write: WriteFn | None = None,
) -> Path:
    """Save a kohya LoRA: every tensor (alpha too) in `save_precision`, metadata plus sshs_* hashes, atomically.

    Replaces `path` if it exists (callers choose unique names); an OSError (e.g. disk full) propagates
    after the temp file is removed, and no partial file is left at `path`.
    """
    path = Path(path)
    _check_metadata(metadata)
    tensors = _prepare_tensors(state_dict, _save_dtype(save_precision))
    full = {k: v for k, v in metadata.items() if k not in _HASH_KEYS}
    full.update(lora_hashes(tensors, full))
    data = safetensors_bytes(tensors, full)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, write=write)
    return path


def load_lora(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a LoRA file's tensors (on CPU, stored dtype) and its metadata ({} when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"LoRA file not found: {path}", hint="check network_weights / the Lora folder path")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(
            f"cannot read LoRA file {path}: {exc}",
            hint="the file is not a complete .safetensors file; re-download or re-save it",
        ) from exc
    return tensors, metadata
