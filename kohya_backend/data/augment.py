"""kohya's weak color augmentation (`color_aug`): a third of the images get either a small hue shift or a small gamma
change, drawn per image and per step."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

HUE_SHIFT_LIMIT = 8.0  # degrees of OpenCV's 0..180 hue circle, as kohya's
GAMMA_RANGE = (0.95, 1.05)
APPLY_PROBABILITY = 0.33


def shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue of an RGB image by `shift` units of a 0..180 hue circle (OpenCV's scale, as kohya uses)."""
    hsv = np.asarray(image.convert("HSV"), dtype=np.float32)
    hue = (hsv[..., 0] + shift * 256.0 / 180.0) % 256.0
    hsv[..., 0] = hue
    return Image.fromarray(hsv.round().clip(0, 255).astype(np.uint8), mode="HSV").convert("RGB")


def apply_gamma(image: Image.Image, gamma: float) -> Image.Image:
    """kohya's gamma step: every 0..255 channel value raised to `gamma` and clipped (values are not normalised first,
    so a gamma above 1 brightens and saturates, below 1 darkens)."""
    values = np.asarray(image, dtype=np.float64) ** gamma
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="RGB")


def color_aug(image: Image.Image, rng: random.Random) -> Image.Image:
    """kohya's color_aug on one RGB image: with probability 0.33, half the time a hue shift within +-8, else a
    gamma within 0.95..1.05; otherwise the image unchanged."""
    if rng.random() > APPLY_PROBABILITY:
        return image
    if rng.random() > 0.5:
        return shift_hue(image, rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
    return apply_gamma(image, rng.uniform(*GAMMA_RANGE))
