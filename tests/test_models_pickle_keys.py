"""Keys of pickled checkpoints read without torch's unpickler: zip and legacy formats, and nothing ever runs."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kohya_backend.assets.checkpoints import write_checkpoint
from kohya_backend.errors import ModelError
from kohya_backend.models.checkpoint import read_checkpoint
from kohya_backend.models.detect import detect_family
from kohya_backend.models.keys import read_keys, read_metadata
from kohya_backend.models.pickle_keys import pickled_keys_and_metadata


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_keys_and_metadata_of_both_torch_save_formats(tmp_path: Path, zip_format: bool) -> None:
    payload = {
        "state_dict": {"model.diffusion_model.a.weight": torch.ones(2, 3), "cond.x": torch.zeros(4)},
        "global_step": np.int64(7),
        "epoch": 3,
        "note": "trained elsewhere",
    }
    path = tmp_path / "m.ckpt"
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    keys, metadata = pickled_keys_and_metadata(path)
    assert keys == ["model.diffusion_model.a.weight", "cond.x"]
    assert metadata == {"note": "trained elsewhere"}


def test_generated_ckpt_lists_like_torch_reads_it(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "tiny.ckpt", "sd_xl", fmt="ckpt")
    tensors, metadata = read_checkpoint(path)
    assert read_keys(path) == list(tensors) and read_metadata(path) == metadata
    assert detect_family(read_keys(path)) == "sd_xl"


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PWNED",))


def test_a_malicious_pickle_is_walked_but_never_run(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.w": torch.ones(1)}, "x": _Payload()}, path)
    keys, _ = pickled_keys_and_metadata(path)
    assert keys == ["model.diffusion_model.w"]
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    legacy = tmp_path / "evil-legacy.pt"
    legacy.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(ModelError, match="corrupt"):  # a bare pickle is not torch.save's format
        pickled_keys_and_metadata(legacy)
    assert not Path("PWNED").exists()


def test_truncated_and_non_dict_files_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    torch.save({"a": torch.ones(3)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelError, match="corrupt"):
        pickled_keys_and_metadata(path)
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listed)
    with pytest.raises(ModelError, match="not a state dict"):
        pickled_keys_and_metadata(listed)


def test_listing_a_ckpt_imports_no_torch(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "models" / "tiny.ckpt", "sd_1_5", fmt="ckpt")
    code = (
        "import sys\n"
        "from kohya_backend.service.home import Home\n"
        "(entry,) = Home(__import__('pathlib').Path(sys.argv[1])).list_models()\n"
        "print(entry['family'], entry['error'], 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path.parent.parent)], capture_output=True, text=True
    )
    assert out.stdout.split() == ["sd_1_5", "None", "False"], out.stderr
