"""Safe checkpoint reading: safetensors, weights-only pickles, refusal of code-running pickles, corrupt files."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kohya_backend.assets.checkpoints import ARCHITECTURE_METADATA_KEY, write_checkpoint
from kohya_backend.errors import ModelError
from kohya_backend.models.checkpoint import read_checkpoint, read_keys, read_metadata


class _Exploit:
    """A pickle payload that would create a marker file if it were ever unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safetensors_tensors_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}, str(path), metadata={"k": "v"})
    tensors, metadata = read_checkpoint(path)
    assert torch.equal(tensors["a"], torch.arange(6.0).reshape(2, 3))
    assert metadata == {"k": "v"}
    assert sorted(read_keys(path)) == ["a", "b"]
    assert read_metadata(path) == {"k": "v"}


def test_ckpt_state_dict_is_unwrapped_and_strings_become_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3), "step": 5}, "global_step": 7, "note": "hello"}, path)
    tensors, metadata = read_checkpoint(path)
    assert list(tensors) == ["w"] and torch.equal(tensors["w"], torch.ones(3))
    assert metadata == {"note": "hello"}
    assert read_keys(path) == ["w"]


def test_plain_state_dict_pt_and_legacy_format(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.full((2,), 3.0)}, path, _use_new_zipfile_serialization=False)
    tensors, _ = read_checkpoint(path)
    assert torch.equal(tensors["w"], torch.full((2,), 3.0))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(ModelError) as info:
        read_checkpoint(path)
    assert not marker.exists()
    text = str(info.value)
    assert "evil.ckpt" in text and "refused" in text and ".safetensors" in text
    # Listing only walks the pickle's structure: the keys come back, and still nothing ran.
    assert read_keys(path) == ["w"]
    assert not marker.exists()


def test_lightning_callback_and_numpy_scalars_are_allowed(tmp_path: Path) -> None:
    """Published SD .ckpt files pickle Lightning's ModelCheckpoint state and numpy scalars next to the weights."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.best_model_score = 0.5

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]
    for name in names[:2]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    path = tmp_path / "lightning.ckpt"
    try:
        payload = {"state_dict": {"w": torch.ones(2)}, "callbacks": {ModelCheckpoint: ModelCheckpoint()}}
        payload["epoch"] = np.float64(3.0)
        torch.save(payload, path)
    finally:
        for name in names:
            sys.modules.pop(name, None)
    tensors, _ = read_checkpoint(path)
    assert torch.equal(tensors["w"], torch.ones(2))


def test_truncated_safetensors_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"cut\.safetensors is truncated or corrupt"):
        read_checkpoint(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelError, match="truncated or corrupt"):
        read_keys(path)


def test_corrupt_ckpt_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(10000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match=r"cut\.ckpt is truncated or corrupt"):
        read_checkpoint(path)


def test_non_dict_pickle_missing_file_and_extension(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(ModelError, match="holds a list"):
        read_checkpoint(path)
    with pytest.raises(ModelError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.safetensors")
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match="unsupported extension"):
        read_keys(other)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_generated_checkpoint_is_readable(tmp_path: Path, fmt: str) -> None:
    path = write_checkpoint(tmp_path / f"tiny.{fmt}", "sd_1_5", fmt=fmt, dtype=torch.float16, seed=2)
    tensors, metadata = read_checkpoint(path)
    assert ARCHITECTURE_METADATA_KEY in metadata
    assert tensors["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert not list(tmp_path.glob("*.partial"))
    same = write_checkpoint(tmp_path / f"again.{fmt}", "sd_1_5", fmt=fmt, dtype=torch.float16, seed=2)
    again, _ = read_checkpoint(same)
    assert all(torch.equal(again[k], v) for k, v in tensors.items())
