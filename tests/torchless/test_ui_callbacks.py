"""The tab's callbacks against a real TrainingService and DatasetService on a temporary home (no torch): format
with issues and plans, family checks, default configs, submissions, the Trainings List and the Datasets area.

Uploads go through the real gr.File component's preprocess of the installed gradio line, so the 3.41 temp-file
objects and the 4.x file paths are both what the callbacks receive in the browser.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from kohya_backend.config.schema import template_toml
from kohya_backend.jobs.states import JobStatus
from kohya_backend.service.app import build_service
from kohya_backend.service.datasets import DatasetService
from kohya_backend.service.training import TrainingService
from kohya_backend.ui.compat import GRADIO_MAJOR, file_input, uploaded_paths
from kohya_backend.ui.create_job import CreateJobActions
from kohya_backend.ui.dataset_actions import DatasetActions
from kohya_backend.ui.hooks import UiHooks
from kohya_backend.ui.trainings import TrainingsActions

CONFIG = """\
caption_extension = ".txt"
resolution = "64,64"
enable_bucket = false
train_batch_size = 2
max_train_steps = 12
network_dim = 4
optimizer_type = "AdamW"
mixed_precision = "no"
output_name = "{name}"
"""
FAMILY_KEYS = {
    "sd15.safetensors": [
        "model.diffusion_model.input_blocks.0.0.weight",
        "cond_stage_model.transformer.x.weight",
    ],
    "sdxl.safetensors": [
        "model.diffusion_model.input_blocks.0.0.weight",
        "conditioner.embedders.0.transformer.x.weight",
        "conditioner.embedders.1.model.x.weight",
    ],
}


LOCAL = "this machine (CPU) [local]"


def _upload(paths: list[Path], file_count: str = "multiple") -> Any:
    """What a gr.File ("multiple" or "directory") hands a callback after the browser uploaded `paths`."""
    component = file_input("files", file_count=file_count)
    if GRADIO_MAJOR < 4:
        payload = [{"name": str(p), "is_file": True, "data": None, "orig_name": p.name} for p in paths]
        return component.preprocess(payload)
    from gradio.data_classes import FileData, ListFiles

    return component.preprocess(ListFiles(root=[FileData(path=str(p), orig_name=p.name) for p in paths]))


def _dominant_colour(path: Path) -> str:
    """A real, tiny captioner for the interrogate hook: the name of the strongest channel of the image."""
    with Image.open(path) as image:
        means = np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
    return f"a {('red', 'green', 'blue')[int(np.argmax(means))]} picture"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TrainingService]:
    service = build_service(tmp_path / "home")
    for name, keys in FAMILY_KEYS.items():
        save_file({key: np.zeros((1,), dtype=np.float32) for key in keys}, str(service.home.models / name))
    yield service
    service.scheduler.stop()  # and the workers' monitor thread, when a test registered one


@pytest.fixture
def datasets(service: TrainingService) -> DatasetService:
    return DatasetService(service.home, jobs=service.store)


@pytest.fixture
def uploads(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "uploads"
    folder.mkdir()
    files = []
    for name, colour in (("r", (220, 10, 10)), ("g", (10, 200, 10)), ("b", (10, 10, 230))):
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"square, colour {name}\n")
        files += [folder / f"{name}.png", folder / f"{name}.txt"]
    (folder / "notes.pdf").write_bytes(b"%PDF")
    return [*files, folder / "notes.pdf"]


def _ended(actions: DatasetActions, create_ticket: str = "", validate_ticket: str = "") -> tuple[Any, ...]:
    """What the tab's poll shows once this page's dataset tasks ended: finished() until their tickets empty."""
    deadline = time.monotonic() + 60
    while True:
        shown = actions.finished(create_ticket, validate_ticket)
        if shown[2] == "" and shown[4] == "":
            return shown
        assert time.monotonic() < deadline, "the dataset task did not end"
        time.sleep(0.05)


def _created(actions: DatasetActions, *args: Any) -> tuple[str, Any]:
    """(final message, browse dropdown) of a creation the click started in the background."""
    started, ticket = actions.create(*args)
    assert started.startswith("⏳ Creating dataset") and ticket, started
    message, browse, *_ = _ended(actions, create_ticket=ticket)
    return message, browse


def _dataset(datasets: DatasetService, uploads: list[Path], name: str = "squares") -> None:
    message, _ = _created(
        DatasetActions(datasets, UiHooks()), name, "square", 3, _upload(uploads), None, "none"
    )
    assert message.startswith("✅"), message


def test_create_dataset_from_uploaded_files(datasets: DatasetService, uploads: list[Path]) -> None:
    actions = DatasetActions(datasets, UiHooks())
    message, choices = _created(actions, "squares", "", 3, _upload(uploads), None, "512 x 512, center crop")
    assert "Created dataset **squares** with 3 image(s), preprocessed (512-crop)" in message
    assert "`notes.pdf`: not an image or caption file" in message
    assert choices["value"] == "squares" and choices["choices"] == ["squares"]
    folder = datasets.home.datasets / "squares" / "3_squares"
    assert sorted(p.name for p in folder.iterdir()) == ["b.png", "b.txt", "g.png", "g.txt", "r.png", "r.txt"]
    with Image.open(folder / "r.png") as image:
        assert image.size == (512, 512)
    refused, ticket = actions.create("squares", "", 3, _upload(uploads), None, "none")  # refused at once
    assert "The dataset was not created" in refused and "already exists" in refused and ticket == ""
    bad, _ = actions.create("other", "", 0, _upload(uploads), None, "none")
    assert "repeats 0 is not a whole number" in bad
    late, ticket = actions.create("empty", "", 3, _upload(uploads[-1:]), None, "none")  # refused when checked
    assert late.startswith("⏳") and "The dataset was not created" in _ended(actions, ticket)[0]
    forgotten, browse, ticket, *_ = actions.finished("f00d", "")  # e.g. the host restarted meanwhile
    assert "no task has the ticket 'f00d'" in forgotten and browse == gr.update() and ticket == ""
    assert sorted(p.name for p in datasets.home.datasets.iterdir()) == ["squares"]  # no staging left behind


def test_the_click_returns_before_the_work_and_the_uploads_may_go_at_once(
    datasets: DatasetService, uploads: list[Path]
) -> None:
    gate = threading.Event()
    for _ in range(datasets.tasks.workers):  # the background workers are busy: the creation waits in line
        datasets.tasks.submit("holding", lambda: gate.wait(30))
    actions = DatasetActions(datasets, UiHooks())
    upload = _upload(uploads)
    started, ticket = actions.create("later", "", 2, upload, None, "none")
    assert started == "⏳ Creating dataset **later**: checking 7 file(s)…"
    assert datasets.task(ticket).state == "running" and not (datasets.home.datasets / "later").exists()
    for _name, temporary in uploaded_paths(upload):  # gradio may delete its temporary files once we return
        temporary.unlink()
    assert actions.finished(ticket, "")[2] == ticket  # still running: nothing shown, the ticket kept
    gate.set()
    message, browse, *_ = _ended(actions, create_ticket=ticket)
    assert "Created dataset **later** with 3 image(s)" in message and browse["value"] == "later"
    started, checking = actions.validate("later")
    assert started == "⏳ Validating **later**: decoding every image…"
    report = _ended(actions, validate_ticket=checking)[3]
    assert "**OK**: 3 image(s), 6 with repeats" in report


def test_create_dataset_from_a_folder_upload_and_files_together(
    datasets: DatasetService, uploads: list[Path]
) -> None:
    actions = DatasetActions(datasets, UiHooks())
    folder = _upload(uploads[:4], file_count="directory")
    message, _ = _created(actions, "mixed", "thing", "2", _upload(uploads[4:6]), folder, "none")
    assert "with 3 image(s)" in message
    assert "The folder's images and captions went into `2_thing/`" in message and "as a zip" in message
    assert "came more than once" not in message
    names = sorted(p.name for p in (datasets.home.datasets / "mixed/2_thing").iterdir())
    assert names == ["b.png", "b.txt", "g.png", "g.txt", "r.png", "r.txt"]


def test_a_folder_upload_of_subset_folders_is_reported_as_flattened(
    datasets: DatasetService, tmp_path: Path
) -> None:
    kohya = tmp_path / "kohya_dataset"
    paths = []
    for subset, colour in (("10_cat", (200, 0, 0)), ("5_dog", (0, 0, 200))):
        (kohya / subset).mkdir(parents=True)
        for stem in ("001", "002"):
            Image.new("RGB", (64, 64), colour).save(kohya / subset / f"{stem}.png")
            (kohya / subset / f"{stem}.txt").write_text(f"a {subset[3:]}\n")
            paths += [kohya / subset / f"{stem}.png", kohya / subset / f"{stem}.txt"]
    actions = DatasetActions(datasets, UiHooks())
    message, _ = _created(actions, "pets", "", 3, None, _upload(paths, file_count="directory"), "none")
    assert message.startswith("✅") and "with 2 image(s)" in message  # the browser sent base names only
    assert "⚠️ **4 file name(s) came more than once** (`001.png`, `001.txt`, `002.png`, `002.txt`)" in message
    assert "several `<repeats>_<name>` subfolders" in message and "went into `3_pets/`" in message
    assert "upload the folder as a zip" in message
    refused, _ = actions.create("pets", "", 3, None, _upload(paths, file_count="directory"), "none")
    assert "already exists" in refused and "came more than once" in refused


def test_caption_editor_interrogate_and_deletes(datasets: DatasetService, uploads: list[Path]) -> None:
    _dataset(datasets, uploads)
    actions = DatasetActions(datasets, UiHooks(interrogate=_dominant_colour))
    report, thumbnails, images, names, labels = actions.open("squares")
    assert "**OK**: 3 image(s), 9 with repeats" in report
    assert names == ["3_square/b.png", "3_square/g.png", "3_square/r.png"] == images["choices"]
    assert [label for _, label in thumbnails] == ["square, colour b", "square, colour g", "square, colour r"]
    assert labels == [label for _, label in thumbnails]
    preview, caption, _ = actions.select_image("squares", "3_square/g.png")
    assert preview.size == (64, 64) and caption == "square, colour g"
    generated, note = actions.generate_caption("squares", "3_square/g.png")
    assert generated["value"] == "a green picture" and "Save caption" in note
    message, gallery, labels = actions.save_caption(
        "squares", "3_square/g.png", generated["value"], names, labels
    )
    assert message.startswith("Saved") and labels[1] == "a green picture"
    # Only the label changed: the same thumbnails (nothing decoded again), the new caption under its image.
    assert [(id(p), label) for p, label in gallery] == [
        (id(thumbnails[0][0]), "square, colour b"),
        (id(thumbnails[1][0]), "a green picture"),
        (id(thumbnails[2][0]), "square, colour r"),
    ]
    assert (datasets.home.datasets / "squares/3_square/g.txt").read_text() == "a green picture\n"
    outside = actions.save_caption("squares", "../../models/sd15.safetensors", "x", names, labels)[0]
    assert outside.startswith("❌") and "contains '..'" in outside
    no_captioner = DatasetActions(datasets, UiHooks()).generate_caption("squares", "3_square/g.png")
    assert no_captioner[1] == "This host offers no captioner."
    assert actions.delete_image("squares", "3_square/b.png") == "Deleted `3_square/b.png`."
    _, after, _, names, _ = actions.open(
        "squares"
    )  # the list after a delete: the kept images are not decoded again
    assert names == ["3_square/g.png", "3_square/r.png"]
    assert [id(p) for p, _ in after] == [id(thumbnails[1][0]), id(thumbnails[2][0])]
    assert "2 image(s)" in _ended(actions, validate_ticket=actions.validate("squares")[1])[3]
    message, _, _ = actions.delete_dataset("squares", False)
    assert "Tick the box" in message and (datasets.home.datasets / "squares").exists()
    message, choices, confirmed = actions.delete_dataset("squares", True)
    assert message == "Deleted dataset **squares**." and choices["choices"] == [] and confirmed is False


def test_format_reports_issues_with_lines_then_the_plan(
    service: TrainingService, datasets: DatasetService, uploads: list[Path]
) -> None:
    _dataset(datasets, uploads)
    actions = CreateJobActions(service, UiHooks())
    broken = CONFIG.format(name="a").replace("network_dim = 4", 'network_dim = "four"') + "netwrk_alpha = 2\n"
    toml, issues, plan = actions.format_config(LOCAL, "SD 1.5", "sd15.safetensors", "squares", broken)
    assert toml == "" and plan == ""
    assert 'line 6, column 1: network_dim: expected a whole number, got "four"' in issues
    assert "line 10" in issues and "network_alpha" in issues  # the typo gets a suggestion
    toml, issues, plan = actions.format_config(
        LOCAL, "SD 1.5", "sd15.safetensors", "squares", CONFIG.format(name="a")
    )
    assert issues == "No problems found."
    assert "| 3_square | 3 | 3 | 9 |" in plan and "**12** total steps" in plan
    assert f'train_data_dir = "{(service.home.datasets / "squares").as_posix()}"' in toml
    escape = actions.format_config(LOCAL, "SD 1.5", None, None, 'train_data_dir = "/etc"\n')[1]
    assert "outside the home folder" in escape and "line 1" in escape


def test_fp16_is_judged_for_the_machine_that_trains(service: TrainingService) -> None:
    actions = CreateJobActions(service, UiHooks())
    fp16 = 'mixed_precision = "fp16"\n'
    _, issues, _ = actions.format_config(LOCAL, "SD 1.5", None, None, fp16)
    assert "needs a CUDA GPU" in issues and "line 1" in issues  # this CPU machine cannot train it
    local = {e["name"]: e for e in service.instance_types()}["local"]
    assert local["cuda"] is False and service.instance_cuda("local") is False


def test_model_family_is_shown_and_a_mismatch_flagged(service: TrainingService) -> None:
    actions = CreateJobActions(service, UiHooks())
    assert "Detected family: **SD 1.5**" in actions.model_info("sd15.safetensors", "SD 1.5")
    flagged = actions.model_info("sdxl.safetensors", "SD 1.5")
    assert "⚠️" in flagged and "**SDXL** checkpoint" in flagged and "choose FM Type SDXL" in flagged
    assert actions.model_choices(None)["choices"] == ["sd15.safetensors", "sdxl.safetensors"]
    instance = actions.instance_choices(None)
    assert instance["value"] == "this machine (CPU) [local]"


def test_dropdowns_list_names_without_reading_checkpoints_or_scanning_datasets(
    service: TrainingService, datasets: DatasetService, uploads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kohya_backend.data.scan as scan
    import kohya_backend.models.keys as keys

    _dataset(datasets, uploads)
    monkeypatch.setattr(scan, "scan_dataset", lambda *a, **k: pytest.fail("a dropdown scanned a dataset"))
    monkeypatch.setattr(keys, "read_keys", lambda *a, **k: pytest.fail("a dropdown read a checkpoint"))
    actions = CreateJobActions(service, UiHooks())
    assert actions.model_choices("gone")["choices"] == ["sd15.safetensors", "sdxl.safetensors"]
    assert actions.dataset_choices("gone") == DatasetActions(datasets, UiHooks()).choices(None)
    assert actions.dataset_choices("gone")["value"] == "squares"
    (service.home.models / "sdxl.safetensors").unlink()
    assert "no longer in the models folder" in actions.model_info("sdxl.safetensors", "SDXL")


def test_default_config_follows_the_fm_type_until_edited(service: TrainingService) -> None:
    actions = CreateJobActions(service, UiHooks())
    start = actions.default_config("SD 1.5")
    # this CPU-only test machine has no GPU to train on: the template comes without fp16, and formats clean
    assert start == template_toml("sd_1_5", cuda=False) and 'mixed_precision = "no"' in start
    assert "needs a CUDA GPU" not in actions.format_config(LOCAL, "SD 1.5", None, None, start)[1]
    replaced, remembered = actions.fm_changed("SDXL", start, start)
    assert replaced["value"] == template_toml("sd_xl", cuda=False) == remembered
    kept, still = actions.fm_changed("SD 1.5", start + "network_dim = 8\n", start)
    assert kept == gr.update() and still == start
    hooked = CreateJobActions(service, UiHooks(default_config=lambda fm: f"# for {fm}\n"))
    assert hooked.default_config("SDXL") == "# for sd_xl\n"
    assert hooked.reset_config("SD 1.5") == ("# for sd_1_5\n", "# for sd_1_5\n")


def test_the_default_config_lists_the_instance_types_once(
    service: TrainingService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kohya_backend.jobs.registry import WorkerRegistry

    actions = CreateJobActions(service, UiHooks())
    assert actions.default_config("SD 1.5") == template_toml("sd_1_5", cuda=False)
    WorkerRegistry(service.home.root).add("http://127.0.0.1:9", "a-token", name="gpu")  # not heard from yet
    listed = service.instance_types
    calls: list[int] = []
    monkeypatch.setattr(service, "instance_types", lambda: calls.append(1) or listed())
    assert actions.default_config("SD 1.5") == template_toml("sd_1_5", cuda=True)  # the worker may have one
    assert len(calls) == 1


def test_submit_refusals_then_a_queued_job_in_the_list(
    service: TrainingService, datasets: DatasetService, uploads: list[Path]
) -> None:
    _dataset(datasets, uploads)
    actions = CreateJobActions(service, UiHooks())
    instance = "this machine (CPU) [local]"
    mismatch = actions.submit(instance, "SD 1.5", "sdxl.safetensors", "squares", CONFIG.format(name="x"))
    assert mismatch.startswith("❌ **The job was refused.**") and "sd_xl" in mismatch
    invalid = actions.submit(instance, "SD 1.5", "sd15.safetensors", "squares", "max_train_steps = -3\n")
    assert "line 1" in invalid and "max_train_steps" in invalid
    missing = actions.submit(instance, "SD 1.5", "sd15.safetensors", None, CONFIG.format(name="x"))
    assert "no dataset is chosen" in missing
    queued = actions.submit(instance, "SD 1.5", "sd15.safetensors", "squares", CONFIG.format(name="mine"))
    assert queued.startswith("✅ Job **") and "`mine`" in queued
    taken = actions.submit(instance, "SD 1.5", "sd15.safetensors", "squares", CONFIG.format(name="mine"))
    assert "already used by another job" in taken

    trainings = TrainingsActions(service)
    [job] = service.store.list()[0]
    table, stamp, choices, *_details = trainings.refresh(None)
    assert list(table.columns)[:6] == ["id", "output name", "model", "dataset", "instance", "status"]
    assert table.values.tolist()[0][:6] == [job.id, "mine", "sd15.safetensors", "squares", "local", "queued"]
    assert choices["choices"] == [job.id] and choices["value"] is None and stamp == "<span></span>"
    mark = trainings.mark(job.id)
    assert trainings.mark(job.id) == mark != trainings.mark(None)
    in_use, _, _ = DatasetActions(datasets, UiHooks()).delete_dataset("squares", True)
    assert f"is used by job(s) {job.id} that are queued or training" in in_use
    assert trainings.cancel(job.id) == f"Job {job.id}: **cancelled** (cancelled before it started)"
    assert trainings.mark(job.id) != mark
    assert "Deleted job" in trainings.delete(job.id)
    assert trainings.cancel(job.id).startswith("❌") and trainings.cancel(None) == "Select a job first."


def test_deleting_a_job_that_ran_on_a_worker_says_what_happens_to_its_copy_there(
    service: TrainingService,
) -> None:
    from kohya_backend.jobs.registry import WorkerRegistry
    from kohya_backend.jobs.runner import RUN_NAME, write_json_atomic

    WorkerRegistry(service.home.root).add("http://127.0.0.1:9", "a-token", name="away")  # nothing listens
    job = service.store.create(
        fm_type="sd_1_5", model="sd15.safetensors", dataset="d", instance_type="worker:away", output_name="x",
        config_toml='output_name = "x"\n', params={},
    )  # fmt: skip
    remote_id = "20200101-000000-abcdef"
    write_json_atomic(job.folder / RUN_NAME, {"runner": "worker", "remote": {"away": {"job": remote_id}}})
    service.store.transition(job.id, JobStatus.CANCELLED, "cancelled on the worker")
    assert TrainingsActions(service).delete(job.id) == (
        f"Deleted job {job.id} (its delivered LoRA stays in the Lora folder); its copy on worker away is deleted "
        "there in the background (retried until it answers)."
    )
    assert json.loads((service.home.root / "worker-deletes.json").read_text()) == {"away": [remote_id]}


def test_selected_job_shows_log_loss_plot_samples_and_the_delivery_stamp(
    service: TrainingService, datasets: DatasetService, uploads: list[Path]
) -> None:
    _dataset(datasets, uploads)
    CreateJobActions(service, UiHooks()).submit(
        "local", "SD 1.5", "sd15.safetensors", "squares", CONFIG.format(name="done")
    )
    [job] = service.store.list()[0]
    # What a trainer leaves in the job folder: its log, step events and a sample.
    (job.folder / "train.log").write_text("".join(f"line {i}\n" for i in range(100)))
    steps = [{"kind": "step", "step": s, "loss": 1.0 / s, "avg_loss": 0.5} for s in (1, 2, 3)]
    (job.folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in steps))
    (job.folder / "output/sample").mkdir(parents=True)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(job.folder / "output/sample/done_000003_00.png")
    delivered = service.home.lora / "done.safetensors"
    for status in (JobStatus.PREPARING, JobStatus.TRAINING, JobStatus.SAVING):
        service.store.transition(job.id, status, status.value)
    service.store.update_progress(job.id, {"step": 3, "total_steps": 3, "delivered": str(delivered)})
    service.store.transition(job.id, JobStatus.COMPLETED, f"LoRA written to {delivered}")

    trainings = TrainingsActions(service)
    status, log, plot, samples = trainings.details(job.id)
    assert "**completed**, 3/3 (100%)" in status and f"LoRA written to {delivered}" in status
    assert log.splitlines()[0] == "line 70" and log.splitlines()[-1] == "line 99"
    assert plot.to_dict("records")[:2] == [
        {"step": 1, "value": 1.0, "series": "loss"},
        {"step": 1, "value": 0.5, "series": "average loss"},
    ]
    assert [name for _, name in samples] == ["done_000003_00.png"]
    table, stamp, *_ = trainings.refresh(job.id)
    assert stamp == f"<span>{job.id} {delivered}</span>"
    assert table.values.tolist()[0][5:7] == ["completed", "3/3 (100%)"]
    assert trainings.details(None)[0] == "Select a job in the list."


def test_polls_read_only_new_events_and_decode_each_sample_once(
    service: TrainingService, datasets: DatasetService, uploads: list[Path]
) -> None:
    import os

    _dataset(datasets, uploads)
    CreateJobActions(service, UiHooks()).submit(
        "local", "SD 1.5", "sd15.safetensors", "squares", CONFIG.format(name="running")
    )
    [job] = service.store.list()[0]
    events = job.folder / "events.jsonl"
    events.write_text("".join(json.dumps({"kind": "step", "step": s, "loss": 0.5}) + "\n" for s in (1, 2)))
    samples = job.folder / "output/sample"
    samples.mkdir(parents=True)
    Image.new("RGB", (512, 512), (200, 0, 0)).save(samples / "running_000002_00.png")
    trainings = TrainingsActions(service)
    _, _, plot, first_samples = trainings.details(job.id)
    assert [r["step"] for r in plot.to_dict("records")] == [1, 2]
    assert first_samples[0][0].size == (256, 256)
    assert trainings.details(job.id)[2] is plot  # nothing new: the same plot data, nothing re-read

    # Lines already read are not read again: rewrite them (same length) and append a step.
    events.write_text(
        events.read_text().replace("0.5", "0.9")
        + json.dumps({"kind": "step", "step": 3, "loss": 0.25})
        + "\n"
    )
    rows = trainings.details(job.id)[2].to_dict("records")
    assert [(r["step"], r["value"]) for r in rows] == [(1, 0.5), (2, 0.5), (3, 0.25)]
    mark = trainings.mark(job.id)
    service.store.update_progress(job.id, {"step": 3, "phase": "training"})
    assert trainings.mark(job.id) != mark  # the list refreshes while a job trains, not only on status changes

    # A sample is decoded once: a file whose size and time did not change is not opened again.
    first = samples / "running_000002_00.png"
    stat = first.stat()
    first.write_bytes(b"\0" * stat.st_size)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    Image.new("RGB", (64, 64), (0, 0, 200)).save(samples / "running_000004_00.png")
    os.utime(samples / "running_000004_00.png", ns=(stat.st_mtime_ns + 10**9, stat.st_mtime_ns + 10**9))
    again = trainings.details(job.id)[3]
    assert [name for _, name in again] == ["running_000002_00.png", "running_000004_00.png"]
    assert again[0][0] is first_samples[0][0]

    # A file that was replaced by a shorter one is read again from its start.
    events.write_text(json.dumps({"kind": "step", "step": 1, "loss": 0.125}) + "\n")
    assert trainings.details(job.id)[2].to_dict("records") == [{"step": 1, "value": 0.125, "series": "loss"}]
