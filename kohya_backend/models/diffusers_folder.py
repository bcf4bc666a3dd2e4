"""Base models as kohya also takes them: a diffusers folder (model_index.json with unet/, vae/, text_encoder/,
tokenizer/ and, for SDXL, text_encoder_2/ and tokenizer_2/), or a Hugging Face hub id whose snapshot is already in
the local cache. Nothing is downloaded: a hub id missing from the cache is an error that names the cache.

Only the layout and the weights are read here (torch-free); `models.load` builds the modules.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kohya_backend.errors import FamilyMismatchError, ModelError
from kohya_backend.families import family_for
from kohya_backend.models.detect import FAMILY_NAMES

if TYPE_CHECKING:
    from kohya_backend.models.arch import Architecture

MODEL_INDEX = "model_index.json"
# "org/name" (or just "name") as the hub spells repository ids; anything with more parts is a path
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def is_diffusers_folder(path: Path) -> bool:
    """True for a folder holding model_index.json (the diffusers pipeline layout)."""
    return Path(path).is_dir() and (Path(path) / MODEL_INDEX).is_file()


def looks_like_hub_id(value: str) -> bool:
    """True for text shaped like a hub repository id ("org/name") rather than a file path."""
    return bool(_HUB_ID.fullmatch(value)) and "/" in value and not value.endswith((".safetensors", ".ckpt"))


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def cached_snapshot(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot folder of a hub model (the one refs/main points at), or None when it is not cached.

    Offline by construction: huggingface_hub is asked with local_files_only.
    """
    cache = Path(cache_dir or hub_cache_dir())
    try:
        from huggingface_hub import snapshot_download
    except (
        ImportError
    ):  # the WebUI's environment may lack it: read the cache's layout (refs/main -> snapshot)
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        try:
            snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return snapshot if snapshot.is_dir() else None
    try:
        found = snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True)
    except (FileNotFoundError, ValueError, OSError):  # LocalEntryNotFoundError is a FileNotFoundError
        return None
    return Path(found)


def resolve_model_path(value: str, *, cache_dir: Path | None = None) -> Path:
    """The file or folder a pretrained_model_name_or_path names: a path that exists, else a hub id's cached
    snapshot. ModelError (naming the cache) when neither is there."""
    path = Path(value)
    if path.exists():
        return path
    if looks_like_hub_id(value):
        snapshot = cached_snapshot(value, cache_dir)
        if snapshot is not None:
            return snapshot
        cache = cache_dir or hub_cache_dir()
        raise ModelError(
            f"{value} is neither a file nor a folder here, and the hub model {value} is not in the Hugging Face "
            f"cache {cache} (nothing is downloaded)",
            hint=f"download it once (huggingface-cli download {value}) or point pretrained_model_name_or_path at "
            "a local .safetensors file or diffusers folder",
        )
    raise ModelError(
        f"{value} does not exist", hint="check the path (relative paths start at the working folder)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}", hint="the diffusers folder is incomplete") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object", hint="the diffusers folder is incomplete")
    return data


def detect_folder_family(path: Path) -> str:
    """The family of a diffusers folder ("sd_1_5", "sd_2", "sd_xl", "sd_xl_refiner" or "unknown") from its
    model_index.json and text encoder configs."""
    index = _read_json(Path(path) / MODEL_INDEX)
    parts = {k for k, v in index.items() if isinstance(v, list) and not k.startswith("_")}
    if "unet" not in parts or "vae" not in parts:
        return "unknown"
    if "text_encoder_2" in parts:
        return "sd_xl" if "text_encoder" in parts else "sd_xl_refiner"
    if "text_encoder" not in parts:
        return "unknown"
    te = _read_json(Path(path) / "text_encoder" / "config.json")
    hidden = int(te.get("hidden_size", 768))
    return "sd_2" if hidden == 1024 else "sd_1_5"


def check_folder_family(path: Path, fm_type: str) -> str:
    """Check that a diffusers folder is of the chosen FM type; returns the family (raises like check_family)."""
    family = detect_folder_family(path)
    if family == fm_type:
        return family
    if family in ("sd_1_5", "sd_xl"):
        raise FamilyMismatchError(
            f"model {Path(path).name} is an {FAMILY_NAMES[family]} diffusers folder but FM type {fm_type} was chosen",
            hint=f"choose {family} or another model",
        )
    raise ModelError(
        f"model {Path(path).name} is an {FAMILY_NAMES.get(family, family)} diffusers folder, which this trainer "
        "does not train",
        hint=f"choose an {FAMILY_NAMES[fm_type]} model",
    )


def _clean(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def folder_architecture(path: Path, family: str) -> Architecture:
    """The architecture a diffusers folder's own configs describe."""
    from kohya_backend.models.arch import Architecture

    path = Path(path)
    unet = _clean(_read_json(path / "unet" / "config.json"))
    vae = _clean(_read_json(path / "vae" / "config.json"))
    known = family_for(family)
    names = ["text_encoder", *(f"text_encoder_{n + 1}" for n in range(1, known.text_encoder_count))]
    text_encoders = tuple(_clean(_read_json(path / name / "config.json")) for name in names)
    scale = float(vae.get("scaling_factor") or known.latent_scale)
    return Architecture(family, unet, vae, text_encoders, scale, known.resolution)


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of one component: safetensors (plain, else fp16 variant, sharded or not), else .bin."""
    for pattern in ("*.safetensors.index.json", "*.bin.index.json"):
        for index in sorted(folder.glob(pattern)):
            if ".fp16." in index.name and len(list(folder.glob(pattern))) > 1:
                continue
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            return [folder / name for name in shards]
    for suffix in (".safetensors", ".bin"):
        files = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
        plain = [p for p in files if ".fp16." not in p.name]
        if plain or files:
            return (plain or files)[:1]
    return []


def read_component(folder: Path) -> dict[str, Any]:
    """One component's tensors (memory-mapped safetensors; a .bin read with torch's weights-only loader)."""
    files = _weight_files(folder)
    if not files:
        raise ModelError(
            f"{folder} has no weights (.safetensors or .bin)",
            hint="the diffusers folder is incomplete: download or convert it again",
        )
    import torch
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return state


def fit_text_encoder_keys(state: dict[str, Any], expected: set[str]) -> dict[str, Any]:
    """Match a text encoder file's key names to the module's: transformers 5 saves CLIPTextModel without the
    "text_model." level that older files (and the hub's) have."""
    if set(state) == expected:
        return state
    prefix = "text_model."
    stripped = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    if set(stripped) <= expected:
        return stripped
    added = {
        k if k.startswith(prefix) or k == "text_projection.weight" else prefix + k: v
        for k, v in state.items()
    }
    return added if set(added) <= expected else state
