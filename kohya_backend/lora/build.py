"""Build the network `network_module` names: kohya's networks.lora (LoRA/LoCon) or LyCORIS (lycoris.kohya)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from kohya_backend.config.lycoris_args import LYCORIS_MODULE
from kohya_backend.errors import ModelError
from kohya_backend.lora.lycoris import LycorisNetwork
from kohya_backend.lora.network import LoRANetwork

LORA_MODULE = "networks.lora"
NETWORK_MODULES = (LORA_MODULE, LYCORIS_MODULE)

TrainedNetwork = LoRANetwork | LycorisNetwork


def create_network(
    network_module: str,
    *,
    family: str,
    unet: nn.Module | None,
    text_encoders: Sequence[nn.Module],
    network_dim: int,
    network_alpha: float,
    network_args: Mapping[str, str],
    dropout: float | None = None,
    train_unet: bool = True,
    train_text_encoder: bool = True,
    unet_layers_per_block: int = 2,
) -> TrainedNetwork:
    """The network to train, with the same interface whichever module builds it."""
    if network_module == LYCORIS_MODULE:
        return LycorisNetwork(
            family=family,
            unet=unet,
            text_encoders=text_encoders,
            network_dim=network_dim,
            network_alpha=network_alpha,
            network_args=network_args,
            train_unet=train_unet,
            train_text_encoder=train_text_encoder,
            unet_layers_per_block=unet_layers_per_block,
        )
    if network_module != LORA_MODULE:
        raise ModelError(
            f"network_module {network_module!r} is not implemented",
            hint=f"use one of {', '.join(NETWORK_MODULES)}",
        )
    return LoRANetwork(
        family=family,
        unet=unet,
        text_encoders=text_encoders,
        network_dim=network_dim,
        network_alpha=network_alpha,
        conv_dim=int(network_args["conv_dim"]) if "conv_dim" in network_args else None,
        conv_alpha=float(network_args["conv_alpha"]) if "conv_alpha" in network_args else None,
        dropout=dropout,
        rank_dropout=float(network_args["rank_dropout"]) if "rank_dropout" in network_args else None,
        module_dropout=float(network_args["module_dropout"]) if "module_dropout" in network_args else None,
        train_unet=train_unet,
        train_text_encoder=train_text_encoder,
        unet_layers_per_block=unet_layers_per_block,
    )
