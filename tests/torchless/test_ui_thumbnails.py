"""The tab's one thumbnail decoder and its cache: upright, RGB, small; decoded again only when a file changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from kohya_backend.data.images import BadImageError, probe_image
from kohya_backend.ui.thumbnails import ThumbnailCache, thumbnail


def test_a_thumbnail_is_upright_rgb_and_fits_the_size(tmp_path: Path) -> None:
    # 400x200 RGBA stored sideways (EXIF orientation 6: shown rotated by 90 degrees), left half red.
    image = Image.new("RGBA", (400, 200), (0, 0, 255, 255))
    image.paste((255, 0, 0, 255), (0, 0, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "a.png", exif=exif)
    small = thumbnail(tmp_path / "a.png", 100)
    assert small.mode == "RGB" and small.size == (50, 100)  # upright: tall, red on top
    assert small.getpixel((25, 5))[0] > 200 and small.getpixel((25, 95))[2] > 200
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(tmp_path / "big.jpg", quality=90)
    assert thumbnail(tmp_path / "big.jpg", 192).size == (192, 128)  # a JPEG decoded at a reduced scale
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(BadImageError, match=r"broken\.png"):
        thumbnail(tmp_path / "broken.png", 100)


def test_the_cache_decodes_a_file_again_only_when_it_changed(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (300, 300), (200, 0, 0)).save(path)
    cache = ThumbnailCache(64, max_entries=2)
    first = cache.get(path)
    assert first.size == (64, 64) and cache.get(path) is first
    stat = path.stat()
    path.write_bytes(b"\0" * stat.st_size)  # same size and time: not read again
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.get(path) is first
    Image.new("RGB", (300, 300), (0, 0, 200)).save(path)  # a new version is decoded
    os.utime(path, ns=(stat.st_mtime_ns + 10**9, stat.st_mtime_ns + 10**9))
    second = cache.get(path)
    assert second is not first and second.getpixel((0, 0))[2] > 150
    (tmp_path / "late.png").write_bytes(b"still uploading")
    assert cache.get(tmp_path / "late.png") is None and cache.get(tmp_path / "gone.png") is None
    for name in ("b.png", "c.png"):  # the least recently used falls out
        Image.new("RGB", (8, 8)).save(tmp_path / name)
        cache.get(tmp_path / name)
    assert cache.get(path) is not second


def test_a_thumbnail_judges_an_image_as_the_dataset_scan_does(tmp_path: Path, monkeypatch) -> None:
    # A broken EXIF block: the scan trains on the image as stored, so the tab shows it too.
    Image.new("RGB", (80, 40), (200, 0, 0)).save(tmp_path / "odd-exif.png", exif=b"garbage")
    assert probe_image(tmp_path / "odd-exif.png") == (80, 40)
    assert thumbnail(tmp_path / "odd-exif.png", 20).size == (20, 10)
    # Over Pillow's pixel limit (its warning range): the scan refuses it, so the tab says why.
    Image.new("RGB", (40, 40)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImageError, match="decompression-bomb limit"):
        probe_image(tmp_path / "bomb.png")
    with pytest.raises(BadImageError, match="decompression-bomb limit"):
        thumbnail(tmp_path / "bomb.png", 20)
