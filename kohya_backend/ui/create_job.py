"""Callbacks of "Create a Training Job": choices, model family check, default config, the editor's fills, format,
submit.

Each is a small function over TrainingService; errors become messages in the tab, never gradio exceptions. Format
and Create own the same message areas (message, issues, plan) and replace all of them each time, so no answer is
ever shown under another's. Whatever replaces the editor's text (defaults, a preset, Duplicate) asks first when
the text was edited (the question and what it would do go to the editor's confirmation row).
"""

from __future__ import annotations

import json
import time
from typing import Any

import gradio as gr
import tomlkit

from kohya_backend.config.format import key_reference
from kohya_backend.config.schema import template_toml
from kohya_backend.errors import TrainManagementError
from kohya_backend.families import FAMILIES
from kohya_backend.service.home import NotInHome
from kohya_backend.service.training import Submission, TrainingService
from kohya_backend.ui.choices import dropdown
from kohya_backend.ui.confirm import ask, dismissed
from kohya_backend.ui.hooks import UiHooks
from kohya_backend.ui.origin_guard import read_only
from kohya_backend.ui.present import (
    FAMILY_LABELS,
    error_markdown,
    fm_label_of,
    fm_type_of,
    instance_choice,
    instance_name,
    no_datasets_markdown,
    no_models_markdown,
    plan_markdown,
    warnings_markdown,
)

# What fill() and apply_fill() return, in this order: the editor's text and its unedited baseline, the FM type,
# instance, model and dataset fields, the model's family line, the draft the page keeps (javascript), and the
# editor's confirmation row (row, question, pending fill).
EDITOR_FIELDS = ("config", "config_default", "fm", "instance", "model", "dataset", "model_info", "draft_sync")


def _edited(text: str | None, baseline: str | None) -> bool:
    return bool((text or "").strip()) and (text or "").strip() != (baseline or "").strip()


def draft_record(fm_label: str, text: str) -> str:
    """The hidden draft_sync value: the page's script stores `text` as the draft of that FM type (the nonce makes
    every fill a change, even one that puts the same text back)."""
    return json.dumps({"fm": fm_type_of(fm_label), "text": text, "n": time.time_ns()})


def stamp() -> str:
    """The time an answer was made, so a repeated press visibly ran."""
    return time.strftime("%H:%M:%S")


class CreateJobActions:
    """The left column's callbacks, bound to one TrainingService and the host's hooks."""

    def __init__(self, service: TrainingService, hooks: UiHooks) -> None:
        self.service = service
        self.hooks = hooks

    # -- choices ---------------------------------------------------------------------------------------------

    def default_config(self, fm_label: str, instance: str | None = None) -> str:
        """The starting config_params of an FM type for the machine `instance` trains on (default: the first
        Training Instance Type, the one the page starts with): the host's (demo) or the schema's template."""
        fm_type = fm_type_of(fm_label)
        if self.hooks.default_config is not None:
            return self.hooks.default_config(fm_type)
        try:
            name = instance_name(instance) if instance else self.service.instance_types()[0]["name"]
            cuda = self.service.instance_cuda(name)
        except (TrainManagementError, IndexError):
            cuda = True  # unknown: the template as kohya's tools write it; Format judges it for the machine
        doc = tomlkit.parse(template_toml(fm_type, cuda=cuda))
        doc["save_state"] = True  # jobs save their state for an exact Resume unless the user turns it off
        return tomlkit.dumps(doc)

    @read_only
    def instance_choices(self, current: str | None = None) -> Any:
        """Training Instance Type choices (this machine with its GPUs or CPU; remote workers when configured)."""
        return dropdown([instance_choice(entry) for entry in self.service.instance_types()], current)

    @read_only
    def model_choices(self, current: str | None = None) -> Any:
        """Model dropdown choices: the checkpoint names, then the S3 prefix's s3:// ones (no file is read)."""
        return dropdown(self.service.model_names(), current)

    @read_only
    def dataset_choices(self, current: str | None = None) -> Any:
        """Dataset dropdown choices: the dataset folder names, then the S3 prefix's (none is scanned)."""
        return dropdown(self.service.dataset_names(), current)

    def page_choices(self, fm_label: str) -> tuple[Any, Any, Any, str]:
        """What the page loads with (no inputs): instance, model and dataset choices, and the model's family."""
        models = self.model_choices(None)
        return (
            self.instance_choices(None),
            models,
            self.dataset_choices(None),
            self.model_info(models["value"], fm_label),
        )

    # -- the model's family ------------------------------------------------------------------------------------

    @read_only
    def model_info(self, model: str | None, fm_label: str) -> str:
        """The chosen model's detected family, flagged when it does not match the FM type; without a model, where
        to put one."""
        if not model:
            if not self.service.model_names():
                return no_models_markdown(str(root) for root in self.service.home.model_roots)
            return "Choose a model."
        try:
            entry = self.service.describe_model(model)  # read once per file version, then cached
        except NotInHome:
            return f"**{model}** is no longer in the models folder: press ↻."
        except TrainManagementError as exc:
            return error_markdown(exc)
        if entry["error"]:
            return f"**{model}** cannot be read: {entry['error']}"
        family = str(entry["family"])
        wanted = fm_type_of(fm_label)
        label = FAMILY_LABELS.get(family, family)
        if family != wanted:
            hint = f"choose FM Type {fm_label_of(family)}" if family in FAMILIES else "choose another model"
            return f"⚠️ **{model}** is a **{label}** checkpoint, but FM Type is **{fm_label}**: {hint}."
        return f"Detected family: **{label}** (matches the FM Type)."

    # -- the editor --------------------------------------------------------------------------------------------

    def fill(self, fill: dict[str, Any], current: str, baseline: str) -> tuple[Any, ...]:
        """Put `fill` (text, default, fm and optionally instance, model, dataset, what) in the editor, or ask
        first when the editor holds edits: EDITOR_FIELDS then the confirmation row's (row, question, pending)."""
        if _edited(current, baseline):
            question = f"Replace your edits in config_params with {fill.get('what', 'this config')}?"
            return (*[gr.update()] * len(EDITOR_FIELDS), *ask(question, fill))
        return self.apply_fill(fill)

    @read_only
    def apply_fill(self, fill: dict[str, Any] | None) -> tuple[Any, ...]:
        """What fill() does once confirmed (None: nothing was asked). A fill that keeps the chosen model but may
        change the FM type names that model as `chosen_model`, so its family line is judged again."""
        if not fill:
            return (*[gr.update()] * len(EDITOR_FIELDS), *dismissed())
        fm_label = str(fill["fm"])
        instance = gr.update() if fill.get("instance") is None else self.instance_choices(fill["instance"])
        model = gr.update() if fill.get("model") is None else self.model_choices(fill["model"])
        dataset = gr.update() if fill.get("dataset") is None else self.dataset_choices(fill["dataset"])
        info: Any = gr.update()
        if fill.get("model") is not None:
            info = self.model_info(fill["model"], fm_label)
        elif "chosen_model" in fill:
            info = self.model_info(fill["chosen_model"], fm_label)
        text = str(fill["text"])
        return (
            text, fill.get("default", text), fm_label, instance, model, dataset, info,
            draft_record(fm_label, text), *dismissed(),
        )  # fmt: skip

    @read_only
    def reset_config(
        self, fm_label: str, instance: str | None, current: str, baseline: str
    ) -> tuple[Any, ...]:
        """Load FM Type defaults (for the chosen instance), asking first when the editor holds edits."""
        text = self.default_config(fm_label, instance)
        fill = {"text": text, "default": text, "fm": fm_label, "what": f"the {fm_label} defaults"}
        return self.fill(fill, current, baseline)

    @read_only
    def fm_changed(self, fm_label: str, draft: str, baseline: str, instance: str | None) -> tuple[Any, ...]:
        """Another FM type: the editor shows that type's draft (the page's script passes it in `draft`; the one
        just left stays in its own draft) or its defaults. (config, baseline, draft_sync, model info is
        refreshed separately)."""
        default = self.default_config(fm_label, instance)
        text = draft if (draft or "").strip() else default
        return text, default, draft_record(fm_label, text)

    @read_only
    def instance_changed(
        self, instance: str | None, fm_label: str, text: str, baseline: str
    ) -> tuple[Any, Any]:
        """Another Training Instance Type: unedited defaults follow it (fp16 only where a CUDA GPU trains);
        edits are kept. (config, baseline)."""
        default = self.default_config(fm_label, instance)
        if _edited(text, baseline) or text.strip() == default.strip():
            return gr.update(), baseline
        return default, default

    # -- format and submit -------------------------------------------------------------------------------------

    @read_only
    def format_config(
        self,
        instance: str | None,
        fm_label: str,
        model: str | None,
        dataset: str | None,
        text: str,
        gpus: float | None = 1,
    ) -> tuple[str, str, str, str]:
        """(canonical TOML, message, issues and warnings, plan) of config_params with the chosen model and dataset;
        the message area is emptied (an older refusal is not this answer)."""
        try:
            formatted = self.service.format_config(
                text or "",
                fm_type_of(fm_label),
                model=model,
                dataset=dataset,
                instance_type=instance_name(instance) if instance else "local",
                gpus=_gpus(gpus),
            )
        except TrainManagementError as exc:
            return "", "", f"Checked at {stamp()}:\n\n" + error_markdown(exc), ""
        warnings = warnings_markdown(formatted["warnings"])
        issues = f"No problems found (checked at {stamp()})." + (f"\n\n{warnings}" if warnings else "")
        plan = plan_markdown(formatted)
        if not dataset:
            plan = (
                no_datasets_markdown(str(self.service.home.datasets))
                if not self.service.dataset_names()
                else plan
            )
        return formatted["toml"], "", issues, plan

    def submit(
        self,
        instance: str | None,
        fm_label: str,
        model: str | None,
        dataset: str | None,
        text: str,
        gpus: float | None = 1,
    ) -> tuple[str, str, str]:
        """Queue a job (the scheduler trains it); (message, issues, plan): the job's id, or every reason it was
        refused (issues and plan are emptied: they belonged to an earlier Format)."""
        reasons = self._missing(instance, model, dataset) + self._family(model, fm_label)
        if not reasons:
            try:
                job = self.service.submit(
                    Submission(
                        model=str(model),
                        dataset=str(dataset),
                        fm_type=fm_type_of(fm_label),
                        config_params=text or "",
                        instance_type=instance_name(instance),
                        gpus=_gpus(gpus),
                    )
                )
            except TrainManagementError as exc:
                reasons.append(error_markdown(exc))
            else:
                return (
                    f"✅ Job **{job.id}** queued (output name `{job.output_name}`); follow it in the Trainings List.",
                    "",
                    "",
                )
        for reason in self._config_reasons(instance, fm_label, model, dataset, text):
            if reason not in reasons:
                reasons.append(reason)
        listed = "\n\n".join(f"{n}. {r}" for n, r in enumerate(reasons, start=1))
        return f"❌ **The job was refused** ({len(reasons)} reason(s), at {stamp()}):\n\n{listed}", "", ""

    def _missing(self, instance: str | None, model: str | None, dataset: str | None) -> list[str]:
        """What the form lacks, as reasons."""
        reasons = []
        if not instance:
            reasons.append("**no Training Instance Type is chosen**\n\nHint: choose where to train")
        if not model:
            home = self.service.home
            where = (
                no_models_markdown(str(r) for r in home.model_roots) if not self.service.model_names() else ""
            )
            reasons.append(
                "**no model is chosen**"
                + (f"\n\nHint: {where}" if where else "\n\nHint: choose one in Model")
            )
        if not dataset:
            where = (
                "" if self.service.dataset_names() else no_datasets_markdown(str(self.service.home.datasets))
            )
            reasons.append(
                "**no dataset is chosen**"
                + (f"\n\nHint: {where}" if where else "\n\nHint: choose one in Dataset")
            )
        return reasons

    def _family(self, model: str | None, fm_label: str) -> list[str]:
        """The chosen model's family problem (another family, unreadable, gone), as a reason."""
        if not model:
            return []
        info = self.model_info(model, fm_label)
        return [info] if info.startswith("⚠️") or "cannot be read" in info or "no longer" in info else []

    def _config_reasons(
        self, instance: str | None, fm_label: str, model: str | None, dataset: str | None, text: str
    ) -> list[str]:
        """The config's and the dataset's problems, as reasons (what Format would show)."""
        try:
            formatted = self.service.format_config(
                text or "",
                fm_type_of(fm_label),
                model=model or None,
                dataset=dataset or None,
                instance_type=instance_name(instance) if instance else "local",
            )
        except TrainManagementError as exc:
            return [error_markdown(exc)]
        return [plan_markdown(formatted)] if formatted.get("dataset_error") else []

    @read_only
    def key_help(self, key: str | None) -> str:
        """The config reference of one key (the editor's help panel)."""
        return key_reference(key) if key else "Choose a key to see its type, defaults and allowed values."


def _gpus(value: float | None) -> int:
    """The GPUs per job field's number (a whole number: the field has no decimals; empty means 1)."""
    return 1 if value is None else int(value)
