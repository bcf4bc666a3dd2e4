"""The tab's newer callbacks on the installed gradio line (3.41 in .venv, 4.40 in .venv-gradio4), against real
services on a temporary home: presets and the kohya_ss import, Duplicate, Continue training, a chosen epoch's
prompt for txt2img, the key help, the health report and what a page's poll finds on the server."""

from __future__ import annotations

import ast
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
import tomlkit
from PIL import Image
from safetensors.numpy import save_file

import kohya_backend
from kohya_backend.jobs.states import JobStatus
from kohya_backend.service.app import build_service
from kohya_backend.service.datasets import DatasetService
from kohya_backend.service.presets import PresetStore
from kohya_backend.service.training import Submission, TrainingService
from kohya_backend.ui.compat import SESSION_KEYED, file_input
from kohya_backend.ui.create_job import EDITOR_FIELDS, CreateJobActions
from kohya_backend.ui.dataset_actions import DatasetActions
from kohya_backend.ui.hooks import UiHooks
from kohya_backend.ui.job_views import MAX_SAMPLES
from kohya_backend.ui.presets import PresetActions
from kohya_backend.ui.trainings import TrainingsActions

LOCAL = "this machine (CPU) [local]"
CONFIG = 'caption_extension = ".txt"\nresolution = "64,64"\nenable_bucket = false\nmax_train_epochs = 2\n'
ROW = len(EDITOR_FIELDS)  # where the editor's confirmation row starts in a fill's outputs


def page(name: str = "page-1") -> gr.Request:
    return gr.Request(session_hash=name) if SESSION_KEYED else gr.Request()


def _trainings(service: TrainingService) -> TrainingsActions:
    """The Trainings List's callbacks as the tab binds them (with the editor's, which Duplicate fills)."""
    return TrainingsActions(service, CreateJobActions(service, UiHooks()))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TrainingService]:
    service = build_service(tmp_path / "home")
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x.weight"]
    save_file(
        {k: np.zeros((1,), dtype=np.float32) for k in keys}, str(service.home.models / "sd15.safetensors")
    )
    subset = service.home.datasets / "shapes" / "2_shape"
    subset.mkdir(parents=True)
    for index, colour in enumerate([(200, 10, 10), (10, 200, 10), (10, 10, 200)]):
        Image.new("RGB", (320, 320), colour).save(subset / f"{index}.png")
        (subset / f"{index}.txt").write_text("shape, square\n")
    yield service
    service.scheduler.stop()


def _completed(service: TrainingService, name: str, *, epochs: int = 0) -> str:
    job = service.submit(
        Submission("sd15.safetensors", "shapes", "sd_1_5", CONFIG + f'output_name = "{name}"\n')
    )
    output = job.folder / "output"
    output.mkdir(parents=True)
    for epoch in range(1, epochs + 1):
        (output / f"{name}-{epoch:06d}.safetensors").write_bytes(b"epoch")
    for status in (JobStatus.PREPARING, JobStatus.TRAINING, JobStatus.SAVING):
        service.store.transition(job.id, status, status.value)
    delivered = service.home.lora / f"{name}.safetensors"
    delivered.write_bytes(b"final")
    service.store.update_progress(job.id, {"delivered": str(delivered)})
    service.store.transition(job.id, JobStatus.COMPLETED, "done")
    return job.id


def test_presets_save_load_over_edits_and_delete(service: TrainingService) -> None:
    editor = CreateJobActions(service, UiHooks())
    presets = PresetActions(PresetStore(service.home.root), editor)
    message, choices = presets.save("sdxl portrait", "network_dim = 16\n", "SDXL")
    assert message == "Saved preset **sdxl portrait** (SDXL)." and choices["value"] == "sdxl portrait"
    start = editor.default_config("SD 1.5")
    # Unedited editor: the preset (and its FM type) goes in at once.
    loaded = presets.load("sdxl portrait", "SD 1.5", start, start)
    assert loaded[:3] == ("network_dim = 16\n", "network_dim = 16\n", "SDXL") and loaded[-1].startswith(
        "Loaded"
    )
    assert json.loads(loaded[EDITOR_FIELDS.index("draft_sync")])["fm"] == "sd_xl"
    # The chosen model's family line is judged for the preset's FM type, not left saying it matches.
    info = EDITOR_FIELDS.index("model_info")
    switched = presets.load("sdxl portrait", "SD 1.5", start, start, "sd15.safetensors")
    assert switched[info].startswith(
        "⚠️ **sd15.safetensors** is a **SD 1.5** checkpoint, but FM Type is **SDXL**"
    )
    # Edited editor: asked first; confirming puts the preset in.
    asked = presets.load("sdxl portrait", "SD 1.5", start + "# mine\n", start)
    assert asked[:ROW] == (gr.update(),) * ROW and asked[ROW]["visible"] is True
    assert "preset **sdxl portrait**" in asked[ROW + 1]
    assert editor.apply_fill(asked[ROW + 2])[0] == "network_dim = 16\n"
    asked = presets.load("sdxl portrait", "SD 1.5", start + "# mine\n", start, "sd15.safetensors")
    assert "but FM Type is **SDXL**" in editor.apply_fill(asked[ROW + 2])[info]
    row, question, pending, note = presets.ask_delete("sdxl portrait")
    assert row["visible"] is True and question == "Delete preset **sdxl portrait**?" and note == ""
    assert (
        presets.delete(pending)[3] == "Deleted preset **sdxl portrait**."
        and presets.choices()["choices"] == []
    )
    assert presets.load(None, "SD 1.5", "", "")[-1] == "Choose a preset to load."


def test_a_kohya_ss_preset_is_imported_into_the_editor(service: TrainingService, tmp_path: Path) -> None:
    presets = PresetActions(PresetStore(service.home.root), CreateJobActions(service, UiHooks()))
    component = file_input("preset", file_count="single")

    def uploaded(content: dict[str, Any], name: str = "kohya.json") -> Any:
        preset = tmp_path / name
        preset.write_text(json.dumps(content))
        if SESSION_KEYED:
            from gradio.data_classes import FileData

            return component.preprocess(FileData(path=str(preset), orig_name=name))
        return component.preprocess({"name": str(preset), "is_file": True, "data": None, "orig_name": name})

    few = {"network_dim": 24, "optimizer": "Lion", "output_dir": "/home/me/out", "max_train_epochs": ""}
    upload = uploaded(few)
    filled = presets.import_kohya(upload, "SD 1.5", "", "")
    text, message = filled[0], filled[-1]
    assert dict(tomlkit.parse(text)) == {"network_dim": 24, "optimizer_type": "Lion"} and text.startswith(
        "# Imported from the kohya_ss preset"
    )
    assert message.startswith("Imported 2 key(s) from **kohya.json**. Not imported (1):")
    assert "`output_dir`" in message and "max_train_epochs" not in message
    # a whole GUI preset is read as the GUI reads it, and its `sdxl` checkbox chooses the FM type
    gui = {"LoRA_type": "LyCORIS/LoKr", "sdxl": True, "optimizer": "AdamW", "epoch": 2}
    filled = presets.import_kohya(uploaded(gui, "gui.json"), "SD 1.5", "", "")
    values, fm, message = tomlkit.parse(filled[0]), filled[2], filled[-1]
    assert values["optimizer_type"] == "AdamW" and values["max_train_epochs"] == 2 and fm == "SDXL"
    assert values["network_module"] == "lycoris.kohya" and "algo=lokr" in values["network_args"]
    assert (
        "It is a SDXL preset: FM Type is now SDXL." in message and "read as a kohya_ss GUI config" in message
    )


def test_duplicate_fills_the_form_and_continue_queues_a_new_job(service: TrainingService) -> None:
    editor = CreateJobActions(service, UiHooks())
    trainings = TrainingsActions(service, editor)
    job_id = _completed(service, "first")
    filled = trainings.duplicate(job_id, "", "")
    text, _, fm, instance, model, dataset, info = filled[:7]
    assert tomlkit.parse(text)["output_name"] == "first-copy" and fm == "SD 1.5"
    assert (
        instance["value"] == LOCAL and model["value"] == "sd15.safetensors" and dataset["value"] == "shapes"
    )
    assert "Detected family: **SD 1.5**" in info and "press **Create Training Job**" in filled[-1]
    asked = trainings.duplicate(job_id, "# my edits\n", "")
    assert asked[ROW]["visible"] is True and f"job **{job_id}**'s config" in asked[ROW + 1]
    queued = trainings.continue_training(job_id)
    assert queued.startswith("✅ Job **") and "`first-continued`" in queued and "from its LoRA" in queued
    assert trainings.continue_training(None) == "Select a job first."


def test_the_extension_checks_nothing_with_assert() -> None:
    # `python -O` strips asserts: a runtime check written as one (Duplicate once checked for the editor's actions
    # that way) would silently vanish there.
    package = Path(kohya_backend.__file__).parent
    found = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in sorted(package.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Assert)
    ]
    assert found == []


def test_continue_says_it_starts_from_the_lora_when_no_state_was_saved(service: TrainingService) -> None:
    # A name with "resume" in it is no saved state: the message follows the new job's `resume` key, not its text.
    job_id = _completed(service, "resume-portrait")
    queued = TrainingsActions(service, CreateJobActions(service, UiHooks())).continue_training(job_id)
    assert "`resume-portrait-continued`" in queued and queued.endswith("from its LoRA.")


def test_the_downloads_follow_new_samples_past_the_shown_count(service: TrainingService) -> None:
    job = service.submit(
        Submission("sd15.safetensors", "shapes", "sd_1_5", CONFIG + 'output_name = "many"\n')
    )
    samples = job.folder / "output" / "sample"
    samples.mkdir(parents=True)
    for index in range(MAX_SAMPLES + 1):  # more than the list keeps
        Image.new("RGB", (8, 8), (index, 0, 0)).save(samples / f"many_{index:06d}_00.png")
        os.utime(samples / f"many_{index:06d}_00.png", ns=(index * 10**9, index * 10**9))
    trainings = _trainings(service)
    *_, downloads, _, _, shown = trainings.details(page(), job.id)
    assert downloads[-1] == str(samples / f"many_{MAX_SAMPLES:06d}_00.png")
    newer = samples / "many_999999_00.png"
    Image.new("RGB", (8, 8)).save(newer)
    *_, downloads, _, _, _ = trainings.details(page(), job.id, shown)
    assert downloads != gr.update() and downloads[-1] == str(newer)  # the newest sample is offered


def test_send_to_txt2img_gives_the_chosen_epochs_lora(service: TrainingService) -> None:
    trainings = _trainings(service)
    job_id = _completed(service, "epochs", epochs=2)
    *_, grid, epochs, shown = trainings.details(page(), job_id)
    assert epochs["choices"] == ["final", "epoch 1", "epoch 2"] and grid is None  # no grid: no sample prompts
    # The poll refreshes the job while another one trains: the epoch the user chose is left as it is.
    *_, grid, epochs, _ = trainings.details(page(), job_id, shown)
    assert epochs == gr.update() and grid == gr.update()
    assert trainings.lora_prompt(job_id, "final", 0.7) == (
        "Sent `<lora:epochs:0.7>` to txt2img.",
        "<lora:epochs:0.7>",
    )
    _, prompt = trainings.lora_prompt(job_id, "epoch 2", 1.0)
    assert (
        prompt == "<lora:epochs-000002:1>"
        and (service.home.lora / "epochs-epochs/epochs-000002.safetensors").is_file()
    )
    assert trainings.lora_prompt(None, "final", 1.0) == ("Select a completed job first.", "")


@pytest.mark.parametrize("epoch", ["epoch two", "2", "epoch -1", "epoch 2 ", "final!", 2, ["epoch 1"]])
def test_an_epoch_the_list_never_offers_gets_a_message_not_a_traceback(
    service: TrainingService, epoch: Any
) -> None:
    trainings = _trainings(service)
    job_id = _completed(service, "crafted", epochs=2)
    message, prompt = trainings.lora_prompt(job_id, epoch, 1.0)
    assert message.startswith("❌") and "is not an epoch of the job" in message and prompt == ""
    assert "choose 'final' or one of its saved epochs" in message


def test_an_epoch_not_saved_or_a_weight_that_is_no_number_is_refused(service: TrainingService) -> None:
    trainings = _trainings(service)
    job_id = _completed(service, "weights", epochs=2)
    message, prompt = trainings.lora_prompt(job_id, "epoch 7", 1.0)
    assert "has no saved epoch 7" in message and prompt == ""
    for weight in ("heavy", "nan", float("inf"), [1]):
        message, prompt = trainings.lora_prompt(job_id, "final", weight)
        assert message.startswith("❌") and "is not a number" in message and prompt == "", weight
    assert trainings.lora_prompt(job_id, "epoch 1", "-0.5")[1] == "<lora:weights-000001:-0.5>"
    assert trainings.lora_prompt(job_id, None, None)[1] == "<lora:weights:1>"


def test_key_help_shows_the_reference_of_a_key(service: TrainingService) -> None:
    editor = CreateJobActions(service, UiHooks())
    assert editor.key_help("network_alpha").startswith("**`network_alpha`**")
    assert "not implement" in editor.key_help("deepspeed")
    assert editor.key_help(None).startswith("Choose a key")


def test_the_health_report_runs_in_the_background_and_reaches_the_page(service: TrainingService) -> None:
    actions = DatasetActions(DatasetService(service.home, jobs=service.store), UiHooks())
    started, ticket = actions.health(page(), "shapes", "512 (SD 1.5)")
    assert started.startswith("⏳ Checking the health of **shapes**") and ticket
    deadline = time.monotonic() + 60
    while True:
        shown: Any = actions.finished(page(), "", "", ticket)
        if shown[6] == "":
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    health = shown[3]
    assert health.startswith("**Health of shapes** at 512 px: 3 image(s)")
    assert "most common: shape (3), square (3)" in health
    assert actions.health(page(), None, "512 (SD 1.5)") == ("No dataset chosen.", "")


@pytest.mark.skipif(not SESSION_KEYED, reason="gradio 3.41 pages send their values as inputs")
def test_each_page_finds_its_own_values_on_the_server(service: TrainingService) -> None:
    trainings = _trainings(service)
    first, second = _completed(service, "one"), _completed(service, "two")
    trainings.details(page("a"), first)
    trainings.details(page("b"), second)
    assert trainings.refresh(page("a"))[2]["value"] == first
    assert trainings.refresh(page("b"))[2]["value"] == second
