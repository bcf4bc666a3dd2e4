"""Shared test setup: offline hub, deterministic threads."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Trainers started by tests remember model hashes here, not in the user's cache folder.
os.environ.setdefault(
    "TRAIN_MANAGEMENT_HASH_CACHE", os.path.join(tempfile.mkdtemp(prefix="tm-hashes-"), "sha256.json")
)


import pytest


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The demo's tiny SD 1.5 and SDXL checkpoints, its tokenizer and a 64 px captioned dataset, written once."""
    from kohya_backend.assets.checkpoints import write_checkpoint
    from kohya_backend.assets.dataset import write_demo_dataset
    from kohya_backend.assets.tokenizer import write_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny-assets")
    write_tiny_tokenizer(root / "tokenizer")
    return {
        "sd_1_5": write_checkpoint(root / "sd15.safetensors", "sd_1_5", size="tiny", seed=0),
        "sd_xl": write_checkpoint(root / "sdxl.safetensors", "sd_xl", size="tiny", seed=0),
        "tokenizer": root / "tokenizer",
        "data": write_demo_dataset(root / "data", count=4, size=(64, 64)),
    }
