"""Saved training state: resume restores weights, optimizer, schedule and every random stream exactly."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kohya_backend.errors import TrainingError
from kohya_backend.train.optim import OPTIMIZER_NAMES, create_lr_scheduler, create_optimizer
from kohya_backend.train.state import (
    TrainingProgress,
    latest_state,
    list_states,
    load_training_state,
    rotate_states,
    save_training_state,
)

CONFIG = 'output_name = "demo"\nnetwork_dim = 4\n'


class Run:
    """A tiny real training run: network, optimizer and LR schedule, driven by the global RNG like a trainer."""

    def __init__(self, seed: int, optimizer: str = "AdamW", lr: float = 1e-2, warmup: int = 2) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        self.network = torch.nn.Sequential(torch.nn.Linear(64, 72), torch.nn.Tanh(), torch.nn.Linear(72, 4))
        groups = [
            {"params": list(self.network[0].parameters()), "lr": lr},
            {"params": list(self.network[2].parameters())},
        ]
        self.optimizer = create_optimizer(optimizer, groups, lr=lr, optimizer_args={})
        self.scheduler = create_lr_scheduler(
            "cosine_with_restarts", self.optimizer, warmup_steps=warmup, total_steps=20, num_cycles=2
        )

    def step(self) -> None:
        x = torch.randn(8, 64) + random.random() + float(np.random.rand())
        loss = self.network(x).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.network.parameters()]


def _save(run: Run, state_dir: Path, step: int, **kwargs: object) -> Path:
    return save_training_state(
        state_dir,
        step=step,
        epoch=1 + step // 10,
        batches_done_in_epoch=step % 10,
        network=run.network,
        optimizer=run.optimizer,
        lr_scheduler=run.scheduler,
        config_toml=CONFIG,
        **kwargs,  # type: ignore[arg-type]
    )


def _draws() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_resume_restores_everything_and_continues_identically(tmp_path: Path) -> None:
    original = Run(seed=0)
    for _ in range(3):
        original.step()
    path = _save(original, tmp_path / "state", 3, extra={"loss_window": [0.5, 0.25]})
    assert path.name == "state-00000003"
    saved_params = original.params()
    saved_opt = copy.deepcopy(original.optimizer.state_dict())
    for _ in range(2):
        original.step()
    expected = original.params()

    replay = Run(seed=0)  # the same run again, to see which random numbers follow the save point
    for _ in range(3):
        replay.step()
    next_draws = _draws()

    resumed = Run(seed=123)  # different initial weights and random streams
    assert not all(torch.equal(a, b) for a, b in zip(saved_params, resumed.params()))
    progress = load_training_state(
        path, network=resumed.network, optimizer=resumed.optimizer, lr_scheduler=resumed.scheduler
    )
    assert progress == TrainingProgress(
        step=3, epoch=1, batches_done_in_epoch=3, config_toml=CONFIG, extra={"loss_window": [0.5, 0.25]}
    )
    assert all(torch.equal(a, b) for a, b in zip(saved_params, resumed.params()))
    loaded_opt = resumed.optimizer.state_dict()
    for key, value in saved_opt["state"].items():
        assert torch.equal(value["exp_avg"], loaded_opt["state"][key]["exp_avg"])
        assert torch.equal(value["exp_avg_sq"], loaded_opt["state"][key]["exp_avg_sq"])
    assert resumed.scheduler.last_epoch == 3
    assert _draws() == next_draws  # torch, python and numpy continue where the saved run stood
    load_training_state(
        path, network=resumed.network, optimizer=resumed.optimizer, lr_scheduler=resumed.scheduler
    )
    for _ in range(2):
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed.params()))
    assert resumed.scheduler.get_last_lr() == original.scheduler.get_last_lr()


def test_state_folder_is_self_sufficient(tmp_path: Path) -> None:
    path = _save(Run(seed=0), tmp_path, 7)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "config.toml",
        "network.safetensors",
        "optimizer.pt",
        "rng.pt",
        "scheduler.pt",
        "train_state.json",
    ]
    record = json.loads((path / "train_state.json").read_text())
    assert record["step"] == 7 and record["format"] == 1
    assert (path / "config.toml").read_text() == CONFIG
    # everything loads with torch's safe loader
    for name in ("optimizer.pt", "rng.pt", "scheduler.pt"):
        torch.load(path / name, weights_only=True)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizers_state_survives_a_safe_reload(tmp_path: Path, name: str) -> None:
    lr = 1.0 if name.startswith(("Prodigy", "DAdapt")) else 1e-2
    warmup = (
        0 if name == "DAdaptSGD" else 2
    )  # DAdaptSGD cannot start at rate 0 (config validation refuses it)
    run = Run(seed=0, optimizer=name, lr=lr, warmup=warmup)
    run.step()
    path = _save(run, tmp_path, 1)
    run.step()
    other = Run(seed=5, optimizer=name, lr=lr, warmup=warmup)
    load_training_state(path, network=other.network, optimizer=other.optimizer, lr_scheduler=other.scheduler)
    other.step()
    assert all(torch.equal(a, b) for a, b in zip(run.params(), other.params()))


def test_rotation_keeps_the_newest(tmp_path: Path) -> None:
    run = Run(seed=0)
    leftover = tmp_path / ".tmp-state-00000001-99999"  # a save that crashed in another process
    leftover.mkdir(parents=True)
    for step in (1, 2, 3, 4):
        _save(run, tmp_path, step, keep_last=2)
    assert [p.name for p in list_states(tmp_path)] == ["state-00000003", "state-00000004"]
    assert not leftover.exists()
    removed = rotate_states(tmp_path, keep_last=1)
    assert [p.name for p in removed] == ["state-00000003"]
    with pytest.raises(TrainingError, match="keep_last"):
        rotate_states(tmp_path, keep_last=0)


def test_half_written_states_are_never_picked(tmp_path: Path) -> None:
    run = Run(seed=0)
    good = _save(run, tmp_path, 5)
    (tmp_path / "state-00000009").mkdir()  # crashed before anything was written
    partial = tmp_path / "state-00000008"
    partial.mkdir()
    (partial / "train_state.json").write_text('{"step": 8, "format": 1}')  # weights missing
    torn = tmp_path / "state-00000007"
    torn.mkdir()
    (torn / "train_state.json").write_text('{"step": 7, "for')
    (tmp_path / ".tmp-state-00000010-1").mkdir()
    (tmp_path / "state-notanumber").mkdir()
    assert latest_state(tmp_path) == good
    assert latest_state(tmp_path / "missing") is None
    with pytest.raises(TrainingError, match="not a complete saved training state"):
        load_training_state(partial, network=run.network, optimizer=run.optimizer, lr_scheduler=run.scheduler)


def test_a_failed_save_leaves_no_state_behind(tmp_path: Path) -> None:
    run = Run(seed=0)
    with pytest.raises(AttributeError):
        save_training_state(
            tmp_path,
            step=1,
            epoch=1,
            batches_done_in_epoch=1,
            network=run.network,
            optimizer=run.optimizer,
            lr_scheduler=object(),  # fails after the network and optimizer are already written
            config_toml=CONFIG,
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TrainingError, match="cannot be saved as JSON"):
        _save(run, tmp_path, 2, extra={"bad": object()})
    assert latest_state(tmp_path) is None


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    run = Run(seed=0)
    _save(run, tmp_path, 4, extra={"n": 1})
    run.step()
    path = _save(run, tmp_path, 4, extra={"n": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["state-00000004"]
    other = Run(seed=1)
    progress = load_training_state(
        path, network=other.network, optimizer=other.optimizer, lr_scheduler=other.scheduler
    )
    assert progress.extra == {"n": 2}
    assert all(torch.equal(a, b) for a, b in zip(run.params(), other.params()))


def test_a_state_from_another_network_is_refused(tmp_path: Path) -> None:
    path = _save(Run(seed=0), tmp_path, 1)
    torch.manual_seed(0)
    bigger = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 4))
    optimizer = create_optimizer("AdamW", [{"params": list(bigger.parameters())}], lr=1e-3, optimizer_args={})
    scheduler = create_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=10)
    with pytest.raises(TrainingError, match="does not fit this training run"):
        load_training_state(path, network=bigger, optimizer=optimizer, lr_scheduler=scheduler)
