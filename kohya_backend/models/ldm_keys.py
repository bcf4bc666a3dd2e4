"""Key mapping between diffusers/transformers state dicts and the original single-file (LDM/SAI) layout.

One table per component (UNet, VAE, CLIP-L, OpenCLIP bigG), built from the architecture's own module keys, is
used in both directions: by the writer of our generated checkpoints and by the checkpoint reader. Each table
entry names one original-layout tensor, the diffusers tensor(s) it holds, and how they relate (the same tensor,
a 1x1 conv of a Linear weight, a transposed matrix, or q/k/v fused into one `in_proj`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import Tensor

from kohya_backend.errors import ModelError
from kohya_backend.models.arch import Architecture, architecture_from_json, architecture_to_json

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_TE_PREFIX = "cond_stage_model.transformer."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."

# Original-layout entries that carry no weights our modules need: EMA copies, the DDPM schedule buffers the
# LDM wrapper saves, CLIP's position_ids buffer and OpenCLIP's logit_scale. They are skipped when reading.
_IGNORED_PREFIXES = ("model_ema.",)
_IGNORED_NAMES = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
    }
)
_IGNORED_SUFFIXES = ("embeddings.position_ids", ".logit_scale")

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _resnet_rest(rest: list[str]) -> str:
    if rest and rest[0] in _UNET_RESNET:
        return _join(_UNET_RESNET[rest[0]], *rest[1:])
    return _join(*rest)


def _unet_block(
    parts: list[str], layers_per_block: int, up_block_types: Sequence[str] | None, name: str
) -> str:
    per = layers_per_block + 1
    side, i, kind, j, rest = parts[0], int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if side == "down_blocks":
        if kind == "downsamplers":
            op_rest = ["op", *rest[1:]] if rest and rest[0] == "conv" else rest
            return _join(f"input_blocks.{(i + 1) * per}.0", *op_rest)
        index = i * per + j + 1
        if kind == "resnets":
            return _join(f"input_blocks.{index}.0", _resnet_rest(rest))
        return _join(f"input_blocks.{index}.1", *rest)
    if kind == "upsamplers":
        if up_block_types is None:
            raise ValueError(f"mapping {name!r} needs up_block_types (the upsampler index depends on them)")
        slot = 2 if "CrossAttn" in up_block_types[i] else 1
        return _join(f"output_blocks.{i * per + layers_per_block}.{slot}", *rest)
    index = i * per + j
    if kind == "resnets":
        return _join(f"output_blocks.{index}.0", _resnet_rest(rest))
    return _join(f"output_blocks.{index}.1", *rest)


def unet_diffusers_to_ldm(
    name: str, layers_per_block: int, up_block_types: Sequence[str] | None = None
) -> str:
    """Map a diffusers UNet parameter key or module path to the original (SAI/LDM) layout, without prefix.

    `up_block_types` is needed only for upsampler names (their slot is 2 after an attention, else 1).
    """
    parts = name.split(".")
    for diffusers, ldm in _UNET_TOP.items():
        width = diffusers.count(".") + 1
        if parts[:width] == diffusers.split("."):
            return _join(ldm, *parts[width:])
    blocks = ("resnets", "attentions", "downsamplers", "upsamplers")
    try:
        numbered = len(parts) >= 4 and parts[1].isdigit() and parts[3].isdigit()
        if parts[0] in ("down_blocks", "up_blocks") and numbered and parts[2] in blocks:
            return _unet_block(parts, layers_per_block, up_block_types, name)
        if parts[0] == "mid_block" and len(parts) >= 3 and parts[2].isdigit():
            j, rest = int(parts[2]), parts[3:]
            if parts[1] == "attentions" and j == 0:
                return _join("middle_block.1", *rest)
            if parts[1] == "resnets" and j in (0, 1):
                return _join(f"middle_block.{2 * j}", _resnet_rest(rest))
    except IndexError as exc:
        raise ValueError(f"cannot map UNet name {name!r}: the block index is outside the model") from exc
    raise ValueError(f"cannot map UNet name {name!r} to the original layout")


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _vae_resnet(rest: list[str]) -> str:
    if rest and rest[0] == "conv_shortcut":
        return _join("nin_shortcut", *rest[1:])
    return _join(*rest)


def _vae_attention(rest: list[str]) -> str:
    if not rest or rest[0] not in _VAE_ATTN:
        raise ValueError(f"unknown VAE attention part {'.'.join(rest)!r}")
    tail = rest[2:] if rest[0] == "to_out" else rest[1:]
    return _join(_VAE_ATTN[rest[0]], *tail)


def vae_diffusers_to_ldm(name: str, num_blocks: int) -> str:
    """Map a diffusers AutoencoderKL key to the original layout (without prefix); up blocks are reversed."""
    parts = name.split(".")
    if parts[0] not in ("encoder", "decoder"):
        return name
    side, rest = parts[0], parts[1:]
    head = rest[0]
    if head == "conv_norm_out":
        return _join(side, "norm_out", *rest[1:])
    if head in ("down_blocks", "up_blocks") and len(rest) >= 4:
        i = int(rest[1]) if head == "down_blocks" else num_blocks - 1 - int(rest[1])
        block = f"{side}.{'down' if head == 'down_blocks' else 'up'}.{i}"
        if rest[2] == "resnets":
            return _join(f"{block}.block.{rest[3]}", _vae_resnet(rest[4:]))
        sampler = "downsample" if rest[2] == "downsamplers" else "upsample"
        return _join(f"{block}.{sampler}", *rest[4:])
    if head == "mid_block" and len(rest) >= 3:
        if rest[1] == "resnets":
            return _join(f"{side}.mid.block_{int(rest[2]) + 1}", _vae_resnet(rest[3:]))
        return _join(f"{side}.mid.attn_1", _vae_attention(rest[3:]))
    return name


def _open_clip_name(name: str) -> tuple[str, str | None]:
    """OpenCLIP name for a CLIPTextModelWithProjection key, and the fused q/k/v slot it fills (if any)."""
    key = name.removeprefix("text_model.")
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
        "text_projection.weight": "text_projection",
    }
    if key in fixed:
        return fixed[key], None
    parts = key.split(".")
    if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
        raise ValueError(f"cannot map text encoder key {name!r} to the OpenCLIP layout")
    base, rest = f"transformer.resblocks.{parts[2]}", parts[3:]
    if rest[0] == "self_attn" and rest[1] in ("q_proj", "k_proj", "v_proj"):
        return f"{base}.attn.in_proj_{rest[2]}", rest[1][0]
    renames = {"self_attn": "attn", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp": "mlp"}
    inner = {"fc1": "c_fc", "fc2": "c_proj"}
    return _join(base, renames.get(rest[0], rest[0]), *(inner.get(p, p) for p in rest[1:])), None


@dataclass(frozen=True)
class KeyRule:
    """One original-layout tensor and the diffusers/transformers tensor(s) it holds.

    kind: "same" (identical tensor), "conv1x1" (Linear weight stored as a 1x1 conv), "transpose" (matrix stored
    transposed) or "qkv" (q, k, v projections concatenated along dim 0, in that order).
    """

    ldm: str
    diffusers: tuple[str, ...]
    kind: str
    ldm_shape: tuple[int, ...]


@dataclass(frozen=True)
class ComponentTable:
    """Mapping of one component: its name ("unet", "vae", "te1", "te2") and its rules."""

    component: str
    rules: tuple[KeyRule, ...]
    diffusers_shapes: Mapping[str, tuple[int, ...]]


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _unet_rules(arch: Architecture, shapes: dict[str, tuple[int, ...]]) -> list[KeyRule]:
    return [
        KeyRule(
            UNET_PREFIX + unet_diffusers_to_ldm(k, arch.layers_per_block, arch.up_block_types),
            (k,),
            "same",
            s,
        )
        for k, s in shapes.items()
    ]


def _vae_rules(arch: Architecture, shapes: dict[str, tuple[int, ...]]) -> list[KeyRule]:
    rules = []
    num_blocks = len(arch.vae["block_out_channels"])
    for key, shape in shapes.items():
        ldm = VAE_PREFIX + vae_diffusers_to_ldm(key, num_blocks)
        if ".mid_block.attentions." in key and key.endswith(".weight") and len(shape) == 2:
            rules.append(KeyRule(ldm, (key,), "conv1x1", (*shape, 1, 1)))
        else:
            rules.append(KeyRule(ldm, (key,), "same", shape))
    return rules


def _clip_rules(prefix: str, shapes: dict[str, tuple[int, ...]]) -> list[KeyRule]:
    def ldm_name(key: str) -> str:
        return prefix + (key if key.startswith("text_model.") else "text_model." + key)

    return [KeyRule(ldm_name(k), (k,), "same", s) for k, s in shapes.items()]


def _open_clip_rules(prefix: str, shapes: dict[str, tuple[int, ...]]) -> list[KeyRule]:
    rules: list[KeyRule] = []
    fused: dict[str, dict[str, str]] = {}
    for key, shape in shapes.items():
        name, slot = _open_clip_name(key)
        if slot is not None:
            fused.setdefault(name, {})[slot] = key
        elif name == "text_projection":
            rules.append(KeyRule(prefix + name, (key,), "transpose", shape[::-1]))
        else:
            rules.append(KeyRule(prefix + name, (key,), "same", shape))
    for name, slots in fused.items():
        keys = (slots["q"], slots["k"], slots["v"])
        first = shapes[keys[0]]
        rules.append(KeyRule(prefix + name, keys, "qkv", (3 * first[0], *first[1:])))
    return rules


@functools.lru_cache(maxsize=8)
def _tables_for(arch_json: str) -> tuple[ComponentTable, ...]:
    arch = architecture_from_json(arch_json)
    with init_empty_weights(include_buffers=True):
        unet_shapes = _shapes(arch.build_unet())
        vae_shapes = _shapes(arch.build_vae())
        te_shapes = [_shapes(te) for te in arch.build_text_encoders()]
    tables = [
        ComponentTable("unet", tuple(_unet_rules(arch, unet_shapes)), unet_shapes),
        ComponentTable("vae", tuple(_vae_rules(arch, vae_shapes)), vae_shapes),
    ]
    if len(te_shapes) == 1:  # SD 1.5: CLIP-L alone
        tables.append(ComponentTable("te1", tuple(_clip_rules(SD15_TE_PREFIX, te_shapes[0])), te_shapes[0]))
    else:
        tables.append(ComponentTable("te1", tuple(_clip_rules(SDXL_TE1_PREFIX, te_shapes[0])), te_shapes[0]))
        tables.append(
            ComponentTable("te2", tuple(_open_clip_rules(SDXL_TE2_PREFIX, te_shapes[1])), te_shapes[1])
        )
    return tuple(tables)


def conversion_tables(arch: Architecture) -> tuple[ComponentTable, ...]:
    """The per-component key tables of `arch` (UNet, VAE, then each text encoder), built on the meta device."""
    return _tables_for(architecture_to_json(arch))


def clip_position_ids_key(arch: Architecture) -> str:
    """Original-layout key of the CLIP-L position_ids buffer that single-file checkpoints traditionally carry."""
    prefix = SD15_TE_PREFIX if len(arch.text_encoders) == 1 else SDXL_TE1_PREFIX
    return prefix + "text_model.embeddings.position_ids"


def rule_to_ldm(rule: KeyRule, state_dict: Mapping[str, Tensor]) -> Tensor:
    """The original-layout tensor of `rule`, built from a diffusers/transformers state dict."""
    if rule.kind == "qkv":
        return torch.cat([state_dict[k] for k in rule.diffusers], dim=0)
    tensor = state_dict[rule.diffusers[0]]
    if rule.kind == "conv1x1":
        return tensor[:, :, None, None]
    if rule.kind == "transpose":
        return tensor.t().contiguous()
    return tensor


def rule_to_diffusers(rule: KeyRule, tensor: Tensor) -> dict[str, Tensor]:
    """The diffusers/transformers tensor(s) of `rule`, built from its original-layout tensor."""
    if rule.kind == "qkv":
        return dict(zip(rule.diffusers, torch.chunk(tensor, 3, dim=0)))
    if rule.kind == "conv1x1":
        return {rule.diffusers[0]: tensor[:, :, 0, 0]}
    if rule.kind == "transpose":
        return {rule.diffusers[0]: tensor.t().contiguous()}
    return {rule.diffusers[0]: tensor}


def diffusers_to_ldm_state_dict(
    arch: Architecture,
    unet_sd: Mapping[str, Tensor],
    vae_sd: Mapping[str, Tensor],
    te_sds: Sequence[Mapping[str, Tensor]],
) -> dict[str, Tensor]:
    """Convert component state dicts to one original single-file state dict (tensors are shared, not copied).

    The CLIP-L position_ids buffer is added as original checkpoints carry it.
    """
    tables = conversion_tables(arch)
    sources = [unet_sd, vae_sd, *te_sds]
    if len(sources) != len(tables):
        raise ValueError(
            f"{arch.family} needs {len(tables) - 2} text encoder state dict(s), got {len(te_sds)}"
        )
    out: dict[str, Tensor] = {}
    for table, sd in zip(tables, sources):
        expected = set(table.diffusers_shapes)
        if set(sd) != expected:
            missing = sorted(expected - set(sd))[:5]
            extra = sorted(set(sd) - expected)[:5]
            raise ValueError(
                f"{table.component} state dict does not match {arch.family}: missing {missing}, extra {extra}"
            )
        for rule in table.rules:
            out[rule.ldm] = rule_to_ldm(rule, sd)
    position_key = clip_position_ids_key(arch)
    if position_key not in out:
        positions = int(arch.text_encoders[0]["max_position_embeddings"])
        out[position_key] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def is_ignorable_key(key: str) -> bool:
    """True for original-layout entries that carry nothing our modules load (see `_IGNORED_NAMES`)."""
    return key.startswith(_IGNORED_PREFIXES) or key in _IGNORED_NAMES or key.endswith(_IGNORED_SUFFIXES)


def normalise_ldm_keys(ldm_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename CLIP-L keys saved by old transformers without `text_model.` to today's layout (no tensor copies)."""
    renamed: dict[str, Tensor] = {}
    for key, tensor in ldm_sd.items():
        for prefix in (SD15_TE_PREFIX, SDXL_TE1_PREFIX):
            if key.startswith(prefix) and not key.startswith(prefix + "text_model."):
                key = prefix + "text_model." + key[len(prefix) :]
        renamed[key] = tensor
    return renamed


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def ldm_to_diffusers_state_dicts(
    arch: Architecture, ldm_sd: Mapping[str, Tensor], *, source: str = "checkpoint"
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[dict[str, Tensor]]]:
    """Split an original single-file state dict into (unet, vae, [text encoders]) diffusers state dicts.

    Raises ModelError naming missing keys, unexpected keys and shape mismatches. Ignored as harmless: EMA
    weights (`model_ema.*`), the LDM wrapper's noise-schedule buffers (betas, alphas_cumprod, posterior_*, ...),
    CLIP's `position_ids` buffer and OpenCLIP's `logit_scale`. CLIP-L keys lacking `text_model.` (files saved
    with old transformers) are accepted.
    """
    tables = conversion_tables(arch)
    ldm_sd = normalise_ldm_keys(ldm_sd)
    results: list[dict[str, Tensor]] = []
    missing: list[str] = []
    mismatched: list[str] = []
    used: set[str] = set()
    for table in tables:
        converted: dict[str, Tensor] = {}
        for rule in table.rules:
            tensor = ldm_sd.get(rule.ldm)
            if tensor is None:
                missing.append(rule.ldm)
                continue
            used.add(rule.ldm)
            if tuple(tensor.shape) != rule.ldm_shape:
                mismatched.append(f"{rule.ldm} {tuple(tensor.shape)} (expected {rule.ldm_shape})")
                continue
            converted.update(rule_to_diffusers(rule, tensor))
        results.append(converted)
    unexpected = sorted(k for k in ldm_sd if k not in used and not is_ignorable_key(k))
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
        raise ModelError(
            f"{source} does not match the {arch.family} architecture: " + "; ".join(problems),
            hint="choose a complete single-file checkpoint of this model family "
            "(not a LoRA, VAE-only, inpainting or pruned UNet-only file)",
        )
    return results[0], results[1], results[2:]
