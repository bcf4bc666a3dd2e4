"""Kohya's bucket algorithm against hand-computed values, no_upscale, and the crop geometry."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from kohya_backend.data.buckets import BucketAssigner, make_bucket_resolutions, resize_and_crop
from kohya_backend.errors import ConfigError, DatasetError

# 512x512 area = 262144; square side 512; width w -> height min(1024, 262144 // w // 64 * 64), computed by hand
KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def _assigner(**overrides: object) -> BucketAssigner:
    settings: dict[str, object] = {
        "enable_bucket": True, "min_size": 256, "max_size": 1024, "reso_steps": 64, "no_upscale": False,
    }  # fmt: skip
    settings.update(overrides)
    resolution = settings.pop("resolution", (512, 512))
    return BucketAssigner(resolution, **settings)  # type: ignore[arg-type]


def test_bucket_list_matches_hand_computed_kohya_values() -> None:
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == KOHYA_512


def test_non_square_resolution_uses_its_area() -> None:
    resos = make_bucket_resolutions((512, 768), 256, 1024, 64)
    # area 393216: square side floor(627.07 / 64) * 64 = 576; width 512 -> 393216 // 512 = 768
    assert (576, 576) in resos and (512, 768) in resos and (768, 512) in resos
    assert (640, 576) in resos  # 393216 // 640 = 614 -> 576
    assert all(w * h <= 393216 and w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert all((h, w) in resos for w, h in resos)


def test_sdxl_steps_of_32() -> None:
    resos = make_bucket_resolutions((1024, 1024), 512, 2048, 32)
    assert (1024, 1024) in resos and (896, 1152) in resos and (1152, 896) in resos
    assert (512, 2048) in resos  # 1048576 // 512 = 2048
    assert all(512 <= side <= 2048 and side % 32 == 0 for reso in resos for side in reso)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((512, 512), (512, 512)),
        ((64, 64), (512, 512)),
        ((1000, 1500), (384, 640)),  # aspect 0.667: 384/640 = 0.6 is nearer than 448/576 = 0.778
        ((448, 576), (448, 576)),  # an exact bucket size keeps its bucket
        ((2000, 500), (1024, 256)),  # aspect 4 = 1024/256
        ((5000, 100), (1024, 256)),  # beyond the widest bucket: the widest
        ((720, 1280), (384, 640)),  # 0.5625: 0.6 (384x640) vs 0.4545 (320x704)
    ],
)
def test_nearest_aspect_assignment(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    assert _assigner().assign(*size) == bucket


def test_without_bucketing_every_image_gets_the_resolution() -> None:
    assigner = _assigner(enable_bucket=False, no_upscale=True, resolution=(512, 768))
    assert assigner.resolutions == [(512, 768)]
    assert {assigner.assign(*s) for s in [(10, 10), (3000, 200), (512, 768)]} == {(512, 768)}


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((300, 200), (256, 192)),  # under the area: own size rounded down to 64
        ((512, 512), (512, 512)),
        ((2048, 2048), (512, 512)),  # over the area: shrunk to 512x512
        # 1000x700 (aspect 1.4286): sqrt(262144 * 1.4286) = 611.9 -> 576 with height round(403.2) -> 384
        # (aspect 1.5, error 0.071) beats height 428.4 -> 384 with width 549 -> 512 (1.333, error 0.095)
        ((1000, 700), (576, 384)),
        ((1000, 600), (640, 384)),
    ],
)
def test_no_upscale_buckets(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    assert _assigner(no_upscale=True).assign(*size) == bucket


def test_no_upscale_image_smaller_than_a_step_is_rejected() -> None:
    with pytest.raises(DatasetError, match="smaller than bucket_reso_steps 64"):
        _assigner(no_upscale=True).assign(40, 300)


def test_bad_bucket_settings_name_their_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        _assigner(max_size=256, min_size=512, reso_steps=50)
    keys = {issue.key for issue in caught.value.issues}
    assert keys == {"bucket_reso_steps", "min_bucket_reso", "max_bucket_reso"}


def _halves(size: tuple[int, int]) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


def test_center_crop_geometry() -> None:
    # 100x50 into 64x64: scale 1.28 -> 128x64, 64 px trimmed, 32 from the left
    out, crop, original = resize_and_crop(_halves((100, 50)), (64, 64))
    assert out.size == (64, 64) and crop == (0, 32) and original == (50, 100)
    pixels = np.asarray(out)
    assert pixels[:, :30, 0].min() > 200 and pixels[:, 34:, 2].min() > 200


def test_portrait_crop_and_exact_fit() -> None:
    out, crop, original = resize_and_crop(Image.new("RGB", (50, 120)), (64, 128))
    # scale max(1.28, 1.0667) = 1.28 -> 64x154, 26 rows trimmed, 13 from the top
    assert out.size == (64, 128) and crop == (13, 0) and original == (120, 50)
    image = _halves((64, 128))
    out, crop, _ = resize_and_crop(image, (64, 128))
    assert crop == (0, 0) and np.array_equal(np.asarray(out), np.asarray(image))


def test_random_crop_is_seeded_and_matches_its_offset() -> None:
    gradient = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (64, 1)), mode="L").convert("RGB")
    offsets = set()
    for seed in range(8):
        out, (top, left), _ = resize_and_crop(gradient, (64, 64), random_crop=True, rng=random.Random(seed))
        again = resize_and_crop(gradient, (64, 64), random_crop=True, rng=random.Random(seed))
        assert again[1] == (top, left) and top == 0 and 0 <= left <= 136
        assert np.asarray(out)[0, 0, 0] == left  # the gradient value is the column index
        offsets.add(left)
    assert len(offsets) > 4


def test_flip_mirrors_before_cropping() -> None:
    out, crop, _ = resize_and_crop(_halves((64, 64)), (64, 64), flip=True)
    pixels = np.asarray(out)
    assert crop == (0, 0) and pixels[:, :30, 2].min() > 200 and pixels[:, 34:, 0].min() > 200
