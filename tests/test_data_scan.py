"""Dataset scanning: folder convention, captions, warnings, tag frequency and every error the user can meet."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from kohya_backend.assets.dataset import write_demo_dataset
from kohya_backend.data.scan import DatasetScan, check_caption_extension, list_dataset, scan_dataset
from kohya_backend.errors import ConfigError, DatasetError


def _image(
    path: Path, size: tuple[int, int] = (16, 16), caption: str | None = None, ext: str = ".txt"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 120, 200)).save(path)
    if caption is not None:
        path.with_name(path.stem + ext).write_text(caption, encoding="utf-8")
    return path


def _truncated(path: Path) -> Path:
    _image(path, (64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    return path


def test_demo_dataset_scans_with_captions_sizes_and_counts(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "train", count=5, size=(48, 32))
    scan = scan_dataset(root, ".txt")
    assert isinstance(scan, DatasetScan) and scan.warnings == [] and scan.ignored == []
    [subset] = scan.subsets
    assert (subset.name, subset.repeats, subset.class_token, subset.is_reg) == ("10_demo", 10, "demo", False)
    assert [item.path.name for item in subset.images] == [
        "000.png",
        "001.png",
        "002.png",
        "003.png",
        "004.png",
    ]
    assert all((item.width, item.height) == (48, 32) for item in subset.images)
    assert all(item.caption is not None and item.caption.startswith("demo, ") for item in subset.images)
    assert (scan.num_images, scan.num_reg_images, scan.num_train_items) == (5, 0, 50)
    assert scan.dataset_dirs_info() == {"10_demo": {"n_repeats": 10, "img_count": 5}}
    assert scan.tag_frequency()["10_demo"]["demo"] == 5


def test_caption_is_first_line_stripped_and_any_case_extension(tmp_path: Path) -> None:
    folder = tmp_path / "3_cat"
    _image(folder / "a.PNG", caption="  cat, sitting , red  \nsecond line is ignored\n")
    _image(folder / "b.JPG", caption="\ufeffcat, sleeping")
    scan = scan_dataset(tmp_path, ".txt")
    captions = [item.caption for item in scan.subsets[0].images]
    assert captions == ["cat, sitting , red", "cat, sleeping"]
    assert scan.tag_frequency() == {"3_cat": {"cat": 2, "sitting": 1, "red": 1, "sleeping": 1}}


def test_missing_captions_warn_and_use_class_token(tmp_path: Path) -> None:
    folder = tmp_path / "5_sks dog"
    _image(folder / "a.png", caption="sks dog, grass")
    _image(folder / "b.png")
    _image(folder / "c.png", caption="sks dog, beach", ext=".caption")
    scan = scan_dataset(tmp_path, ".txt")
    subset = scan.subsets[0]
    assert subset.class_token == "sks dog"
    assert [item.caption for item in subset.images] == ["sks dog, grass", None, None]
    assert subset.uncaptioned == 2
    [warning, orphan_or_other] = scan.warnings
    assert "2 of 3 image(s) have no caption" in warning and "'sks dog'" in warning
    assert "b.png" in warning and "c.png" in warning
    assert "should caption_extension be '.caption'?" in warning
    assert "c.caption" in orphan_or_other
    assert scan.tag_frequency() == {"5_sks dog": {"sks dog": 3, "grass": 1}}


def test_empty_caption_file_warns(tmp_path: Path) -> None:
    _image(tmp_path / "2_x" / "a.png", caption="\n")
    scan = scan_dataset(tmp_path, ".txt")
    assert scan.subsets[0].images[0].caption is None
    assert any("1 caption file(s) are empty" in w and "a.png" in w for w in scan.warnings)


def test_ignored_folders_files_subfolders_and_orphans_are_warned(tmp_path: Path) -> None:
    _image(tmp_path / "10_good" / "a.png", caption="good")
    _image(tmp_path / "10_good" / "nested" / "deep.png", caption="never seen")
    (tmp_path / "10_good" / "orphan.txt").write_text("no image")
    (tmp_path / "10_good" / "notes.md").write_text("notes")
    _image(tmp_path / "misc" / "b.png")
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / ".hidden").mkdir()
    scan = scan_dataset(tmp_path, ".txt")
    assert [s.name for s in scan.subsets] == ["10_good"] and scan.num_images == 1
    text = "\n".join(scan.warnings)
    assert "ignored 1 folder(s) not named <repeats>_<name>" in text and "misc" in text
    assert "readme.txt" in text and "subfolder(s) (not searched): nested" in text
    assert "caption file(s) without an image: orphan.txt" in text and "notes.md" in text
    ignored = {p.name for p in scan.ignored}
    assert {"misc", "readme.txt", "nested", "orphan.txt", "notes.md"} <= ignored
    assert ".hidden" not in ignored


def test_folder_without_repeats_explains_the_convention(tmp_path: Path) -> None:
    _image(tmp_path / "demo" / "a.png", caption="demo")
    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path, ".txt")
    error = caught.value
    assert "no training folders found" in error.message and "<repeats>_<name>" in error.message
    assert "10_mysubject" in error.message and "folder 'demo'" in error.message
    assert "'10_demo'" in (error.hint or "")
    assert error.files == [str(tmp_path / "demo")]


def test_loose_images_and_image_folder_as_root_get_specific_hints(tmp_path: Path) -> None:
    _image(tmp_path / "loose" / "a.png")
    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path / "loose", ".txt")
    assert "move the 1 image(s)" in (caught.value.hint or "") and "file 'a.png'" in caught.value.message
    _image(tmp_path / "parent" / "10_pet" / "b.png")
    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path / "parent" / "10_pet", ".txt")
    assert str(tmp_path / "parent") in (caught.value.hint or "")


def test_empty_root_says_so(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"Found: nothing \(the folder is empty\)"):
        scan_dataset(tmp_path, ".txt")


def test_zero_repeats_is_an_error_listing_every_such_folder(tmp_path: Path) -> None:
    _image(tmp_path / "0_demo" / "a.png")
    _image(tmp_path / "00_other" / "b.png")
    _image(tmp_path / "4_ok" / "c.png")
    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path, ".txt")
    assert "2 folder(s) have 0 repeats" in caught.value.message
    assert caught.value.files == [str(tmp_path / "00_other"), str(tmp_path / "0_demo")]
    assert "'1_other'" in (caught.value.hint or "")


def test_all_broken_images_are_listed_in_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "10_demo"
    _image(folder / "good.png", caption="ok")
    _truncated(folder / "cut.png")
    (folder / "text.png").write_text("I am not a PNG")
    _image(tmp_path / "reg" / "1_person" / "big.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path, ".txt", reg_data_dir=tmp_path / "reg")
    error = caught.value
    assert "3 file(s) in the dataset cannot be used" in error.message
    assert set(error.files) == {
        str(folder / "cut.png"),
        str(folder / "text.png"),
        str(tmp_path / "reg" / "1_person" / "big.png"),
    }
    assert "truncated" in error.message and "not a readable image" in error.message
    assert "10,000 pixels" in error.message


def test_verify_images_false_reads_headers_only(tmp_path: Path) -> None:
    _truncated(tmp_path / "1_x" / "cut.png")
    scan = scan_dataset(tmp_path, ".txt", verify_images=False)
    assert scan.num_images == 1 and scan.subsets[0].images[0].width == 64


def test_non_utf8_caption_is_an_error(tmp_path: Path) -> None:
    _image(tmp_path / "1_x" / "a.png")
    (tmp_path / "1_x" / "a.txt").write_bytes(b"\xff\xfe\xfa broken")
    with pytest.raises(DatasetError, match="not UTF-8") as caught:
        scan_dataset(tmp_path, ".txt")
    assert caught.value.files == [str(tmp_path / "1_x" / "a.txt")]


def test_empty_dataset_and_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "10_empty" / "sub").mkdir(parents=True)
    _image(tmp_path / "10_empty" / "sub" / "a.png")
    with pytest.raises(DatasetError, match="no images found in train_data_dir") as caught:
        scan_dataset(tmp_path, ".txt")
    assert caught.value.files == [str(tmp_path / "10_empty")]
    _image(tmp_path / "2_full" / "b.png")
    scan = scan_dataset(tmp_path, ".txt")
    assert [s.name for s in scan.subsets] == ["2_full"]
    assert any("skipped 1 folder(s) with no images: 10_empty" in w for w in scan.warnings)


def test_missing_or_file_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist") as caught:
        scan_dataset(tmp_path / "nowhere", ".txt")
    assert caught.value.files == [str(tmp_path / "nowhere")]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        scan_dataset(tmp_path / "file", ".txt")
    write_demo_dataset(tmp_path / "train", count=1)
    with pytest.raises(DatasetError, match=r"reg_data_dir .* does not exist"):
        scan_dataset(tmp_path / "train", ".txt", reg_data_dir=tmp_path / "noreg")


def test_reg_subsets_follow_train_subsets(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path / "train", folder="5_b", count=2)
    write_demo_dataset(tmp_path / "train", folder="3_a", count=3)
    write_demo_dataset(tmp_path / "reg", folder="1_person", count=4)
    scan = scan_dataset(tmp_path / "train", ".txt", reg_data_dir=tmp_path / "reg")
    assert [(s.name, s.is_reg) for s in scan.subsets] == [("3_a", False), ("5_b", False), ("1_person", True)]
    assert (scan.num_images, scan.num_reg_images, scan.num_train_items, scan.num_reg_items) == (5, 4, 19, 4)
    assert set(scan.tag_frequency()) == {"3_a", "5_b", "1_person"}
    assert scan.dataset_dirs_info()["1_person"] == {"n_repeats": 1, "img_count": 4}


def test_bad_caption_extension_is_a_config_error(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, count=1)
    with pytest.raises(ConfigError) as caught:
        scan_dataset(tmp_path, "txt")
    assert caught.value.issues[0].key == "caption_extension"
    with pytest.raises(ConfigError):
        scan_dataset(tmp_path, ".png")


@pytest.mark.parametrize("ext", [".txt", ".caption", ".wd14.txt", ".TAGS", ".a b.txt", ".x"])
def test_usable_caption_extensions(ext: str) -> None:
    assert check_caption_extension(ext) == ext


@pytest.mark.parametrize(
    "ext",
    [
        "",
        ".",
        "txt",
        ".txt\n",
        "./x",
        ".a\\b",
        ".png",
        ".JPG",
        ".png ",
        ".png.",
        ".PNG. .",
        ".txt:x",
        ".txt ",
        ".t?t",
    ],
)
def test_unusable_caption_extensions_are_config_errors(ext: str) -> None:
    with pytest.raises(ConfigError, match="caption extension") as caught:
        check_caption_extension(ext)
    assert caught.value.issues[0].key == "caption_extension"


def test_the_listing_never_raises_and_keeps_what_the_scan_leaves_out(tmp_path: Path) -> None:
    _image(tmp_path / "2_cat" / "a.png", caption="a cat\nmore")
    _truncated(tmp_path / "2_cat" / "b.png").with_suffix(".txt").write_text("broken cat")
    _image(tmp_path / "0_dog" / "c.png")
    listing = list_dataset(tmp_path, ".txt", verify_images=True)
    assert [(s.name, s.repeats) for s in listing.folders] == [("0_dog", 0), ("2_cat", 2)]
    listed = {i.path.name: (i.subset, i.caption, i.problem) for i in listing.images}
    assert listed["a.png"] == ("2_cat", "a cat", None) and listed["c.png"] == ("0_dog", None, None)
    assert listed["b.png"][:2] == ("2_cat", "broken cat") and listed["b.png"][2]
    assert isinstance(listing.error, DatasetError) and "0 repeats" in listing.error.message
    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path, ".txt")
    assert caught.value.message == listing.error.message
    (tmp_path / "0_dog" / "c.png").unlink()
    (tmp_path / "0_dog").rmdir()
    assert "b.png" in str(list_dataset(tmp_path, ".txt").error)
    assert list_dataset(tmp_path / "nowhere", ".txt").error is not None
    assert isinstance(list_dataset(tmp_path, "txt").error, ConfigError)
