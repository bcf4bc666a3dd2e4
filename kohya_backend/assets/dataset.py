"""A tiny captioned demo dataset (coloured shapes drawn with Pillow) for tests, the demo and benchmarks."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from kohya_backend.data.scan import SUBSET_FOLDER
from kohya_backend.errors import DatasetError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    """Draw one filled shape inside the box (left, top, right, bottom)."""
    left, top, right, bottom = box
    mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(mid_x, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        draw.polygon([(mid_x, top), (right, mid_y), (mid_x, bottom), (left, mid_y)], fill=fill)


def _demo_image(rng: random.Random, shape: str, size: tuple[int, int]) -> tuple[Image.Image, str]:
    """One image with a random shape colour, background and placement, and its caption tags."""
    colour, background = rng.sample(sorted(COLOURS), 2)
    width, height = size
    extent = int(min(size) * rng.uniform(0.4, 0.8))
    left = rng.randint(0, width - extent)
    top = rng.randint(0, height - extent)
    image = Image.new("RGB", size, COLOURS[background])
    _draw_shape(
        ImageDraw.Draw(image), shape, (left, top, left + extent - 1, top + extent - 1), COLOURS[colour]
    )
    return image, f"{colour} {shape}, {background} background"


def write_demo_dataset(
    root: Path,
    *,
    folder: str = "10_demo",
    count: int = 8,
    size: tuple[int, int] = (64, 64),
    caption_extension: str = ".txt",
    seed: int = 0,
) -> Path:
    """Write root/folder/NNN.png with captions like "demo, red circle, blue background"; return root.

    The images vary in shape, colours and placement and depend only on `seed`. The first caption
    tag is the folder's class token (the part after `<repeats>_`), so captions read as kohya expects.
    """
    match = SUBSET_FOLDER.match(folder)
    if match is None or not match.group(2) or int(match.group(1)) < 1:
        raise DatasetError(
            f"demo folder name {folder!r} is not <repeats>_<name>",
            "use e.g. '10_demo' (10 repeats, class token 'demo')",
        )
    if count < 1 or min(size) < 8:
        raise DatasetError(
            f"a demo dataset needs at least 1 image of at least 8x8 pixels, got {count} of {size[0]}x{size[1]}",
            "use e.g. count=8, size=(64, 64)",
        )
    if not caption_extension.startswith("."):
        raise DatasetError(
            f"caption extension {caption_extension!r} must start with a dot", 'use e.g. ".txt"'
        )
    root = Path(root)
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    digits = max(3, len(str(count - 1)))
    for index in range(count):
        image, tags = _demo_image(rng, SHAPES[index % len(SHAPES)], size)
        stem = f"{index:0{digits}d}"
        image.save(target / f"{stem}.png")
        (target / f"{stem}{caption_extension}").write_text(f"{match.group(2)}, {tags}\n", encoding="utf-8")
    return root
