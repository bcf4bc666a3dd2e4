"""The dataset health report on a real folder of generated images: duplicates and near-duplicates, sizes, aspect
ratios and buckets, caption lengths in tokens, tags, missing captions, mismatched extensions (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

import kohya_backend.data.token_count as token_count
from kohya_backend.data.health import dataset_health, dhash, hamming
from kohya_backend.data.preprocess import bucket_assigner


def _picture(seed: int, size: tuple[int, int] = (320, 320)) -> Image.Image:
    """A picture with structure (random blocks), different for each seed."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)


def _save(folder: Path, name: str, image: Image.Image, caption: str | None, fmt: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name, format=fmt)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption + "\n")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "set"
    sub = root / "5_thing"
    _save(sub, "a.png", _picture(1), "thing, red, outdoors")
    _save(sub, "a-copy.png", _picture(1), "thing, red")  # the same file content
    _save(sub, "a-soft.png", _picture(1).filter(ImageFilter.GaussianBlur(1)), "thing")  # a near-duplicate
    _save(
        sub, "b.png", _picture(2), "thing, blue, " + ", ".join(f"tag{i}" for i in range(40))
    )  # long caption
    _save(sub, "wide.png", _picture(3, (900, 300)), None)  # no caption, extreme aspect ratio
    _save(sub, "tiny.png", _picture(4, (64, 64)), "thing, small")
    _save(sub, "huge.png", _picture(5, (2200, 2100)), "thing")
    _save(sub, "jpeg-inside.png", _picture(6), "", fmt="JPEG")  # content JPEG, extension .png; empty caption
    Image.new("RGB", (96, 96), (230, 10, 10)).save(sub / "red.png")  # uniform red and uniform blue share a
    Image.new("RGB", (96, 96), (10, 10, 230)).save(sub / "blue.png")  # dHash, not their colours
    (sub / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def test_the_report_finds_every_kind_of_problem(dataset: Path) -> None:
    report = dataset_health(dataset, resolution=512)
    assert report["images"] == 10
    assert report["unreadable"][0]["file"] == "5_thing/broken.png"
    duplicates = report["duplicates"]
    assert duplicates["identical"] == [["5_thing/a-copy.png", "5_thing/a.png"]]
    assert duplicates["near"] == [["5_thing/a-copy.png", "5_thing/a-soft.png", "5_thing/a.png"]]

    sizes = report["sizes"]
    assert (
        sizes["tiny"] == 3 and {"file": "5_thing/tiny.png", "width": 64, "height": 64} in sizes["tiny_files"]
    )
    assert {f["file"] for f in sizes["tiny_files"]} == {
        "5_thing/tiny.png",
        "5_thing/red.png",
        "5_thing/blue.png",
    }
    assert sizes["huge"] == 1 and sizes["huge_files"][0]["file"] == "5_thing/huge.png"
    assert sizes["smallest"] == (64, 64) and sizes["largest"] == (2200, 2100)

    aspects = report["aspect_ratios"]
    assert (aspects["portrait"], aspects["square"], aspects["landscape"]) == (0, 9, 1)
    assert aspects["extreme_files"] == ["5_thing/wide.png"]
    assigner = bucket_assigner(512)
    wide = assigner.assign(900, 300)
    assert {"width": wide[0], "height": wide[1], "images": 1} in aspects["buckets"]
    assert aspects["buckets"][0] == {"width": 512, "height": 512, "images": 9}
    assert sum(b["images"] for b in aspects["buckets"]) == 10

    captions = report["captions"]
    assert captions["missing"] == 3 and "5_thing/wide.png" in captions["missing_files"]
    assert captions["empty_files"] == ["5_thing/jpeg-inside.png"]
    if captions["tokens_counted_with"] == token_count.EXACT:  # CLIP's BPE: "tag12," is 4 tokens
        assert captions["over"] == {"75": 1, "150": 1, "225": 0} and captions["max_tokens"] == 153
    else:  # the approximation (no open-clip-torch in this environment): "tag12," is 2
        assert captions["over"] == {"75": 1, "150": 0, "225": 0} and captions["max_tokens"] == 83
    assert captions["longest"] == [{"file": "5_thing/b.png", "tokens": captions["max_tokens"]}]

    tags = report["tags"]
    assert tags["most_common"][0] == {"tag": "thing", "images": 6}
    assert tags["most_common"][1] == {"tag": "red", "images": 2}
    most = {t["tag"] for t in tags["most_common"]}
    assert len(tags["least_common"]) == 10 and not most & {t["tag"] for t in tags["least_common"]}
    assert {t["images"] for t in tags["least_common"]} == {1}
    assert tags["distinct"] == 3 + 40 + 2  # thing, red, outdoors, blue, tag0..39, small

    assert report["mismatched_extensions"] == [
        {"file": "5_thing/jpeg-inside.png", "extension": ".png", "content": "JPEG"}
    ]


def test_resolution_moves_the_size_limits_and_buckets(dataset: Path) -> None:
    report = dataset_health(dataset, resolution=1024)
    assert report["sizes"]["tiny"] == 8  # every image below 512x512 now (all but the wide and the huge one)
    assert report["sizes"]["huge"] == 0
    assert report["aspect_ratios"]["buckets"][0]["width"] == 1024


def test_dhash_tells_similar_from_different_pictures() -> None:
    base = _picture(10, (256, 256))
    assert hamming(dhash(base), dhash(base.resize((200, 200)))) <= 6  # rescaled: near
    assert hamming(dhash(base), dhash(_picture(11, (256, 256)))) > 12  # another picture: far


def test_the_approximate_count_is_used_and_named_without_the_vocabulary(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(token_count, "open_clip_vocab_path", lambda: None)
    token_count.token_counter.cache_clear()
    try:
        report = dataset_health(dataset)
    finally:
        token_count.token_counter.cache_clear()
    assert report["captions"]["tokens_counted_with"] == token_count.APPROXIMATE
    assert token_count.approximate_tokens("1girl, long_hair!!") == 6  # 1girl , long _ hair !!
    assert report["captions"]["over"]["75"] == 1


def test_a_camera_jpeg_with_several_pictures_is_no_mismatch(tmp_path: Path) -> None:
    # Phones and cameras write JPEGs with a second picture inside (Multi-Picture Format): Pillow names their format
    # MPO, and a .jpg holding one is what it says.
    sub = tmp_path / "set" / "2_photo"
    sub.mkdir(parents=True)
    _picture(7).save(sub / "camera.jpg", format="MPO", save_all=True, append_images=[_picture(8)])
    _save(sub, "plain.png", _picture(9), "photo")
    with Image.open(sub / "camera.jpg") as opened:
        assert opened.format == "MPO"
    report = dataset_health(tmp_path / "set")
    assert report["images"] == 2 and report["unreadable"] == []
    assert report["mismatched_extensions"] == []
    _picture(10).save(sub / "renamed.png", format="MPO", save_all=True, append_images=[_picture(11)])
    assert dataset_health(tmp_path / "set")["mismatched_extensions"] == [
        {"file": "2_photo/renamed.png", "extension": ".png", "content": "MPO"}
    ]
