"""LyCORIS networks (`network_module = "lycoris.kohya"`) built by the lycoris-lora package itself, as kohya does.

lycoris-lora picks target blocks by class name and names each module after its path in the model, so it has to see
the model as sd-scripts' own UNet and CLIP present it: sd-scripts' SD 1.5 UNet uses diffusers' names (its attention
class is called CrossAttention), its SDXL UNet the original (SAI) layout, and its text encoders keep transformers 4's
"text_model." level. We hand lycoris a *view*: a tree of empty containers with those names and class names whose
leaves are the real Linear/Conv/Norm layers, so every module lycoris creates wraps a real layer and carries the key
name lycoris writes for kohya's models. Keys and tensors are lycoris's; A1111 and Forge load them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from kohya_backend.config.lycoris_args import strip_quotes
from kohya_backend.errors import ModelError
from kohya_backend.families import FAMILIES
from kohya_backend.lora.max_norm import MaxNormStats
from kohya_backend.lora.network import key_summary
from kohya_backend.models.ldm_keys import unet_diffusers_to_ldm

_TE_ROOT = "text_model."
_LEAF_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm)
# class names as sd-scripts' own models have them, where diffusers' differ
_SD15_CLASSES = {"Attention": "CrossAttention"}
_SDXL_CLASSES = {"Attention": "CrossAttention", "TimestepEmbedding": "Sequential"}
_PRESET_STATE = (
    "ENABLE_CONV",
    "UNET_TARGET_REPLACE_MODULE",
    "UNET_TARGET_REPLACE_NAME",
    "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "TEXT_ENCODER_TARGET_REPLACE_NAME",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "USE_FNMATCH",
)
_GROUP_NAMES = {"textencoder": "text_encoder", "unet": "unet"}


@cache
def _lycoris() -> tuple[Any, dict[str, Any]]:
    """lycoris.kohya and its class-level preset state as first imported.

    lycoris 3.2's kohya entry point has no "ia3" entry in its module table although the package ships IA3Module
    (lycoris 4 adds it): we register it, so algo=ia3 builds what later lycoris versions build.
    """
    try:
        from lycoris import kohya
        from lycoris.modules.ia3 import IA3Module
        from lycoris.wrapper import network_module_dict
    except ImportError as exc:
        raise ModelError(
            f"LyCORIS networks need the lycoris-lora package, which cannot be loaded: {exc}",
            hint="pip install lycoris-lora==3.2.0.post2 (the version kohya_ss installs)",
        ) from exc
    logging.getLogger("LyCORIS").setLevel(
        logging.WARNING
    )  # its per-module INFO lines would flood the job log
    network_module_dict.setdefault("ia3", IA3Module)
    cls = kohya.LycorisNetworkKohya
    return kohya, {name: getattr(cls, name) for name in _PRESET_STATE}


@cache
def _container_class(name: str) -> type[nn.Module]:
    """An empty module class with this class name (lycoris matches target blocks by class name)."""
    return type(name, (nn.Module,), {"__doc__": f"Stand-in for sd-scripts' {name} in a LyCORIS view."})


def _place(root: nn.Module, path: str, module: nn.Module, class_name: str) -> None:
    parent = root
    *parents, last = path.split(".")
    for part in parents:
        child = parent._modules.get(part)
        if child is None:
            child = _container_class("Module")()
            parent.add_module(part, child)
        parent = child
    if last in parent._modules:
        return  # the first module mapped to a name keeps it
    node = module if isinstance(module, _LEAF_TYPES) else _container_class(class_name)()
    parent.add_module(last, node)


def model_view(root: nn.Module, rename: Callable[[str], str | None], classes: Mapping[str, str]) -> nn.Module:
    """A tree with `rename(path)` names whose leaves are the real layers of `root` (None leaves a module out)."""
    view = _container_class("Module")()
    for path, module in root.named_modules():
        if not path:
            continue
        new = rename(path)
        if new:
            name = type(module).__name__
            _place(view, new, module, classes.get(name, name))
    return view


def _te_path(path: str) -> str:
    return path if path.startswith(_TE_ROOT) or path == _TE_ROOT[:-1] else _TE_ROOT + path


def _sdxl_path(layers_per_block: int, up_block_types: Sequence[str] | None) -> Callable[[str], str | None]:
    def rename(path: str) -> str | None:
        try:
            return unet_diffusers_to_ldm(path, layers_per_block, up_block_types)
        except ValueError:
            return None  # a diffusers-only container (down_blocks.1, ...): its layers are placed by their own path

    return rename


def _up_block_types(unet: nn.Module) -> Sequence[str] | None:
    config = getattr(unet, "config", None)
    types = config.get("up_block_types") if isinstance(config, Mapping) else None
    return list(types) if types is not None else None


def _split_dylora(loras: Sequence[Any], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state_dict)
    for lora in loras:
        if type(lora).__name__ != "DyLoraModule":
            continue
        name, size = lora.lora_name, int(lora.block_size)
        up, down = out.pop(f"{name}.lora_up.weight", None), out.pop(f"{name}.lora_down.weight", None)
        if up is not None:
            for i, block in enumerate(up.reshape(up.shape[0], -1).split(size, dim=1)):
                out[f"{name}.up_list.{i}"] = block
        if down is not None:
            for i, block in enumerate(down.reshape(down.shape[0], -1).split(size, dim=0)):
                out[f"{name}.down_list.{i}"] = block
    return out


def lycoris_kwargs(network_args: Mapping[str, str]) -> dict[str, str]:
    """network_args as kohya hands them to lycoris: strings, one pair of surrounding quotes removed (the GUI's
    command-line form `algo="dylora"` reaches kohya without its quotes)."""
    return {key: strip_quotes(str(value)) for key, value in network_args.items()}


class LycorisNetwork(nn.Module):
    """A LyCORIS network over a loaded model: lycoris-lora's modules under the keys lycoris writes for kohya."""

    def __init__(
        self,
        *,
        family: str,
        unet: nn.Module | None,
        text_encoders: Sequence[nn.Module],
        network_dim: int,
        network_alpha: float,
        network_args: Mapping[str, str],
        train_unet: bool = True,
        train_text_encoder: bool = True,
        multiplier: float = 1.0,
        unet_layers_per_block: int = 2,
    ) -> None:
        super().__init__()
        kohya, preset_state = _lycoris()
        self.family = family
        self.network_dim = network_dim
        self.network_alpha = network_alpha
        self.multiplier = multiplier
        kwargs = lycoris_kwargs(network_args)
        self.algo = (kwargs.get("algo") or "lora").lower()
        views = self._views(family, unet, text_encoders, unet_layers_per_block)
        # a fresh process starts from lycoris's class defaults; earlier presets in this one must not leak in
        kohya.LycorisNetworkKohya.apply_preset(
            {
                "enable_conv": preset_state["ENABLE_CONV"],
                "module_algo_map": preset_state["MODULE_ALGO_MAP"],
                "name_algo_map": preset_state["NAME_ALGO_MAP"],
                "use_fnmatch": preset_state["USE_FNMATCH"],
            }
        )
        try:
            self._net = kohya.create_network(
                multiplier, network_dim, network_alpha, None, views[0], views[1], **kwargs
            )
        except (AssertionError, KeyError, ValueError, TypeError) as exc:
            raise ModelError(
                f"lycoris-lora could not build the {self.algo} network: {type(exc).__name__}: {exc}",
                hint="check network_args (algo, preset, factor, block_size must divide network_dim/conv_dim)",
            ) from exc
        self.text_encoder_loras: list[Any] = list(self._net.text_encoder_loras) if train_text_encoder else []
        self.unet_loras: list[Any] = list(self._net.unet_loras) if train_unet else []
        self._net.text_encoder_loras, self._net.unet_loras = self.text_encoder_loras, self.unet_loras
        self._net.loras = self.all_loras
        if not self.all_loras:
            raise ModelError(
                f"lycoris-lora's {self.algo} network found no layer to train with these network_args",
                hint='use preset=full (the default) or a preset that matches SD 1.5 / SDXL, e.g. "attn-mlp"',
            )
        for lora in self.all_loras:
            self.add_module(lora.lora_name, lora)
        # trained in float32 like every other network; algo=full copies the layer's own dtype (fp16 checkpoints)
        self.float()
        self._applied = False

    @staticmethod
    def _views(
        family: str, unet: nn.Module | None, text_encoders: Sequence[nn.Module], layers_per_block: int
    ) -> tuple[Any, nn.Module]:
        tes = [model_view(te, _te_path, {}) for te in text_encoders]
        te_arg: Any = tes[0] if len(tes) == 1 else tes
        if unet is None:
            return te_arg, _container_class("Module")()
        if FAMILIES[family].unet_lora_layout == "ldm":  # SDXL: kohya's original (SAI) block names
            rename = _sdxl_path(layers_per_block, _up_block_types(unet))
            return te_arg, model_view(unet, rename, _SDXL_CLASSES)
        return te_arg, model_view(unet, lambda path: path, _SD15_CLASSES)

    @property
    def all_loras(self) -> list[Any]:
        """Text encoder modules then UNet modules."""
        return self.text_encoder_loras + self.unet_loras

    def apply_to(self) -> None:
        """Route every wrapped layer's forward through its LyCORIS module (a second call does nothing)."""
        if not self._applied:
            for lora in self.all_loras:
                lora.apply_to()
            self._applied = True

    def remove(self) -> None:
        """Restore the wrapped layers' forwards."""
        if self._applied:
            for lora in reversed(self.all_loras):
                lora.restore()
            self._applied = False

    def set_multiplier(self, multiplier: float) -> None:
        """Set the strength every module's update is applied with."""
        self.multiplier = multiplier
        for lora in self.all_loras:
            lora.multiplier = multiplier

    def param_groups(self, *, unet_lr: float, text_encoder_lr: float) -> list[dict[str, Any]]:
        """Optimizer groups as lycoris forms them (LoRA+ ratios give extra "plus" groups), named like ours."""
        params, descriptions = self._net.prepare_optimizer_params(text_encoder_lr, unet_lr, None)
        groups = []
        for group, description in zip(params, descriptions):
            part, _, plus = description.partition(" ")
            name = _GROUP_NAMES.get(part, part) + ("_plus" if plus else "")
            groups.append({**group, "params": list(group["params"]), "name": name})
        return groups

    def apply_max_norm_regularization(self, max_norm: float) -> MaxNormStats:
        """kohya's scale_weight_norms through lycoris's own per-module max-norm."""
        scaled, mean, largest = self._net.apply_max_norm_regularization(max_norm, None)
        return MaxNormStats(int(scaled), float(mean), float(largest))

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Detached copies of the tensors lycoris saves, under its keys, cast to `dtype` as lycoris's save does."""
        return {
            key: (value.detach().to(dtype) if dtype is not None else value.detach()).clone()
            for key, value in self.state_dict().items()
        }

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """torch's load_state_dict, reading DyLoRA's saved lora_up/lora_down back into its rank blocks (lycoris
        3.2's DyLoRA saves the joined matrices but cannot load them)."""
        return super().load_state_dict(
            _split_dylora(self.all_loras, state_dict), strict=strict, assign=assign
        )

    def load_kohya_state_dict(self, sd: Mapping[str, Tensor], *, strict: bool = True) -> None:
        """Load a LyCORIS file of the same algorithm and targets (`network_weights`)."""
        own = self.state_dict()
        missing = sorted(k for k in own if k not in sd)
        unexpected = sorted(k for k in sd if k not in own)
        if strict and (missing or unexpected):
            raise ModelError(
                f"the {self.algo} weights do not fit this network: "
                + "; ".join(
                    part
                    for part in (key_summary("missing", missing), key_summary("unexpected", unexpected))
                    if part
                ),
                hint="use network_weights trained with the same algo, preset, network_dim/conv_dim and trained parts",
            )
        for key, value in sd.items():
            if key in own and own[key].shape != value.shape:
                raise ModelError(
                    f"weight {key} has shape {list(value.shape)}, this network expects {list(own[key].shape)}",
                    hint="set network_dim, conv_dim and factor to those the network_weights file was trained with",
                )
        self.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
