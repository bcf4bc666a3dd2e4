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
from kohya_backend.ui.compat import GRADIO_MAJOR, SESSION_KEYED, file_input, session_of, uploaded_paths
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


def page(name: str = "page-1") -> gr.Request:
    """A browser page's request as gradio hands it to a callback: with its session hash on gradio 4 (where the
    poll's callbacks find the page's values on the server), without one on 3.41 (where they come as inputs)."""
    return gr.Request(session_hash=name) if SESSION_KEYED else gr.Request()


def _trainings(service: TrainingService) -> TrainingsActions:
    """The Trainings List's callbacks as the tab binds them (with the editor's, which Duplicate fills)."""
    return TrainingsActions(service, CreateJobActions(service, UiHooks()))


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


def _ended(
    actions: DatasetActions, create_ticket: str = "", validate_ticket: str = "", health_ticket: str = ""
) -> tuple[Any, ...]:
    """What the tab's poll shows once this page's dataset tasks ended: finished() until their tickets empty
    (message, browse, training dataset choices, health, the three tickets, then open()'s outputs)."""
    deadline = time.monotonic() + 60
    while True:
        shown = actions.finished(page(), create_ticket, validate_ticket, health_ticket)
        if shown[4:7] == ("", "", ""):
            return shown
        assert time.monotonic() < deadline, "the dataset task did not end"
        time.sleep(0.05)


def _created(actions: DatasetActions, *args: Any) -> tuple[str, Any]:
    """(final message, browse dropdown) of a creation the click started in the background."""
    started, ticket = actions.create(page(), *args)
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
    refused, ticket = actions.create(page(), "squares", "", 3, _upload(uploads), None, "none")  # at once
    assert "The dataset was not created" in refused and "already exists" in refused and ticket == ""
    bad, _ = actions.create(page(), "other", "", 0, _upload(uploads), None, "none")
    assert "repeats 0 is not a whole number" in bad
    late, ticket = actions.create(page(), "empty", "", 3, _upload(uploads[-1:]), None, "none")  # when checked
    assert late.startswith("⏳") and "The dataset was not created" in _ended(actions, ticket)[0]
    actions.sessions.put(session_of(page("restarted")), create="f00d")  # e.g. the host restarted meanwhile
    forgotten, browse, _, _, ticket, *_ = actions.finished(page("restarted"), "f00d")
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
    started, ticket = actions.create(page(), "later", "", 2, upload, None, "none")
    assert started == "⏳ Creating dataset **later**: checking 7 file(s)…"
    assert datasets.task(ticket).state == "running" and not (datasets.home.datasets / "later").exists()
    for _name, temporary in uploaded_paths(upload):  # gradio may delete its temporary files once we return
        temporary.unlink()
    assert actions.finished(page(), ticket)[4] == ticket  # still running: nothing shown, the ticket kept
    gate.set()
    message, browse, *_ = _ended(actions, create_ticket=ticket)
    assert "Created dataset **later** with 3 image(s)" in message and browse["value"] == "later"
    started, checking = actions.validate(page(), "later")
    assert started.startswith("⏳ Validating **later** (started ") and "decoding every image" in started
    report = _ended(actions, validate_ticket=checking)[7]
    assert report.startswith("Validated at ") and "**OK**: 3 image(s), 6 with repeats" in report


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
    refused, _ = actions.create(page(), "pets", "", 3, None, _upload(paths, file_count="directory"), "none")
    assert "already exists" in refused and "came more than once" in refused


def test_caption_editor_interrogate_and_deletes(datasets: DatasetService, uploads: list[Path]) -> None:
    _dataset(datasets, uploads)
    actions = DatasetActions(datasets, UiHooks(interrogate=_dominant_colour))
    report, thumbnails, images, names, labels, preview, caption, _ = actions.open("squares")
    assert images["value"] is None and preview is None and caption == ""  # no image until one is chosen
    thumbnails = thumbnails["value"] if isinstance(thumbnails, dict) else thumbnails  # gradio 4: an update
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
    # Delete asks first and acts on the image named in the question, whatever is chosen by then.
    row, question, pending, note = actions.ask_delete_image("squares", "3_square/b.png", names)
    assert row["visible"] is True and "Delete `3_square/b.png`" in question and note == ""
    assert (datasets.home.datasets / "squares/3_square/b.png").exists()
    row, _, left, *opened = actions.delete_image(pending)
    assert (
        row["visible"] is False
        and left is None
        and not (datasets.home.datasets / "squares/3_square/b.png").exists()
    )
    report, after, image, names, _, preview, caption, message = opened
    # The editor moves to the image that took the deleted one's place (what the gallery marks at that place).
    assert names == ["3_square/g.png", "3_square/r.png"] and image["value"] == "3_square/g.png"
    assert caption == "a green picture" and preview.size == (64, 64)
    assert message == "Deleted `3_square/b.png`. Now showing `3_square/g.png`."
    pictures = after["value"] if isinstance(after, dict) else after  # gradio 4 is told the marked place
    assert [id(p) for p, _ in pictures] == [id(thumbnails[1][0]), id(thumbnails[2][0])]  # not decoded again
    if isinstance(after, dict):
        assert after["selected_index"] == 0
    assert actions.delete_image(None)[3:] == (gr.update(),) * 8  # Keep, then a stale confirm: nothing happens
    assert "2 image(s)" in _ended(actions, validate_ticket=actions.validate(page(), "squares")[1])[7]
    row, question, pending, _ = actions.ask_delete_dataset("squares")
    assert "Delete dataset **squares**" in question and (datasets.home.datasets / "squares").exists()
    row, _, _, message, choices, train = actions.delete_dataset(pending)
    assert message == "Deleted dataset **squares**." and choices["choices"] == [] and train["choices"] == []
    assert not (datasets.home.datasets / "squares").exists()


def test_format_reports_issues_with_lines_then_the_plan(
    service: TrainingService, datasets: DatasetService, uploads: list[Path]
) -> None:
    _dataset(datasets, uploads)
    actions = CreateJobActions(service, UiHooks())
    broken = CONFIG.format(name="a").replace("network_dim = 4", 'network_dim = "four"') + "netwrk_alpha = 2\n"
    toml, message, issues, plan = actions.format_config(
        LOCAL, "SD 1.5", "sd15.safetensors", "squares", broken
    )
    assert toml == "" and plan == "" and message == "" and issues.startswith("Checked at ")
    assert 'line 6, column 1: network_dim: expected a whole number, got "four"' in issues
    assert "line 10" in issues and "network_alpha" in issues  # the typo gets a suggestion
    toml, _, issues, plan = actions.format_config(
        LOCAL, "SD 1.5", "sd15.safetensors", "squares", CONFIG.format(name="a")
    )
    assert issues.startswith("No problems found (checked at ")
    assert "| 3_square | 3 | 3 | 9 |" in plan and "**12** total steps" in plan
    assert f'train_data_dir = "{(service.home.datasets / "squares").as_posix()}"' in toml
    escape = actions.format_config(LOCAL, "SD 1.5", None, None, 'train_data_dir = "/etc"\n')[2]
    assert "outside the home folder" in escape and "line 1" in escape


def test_gpus_per_job_go_into_the_plan_and_the_job(
    service: TrainingService, datasets: DatasetService, uploads: list[Path]
) -> None:
    _dataset(datasets, uploads)
    actions = CreateJobActions(service, UiHooks())
    form = (LOCAL, "SD 1.5", "sd15.safetensors", "squares", CONFIG.format(name="two"))
    one_plan = actions.format_config(*form)[3]
    two_plan = actions.format_config(*form, 2)[3]
    assert "**12** total steps" in one_plan and "**12** total steps" in two_plan  # max_train_steps holds
    # 9 items at batch 2: 5 batches an epoch; 2 processes take 2 of them a step: 3 steps an epoch
    assert "batch size 2: **5** steps per epoch" in one_plan
    assert "batch size 2 per process x **2** processes (GPUs): **3** steps per epoch" in two_plan
    queued = actions.submit(*form, 2)[0]
    assert queued.startswith("✅ Job **"), queued
    [job] = service.store.list()[0]
    assert job.params["gpus"] == 2 and job.params["plan"]["num_processes"] == 2
    refused = actions.submit(*form[:4], CONFIG.format(name="zero"), 0)[0]
    assert "GPUs per job must be a whole number from 1" in refused


def test_fp16_is_judged_for_the_machine_that_trains(service: TrainingService) -> None:
    actions = CreateJobActions(service, UiHooks())
    fp16 = 'mixed_precision = "fp16"\n'
    _, _, issues, _ = actions.format_config(LOCAL, "SD 1.5", None, None, fp16)
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


def _template(fm_type: str, *, cuda: bool) -> str:
    """The editor's defaults: the schema's template for the machine, with the state saved for an exact Resume."""
    return template_toml(fm_type, cuda=cuda).replace("save_state = false", "save_state = true")


def test_default_config_follows_the_fm_type_and_its_draft(service: TrainingService) -> None:
    actions = CreateJobActions(service, UiHooks())
    start = actions.default_config("SD 1.5")
    # this CPU-only test machine has no GPU to train on: no fp16, no AdamW8bit, and it formats clean
    assert start == _template("sd_1_5", cuda=False)
    assert (
        'mixed_precision = "no"' in start
        and 'optimizer_type = "AdamW"' in start
        and "save_state = true" in start
    )
    assert actions.format_config(LOCAL, "SD 1.5", None, None, start)[2].startswith("No problems found")
    # Another FM type shows its draft (the page's script hands it over) or, without one, its defaults.
    text, baseline, draft = actions.fm_changed("SDXL", "", start, LOCAL)
    assert text == baseline == _template("sd_xl", cuda=False)
    assert json.loads(draft)["fm"] == "sd_xl" and json.loads(draft)["text"] == text
    text, baseline, _ = actions.fm_changed("SD 1.5", "network_dim = 8\n", baseline, LOCAL)
    assert text == "network_dim = 8\n" and baseline == start
    hooked = CreateJobActions(service, UiHooks(default_config=lambda fm: f"# for {fm}\n"))
    assert hooked.default_config("SDXL") == "# for sd_xl\n"
    filled = hooked.reset_config("SD 1.5", LOCAL, "# for sd_1_5\n", "# for sd_1_5\n")
    assert filled[:3] == ("# for sd_1_5\n", "# for sd_1_5\n", "SD 1.5") and filled[8]["visible"] is False


def test_load_defaults_asks_before_it_replaces_edits(service: TrainingService) -> None:
    actions = CreateJobActions(service, UiHooks())
    start = actions.default_config("SD 1.5")
    edited = start + "network_dim = 8\n"
    asked = actions.reset_config("SD 1.5", LOCAL, edited, start)
    assert asked[:8] == (gr.update(),) * 8  # the editor keeps the edits until confirmed
    row, question, pending = asked[8:]
    assert (
        row["visible"] is True and question == "Replace your edits in config_params with the SD 1.5 defaults?"
    )
    confirmed = actions.apply_fill(pending)
    assert confirmed[0] == start and confirmed[1] == start and confirmed[8]["visible"] is False
    assert json.loads(confirmed[7]) == {**json.loads(confirmed[7]), "fm": "sd_1_5", "text": start}
    assert actions.apply_fill(None) == (*(gr.update(),) * 8, gr.update(visible=False), "", None)  # Keep


def test_defaults_follow_the_chosen_instance(service: TrainingService) -> None:
    from kohya_backend.jobs.registry import WorkerRegistry

    WorkerRegistry(service.home.root).add("http://127.0.0.1:9", "a-token", name="gpu")  # not heard from yet
    actions = CreateJobActions(service, UiHooks())
    cpu = actions.default_config("SD 1.5")  # the page starts on this machine (listed first): no GPU here
    assert cpu == _template("sd_1_5", cuda=False)
    worker = next(c for c in actions.instance_choices(None)["choices"] if c.endswith("[worker:gpu]"))
    gpu = actions.default_config("SD 1.5", worker)
    assert gpu == _template("sd_1_5", cuda=True) and 'mixed_precision = "fp16"' in gpu
    assert actions.instance_changed(worker, "SD 1.5", cpu, cpu) == (gpu, gpu)  # unedited: follows
    assert actions.instance_changed(LOCAL, "SD 1.5", gpu, gpu) == (cpu, cpu)
    edited = cpu + "network_dim = 8\n"
    assert actions.instance_changed(worker, "SD 1.5", edited, cpu) == (gr.update(), cpu)  # edits are kept


def test_submit_refusals_then_a_queued_job_in_the_list(
    service: TrainingService, datasets: DatasetService, uploads: list[Path]
) -> None:
    _dataset(datasets, uploads)
    actions = CreateJobActions(service, UiHooks())
    instance = "this machine (CPU) [local]"
    mismatch, issues, plan = actions.submit(
        instance, "SD 1.5", "sdxl.safetensors", "squares", CONFIG.format(name="x")
    )
    assert (
        mismatch.startswith("❌ **The job was refused** (1 reason(s)") and "choose FM Type SDXL" in mismatch
    )
    assert issues == "" and plan == ""  # an earlier Format's answer is not shown under a refusal
    invalid = actions.submit(instance, "SD 1.5", "sd15.safetensors", "squares", "max_train_steps = -3\n")[0]
    assert "line 1" in invalid and "max_train_steps" in invalid
    # Every reason at once: the missing dataset, the other family's model and the config's own problem.
    many = actions.submit(instance, "SD 1.5", "sdxl.safetensors", None, "max_train_steps = -3\n")[0]
    assert "(3 reason(s)" in many and "no dataset is chosen" in many and "**SDXL** checkpoint" in many
    assert "max_train_steps" in many and "line 1" in many
    queued = actions.submit(instance, "SD 1.5", "sd15.safetensors", "squares", CONFIG.format(name="mine"))[0]
    assert queued.startswith("✅ Job **") and "`mine`" in queued
    taken = actions.submit(instance, "SD 1.5", "sd15.safetensors", "squares", CONFIG.format(name="mine"))[0]
    assert "already used by another job" in taken

    trainings = _trainings(service)
    [job] = service.store.list()[0]
    table, stamp, choices, *_details = trainings.refresh(page(), None)
    assert (
        list(table.columns)[:3] == ["status", "progress", "output name"] and list(table.columns)[-1] == "id"
    )
    assert table.values.tolist()[0][:3] == ["queued", "#1 in queue", "mine"]
    assert table.values.tolist()[0][-4:] == ["local", "sd15.safetensors", "squares", job.id]
    assert choices["choices"] == [job.id] and choices["value"] is None and stamp == "<span></span>"
    mark = trainings.mark()
    assert trainings.mark() == mark
    datasets_actions = DatasetActions(datasets, UiHooks())
    in_use = datasets_actions.delete_dataset(datasets_actions.ask_delete_dataset("squares")[2])[3]
    assert f"is used by job(s) {job.id} that are queued or training" in in_use
    assert trainings.cancel(job.id) == f"Job {job.id}: **cancelled** (cancelled before it started)"
    assert trainings.mark() != mark
    row, question, pending, _ = trainings.ask_delete(job.id)
    assert row["visible"] is True and f"Delete job **{job.id}**" in question
    assert service.store.get(job.id)  # nothing deleted before the confirmation
    assert "Deleted job" in trainings.delete(pending)[3]
    assert trainings.cancel(job.id).startswith("❌") and trainings.cancel(None) == "Select a job first."
    assert trainings.ask_delete(None)[3] == "Select a job first."


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
    assert _trainings(service).delete(job.id)[3] == (
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

    (job.folder / "output/done.safetensors").write_bytes(b"lora")
    Image.new("RGB", (8, 8)).save(job.folder / "output/done-epochs.png")
    (job.folder / "output/done-000001.safetensors").write_bytes(b"epoch 1")

    trainings = _trainings(service)
    status, log, plot, samples, downloads, grid, epochs, shown = trainings.details(page(), job.id)
    assert "**completed**, 3/3 (100%)" in status and f"LoRA written to {delivered}" in status
    assert log.splitlines()[0] == "line 70" and log.splitlines()[-1] == "line 99"
    assert plot.to_dict("records")[:2] == [
        {"step": 1, "value": 1.0, "series": "loss"},
        {"step": 1, "value": 0.5, "series": "average loss"},
    ]
    assert [name for _, name in samples] == ["done_000003_00.png"]
    output = job.folder / "output"
    assert downloads == [str(output / "done.safetensors"), str(output / "done-epochs.png"),
                         str(output / "sample/done_000003_00.png")]  # fmt: skip
    assert grid == str(output / "done-epochs.png")
    assert epochs["choices"] == ["final", "epoch 1"] and epochs["value"] == "final"
    # The poll's refresh: the same page's job again (on gradio 4 from the server, without inputs); the
    # downloads are not sent again while nothing changed.
    table, stamp, choices, status_again, *_, downloads_again, _, _, shown_again = (
        trainings.refresh(page()) if SESSION_KEYED else trainings.refresh(page(), job.id, shown)
    )
    assert choices["value"] == job.id and status_again == status and shown_again == shown
    assert downloads_again == gr.update()
    assert stamp == f"<span>{job.id} {delivered}</span>"
    assert table.values.tolist()[0][:2] == ["completed", "3/3 (100%)"]
    assert trainings.details(page(), None)[0] == "Select a job in the list."
    # Another page selected nothing: its refresh shows no job (gradio 4 keeps each page's own selection).
    if SESSION_KEYED:
        assert trainings.refresh(page("other"))[2]["value"] is None


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
    trainings = _trainings(service)
    _, _, plot, first_samples, *_ = trainings.details(page(), job.id)
    assert [r["step"] for r in plot.to_dict("records")] == [1, 2]
    assert first_samples[0][0].size == (256, 256)
    # nothing new: another page gets the same plot data, nothing re-read
    assert trainings.details(page("another"), job.id)[2] is plot

    # Lines already read are not read again: rewrite them (same length) and append a step.
    events.write_text(
        events.read_text().replace("0.5", "0.9")
        + json.dumps({"kind": "step", "step": 3, "loss": 0.25})
        + "\n"
    )
    rows = trainings.details(page(), job.id)[2].to_dict("records")
    assert [(r["step"], r["value"]) for r in rows] == [(1, 0.5), (2, 0.5), (3, 0.25)]
    mark = trainings.mark()
    service.store.update_progress(job.id, {"step": 3, "phase": "training"})
    assert trainings.mark() != mark  # the list refreshes while a job trains, not only on status changes

    # A sample is decoded once: a file whose size and time did not change is not opened again.
    first = samples / "running_000002_00.png"
    stat = first.stat()
    first.write_bytes(b"\0" * stat.st_size)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    Image.new("RGB", (64, 64), (0, 0, 200)).save(samples / "running_000004_00.png")
    os.utime(samples / "running_000004_00.png", ns=(stat.st_mtime_ns + 10**9, stat.st_mtime_ns + 10**9))
    again = trainings.details(page(), job.id)[3]
    assert [name for _, name in again] == ["running_000002_00.png", "running_000004_00.png"]
    assert again[0][0] is first_samples[0][0]

    # A file that was replaced by a shorter one is read again from its start.
    events.write_text(json.dumps({"kind": "step", "step": 1, "loss": 0.125}) + "\n")
    assert trainings.details(page(), job.id)[2].to_dict("records") == [
        {"step": 1, "value": 0.125, "series": "loss"}
    ]


def test_the_loss_plot_and_the_samples_are_sent_only_when_they_change(
    service: TrainingService, datasets: DatasetService, uploads: list[Path]
) -> None:
    _dataset(datasets, uploads)
    editor = CreateJobActions(service, UiHooks())
    for name in ("one", "two"):
        editor.submit("local", "SD 1.5", "sd15.safetensors", "squares", CONFIG.format(name=name))
    jobs = {job.output_name: job for job in service.store.list()[0]}
    for job in jobs.values():  # the same events and sample in both: only the job tells them apart
        (job.folder / "events.jsonl").write_text(json.dumps({"kind": "step", "step": 1, "loss": 0.5}) + "\n")
        (job.folder / "output/sample").mkdir(parents=True)
        Image.new("RGB", (32, 32), (9, 9, 9)).save(job.folder / "output/sample/s_000001_00.png")
    one, two = jobs["one"], jobs["two"]
    trainings = _trainings(service)

    def poll(job_id: str, shown: str) -> tuple[Any, Any, str]:
        """The poll's refresh of the page's selected job: (plot, samples, what the page then shows)."""
        *_, plot, samples, _, _, _, key = (
            trainings.refresh(page()) if SESSION_KEYED else trainings.refresh(page(), job_id, shown)
        )
        return plot, samples, key

    _, _, plot, samples, *_, shown = trainings.details(page(), one.id)
    assert [r["step"] for r in plot.to_dict("records")] == [1] and len(samples) == 1
    plot, samples, shown = poll(one.id, shown)
    assert plot == gr.update() and samples == gr.update()  # nothing changed: nothing sent

    with (one.folder / "events.jsonl").open("a") as events:
        events.write(json.dumps({"kind": "step", "step": 2, "loss": 0.25}) + "\n")
    plot, samples, shown = poll(one.id, shown)
    assert [r["step"] for r in plot.to_dict("records")] == [1, 2] and samples == gr.update()
    Image.new("RGB", (32, 32), (1, 1, 1)).save(one.folder / "output/sample/s_000002_00.png")
    plot, samples, shown = poll(one.id, shown)
    assert plot == gr.update() and [name for _, name in samples] == ["s_000001_00.png", "s_000002_00.png"]
    assert poll(one.id, shown)[:2] == (gr.update(), gr.update())

    # Another job with the same plot and samples is sent in full, and so is the first one again after it.
    _, _, plot, samples, *_, shown = trainings.details(page(), two.id, shown)
    assert [r["step"] for r in plot.to_dict("records")] == [1] and len(samples) == 1
    assert poll(two.id, shown)[:2] == (gr.update(), gr.update())
    _, _, plot, samples, *_, shown = trainings.details(page(), one.id, shown)
    assert [r["step"] for r in plot.to_dict("records")] == [1, 2] and len(samples) == 2
    # A page that shows nothing yet (or sends a value it never got) is sent everything.
    for unknown in ("", "not json", '["a"]', '{"plot": 1}'):
        assert trainings.details(page("fresh"), one.id, unknown)[2] is not gr.update()
