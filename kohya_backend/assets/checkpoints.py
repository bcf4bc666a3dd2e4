"""Seeded random SD 1.5 / SDXL checkpoints in the original single-file layout, for tests, the demo and benchmarks.

Weights come from each module's own initialisation plus small seeded noise (so no two tensors are equal and a
wrong key mapping cannot go unnoticed). Safetensors files are streamed one component at a time, so even the
full-size SDXL model is written without holding the whole checkpoint in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn

from kohya_backend.models.arch import (
    ARCHITECTURE_METADATA_KEY,
    Architecture,
    architecture_for,
    architecture_to_json,
)
from kohya_backend.models.ldm_keys import (
    ComponentTable,
    clip_position_ids_key,
    conversion_tables,
    rule_to_ldm,
)

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
}
_FORMATS = ("safetensors", "ckpt")


def _build(arch: Architecture, index: int) -> nn.Module:
    if index == 0:
        return arch.build_unet()
    if index == 1:
        return arch.build_vae()
    return arch.build_text_encoder(index - 2)


def random_component(arch: Architecture, index: int, seed: int = 0) -> nn.Module:
    """Component `index` (0 UNet, 1 VAE, 2+ text encoders) with seeded random weights, as written to files."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1009 + index)
        module = _build(arch, index)
        with torch.no_grad():
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.02)
    return module.eval()


def random_components(arch: Architecture, seed: int = 0) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    """All components (UNet, VAE, text encoders) of `write_checkpoint(..., seed=seed)` as modules."""
    count = 2 + len(arch.text_encoders)
    modules = [random_component(arch, index, seed) for index in range(count)]
    return modules[0], modules[1], modules[2:]


def _stored(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _position_ids(arch: Architecture) -> Tensor:
    positions = int(arch.text_encoders[0]["max_position_embeddings"])
    return torch.arange(positions, dtype=torch.int64)[None]


def _component_tensors(
    arch: Architecture, table: ComponentTable, module: nn.Module, dtype: torch.dtype
) -> Iterator[tuple[str, Tensor]]:
    state = module.state_dict()
    for rule in table.rules:
        yield rule.ldm, _stored(rule_to_ldm(rule, state), dtype)
    if table.component == "te1":
        yield clip_position_ids_key(arch), _position_ids(arch)


def _header(arch: Architecture, dtype: torch.dtype, metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The safetensors header of the whole file, computed from shapes alone (modules built on meta)."""
    entries: dict[str, object] = {"__metadata__": metadata}
    sizes: list[int] = []
    offset = 0
    for index, table in enumerate(conversion_tables(arch)):
        with init_empty_weights(include_buffers=True):
            module = _build(arch, index)
        for name, tensor in _component_tensors(arch, table, module, dtype):
            nbytes = tensor.numel() * tensor.element_size()
            entries[name] = {
                "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            sizes.append(nbytes)
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw, sizes


def _write_bytes(fh: BinaryIO, tensor: Tensor) -> int:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    fh.write(data.data)
    return data.nbytes


def _write_safetensors(
    path: Path, arch: Architecture, seed: int, dtype: torch.dtype, metadata: dict[str, str]
) -> None:
    header, sizes = _header(arch, dtype, metadata)
    written = 0
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for index, table in enumerate(conversion_tables(arch)):
            module = random_component(arch, index, seed)
            for _name, tensor in _component_tensors(arch, table, module, dtype):
                if _write_bytes(fh, tensor) != sizes[written]:
                    raise RuntimeError(f"tensor {_name} differs in size from the header planned for it")
                written += 1
            del module
        fh.flush()
        os.fsync(fh.fileno())


def _write_ckpt(
    path: Path, arch: Architecture, seed: int, dtype: torch.dtype, metadata: dict[str, str]
) -> None:
    state: dict[str, Tensor] = {}
    for index, table in enumerate(conversion_tables(arch)):
        module = random_component(arch, index, seed)
        state.update(_component_tensors(arch, table, module, dtype))
        del module
    torch.save({"state_dict": state, **metadata}, path)


def write_checkpoint(
    path: Path,
    family: str,
    *,
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    fmt: str = "safetensors",
) -> Path:
    """Write a seeded random checkpoint of `family` ("sd_1_5"/"sd_xl") at `size` in the original layout.

    Keys: model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.* (SD 1.5) or
    conditioner.embedders.0/1.* (SDXL). Non-full sizes carry their architecture as JSON under
    "train_management.architecture" (safetensors metadata, or a top-level string entry of a .ckpt).
    fmt "ckpt" writes {"state_dict": ...} with torch.save. The file appears atomically.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}: use one of {', '.join(_FORMATS)}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported checkpoint dtype {dtype}: use float32, float16 or bfloat16")
    arch = architecture_for(family, size)
    metadata = {"format": "pt"}
    if size != "full":
        metadata[ARCHITECTURE_METADATA_KEY] = architecture_to_json(arch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    try:
        if fmt == "safetensors":
            _write_safetensors(temporary, arch, seed, dtype, metadata)
        else:
            _write_ckpt(temporary, arch, seed, dtype, metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
