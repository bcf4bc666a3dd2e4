"""scale_weight_norms: kohya's max-norm regularisation of LoRA updates, checked against the modules' real updates."""

from __future__ import annotations

import pytest
import torch

from kohya_backend.lora.max_norm import lora_update, scale_lora_norms
from kohya_backend.lora.network import LoRAModule, LoRANetwork
from kohya_backend.models.arch import sd15_architecture


def _randomize(module: LoRAModule, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * scale)


@pytest.mark.parametrize(
    "layer",
    [
        torch.nn.Linear(6, 5, bias=False),
        torch.nn.Conv2d(3, 4, 1, bias=False),
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
    ],
    ids=["linear", "conv1x1", "conv3x3"],
)
def test_lora_update_is_the_weight_change_the_module_applies(layer: torch.nn.Module) -> None:
    module = LoRAModule("x", layer, dim=2, alpha=1.0)
    _randomize(module, 0, 0.5)
    updown = lora_update(module.lora_down.weight, module.lora_up.weight, float(module.alpha)).detach()
    assert updown.shape == layer.weight.shape
    x = torch.randn(2, 6) if isinstance(layer, torch.nn.Linear) else torch.randn(1, 3, 5, 5)
    if isinstance(layer, torch.nn.Linear):
        expected = torch.nn.functional.linear(x, updown)
    else:
        expected = torch.nn.functional.conv2d(x, updown, padding=layer.padding)
    with torch.no_grad():
        torch.testing.assert_close(module.lora_delta(x), expected, rtol=1e-5, atol=1e-6)


def test_updates_above_the_limit_are_scaled_to_it_and_the_rest_kept() -> None:
    arch = sd15_architecture("tiny")
    torch.manual_seed(0)
    unet, tes = arch.build_unet(), arch.build_text_encoders()
    net = LoRANetwork(family="sd_1_5", unet=unet, text_encoders=tes, network_dim=4, network_alpha=2.0)
    for i, module in enumerate(net.all_loras):
        _randomize(module, i, 3.0 if i % 2 else 1e-4)  # every other module far above the limit

    @torch.no_grad()
    def norms() -> list[float]:
        return [
            float(lora_update(m.lora_down.weight, m.lora_up.weight, float(m.alpha)).norm())
            for m in net.all_loras
        ]

    before = norms()
    limit = 1.0
    untouched = [m.lora_down.weight.clone() for m in net.all_loras]
    stats = net.apply_max_norm_regularization(limit)
    after = norms()
    over = [i for i, n in enumerate(before) if n > limit]
    assert over and stats.keys_scaled == len(over)
    for i, (old, new) in enumerate(zip(before, after)):
        if i in over:
            assert new == pytest.approx(limit, rel=1e-4)
            # both factors shrink by the same sqrt(ratio)
            ratio = (limit / old) ** 0.5
            torch.testing.assert_close(net.all_loras[i].lora_down.weight, untouched[i] * ratio)
        else:
            assert new == pytest.approx(old, rel=1e-6)
            assert torch.equal(net.all_loras[i].lora_down.weight, untouched[i])
    assert stats.max_norm == pytest.approx(max(after), rel=1e-4)
    assert stats.mean_norm == pytest.approx(sum(after) / len(after), rel=1e-4)
    assert stats.as_log()["max_norm/keys_scaled"] == len(over)


def test_no_modules_and_norms_below_half_the_limit() -> None:
    assert scale_lora_norms([], 1.0).keys_scaled == 0
    down, up = torch.full((1, 2), 0.1), torch.full((2, 1), 0.1)
    stats = scale_lora_norms([(down, up, torch.tensor(1.0))], 10.0)
    # the reported norm is the real one even though kohya clamps its comparison value at limit / 2
    assert stats.keys_scaled == 0 and stats.max_norm == pytest.approx(0.02, rel=1e-5)
