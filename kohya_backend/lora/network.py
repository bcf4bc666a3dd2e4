"""LoRA network over kohya's target modules, with kohya's key names, alpha scaling and LoCon conv shapes.

Hand-written instead of peft: kohya's key names, alpha scaling and LoCon conv shapes ARE the file format,
and a small wrapper keeps them exact.

Targets (kohya's sd-scripts `networks.lora`): every Linear and Conv2d inside the UNet's Transformer2DModel
blocks and inside the text encoders' CLIP attention/MLP blocks; with LoCon (`conv_dim`) also everything
inside the UNet's ResnetBlock2D, Downsample2D and Upsample2D (3x3 convs at `conv_dim`/`conv_alpha`, their
Linear and 1x1 convs at `network_dim`/`network_alpha`, as sd-scripts does).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from kohya_backend.errors import ConfigError, ConfigIssue, ModelError
from kohya_backend.families import FAMILIES
from kohya_backend.lora.max_norm import MaxNormStats, scale_lora_norms
from kohya_backend.models.ldm_keys import unet_diffusers_to_ldm

UNET_PREFIX = "lora_unet"

_UNET_TARGETS = frozenset({"Transformer2DModel"})
_UNET_CONV_TARGETS = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"})
_TE_TARGETS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"})
_TE_ROOT = "text_model."


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ModelError(
            f"unknown model family {family!r} for the LoRA network",
            hint=f"use one of {', '.join(FAMILIES)}",
        )


def _refresh_scale(module: nn.Module, incompatible_keys: Any) -> None:
    """After torch's load_state_dict (e.g. a training-state resume), derive the scale from the loaded alpha."""
    if isinstance(module, LoRAModule) and not module.alpha.is_meta:  # type: ignore[union-attr]
        module.set_alpha(float(module.alpha))  # type: ignore[arg-type]


def _network_issue(message: str, key: str, hint: str) -> ConfigError:
    return ConfigError([ConfigIssue(message, key=key, hint=hint)])


def _is_target_layer(module: nn.Module) -> bool:
    # sd-scripts matches by class name, so subclasses with other names are not targeted; the same here
    return type(module).__name__ in ("Linear", "Conv2d")


def _is_3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _block_children(root: nn.Module, classes: frozenset[str]) -> Iterator[tuple[str, nn.Module]]:
    """(full module path, layer) for every Linear/Conv2d inside a module whose class is in `classes`."""
    seen: set[int] = set()
    for block_name, block in root.named_modules():
        if type(block).__name__ not in classes:
            continue
        for child_name, child in block.named_modules():
            if _is_target_layer(child) and id(child) not in seen:
                seen.add(id(child))
                yield f"{block_name}.{child_name}", child


def _unet_up_block_types(unet: nn.Module) -> Sequence[str] | None:
    config = getattr(unet, "config", None)
    if config is None:
        return None
    types = config.get("up_block_types") if isinstance(config, Mapping) else None
    return list(types) if types is not None else None


def _unet_targets(
    family: str, unet: nn.Module, *, conv: bool, layers_per_block: int
) -> list[tuple[str, nn.Module]]:
    classes = _UNET_TARGETS | _UNET_CONV_TARGETS if conv else _UNET_TARGETS
    up_block_types = _unet_up_block_types(unet)
    targets = []
    for path, module in _block_children(unet, classes):
        if _is_3x3(module) and not conv:
            continue
        if FAMILIES[family].unet_lora_layout == "ldm":
            # SDXL LoRAs name the UNet in the original (SAI) layout, as sd-scripts' own SDXL UNet does
            try:
                path = unet_diffusers_to_ldm(path, layers_per_block, up_block_types)
            except ValueError as exc:
                raise ModelError(
                    f"cannot name the SDXL UNet layer {path!r} in kohya's layout: {exc}",
                    hint="load an SDXL base UNet (diffusers UNet2DConditionModel with the SDXL block layout)",
                ) from exc
        targets.append((f"{UNET_PREFIX}_{path.replace('.', '_')}", module))
    return targets


def _te_prefix(family: str, index: int) -> str:
    return FAMILIES[family].te_lora_prefixes[index]


def _te_targets(family: str, text_encoders: Sequence[nn.Module]) -> list[tuple[str, nn.Module]]:
    targets = []
    for index, encoder in enumerate(text_encoders):
        prefix = _te_prefix(family, index)
        for path, module in _block_children(encoder, _TE_TARGETS):
            # transformers 5's CLIPTextModel drops the "text_model." level; kohya's names always have it
            rel = path[len(_TE_ROOT) :] if path.startswith(_TE_ROOT) else path
            targets.append((f"{prefix}_{(_TE_ROOT + rel).replace('.', '_')}", module))
    return targets


def lora_targets(
    *,
    family: str,
    unet: nn.Module | None,
    text_encoders: Sequence[nn.Module],
    conv: bool,
    unet_layers_per_block: int = 2,
) -> list[tuple[str, nn.Module]]:
    """(kohya name, module) of every layer a kohya LoRA (LoCon when `conv`) wraps; pure, works on meta models."""
    _check_family(family)
    targets = _te_targets(family, text_encoders)
    if unet is not None:
        targets += _unet_targets(family, unet, conv=conv, layers_per_block=unet_layers_per_block)
    return targets


class LoRAModule(nn.Module):
    """Low-rank update of one Linear/Conv2d: adds up(down(x)) * multiplier * alpha / dim to its output."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        *,
        dim: int,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise _network_issue(
                f"{lora_name}: LoRA rank must be >= 1, got {dim}",
                "network_dim",
                "network_dim / conv_dim >= 1",
            )
        self.lora_name = lora_name
        self.lora_dim = dim
        if not isinstance(org_module, (nn.Conv2d, nn.Linear)):
            raise ModelError(
                f"{lora_name}: LoRA wraps only Linear and Conv2d, not {type(org_module).__name__}"
            )
        device = org_module.weight.device
        self.lora_down: nn.Conv2d | nn.Linear
        self.lora_up: nn.Conv2d | nn.Linear
        if isinstance(org_module, nn.Conv2d):
            # same kernel/stride/padding as the wrapped conv; the up projection is 1x1 (kohya's LoCon shapes)
            self.lora_down = nn.Conv2d(
                org_module.in_channels,
                dim,
                org_module.kernel_size,  # type: ignore[arg-type]
                org_module.stride,  # type: ignore[arg-type]
                org_module.padding,  # type: ignore[arg-type]
                bias=False,
                device=device,
            )
            self.lora_up = nn.Conv2d(dim, org_module.out_channels, 1, 1, bias=False, device=device)
        else:
            self.lora_down = nn.Linear(org_module.in_features, dim, bias=False, device=device)
            self.lora_up = nn.Linear(dim, org_module.out_features, bias=False, device=device)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha or dim), device=device))
        self.scale = float(alpha or dim) / dim
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # kept outside the module tree so the network's parameters and state dict hold only LoRA weights
        self._org: tuple[nn.Module] = (org_module,)
        self._org_forward: Any = None
        self._had_own_forward = False
        self.register_load_state_dict_post_hook(_refresh_scale)

    @property
    def org_module(self) -> nn.Module:
        """The wrapped layer."""
        return self._org[0]

    @property
    def applied(self) -> bool:
        """Whether the wrapped layer's forward currently runs through this module."""
        return self._org_forward is not None

    def set_alpha(self, alpha: float) -> None:
        """Set alpha (0 means alpha = dim) and the scale derived from it."""
        value = float(alpha) or float(self.lora_dim)
        with torch.no_grad():
            self.alpha.fill_(value)  # type: ignore[operator]
        self.scale = value / self.lora_dim

    def apply_to(self) -> None:
        """Route the wrapped layer's forward through this module (a second call does nothing)."""
        if self.applied:
            return
        org = self.org_module
        self._had_own_forward = "forward" in org.__dict__
        self._org_forward = org.forward
        org.forward = self.forward  # type: ignore[method-assign]

    def remove(self) -> None:
        """Restore the wrapped layer's own forward."""
        if not self.applied:
            return
        org = self.org_module
        if self._had_own_forward:
            org.forward = self._org_forward  # type: ignore[method-assign]
        else:
            del org.forward
        self._org_forward = None

    def lora_delta(self, x: Tensor) -> Tensor:
        """The LoRA branch alone: up(dropout(down(x))) * multiplier * alpha / dim, in the LoRA's dtype."""
        x = x.to(self.lora_down.weight.dtype)
        lx = _pointwise(x, self.lora_down.weight) if _is_pointwise(self.lora_down) else self.lora_down(x)
        if self.dropout and self.training:
            # sd-scripts drops out the rank-r activations (after lora_down), not the layer input
            lx = torch.nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            lx = lx * rank_dropout_mask(lx, self.lora_dim, self.rank_dropout)
            scale = self.scale / (1.0 - self.rank_dropout)  # as if the rank had shrunk (sd-scripts' scaling)
        up = _pointwise(lx, self.lora_up.weight) if _is_pointwise(self.lora_up) else self.lora_up(lx)
        return up * (self.multiplier * scale)

    def forward(self, x: Tensor) -> Tensor:
        """Original output plus the scaled LoRA update (only meaningful while applied); with module_dropout, a
        training step skips the whole update with that probability."""
        out = (self._org_forward or self.org_module.forward)(x)
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return out
        return out + self.lora_delta(x).to(out.dtype)


def rank_dropout_mask(lx: Tensor, rank: int, p: float) -> Tensor:
    """sd-scripts' rank dropout: keep each rank channel of each sample with probability 1 - p (the same channels
    for every token or pixel of that sample)."""
    mask = torch.rand((lx.size(0), rank), device=lx.device) > p
    if lx.dim() == 3:  # (batch, tokens, rank): Linear layers
        return mask.unsqueeze(1)
    if lx.dim() == 4:  # (batch, rank, h, w): Conv2d layers
        return mask.unsqueeze(-1).unsqueeze(-1)
    return mask


def _is_pointwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding == (0, 0)
        and module.groups == 1
    )


def _pointwise(x: Tensor, weight: Tensor) -> Tensor:
    """A bias-free 1x1 convolution as a matmul over channels: rank-r 1x1 convs take PyTorch's slow CPU conv path."""
    return torch.nn.functional.linear(x.movedim(1, -1), weight.flatten(1)).movedim(-1, 1)


class LoRANetwork(nn.Module):
    """All LoRA modules of one training run; its state dict keys are kohya's LoRA file keys."""

    def __init__(
        self,
        *,
        family: str,
        unet: nn.Module | None,
        text_encoders: Sequence[nn.Module],
        network_dim: int,
        network_alpha: float,
        conv_dim: int | None = None,
        conv_alpha: float | None = None,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        train_unet: bool = True,
        train_text_encoder: bool = True,
        multiplier: float = 1.0,
        unet_layers_per_block: int = 2,
    ) -> None:
        super().__init__()
        _check_family(family)
        if not train_unet and not train_text_encoder:
            raise _network_issue(
                "the LoRA would train nothing: both the UNet and the text encoder are excluded",
                "network_train_unet_only",
                "drop network_train_unet_only or network_train_text_encoder_only",
            )
        if dropout is not None and not 0 <= dropout < 1:
            raise _network_issue(
                f"must be in [0, 1), got {dropout}", "network_dropout", "e.g. 0.1, or leave unset"
            )
        self.family = family
        self.network_dim = network_dim
        self.network_alpha = network_alpha
        # LoCon as sd-scripts: conv_dim 0/None disables it; a missing conv_alpha means 1.0
        self.conv_dim = conv_dim or None
        self.conv_alpha = (1.0 if conv_alpha is None else conv_alpha) if self.conv_dim else None
        self.dropout = dropout
        self.multiplier = multiplier
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        if train_text_encoder:
            self.text_encoder_loras = self._create(_te_targets(family, text_encoders), dropout)
        if train_unet:
            if unet is None:
                raise ModelError("train_unet is set but no UNet was given to the LoRA network")
            targets = _unet_targets(
                family, unet, conv=self.conv_dim is not None, layers_per_block=unet_layers_per_block
            )
            self.unet_loras = self._create(targets, dropout)
        if train_unet and not self.unet_loras:
            raise ModelError(
                "the UNet has no layer a kohya LoRA can target (no Transformer2DModel blocks found)",
                hint="load an SD 1.5 / SDXL UNet (diffusers UNet2DConditionModel with cross-attention blocks)",
            )
        if train_text_encoder and text_encoders and not self.text_encoder_loras:
            raise ModelError(
                "the text encoder has no layer a kohya LoRA can target (no CLIP attention/MLP blocks found)",
                hint="load CLIP text encoders (transformers CLIPTextModel)",
            )

    def _create(self, targets: list[tuple[str, nn.Module]], dropout: float | None) -> list[LoRAModule]:
        loras = []
        for name, module in targets:
            if _is_3x3(module) and self.conv_dim is not None:
                dim, alpha = self.conv_dim, self.conv_alpha
            else:
                dim, alpha = self.network_dim, self.network_alpha
            lora = LoRAModule(
                name,
                module,
                dim=dim,
                alpha=alpha,
                multiplier=self.multiplier,
                dropout=dropout,
                rank_dropout=self.rank_dropout,
                module_dropout=self.module_dropout,
            )
            if name in self._modules:
                raise ModelError(f"two layers map to the same LoRA name {name!r}")
            self.add_module(name, lora)
            loras.append(lora)
        return loras

    @property
    def all_loras(self) -> list[LoRAModule]:
        """Text encoder LoRAs then UNet LoRAs."""
        return self.text_encoder_loras + self.unet_loras

    def apply_to(self) -> None:
        """Patch every wrapped layer's forward to add its LoRA update (idempotent)."""
        for lora in self.all_loras:
            lora.apply_to()

    def remove(self) -> None:
        """Restore every wrapped layer's original forward (idempotent)."""
        for lora in self.all_loras:
            lora.remove()

    def set_multiplier(self, multiplier: float) -> None:
        """Set the strength every LoRA update is added with (1.0 while training)."""
        self.multiplier = multiplier
        for lora in self.all_loras:
            lora.multiplier = multiplier

    def param_groups(self, *, unet_lr: float, text_encoder_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups "unet" and "text_encoder" (a group without LoRAs is left out)."""
        groups = []
        for name, loras, lr in (
            ("text_encoder", self.text_encoder_loras, text_encoder_lr),
            ("unet", self.unet_loras, unet_lr),
        ):
            params = [p for lora in loras for p in lora.parameters()]
            if params:
                groups.append({"name": name, "params": params, "lr": lr})
        return groups

    def apply_max_norm_regularization(self, max_norm: float) -> MaxNormStats:
        """kohya's scale_weight_norms: scale down every LoRA whose update norm exceeds `max_norm` (in place)."""
        return scale_lora_norms(
            ((m.lora_down.weight, m.lora_up.weight, cast(Tensor, m.alpha)) for m in self.all_loras), max_norm
        )

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Detached copies of lora_down/lora_up/alpha under kohya's keys, cast to `dtype`, on their device."""
        return {
            key: (value.detach().to(dtype) if dtype is not None else value.detach()).clone()
            for key, value in self.state_dict().items()
        }

    def load_kohya_state_dict(self, sd: Mapping[str, Tensor], *, strict: bool = True) -> None:
        """Load kohya-format LoRA weights (`network_weights`); a missing or zero alpha means alpha = dim."""
        own = self.state_dict()
        missing = sorted(k for k in own if k not in sd and not k.endswith(".alpha"))
        unexpected = sorted(k for k in sd if k not in own)
        if strict and (missing or unexpected):
            raise ModelError(
                "the LoRA weights do not fit this network: "
                + key_summary("missing", missing)
                + ("; " if missing and unexpected else "")
                + key_summary("unexpected", unexpected),
                hint="use network_weights trained for the same model family, network targets "
                "(conv_dim, network_train_unet_only) and text encoder setting",
            )
        for key, value in sd.items():
            if key in own and own[key].shape != value.shape:
                raise ModelError(
                    f"LoRA weight {key} has shape {list(value.shape)}, this network expects {list(own[key].shape)}",
                    hint="set network_dim (and conv_dim) to the rank the network_weights file was trained with",
                )
        with torch.no_grad():
            for lora in self.all_loras:
                keys = [f"{lora.lora_name}.{part}" for part in ("lora_down.weight", "lora_up.weight")]
                if not any(key in sd for key in keys):
                    continue  # only possible when not strict: this LoRA keeps its initial weights
                for key in keys:
                    if key in sd:
                        own[key].copy_(sd[key].to(device=own[key].device, dtype=own[key].dtype))
                alpha = sd.get(f"{lora.lora_name}.alpha")
                lora.set_alpha(float(alpha) if alpha is not None else 0.0)


def key_summary(label: str, keys: list[str], shown: int = 5) -> str:
    """The words a load uses for keys it could not match: N <label> key(s), the first few (also lora/lycoris.py)."""
    if not keys:
        return ""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {label} key(s): {', '.join(keys[:shown])}{more}"
