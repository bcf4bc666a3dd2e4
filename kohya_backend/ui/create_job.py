"""Callbacks of "Create a Training Job": choices, model family check, default config, format, submit.

Each is a small function over TrainingService; errors become messages in the tab, never gradio exceptions.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from kohya_backend.config.schema import template_toml
from kohya_backend.errors import TrainManagementError
from kohya_backend.service.home import NotInHome
from kohya_backend.service.training import Submission, TrainingService
from kohya_backend.ui.choices import dropdown
from kohya_backend.ui.hooks import UiHooks
from kohya_backend.ui.present import (
    FAMILY_LABELS,
    error_markdown,
    fm_label_of,
    fm_type_of,
    instance_choice,
    instance_name,
    plan_markdown,
    warnings_markdown,
)


class CreateJobActions:
    """The left column's callbacks, bound to one TrainingService and the host's hooks."""

    def __init__(self, service: TrainingService, hooks: UiHooks) -> None:
        self.service = service
        self.hooks = hooks

    def default_config(self, fm_label: str) -> str:
        """The starting config_params of an FM type: the host's (demo) or the schema's template."""
        fm_type = fm_type_of(fm_label)
        if self.hooks.default_config is not None:
            return self.hooks.default_config(fm_type)
        # One listing (it may run nvidia-smi): cuda None is a worker not heard from yet, which counts as a GPU.
        gpu_somewhere = any(e.get("cuda") is not False for e in self.service.instance_types())
        return template_toml(fm_type, cuda=gpu_somewhere)

    def instance_choices(self, current: str | None = None) -> Any:
        """Training Instance Type choices (this machine with its GPUs or CPU; remote workers when configured)."""
        return dropdown([instance_choice(entry) for entry in self.service.instance_types()], current)

    def model_choices(self, current: str | None = None) -> Any:
        """Model dropdown choices: the checkpoint names, then the S3 prefix's s3:// ones (no file is read)."""
        return dropdown(self.service.model_names(), current)

    def dataset_choices(self, current: str | None = None) -> Any:
        """Dataset dropdown choices: the dataset folder names, then the S3 prefix's (none is scanned)."""
        return dropdown(self.service.dataset_names(), current)

    def all_choices(
        self, instance: str | None, model: str | None, dataset: str | None
    ) -> tuple[Any, Any, Any]:
        """Instance type, model and dataset choices at once (when the page loads)."""
        return self.instance_choices(instance), self.model_choices(model), self.dataset_choices(dataset)

    def model_info(self, model: str | None, fm_label: str) -> str:
        """The chosen model's detected family, flagged when it does not match the FM type."""
        if not model:
            return "No model chosen: put a checkpoint in the models folder and press refresh."
        try:
            entry = self.service.describe_model(model)  # read once per file version, then cached
        except NotInHome:
            return f"**{model}** is no longer in the models folder: press refresh."
        except TrainManagementError as exc:
            return error_markdown(exc)
        if entry["error"]:
            return f"**{model}** cannot be read: {entry['error']}"
        family = str(entry["family"])
        wanted = fm_type_of(fm_label)
        label = FAMILY_LABELS.get(family, family)
        if family != wanted:
            hint = (
                f"choose FM Type {fm_label_of(family)}"
                if family in ("sd_1_5", "sd_xl")
                else "choose another model"
            )
            return f"⚠️ **{model}** is a **{label}** checkpoint, but FM Type is **{fm_label}**: {hint}."
        return f"Detected family: **{label}** (matches the FM Type)."

    def fm_changed(self, fm_label: str, text: str, last_default: str) -> tuple[Any, str]:
        """Re-fill config_params with the new FM type's defaults unless the user edited them."""
        new_default = self.default_config(fm_label)
        if text.strip() and text.strip() != (last_default or "").strip():
            return gr.update(), last_default
        return gr.update(value=new_default), new_default

    def reset_config(self, fm_label: str) -> tuple[str, str]:
        """The FM type's defaults, replacing whatever the editor holds."""
        text = self.default_config(fm_label)
        return text, text

    def format_config(
        self, instance: str | None, fm_label: str, model: str | None, dataset: str | None, text: str
    ) -> tuple[str, str, str]:
        """(canonical TOML, issues and warnings, plan) of config_params with the chosen model and dataset."""
        try:
            formatted = self.service.format_config(
                text or "",
                fm_type_of(fm_label),
                model=model,
                dataset=dataset,
                instance_type=instance_name(instance) if instance else "local",
            )
        except TrainManagementError as exc:
            return "", error_markdown(exc), ""
        issues = warnings_markdown(formatted["warnings"]) or "No problems found."
        return formatted["toml"], issues, plan_markdown(formatted)

    def submit(
        self, instance: str | None, fm_label: str, model: str | None, dataset: str | None, text: str
    ) -> str:
        """Queue a job (the scheduler trains it); the message gives its id, or every reason it was refused."""
        try:
            if not model:
                raise TrainManagementError("no model is chosen", "choose a checkpoint in Model")
            if not dataset:
                raise TrainManagementError("no dataset is chosen", "choose or create a dataset")
            job = self.service.submit(
                Submission(
                    model=model,
                    dataset=dataset,
                    fm_type=fm_type_of(fm_label),
                    config_params=text or "",
                    instance_type=instance_name(instance),
                )
            )
        except TrainManagementError as exc:
            return "❌ **The job was refused.**\n\n" + error_markdown(exc)
        return (
            f"✅ Job **{job.id}** queued (output name `{job.output_name}`); follow it in the Trainings List."
        )
