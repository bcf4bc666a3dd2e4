"""A disk that fills up during a state save: the error says so and where, the previous state stays usable, and
the job's reason tells the user to free space before resuming. ENOSPC is simulated in the writers (no tiny
filesystem is needed): a file whose writes fail once a few kilobytes are written, and safetensors' own error."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import kohya_backend.train.state as state
from kohya_backend.errors import TrainingError
from kohya_backend.jobs.scheduler import _error_text
from kohya_backend.train.state import latest_state, list_states, load_training_state, save_training_state


class _FillingFile(io.FileIO):
    """A file on a disk with `room` bytes left: writes beyond them fail with ENOSPC, as the kernel's would."""

    room = 4096

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _full_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    if "w" in mode and "b" in mode:
        return _FillingFile(path, "w")
    return open(path, mode, *args, **kwargs)


def _run() -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(0)
    network = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    network(torch.randn(4, 64)).pow(2).mean().backward()
    optimizer.step()  # the optimizer now holds state larger than the disk's room
    return network, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _save(state_dir: Path, step: int, run: tuple[torch.nn.Module, Any, Any]) -> Path:
    network, optimizer, scheduler = run
    return save_training_state(
        state_dir, step=step, epoch=0, batches_done_in_epoch=step, network=network, optimizer=optimizer,
        lr_scheduler=scheduler, config_toml='output_name = "x"\n', keep_last=2,
    )  # fmt: skip


def _assert_disk_full(error: TrainingError, state_dir: Path) -> None:
    assert error.message.startswith(f"no space left on device in {state_dir}")
    assert "state-00000001" in error.message  # the previous state is named as kept
    assert "inline_container" not in str(error) and "PytorchStreamWriter" not in str(error)
    assert error.hint is not None and "free space" in error.hint and "resume" in error.hint


def test_a_full_disk_during_a_state_save_keeps_the_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run()
    state_dir = tmp_path / "out" / "demo-state"
    first = _save(state_dir, 1, run)
    monkeypatch.setattr(state, "open", _full_open, raising=False)  # the torch files of the next save
    with pytest.raises(TrainingError) as failed:
        _save(state_dir, 2, run)
    _assert_disk_full(failed.value, state_dir)
    assert list_states(state_dir) == [first] and latest_state(state_dir) == first
    assert sorted(p.name for p in state_dir.iterdir()) == [first.name]  # no half-written folder left
    monkeypatch.undo()
    network, optimizer, scheduler = _run()
    assert load_training_state(first, network=network, optimizer=optimizer, lr_scheduler=scheduler).step == 1
    # What the job shows: the trainer's error and its hint, as the scheduler words a failed job's reason.
    reason = _error_text({"error": {"message": failed.value.message, "hint": failed.value.hint}}, {})
    assert reason is not None and "no space left on device" in reason and "free space" in reason


def test_safetensors_running_out_of_space_is_told_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run()
    state_dir = tmp_path / "demo-state"
    first = _save(state_dir, 1, run)

    def full(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(state, "save_model", full)
    with pytest.raises(TrainingError) as failed:
        _save(state_dir, 2, run)
    _assert_disk_full(failed.value, state_dir)
    assert list_states(state_dir) == [first]


def test_other_write_errors_keep_their_own_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(state, "open", denied, raising=False)
    with pytest.raises(TrainingError, match="could not save the training state") as failed:
        _save(tmp_path / "s", 1, _run())
    assert "no space" not in str(failed.value)
