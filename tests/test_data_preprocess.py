"""Image preprocessing: EXIF orientation, RGB, center crop, bucket-friendly sizes, broken images."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from kohya_backend.config.schema import template_values
from kohya_backend.data.images import BadImageError
from kohya_backend.data.preprocess import SIZES, Preprocess, preprocess_image, target_size
from kohya_backend.errors import TrainManagementError
from kohya_backend.train.plan import format_with_plan


def _trainers_bucket(image: Path, size: int) -> tuple[int, int]:
    """The bucket a job gives `image`: the config template at resolution size x size, planned the trainer's way."""
    values = {
        **template_values("sd_1_5"),
        "resolution": f"{size},{size}",
        "train_data_dir": str(image.parents[1]),
    }
    plan = format_with_plan(values, "sd_1_5", require_paths=False, cuda_available=True)["plan"]
    assert plan is not None
    (bucket,) = plan["buckets"]
    width, height = bucket.split("x")
    return int(width), int(height)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "shape",
    [(1920, 1080), (1080, 1920), (800, 600), (900, 600), (1000, 1000), (3000, 200), (200, 3000), (33, 77)],
)
def test_bucket_resize_gives_the_bucket_the_trainer_picks(
    tmp_path: Path, shape: tuple[int, int], size: int
) -> None:
    image = tmp_path / "data" / "1_x" / "a.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", shape, (90, 120, 150)).save(image)
    resized = preprocess_image(image, Preprocess(size, "bucket"))
    assert resized == target_size(*shape, Preprocess(size, "bucket"))
    assert (
        _trainers_bucket(image, size) == resized
    )  # training then uses the file as it is: no crop, no rescale


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
    assert preprocess_image(path, Preprocess(1024, "bucket")) == (1024, 576)
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
