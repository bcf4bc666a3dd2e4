"""kohya_ss GUI configs (the JSON its LoRA tab saves and loads as presets), read the way the GUI turns them into
the sd-scripts config it trains with.

The GUI keeps its own key names (`optimizer`, `max_resolution`, `LoRA_type`, `epoch`, `lr_warmup` as a percentage,
LyCORIS settings as separate fields) and builds the sd-scripts TOML from them in `kohya_gui/lora_gui.py`
(`train_model`): the network module and its arguments from `LoRA_type`, optimizer and scheduler arguments split on
spaces with quotes removed, learning rates of 0 as "do not train this part", and every value that is "", false,
None or 0 left out (so sd-scripts' default applies). This module reproduces that mapping; keys that only steer the
GUI or `accelerate launch` are dropped with one note.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kohya_backend.config.choices import BLOCK_WISE_ARGS
from kohya_backend.config.kohya_gui_keys import GUI_KEYS as _GUI_KEYS
from kohya_backend.config.scope import out_of_scope_issue
from kohya_backend.errors import ConfigError, ConfigIssue

# Keys only the GUI writes; two or three of them (or LoRA_type) mark a config as the GUI's.
_MARKERS = frozenset(
    [
        "LoRA_type",
        "max_resolution",
        "model_list",
        "epoch",
        "optimizer",
        "lr_warmup",
        "noise_offset_type",
        "num_cpu_threads_per_process",
        "stop_text_encoder_training",
        "save_as_bool",
        "sdxl_no_half_vae",
        "sdxl_cache_text_encoder_outputs",
    ]
)

# Values the GUI's own controls start with, for the fields a preset may lack that change what the GUI passes on.
# (max_train_steps: today's GUI field starts at 1600, but presets without the key were written when an empty field
# meant "from epoch"; a preset without it trains `epoch` epochs.)
GUI_DEFAULTS: Mapping[str, Any] = {
    "LoRA_type": "Standard",
    "LyCORIS_preset": "full",
    "epoch": 1,
    "max_train_steps": 0,
    "max_train_epochs": 0,
    "lr_warmup": 10,
    "lr_warmup_steps": 0,
    "learning_rate": 0.0001,
    "text_encoder_lr": 0.0001,
    "unet_lr": 0.0001,
    "noise_offset_type": "Original",
    "network_dim": 8,
    "network_alpha": 1,
    "conv_dim": 1,
    "conv_alpha": 1,
    "factor": -1,
    "unit": 1,
    "train_on_input": True,
    "constrain": 0.0,
    "rank_dropout": 0,
    "module_dropout": 0.0,
    "use_tucker": False,
    "use_cp": False,
    "use_scalar": False,
    "bypass_mode": False,
    "dora_wd": False,
    "rank_dropout_scale": False,
    "train_norm": False,
    "decompose_both": False,
    "rescaled": False,
}

# GUI key -> sd-scripts key where only the name differs.
_RENAMED = {
    "optimizer": "optimizer_type",
    "max_resolution": "resolution",
    "lora_network_weights": "network_weights",
}

# Keys the GUI passes to sd-scripts under the same name (after its own conversions below).
_PASSED = frozenset(
    [
        "async_upload",
        "bucket_no_upscale",
        "bucket_reso_steps",
        "cache_latents",
        "cache_latents_to_disk",
        "caption_dropout_rate",
        "caption_extension",
        "color_aug",
        "dataset_config",
        "debiased_estimation_loss",
        "dynamo_backend",
        "dim_from_weights",
        "enable_bucket",
        "flip_aug",
        "fp8_base",
        "full_bf16",
        "full_fp16",
        "gradient_checkpointing",
        "highvram",
        "huber_c",
        "huber_scale",
        "huber_schedule",
        "huggingface_repo_id",
        "huggingface_token",
        "huggingface_repo_type",
        "huggingface_repo_visibility",
        "huggingface_path_in_repo",
        "ip_noise_gamma_random_strength",
        "learning_rate",
        "logging_dir",
        "log_config",
        "log_tracker_name",
        "log_tracker_config",
        "loss_type",
        "lr_scheduler",
        "lr_scheduler_power",
        "lr_scheduler_type",
        "masked_loss",
        "max_bucket_reso",
        "max_grad_norm",
        "max_timestep",
        "mem_eff_attn",
        "metadata_author",
        "metadata_description",
        "metadata_license",
        "metadata_tags",
        "metadata_title",
        "min_timestep",
        "mixed_precision",
        "network_alpha",
        "network_dim",
        "network_dropout",
        "network_weights",
        "output_dir",
        "output_name",
        "pretrained_model_name_or_path",
        "prior_loss_weight",
        "random_crop",
        "reg_data_dir",
        "resume",
        "resume_from_huggingface",
        "save_every_n_epochs",
        "save_every_n_steps",
        "save_last_n_steps",
        "save_last_n_steps_state",
        "save_last_n_epochs",
        "save_last_n_epochs_state",
        "save_model_as",
        "save_precision",
        "save_state",
        "save_state_on_train_end",
        "save_state_to_huggingface",
        "scale_v_pred_loss_like_noise_pred",
        "scale_weight_norms",
        "shuffle_caption",
        "skip_cache_check",
        "train_batch_size",
        "train_data_dir",
        "train_inpainting",
        "training_comment",
        "log_with",
        "v2",
        "v_parameterization",
        "vae",
        "weighted_captions",
        "gradient_accumulation_steps",
        "ip_noise_gamma",
        "min_snr_gamma",
        "v_pred_like_loss",
        "clip_skip",
        "vae_batch_size",
    ]
)
# Keys the GUI passes through int().
_INTS = frozenset(
    ["keep_tokens", "caption_dropout_every_n_epochs", "min_bucket_reso", "max_token_length", "seed"]
)

# Keys of a GUI config that are sd-scripts arguments too (passed on, derived, or left out as the GUI leaves them).
_SD_SCRIPTS_NAMES = (
    _PASSED
    | _INTS
    | set(_RENAMED)
    | set(
        [
            "persistent_data_loader_workers",
            "optimizer_args",
            "lr_scheduler_args",
            "max_data_loader_n_workers",
            "text_encoder_lr",
            "unet_lr",
            "noise_offset",
            "adaptive_noise_scale",
            "noise_offset_random_strength",
            "multires_noise_discount",
            "multires_noise_iterations",
            "max_train_epochs",
            "max_train_steps",
            "lr_warmup_steps",
            "lr_scheduler_num_cycles",
            "sample_prompts",
            "sample_every_n_steps",
            "sample_every_n_epochs",
            "sample_sampler",
            "xformers",
        ]
    )
)

# The GUI's other model families: their checkbox, and the LoRA_type values that belong to them.
_FAMILY_CHECKBOXES = {
    "flux1_checkbox": "a kohya_ss GUI Flux.1 LoRA config",
    "sd3_checkbox": "a kohya_ss GUI SD3 LoRA config",
    "hunyuan_image_checkbox": "a kohya_ss GUI HunyuanImage LoRA config",
    "anima_checkbox": "a kohya_ss GUI Anima LoRA config",
    "lumina_checkbox": "a kohya_ss GUI Lumina LoRA config",
}
_FAMILY_LORA_TYPES = {
    "Flux1": "a kohya_ss GUI Flux.1 LoRA config",
    "Flux1 OFT": "a kohya_ss GUI Flux.1 OFT config",
    "HunyuanImage-2.1": "a kohya_ss GUI HunyuanImage LoRA config",
    "Anima": "a kohya_ss GUI Anima LoRA config",
    "Lumina": "a kohya_ss GUI Lumina LoRA config",
}


def _gui_key_hints() -> dict[str, str]:
    hints = {
        "epoch": "sd-scripts reads max_train_epochs",
        "max_resolution": "sd-scripts reads resolution",
        "optimizer": "sd-scripts reads optimizer_type",
        "lr_warmup": "it is a percentage of all steps there; sd-scripts reads lr_warmup_steps, where a value below 1 "
        "is a fraction of all steps (lr_warmup = 10 is lr_warmup_steps = 0.1)",
        "lora_type": "sd-scripts reads network_module (and network_args for LoCon and LyCORIS)",
        "lycoris_preset": 'sd-scripts passes it as network_args = ["preset=..."] to lycoris.kohya',
        "lora_network_weights": "sd-scripts reads network_weights",
        "additional_parameters": "write each of its --options as its own key",
        "noise_offset_type": "sd-scripts has no such key: noise_offset or multires_noise_iterations choose the kind",
        "stop_text_encoder_training": "the GUI ignores it for LoRA training too; remove it",
    }
    network_args = (
        "conv_dim conv_alpha down_lr_weight mid_lr_weight up_lr_weight block_lr_zero_threshold block_dims "
        "block_alphas conv_block_dims conv_block_alphas rank_dropout module_dropout loraplus_lr_ratio "
        "loraplus_unet_lr_ratio loraplus_text_encoder_lr_ratio"
    )
    for name in network_args.split():
        hints[name] = f'sd-scripts reads it inside network_args = ["{name}=..."]'
    lycoris = (
        "factor bypass_mode dora_wd use_cp use_tucker use_scalar rank_dropout_scale constrain rescaled train_norm "
        "decompose_both train_on_input unit"
    )
    for name in lycoris.split():
        hints[name] = "a LyCORIS setting the GUI passes inside network_args"
    for name in [
        "model_list",
        "num_cpu_threads_per_process",
        "save_as_bool",
        "sdxl",
        "gpu_ids",
        "multi_gpu",
        "num_processes",
    ]:
        hints[name] = "it only steers the GUI or accelerate; remove it"
    return hints


# Messages for GUI keys met in a flat sd-scripts config (where sd-scripts itself would ignore them).
GUI_KEY_HINTS: Mapping[str, str] = _gui_key_hints()


@dataclass
class GuiTranslation:
    """A GUI config as the sd-scripts config the GUI would train with, and what was changed on the way."""

    values: dict[str, Any]
    origin: dict[str, str]  # sd-scripts key -> the GUI key it came from
    notes: list[ConfigIssue] = field(default_factory=list)
    fm_type: str = "sd_1_5"  # the GUI's `sdxl` checkbox chooses sdxl_train_network.py


def is_gui_config(values: Mapping[str, Any]) -> bool:
    """True for a kohya_ss GUI config: it has LoRA_type, or three keys only the GUI writes."""
    return "LoRA_type" in values or len(_MARKERS.intersection(values)) >= 3


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value: Any) -> float:
    """A GUI number field: "" and None are 0, strings are read as numbers (old presets store "0", "75")."""
    if _blank(value):
        return 0.0
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            [ConfigIssue(f"expected a number, got {value!r}", hint="fix the GUI field")]
        ) from None


def _int(value: Any) -> int:
    return int(_number(value))


def _py(value: Any) -> str:
    """A value as the GUI's f-strings write it into network_args (Python's str of the JSON value)."""
    return str(value)


def _split_args(text: Any) -> list[str]:
    """The GUI's `str(x).replace('"', "").split()` for optimizer_args, lr_scheduler_args and network_args."""
    if isinstance(text, list):
        return [str(item) for item in text]
    return str(text or "").replace('"', "").split()


def _dropped(value: Any) -> bool:
    """The GUI's final filter `value not in ["", False, None]` (so 0 and 0.0 go too, an empty list stays)."""
    return any(value == blank for blank in ("", False, None))


class _Gui:
    """Reads one GUI config; `get` falls back to the GUI's defaults for the fields that drive its conversions."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    def get(self, key: str) -> Any:
        return self.data.get(key, GUI_DEFAULTS.get(key))

    def truthy(self, key: str) -> bool:
        value = self.get(key)
        return value.strip().lower() in ("true", "1") if isinstance(value, str) else bool(value)


def _lycoris_args(gui: _Gui, lora_type: str) -> str | None:
    """network_args the GUI builds for lycoris.kohya, in its order (LoCon/LoHa repeat use_tucker, as it does)."""
    g = {k: _py(gui.get(k)) for k in GUI_DEFAULTS}
    head = f"preset={g['LyCORIS_preset']} conv_dim={g['conv_dim']} conv_alpha={g['conv_alpha']}"
    common = (
        f"use_tucker={g['use_tucker']} rank_dropout={g['rank_dropout']} bypass_mode={g['bypass_mode']} "
        f"dora_wd={g['dora_wd']} module_dropout={g['module_dropout']} use_tucker={g['use_tucker']} "
        f"use_scalar={g['use_scalar']} rank_dropout_scale={g['rank_dropout_scale']}"
    )
    built = {
        "LyCORIS/BOFT": f"{head} module_dropout={g['module_dropout']} use_tucker={g['use_tucker']} "
        f"rank_dropout={g['rank_dropout']} rank_dropout_scale={g['rank_dropout_scale']} algo=boft "
        f"train_norm={g['train_norm']}",
        "LyCORIS/Diag-OFT": f"{head} module_dropout={g['module_dropout']} use_tucker={g['use_tucker']} "
        f"rank_dropout={g['rank_dropout']} rank_dropout_scale={g['rank_dropout_scale']} "
        f"constraint={g['constrain']} rescaled={g['rescaled']} algo=diag-oft train_norm={g['train_norm']}",
        "LyCORIS/DyLoRA": f"{head} use_tucker={g['use_tucker']} block_size={g['unit']} "
        f"rank_dropout={g['rank_dropout']} module_dropout={g['module_dropout']} algo=dylora "
        f"train_norm={g['train_norm']}",
        "LyCORIS/GLoRA": f"{head} use_tucker={g['use_tucker']} rank_dropout={g['rank_dropout']} "
        f"module_dropout={g['module_dropout']} rank_dropout_scale={g['rank_dropout_scale']} algo=glora "
        f"train_norm={g['train_norm']}",
        "LyCORIS/iA3": f"{head} train_on_input={g['train_on_input']} algo=ia3",
        "LoCon": f"{head} {common} algo=locon train_norm={g['train_norm']}",
        "LyCORIS/LoCon": f"{head} {common} algo=locon train_norm={g['train_norm']}",
        "LyCORIS/LoHa": f"{head} {common} algo=loha train_norm={g['train_norm']}",
        "LyCORIS/LoKr": f"{head} use_tucker={g['use_tucker']} rank_dropout={g['rank_dropout']} "
        f"bypass_mode={g['bypass_mode']} dora_wd={g['dora_wd']} module_dropout={g['module_dropout']} "
        f"factor={g['factor']} use_cp={g['use_cp']} use_scalar={g['use_scalar']} "
        f"decompose_both={g['decompose_both']} rank_dropout_scale={g['rank_dropout_scale']} algo=lokr "
        f"train_norm={g['train_norm']}",
        "LyCORIS/Native Fine-Tuning": f"preset={g['LyCORIS_preset']} rank_dropout={g['rank_dropout']} "
        f"module_dropout={g['module_dropout']} rank_dropout_scale={g['rank_dropout_scale']} algo=full "
        f"train_norm={g['train_norm']}",
    }
    return built.get(lora_type)


_KOHYA_LORA_VARS = list(BLOCK_WISE_ARGS)  # in the GUI's order


def _kohya_args(gui: _Gui, names: list[str]) -> str:
    """`key=value` for each of kohya's own network arguments the GUI passes when set (truthy), in its order."""
    return "".join(f" {name}={_py(gui.data[name])}" for name in names if gui.data.get(name))


def _network(gui: _Gui, lora_type: str) -> tuple[str, str]:
    """(network_module, network_args text) as the GUI derives them from LoRA_type."""
    lycoris = _lycoris_args(gui, lora_type)
    if lycoris is not None:
        return "lycoris.kohya", lycoris
    dropouts = ["rank_dropout", "module_dropout"]
    if lora_type in ("Kohya LoCon", "Standard"):
        conv = ""
        if lora_type == "Kohya LoCon":
            conv = f" conv_dim={_py(gui.get('conv_dim'))} conv_alpha={_py(gui.get('conv_alpha'))}"
        return "networks.lora", conv + _kohya_args(gui, _KOHYA_LORA_VARS + dropouts)
    if lora_type == "LoRA-FA":
        return "networks.lora_fa", _kohya_args(gui, _KOHYA_LORA_VARS + dropouts)
    if lora_type == "Kohya DyLoRA":
        names = ["conv_dim", "conv_alpha", *_KOHYA_LORA_VARS, "unit", *dropouts]
        return "networks.dylora", _kohya_args(gui, names)
    if lora_type in ("Kohya LoHa", "Kohya LoKr"):
        return _native_loha_lokr(gui, is_lokr=lora_type == "Kohya LoKr")
    raise ConfigError(
        [
            ConfigIssue(
                f"unknown kohya_ss LoRA_type {lora_type!r}",
                key="LoRA_type",
                hint="use one the GUI offers: Standard, Kohya LoCon, LyCORIS/LoCon, LyCORIS/LoHa, LyCORIS/LoKr, ...",
            )
        ]
    )


def _native_loha_lokr(gui: _Gui, *, is_lokr: bool) -> tuple[str, str]:
    """sd-scripts' own networks.loha / networks.lokr: only the optional arguments that differ from defaults."""
    parts: list[str] = []
    conv_dim = _number(gui.get("conv_dim"))
    if conv_dim > 0:
        parts.append(f"conv_dim={int(conv_dim)}")
        alpha = _number(gui.get("conv_alpha"))
        parts.append(f"conv_alpha={int(alpha) if alpha.is_integer() else alpha}")
    if gui.truthy("use_tucker"):
        parts.append("use_tucker=True")
    if is_lokr and _int(gui.get("factor")) != -1:
        parts.append(f"factor={_int(gui.get('factor'))}")
    for name in ("rank_dropout", "module_dropout"):
        if _number(gui.get(name)) > 0:
            parts.append(f"{name}={_py(gui.get(name))}")
    return ("networks.lokr" if is_lokr else "networks.loha"), " ".join(parts)


def _additional(text: str) -> dict[str, Any]:
    """The GUI's free-form `additional_parameters` (extra command-line options) as config keys."""
    out: dict[str, Any] = {}
    key: str | None = None
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(
            [ConfigIssue(f"cannot read additional_parameters: {exc}", key="additional_parameters")]
        ) from None
    for token in tokens:
        if token.startswith("--"):
            name, sep, value = token[2:].partition("=")
            key = name
            out[key] = value if sep else True
            if sep:
                key = None
        elif key is not None:
            current = out[key]
            out[key] = (
                token if current is True else [*([current] if isinstance(current, str) else current), token]
            )
        else:
            raise ConfigError(
                [
                    ConfigIssue(
                        f"additional_parameters has {token!r} outside any --option",
                        key="additional_parameters",
                        hint="write --name value or --name=value",
                    )
                ]
            )
    return out


def _refuse_other_kinds(data: Mapping[str, Any]) -> None:
    """One-sentence refusal of the GUI's other trainers and model families."""
    for key, what in _FAMILY_CHECKBOXES.items():
        if data.get(key) is True:
            raise ConfigError([out_of_scope_issue(what, f"{key} = true", key)])
    lora_type = data.get("LoRA_type")
    if lora_type in _FAMILY_LORA_TYPES:
        raise ConfigError(
            [out_of_scope_issue(_FAMILY_LORA_TYPES[lora_type], f"LoRA_type = {lora_type!r}", "LoRA_type")]
        )
    if lora_type is None:
        if "token_string" in data or "init_word" in data:
            what, reason = "a kohya_ss GUI textual inversion config", "it sets token_string and init_word"
        elif "train_dir" in data or "caption_metadata_filename" in data:
            what, reason = "a kohya_ss GUI fine-tuning config", "it sets train_dir and metadata files"
        else:
            what, reason = "a kohya_ss GUI DreamBooth (full model) config", "it has no LoRA_type"
        raise ConfigError([out_of_scope_issue(what, reason)])


def _steps(gui: _Gui, out: dict[str, Any], notes: list[ConfigIssue]) -> None:
    """Run length and warmup as the GUI passes them (it turns `epoch` into max_train_steps from the folders)."""
    max_epochs, max_steps = _int(gui.get("max_train_epochs")), _int(gui.get("max_train_steps"))
    out["max_train_epochs"] = max_epochs or None
    out["max_train_steps"] = max_steps or None
    if not max_epochs and not max_steps:
        if gui.get("dataset_config"):
            notes.append(
                ConfigIssue(
                    "with a dataset_config the GUI passes no max_train_steps, so sd-scripts trains its default "
                    "1600 steps (epoch is not used)",
                    key="epoch",
                    hint="set max_train_epochs or max_train_steps to choose the length",
                    severity="warning",
                )
            )
        else:
            out["max_train_epochs"] = _int(gui.get("epoch")) or 1
    warmup_pct, warmup_steps = _number(gui.get("lr_warmup")), _number(gui.get("lr_warmup_steps"))
    if warmup_steps > 0:
        out["lr_warmup_steps"] = int(warmup_steps)
    elif warmup_pct:
        out["lr_warmup_steps"] = warmup_pct / 100
    num_cycles = gui.get("lr_scheduler_num_cycles")
    out["lr_scheduler_num_cycles"] = _int(gui.get("epoch")) if _blank(num_cycles) else _int(num_cycles)


def _learning_rates(gui: _Gui, out: dict[str, Any]) -> None:
    """unet_lr / text_encoder_lr of 0 mean "do not train that part", as the GUI's train-mode flags say."""
    te_lr, unet_lr = _number(gui.get("text_encoder_lr")), _number(gui.get("unet_lr"))
    out["text_encoder_lr"] = te_lr if te_lr > 0 else None
    out["unet_lr"] = unet_lr if unet_lr else None
    out["network_train_text_encoder_only"] = te_lr != 0 and unet_lr == 0
    out["network_train_unet_only"] = te_lr == 0 and unet_lr != 0


def _noise(gui: _Gui, out: dict[str, Any]) -> None:
    """noise_offset_type chooses which noise settings the GUI passes on."""
    original = gui.get("noise_offset_type") == "Original"
    out["noise_offset"] = gui.get("noise_offset") if original and _number(gui.get("noise_offset")) else None
    out["adaptive_noise_scale"] = (
        gui.get("adaptive_noise_scale") if original and _number(gui.get("adaptive_noise_scale")) else None
    )
    out["noise_offset_random_strength"] = gui.get("noise_offset_random_strength") if original else None
    multires = gui.get("noise_offset_type") == "Multires"
    out["multires_noise_discount"] = gui.get("multires_noise_discount") if multires else None
    iterations = gui.get("multires_noise_iterations")
    out["multires_noise_iterations"] = iterations if multires and _number(iterations) else None


def _attention(gui: _Gui, out: dict[str, Any]) -> None:
    """The GUI's attention choice ("xformers", "sdpa", "none"; a checkbox, true/false, in older GUIs)."""
    choice = gui.data.get("xformers")
    out["xformers"] = True if choice is True or choice == "xformers" else None
    out["sdpa"] = True if choice == "sdpa" else None


def _plain(gui: _Gui, out: dict[str, Any], origin: dict[str, str]) -> None:
    """Keys passed as they are, renamed, or through int(), and the argument lists split as the GUI splits them."""
    for key, value in gui.data.items():
        name = _RENAMED.get(key, key)
        if key in _PASSED or key in _RENAMED or key in _INTS:
            out[name] = _int(value) if key in _INTS else value
            origin[name] = key
    if "persistent_data_loader_workers" in gui.data:
        out["persistent_data_loader_workers"] = int(bool(gui.data["persistent_data_loader_workers"]))
    for key in ("optimizer_args", "lr_scheduler_args"):
        if key in gui.data:
            out[key] = _split_args(gui.data[key])


def _model_flags(gui: _Gui, out: dict[str, Any]) -> str:
    sdxl = gui.truthy("sdxl")
    out["no_half_vae"] = True if sdxl and gui.truthy("sdxl_no_half_vae") else None
    out["cache_text_encoder_outputs"] = (
        True if sdxl and gui.truthy("sdxl_cache_text_encoder_outputs") else None
    )
    return "sd_xl" if sdxl else "sd_1_5"


def _dropped_notes(data: Mapping[str, Any], out: dict[str, Any], notes: list[ConfigIssue]) -> None:
    gui_only = sorted(k for k in data if k in _GUI_KEYS and k not in _SD_SCRIPTS_NAMES)
    if gui_only:
        notes.append(
            ConfigIssue(
                f"read as a kohya_ss GUI config: {len(gui_only)} GUI setting(s) turned into sd-scripts keys or "
                f"dropped, as the GUI does ({', '.join(gui_only[:8])}"
                + (", ..." if len(gui_only) > 8 else "")
                + ")",
                hint="the formatted config shows the sd-scripts keys it trains with",
                severity="warning",
            )
        )
    if _number(data.get("stop_text_encoder_training")) > 0:
        notes.append(
            ConfigIssue(
                "stop_text_encoder_training is ignored, as the kohya_ss GUI ignores it for LoRA training",
                key="stop_text_encoder_training",
                severity="warning",
            )
        )
    if not _blank(data.get("sample_prompts")) and (
        _number(data.get("sample_every_n_steps")) or _number(data.get("sample_every_n_epochs"))
    ):
        notes.append(
            ConfigIssue(
                "the GUI keeps the sample prompt text itself in sample_prompts; sampling is left off",
                key="sample_prompts",
                hint="save the prompts to a file and set sample_prompts to its path with "
                "sample_every_n_epochs or sample_every_n_steps to get samples",
                severity="warning",
            )
        )


def translate_gui_config(data: Mapping[str, Any]) -> GuiTranslation:
    """The sd-scripts config the kohya_ss GUI builds from its saved config `data` (see the module doc).

    Raises ConfigError with one sentence for the GUI's trainers this project does not do.
    """
    _refuse_other_kinds(data)
    gui = _Gui(data)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    notes: list[ConfigIssue] = []
    _plain(gui, out, origin)
    fm_type = _model_flags(gui, out)
    _steps(gui, out, notes)
    _learning_rates(gui, out)
    _noise(gui, out)
    _attention(gui, out)
    lora_type = str(gui.get("LoRA_type"))
    module, args = _network(gui, lora_type)
    loraplus = "".join(
        f" {name}={_py(data[name])}"
        for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
        if data.get(name)
    )
    out["network_module"], out["network_args"] = module, _split_args(args + loraplus)
    origin.update(
        {"network_module": "LoRA_type", "network_args": "LoRA_type", "max_train_epochs": "epoch"}
        | {k: k for k in out if k in data and k not in origin}
    )
    if "lr_warmup_steps" in out and not _number(data.get("lr_warmup_steps")):
        origin["lr_warmup_steps"] = "lr_warmup"
    if out.get("max_train_epochs") and not _int(data.get("max_train_epochs")):
        origin["max_train_epochs"] = "epoch"
    if _blank(data.get("lr_scheduler_num_cycles")):
        origin["lr_scheduler_num_cycles"] = "epoch"
    values = {k: v for k, v in sorted(out.items()) if not _dropped(v)}
    values["max_data_loader_n_workers"] = _int(data.get("max_data_loader_n_workers"))
    for key, value in data.items():
        if key not in _GUI_KEYS:  # not the GUI's: left for validation to judge (a typo, a newer GUI's key)
            values[key] = value
            origin[key] = key
    extra = data.get("additional_parameters")
    if not _blank(extra):
        for key, value in _additional(str(extra)).items():
            values[key] = value
            origin[key] = "additional_parameters"
    _dropped_notes(data, values, notes)
    return GuiTranslation(values=values, origin=origin, notes=notes, fm_type=fm_type)
