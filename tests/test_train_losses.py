"""kohya's noise variants and loss options, each checked against a hand computation of sd-scripts' formula
(library/custom_train_functions.py, library/train_util.py)."""

from __future__ import annotations

import math

import pytest
import torch

from kohya_backend.errors import TrainingError
from kohya_backend.train.losses import (
    LossSettings,
    debiased_weights,
    elementwise_loss,
    huber_threshold,
    post_process_loss,
    snr_scale,
)
from kohya_backend.train.noise import (
    diffusion_loss,
    input_perturbation,
    make_noise_scheduler,
    pyramid_noise,
    sample_noise,
    snr,
    zero_terminal_snr_betas,
)


def _alpha_bar(t: int) -> float:
    start, end = math.sqrt(0.00085), math.sqrt(0.012)
    product = 1.0
    for i in range(t + 1):
        product *= 1.0 - (start + (end - start) * i / 999) ** 2
    return product


# ------------------------------------------------------------------------------------------------ noise
def test_zero_terminal_snr_shifts_and_rescales_sqrt_alpha_bar() -> None:
    plain = make_noise_scheduler()
    fixed = make_noise_scheduler(zero_terminal_snr=True)
    old = plain.alphas_cumprod.double().sqrt()
    new = fixed.alphas_cumprod.double().sqrt()
    assert new[-1].item() == pytest.approx(0.0, abs=1e-7)
    assert new[0].item() == pytest.approx(old[0].item(), rel=1e-5)
    t = 500
    by_hand = (old[t] - old[-1]) * old[0] / (old[0] - old[-1])
    assert new[t].item() == pytest.approx(by_hand.item(), rel=1e-4)
    # the betas the scheduler holds reproduce its alphas_cumprod
    torch.testing.assert_close(torch.cumprod(1 - fixed.betas, 0), fixed.alphas_cumprod)
    torch.testing.assert_close(zero_terminal_snr_betas(plain.betas), fixed.betas)
    # the last step is pure noise, and the SNR used for loss weights is the unfixed one (kohya's all_snr)
    latents, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 3.0)
    torch.testing.assert_close(fixed.add_noise(latents, noise, torch.tensor([999])), noise)
    assert snr(fixed, torch.tensor([999])).item() == pytest.approx(
        _alpha_bar(999) / (1 - _alpha_bar(999)), rel=1e-4
    )


def test_pyramid_noise_follows_kohyas_levels() -> None:
    base = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pyramid_noise(base, generator=torch.Generator().manual_seed(1), iterations=3, discount=0.5)
    gen = torch.Generator().manual_seed(1)
    expected = base.clone()
    for i in range(3):
        r = torch.rand(1, generator=gen).item() * 2 + 2
        h = w = max(1, int(16 / r**i))
        level = torch.randn(2, 3, h, w, generator=gen)
        expected += torch.nn.functional.interpolate(level, size=(16, 16), mode="bilinear") * 0.5**i
    expected = expected / expected.std()
    torch.testing.assert_close(out, expected)
    assert out.std().item() == pytest.approx(1.0, rel=1e-5)
    assert not torch.equal(base, out)  # the input is not changed in place (kohya adds in place)
    assert torch.equal(base, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))


def test_pyramid_noise_stops_at_one_pixel() -> None:
    gen = torch.Generator().manual_seed(2)
    pyramid_noise(torch.zeros(1, 1, 4, 4), generator=gen, iterations=50, discount=0.3)
    # replay the draws up to the first 1-pixel level: the function must have drawn exactly these, not 50 levels
    replay = torch.Generator().manual_seed(2)
    for i in range(50):
        size = max(1, int(4 / (torch.rand(1, generator=replay).item() * 2 + 2) ** i))
        torch.randn(1, 1, size, size, generator=replay)
        if size == 1:
            break
    assert i < 4
    assert torch.equal(torch.rand(1, generator=gen), torch.rand(1, generator=replay))


def test_offset_random_strength_and_adaptive_scale() -> None:
    latents = torch.zeros(2, 4, 8, 8)
    latents[:, 1] = -2.0  # channel 1 has |mean| 2
    gen = torch.Generator().manual_seed(3)
    noise = sample_noise(
        latents,
        generator=gen,
        noise_offset=0.1,
        noise_offset_random_strength=True,
        adaptive_noise_scale=0.05,
    )
    replay = torch.Generator().manual_seed(3)
    base = torch.randn(latents.shape, generator=replay)
    strength = torch.rand(1, generator=replay).item() * 0.1
    per_channel = torch.full((2, 4, 1, 1), strength)
    per_channel[:, 1] += 0.05 * 2.0
    expected = base + per_channel * torch.randn(2, 4, 1, 1, generator=replay)
    torch.testing.assert_close(noise, expected)
    # a negative adaptive scale that would push the offset below 0 is clamped at 0 (channel 1 gets no offset)
    clamped = sample_noise(
        latents, generator=torch.Generator().manual_seed(3), noise_offset=0.1, adaptive_noise_scale=-1.0
    )
    replay = torch.Generator().manual_seed(3)
    base = torch.randn(latents.shape, generator=replay)
    offsets = torch.randn(2, 4, 1, 1, generator=replay)
    torch.testing.assert_close(clamped[:, 1], base[:, 1])
    torch.testing.assert_close(clamped[:, 0], base[:, 0] + 0.1 * offsets[:, 0])
    # the adaptive scale needs an offset to add to, as in kohya
    same = sample_noise(
        latents, generator=torch.Generator().manual_seed(3), noise_offset=None, adaptive_noise_scale=1
    )
    torch.testing.assert_close(same, torch.randn(latents.shape, generator=torch.Generator().manual_seed(3)))


def test_multires_comes_after_the_offset() -> None:
    latents = torch.zeros(1, 4, 8, 8)
    noise = sample_noise(
        latents, generator=torch.Generator().manual_seed(4), noise_offset=0.2, multires_iterations=2
    )
    replay = torch.Generator().manual_seed(4)
    offset = torch.randn(latents.shape, generator=replay) + 0.2 * torch.randn(1, 4, 1, 1, generator=replay)
    torch.testing.assert_close(noise, pyramid_noise(offset, generator=replay, iterations=2, discount=0.3))


def test_input_perturbation_goes_into_the_noisy_latents_only() -> None:
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    assert input_perturbation(noise, generator=None, gamma=None) is noise
    gen = torch.Generator().manual_seed(6)
    fixed = input_perturbation(noise, generator=gen, gamma=0.1)
    torch.testing.assert_close(
        fixed, noise + 0.1 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(6))
    )
    gen = torch.Generator().manual_seed(6)
    random = input_perturbation(noise, generator=gen, gamma=0.1, random_strength=True)
    replay = torch.Generator().manual_seed(6)
    strength = torch.rand(1, generator=replay).item() * 0.1
    torch.testing.assert_close(random, noise + strength * torch.randn(noise.shape, generator=replay))


# ------------------------------------------------------------------------------------------------ losses
def test_huber_threshold_schedules() -> None:
    sched = make_noise_scheduler()
    t = torch.tensor([0, 500, 1000 - 1])
    exp = huber_threshold(
        t, schedule="exponential", huber_c=0.1, huber_scale=2.0, alphas_cumprod=sched.alphas_cumprod
    )
    for value, step in zip(exp.tolist(), t.tolist()):
        assert value == pytest.approx(math.exp(math.log(0.1) * step / 1000) * 2.0, rel=1e-5)
    by_snr = huber_threshold(
        t, schedule="snr", huber_c=0.1, huber_scale=2.0, alphas_cumprod=sched.alphas_cumprod
    )
    for value, step in zip(by_snr.tolist(), t.tolist()):
        sigma = math.sqrt((1 - _alpha_bar(step)) / _alpha_bar(step))
        assert value == pytest.approx(0.9 / (1 + sigma) ** 2 + 0.1, rel=1e-4)  # huber_scale is not applied
    const = huber_threshold(
        t, schedule="constant", huber_c=0.1, huber_scale=2.0, alphas_cumprod=sched.alphas_cumprod
    )
    assert const.tolist() == pytest.approx([0.2] * 3)
    with pytest.raises(TrainingError, match="huber_schedule"):
        huber_threshold(t, schedule="linear", huber_c=0.1, huber_scale=1, alphas_cumprod=sched.alphas_cumprod)


def test_elementwise_losses_by_hand() -> None:
    pred = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    target = torch.zeros(2, 2)
    c = torch.tensor([0.5, 2.0])
    assert elementwise_loss(pred, target, "l2").tolist() == [[1.0, 4.0], [0.25, 0.0]]
    assert elementwise_loss(pred, target, "l1").tolist() == [[1.0, 2.0], [0.5, 0.0]]
    huber = elementwise_loss(pred, target, "huber", c)
    smooth = elementwise_loss(pred, target, "smooth_l1", c)
    for row, ci in enumerate((0.5, 2.0)):
        for col in range(2):
            d = pred[row, col].item()
            assert huber[row, col].item() == pytest.approx(
                2 * ci * (math.sqrt(d * d + ci * ci) - ci), rel=1e-6
            )
            assert smooth[row, col].item() == pytest.approx(2 * (math.sqrt(d * d + ci * ci) - ci), rel=1e-6)
    with pytest.raises(TrainingError, match="Huber threshold"):
        elementwise_loss(pred, target, "huber")
    with pytest.raises(TrainingError, match="loss_type"):
        elementwise_loss(pred, target, "l3")


def test_snr_weights_by_hand() -> None:
    values = torch.tensor([0.25, 4.0, 1175.0])
    assert snr_scale(values).tolist() == pytest.approx([0.2, 0.8, 1000 / 1001])
    assert debiased_weights(values, v_prediction=False).tolist() == pytest.approx(
        [2.0, 0.5, 1 / math.sqrt(1000)]
    )
    assert debiased_weights(values, v_prediction=True).tolist() == pytest.approx([0.8, 0.2, 1 / 1001])
    loss = torch.tensor([1.0, 1.0, 1.0])
    settings = LossSettings(v_pred_like_loss=0.5)
    assert post_process_loss(loss, values, settings, v_prediction=False).tolist() == pytest.approx(
        [1 + 1 / 0.2 * 0.5, 1 + 1 / 0.8 * 0.5, 1 + 1001 / 1000 * 0.5]
    )
    both = LossSettings(scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True)
    assert post_process_loss(loss, values, both, v_prediction=True).tolist() == pytest.approx(
        [0.2 * 0.8, 0.8 * 0.2, 1000 / 1001 / 1001]
    )
    assert post_process_loss(loss, values, LossSettings(), v_prediction=False).tolist() == [1.0, 1.0, 1.0]


def test_diffusion_loss_applies_the_loss_type_and_weights_in_kohyas_order() -> None:
    sched = make_noise_scheduler()
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    t = torch.tensor([100, 700])
    settings = LossSettings(
        loss_type="huber", huber_schedule="constant", huber_c=0.5, debiased_estimation_loss=True
    )
    got = diffusion_loss(
        pred,
        target,
        timesteps=t,
        scheduler=sched,
        min_snr_gamma=5.0,
        prediction_type="epsilon",
        sample_weights=torch.tensor([1.0, 0.5]),
        settings=settings,
    )
    expected = 0.0
    for d, step, weight in ((1.0, 100, 1.0), (2.0, 700, 0.5)):
        s = _alpha_bar(step) / (1 - _alpha_bar(step))
        huber = 2 * 0.5 * (math.sqrt(d * d + 0.25) - 0.5)
        expected += huber * weight * (min(s, 5.0) / s) / math.sqrt(min(s, 1000))
    assert got.item() == pytest.approx(expected / 2, rel=1e-4)
