"""What the tab and the API do with jobs beyond submit (no torch): queue positions, the exact-resume default, the
speed and ETA of a resumed job, Duplicate, Continue training, and a chosen epoch's `<lora:...>` prompt."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tomlkit
from PIL import Image
from safetensors.numpy import save_file

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.delivery import GRID_SIDECAR, deliver
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job
from kohya_backend.service.app import build_service
from kohya_backend.service.training import CONTINUED_DIR, Submission, TrainingService

CONFIG = """\
caption_extension = ".txt"
resolution = "64,64"
enable_bucket = false
train_batch_size = 2
max_train_epochs = 3
network_dim = 4
mixed_precision = "no"
output_name = "{name}"
"""


def _no_links(source: object, target: object) -> None:
    """os.link where the Lora folder is on another disk than the home."""
    raise OSError(18, "Invalid cross-device link")


def _make_dataset(service: TrainingService) -> None:
    """The four-image dataset `shapes` the jobs here train on."""
    subset = service.home.datasets / "shapes" / "2_shape"
    subset.mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (64, 64), (index * 60, 10, 10)).save(subset / f"{index}.png")
        (subset / f"{index}.txt").write_text("shape\n")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TrainingService]:
    service = build_service(tmp_path / "home")
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x.weight"]
    save_file(
        {k: np.zeros((1,), dtype=np.float32) for k in keys}, str(service.home.models / "sd15.safetensors")
    )
    _make_dataset(service)
    yield service
    service.scheduler.stop()


def _submit(service: TrainingService, name: str, config: str = CONFIG) -> Job:
    return service.submit(Submission("sd15.safetensors", "shapes", "sd_1_5", config.format(name=name)))


def _completed(service: TrainingService, job: Job, *, epochs: int = 0, state: bool = False) -> Path:
    """Make `job` look like a finished local run: output files as the trainer writes them, delivered."""
    output = job.folder / "output"
    output.mkdir(parents=True, exist_ok=True)
    for epoch in range(1, epochs + 1):
        (output / f"{job.output_name}-{epoch:06d}.safetensors").write_bytes(b"epoch %d" % epoch)
    (output / f"{job.output_name}.safetensors").write_bytes(b"final")
    if state:
        saved = output / f"{job.output_name}-state" / "state-00000012"
        saved.mkdir(parents=True)
        (saved / "train_state.json").write_text(json.dumps({"step": 12}))
    for status in (JobStatus.PREPARING, JobStatus.TRAINING, JobStatus.SAVING):
        service.store.transition(job.id, status, status.value)
    delivered = service.home.lora / f"{job.output_name}.safetensors"
    delivered.write_bytes(b"final")
    service.store.update_progress(job.id, {"delivered": str(delivered), "it_per_s": 3.5, "eta_s": 40})
    service.store.transition(job.id, JobStatus.COMPLETED, "done")
    return delivered


def test_queued_jobs_show_their_place_in_the_queue(service: TrainingService) -> None:
    first, second, third = (_submit(service, n) for n in ("a", "b", "c"))
    service.cancel(second.id)
    listed = {j["id"]: j["queue_position"] for j in service.list()["jobs"]}
    assert listed == {first.id: 1, second.id: None, third.id: 2}
    service.resume(second.id)  # back in the queue: it keeps its place by submission order
    listed = {j["id"]: j["queue_position"] for j in service.list()["jobs"]}
    assert listed == {first.id: 1, second.id: 2, third.id: 3}


def test_jobs_save_their_training_state_unless_told_not_to(service: TrainingService) -> None:
    job = _submit(service, "saves")
    assert tomlkit.parse(job.config_toml)["save_state"] is True
    off = _submit(service, "nosave", CONFIG + "save_state = false\n")
    assert tomlkit.parse(off.config_toml)["save_state"] is False
    formatted = service.format_config(CONFIG.format(name="x"), "sd_1_5")
    assert "save_state = true" in formatted["toml"]


def test_a_resumed_job_drops_the_last_runs_speed_and_eta(service: TrainingService) -> None:
    job = _submit(service, "again")
    service.store.update_progress(job.id, {"step": 5, "it_per_s": 2.0, "eta_s": 30.0})
    service.cancel(job.id)
    resumed = service.resume(job.id)
    assert resumed["progress"]["it_per_s"] is None and resumed["progress"]["eta_s"] is None
    assert resumed["progress"]["step"] == 5  # where it stood until the trainer reports again


def test_duplicate_gives_the_config_without_server_paths_and_a_free_name(service: TrainingService) -> None:
    job = _submit(service, "orig")
    _submit(service, "orig-copy")  # taken: the duplicate gets the next free name
    copy = service.duplicate(job.id)
    assert {k: copy[k] for k in ("fm_type", "model", "dataset", "instance_type")} == {
        "fm_type": "sd_1_5", "model": "sd15.safetensors", "dataset": "shapes", "instance_type": "local",
    }  # fmt: skip
    doc = tomlkit.parse(copy["config_params"])
    assert doc["output_name"] == "orig-copy-2" and doc["network_dim"] == 4
    assert not {"pretrained_model_name_or_path", "train_data_dir", "output_dir"} & set(doc)
    again = service.submit(Submission("sd15.safetensors", "shapes", "sd_1_5", copy["config_params"]))
    assert again.output_name == "orig-copy-2"


def test_continue_training_starts_from_its_own_copies_of_the_lora_and_the_newest_state(
    service: TrainingService,
) -> None:
    job = _submit(service, "base")
    with pytest.raises(TrainManagementError, match="only a completed job can be continued"):
        service.continue_training(job.id)
    delivered = _completed(service, job, state=True)
    older = job.folder / "output" / "base-state" / "state-00000006"
    older.mkdir()
    (older / "train_state.json").write_text(json.dumps({"step": 6}))
    follow = service.continue_training(job.id)
    doc = tomlkit.parse(follow.config_toml)
    assert follow.output_name == "base-continued" and follow.status is JobStatus.QUEUED
    weights, resume = Path(doc["network_weights"]), Path(doc["resume"])
    start = weights.parent
    assert start.parent == service.home.jobs / CONTINUED_DIR and start.name.startswith("base-continued-")
    assert weights.read_bytes() == b"final" and weights.stat().st_ino == delivered.stat().st_ino  # linked
    assert resume == start / "state-00000012" and json.loads((resume / "train_state.json").read_text()) == {
        "step": 12
    }
    assert sorted(p.name for p in start.iterdir()) == [
        "base.safetensors",
        "state-00000012",
    ]  # the newest only
    assert doc["max_train_epochs"] == 6  # as long again, after the 3 epochs the state holds

    # Deleting the old job and its LoRA leaves the new job all it starts from, now and at a later Resume.
    service.cancel(follow.id)
    service.delete(job.id)
    delivered.unlink()
    assert weights.read_bytes() == b"final" and (resume / "train_state.json").is_file()
    assert service.resume(follow.id)["status"] == "queued"
    again = service.format_config(tomlkit.dumps(doc), "sd_1_5", model="sd15.safetensors", dataset="shapes")
    assert f'network_weights = "{weights.as_posix()}"' in again["toml"]  # a path the API accepts

    plain = _submit(service, "nostate")
    _completed(service, plain)
    doc = tomlkit.parse(service.continue_training(plain.id).config_toml)
    assert "resume" not in doc and doc["max_train_epochs"] == 3
    assert Path(doc["network_weights"]).name == "nostate.safetensors"
    assert Path(doc["network_weights"]).parent.parent == service.home.jobs / CONTINUED_DIR

    gone = _submit(service, "gone")
    _completed(service, gone).unlink()
    with pytest.raises(TrainManagementError, match="no longer in the Lora folder"):
        service.continue_training(gone.id)


def test_a_continued_jobs_copies_go_with_the_last_job_that_names_them(service: TrainingService) -> None:
    job = _submit(service, "first")
    _completed(service, job, state=True)
    follow = service.continue_training(job.id)
    start = Path(tomlkit.parse(follow.config_toml)["network_weights"]).parent
    copy = service.duplicate(follow.id)  # Duplicate keeps network_weights: the new job names the same copy
    twin = service.submit(Submission("sd15.safetensors", "shapes", "sd_1_5", copy["config_params"]))
    for queued in (follow, twin):
        service.cancel(queued.id)
    service.delete(follow.id)
    assert start.is_dir()  # the duplicate still starts from it
    service.delete(twin.id)
    assert not start.exists()


def test_a_continue_that_fails_or_was_left_behind_leaves_no_copies(
    service: TrainingService, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _submit(service, "left")
    delivered = _completed(service, job, state=True)
    root = service.home.jobs / CONTINUED_DIR
    root.mkdir()
    stale, fresh = root / "killed-1", root / "under-way-2"
    for folder in (stale, fresh):
        folder.mkdir()
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    shutil.rmtree(service.home.datasets / "shapes")  # the submission of the new job now fails
    with pytest.raises(TrainManagementError, match="shapes"):
        service.continue_training(job.id)
    assert sorted(p.name for p in root.iterdir()) == ["under-way-2"]  # no copy, no stale folder

    monkeypatch.setattr(os, "link", _no_links)  # another disk: copies instead of links
    _make_dataset(service)
    weights = Path(tomlkit.parse(service.continue_training(job.id).config_toml)["network_weights"])
    assert weights.read_bytes() == b"final" and weights.stat().st_ino != delivered.stat().st_ino


def test_a_chosen_epoch_is_placed_beside_the_lora_for_its_prompt(service: TrainingService) -> None:
    refreshed: list[list[Path]] = []
    service.scheduler.on_delivered = lambda job, paths: refreshed.append(paths)
    job = _submit(service, "ep")
    with pytest.raises(TrainManagementError, match="has no LoRA in the Lora folder"):
        service.lora_prompt(job.id)
    _completed(service, job, epochs=2)
    assert service.epochs(job.id) == [1, 2]
    assert service.lora_prompt(job.id, None, 0.8) == "<lora:ep:0.8>" and refreshed == []
    assert service.lora_prompt(job.id, 2, 1.0) == "<lora:ep-000002:1>"
    placed = service.home.lora / "ep-epochs" / "ep-000002.safetensors"
    assert placed.read_bytes() == b"epoch 2" and refreshed == [[placed]]
    assert service.lora_prompt(job.id, 2, 1.0) == "<lora:ep-000002:1>"  # already there: reused
    assert sorted(p.name for p in placed.parent.iterdir()) == ["ep-000002.safetensors"]
    with pytest.raises(TrainManagementError, match="has no saved epoch 7"):
        service.lora_prompt(job.id, 7)


def test_the_epoch_grid_is_delivered_beside_the_lora(service: TrainingService, tmp_path: Path) -> None:
    job = _submit(service, "gridded")
    output = job.folder / "output"
    output.mkdir(parents=True)
    save_file({"a": np.zeros((1,), dtype=np.float32)}, str(output / "gridded.safetensors"))
    Image.new("RGB", (8, 8)).save(output / "gridded-epochs.png")
    lora_dir = tmp_path / "Lora"
    placed = deliver(service.store.get(job.id), lora_dir)
    assert lora_dir / f"gridded{GRID_SIDECAR}" in placed
    (lora_dir / "gridded-1.epochs.png").write_bytes(
        b"someone else's"
    )  # taken: the delivery goes on without it
    again = deliver(service.store.get(job.id), lora_dir)
    assert lora_dir / "gridded-1.safetensors" in again and (
        lora_dir / "gridded-1.epochs.png"
    ).read_bytes() == (b"someone else's")
