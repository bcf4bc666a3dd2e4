"""The epoch comparison grid rendered by a real run of the tiny model, and the state a job saves after every
epoch (train --job), on the loop the trainer uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kohya_backend.assets.checkpoints import write_checkpoint
from kohya_backend.assets.dataset import write_demo_dataset
from kohya_backend.assets.tokenizer import write_tiny_tokenizer
from kohya_backend.config.validate import validate_config
from kohya_backend.lora.save import load_lora
from kohya_backend.train.epoch_grid import CELL_PX, LABEL_PX, PROMPT_PX, epoch_columns
from kohya_backend.train.events import EventLog, read_events
from kohya_backend.train.loop import Trainer
from kohya_backend.train.state import list_states


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    write_tiny_tokenizer(root / "tokenizer")
    return {
        "tokenizer": root / "tokenizer",
        "model": write_checkpoint(root / "sd15.safetensors", "sd_1_5", size="tiny", seed=0),
        "data": write_demo_dataset(root / "data", count=4, size=(64, 64)),
    }


def _config(assets: dict[str, Path], out: Path, **overrides: object):
    values: dict[str, object] = {
        "pretrained_model_name_or_path": str(assets["model"]),
        "tokenizer_cache_dir": str(assets["tokenizer"]),
        "train_data_dir": str(assets["data"]),
        "output_dir": str(out),
        "output_name": "g",
        "caption_extension": ".txt",
        "resolution": "64,64",
        "enable_bucket": False,
        "train_batch_size": 4,
        "network_dim": 4,
        "network_alpha": 4,
        "optimizer_type": "AdamW",
        "unet_lr": 5e-2,
        "text_encoder_lr": 1e-3,
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "save_precision": "float",
        "seed": 3,
    }
    values.update(overrides)
    return validate_config(values, "sd_1_5")


def _cell(grid: Image.Image, row: int, col: int) -> np.ndarray:
    left, top = PROMPT_PX + col * CELL_PX, LABEL_PX + row * CELL_PX
    return np.asarray(grid.crop((left, top, left + CELL_PX, top + CELL_PX)), dtype=np.int16)


def test_a_run_that_saved_epochs_renders_the_grid_beside_its_lora(assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 3 --d 11\nsomething else --w 64 --h 64 --s 3\n")
    config = _config(
        assets, tmp_path / "out", max_train_epochs=3, save_every_n_epochs=1,
        sample_prompts=str(prompts), sample_every_n_epochs=3,
    )  # fmt: skip
    trainer = Trainer(config, events=EventLog(tmp_path / "events.jsonl", console=None))
    result = trainer.run()
    grid_path = tmp_path / "out" / "g-epochs.png"
    assert grid_path.is_file()
    columns = [c.label for c in epoch_columns(tmp_path / "out", "g", result.output)]
    assert columns == ["base model (no LoRA)", "epoch 1", "epoch 2", "final"]
    with Image.open(grid_path) as grid:
        grid.load()
    assert grid.size == (PROMPT_PX + 4 * CELL_PX, LABEL_PX + 2 * CELL_PX)
    for row in (0, 1):
        base, first, final = (_cell(grid, row, col) for col in (0, 1, 3))
        assert np.abs(base - final).mean() > 1.0  # the LoRA changes the picture
        assert np.abs(first - final).mean() > 0.1  # and an earlier epoch is not the final one
        assert base.std() > 1.0  # a picture, not an empty cell
    grid_events = [e for e in read_events(tmp_path / "events.jsonl") if e["kind"] == "grid"]
    assert grid_events == [
        {**grid_events[0], "path": str(grid_path), "columns": columns}
    ]  # one grid, after the final save
    # The network is left with the final weights (the grid loaded the epochs into it, then put them back).
    final, _ = load_lora(result.output)
    for key, value in trainer.s.network.kohya_state_dict().items():
        torch.testing.assert_close(value.cpu().float(), final[key], rtol=0, atol=0)


def test_a_grid_that_cannot_be_drawn_warns_and_leaves_the_run_completed_with_its_weights(assets, tmp_path):
    # An epoch file the grid cannot read (here: a damaged one left in the output folder) stops the grid, not the
    # run: the LoRA is already saved, and the network goes back to the final weights and full strength.
    out = tmp_path / "out"
    out.mkdir()
    (out / "g-000009.safetensors").write_bytes(b"not a safetensors file")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --d 5\n")
    config = _config(
        assets, out, max_train_epochs=2, save_every_n_epochs=1, sample_prompts=str(prompts),
        sample_every_n_epochs=2,
    )  # fmt: skip
    trainer = Trainer(config, events=EventLog(tmp_path / "events.jsonl", console=None))
    result = trainer.run()
    assert result.output is not None and result.output.is_file()
    assert not (out / "g-epochs.png").exists()
    events = read_events(tmp_path / "events.jsonl")
    [warning] = [e for e in events if e["kind"] == "warning" and "epoch comparison grid" in e["message"]]
    assert "was not rendered" in warning["message"]
    assert [e["kind"] for e in events][-1] == "done" and not [e for e in events if e["kind"] == "grid"]
    final, _ = load_lora(result.output)
    for key, value in trainer.s.network.kohya_state_dict().items():
        torch.testing.assert_close(value.cpu().float(), final[key], rtol=0, atol=0)
    assert trainer.s.network.multiplier == 1.0


def test_no_grid_without_saved_epochs_or_without_prompts(assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --d 1\n")
    no_epochs = _config(assets, tmp_path / "a", max_train_epochs=2, sample_prompts=str(prompts),
                        sample_every_n_epochs=2)  # fmt: skip
    Trainer(no_epochs, events=EventLog(None, console=None)).run()
    no_prompts = _config(assets, tmp_path / "b", max_train_epochs=2, save_every_n_epochs=1)
    Trainer(no_prompts, events=EventLog(None, console=None)).run()
    assert not list(tmp_path.glob("*/g-epochs.png"))


def test_a_job_saves_its_state_after_every_epoch(assets, tmp_path):
    for each, out in ((True, tmp_path / "job"), (False, tmp_path / "cli")):
        config = _config(assets, out, max_train_epochs=3, save_state=True)
        Trainer(config, events=EventLog(None, console=None), state_each_epoch=each).run()
        steps = [int(p.name.split("-")[1]) for p in list_states(out / "g-state")]
        # 10 steps per epoch (4 images x 10 repeats, batch 4); the newest 2 states are kept: epoch 2 and the end
        assert steps == ([20, 30] if each else [30]), (each, steps)


def test_delivery_looks_for_the_grid_under_the_name_the_trainer_writes() -> None:
    from kohya_backend.jobs import delivery
    from kohya_backend.train import epoch_grid

    assert delivery.GRID_SUFFIX == epoch_grid.GRID_SUFFIX
