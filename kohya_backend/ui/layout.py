"""The tab's components, built (not wired): each function builds one area inside the current layout block and
returns its components by name. No logic here; tab.py wires them to the callbacks."""

from __future__ import annotations

from typing import Any

import gradio as gr

from kohya_backend.config.format import reference_keys
from kohya_backend.ui.compat import file_input
from kohya_backend.ui.confirm import confirm_row
from kohya_backend.ui.dataset_actions import HEALTH_RESOLUTIONS, PREPROCESS_CHOICES
from kohya_backend.ui.present import FM_LABELS, JOB_HEADERS, WORKER_HEADERS

ELEM_ID = "train_management"
SMALL = {"size": "sm", "scale": 0, "min_width": 60}
WORKERS_INTRO = (
    "Train on another machine's GPU: start `python -m kohya_backend worker --host 0.0.0.0 --port 7870 "
    "--token-file token.txt` there (with `--create-token` the first time), then paste the URL it printed and "
    "the token from its token file here. Each worker becomes a Training Instance Type. Use https (a TLS reverse "
    "proxy) when the worker is not on your own network: the token travels with every request."
)


def elem(name: str) -> str:
    """The elem_id of one of the tab's components (every id starts with the tab's)."""
    return f"{ELEM_ID}_{name}"


def create_job_column(start_config: str, fm_default: str) -> dict[str, Any]:
    """The left column: where and what to train, the editor with its presets and key help, Format / Create."""
    c: dict[str, Any] = {}
    gr.Markdown("### Create a Training Job")
    with gr.Row():
        c["instance"] = gr.Dropdown(label="Training Instance Type", elem_id=elem("instance"), scale=4)
        c["refresh_instances"] = gr.Button("↻", elem_id=elem("refresh_instances"), **SMALL)
        c["gpus"] = gr.Number(
            value=1, precision=0, minimum=1, label="GPUs per job", elem_id=elem("gpus"), scale=1,
            info="more than 1: data-parallel, one process per GPU (train_batch_size is per GPU)",
        )  # fmt: skip
    c["fm"] = gr.Radio(list(FM_LABELS), value=fm_default, label="FM Type", elem_id=elem("fm_type"))
    with gr.Row():
        c["model"] = gr.Dropdown(label="Model", elem_id=elem("model"), scale=4)
        c["refresh_models"] = gr.Button("↻", elem_id=elem("refresh_models"), **SMALL)
        c["model_s3_upload"] = gr.Button("Upload to S3", elem_id=elem("model_s3_upload"), **SMALL)
    c["model_info"] = gr.Markdown(elem_id=elem("model_info"))
    c["model_s3_message"] = gr.Markdown(elem_id=elem("model_s3_message"))
    with gr.Row():
        c["dataset"] = gr.Dropdown(label="Dataset", elem_id=elem("dataset"), scale=4)
        c["refresh_datasets"] = gr.Button("↻", elem_id=elem("refresh_datasets"), **SMALL)
    with gr.Accordion("Presets", open=False, elem_id=elem("presets")):
        with gr.Row():
            c["preset"] = gr.Dropdown(label="Saved presets", elem_id=elem("preset"), scale=3)
            c["preset_load"] = gr.Button("Load", elem_id=elem("preset_load"), **SMALL)
            c["preset_delete"] = gr.Button("Delete", variant="stop", elem_id=elem("preset_delete"), **SMALL)
        with gr.Row():
            c["preset_name"] = gr.Textbox(label="Save the editor as", elem_id=elem("preset_name"), scale=3)
            c["preset_save"] = gr.Button("Save preset", elem_id=elem("preset_save"), **SMALL)
        c["preset_confirm"] = confirm_row(elem("preset_confirm"), "Delete preset")
        c["kohya_file"] = file_input(
            "Import a kohya_ss preset (.json): its sd-scripts keys go into the editor", file_count="single",
            file_types=[".json"], elem_id=elem("kohya_import"),
        )  # fmt: skip
        c["preset_message"] = gr.Markdown(elem_id=elem("preset_message"))
    c["config"] = gr.Textbox(
        value=start_config, label="config_params (TOML)", lines=20, max_lines=60, elem_id=elem("config"),
        elem_classes=["train-management-mono"],
    )  # fmt: skip
    c["config_default"] = gr.State(start_config)  # what the editor held before any edit (defaults, a preset)
    with gr.Accordion("Key help (the config reference)", open=False, elem_id=elem("key_help_panel")):
        c["key"] = gr.Dropdown(reference_keys(), label="Key", elem_id=elem("key"))
        c["key_help"] = gr.Markdown(elem_id=elem("key_help"))
    with gr.Row():
        c["format"] = gr.Button("Format config Params", elem_id=elem("format"))
        c["reset"] = gr.Button("Load FM Type defaults", elem_id=elem("reset"))
        c["create"] = gr.Button("Create Training Job", variant="primary", elem_id=elem("create"))
    c["editor_confirm"] = confirm_row(elem("editor_confirm"), "Replace my edits")
    c["create_message"] = gr.Markdown(elem_id=elem("create_message"))
    c["issues"] = gr.Markdown(elem_id=elem("issues"))
    c["plan"] = gr.Markdown(elem_id=elem("plan"))
    with gr.Accordion("Formatted config (canonical TOML, as it will be trained)", open=False):
        c["formatted"] = gr.Textbox(
            label="Canonical TOML", lines=12, interactive=False, elem_id=elem("formatted"),
            elem_classes=["train-management-mono"],
        )  # fmt: skip
    return c


def workers_panel(locked: str | None) -> dict[str, Any]:
    """The "Remote GPU workers" accordion."""
    c: dict[str, Any] = {}
    with gr.Accordion("Remote GPU workers", open=False, elem_id=elem("workers")):
        gr.Markdown(WORKERS_INTRO + (f"\n\n⚠️ {locked}" if locked else ""), elem_id=elem("workers_intro"))
        with gr.Row():
            c["url"] = gr.Textbox(
                label="Worker URL", placeholder="http://gpu-box:7870", elem_id=elem("worker_url"), scale=3
            )
            c["name"] = gr.Textbox(label="Name (optional)", elem_id=elem("worker_name"), scale=1)
        c["token"] = gr.Textbox(
            label="Token (from the worker's token file)", type="password", elem_id=elem("worker_token")
        )
        with gr.Row():
            c["add"] = gr.Button("Add worker", variant="primary", elem_id=elem("worker_add"))
            c["pick"] = gr.Dropdown(label="Registered worker", elem_id=elem("worker_pick"), scale=2)
            c["remove"] = gr.Button("Remove worker", variant="stop", elem_id=elem("worker_remove"))
            c["refresh"] = gr.Button("↻", elem_id=elem("workers_refresh"), **SMALL)
        c["message"] = gr.Markdown(elem_id=elem("worker_message"))
        c["table"] = gr.Dataframe(
            headers=WORKER_HEADERS, datatype=["str"] * len(WORKER_HEADERS), type="array", interactive=False,
            wrap=True, elem_id=elem("workers_table"),
        )  # fmt: skip
    return c


def trainings_column(send_to_txt2img: bool) -> dict[str, Any]:
    """The right column: the Trainings List and the selected job."""
    c: dict[str, Any] = {}
    with gr.Row():
        gr.Markdown("### Trainings List")
        c["refresh"] = gr.Button("↻ Refresh", elem_id=elem("refresh_jobs"), **SMALL)
    c["table"] = gr.Dataframe(
        headers=JOB_HEADERS, datatype=["str"] * len(JOB_HEADERS), type="array", interactive=False, wrap=False,
        elem_id=elem("jobs"),
    )  # fmt: skip
    c["job"] = gr.Dropdown(label="Job", elem_id=elem("job"))
    c["job_status"] = gr.Markdown(elem_id=elem("job_status"))
    with gr.Row():
        c["cancel"] = gr.Button("Cancel", elem_id=elem("cancel"))
        c["resume"] = gr.Button("Resume", elem_id=elem("resume"))
        c["duplicate"] = gr.Button("Duplicate", elem_id=elem("duplicate"))
        c["continue"] = gr.Button("Continue training", elem_id=elem("continue"))
        c["delete"] = gr.Button("Delete", variant="stop", elem_id=elem("delete"))
    c["delete_confirm"] = confirm_row(elem("delete_confirm"), "Delete job")
    c["action_message"] = gr.Markdown(elem_id=elem("action_message"))
    c["downloads"] = gr.File(
        label="Downloads (LoRA, epoch grid, samples)", file_count="multiple", interactive=False,
        elem_id=elem("downloads"),
    )  # fmt: skip
    c["shown"] = gr.State("")  # what the page shows of the selected job (so nothing unchanged is sent again)
    c["log"] = gr.Textbox(
        label="Log (tail)", lines=8, max_lines=30, interactive=False, elem_id=elem("log"),
        elem_classes=["train-management-mono"],
    )  # fmt: skip
    c["plot"] = gr.LinePlot(
        x="step", y="value", color="series", title="Loss", x_title="step", y_title="loss", height=260,
        label="Loss", elem_id=elem("loss_plot"),
    )  # fmt: skip
    c["samples"] = gr.Gallery(label="Samples", columns=4, height=260, elem_id=elem("samples"))
    with gr.Accordion("Compare epochs", open=False, elem_id=elem("epochs_panel")):
        c["grid"] = gr.Image(
            label="Epoch comparison (rows: sample prompts; columns: the base model, each saved epoch, final)",
            type="filepath", interactive=False, elem_id=elem("grid"),
        )  # fmt: skip
        with gr.Row():
            c["epoch"] = gr.Dropdown(label="Epoch", elem_id=elem("epoch"), scale=2)
            c["weight"] = gr.Slider(
                0.0, 2.0, value=1.0, step=0.05, label="Weight", elem_id=elem("weight"), scale=2
            )
            c["send"] = gr.Button(
                "Send to txt2img", elem_id=elem("send_txt2img"), visible=send_to_txt2img, scale=1
            )
        c["send_message"] = gr.Markdown(elem_id=elem("send_message"))
        c["lora_prompt"] = gr.Textbox(visible=False, elem_id=elem("lora_prompt"))
    # The auto-refresh polls only this hidden text; the list and the job's details update when it changes.
    c["poll"] = gr.Textbox(visible=False, elem_id=elem("poll"))
    return c


def datasets_area(has_interrogate: bool, import_hint: str) -> dict[str, Any]:
    """The Datasets sub-tab."""
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### Create a dataset")
            gr.Markdown(import_hint, elem_id=elem("ds_hint"))
            c["name"] = gr.Textbox(label="Dataset name", elem_id=elem("ds_name"))
            with gr.Row():
                c["subject"] = gr.Textbox(
                    label="Subject (class token; default: the name)", elem_id=elem("ds_subject")
                )
                c["repeats"] = gr.Number(value=10, precision=0, label="Repeats", elem_id=elem("ds_repeats"))
            c["files"] = file_input(
                "Images and captions (.txt of the same name), or a zip (keeps <repeats>_<name> subfolders)",
                file_count="multiple", file_types=["image", ".txt", ".caption", ".tags", ".zip"],
                elem_id=elem("ds_files"),
            )  # fmt: skip
            c["folder"] = file_input(
                "…or a folder's files (its subfolders are not kept: zip a folder of <repeats>_<name> subfolders)",
                file_count="directory", elem_id=elem("ds_folder"),
            )  # fmt: skip
            c["preprocess"] = gr.Radio(
                list(PREPROCESS_CHOICES), value="none", label="Preprocessing", elem_id=elem("ds_preprocess")
            )
            c["create"] = gr.Button("Create dataset", variant="primary", elem_id=elem("ds_create"))
            c["create_message"] = gr.Markdown(elem_id=elem("ds_create_message"))
            # Background tasks' tickets (3.41; gradio 4 keeps them per page on the server), and their poll.
            c["create_ticket"] = gr.State("")
            c["validate_ticket"] = gr.State("")
            c["health_ticket"] = gr.State("")
            c["tasks_poll"] = gr.Textbox(visible=False, elem_id=elem("ds_tasks_poll"))
        with gr.Column(scale=2):
            gr.Markdown("### Browse, caption and validate")
            with gr.Row():
                c["dataset"] = gr.Dropdown(label="Dataset", elem_id=elem("ds_dataset"), scale=4)
                c["refresh"] = gr.Button("↻", elem_id=elem("ds_refresh"), **SMALL)
            c["report"] = gr.Markdown(elem_id=elem("ds_report"))
            with gr.Row():
                c["validate"] = gr.Button("Validate (decode every image)", elem_id=elem("ds_validate"))
                c["health_resolution"] = gr.Radio(
                    list(HEALTH_RESOLUTIONS), value=next(iter(HEALTH_RESOLUTIONS)), label="Train at",
                    elem_id=elem("ds_health_resolution"),
                )  # fmt: skip
                c["check_health"] = gr.Button("Health report", elem_id=elem("ds_check_health"))
            c["health"] = gr.Markdown(elem_id=elem("ds_health"))
            # No enlarged preview inside the gallery: a click opens the image in the editor below (its own preview).
            c["gallery"] = gr.Gallery(
                label="Images", columns=6, height=300, allow_preview=False, elem_id=elem("ds_gallery")
            )
            c["names"] = gr.State([])  # the images of the gallery's thumbnails, in order
            c["labels"] = gr.State([])  # and their labels (first caption lines)
            c["image"] = gr.Dropdown(label="Image", elem_id=elem("ds_image"))
            with gr.Row():
                c["preview"] = gr.Image(
                    label="Image", type="pil", interactive=False, height=320, elem_id=elem("ds_preview")
                )
                with gr.Column():
                    c["caption"] = gr.Textbox(label="Caption", lines=4, elem_id=elem("ds_caption"))
                    with gr.Row():
                        c["save"] = gr.Button("Save caption", variant="primary", elem_id=elem("ds_save"))
                        c["generate"] = gr.Button(
                            "Generate caption", visible=has_interrogate, elem_id=elem("ds_generate")
                        )
                        c["delete_image"] = gr.Button(
                            "Delete image", variant="stop", elem_id=elem("ds_delete_image")
                        )
                    c["image_confirm"] = confirm_row(elem("ds_image_confirm"), "Delete image")
                    c["message"] = gr.Markdown(elem_id=elem("ds_message"))
            c["delete"] = gr.Button("Delete dataset", variant="stop", elem_id=elem("ds_delete"))
            c["dataset_confirm"] = confirm_row(elem("ds_dataset_confirm"), "Delete dataset")
            with gr.Row():
                c["s3_upload"] = gr.Button("Upload to S3", elem_id=elem("ds_s3_upload"), **SMALL)
                c["s3_message"] = gr.Markdown(elem_id=elem("ds_s3_message"))
    return c
