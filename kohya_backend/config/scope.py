"""Configs for trainings this project does not do (Flux, SD3, Stable Cascade, textual inversion, ControlNet-LLLite,
full fine-tuning): told apart by the keys only those sd-scripts trainers read, and refused in one sentence instead of
a list of unknown keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kohya_backend.errors import ConfigIssue

_SUPPORTED = "this trainer trains LoRAs for SD 1.5 and SDXL only"

# (what it is, keys only its sd-scripts trainer reads, network modules that name it); SD3 before Flux.1, which
# shares t5xxl and clip_l with it
_KINDS: tuple[tuple[str, frozenset[str], frozenset[str]], ...] = (
    (
        "an SD3 LoRA config",
        frozenset(
            ["clip_g", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "clip_g_dropout_rate"]
        ),
        frozenset({"networks.lora_sd3"}),
    ),
    (
        "a Flux.1 LoRA config",
        frozenset(
            [
                "ae",
                "t5xxl",
                "guidance_scale",
                "timestep_sampling",
                "model_prediction_type",
                "discrete_flow_shift",
                "apply_t5_attn_mask",
                "t5xxl_max_token_length",
                "split_mode",
            ]
        ),
        frozenset({"networks.lora_flux", "networks.oft_flux"}),
    ),
    (
        "a Stable Cascade config",
        frozenset(
            [
                "stage_a_checkpoint_path",
                "stage_b_checkpoint_path",
                "stage_c_checkpoint_path",
                "effnet_checkpoint_path",
                "previewer_checkpoint_path",
                "text_model_checkpoint_path",
                "adaptive_loss_weight",
            ]
        ),
        frozenset(),
    ),
    (
        "a textual inversion config",
        frozenset(
            [
                "token_string",
                "init_word",
                "num_vectors_per_token",
                "use_object_template",
                "use_style_template",
            ]
        ),
        frozenset(),
    ),
    (
        "a ControlNet-LLLite config",
        frozenset({"cond_emb_dim"}),
        frozenset({"networks.control_net_lllite", "networks.control_net_lllite_for_train"}),
    ),
    (
        "a HunyuanImage, Lumina or Anima LoRA config",
        frozenset(["byt5", "gemma2", "qwen3", "llm_adapter_path"]),
        frozenset({"networks.lora_hunyuan_image", "networks.lora_lumina", "networks.lora_anima"}),
    ),
)


def _shown_keys(keys: list[str]) -> str:
    return ", ".join(sorted(keys)[:3])


def out_of_scope(values: Mapping[str, Any]) -> ConfigIssue | None:
    """The one-sentence refusal of a config written for another sd-scripts trainer, or None when it is a LoRA
    config this trainer can read (which may still have other problems)."""
    module = str(values.get("network_module") or "").strip()
    for what, keys, modules in _KINDS:
        found = [k for k in keys if values.get(k) not in (None, "", False)]
        if module in modules:
            reason = f"network_module = {module!r}"
        elif found:
            reason = f"it sets {_shown_keys(found)}"
        else:
            continue
        key = "network_module" if module in modules else sorted(found)[0]
        return ConfigIssue(f"This is {what} ({reason}): {_SUPPORTED}.", key=key)
    return None


def out_of_scope_issue(what: str, reason: str, key: str | None = None) -> ConfigIssue:
    """The same one-sentence refusal for a kind recognised elsewhere (e.g. a kohya_ss GUI checkbox)."""
    return ConfigIssue(f"This is {what} ({reason}): {_SUPPORTED}.", key=key)
