"""Image probing and loading: sizes, EXIF, truncation, non-images, decompression bombs, RGB conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kohya_backend.data.images import IMAGE_EXTENSIONS, is_image_file, load_image, probe_image
from kohya_backend.errors import DatasetError


def _save(path: Path, image: Image.Image, **kwargs: Any) -> Path:
    image.save(path, **kwargs)
    return path


def test_extensions_cover_kohya_formats_in_any_case() -> None:
    assert set(IMAGE_EXTENSIONS) == {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    assert is_image_file(Path("a.PNG")) and is_image_file(Path("b.JpEg")) and is_image_file(Path("c.webp"))
    assert not is_image_file(Path("a.gif")) and not is_image_file(Path("a.txt"))


@pytest.mark.parametrize("suffix", [".png", ".JPG", ".webp", ".bmp"])
def test_probe_returns_width_and_height(tmp_path: Path, suffix: str) -> None:
    path = _save(tmp_path / f"img{suffix}", Image.new("RGB", (40, 24), "red"))
    assert probe_image(path) == (40, 24)
    assert probe_image(path, full_decode=False) == (40, 24)


def test_exif_rotation_swaps_size_and_is_applied_on_load(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90-degree clockwise turn
    path = _save(tmp_path / "rotated.jpg", image, exif=exif.tobytes(), quality=95)
    assert probe_image(path) == (20, 40)
    loaded = load_image(path)
    assert loaded.size == (20, 40) and loaded.mode == "RGB"
    pixels = np.asarray(loaded).astype(float)
    # after the turn the left stripe lies along the top: red there, white at the bottom
    assert pixels[:5, :, 0].mean() > 200 and pixels[:5, :, 1].mean() < 60
    assert pixels[-5:, :, 1].mean() > 200


def test_truncated_png_is_reported_with_its_name(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    whole = _save(tmp_path / "whole.png", Image.fromarray(noise))
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DatasetError) as caught:
        probe_image(cut)
    assert "cut.png" in str(caught.value) and "truncated" in str(caught.value)
    assert caught.value.files == [str(cut)]
    # the header alone still reads: only a full decode finds the damage
    assert probe_image(cut, full_decode=False) == (64, 64)
    with pytest.raises(DatasetError, match="truncated"):
        load_image(cut)


def test_text_file_named_png_is_not_an_image(tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(DatasetError, match=r"fake\.png.*not a readable image"):
        probe_image(fake)


def test_missing_file_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        probe_image(tmp_path / "nope.png")


@pytest.mark.parametrize("limit", [6000, 4000])  # over the warning limit, and over twice it (Pillow's error)
def test_decompression_bomb_names_file_and_pixel_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    path = _save(tmp_path / "huge.png", Image.new("RGB", (100, 100), "blue"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DatasetError) as caught:
        probe_image(path)
    text = str(caught.value)
    assert "huge.png" in text and "10,000 pixels" in text and "decompression-bomb" in text
    assert "MAX_IMAGE_PIXELS" in (caught.value.hint or "")
    with pytest.raises(DatasetError, match="10,000 pixels"):
        load_image(path)


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    image.putpixel((2, 0), (0, 0, 255, 128))
    loaded = load_image(_save(tmp_path / "alpha.png", image))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (255, 0, 0)
    r, g, b = loaded.getpixel((2, 0))  # type: ignore[misc]
    assert abs(r - 127) <= 2 and abs(g - 127) <= 2 and b == 255


def test_palette_with_transparency_and_grayscale_become_rgb(tmp_path: Path) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    path = _save(tmp_path / "pal.png", palette, transparency=0)
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 0)) == (0, 255, 0)
    gray = load_image(_save(tmp_path / "gray.png", Image.new("L", (2, 2), 77)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(tmp_path / "g16.png", Image.fromarray(values))
    loaded = np.asarray(load_image(path))
    assert loaded[0, :, 0].tolist() == [0, 128, 255]
