"""Optional preprocessing of dataset images: EXIF orientation applied, RGB, then a center crop to a square or a
resize to the bucket the trainer would pick at that resolution (its own BucketAssigner, the schema's default
bucket settings), so training crops nothing more."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from kohya_backend.config.schema import SCHEMA
from kohya_backend.data.buckets import BucketAssigner
from kohya_backend.data.images import load_image
from kohya_backend.errors import TrainManagementError
from kohya_backend.fileio import atomic_write

SIZES: tuple[int, ...] = (512, 1024)
MODES: tuple[str, ...] = ("crop", "bucket")
_JPEG_QUALITY = 95


@dataclass(frozen=True)
class Preprocess:
    """What to do to each image: `size` 512 or 1024; `mode` "crop" (square) or "bucket" (keep aspect ratio)."""

    size: int
    mode: str = "crop"

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise TrainManagementError(
                f"preprocessing size {self.size} is not offered",
                f"choose one of: {', '.join(map(str, SIZES))}",
            )
        if self.mode not in MODES:
            raise TrainManagementError(
                f"preprocessing mode {self.mode!r} is unknown", f"choose one of: {', '.join(MODES)}"
            )

    @classmethod
    def parse(cls, text: str | None) -> Preprocess | None:
        """'512-crop', '1024-bucket', '512' (crop) or ''/'none' (no preprocessing)."""
        if text is None or text.strip().lower() in ("", "none"):
            return None
        size, _, mode = text.strip().lower().partition("-")
        if not size.isdigit():
            raise TrainManagementError(
                f"preprocessing {text!r} is not understood", "write e.g. '512-crop', '1024-bucket' or 'none'"
            )
        return cls(int(size), mode or "crop")

    def label(self) -> str:
        """'512-crop' style text (the form parse() reads)."""
        return f"{self.size}-{self.mode}"


@functools.cache
def bucket_assigner(size: int) -> BucketAssigner:
    """The trainer's buckets at resolution size x size with the schema's default bucket settings."""
    return BucketAssigner(
        (size, size),
        enable_bucket=True,
        min_size=SCHEMA["min_bucket_reso"].default,
        max_size=SCHEMA["max_bucket_reso"].default,
        reso_steps=SCHEMA["bucket_reso_steps"].default,
        no_upscale=False,
    )


def target_size(width: int, height: int, options: Preprocess) -> tuple[int, int]:
    """The size an image of width x height gets under `options`: the square, or the trainer's bucket for it."""
    if options.mode == "crop":
        return options.size, options.size
    return bucket_assigner(options.size).assign(width, height)


def preprocess_image(path: Path, options: Preprocess) -> tuple[int, int]:
    """Rewrite `path` oriented, RGB and fitted to the target size; returns the new size.

    Raises BadImageError (a DatasetError naming the file) for unreadable images; the file is replaced atomically.
    """
    image = load_image(path)
    size = target_size(image.width, image.height, options)
    fitted = ImageOps.fit(image, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    out = Path(path)
    fmt = Image.registered_extensions().get(out.suffix.lower(), "PNG")
    extra = {"quality": _JPEG_QUALITY} if fmt in ("JPEG", "WEBP") else {}
    encoded = io.BytesIO()
    fitted.save(encoded, format=fmt, **extra)
    atomic_write(out, encoded.getvalue())
    return fitted.size
