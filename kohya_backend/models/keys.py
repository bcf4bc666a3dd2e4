"""Tensor names and metadata of a checkpoint without importing torch for .safetensors files.

Listing models and detecting their family happens in the WebUI and the tab at start-up, where importing torch
would be slow (and, in the torch-free Forge-line test venv, impossible): .safetensors headers are read directly,
pickled checkpoints through an unpickler that only walks their structure (models/pickle_keys.py).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from kohya_backend.errors import ModelError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def check_exists(path: Path) -> None:
    """Raise ModelError unless `path` is a file."""
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist or is not a file", hint="check the model path")


def corrupt(path: Path, exc: BaseException) -> ModelError:
    """The error for a checkpoint that cannot be parsed."""
    return ModelError(
        f"checkpoint {path} is truncated or corrupt and cannot be read ({exc})",
        hint="download or copy the file again; compare its size and sha256 with the source",
    )


def unsupported(path: Path) -> ModelError:
    """The error for a file whose extension is no checkpoint format."""
    return ModelError(
        f"checkpoint {path} has an unsupported extension {path.suffix!r}",
        hint=f"use a {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} file",
    )


def _header(path: Path) -> tuple[list[str], dict[str, str]]:
    try:
        with safe_open(str(path), framework="numpy") as fh:
            return list(fh.keys()), dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise corrupt(path, exc) from exc


def _pickled(path: Path) -> tuple[list[str], dict[str, str]]:
    from kohya_backend.models.pickle_keys import pickled_keys_and_metadata

    return pickled_keys_and_metadata(path)


def _read(path: Path) -> tuple[list[str], dict[str, str]]:
    path = Path(path)
    check_exists(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _header(path)
    if suffix in PICKLE_SUFFIXES:
        return _pickled(path)
    raise unsupported(path)


def read_keys(path: Path) -> list[str]:
    """The tensor names of a checkpoint; for .safetensors only the header is read."""
    return _read(path)[0]


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a checkpoint (safetensors header, or top-level strings of a pickle)."""
    return _read(path)[1]
