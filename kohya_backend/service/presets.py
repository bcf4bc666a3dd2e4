"""Named config presets, kept in the home folder, and the import of a kohya_ss GUI preset.

Presets are `HOME/presets/<name>.toml`, each the config_params text as the user saved it, plus the FM type it was
saved for (a first comment line). (The editor's unsaved drafts are kept by the page's script, per browser, in
localStorage: javascript/train_management.js.) A kohya_ss GUI preset (JSON) is imported as kohya_ss itself turns
it into sd-scripts arguments: a whole GUI preset is read by config/kohya_gui.py (LoRA_type, optimizer, epoch,
max_resolution, lr_warmup, ... become the keys the GUI passes on, 0 meaning "unset" where the GUI leaves it out),
a JSON of a few keys key by key (its own names for a few keys, 0 meaning "unset" for others); the keys this
trainer reads with values it accepts are kept, everything else (the folders the tab sets, paths of the machine
that saved it) is reported as not imported, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kohya_backend.config.kohya_gui import is_gui_config, translate_gui_config
from kohya_backend.config.parse import ValueProblem, coerce_value
from kohya_backend.config.schema import FM_TYPES, SCHEMA, UNSUPPORTED, check_fm_type, render_toml
from kohya_backend.errors import ConfigError, TrainManagementError
from kohya_backend.fileio import atomic_write
from kohya_backend.service.datasets import check_name

PRESETS_FOLDER = "presets"
MAX_TEXT_BYTES = 256 * 1024  # a config is a few KiB; this bounds what a page can make the server write
FM_LINE = "# fm_type = "
# Keys the tab fills from its own fields (Model, Dataset, the Lora folder): a preset's values for them name
# folders of the machine that saved it.
TAB_KEYS = ("pretrained_model_name_or_path", "train_data_dir", "output_dir")
# kohya_ss's GUI names of sd-scripts keys (its lora_gui passes them on under the sd-scripts name).
GUI_NAMES = {"optimizer": "optimizer_type", "max_resolution": "resolution"}
# Keys kohya_ss passes to sd-scripts only when they are not 0: in its preset 0 means unset (unet_lr 0: the
# learning_rate; seed 0: a random seed; max_train_epochs 0: no epoch limit).
ZERO_IS_UNSET = frozenset(
    {
        "ip_noise_gamma", "max_timestep", "max_train_epochs", "max_train_steps", "min_snr_gamma", "min_timestep",
        "multires_noise_iterations", "noise_offset", "sample_every_n_epochs", "sample_every_n_steps",
        "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_epochs_state",
        "save_last_n_steps", "save_last_n_steps_state", "seed", "stop_text_encoder_training", "text_encoder_lr",
        "unet_lr", "v_pred_like_loss", "vae_batch_size",
    }
)  # fmt: skip


@dataclass
class Preset:
    """One saved preset: its name, the FM type it was saved for and its config_params text."""

    name: str
    fm_type: str | None
    text: str


@dataclass
class KohyaImport:
    """A kohya_ss preset turned into config_params: the TOML, the keys imported, and the others with why not."""

    toml: str
    imported: list[str] = field(default_factory=list)
    not_imported: dict[str, str] = field(default_factory=dict)
    fm_type: str | None = None  # a GUI preset's model type (its `sdxl` checkbox)
    notes: list[str] = field(default_factory=list)  # how the GUI's own settings were read


def _check_text(text: str) -> str:
    data = text.encode("utf-8")
    if len(data) > MAX_TEXT_BYTES:
        raise TrainManagementError(
            f"the config is {len(data) // 1024} KiB long, more than {MAX_TEXT_BYTES // 1024} KiB",
            "a config_params is a few KiB: remove what is not a config key",
        )
    return text


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary name and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


class PresetStore:
    """Named presets under HOME/presets."""

    def __init__(self, home_root: Path) -> None:
        self.folder = Path(home_root) / PRESETS_FOLDER

    def names(self) -> list[str]:
        """The saved presets' names, sorted."""
        if not self.folder.is_dir():
            return []
        return sorted(
            p.stem for p in self.folder.glob("*.toml") if p.is_file() and not p.name.startswith(".")
        )

    def _path(self, name: str) -> Path:
        return self.folder / f"{check_name(name, 'preset name')}.toml"

    def save(self, name: str, text: str, fm_type: str | None = None) -> Preset:
        """Save (or replace) a preset."""
        if fm_type is not None:
            check_fm_type(fm_type)
        path = self._path(name)
        body = _check_text(text or "")
        _write_atomic(path, (f"{FM_LINE}{fm_type}\n" if fm_type else "") + body)
        return Preset(path.stem, fm_type, body)

    def load(self, name: str) -> Preset:
        """A saved preset; TrainManagementError naming the saved ones when there is none of that name."""
        path = self._path(name)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            known = ", ".join(self.names()) or "none yet"
            raise TrainManagementError(f"there is no preset {name!r}", f"saved presets: {known}") from None
        fm_type = None
        first, _, rest = raw.partition("\n")
        if first.startswith(FM_LINE) and first[len(FM_LINE) :].strip() in FM_TYPES:
            fm_type, raw = first[len(FM_LINE) :].strip(), rest
        return Preset(path.stem, fm_type, raw)

    def delete(self, name: str) -> None:
        """Delete a saved preset."""
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise TrainManagementError(
                f"there is no preset {name!r}", "refresh the list of presets"
            ) from None


def _not_imported_reason(key: str) -> str | None:
    """Why a kohya_ss preset key is not imported (None: it is)."""
    if key in TAB_KEYS:
        return "set by the tab (Model, Dataset and the Lora folder)"
    if key in UNSUPPORTED:
        return f"not implemented by this trainer: {UNSUPPORTED[key]}"
    if key == "epoch":
        return (
            "the preset's max_train_steps or max_train_epochs sets the length (kohya_ss then ignores epoch)"
        )
    spec = SCHEMA.get(key)
    if spec is None:
        return "a kohya_ss GUI setting, not an sd-scripts key: set its sd-scripts equivalent by hand"
    if spec.kind == "path":
        return "a path on the machine that saved the preset: set it here"
    return None


def _unset(raw: Any, key: str = "") -> bool:
    """A kohya_ss preset value that means "not set": None, "", or 0 for the keys of ZERO_IS_UNSET."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return True
    if key in ZERO_IS_UNSET and not isinstance(raw, bool):
        try:
            return float(raw) == 0
        except (TypeError, ValueError):
            return False
    return False


def _sd_scripts_items(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """The preset's settings as kohya_ss passes them to sd-scripts: unset ones left out, its GUI names renamed,
    its attention choice ("xformers" / "sdpa" / "none") as the flag it sets, and its `epoch` as max_train_epochs
    when no other length is set (kohya_ss turns it into the steps of that many epochs)."""
    items = []
    for key, raw in data.items():
        key = str(key)
        if _unset(raw, key) or (key == "LoRA_type" and raw == "Standard"):  # Standard: the default LoRA
            continue
        if key == "xformers" and isinstance(raw, str):
            if raw in ("xformers", "sdpa"):
                items.append((raw, True))
            continue  # "none": neither
        if key in GUI_NAMES and _unset(data.get(GUI_NAMES[key])):
            key = GUI_NAMES[key]
        elif key == "epoch" and all(_unset(data.get(k), k) for k in ("max_train_epochs", "max_train_steps")):
            key = "max_train_epochs"
        items.append((key, raw))
    return items


def import_kohya_ss(text: str) -> KohyaImport:
    """Turn a kohya_ss GUI preset (a JSON object) into config_params: every setting that kohya_ss passes on as an
    sd-scripts key of the schema, with a value the trainer accepts; unset values are left out silently."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainManagementError(
            f"the preset is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            "export the preset from kohya_ss (Configuration file > Save), or paste it as TOML",
        ) from None
    if not isinstance(data, dict):
        raise TrainManagementError(
            "the preset is not a JSON object", 'a kohya_ss preset is {"key": value, ...}'
        )
    if not is_gui_config(data):  # a few keys, not a whole GUI preset: kept key by key
        return _import_values(_sd_scripts_items(data), {}, KohyaImport(""))
    try:
        translation = translate_gui_config(data)
    except ConfigError as exc:  # a trainer the GUI has that this one has not (Flux, textual inversion, ...)
        first = exc.issues[0]
        raise TrainManagementError(
            first.message, first.hint or "import a LoRA preset of SD 1.5 or SDXL"
        ) from None
    result = KohyaImport("", fm_type=translation.fm_type)
    result.notes = [issue.message for issue in translation.notes]
    return _import_values(list(translation.values.items()), translation.origin, result)


def _import_values(items: list[tuple[str, Any]], origin: dict[str, str], result: KohyaImport) -> KohyaImport:
    values: dict[str, Any] = {}
    for key, raw in items:
        if raw is None or raw == [] or (isinstance(raw, str) and not raw.strip()):
            continue  # kohya_ss writes "" for a setting left unset
        source = origin.get(key, key)
        reason = _not_imported_reason(key)
        if reason is None:
            try:
                value = coerce_value(SCHEMA[key], raw)
            except ValueProblem as exc:
                reason = f"its value is not accepted: {exc.message}"
            except ConfigError as exc:
                reason = "; ".join(issue.message for issue in exc.issues)
            else:
                if value is None:
                    continue  # unset in the preset
                values[key] = value
                result.imported.append(key)
                continue
        if key in SCHEMA or raw not in ([], False, 0):
            name = str(key) if source == key else f"{source} (as {key})"
            result.not_imported[name] = reason  # other settings left off / 0 / [] are not worth a line
    result.toml = render_toml(values, values.keys())
    return result
