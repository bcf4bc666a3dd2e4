"""Tensor names and string metadata of a pickled checkpoint (.ckpt/.pt/.pth/.bin), read without torch.

Listing models (the WebUI's checkpoint folder, the tab, the API) must not load multi-GB files, must not need torch
(the WebUI's may be too old, the Forge-line test venv has none) and must never run code from a pickle. The
unpickler below resolves every global to an inert placeholder (only OrderedDict is real) and every storage to
None, so nothing is imported or called: it only walks the pickle's structure to find the state dict's keys.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any

from kohya_backend.errors import ModelError

_MAX_PICKLE_BYTES = 256 << 20  # the structure of a state dict; tensor data lives elsewhere in the file


class _Inert:
    """Stands in for any class or function a pickle names: accepts any arguments or state and does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()


class _StructureUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return _Inert

    def persistent_load(self, pid: Any) -> None:
        return None


def _load(handle: IO[bytes]) -> Any:
    return _StructureUnpickler(handle).load()


def _zip_payload(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not names:
            raise ModelError(
                f"checkpoint {path} is a zip without data.pkl", hint="use a torch.save'd state dict"
            )
        info = archive.getinfo(names[0])
        if info.file_size > _MAX_PICKLE_BYTES:
            raise ModelError(f"checkpoint {path} has an implausibly large data.pkl ({info.file_size} bytes)")
        with archive.open(info) as handle:
            return _load(handle)


def _legacy_payload(path: Path) -> Any:
    """torch.save's pre-zip format: magic number, protocol, sys info, then the object (storages follow)."""
    with open(path, "rb") as handle:
        for _ in range(3):
            _load(handle)
        return _load(handle)


def pickled_keys_and_metadata(path: Path) -> tuple[list[str], dict[str, str]]:
    """(tensor names, top-level string entries) of a pickled checkpoint; a nested "state_dict" is unwrapped."""
    try:
        payload = _zip_payload(path) if zipfile.is_zipfile(path) else _legacy_payload(path)
    except ModelError:
        raise
    except Exception as exc:  # any malformed pickle: report it, never crash a listing
        raise ModelError(
            f"checkpoint {path} is truncated or corrupt and cannot be read ({type(exc).__name__}: {exc})",
            hint="download or copy the file again; compare its size and sha256 with the source",
        ) from exc
    state, metadata = split_payload(payload, path)
    keys = [k for k, v in state.items() if isinstance(k, str) and isinstance(v, _Inert)]
    return keys, metadata


def split_payload(payload: Any, path: Path) -> tuple[dict[Any, Any], dict[str, str]]:
    """(state dict, top-level string entries) of what a checkpoint pickled; a nested "state_dict" is unwrapped."""
    if not isinstance(payload, dict):
        raise ModelError(
            f"checkpoint {path} holds a {type(payload).__name__}, not a state dict",
            hint="use a single-file Stable Diffusion checkpoint",
        )
    metadata = {k: v for k, v in payload.items() if isinstance(k, str) and isinstance(v, str)}
    inner = payload.get("state_dict")
    return (inner if isinstance(inner, dict) else payload), metadata
