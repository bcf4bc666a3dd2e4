"""Image preprocessing: EXIF orientation, RGB, center crop, bucket-friendly sizes, broken images."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from kohya_backend.data.images import BadImageError
from kohya_backend.data.preprocess import Preprocess, bucket_size, preprocess_image, target_size
from kohya_backend.errors import TrainManagementError


@pytest.mark.parametrize(
    ("size", "target", "expected"),
    [((800, 600), 512, (576, 448)), ((600, 800), 512, (448, 576)), ((1000, 1000), 1024, (1024, 1024))],
)
def test_bucket_size_keeps_aspect_with_sides_of_64_and_area_near_target(
    size: tuple[int, int], target: int, expected: tuple[int, int]
) -> None:
    width, height = bucket_size(*size, target)
    assert (width, height) == expected
    assert width % 64 == 0 and height % 64 == 0


@pytest.mark.parametrize("shape", [(3000, 200), (200, 3000), (4000, 3000), (33, 77)])
def test_bucket_size_stays_close_for_any_shape(shape: tuple[int, int]) -> None:
    width, height = bucket_size(*shape, 512)
    assert width % 64 == 0 and height % 64 == 0 and width >= 64 and height >= 64
    assert abs(width * height - 512 * 512) / (512 * 512) < 0.25
    assert abs(width / height - shape[0] / shape[1]) / (shape[0] / shape[1]) < 0.35


def test_parse_and_validate_options() -> None:
    assert Preprocess.parse("1024-bucket") == Preprocess(1024, "bucket")
    assert Preprocess.parse("512") == Preprocess(512, "crop")
    assert Preprocess.parse("none") is None and Preprocess.parse("") is None
    with pytest.raises(TrainManagementError, match="size 768 is not offered"):
        Preprocess(768)
    with pytest.raises(TrainManagementError, match="mode 'stretch' is unknown"):
        Preprocess.parse("512-stretch")
    with pytest.raises(TrainManagementError, match="not understood"):
        Preprocess.parse("big")
    assert target_size(800, 600, Preprocess(512)) == (512, 512)


def test_center_crop_applies_exif_orientation_and_makes_rgb(tmp_path: Path) -> None:
    # A 200x100 RGBA image stored sideways (EXIF orientation 6: rotate 90 degrees when shown), left half red.
    image = Image.new("RGBA", (200, 100), (0, 0, 255, 255))
    image.paste((255, 0, 0, 255), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "a.png"
    image.save(path, exif=exif)
    assert preprocess_image(path, Preprocess(512)) == (512, 512)
    with Image.open(path) as out:
        assert out.mode == "RGB" and out.size == (512, 512)
        assert out.getexif().get(0x0112) in (None, 1)
        # Shown upright the image is 100 wide and 200 tall with red on top; the center crop keeps both halves.
        assert out.getpixel((256, 10))[0] > 200 and out.getpixel((256, 500))[2] > 200


def test_bucket_resize_writes_the_bucket_size_and_keeps_the_format(tmp_path: Path) -> None:
    path = tmp_path / "wide.jpg"
    Image.new("RGB", (1600, 900), (10, 200, 30)).save(path, quality=90)
    dest = tmp_path / "out.jpg"
    assert preprocess_image(path, Preprocess(1024, "bucket"), dest) == (1344, 768)
    with Image.open(dest) as out:
        assert out.format == "JPEG" and out.size == (1344, 768)
    with Image.open(path) as original:
        assert original.size == (1600, 900)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jpg", "wide.jpg"]


def test_broken_image_raises_naming_the_file_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    data = path.read_bytes()[:-40]
    path.write_bytes(data)
    with pytest.raises(BadImageError, match=r"broken\.png"):
        preprocess_image(path, Preprocess(512))
    assert path.read_bytes() == data
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(BadImageError, match="not a readable image"):
        preprocess_image(not_image, Preprocess(512, "bucket"))
