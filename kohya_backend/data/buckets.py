"""Aspect-ratio buckets (kohya's algorithm) and the scale-to-cover + crop that fits an image into its bucket."""

from __future__ import annotations

import math
import random
from typing import Protocol

from PIL import Image

from kohya_backend.errors import ConfigError, ConfigIssue, DatasetError

# Latents are 1/8 of the image size, so every bucket side must be a multiple of 8.
_LATENT_FACTOR = 8


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int, max_size: int, divisible: int
) -> list[tuple[int, int]]:
    """Kohya's bucket list for the area of `max_reso`: a square, then every (w, h) and (h, w) within min..max."""
    area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(area)) // divisible * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, area // width // divisible * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def _round_to_steps(value: float, steps: int) -> int:
    """Round to the nearest integer, then down to a multiple of `steps` (kohya's round_to_steps)."""
    rounded = int(value + 0.5)
    return rounded - rounded % steps


def _check_settings(resolution: tuple[int, int], min_size: int, max_size: int, reso_steps: int) -> None:
    """Reject bucket settings kohya would stop on, naming the config key to change."""
    issues: list[ConfigIssue] = []
    if reso_steps < _LATENT_FACTOR or reso_steps % _LATENT_FACTOR:
        issues.append(
            ConfigIssue(
                f"must be a positive multiple of 8, got {reso_steps}",
                key="bucket_reso_steps",
                hint="use 64 (SD) or 32 (SDXL)",
            )
        )
    if min_size > max_size:
        issues.append(
            ConfigIssue(
                f"{min_size} is larger than max_bucket_reso {max_size}",
                key="min_bucket_reso",
                hint="use e.g. 256",
            )
        )
    if max_size < max(resolution):
        issues.append(
            ConfigIssue(
                f"{max_size} is smaller than the resolution {resolution[0]}x{resolution[1]}",
                key="max_bucket_reso",
                hint=f"use at least {max(resolution)}, e.g. 1024 (SD) or 2048 (SDXL)",
            )
        )
    if issues:
        raise ConfigError(issues)


class BucketAssigner:
    """Picks the bucket (w, h) of an image as kohya does, with or without bucketing and upscaling."""

    def __init__(
        self,
        resolution: tuple[int, int],
        *,
        enable_bucket: bool,
        min_size: int,
        max_size: int,
        reso_steps: int,
        no_upscale: bool,
    ) -> None:
        if resolution[0] < _LATENT_FACTOR or resolution[1] < _LATENT_FACTOR:
            raise ConfigError(
                [
                    ConfigIssue(
                        f"{resolution[0]}x{resolution[1]} is too small",
                        key="resolution",
                        hint='use e.g. "512,512"',
                    )
                ]
            )
        self.resolution = resolution
        self.enable_bucket = enable_bucket
        # kohya ignores bucket_no_upscale without bucketing: every image is cropped to the one resolution
        self.no_upscale = no_upscale and enable_bucket
        self.reso_steps = reso_steps
        self.max_area = resolution[0] * resolution[1]
        if enable_bucket:
            _check_settings(resolution, min_size, max_size, reso_steps)
            self.resolutions = make_bucket_resolutions(resolution, min_size, max_size, reso_steps)
        else:
            self.resolutions = [resolution]
        self._aspects = [w / h for w, h in self.resolutions]
        self._known = set(self.resolutions)

    def assign(self, width: int, height: int) -> tuple[int, int]:
        """The bucket (w, h) of an image of this size; DatasetError if no_upscale leaves it no pixels."""
        if width < 1 or height < 1:
            raise DatasetError(f"an image of {width}x{height} pixels cannot be bucketed")
        if self.no_upscale:
            return self._own_size_bucket(width, height)
        if (width, height) in self._known:
            return (width, height)
        aspect = width / height
        errors = [abs(candidate - aspect) for candidate in self._aspects]
        return self.resolutions[errors.index(min(errors))]

    def _own_size_bucket(self, width: int, height: int) -> tuple[int, int]:
        """bucket_no_upscale: shrink only images over the area, then round each side down to the step."""
        aspect = width / height
        if width * height > self.max_area:
            width, height = self._downscaled_size(aspect)
        bucket = (width - width % self.reso_steps, height - height % self.reso_steps)
        if bucket[0] < self.reso_steps or bucket[1] < self.reso_steps:
            raise DatasetError(
                f"an image of {width}x{height} pixels is smaller than bucket_reso_steps {self.reso_steps} on one "
                "side, so bucket_no_upscale leaves it no pixels",
                f"use images at least {self.reso_steps} px on each side, or turn bucket_no_upscale off",
            )
        return bucket

    def _downscaled_size(self, aspect: float) -> tuple[int, int]:
        """Kohya's size for an over-area image: keep its aspect at the max area, snap the side that errs least."""
        steps = self.reso_steps
        resized_width = math.sqrt(self.max_area * aspect)
        resized_height = self.max_area / resized_width
        width_rounded = _round_to_steps(resized_width, steps)
        height_for_width = _round_to_steps(width_rounded / aspect, steps)
        height_rounded = _round_to_steps(resized_height, steps)
        width_for_height = _round_to_steps(height_rounded * aspect, steps)
        error_w = abs(width_rounded / height_for_width - aspect) if height_for_width else math.inf
        error_h = abs(width_for_height / height_rounded - aspect) if height_rounded else math.inf
        if error_w < error_h:
            return width_rounded, int(width_rounded / aspect + 0.5)
        return int(height_rounded * aspect + 0.5), height_rounded


def resize_and_crop(
    image: Image.Image,
    bucket: tuple[int, int],
    *,
    random_crop: bool = False,
    rng: random.Random | None = None,
    flip: bool = False,
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Scale to cover the bucket, mirror if `flip`, and crop: (image, crop (top, left), original (h, w)).

    The crop offset is measured in the scaled (and mirrored) image, as SDXL's crop time ids expect.
    """
    bucket_w, bucket_h = bucket
    width, height = image.size
    scale = max(bucket_w / width, bucket_h / height)
    resized = (max(bucket_w, int(width * scale + 0.5)), max(bucket_h, int(height * scale + 0.5)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    trim_w, trim_h = resized[0] - bucket_w, resized[1] - bucket_h
    if random_crop:
        chooser = rng if rng is not None else random.Random()
        left, top = chooser.randint(0, trim_w), chooser.randint(0, trim_h)
    else:
        left, top = trim_w // 2, trim_h // 2
    cropped = image.crop((left, top, left + bucket_w, top + bucket_h))
    return cropped, (top, left), (height, width)


class BucketSettings(Protocol):
    """A training config's or a dataset_config dataset's bucket settings (the same names in both, as in kohya)."""

    @property
    def resolution(self) -> tuple[int, int]: ...
    @property
    def enable_bucket(self) -> bool: ...
    @property
    def min_bucket_reso(self) -> int: ...
    @property
    def max_bucket_reso(self) -> int: ...
    @property
    def bucket_reso_steps(self) -> int: ...
    @property
    def bucket_no_upscale(self) -> bool: ...


def assigner_for(settings: BucketSettings) -> BucketAssigner:
    """The aspect-ratio buckets `settings` train with."""
    return BucketAssigner(
        settings.resolution,
        enable_bucket=settings.enable_bucket,
        min_size=settings.min_bucket_reso,
        max_size=settings.max_bucket_reso,
        reso_steps=settings.bucket_reso_steps,
        no_upscale=settings.bucket_no_upscale,
    )
