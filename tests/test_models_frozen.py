"""Frozen weights kept in an fp16 file's precision compute exactly what fully upcast weights compute."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from kohya_backend.assets.checkpoints import write_checkpoint
from kohya_backend.assets.tokenizer import write_tiny_tokenizer
from kohya_backend.errors import ModelError
from kohya_backend.lora.network import LoRANetwork
from kohya_backend.models import frozen
from kohya_backend.models.frozen import (
    _BUFFERS,
    _conv_path,
    _upcast,
    release_upcast_buffers,
    route_frozen_layers,
)
from kohya_backend.models.load import LoadedModel, load_checkpoint


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _load(path: Path, family: str, tok_dir: Path, keep: bool) -> LoadedModel:
    return load_checkpoint(path, family, dtype=torch.float32, tokenizer_dir=tok_dir, keep_file_precision=keep)


def _lora_step(model: LoadedModel, family: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One LoRA training step's loss and the LoRA gradients (UNet and text encoders trained)."""
    torch.manual_seed(0)
    net = LoRANetwork(
        family=family, unet=model.unet, text_encoders=model.text_encoders, network_dim=4, network_alpha=2
    )
    net.apply_to()
    for lora in [*net.unet_loras, *net.text_encoder_loras]:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.05)  # a non-zero up so every path carries gradient
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 100, (2, 77), generator=gen) for _ in model.text_encoders]
    states = [te(i, output_hidden_states=True) for te, i in zip(model.text_encoders, ids)]
    hidden = torch.cat([s.hidden_states[-2] for s in states], dim=-1)
    kwargs = {}
    if family == "sd_xl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": states[-1].text_embeds,
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    pred = model.unet(latents, torch.tensor([10, 700]), hidden, **kwargs).sample
    loss = torch.nn.functional.mse_loss(pred, torch.randn(pred.shape, generator=gen))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    net.remove()
    return loss.detach(), grads


@pytest.mark.parametrize("family", ["sd_1_5", "sd_xl"])
def test_kept_fp16_weights_train_exactly_like_upcast_ones(tmp_path: Path, tok_dir: Path, family: str) -> None:
    path = write_checkpoint(tmp_path / "half.safetensors", family, dtype=torch.float16, seed=4)
    kept, upcast = _load(path, family, tok_dir, True), _load(path, family, tok_dir, False)

    kept_dtypes = {p.dtype for m in (kept.unet, kept.vae, *kept.text_encoders) for p in m.parameters()}
    assert kept_dtypes == {torch.float16, torch.float32}
    assert {p.dtype for p in upcast.unet.parameters()} == {torch.float32}
    # pipelines cast their inputs to a model's dtype, which diffusers and transformers read off the first parameter
    assert kept.unet.dtype == kept.vae.dtype == torch.float32
    assert all(te.dtype == torch.float32 for te in kept.text_encoders)
    to_q = next(m for name, m in kept.unet.named_modules() if name.endswith("attn1.to_q"))
    assert to_q.weight.dtype == torch.float16

    # as the trainer does on the CPU: every frozen layer through the same kernels
    for model in (kept, upcast):
        for module in (model.unet, model.vae, *model.text_encoders):
            route_frozen_layers(module)
    loss_kept, grads_kept = _lora_step(kept, family)
    loss_upcast, grads_upcast = _lora_step(upcast, family)
    assert torch.equal(loss_kept, loss_upcast)
    assert grads_kept.keys() == grads_upcast.keys() and len(grads_kept) > 20
    for name, grad in grads_kept.items():
        torch.testing.assert_close(grad, grads_upcast[name], rtol=1e-5, atol=1e-7, msg=name)

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(kept.vae.encode(image).latent_dist.mean, upcast.vae.encode(image).latent_dist.mean)


def test_an_fp32_file_or_an_fp16_run_keeps_nothing_back(tmp_path: Path, tok_dir: Path) -> None:
    full = write_checkpoint(tmp_path / "full.safetensors", "sd_1_5", seed=4)
    assert {p.dtype for p in _load(full, "sd_1_5", tok_dir, True).unet.parameters()} == {torch.float32}
    half = write_checkpoint(tmp_path / "half.safetensors", "sd_1_5", dtype=torch.float16, seed=4)
    model = load_checkpoint(
        half, "sd_1_5", dtype=torch.bfloat16, tokenizer_dir=tok_dir, keep_file_precision=True
    )
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}


def test_a_kept_layer_made_trainable_is_refused(tmp_path: Path, tok_dir: Path) -> None:
    path = write_checkpoint(tmp_path / "half.safetensors", "sd_1_5", dtype=torch.float16, seed=4)
    layer = _load(path, "sd_1_5", tok_dir, True).unet.down_blocks[0].attentions[0].proj_in
    layer.weight.requires_grad_(True)
    with pytest.raises(ModelError, match="trainable"):
        layer(torch.randn(1, layer.in_channels, 4, 4))


def test_backward_keeps_no_fp32_copy_of_a_kept_weight(tmp_path: Path, tok_dir: Path) -> None:
    path = write_checkpoint(tmp_path / "half.safetensors", "sd_1_5", dtype=torch.float16, seed=4)
    unet = _load(path, "sd_1_5", tok_dir, True).unet
    kept = {tuple(p.shape) for p in unet.parameters() if p.dtype == torch.float16}
    params = {p.data_ptr() for p in unet.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pred = unet(latents, torch.tensor([10, 700]), torch.randn(2, 77, 32)).sample
    pred.square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    copies = [
        t
        for t in saved
        if t.dtype == torch.float32
        and tuple(t.shape) in kept
        and t.shape[0] != 2
        and t.data_ptr() not in params
    ]
    assert not copies  # an fp32 weight saved for backward would double the memory the kept weights save
    assert any(t.dtype == torch.float16 for t in saved)


@pytest.mark.parametrize("family", ["sd_1_5", "sd_xl"])
def test_routed_fp32_layers_train_like_plain_ones_and_save_less(
    tmp_path: Path, tok_dir: Path, family: str
) -> None:
    path = write_checkpoint(tmp_path / "full.safetensors", family, seed=4)
    routed, plain = _load(path, family, tok_dir, False), _load(path, family, tok_dir, False)
    count = sum(route_frozen_layers(m) for m in (routed.unet, *routed.text_encoders))
    assert count > 50
    assert sum(route_frozen_layers(m) for m in (routed.unet, *routed.text_encoders)) == 0  # once is enough

    def saved_bytes(model: LoadedModel) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        seen: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t, torch.nn.Parameter):
                seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, grads = _lora_step(model, family)
        return loss, grads, sum(seen.values())

    loss_routed, grads_routed, bytes_routed = saved_bytes(routed)
    loss_plain, grads_plain, bytes_plain = saved_bytes(plain)
    # routed layers compute input gradients with their own calls (conv2d_input, matmul): sums may differ in the last bits
    torch.testing.assert_close(loss_routed, loss_plain, rtol=1e-5, atol=1e-7)
    assert grads_routed.keys() == grads_plain.keys()
    for name, grad in grads_routed.items():
        torch.testing.assert_close(grad, grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert bytes_routed < 0.9 * bytes_plain  # the inputs kept only for weight gradients are gone


def test_a_wrapped_layer_is_not_rerouted(tmp_path: Path, tok_dir: Path) -> None:
    path = write_checkpoint(tmp_path / "full.safetensors", "sd_1_5", seed=4)
    model = _load(path, "sd_1_5", tok_dir, False)
    net = LoRANetwork(
        family="sd_1_5",
        unet=model.unet,
        text_encoders=[],
        network_dim=4,
        network_alpha=4,
        train_text_encoder=False,
    )
    net.apply_to()
    wrapped = net.unet_loras[0].org_module
    forward = wrapped.forward
    assert route_frozen_layers(model.unet) > 0
    assert wrapped.forward == forward


def test_only_plain_zero_padded_layers_are_routed() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 4, 3, padding=1),
        torch.nn.Conv2d(4, 4, 3, padding="same"),
        torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        torch.nn.Linear(4, 4),
    ).requires_grad_(False)
    assert route_frozen_layers(model) == 2
    assert ["forward" in layer.__dict__ for layer in model] == [True, False, False, True]
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    out = model[2](model[1](model[0](x))).mean()
    out.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16])
def test_bf16_frozen_weights_train_like_bf16_autocast_over_fp32_weights(
    tmp_path: Path, tok_dir: Path, file_dtype: torch.dtype
) -> None:
    """A CPU bf16 run stores the frozen Linear/Conv2d weights in bf16 (half the memory, no cast per call) and gets
    the numbers autocast gives when it rounds fp32 weights to bf16 on every call."""
    path = write_checkpoint(tmp_path / "model.safetensors", "sd_1_5", dtype=file_dtype, seed=4)
    stored = load_checkpoint(
        path,
        "sd_1_5",
        dtype=torch.float32,
        tokenizer_dir=tok_dir,
        keep_file_precision=True,
        compute_dtype=torch.bfloat16,
    )
    today = _load(path, "sd_1_5", tok_dir, True)
    for model in (stored, today):
        for module in (model.unet, model.vae, *model.text_encoders):
            route_frozen_layers(module)  # as the trainer does on the CPU

    unet_dtypes = {name: p.dtype for name, p in stored.unet.named_parameters()}
    assert unet_dtypes["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert unet_dtypes["down_blocks.0.resnets.0.conv1.weight"] == torch.bfloat16
    assert unet_dtypes["down_blocks.0.resnets.0.conv1.bias"] == torch.float32
    assert unet_dtypes["down_blocks.0.resnets.0.norm1.weight"] == torch.float32
    assert unet_dtypes["conv_in.weight"] == torch.float32  # the first parameter: the model's reported dtype
    assert stored.unet.dtype == torch.float32
    te_dtypes = {
        p.dtype for name, p in stored.text_encoders[0].named_parameters() if name.endswith("proj.weight")
    }
    assert te_dtypes == {torch.bfloat16}
    vae_weights = {p.dtype for name, p in stored.vae.named_parameters() if name.endswith("conv1.weight")}
    assert vae_weights == {file_dtype}  # the VAE encodes outside autocast: no bf16 rounding there

    release_upcast_buffers()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_stored, grads_stored = _lora_step(stored, "sd_1_5")
        assert (torch.device("cpu"), torch.float32) not in _BUFFERS.by_kind  # bf16 weights are used as stored
        loss_today, grads_today = _lora_step(today, "sd_1_5")
    assert torch.equal(loss_stored, loss_today)
    assert grads_stored.keys() == grads_today.keys() and len(grads_stored) > 20
    for name, grad in grads_stored.items():
        assert grad.dtype == torch.float32, name
        assert torch.equal(grad, grads_today[name]), name


def test_a_bf16_stored_layer_outside_autocast_computes_in_its_input_dtype(
    tmp_path: Path, tok_dir: Path
) -> None:
    path = write_checkpoint(tmp_path / "model.safetensors", "sd_1_5", seed=4)
    model = load_checkpoint(path, "sd_1_5", tokenizer_dir=tok_dir, compute_dtype=torch.bfloat16)
    layer = next(m for name, m in model.unet.named_modules() if name.endswith("attn1.to_q"))
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    out = layer(x)
    reference = torch.nn.functional.linear(x, layer.weight.float(), None)
    # oneDNN's matmul (models/cpu_kernels.py) sums in another order than torch's MKL path with 2+ threads: equal
    # within fp32 rounding, where a bf16 computation would differ by ~1e-2
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_upcasts_share_one_reusable_buffer_per_thread() -> None:
    """A fresh fp32 copy per call is page-faulted in anew for weights over glibc's mmap threshold: one buffer, sized
    to the largest weight seen, takes every upcast instead."""
    release_upcast_buffers()
    big, small = torch.randn(64, 48).half(), torch.randn(8, 16).half()
    first = _upcast(big, torch.float32)
    assert torch.equal(first, big.float())
    second = _upcast(small, torch.float32)
    assert torch.equal(second, small.float()) and second.data_ptr() == first.data_ptr()
    assert _upcast(big.float(), torch.float32).data_ptr() != first.data_ptr()  # already fp32: no copy at all
    elsewhere: list[int] = []
    thread = threading.Thread(target=lambda: elsewhere.append(_upcast(small, torch.float32).data_ptr()))
    thread.start()
    thread.join()
    assert elsewhere[0] != first.data_ptr()  # each thread its own buffer
    release_upcast_buffers()


def _conv(cin: int, cout: int, kernel: int, groups: int = 1) -> torch.nn.Conv2d:
    return torch.nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, device="meta")


def test_only_fp32_convolutions_of_large_weights_on_small_maps_leave_onednns_convolution() -> None:
    small, large = torch.randn(1, 1280, 8, 8), torch.randn(1, 1280, 32, 32)
    big3 = _conv(1280, 1280, 3)  # 59 MB in fp32: oneDNN's per-call copy of it would be mmap-ed
    mid3 = _conv(640, 640, 3)  # 15 MB: oneDNN's convolution is the faster one
    big1 = _conv(4096, 4096, 1)
    grouped = _conv(1280, 2560, 3, groups=2)
    assert _conv_path(small, big3.weight, torch.float32, big3) == "unfold"
    assert _conv_path(large, big3.weight, torch.float32, big3) == "onednn"
    assert _conv_path(small, mid3.weight, torch.float32, mid3) == "onednn"
    assert _conv_path(small, big3.weight, torch.bfloat16, big3) == "onednn"  # no fast bf16 kernel elsewhere
    assert _conv_path(small, big1.weight, torch.float32, big1) == "onednn"
    assert _conv_path(small, grouped.weight, torch.float32, grouped) == "onednn"
    assert _conv_path(small.to("meta"), big3.weight, torch.float32, big3) == "onednn"


@pytest.mark.parametrize("path", ["unfold", "im2col"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("stride", [1, 2])
def test_small_map_paths_compute_what_a_plain_convolution_does(
    monkeypatch: pytest.MonkeyPatch, path: str, dtype: torch.dtype, stride: int
) -> None:
    monkeypatch.setattr(frozen, "MMAP_THRESHOLD", 0)  # every small-map convolution leaves oneDNN's
    if path == "im2col":  # what runs where oneDNN's matmul is missing
        monkeypatch.setattr(frozen.cpu_kernels, "onednn_matmul", lambda x: False)
    gen = torch.Generator().manual_seed(0)
    plain = torch.nn.Conv2d(32, 48, 3, padding=1, stride=stride).requires_grad_(False)
    routed = torch.nn.Conv2d(32, 48, 3, padding=1, stride=stride).requires_grad_(False)
    routed.weight.data = plain.weight.data.to(dtype)
    routed.bias.data = plain.bias.data.clone()
    assert route_frozen_layers(routed) == 1
    x = torch.randn(2, 32, 9, 9, generator=gen)
    assert frozen._conv_path(x, routed.weight, torch.float32, routed) == path
    x_plain, x_routed = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    reference = torch.nn.functional.conv2d(x_plain, plain.weight.to(dtype).float(), plain.bias, stride, 1)
    out = routed(x_routed)
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grad = torch.randn(reference.shape, generator=gen)
    reference.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(x_routed.grad, x_plain.grad, rtol=1e-5, atol=1e-5)
