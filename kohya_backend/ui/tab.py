"""The Train Management tab's Blocks: layout (layout.py) and event wiring; the callbacks live in create_job.py,
presets.py, trainings.py, workers.py and dataset_actions.py and call the services (the same ones the REST API and
the CLI use).

Nothing runs with inputs unless the user acted (see compat.SESSION_KEYED): the page loads with one input-free
call, the poll sends none, and what it refreshes finds the page's values on the server (gradio 4) or in the page's
State (3.41). Dropdowns that the page fills itself are wired to `.input` (the user's choice), not `.change`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from kohya_backend.service.datasets import DatasetService
from kohya_backend.service.guard import GuardPolicy
from kohya_backend.service.presets import PresetStore
from kohya_backend.service.training import TrainingService
from kohya_backend.ui.compat import js_only, offline_theme, page_inputs
from kohya_backend.ui.confirm import wire_keep
from kohya_backend.ui.create_job import CreateJobActions
from kohya_backend.ui.dataset_actions import DatasetActions
from kohya_backend.ui.hooks import UiHooks
from kohya_backend.ui.layout import (
    ELEM_ID,
    create_job_column,
    datasets_area,
    elem,
    trainings_column,
    workers_panel,
)
from kohya_backend.ui.origin_guard import guard_events, read_only
from kohya_backend.ui.present import FM_LABELS
from kohya_backend.ui.presets import PresetActions
from kohya_backend.ui.s3_upload import S3UploadActions
from kohya_backend.ui.trainings import TrainingsActions
from kohya_backend.ui.workers import WorkersActions

__all__ = ["DELIVERY_STAMP_ID", "ELEM_ID", "POLL_SECONDS", "create_tab"]

DELIVERY_STAMP_ID = "train_management_delivery_stamp"
POLL_SECONDS = 2.0
SCRIPT = Path(__file__).resolve().parents[2] / "javascript" / "train_management.js"
# The page layout when the tab is the whole page (standalone); inside the WebUI a tab's own css is not used, and
# style.css (served by the WebUI, appended by the standalone app) holds the tab's rules, scoped to #train_management.
TAB_CSS = ".gradio-container { max-width: none !important; }\n"


def _editor_outputs(c: dict[str, Any]) -> list[Any]:
    """What CreateJobActions.fill() returns into: EDITOR_FIELDS, then the editor's confirmation row."""
    fields = [
        c["config"],
        c["config_default"],
        c["fm"],
        c["instance"],
        c["model"],
        c["dataset"],
        c["model_info"],
    ]
    return [*fields, c["draft_sync"], *c["editor_confirm"].outputs]


def _wire_create_job(a: CreateJobActions, p: PresetActions, c: dict[str, Any]) -> None:
    c["refresh_instances"].click(a.instance_choices, [c["instance"]], [c["instance"]])
    c["refresh_models"].click(a.model_choices, [c["model"]], [c["model"]]).then(
        a.model_info, [c["model"], c["fm"]], [c["model_info"]]
    )
    c["refresh_datasets"].click(a.dataset_choices, [c["dataset"]], [c["dataset"]])
    c["model"].input(a.model_info, [c["model"], c["fm"]], [c["model_info"]])
    # The page's script hands over the new FM type's draft (kept in the browser) in place of the editor's text.
    c["fm"].input(
        a.fm_changed,
        [c["fm"], c["config"], c["config_default"], c["instance"]],
        [c["config"], c["config_default"], c["draft_sync"]],
        **js_only("(fm, text, last, instance) => trainManagementDraftFor(fm, text, last, instance)"),
    ).then(a.model_info, [c["model"], c["fm"]], [c["model_info"]])
    c["instance"].input(
        a.instance_changed,
        [c["instance"], c["fm"], c["config"], c["config_default"]],
        [c["config"], c["config_default"]],
    )
    editor = _editor_outputs(c)
    confirm = c["editor_confirm"]
    c["reset"].click(a.reset_config, [c["fm"], c["instance"], c["config"], c["config_default"]], editor)
    confirm.yes.click(a.apply_fill, [confirm.pending], editor)
    wire_keep(confirm)
    messages = [c["create_message"], c["issues"], c["plan"]]
    form = [c["instance"], c["fm"], c["model"], c["dataset"], c["config"], c["gpus"]]
    c["format"].click(a.format_config, form, [c["formatted"], *messages])
    c["create"].click(a.submit, form, messages)
    c["key"].input(a.key_help, [c["key"]], [c["key_help"]])
    # Presets
    c["preset_save"].click(
        p.save, [c["preset_name"], c["config"], c["fm"]], [c["preset_message"], c["preset"]]
    )
    c["preset_load"].click(
        p.load,
        [c["preset"], c["fm"], c["config"], c["config_default"], c["model"]],
        [*editor, c["preset_message"]],
    )
    c["kohya_file"].upload(
        p.import_kohya,
        [c["kohya_file"], c["fm"], c["config"], c["config_default"]],
        [*editor, c["preset_message"]],
    )
    deleting = c["preset_confirm"]
    c["preset_delete"].click(p.ask_delete, [c["preset"]], [*deleting.outputs, c["preset_message"]])
    deleting.yes.click(p.delete, [deleting.pending], [*deleting.outputs, c["preset_message"], c["preset"]])
    wire_keep(deleting)
    # Every fill of the editor (defaults, presets, Duplicate, FM switch) is stored as that FM type's draft.
    c["draft_sync"].change(None, [c["draft_sync"]], None, **js_only("(r) => trainManagementStoreDraft(r)"))


def _wire_workers(a: WorkersActions, c: dict[str, Any], instance: Any, instances: Any) -> None:
    listed = [c["table"], c["pick"]]
    c["refresh"].click(a.refresh, [c["pick"]], listed).then(instances, [instance], [instance])
    c["add"].click(a.add, [c["url"], c["token"], c["name"]], [c["message"], c["token"]]).then(
        a.refresh, [c["pick"]], listed
    ).then(instances, [instance], [instance])
    c["remove"].click(a.remove, [c["pick"]], [c["message"]]).then(a.refresh, [c["pick"]], listed).then(
        instances, [instance], [instance]
    )


def _wire_trainings(a: TrainingsActions, c: dict[str, Any], form: dict[str, Any], stamp: Any) -> None:
    details = [
        c["job_status"],
        c["log"],
        c["plot"],
        c["samples"],
        c["downloads"],
        c["grid"],
        c["epoch"],
        c["shown"],
    ]
    listed = [c["table"], stamp, c["job"], *details]
    c["refresh"].click(a.refresh, [c["job"], c["shown"]], listed)
    c["poll"].change(a.refresh, page_inputs(c["job"], c["shown"]), listed, show_progress="hidden")
    # The page sets the job list's value itself at every refresh: only the user's choices open a job.
    c["table"].select(a.select_row, [c["table"], *page_inputs(c["shown"])], [c["job"], *details])
    c["job"].input(a.details, [c["job"], *page_inputs(c["shown"])], details)
    message = [c["action_message"]]
    for action in (a.cancel, a.resume):
        c[action.__name__].click(action, [c["job"]], message).then(a.refresh, [c["job"], c["shown"]], listed)
    deleting = c["delete_confirm"]
    c["delete"].click(a.ask_delete, [c["job"]], [*deleting.outputs, *message])
    deleting.yes.click(a.delete, [deleting.pending], [*deleting.outputs, *message]).then(
        a.refresh, [c["job"], c["shown"]], listed
    )
    wire_keep(deleting)
    c["duplicate"].click(
        a.duplicate, [c["job"], form["config"], form["config_default"]], [*_editor_outputs(form), *message]
    )
    c["continue"].click(a.continue_training, [c["job"]], message).then(
        a.refresh, [c["job"], c["shown"]], listed
    )
    c["send"].click(
        a.lora_prompt, [c["job"], c["epoch"], c["weight"]], [c["send_message"], c["lora_prompt"]]
    ).then(None, [c["lora_prompt"]], None, **js_only("(prompt) => trainManagementSendToTxt2img(prompt)"))


def _wire_datasets(a: DatasetActions, c: dict[str, Any], train_dataset: Any) -> None:
    opened = [c["report"], c["gallery"], c["image"], c["names"], c["labels"], c["preview"], c["caption"], c["message"]]  # fmt: skip
    tickets = [c["create_ticket"], c["validate_ticket"], c["health_ticket"]]
    outcome = [c["create_message"], c["dataset"], train_dataset, c["health"], *tickets, *opened]
    c["create"].click(
        a.create,
        [c["name"], c["subject"], c["repeats"], c["files"], c["folder"], c["preprocess"]],
        [c["create_message"], c["create_ticket"]],
    ).then(a.finished, tickets, outcome, show_progress="hidden")  # it may end before the poll sees it
    c["tasks_poll"].change(a.finished, page_inputs(*tickets), outcome, show_progress="hidden")
    c["refresh"].click(a.choices, [c["dataset"]], [c["dataset"]])
    c["dataset"].input(a.open, [c["dataset"]], opened)
    c["validate"].click(a.validate, [c["dataset"]], [c["report"], c["validate_ticket"]]).then(
        a.finished, tickets, outcome, show_progress="hidden"
    )
    c["check_health"].click(
        a.health, [c["dataset"], c["health_resolution"]], [c["health"], c["health_ticket"]]
    ).then(a.finished, tickets, outcome, show_progress="hidden")
    editor = [c["preview"], c["caption"], c["message"]]
    c["gallery"].select(a.pick_thumbnail, [c["dataset"], c["names"]], [c["image"], *editor])
    c["image"].input(a.select_image, [c["dataset"], c["image"]], editor)
    c["save"].click(
        a.save_caption,
        [c["dataset"], c["image"], c["caption"], c["names"], c["labels"]],
        [c["message"], c["gallery"], c["labels"]],
    )
    c["generate"].click(a.generate_caption, [c["dataset"], c["image"]], [c["caption"], c["message"]])
    image = c["image_confirm"]
    c["delete_image"].click(
        a.ask_delete_image, [c["dataset"], c["image"], c["names"]], [*image.outputs, c["message"]]
    )
    image.yes.click(a.delete_image, [image.pending], [*image.outputs, *opened])
    wire_keep(image)
    whole = c["dataset_confirm"]
    c["delete"].click(a.ask_delete_dataset, [c["dataset"]], [*whole.outputs, c["message"]])
    whole.yes.click(
        a.delete_dataset, [whole.pending], [*whole.outputs, c["message"], c["dataset"], train_dataset]
    )
    wire_keep(whole)


def _page_load(
    create: CreateJobActions,
    presets: PresetActions,
    datasets: DatasetActions,
    workers: WorkersActions,
    fm_default: str,
) -> Any:
    """The page's one load call (no inputs): every list the page shows, the model's family, the first dataset
    opened."""

    @read_only
    def page_load() -> tuple[Any, ...]:
        browse = datasets.choices(None)
        return (
            *create.page_choices(fm_default),
            presets.choices(None),
            *workers.refresh(None),
            browse,
            *datasets.open(browse["value"]),
        )

    return page_load


def _poll_marks(trainings: TrainingsActions, datasets: DatasetActions) -> Any:
    """The page's poll (no inputs): (the Trainings List's mark, the dataset tasks' mark)."""

    @read_only
    def poll_marks() -> tuple[str, str]:
        return trainings.mark(), datasets.tasks_mark()

    return poll_marks


def _script_loader(hooks: UiHooks) -> str:
    """The page's script: javascript/train_management.js (which the WebUI loads itself) run in the page by the
    standalone app, then the draft of the current FM type restored."""
    run = ""
    if hooks.load_script and SCRIPT.is_file():
        run = f"(0, eval)({json.dumps(SCRIPT.read_text(encoding='utf-8'))});"
    return f"() => {{ {run} if (typeof trainManagementStart === 'function') {{ trainManagementStart(); }} }}"


def create_tab(service: TrainingService, datasets: DatasetService, hooks: UiHooks | None = None) -> gr.Blocks:
    """The Train Management tab's Blocks (gradio 3.41 and 4.40); callbacks call the services only, and those that
    change anything refuse requests from other origins than the page's own and `hooks.origins`' (origin_guard)."""
    hooks = hooks or UiHooks()
    create_actions = CreateJobActions(service, hooks)
    preset_actions = PresetActions(PresetStore(service.home.root), create_actions)
    trainings = TrainingsActions(service, create_actions)
    dataset_actions = DatasetActions(datasets, hooks)
    worker_actions = WorkersActions(service, hooks.workers_locked)
    fm_default = next(iter(FM_LABELS))
    theme = offline_theme()
    with gr.Blocks(title="Train Management", css=TAB_CSS, analytics_enabled=False, theme=theme) as blocks:
        with gr.Column(elem_id=ELEM_ID):
            stamp = gr.HTML("<span></span>", elem_id=DELIVERY_STAMP_ID)
            with gr.Tabs(elem_id=elem("tabs")):
                with gr.Tab("Training", elem_id=elem("training_tab")):
                    with gr.Row():
                        with gr.Column(scale=2):
                            form = create_job_column(create_actions.default_config(fm_default), fm_default)
                            form["draft_sync"] = gr.Textbox(visible=False, elem_id=elem("draft_sync"))
                            workers = workers_panel(hooks.workers_locked)
                        with gr.Column(scale=3):
                            jobs = trainings_column(hooks.send_to_txt2img)
                with gr.Tab("Datasets", elem_id=elem("datasets_tab")):
                    data = datasets_area(hooks.interrogate is not None, dataset_actions.import_hint())
        _wire_create_job(create_actions, preset_actions, form)
        _wire_workers(worker_actions, workers, form["instance"], create_actions.instance_choices)
        _wire_trainings(trainings, jobs, form, stamp)
        _wire_datasets(dataset_actions, data, form["dataset"])
        uploads = S3UploadActions(service)
        data["s3_upload"].click(uploads.upload_dataset, [data["dataset"]], [data["s3_message"]])
        form["model_s3_upload"].click(uploads.upload_model, [form["model"]], [form["model_s3_message"]])
        # One poll per page (on gradio 3.41 each `every=` loop holds a queue worker): it reads only two short
        # marks; the Trainings List and the dataset tasks update when theirs changes.
        blocks.load(
            _poll_marks(trainings, dataset_actions),
            None,
            [jobs["poll"], data["tasks_poll"]],
            every=POLL_SECONDS,
            show_progress="hidden",
        )
        page = [form["instance"], form["model"], form["dataset"], form["model_info"], form["preset"]]
        page += [workers["table"], workers["pick"], data["dataset"], data["report"], data["gallery"]]
        page += [
            data["image"],
            data["names"],
            data["labels"],
            data["preview"],
            data["caption"],
            data["message"],
        ]
        blocks.load(
            _page_load(create_actions, preset_actions, dataset_actions, worker_actions, fm_default),
            None,
            page,
        )
        blocks.load(None, None, None, **js_only(_script_loader(hooks)))
    # Last, over every event wired above: what changes anything runs only for the page's own origin.
    guard_events(blocks, hooks.origins or GuardPolicy(hosts=None))
    return blocks
