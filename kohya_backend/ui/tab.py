"""The Train Management tab's Blocks: layout and event wiring only; the callbacks live in create_job.py,
trainings.py and dataset_actions.py and call the services (the same ones the REST API and the CLI use)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from kohya_backend.service.datasets import DatasetService
from kohya_backend.service.training import TrainingService
from kohya_backend.ui.compat import file_input
from kohya_backend.ui.create_job import CreateJobActions
from kohya_backend.ui.dataset_actions import PREPROCESS_CHOICES, DatasetActions
from kohya_backend.ui.hooks import UiHooks
from kohya_backend.ui.present import FM_LABELS, JOB_HEADERS, WORKER_HEADERS
from kohya_backend.ui.s3_upload import S3UploadActions
from kohya_backend.ui.trainings import TrainingsActions
from kohya_backend.ui.workers import WorkersActions

ELEM_ID = "train_management"
DELIVERY_STAMP_ID = "train_management_delivery_stamp"
POLL_SECONDS = 2.0
# The page layout when the tab is the whole page (standalone); inside the WebUI a tab's own css is not used, and
# style.css (served by the WebUI, appended by the standalone app) holds the tab's rules, scoped to #train_management.
TAB_CSS = ".gradio-container { max-width: none !important; }\n"


_SMALL = {"size": "sm", "scale": 0, "min_width": 60}
WORKERS_INTRO = (
    "Train on another machine's GPU: start `python -m kohya_backend worker --host 0.0.0.0 --port 7870 "
    "--token-file token.txt` there (with `--create-token` the first time), then paste the URL it printed and "
    "the token from its token file. Each worker becomes a Training Instance Type. Use https (a TLS reverse "
    "proxy) when the worker is not on your own network: the token travels with every request."
)


def _id(name: str) -> str:
    return f"{ELEM_ID}_{name}"


def _create_job_column(actions: CreateJobActions, fm_default: str) -> dict[str, Any]:
    """The left column's components (built, not wired)."""
    c: dict[str, Any] = {}
    gr.Markdown("### Create a Training Job")
    with gr.Row():
        c["instance"] = gr.Dropdown(label="Training Instance Type", elem_id=_id("instance"), scale=4)
        c["refresh_instances"] = gr.Button("↻", elem_id=_id("refresh_instances"), **_SMALL)
    c["fm"] = gr.Radio(list(FM_LABELS), value=fm_default, label="FM Type", elem_id=_id("fm_type"))
    with gr.Row():
        c["model"] = gr.Dropdown(label="Model", elem_id=_id("model"), scale=4)
        c["refresh_models"] = gr.Button("↻", elem_id=_id("refresh_models"), **_SMALL)
    c["model_info"] = gr.Markdown(elem_id=_id("model_info"))
    with gr.Row():
        c["dataset"] = gr.Dropdown(label="Dataset", elem_id=_id("dataset"), scale=4)
        c["refresh_datasets"] = gr.Button("↻", elem_id=_id("refresh_datasets"), **_SMALL)
    start = actions.default_config(fm_default)
    c["config"] = gr.Textbox(
        value=start, label="config_params (TOML)", lines=20, max_lines=60, elem_id=_id("config"),
        elem_classes=["train-management-mono"],
    )  # fmt: skip
    c["config_default"] = gr.State(start)
    with gr.Row():
        c["format"] = gr.Button("Format config Params", elem_id=_id("format"))
        c["reset"] = gr.Button("Load FM Type defaults", elem_id=_id("reset"))
        c["create"] = gr.Button("Create Training Job", variant="primary", elem_id=_id("create"))
    c["create_message"] = gr.Markdown(elem_id=_id("create_message"))
    c["issues"] = gr.Markdown(elem_id=_id("issues"))
    c["plan"] = gr.Markdown(elem_id=_id("plan"))
    with gr.Accordion("Formatted config (canonical TOML, as it will be trained)", open=False):
        c["formatted"] = gr.Textbox(
            label="Canonical TOML", lines=12, interactive=False, elem_id=_id("formatted"),
            elem_classes=["train-management-mono"],
        )  # fmt: skip
    return c


def _workers_panel(locked: str | None) -> dict[str, Any]:
    """The "Remote GPU workers" accordion (built, not wired)."""
    c: dict[str, Any] = {}
    with gr.Accordion("Remote GPU workers", open=False, elem_id=_id("workers")):
        gr.Markdown(WORKERS_INTRO + (f"\n\n⚠️ {locked}" if locked else ""), elem_id=_id("workers_intro"))
        with gr.Row():
            c["url"] = gr.Textbox(
                label="Worker URL", placeholder="http://gpu-box:7870", elem_id=_id("worker_url"), scale=3
            )
            c["name"] = gr.Textbox(label="Name (optional)", elem_id=_id("worker_name"), scale=1)
        c["token"] = gr.Textbox(
            label="Token (from the worker's token file)", type="password", elem_id=_id("worker_token")
        )
        with gr.Row():
            c["add"] = gr.Button("Add worker", variant="primary", elem_id=_id("worker_add"))
            c["pick"] = gr.Dropdown(label="Registered worker", elem_id=_id("worker_pick"), scale=2)
            c["remove"] = gr.Button("Remove worker", variant="stop", elem_id=_id("worker_remove"))
            c["refresh"] = gr.Button("↻", elem_id=_id("workers_refresh"), **_SMALL)
        c["message"] = gr.Markdown(elem_id=_id("worker_message"))
        c["table"] = gr.Dataframe(
            headers=WORKER_HEADERS, datatype=["str"] * len(WORKER_HEADERS), type="array", interactive=False,
            wrap=True, elem_id=_id("workers_table"),
        )  # fmt: skip
    return c


def _trainings_column() -> dict[str, Any]:
    """The right column's components (built, not wired)."""
    c: dict[str, Any] = {}
    with gr.Row():
        gr.Markdown("### Trainings List")
        c["refresh"] = gr.Button("↻ Refresh", elem_id=_id("refresh_jobs"), **_SMALL)
    c["table"] = gr.Dataframe(
        headers=JOB_HEADERS, datatype=["str"] * len(JOB_HEADERS), type="array", interactive=False, wrap=True,
        elem_id=_id("jobs"),
    )  # fmt: skip
    c["job"] = gr.Dropdown(label="Job", elem_id=_id("job"))
    c["job_status"] = gr.Markdown(elem_id=_id("job_status"))
    with gr.Row():
        c["cancel"] = gr.Button("Cancel", elem_id=_id("cancel"))
        c["resume"] = gr.Button("Resume", elem_id=_id("resume"))
        c["delete"] = gr.Button("Delete", variant="stop", elem_id=_id("delete"))
    c["action_message"] = gr.Markdown(elem_id=_id("action_message"))
    c["log"] = gr.Textbox(
        label="Log (tail)", lines=8, max_lines=30, interactive=False, elem_id=_id("log"),
        elem_classes=["train-management-mono"],
    )  # fmt: skip
    c["plot"] = gr.LinePlot(
        x="step", y="value", color="series", title="Loss", x_title="step", y_title="loss", height=260,
        label="Loss", elem_id=_id("loss_plot"),
    )  # fmt: skip
    c["samples"] = gr.Gallery(label="Samples", columns=4, height=260, elem_id=_id("samples"))
    # The auto-refresh polls only this hidden text; the list and the job's details update when it changes.
    c["poll"] = gr.Textbox(visible=False, elem_id=_id("poll"))
    return c


def _datasets_area(has_interrogate: bool, import_hint: str) -> dict[str, Any]:
    """The Datasets sub-tab's components (built, not wired)."""
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### Create a dataset")
            gr.Markdown(import_hint, elem_id=_id("ds_hint"))
            c["name"] = gr.Textbox(label="Dataset name", elem_id=_id("ds_name"))
            with gr.Row():
                c["subject"] = gr.Textbox(
                    label="Subject (class token; default: the name)", elem_id=_id("ds_subject")
                )
                c["repeats"] = gr.Number(value=10, precision=0, label="Repeats", elem_id=_id("ds_repeats"))
            c["files"] = file_input(
                "Images and captions (.txt of the same name), or a zip (keeps <repeats>_<name> subfolders)",
                file_count="multiple", file_types=["image", ".txt", ".caption", ".tags", ".zip"],
                elem_id=_id("ds_files"),
            )  # fmt: skip
            c["folder"] = file_input(
                "…or a folder's files (its subfolders are not kept: zip a folder of <repeats>_<name> subfolders)",
                file_count="directory", elem_id=_id("ds_folder"),
            )  # fmt: skip
            c["preprocess"] = gr.Radio(
                list(PREPROCESS_CHOICES), value="none", label="Preprocessing", elem_id=_id("ds_preprocess")
            )
            c["create"] = gr.Button("Create dataset", variant="primary", elem_id=_id("ds_create"))
            c["create_message"] = gr.Markdown(elem_id=_id("ds_create_message"))
            # Creation and validation run as background tasks: their tickets, and the poll that ends them.
            c["create_ticket"] = gr.State("")
            c["validate_ticket"] = gr.State("")
            c["tasks_poll"] = gr.Textbox(visible=False, elem_id=_id("ds_tasks_poll"))
        with gr.Column(scale=2):
            gr.Markdown("### Browse, caption and validate")
            with gr.Row():
                c["dataset"] = gr.Dropdown(label="Dataset", elem_id=_id("ds_dataset"), scale=4)
                c["refresh"] = gr.Button("↻", elem_id=_id("ds_refresh"), **_SMALL)
            c["report"] = gr.Markdown(elem_id=_id("ds_report"))
            c["validate"] = gr.Button("Validate (decode every image)", elem_id=_id("ds_validate"))
            c["gallery"] = gr.Gallery(label="Images", columns=6, height=300, elem_id=_id("ds_gallery"))
            c["names"] = gr.State([])  # the images of the gallery's thumbnails, in order
            c["labels"] = gr.State([])  # and their labels (first caption lines)
            c["image"] = gr.Dropdown(label="Image", elem_id=_id("ds_image"))
            with gr.Row():
                c["preview"] = gr.Image(
                    label="Image", type="pil", interactive=False, height=320, elem_id=_id("ds_preview")
                )
                with gr.Column():
                    c["caption"] = gr.Textbox(label="Caption", lines=4, elem_id=_id("ds_caption"))
                    with gr.Row():
                        c["save"] = gr.Button("Save caption", variant="primary", elem_id=_id("ds_save"))
                        c["generate"] = gr.Button(
                            "Generate caption", visible=has_interrogate, elem_id=_id("ds_generate")
                        )
                        c["delete_image"] = gr.Button(
                            "Delete image", variant="stop", elem_id=_id("ds_delete_image")
                        )
                    c["message"] = gr.Markdown(elem_id=_id("ds_message"))
            with gr.Row():
                c["confirm"] = gr.Checkbox(
                    label="Yes, delete this dataset and its files", elem_id=_id("ds_confirm")
                )
                c["delete"] = gr.Button("Delete dataset", variant="stop", elem_id=_id("ds_delete"))
            with gr.Row():
                c["s3_upload"] = gr.Button("Upload to S3", elem_id=_id("ds_s3_upload"), **_SMALL)
                c["s3_message"] = gr.Markdown(elem_id=_id("ds_s3_message"))
    return c


def _wire_workers(a: WorkersActions, c: dict[str, Any], instance: Any, instances: Any) -> None:
    listed = [c["table"], c["pick"]]
    c["refresh"].click(a.refresh, [c["pick"]], listed).then(instances, [instance], [instance])
    c["add"].click(a.add, [c["url"], c["token"], c["name"]], [c["message"], c["token"]]).then(
        a.refresh, [c["pick"]], listed
    ).then(instances, [instance], [instance])
    c["remove"].click(a.remove, [c["pick"]], [c["message"]]).then(a.refresh, [c["pick"]], listed).then(
        instances, [instance], [instance]
    )


def _wire_create_job(a: CreateJobActions, c: dict[str, Any]) -> None:
    c["refresh_instances"].click(a.instance_choices, [c["instance"]], [c["instance"]])
    c["refresh_models"].click(a.model_choices, [c["model"]], [c["model"]])
    c["refresh_datasets"].click(a.dataset_choices, [c["dataset"]], [c["dataset"]])
    c["model"].change(a.model_info, [c["model"], c["fm"]], [c["model_info"]])
    c["fm"].change(
        a.fm_changed, [c["fm"], c["config"], c["config_default"]], [c["config"], c["config_default"]]
    ).then(a.model_info, [c["model"], c["fm"]], [c["model_info"]])
    c["reset"].click(a.reset_config, [c["fm"]], [c["config"], c["config_default"]])
    c["format"].click(
        a.format_config,
        [c["instance"], c["fm"], c["model"], c["dataset"], c["config"]],
        [c["formatted"], c["issues"], c["plan"]],
    )
    c["create"].click(
        a.submit, [c["instance"], c["fm"], c["model"], c["dataset"], c["config"]], [c["create_message"]]
    )


def _wire_trainings(a: TrainingsActions, c: dict[str, Any], stamp: Any) -> None:
    outputs = [c["table"], stamp, c["job"], c["job_status"], c["log"], c["plot"], c["samples"]]
    c["refresh"].click(a.refresh, [c["job"]], outputs)
    c["poll"].change(a.refresh, [c["job"]], outputs, show_progress="hidden")
    c["table"].select(a.select_row, [c["table"]], [c["job"]])
    c["job"].change(a.details, [c["job"]], [c["job_status"], c["log"], c["plot"], c["samples"]])
    for action in (a.cancel, a.resume, a.delete):
        c[action.__name__].click(action, [c["job"]], [c["action_message"]]).then(
            a.refresh, [c["job"]], outputs
        )


def _wire_datasets(a: DatasetActions, c: dict[str, Any], train_dataset: Any) -> None:
    opened = [c["report"], c["gallery"], c["image"], c["names"], c["labels"]]
    tickets = [c["create_ticket"], c["validate_ticket"]]
    outcome = [c["create_message"], c["dataset"], c["create_ticket"], c["report"], c["validate_ticket"]]
    # A task may end before the page holds its ticket, so the poll's change would pass it by: ask once more then.
    c["create"].click(
        a.create,
        [c["name"], c["subject"], c["repeats"], c["files"], c["folder"], c["preprocess"]],
        [c["create_message"], c["create_ticket"]],
    ).then(a.finished, tickets, outcome, show_progress="hidden")
    c["tasks_poll"].change(a.finished, tickets, outcome, show_progress="hidden").then(
        a.choices, [train_dataset], [train_dataset], show_progress="hidden"
    )
    c["refresh"].click(a.choices, [c["dataset"]], [c["dataset"]])
    c["dataset"].change(a.open, [c["dataset"]], opened)
    c["validate"].click(a.validate, [c["dataset"]], [c["report"], c["validate_ticket"]]).then(
        a.finished, tickets, outcome, show_progress="hidden"
    )
    c["gallery"].select(a.pick_thumbnail, [c["names"]], [c["image"]])
    c["image"].change(a.select_image, [c["dataset"], c["image"]], [c["preview"], c["caption"], c["message"]])
    c["save"].click(
        a.save_caption,
        [c["dataset"], c["image"], c["caption"], c["names"], c["labels"]],
        [c["message"], c["gallery"], c["labels"]],
    )
    c["generate"].click(a.generate_caption, [c["dataset"], c["image"]], [c["caption"], c["message"]])
    c["delete_image"].click(a.delete_image, [c["dataset"], c["image"]], [c["message"]]).then(
        a.open, [c["dataset"]], opened
    )
    c["delete"].click(
        a.delete_dataset, [c["dataset"], c["confirm"]], [c["message"], c["dataset"], c["confirm"]]
    ).then(a.choices, [train_dataset], [train_dataset])


def _poll_marks(trainings: TrainingsActions, datasets: DatasetActions) -> Any:
    """The page's poll: (the Trainings List's mark, the dataset tasks' mark)."""

    def poll_marks(selected: str | None) -> tuple[str, str]:
        return trainings.mark(selected), datasets.tasks_mark()

    return poll_marks


def create_tab(service: TrainingService, datasets: DatasetService, hooks: UiHooks | None = None) -> gr.Blocks:
    """The Train Management tab's Blocks (gradio 3.41 and 4.40); callbacks call the services only."""
    hooks = hooks or UiHooks()
    create_actions = CreateJobActions(service, hooks)
    trainings = TrainingsActions(service)
    dataset_actions = DatasetActions(datasets, hooks)
    worker_actions = WorkersActions(service, hooks.workers_locked)
    fm_default = next(iter(FM_LABELS))
    with gr.Blocks(title="Train Management", css=TAB_CSS, analytics_enabled=False) as blocks:
        with gr.Column(elem_id=ELEM_ID):
            stamp = gr.HTML("<span></span>", elem_id=DELIVERY_STAMP_ID)
            with gr.Tabs(elem_id=_id("tabs")):
                with gr.Tab("Training", elem_id=_id("training_tab")):
                    with gr.Row():
                        with gr.Column(scale=2):
                            job_form = _create_job_column(create_actions, fm_default)
                            workers = _workers_panel(hooks.workers_locked)
                        with gr.Column(scale=3):
                            jobs = _trainings_column()
                with gr.Tab("Datasets", elem_id=_id("datasets_tab")):
                    data = _datasets_area(hooks.interrogate is not None, dataset_actions.import_hint())
        _wire_create_job(create_actions, job_form)
        _wire_workers(worker_actions, workers, job_form["instance"], create_actions.instance_choices)
        _wire_trainings(trainings, jobs, stamp)
        _wire_datasets(dataset_actions, data, job_form["dataset"])
        data["s3_upload"].click(
            S3UploadActions(service).upload_dataset, [data["dataset"]], [data["s3_message"]]
        )
        # One poll per page (on gradio 3.41 each `every=` loop holds a queue worker): it reads only two short
        # marks; the Trainings List and the dataset tasks update when theirs changes.
        blocks.load(
            _poll_marks(trainings, dataset_actions),
            [jobs["job"]],
            [jobs["poll"], data["tasks_poll"]],
            every=POLL_SECONDS,
            show_progress="hidden",
        )
        choices = [job_form["instance"], job_form["model"], job_form["dataset"]]
        blocks.load(create_actions.all_choices, choices, choices).then(
            create_actions.model_info, [job_form["model"], job_form["fm"]], [job_form["model_info"]]
        )
        blocks.load(dataset_actions.choices, [data["dataset"]], [data["dataset"]])
        blocks.load(worker_actions.refresh, [workers["pick"]], [workers["table"], workers["pick"]])
    return blocks
