"""Callbacks of the editor's Presets panel: save the editor as a named preset, load one (asking first when the
editor holds edits), delete one (asking first), and import a kohya_ss GUI preset (JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.service.presets import PresetStore, import_kohya_ss
from kohya_backend.ui.choices import dropdown
from kohya_backend.ui.compat import uploaded_paths
from kohya_backend.ui.confirm import ask, dismissed
from kohya_backend.ui.create_job import CreateJobActions
from kohya_backend.ui.origin_guard import read_only
from kohya_backend.ui.present import error_markdown, fm_label_of, fm_type_of

MAX_IMPORT_BYTES = 1 << 20


class PresetActions:
    """The Presets panel's callbacks, over one PresetStore; loading and importing go through the editor's fill."""

    def __init__(self, store: PresetStore, editor: CreateJobActions) -> None:
        self.store = store
        self.editor = editor

    @read_only
    def choices(self, current: str | None = None) -> Any:
        """The saved presets."""
        names = self.store.names()
        return dropdown(names, current if current in names else None)

    def save(self, name: str, text: str, fm_label: str) -> tuple[str, Any]:
        """Save the editor as preset `name` (replacing one of that name); (message, preset choices)."""
        try:
            preset = self.store.save((name or "").strip(), text or "", fm_type_of(fm_label))
        except TrainManagementError as exc:
            return "❌ " + error_markdown(exc), self.choices(None)
        return f"Saved preset **{preset.name}** ({fm_label}).", self.choices(preset.name)

    @read_only
    def load(
        self, name: str | None, fm_label: str, current: str, baseline: str, model: str | None = None
    ) -> tuple[Any, ...]:
        """Put preset `name` (and its FM type) in the editor: the editor's fill outputs, then a message. The chosen
        `model`'s family line is judged again for the preset's FM type."""
        if not name:
            return (*self.editor.apply_fill(None), "Choose a preset to load.")
        try:
            preset = self.store.load(name)
        except TrainManagementError as exc:
            return (*self.editor.apply_fill(None), "❌ " + error_markdown(exc))
        label = fm_label_of(preset.fm_type) if preset.fm_type else fm_label
        fill = {"text": preset.text, "default": preset.text, "fm": label, "chosen_model": model,
                "what": f"preset **{preset.name}**"}  # fmt: skip
        done = f"Loaded preset **{preset.name}** ({label})."
        return (*self.editor.fill(fill, current, baseline), done)

    @read_only
    def ask_delete(self, name: str | None) -> tuple[Any, ...]:
        """Ask before deleting a preset: (row, question, pending, message)."""
        if not name:
            return (*dismissed(), "Choose a preset to delete.")
        return (*ask(f"Delete preset **{name}**?", name), "")

    def delete(self, name: str | None) -> tuple[Any, ...]:
        """Delete the preset named when it was asked: (row, question, pending, message, preset choices)."""
        if not name:
            return (*dismissed(), "", self.choices(None))
        try:
            self.store.delete(name)
        except TrainManagementError as exc:
            return (*dismissed(), "❌ " + error_markdown(exc), self.choices(None))
        return (*dismissed(), f"Deleted preset **{name}**.", self.choices(None))

    @read_only
    def import_kohya(self, upload: Any, fm_label: str, current: str, baseline: str) -> tuple[Any, ...]:
        """Put a kohya_ss preset's sd-scripts keys in the editor and say which keys were left out and why."""
        files = uploaded_paths(upload)
        if not files:
            return (*self.editor.apply_fill(None), "Choose a kohya_ss preset (.json) to import.")
        name, path = files[0]
        try:
            if Path(path).stat().st_size > MAX_IMPORT_BYTES:
                raise TrainManagementError(f"{name} is larger than 1 MiB", "a kohya_ss preset is a few KiB")
            result = import_kohya_ss(Path(path).read_text(encoding="utf-8"))
        except (TrainManagementError, UnicodeDecodeError, OSError) as exc:
            text = error_markdown(exc) if isinstance(exc, TrainManagementError) else str(exc)
            return (*self.editor.apply_fill(None), f"❌ **{name} was not imported.** {text}")
        header = f"# Imported from the kohya_ss preset {name}\n"
        # a GUI preset's `sdxl` checkbox chooses the FM type
        label = fm_label_of(result.fm_type) if result.fm_type else fm_label
        fill = {"text": header + result.toml, "default": header + result.toml, "fm": label,
                "what": f"the keys imported from **{name}**"}  # fmt: skip
        message = f"Imported {len(result.imported)} key(s) from **{name}**."
        if label != fm_label:
            message += f" It is a {label} preset: FM Type is now {label}."
        message += "".join(f"\n- {note}" for note in result.notes)
        if result.not_imported:
            message += f" Not imported ({len(result.not_imported)}):\n" + "\n".join(
                f"- `{key}`: {why}" for key, why in result.not_imported.items()
            )
        return (*self.editor.fill(fill, current, baseline), message)
