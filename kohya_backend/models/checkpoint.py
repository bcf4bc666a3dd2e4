"""Safe reading of single-file checkpoints (.safetensors, and pickled .ckpt/.pt without running code)."""

from __future__ import annotations

import importlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from kohya_backend.errors import ModelError
from kohya_backend.models.keys import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    check_exists,
    corrupt,
    read_keys,
    read_metadata,
    unsupported,
)
from kohya_backend.models.pickle_keys import split_payload

__all__ = ["PICKLE_SUFFIXES", "SAFETENSORS_SUFFIXES", "read_checkpoint", "read_keys", "read_metadata"]


_CONVERT_HINT = (
    "convert it to .safetensors with a tool you trust, or download the .safetensors release of the model"
)


class _LightningCheckpointCallback:
    """Inert stand-in for `pytorch_lightning...ModelCheckpoint`, which old SD .ckpt files pickle as metadata."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


# Globals the weights-only unpickler may build besides tensors: harmless data holders found in published SD
# .ckpt files (Lightning's checkpoint callback state, numpy scalars for global_step). Nothing here runs code.
def _numpy_scalar() -> Any:
    """numpy's scalar reconstructor: numpy 2 moved it to numpy._core, the WebUI's numpy 1 has it in numpy.core."""
    module = (
        "numpy._core.multiarray"
        if np.lib.NumpyVersion(np.__version__) >= "2.0.0"
        else "numpy.core.multiarray"
    )
    return importlib.import_module(module).scalar


_NP_SCALAR = _numpy_scalar()
_EXTRA_SAFE_GLOBALS: list[Any] = [
    (_LightningCheckpointCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_NP_SCALAR, "numpy.core.multiarray.scalar"),
    (_NP_SCALAR, "numpy._core.multiarray.scalar"),
    np.dtype,
    np.dtypes.Float64DType,
    np.dtypes.Int64DType,
]


def _read_safetensors(path: Path, device: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device=device) as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise corrupt(path, exc) from exc
    return tensors, metadata


def _torch_load(path: Path, device: str) -> Any:
    with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS):
        try:
            return torch.load(path, map_location=device, weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
        # Files in the legacy (pre-zip) torch.save format cannot be memory-mapped.
        return torch.load(path, map_location=device, weights_only=True)


def _read_pickle(path: Path, device: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        loaded = _torch_load(path, device)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"checkpoint {path} was refused: its pickle needs code beyond plain tensors to load "
            f"(it may run arbitrary code), so it was not unpickled. Detail: {str(exc).splitlines()[0]}",
            hint=_CONVERT_HINT,
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise corrupt(path, exc) from exc
    state, metadata = split_payload(loaded, path)
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    return tensors, metadata


def read_checkpoint(path: Path, *, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read every tensor and the string metadata of a checkpoint, never unpickling code.

    .safetensors is memory-mapped; .ckpt/.pt/.pth/.bin go through torch's weights-only unpickler (a nested
    "state_dict" is unwrapped; top-level string entries become metadata). Raises ModelError when the file is
    missing, corrupt, or its pickle asks for code.
    """
    path = Path(path)
    check_exists(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path, device)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, device)
    raise unsupported(path)
