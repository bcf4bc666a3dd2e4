"""Image preprocessing: EXIF orientation, RGB, center crop, bucket-friendly sizes, broken images."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from kohya_backend.config.schema import SCHEMA
from kohya_backend.data.buckets import BucketAssigner
from kohya_backend.data.images import BadImageError
from kohya_backend.data.preprocess import SIZES, Preprocess, preprocess_image, target_size
from kohya_backend.errors import TrainManagementError


def _trainers_bucket(width: int, height: int, size: int) -> tuple[int, int]:
    """The bucket a job at resolution size x size with the schema's default bucket settings gives the image."""
    assigner = BucketAssigner(
        (size, size), enable_bucket=True, min_size=SCHEMA["min_bucket_reso"].default,
        max_size=SCHEMA["max_bucket_reso"].default, reso_steps=SCHEMA["bucket_reso_steps"].default,
        no_upscale=False,
    )  # fmt: skip
    return assigner.assign(width, height)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "shape",
    [(1920, 1080), (1080, 1920), (800, 600), (900, 600), (1000, 1000), (3000, 200), (200, 3000), (33, 77)],
)
def test_bucket_resize_gives_the_bucket_the_trainer_picks(shape: tuple[int, int], size: int) -> None:
    assert target_size(*shape, Preprocess(size, "bucket")) == _trainers_bucket(*shape, size)


def test_a_full_hd_image_at_512_gets_the_trainers_640x384() -> None:
    assert target_size(1920, 1080, Preprocess(512, "bucket")) == (640, 384)


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
    assert preprocess_image(path, Preprocess(1024, "bucket")) == _trainers_bucket(1600, 900, 1024)
    with Image.open(path) as out:
        assert out.format == "JPEG" and out.size == (1024, 576)
    assert [p.name for p in tmp_path.iterdir()] == ["wide.jpg"]  # replaced in place, no temporary left


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
