"""The network_args lycoris-lora's kohya entry point (lycoris.kohya.create_network, lycoris-lora 3.2.0.post2, the
version kohya_ss installs) reads, and a torch-free check of their values.

lycoris reads every value as a string: numbers with int()/float(), switches with str_bool (anything but "false" is
true, so "0" means on). Keys it does not read are ignored by kohya too: they are warned about, not refused.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

LYCORIS_MODULE = "lycoris.kohya"
ALGOS: tuple[str, ...] = ("lora", "locon", "loha", "lokr", "ia3", "dylora", "glora", "diag-oft", "full")
# algorithms lycoris-lora lists that are not trained here, with the reason
REFUSED_ALGOS: dict[str, str] = {
    "boft": "lycoris-lora 3.2's BOFT fails in its own forward pass on SD's layer widths (einsum size mismatch)",
}
PRESETS: tuple[str, ...] = (
    "full",
    "full-lin",
    "attn-mlp",
    "attn-only",
    "unet-only",
    "unet-transformer-only",
    "unet-convblock-only",
    "ia3",
)
# name -> kind: int, float, dim (int, 0 = network_dim), bool (lycoris's str_bool), text
_ARGS: dict[str, str] = {
    "algo": "text",
    "preset": "text",
    "conv_dim": "dim",
    "conv_alpha": "float",
    "dropout": "float",
    "rank_dropout": "float",
    "module_dropout": "float",
    "use_tucker": "bool",
    "use_cp": "bool",
    "use_conv_cp": "bool",
    "disable_conv_cp": "bool",
    "use_scalar": "bool",
    "block_size": "int",
    "train_norm": "bool",
    "constraint": "float",
    "constrain": "float",
    "rescaled": "bool",
    "dora_wd": "bool",
    "wd_on_output": "bool",
    "full_matrix": "bool",
    "bypass_mode": "bool",
    "rs_lora": "bool",
    "unbalanced_factorization": "bool",
    "decompose_both": "bool",
    "factor": "int",
    "loraplus_lr_ratio": "float",
    "loraplus_unet_lr_ratio": "float",
    "loraplus_text_encoder_lr_ratio": "float",
}
# written by kohya_ss's GUI but not read by lycoris-lora's kohya entry point
_IGNORED_BY_LYCORIS = ("rank_dropout_scale", "train_on_input", "train_t5xxl")
_DROPOUTS = ("dropout", "rank_dropout", "module_dropout")


@dataclass(frozen=True)
class ArgProblem:
    """One finding about network_args: an error unless `warning`."""

    message: str
    hint: str
    warning: bool = False


def strip_quotes(value: str) -> str:
    """A value without one pair of matching surrounding quotes (`"dylora"` -> `dylora`)."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _number_problem(name: str, kind: str, value: str) -> ArgProblem | None:
    try:
        number = float(value) if kind == "float" else int(value)
    except ValueError:
        wanted = "a number" if kind == "float" else "a whole number"
        return ArgProblem(f"{name}={value}: lycoris reads {wanted} here", f"e.g. {name}=1")
    if name in _DROPOUTS and not 0 <= number <= 1:
        return ArgProblem(f"{name}={value} is outside 0..1", f"e.g. {name}=0.1")
    if kind == "dim" and number < 0:
        return ArgProblem(f"{name}={value} must be 0 or more", "0 means network_dim")
    if name == "block_size" and number < 1:
        return ArgProblem(f"block_size={value} must be 1 or more", "e.g. block_size=4")
    if name == "factor" and number == 0:
        return ArgProblem("factor=0 cannot split a dimension", "use -1 (automatic) or a positive factor")
    return None


def _value_problem(name: str, value: str, network_dim: int) -> ArgProblem | None:
    kind = _ARGS[name]
    if kind == "bool":
        if value.lower() not in ("true", "false"):
            return ArgProblem(
                f"{name}={value}: lycoris reads every value except False as true",
                f"write {name}=True or {name}=False",
                warning=True,
            )
        return None
    if name == "algo" and value.lower() in REFUSED_ALGOS:
        return ArgProblem(
            f"algo={value} is not implemented: {REFUSED_ALGOS[value.lower()]}",
            "use algo=diag-oft, loha or lokr",
        )
    if name == "algo" and value.lower() not in ALGOS:
        close = difflib.get_close_matches(value.lower(), ALGOS, n=1)
        return ArgProblem(
            f"algo={value} is not a LyCORIS algorithm",
            (f"did you mean {close[0]}? " if close else "") + f"use one of {', '.join(ALGOS)}",
        )
    if name == "preset" and value not in PRESETS:
        return ArgProblem(
            f"preset={value}: only lycoris's builtin presets are supported (a preset file is not read here)",
            f"use one of {', '.join(PRESETS)}",
        )
    if name == "preset" and value == "ia3":
        return ArgProblem(
            "preset=ia3 finds no layer in SD 1.5 / SDXL: lycoris-lora 3.2 matches its names from the start of "
            "each layer path",
            "use preset=full (the default) or attn-mlp with algo=ia3",
        )
    if kind == "text":
        return None
    return _number_problem(name, kind, value)


def lycoris_arg_problems(args: Mapping[str, str], *, network_dim: int) -> list[ArgProblem]:
    """Every problem with LyCORIS network_args; unknown keys are warnings (kohya passes them on and lycoris
    ignores them)."""
    found: list[ArgProblem] = []
    values = {key: strip_quotes(str(value)) for key, value in args.items()}
    for name, value in values.items():
        if name in _ARGS:
            problem = _value_problem(name, value, network_dim)
            if problem is not None:
                found.append(problem)
        elif name in _IGNORED_BY_LYCORIS:
            found.append(
                ArgProblem(
                    f"lycoris-lora's kohya entry point does not read {name}, so it changes nothing (as in kohya)",
                    "remove it",
                    warning=True,
                )
            )
        else:
            close = difflib.get_close_matches(name, list(_ARGS), n=1)
            found.append(
                ArgProblem(
                    f"lycoris-lora does not read network_args key {name!r}, so it changes nothing",
                    f"did you mean {close[0]}?" if close else f"lycoris reads: {', '.join(_ARGS)}",
                    warning=True,
                )
            )
    algo = values.get("algo", "lora").lower()
    if algo == "dylora":
        block = values.get("block_size", "4")
        dims = [("network_dim", network_dim)]
        conv = values.get("conv_dim")
        if conv and conv.isdigit() and int(conv):
            dims.append(("conv_dim", int(conv)))
        for label, dim in dims:
            if block.isdigit() and int(block) and dim % int(block):
                found.append(
                    ArgProblem(
                        f"DyLoRA needs {label} ({dim}) to be a multiple of block_size ({block})",
                        f"set {label} to a multiple of {block}, or change block_size",
                    )
                )
    return found
