"""Check config_params against the schema for one FM type: types, ranges, allowed values and the cross-field rules
kohya enforces (or that save a user a failed run), then fill defaults.

Every problem is collected before one ConfigError is raised; warnings come back on the TrainConfig.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kohya_backend.config.choices import BLOCK_WISE_ARGS
from kohya_backend.config.keys import KeySpec, compat
from kohya_backend.config.kohya_gui import GUI_KEY_HINTS
from kohya_backend.config.lycoris_args import LYCORIS_MODULE, lycoris_arg_problems, strip_quotes
from kohya_backend.config.optimizers import (
    canonical_builtin,
    is_schedule_free,
    resolve_optimizer,
    resolve_scheduler,
)
from kohya_backend.config.parse import (
    ParsedConfig,
    ValueProblem,
    coerce_value,
    is_false_word,
    parse_config,
    shown,
)
from kohya_backend.config.schema import (
    ALIASES,
    OPTIMIZERS,
    SCHEMA,
    UNSUPPORTED,
    UNSUPPORTED_DEFAULTS,
    check_fm_type,
    defaults_for,
)
from kohya_backend.config.train_config import CAPTION_VARIATION_KEYS, TrainConfig
from kohya_backend.config.values import kv_dict, literal_kwargs
from kohya_backend.errors import ConfigError, ConfigIssue, TrainManagementError
from kohya_backend.families import FAMILIES
from kohya_backend.names import FORBIDDEN, windows_name_problem

__all__ = ["TrainConfig", "detect_cuda", "validate_config"]

# network_args that kohya's networks.lora reads but this trainer does not implement.
_KOHYA_LORA_ARGS = frozenset(
    [
        *BLOCK_WISE_ARGS,
        "loraplus_lr_ratio",
        "loraplus_unet_lr_ratio",
        "loraplus_text_encoder_lr_ratio",
        "exclude_patterns",
        "include_patterns",
        "train_blocks",
        "algo",
        "preset",
    ]
)
# The network_args this trainer implements, checked like schema keys.
_ARG = compat("is a network_args entry")
_NETWORK_ARG_SPECS = {
    "conv_dim": KeySpec(
        "conv_dim", "int", None, "network", "LoCon rank of 3x3 convolutions", _ARG, minimum=1
    ),
    "conv_alpha": KeySpec("conv_alpha", "float", None, "network", "LoCon alpha", _ARG, minimum=0.0),
    "rank_dropout": KeySpec(
        "rank_dropout", "float", None, "network", "rank dropout", _ARG, minimum=0.0, maximum=1.0
    ),
    "module_dropout": KeySpec(
        "module_dropout", "float", None, "network", "module dropout", _ARG, minimum=0.0, maximum=1.0
    ),
}
_REQUIRED_PATHS = ("pretrained_model_name_or_path", "train_data_dir", "output_dir")


def detect_cuda() -> bool:
    """Whether torch sees a GPU that trains in fp16: CUDA (ROCm's too) or Apple's MPS; torch is imported only here,
    and a missing torch means none."""
    try:
        import torch
    except ImportError:
        return False
    mps = getattr(torch.backends, "mps", None)
    return bool(torch.cuda.is_available() or (mps is not None and mps.is_available()))


class _Checker:
    """Collects the issues of one validation run and knows where each key was written."""

    def __init__(self, parsed: ParsedConfig, fm_type: str) -> None:
        self.fm_type = fm_type
        self.family = FAMILIES[fm_type]
        self.positions = dict(parsed.positions)
        self.values: dict[str, Any] = defaults_for(fm_type)
        self.given: set[str] = set()
        self.bad: set[str] = set()
        self.errors: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = list(parsed.notes)
        self.raw: dict[str, Any] = dict(parsed.values)
        if parsed.gui_fm_type is not None and parsed.gui_fm_type != fm_type:
            saved_for = f"{FAMILIES[parsed.gui_fm_type].label} (its sdxl checkbox)"
            self.issue(
                None,
                f"this kohya_ss GUI config was saved for {saved_for}, but FM type {fm_type} was chosen",
                f"choose FM type {parsed.gui_fm_type}, or change the sdxl checkbox in the GUI",
            )

    def issue(self, key: str | None, message: str, hint: str | None = None, *, warning: bool = False) -> None:
        line, column = self.positions.get(key, (None, None)) if key else (None, None)
        found = ConfigIssue(message, key=key, line=line, column=column, hint=hint)
        if warning:
            found.severity = "warning"
            self.warnings.append(found)
        else:
            self.errors.append(found)

    def ok(self, *keys: str) -> bool:
        """True when none of these keys failed its own check (so a rule over them is worth running)."""
        return not self.bad.intersection(keys)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


# Unsupported keys that only act together with another setting: key -> (that setting, what it is).
_NEEDS = {
    "dynamo_backend": ("torch_compile", "torch.compile"),
    "save_last_n_epochs_state": ("save_state", "save_state"),
    "save_last_n_steps_state": ("save_state", "save_state"),
    "save_last_n_steps": ("save_every_n_steps", "save_every_n_steps"),
}
# Names people write that sd-scripts does not have, with what it reads instead.
_NOT_KOHYA_KEYS = {
    "text_encoder_lr1": "sd-scripts' LoRA trainers have no text_encoder_lr1/2 (some of its docs show them); "
    "write text_encoder_lr = [lr for TE1, lr for TE2]",
    "text_encoder_lr2": "sd-scripts' LoRA trainers have no text_encoder_lr1/2 (some of its docs show them); "
    "write text_encoder_lr = [lr for TE1, lr for TE2]",
}


def _is_inert(key: str, value: Any, given: Mapping[str, Any]) -> bool:
    if value is None or value is False or value in ("", 0, [], {}):
        return True
    if key in _NEEDS and not given.get(_NEEDS[key][0]):
        return True
    return key in UNSUPPORTED_DEFAULTS and value == UNSUPPORTED_DEFAULTS[key]


def _unknown_key(c: _Checker, key: str) -> None:
    lowered = key.lower()
    if lowered in _NOT_KOHYA_KEYS:
        c.issue(key, f"{key} is not an sd-scripts key", _NOT_KOHYA_KEYS[lowered])
        return
    if lowered in GUI_KEY_HINTS or key in GUI_KEY_HINTS:
        why = GUI_KEY_HINTS.get(key, GUI_KEY_HINTS.get(lowered))
        c.issue(key, f"{key} is a kohya_ss GUI setting, not an sd-scripts key", why)
        return
    elif lowered in SCHEMA or lowered in UNSUPPORTED:
        hint = f"did you mean {lowered}? keys are lowercase"
    else:
        close = difflib.get_close_matches(lowered, list(SCHEMA), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see the config reference for the supported keys"
    c.issue(key, f"unknown key {key!r}", hint)


def _read_keys(c: _Checker, raw: Mapping[str, Any]) -> None:
    """Sort the given keys into schema values, aliases, unsupported and unknown keys."""
    values = dict(raw)
    for old, new in ALIASES.items():
        if old not in values:
            continue
        if new in values:
            c.issue(old, f"both {old} and {new} are set", f"{old} is the old name of {new}: keep only {new}")
            values.pop(old)
            continue
        values[new] = values.pop(old)
        if old in c.positions:
            c.positions[new] = c.positions[old]
        c.issue(new, f"{old} is read as {new}", f"the formatted config writes {new}", warning=True)
    for key, value in values.items():
        if key in SCHEMA:
            c.given.add(key)
            try:
                result = coerce_value(SCHEMA[key], value)
            except ValueProblem as exc:
                c.bad.add(key)
                c.issue(key, exc.message, exc.hint)
                continue
            if result is not None:
                c.values[key] = result
            if SCHEMA[key].kind == "bool" and is_false_word(value):
                c.issue(
                    key,
                    f'{key} = {shown(value)} is text, which sd-scripts reads as true (any text but "" is); '
                    "it is read as true here too",
                    f"write {key} = false, without quotes, to turn it off",
                    warning=True,
                )
        elif key in UNSUPPORTED:
            message = f"kohya accepts {key} but this trainer does not implement it"
            if _is_inert(key, value, values):
                needs = _NEEDS.get(key)
                why = (
                    f"it acts only with {needs[1]}, which is off"
                    if needs and not values.get(needs[0])
                    else f"{shown(value)} is kohya's default"
                )
                c.issue(
                    key,
                    f"{message}; {why}, so it changes nothing",
                    "remove it",
                    warning=True,
                )
            else:
                c.issue(key, f"{message}: {UNSUPPORTED[key]}")
        else:
            _unknown_key(c, key)


def _rule_model(c: _Checker) -> None:
    if c["v2"]:
        c.issue(
            "v2",
            "v2 = true selects Stable Diffusion 2.x, which this trainer does not train",
            "set v2 = false and pick FM type sd_1_5 or sd_xl with a matching checkpoint",
        )
    if c["v_parameterization"]:
        c.issue(
            "v_parameterization",
            "v_parameterization trains v-prediction; SD 1.5 and SDXL base models predict noise",
            "keep it only for a v-prediction checkpoint",
            warning=True,
        )
    if not c.family.uses_clip_skip and c["clip_skip"] is not None:
        c.issue(
            "clip_skip",
            f"clip_skip is ignored on {c.family.label}, as in kohya (it always uses the penultimate layer)",
            "remove it",
            warning=True,
        )
    if c.family.vae_overflows_in_fp16 and c["mixed_precision"] == "fp16" and not c["no_half_vae"]:
        c.issue(
            "no_half_vae",
            f"{c.family.label}'s VAE overflows in fp16 and gives NaN latents or black samples",
            "set no_half_vae = true",
            warning=True,
        )


def _rule_kohya_values(c: _Checker) -> None:
    """Values kohya gives a meaning of its own."""
    if c["vae_batch_size"] == 0:
        c.values["vae_batch_size"] = (
            1  # kohya flushes a latent batch once it holds >= 0 images: one at a time
        )


def _rule_precision(c: _Checker, cuda_available: bool | None) -> None:
    if c["mixed_precision"] != "fp16" or not c.ok("mixed_precision"):
        return
    if cuda_available is None:
        cuda_available = detect_cuda()
    if not cuda_available:
        c.issue(
            "mixed_precision",
            'mixed_precision = "fp16" needs a CUDA GPU (or Apple MPS), and none is available here',
            'use mixed_precision = "bf16" or "no"',
        )


def _rule_network(c: _Checker) -> None:
    unet_only, te_only = c["network_train_unet_only"], c["network_train_text_encoder_only"]
    if unet_only and te_only:
        c.issue(
            "network_train_text_encoder_only",
            "network_train_unet_only and network_train_text_encoder_only are both set: nothing would train",
            "keep at most one of them",
        )
    elif c.ok("unet_lr", "text_encoder_lr", "learning_rate"):
        unet_lr = c["learning_rate"] if c["unet_lr"] is None else c["unet_lr"]
        te_lr = c["learning_rate"] if c["text_encoder_lr"] is None else c["text_encoder_lr"]
        if (unet_lr == 0 or te_only) and (te_lr == 0 or unet_only):
            c.issue(
                "unet_lr",
                "every trained part has a learning rate of 0: nothing would train",
                "give unet_lr or text_encoder_lr a positive value",
            )
    if c.ok("network_args"):
        _rule_network_args(c)


def _rule_network_args(c: _Checker) -> None:
    if c["network_module"] == LYCORIS_MODULE:
        _rule_lycoris_args(c)
        return
    args = kv_dict(c["network_args"])
    for name, value in args.items():
        if name in _NETWORK_ARG_SPECS:
            spec = _NETWORK_ARG_SPECS[name]
            try:
                coerce_value(spec, value)
            except ValueProblem as exc:
                c.issue("network_args", f"{name}: {exc.message}", exc.hint)
        elif name in _KOHYA_LORA_ARGS:
            c.issue(
                "network_args",
                f"kohya's networks.lora accepts {name} but this trainer does not implement it",
                f"remove it; supported: {', '.join(_NETWORK_ARG_SPECS)}",
            )
        else:
            c.issue(
                "network_args",
                f"unknown network_args key {name!r}",
                f"supported: {', '.join(f'{k}=...' for k in _NETWORK_ARG_SPECS)}",
            )
    if "conv_alpha" in args and "conv_dim" not in args:
        c.issue(
            "network_args",
            "conv_alpha has no effect without conv_dim",
            "add conv_dim=N or remove conv_alpha",
            warning=True,
        )


def _rule_lycoris_args(c: _Checker) -> None:
    args = kv_dict(c["network_args"])
    for problem in lycoris_arg_problems(args, network_dim=int(c["network_dim"])):
        c.issue("network_args", problem.message, problem.hint, warning=problem.warning)
    algo = strip_quotes(args.get("algo", "lora")).lower()
    constraint = strip_quotes(args.get("constraint", args.get("constrain", "0")))
    notes = {
        "glora": (
            "AUTOMATIC1111 1.10 and Forge cannot apply GLoRA files of lycoris-lora 3.x (their loader multiplies "
            "the factors in another order); ComfyUI and lycoris itself load them",
            "use algo=loha or lokr for a file the WebUIs load",
        ),
        "dylora": (
            "lycoris-lora 3.2's DyLoRA trains at a random rank with scale alpha/blocks, while the WebUIs apply the "
            "saved file as a full-rank LoRA with scale alpha/network_dim (block_size times weaker)",
            "raise the LoRA weight in the prompt accordingly, or use algo=locon",
        ),
    }
    if algo in notes:
        c.issue("network_args", *notes[algo], warning=True)
    if algo == "diag-oft" and _float_or(constraint, 0.0) == 0:
        c.issue(
            "network_args",
            "with constraint=0 (lycoris's default) the WebUIs read this Diag-OFT file's alpha as a zero "
            "constraint and apply no change",
            "set constraint, e.g. constraint=0.0001 (relative to each layer's width)",
            warning=True,
        )
    if c["network_dropout"]:
        c.issue(
            "network_dropout",
            "lycoris-lora does not read network_dropout, so it changes nothing (as in kohya)",
            'use network_args = ["dropout=0.1"] (or rank_dropout / module_dropout)',
            warning=True,
        )


def _float_or(text: str, default: float) -> float:
    try:
        return float(text)
    except ValueError:
        return default


def _first_lr(c: _Checker) -> float:
    for key in ("unet_lr", "text_encoder_lr", "learning_rate"):
        if c[key] is not None and c.ok(key):
            return float(c[key])
    return float(c["learning_rate"])


def _rule_optimizer(c: _Checker) -> None:
    if not c.ok("optimizer_type"):
        return
    name = str(c["optimizer_type"])
    ref, problem = resolve_optimizer(name)
    if ref is None:
        close = difflib.get_close_matches(name, OPTIMIZERS, n=1)
        c.issue(
            "optimizer_type",
            problem or f"unknown optimizer {name!r}",
            (f"did you mean {close[0]}? " if close else "")
            + f"use one of {', '.join(OPTIMIZERS)} (any case), a torch.optim class such as RAdam, or a class "
            "path such as pytorch_optimizer.CAME",
        )
        return
    builtin = canonical_builtin(name)
    if builtin is not None:
        c.values["optimizer_type"] = builtin
    if builtin is not None and (builtin.startswith("DAdapt") or builtin == "Prodigy"):
        lrs = {c["learning_rate"] if c[k] is None else c[k] for k in ("unet_lr", "text_encoder_lr")}
        if _first_lr(c) <= 0.1:
            c.issue(
                "learning_rate",
                f"{builtin} adapts its own step size and expects a learning rate around 1.0, got {_first_lr(c)}",
                "set learning_rate (and unet_lr / text_encoder_lr) to 1.0",
                warning=True,
            )
        elif len(lrs) > 1:
            c.issue(
                "unet_lr",
                f"{builtin} with different unet_lr and text_encoder_lr: kohya notes only the first one takes effect",
                "give both the same value",
                warning=True,
            )
    if builtin == "DAdaptSGD" and c["lr_warmup_steps"] and c["lr_scheduler"] != "constant":
        c.issue(
            "lr_warmup_steps",
            "DAdaptSGD measures the gradient norm of its first step only where the learning rate is above 0, and a "
            "warmup starts at 0: it would divide by zero at step 1 (in kohya too)",
            "set lr_warmup_steps = 0 with DAdaptSGD",
        )
    if is_schedule_free(name):
        ignored = [
            k for k in ("lr_scheduler", "lr_scheduler_type", "lr_warmup_steps") if k in c.given and c[k]
        ]
        if ignored and (c["lr_scheduler"] != "constant" or c["lr_scheduler_type"] or c["lr_warmup_steps"]):
            c.issue(
                ignored[0],
                f"schedule-free optimizers schedule themselves: {', '.join(ignored)} is not used (as in kohya)",
                'remove it; a warmup goes in optimizer_args, e.g. ["warmup_steps=100"]',
                warning=True,
            )


def _rule_scheduler_type(c: _Checker) -> None:
    name = c["lr_scheduler_type"]
    if not name or not c.ok("lr_scheduler_type"):
        return
    ref, problem = resolve_scheduler(str(name))
    if ref is None:
        c.issue("lr_scheduler_type", problem or f"unknown scheduler {name!r}", "e.g. CosineAnnealingLR")
    if c["lr_warmup_steps"]:
        c.issue(
            "lr_warmup_steps",
            "lr_scheduler_type does not use lr_warmup_steps, and kohya refuses the two together",
            "set lr_warmup_steps = 0 (give a warmup in lr_scheduler_args when the class has one)",
        )
    if "lr_scheduler" in c.given and c["lr_scheduler"] != "constant":
        c.issue(
            "lr_scheduler",
            f"lr_scheduler_type {name} replaces lr_scheduler {c['lr_scheduler']} (as in kohya)",
            "remove one of them",
            warning=True,
        )


def _rule_noise(c: _Checker) -> None:
    if c["adaptive_noise_scale"] is not None and not c["noise_offset"]:
        c.issue(
            "adaptive_noise_scale",
            "adaptive_noise_scale adds to noise_offset, which is not set (kohya refuses this too)",
            "set noise_offset (e.g. 0.05), or remove adaptive_noise_scale",
        )
    for switch, needs in (
        ("noise_offset_random_strength", "noise_offset"),
        ("ip_noise_gamma_random_strength", "ip_noise_gamma"),
    ):
        if c[switch] and not c[needs]:
            c.issue(
                switch, f"{switch} has no effect without {needs}", f"set {needs}, or remove it", warning=True
            )
    if (
        "multires_noise_discount" in c.given
        and c["multires_noise_discount"] != 0.3
        and not c["multires_noise_iterations"]
    ):
        c.issue(
            "multires_noise_discount",
            "multires_noise_discount has no effect without multires_noise_iterations",
            "set multires_noise_iterations (6-10), or remove it",
            warning=True,
        )
    if c["scale_v_pred_loss_like_noise_pred"] and not c["v_parameterization"]:
        c.issue(
            "scale_v_pred_loss_like_noise_pred",
            "scale_v_pred_loss_like_noise_pred needs v_parameterization (kohya refuses it otherwise)",
            "remove it, or train a v-prediction model with v_parameterization = true",
        )
    if c["v_pred_like_loss"] and c["v_parameterization"]:
        c.issue(
            "v_pred_like_loss",
            "v_pred_like_loss cannot be used with v_parameterization (kohya refuses it too)",
            "remove one of them",
        )
    if c["zero_terminal_snr"] and not c["v_parameterization"]:
        c.issue(
            "zero_terminal_snr",
            "zero_terminal_snr without v_parameterization: a noise-prediction model cannot learn the last "
            "timestep (kohya warns the same)",
            "use it with v_parameterization = true",
            warning=True,
        )
    huber = [k for k, d in (("huber_schedule", "snr"), ("huber_c", 0.1), ("huber_scale", 1.0)) if c[k] != d]
    if huber and c["loss_type"] in ("l1", "l2"):
        c.issue(
            huber[0],
            f"{', '.join(huber)} only apply to loss_type huber or smooth_l1, not {c['loss_type']}",
            'set loss_type = "huber" or "smooth_l1", or remove them',
            warning=True,
        )


def _rule_literal_args(c: _Checker) -> None:
    for key in ("optimizer_args", "lr_scheduler_args"):
        if not c.ok(key):
            continue
        for item in c[key]:
            try:
                literal_kwargs([item])
            except ValueProblem as exc:
                c.issue(key, exc.message, exc.hint)


def _rule_caching(c: _Checker) -> None:
    for disk, memory in (
        ("cache_latents_to_disk", "cache_latents"),
        ("cache_text_encoder_outputs_to_disk", "cache_text_encoder_outputs"),
    ):
        if c[disk] and not c[memory]:
            c.values[memory] = True
            c.issue(disk, f"{disk} turns on {memory}", f"set {memory} = true as well", warning=True)
    for key in ("random_crop", "color_aug"):
        if c["cache_latents"] and c[key]:
            c.issue(
                key,
                f"{key} cannot be used with cached latents (each step needs a new encoding); kohya refuses it too",
                f"set {key} = false or cache_latents = false",
            )
    if not c["cache_text_encoder_outputs"]:
        return
    if not c["network_train_unet_only"]:
        c.issue(
            "cache_text_encoder_outputs",
            "cache_text_encoder_outputs needs network_train_unet_only (a trained text encoder changes them)",
            "set network_train_unet_only = true, or cache_text_encoder_outputs = false",
        )
    changing = [k for k in CAPTION_VARIATION_KEYS if c[k]]
    if changing:
        c.issue(
            "cache_text_encoder_outputs",
            f"cached text encoder outputs cannot follow captions that change each epoch ({', '.join(changing)})",
            "turn those off, or set cache_text_encoder_outputs = false",
        )


def _rule_buckets(c: _Checker) -> None:
    if c.ok("resolution") and not c["enable_bucket"]:
        w, h = c["resolution"]
        if w % 8 or h % 8:
            c.issue(
                "resolution",
                f"resolution {w}x{h} is not a multiple of 8: without enable_bucket every image is resized to it and "
                "the VAE, which works in 8-pixel blocks, drops the rest (kohya does the same)",
                "use sides that are multiples of 8 (e.g. 512,640), or set enable_bucket = true",
                warning=True,
            )
    if not c.ok("bucket_reso_steps", "min_bucket_reso", "max_bucket_reso"):
        return
    step, low, high = c["bucket_reso_steps"], c["min_bucket_reso"], c["max_bucket_reso"]
    unit = c.family.bucket_step
    if not c["enable_bucket"]:
        return  # kohya reads the bucket settings only with enable_bucket
    if step % unit:
        c.issue(
            "bucket_reso_steps",
            f"bucket_reso_steps = {step} is not a multiple of {unit} ({c.fm_type}); kohya refuses it too",
            f"use {unit * max(1, round(step / unit))}",
        )
        return
    if low % step:
        low = c.values["min_bucket_reso"] = low - low % step
    if high % step:
        high = c.values["max_bucket_reso"] = high + step - high % step
    for key, given in (("min_bucket_reso", c["min_bucket_reso"]), ("max_bucket_reso", c["max_bucket_reso"])):
        value = low if key == "min_bucket_reso" else high
        if key in c.given and value != coerce_value(SCHEMA[key], c.raw.get(key)):
            c.issue(
                key,
                f"{key} is not a multiple of bucket_reso_steps ({step}): it is adjusted to {given}, as kohya does",
                f"write {key} = {given}",
                warning=True,
            )
    if low > high:
        c.issue(
            "min_bucket_reso", f"min_bucket_reso ({low}) is larger than max_bucket_reso ({high})", "swap them"
        )
    elif c["enable_bucket"] and c.ok("resolution"):
        w, h = c["resolution"]
        if not (low <= w <= high and low <= h <= high):
            c.issue(
                "resolution",
                f"resolution {w}x{h} is outside the bucket range {low}..{high}",
                "raise max_bucket_reso / lower min_bucket_reso, or change resolution",
            )


def _rule_bucket_upscale(c: _Checker) -> None:
    if c["bucket_no_upscale"] and not c["enable_bucket"]:
        c.issue(
            "bucket_no_upscale",
            "bucket_no_upscale has no effect without enable_bucket; every image is cropped to the resolution",
            "set enable_bucket = true, or remove bucket_no_upscale",
            warning=True,
        )


def _rule_schedule(c: _Checker) -> None:
    scheduler = c["lr_scheduler"]
    if scheduler == "adafactor" and c["optimizer_type"] != "Adafactor" and c.ok("optimizer_type"):
        c.issue(
            "lr_scheduler",
            'the adafactor scheduler works only with optimizer_type = "Adafactor"',
            "pick another lr_scheduler or the Adafactor optimizer",
        )
    if scheduler in ("constant", "adafactor") and c["lr_warmup_steps"]:
        c.issue(
            "lr_warmup_steps",
            f"the {scheduler} scheduler has no warmup, so lr_warmup_steps is ignored",
            'use lr_scheduler = "constant_with_warmup", or set lr_warmup_steps = 0',
            warning=True,
        )
    low, high = c["min_timestep"], c["max_timestep"]
    if low is not None and high is not None and low >= high:
        c.issue(
            "min_timestep", f"min_timestep ({low}) must be smaller than max_timestep ({high})", "swap them"
        )
    if c["max_train_epochs"] and "max_train_steps" in c.given:
        c.issue(
            "max_train_steps",
            "max_train_epochs is set, so max_train_steps is ignored (as in kohya)",
            "remove one of them",
            warning=True,
        )


def _rule_saving(c: _Checker) -> None:
    if c["save_last_n_epochs"] and not (c["save_every_n_epochs"] or c["save_n_epoch_ratio"]):
        c.issue(
            "save_last_n_epochs",
            "save_last_n_epochs needs save_every_n_epochs (or save_n_epoch_ratio)",
            "set save_every_n_epochs = 1, or remove save_last_n_epochs",
        )
    if c["save_n_epoch_ratio"] and c["save_every_n_epochs"]:
        c.issue(
            "save_every_n_epochs",
            "save_n_epoch_ratio overrides save_every_n_epochs (as in kohya)",
            "remove one of them",
            warning=True,
        )
    name = c["output_name"]
    if name is not None and c.ok("output_name"):
        problem = _file_name_problem(name)
        if problem:
            c.issue(
                "output_name",
                f"output_name {name!r} {problem}",
                "use letters, digits, spaces, '-', '_' or '.', e.g. my_lora",
            )
    ext = c["caption_extension"]
    if c.ok("caption_extension") and (not ext.startswith(".") or len(ext) < 2 or FORBIDDEN.search(ext)):
        c.issue(
            "caption_extension",
            f"caption_extension {ext!r} must be a file extension starting with '.'",
            'e.g. caption_extension = ".txt"',
        )


def _file_name_problem(name: str) -> str | None:
    """Why `name` cannot be a LoRA's file name: Windows' rules (names.py), plus no leading space or extension."""
    if not name.strip():
        return "is empty"
    problem = windows_name_problem(name)
    if problem:
        return problem
    if name != name.lstrip():
        return "starts with a space"
    if name.lower().endswith((".safetensors", ".ckpt", ".pt")):
        return "includes the file extension (it is added when saving)"
    if len(name) > 150:
        return "is longer than 150 characters"
    return None


def _rule_sampling(c: _Checker) -> None:
    every = c["sample_every_n_epochs"] or c["sample_every_n_steps"]
    if every and not c["sample_prompts"]:
        c.issue(
            "sample_every_n_epochs" if c["sample_every_n_epochs"] else "sample_every_n_steps",
            "sampling is scheduled but sample_prompts is not set, so no samples are made",
            "set sample_prompts to a prompt file",
            warning=True,
        )
    if c["sample_prompts"] and not every:
        c.issue(
            "sample_prompts",
            "sample_prompts is set but no samples are scheduled",
            "set sample_every_n_epochs or sample_every_n_steps",
            warning=True,
        )
    if (
        c["sample_prompts"]
        and c["sample_sampler"] in ("lms", "k_lms")
        and importlib.util.find_spec("scipy") is None
    ):
        c.issue(
            "sample_sampler",
            f"the {c['sample_sampler']} sampler needs scipy, which is not installed",
            'pick another sampler, e.g. "euler_a" or "ddim"',
        )


def _rule_logging(c: _Checker) -> None:
    if c["log_with"] and not c["logging_dir"]:
        c.issue(
            "log_with",
            f'log_with = "{c["log_with"]}" needs logging_dir (kohya requires it too)',
            'set logging_dir = "logs", or remove log_with',
        )
    for key in ("log_prefix", "log_tracker_name"):
        if c[key] and not c["logging_dir"]:
            c.issue(
                key, f"{key} has no effect without logging_dir", "set logging_dir, or remove it", warning=True
            )


def _rule_compat(c: _Checker) -> None:
    """Keys accepted for kohya compatibility that change nothing: a value other than the default says so."""
    for key, spec in SCHEMA.items():
        if spec.effect.kind == "compat" and c[key] != spec.default_for(c.fm_type):
            c.issue(key, f"{key} {spec.effect.text}", "remove it", warning=True)


def _rule_dataset_config(c: _Checker, check_paths_exist: bool) -> None:
    """dataset_config replaces train_data_dir and reg_data_dir (as in kohya); its own file is checked too."""
    path = c["dataset_config"]
    if path is None or not c.ok("dataset_config"):
        return
    for key in ("train_data_dir", "reg_data_dir"):
        if c[key] is not None:
            c.issue(
                key,
                f"{key} is ignored: dataset_config describes the data, as in kohya",
                "remove it",
                warning=True,
            )
    if not check_paths_exist or not Path(path).is_file():
        return
    from kohya_backend.data.dataset_config import check_against_training_config

    line, column = c.positions.get("dataset_config", (None, None))
    for issue in check_against_training_config(Path(path), fm_type=c.fm_type, training=c.values):
        issue.line, issue.column = line, column
        (c.warnings if issue.severity == "warning" else c.errors).append(issue)


# Keys that may name an s3:// object or prefix: downloaded (or, output_dir, uploaded to) by the job's host.
S3_PATH_KEYS = (
    "pretrained_model_name_or_path",
    "train_data_dir",
    "reg_data_dir",
    "network_weights",
    "sample_prompts",
    "output_dir",
)


def _rule_s3_paths(c: _Checker) -> set[str]:
    """The one place config validation recognises s3:// values: parsed strictly, refused where not supported;
    returns the keys holding one (their existence is checked by S3, when the job downloads them)."""
    from kohya_backend.storage.uri import S3UriError, is_s3_uri, parse_s3_uri

    found = set()
    for key, value in list(c.values.items()):
        if not is_s3_uri(value) or not c.ok(key):
            continue
        found.add(key)
        if key not in S3_PATH_KEYS:
            c.issue(key, f"{key} cannot be an s3:// URI", f"s3:// works for {', '.join(S3_PATH_KEYS)}")
            continue
        try:
            parse_s3_uri(value, what=key)
        except S3UriError as exc:
            c.issue(key, exc.message, exc.hint)
    return found


def _unreadable_path(c: _Checker, key: str, value: str) -> bool:
    """Whether the file system refuses to even look `value` up (a name too long, ...): then an issue says so."""
    try:
        os.stat(value)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        c.issue(
            key, f"{key} cannot be looked up: {why}", "check the path (each name in it at most 255 bytes)"
        )
        return True
    return False


def _rule_paths(c: _Checker, require_paths: bool, check_paths_exist: bool) -> None:
    if require_paths:
        for key in _REQUIRED_PATHS:
            if key == "train_data_dir" and c["dataset_config"] is not None:
                continue
            if c[key] is None and c.ok(key):
                c.issue(
                    key,
                    f"{key} is missing",
                    f'set {key} = "..." (or dataset_config for kohya\'s dataset TOML)'
                    if key == "train_data_dir"
                    else f'set {key} = "..."',
                )
    on_s3 = _rule_s3_paths(c)
    if not check_paths_exist:
        return
    kinds = {
        "pretrained_model_name_or_path": "any",
        "train_data_dir": "dir",
        "reg_data_dir": "dir",
        "dataset_config": "file",
        "network_weights": "file",
        "sample_prompts": "file",
        "resume": "dir",
    }
    for key, kind in kinds.items():
        value = c[key]
        if value is None or not c.ok(key) or key in on_s3 or _unreadable_path(c, key, value):
            continue
        path = Path(value)
        if not path.exists() and key == "pretrained_model_name_or_path":
            _check_model(c, str(value))
        elif not path.exists():
            c.issue(
                key, f"{value} does not exist", "check the path (relative paths start at the working folder)"
            )
        elif kind == "dir" and not path.is_dir():
            c.issue(key, f"{value} is not a folder", f"{key} must name a folder")
        elif kind == "file" and not path.is_file():
            c.issue(key, f"{value} is not a file", f"{key} must name a file")
    for key in ("output_dir", "logging_dir", "tokenizer_cache_dir"):
        value = c[key]
        if (
            value is not None
            and c.ok(key)
            and key not in on_s3
            and not _unreadable_path(c, key, value)
            and Path(value).exists()
            and not Path(value).is_dir()
        ):
            c.issue(key, f"{value} exists and is not a folder", f"{key} must name a folder")


def _check_model(c: _Checker, value: str) -> None:
    """A base model that is no path here: a hub id must be in the local Hugging Face cache (nothing downloads)."""
    from kohya_backend.models.diffusers_folder import resolve_model_path

    try:
        resolve_model_path(value)
    except TrainManagementError as exc:
        c.issue("pretrained_model_name_or_path", exc.message, exc.hint)


def _line_order(issue: ConfigIssue) -> tuple[int, int, int]:
    return (issue.line is None, issue.line or 0, issue.column or 0)


def validate_config(
    source: str | Mapping[str, Any] | ParsedConfig,
    fm_type: str,
    *,
    cuda_available: bool | None = None,
    require_paths: bool = True,
    check_paths_exist: bool = True,
) -> TrainConfig:
    """Validate config_params for an FM type and fill defaults; raises one ConfigError listing every problem.

    require_paths: the base model, train_data_dir and output_dir must be set. cuda_available None detects it
    (importing torch) only when fp16 is asked for.
    """
    check_fm_type(fm_type)
    parsed = source if isinstance(source, ParsedConfig) else parse_config(source)
    c = _Checker(parsed, fm_type)
    _read_keys(c, parsed.values)
    _rule_kohya_values(c)
    _rule_model(c)
    _rule_precision(c, cuda_available)
    _rule_network(c)
    _rule_literal_args(c)
    _rule_optimizer(c)
    _rule_scheduler_type(c)
    _rule_noise(c)
    _rule_caching(c)
    _rule_buckets(c)
    _rule_bucket_upscale(c)
    _rule_schedule(c)
    _rule_saving(c)
    _rule_sampling(c)
    _rule_logging(c)
    _rule_compat(c)
    _rule_paths(c, require_paths, check_paths_exist)
    _rule_dataset_config(c, check_paths_exist)
    if c.errors:
        raise ConfigError(sorted(c.errors, key=_line_order))
    return TrainConfig(fm_type=fm_type, warnings=tuple(sorted(c.warnings, key=_line_order)), **c.values)
