"""Image probing and loading: size checks, truncation and decompression-bomb detection, RGB conversion."""

from __future__ import annotations

import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from kohya_backend.errors import DatasetError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# EXIF "Orientation" tag; values 5..8 mean the stored pixels are rotated by 90 or 270 degrees.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
# What Pillow's plugins raise on damaged or unknown files (decoders differ per format).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


class BadImageError(DatasetError):
    """One image file cannot be used; `reason` says why in a few words (the scan lists many of these)."""

    def __init__(self, path: Path, reason: str, hint: str) -> None:
        super().__init__(f"cannot use image {path}: {reason}", hint, files=[str(path)])
        self.path = path
        self.reason = reason


def is_image_file(path: Path) -> bool:
    """Whether the file name has one of the image extensions kohya trains on (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _bomb_reason(error: Exception) -> str:
    """Describe a decompression-bomb refusal with the image's pixel count and Pillow's limit."""
    found = _BOMB_PIXELS.search(str(error))
    if found is None:
        return f"refused as a possible decompression bomb ({error})"
    pixels, limit = int(found.group(1)), int(found.group(2))
    return f"it has {pixels:,} pixels, over Pillow's decompression-bomb limit of {limit:,} pixels"


_BOMB_HINT = (
    "downscale the image (e.g. to at most 4096 px on the long side), or raise "
    "PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
)
_DAMAGED_HINT = "re-export or remove the file; it may be truncated by an interrupted copy or not be an image"


def open_image(path: Path) -> Image.Image:
    """Open an image (header only), turning Pillow's decompression-bomb warning into an error like its hard limit;
    BadImageError when it is missing, unreadable or not an image."""
    if not path.is_file():
        raise BadImageError(path, "the file does not exist or is not a regular file", "check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(path, _bomb_reason(error), _BOMB_HINT) from error
    except PermissionError as error:
        raise BadImageError(path, "permission denied", "make the file readable by this user") from error
    except _DECODE_ERRORS as error:
        raise BadImageError(path, f"not a readable image ({error})", _DAMAGED_HINT) from error


def _decode(image: Image.Image, path: Path) -> None:
    """Decode every pixel, so truncated or corrupt data is found now rather than mid-training."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(path, _bomb_reason(error), _BOMB_HINT) from error
    except _DECODE_ERRORS as error:
        raise BadImageError(
            path, f"the image data is damaged or truncated ({error})", _DAMAGED_HINT
        ) from error


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after applying the EXIF orientation, read from the header only."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except _DECODE_ERRORS:
        orientation = None
    if orientation in _TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height


def probe_image(path: Path, *, full_decode: bool = True) -> tuple[int, int]:
    """Return the (width, height) the trainer will see (EXIF applied); raise DatasetError if unusable."""
    path = Path(path)
    image = open_image(path)
    with image:
        size = _oriented_size(image)
        if full_decode:
            _decode(image, path)
    if size[0] < 1 or size[1] < 1:
        raise BadImageError(path, f"it has an empty size {size[0]}x{size[1]}", _DAMAGED_HINT)
    return size


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer grayscale image to 8 bits (Pillow's convert would clip it)."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency over white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _sixteen_bit_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def upright_image(image: Image.Image, path: Path) -> Image.Image:
    """`image` (from open_image) fully decoded and turned upright by its EXIF orientation (a broken EXIF block
    leaves it as stored), as a new image that outlives the opened file; BadImageError when its data is damaged."""
    _decode(image, path)
    try:
        oriented = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        oriented = None
    return image.copy() if oriented is None or oriented is image else oriented


def load_image(path: Path) -> Image.Image:
    """Load an image fully decoded, EXIF-transposed and in RGB (alpha over white), ready to crop."""
    path = Path(path)
    with open_image(path) as image:
        oriented = upright_image(image, path)
    return to_rgb(oriented)
