"""DatasetService on a real home folder: create from files and zips, layout, validation, captions, deletes."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from kohya_backend.data.archive import ArchiveError, ArchiveLimits
from kohya_backend.data.preprocess import Preprocess
from kohya_backend.errors import DatasetError, TrainManagementError
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import JobStore
from kohya_backend.service import datasets as datasets_module
from kohya_backend.service.datasets import (
    STAGING_PREFIX,
    DatasetExists,
    DatasetInUse,
    DatasetService,
    IncomingFile,
)
from kohya_backend.service.home import Home, NotInHome, PathOutsideHome
from kohya_backend.service.tasks import Task


def _png(size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _files(entries: dict[str, bytes]) -> list[IncomingFile]:
    return [IncomingFile(name, io.BytesIO(data)) for name, data in entries.items()]


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


@pytest.fixture
def datasets(home: Home) -> DatasetService:
    return DatasetService(home, jobs=JobStore(home.root))


def _leftovers(home: Home) -> list[str]:
    return sorted(p.name for p in home.datasets.iterdir() if p.name.startswith("."))


def test_create_from_files_puts_them_in_repeats_subject_and_reports_the_rest(
    datasets: DatasetService, home: Home
) -> None:
    files = _files(
        {"a.png": _png(), "a.txt": b"a red cat\n", "b.jpg": b"", "notes.md": b"hi", ".hidden.png": b""}
    )
    files[2] = IncomingFile("b.png", io.BytesIO(_png(colour=(1, 2, 3))))
    out = datasets.create("cats", files, repeats=5, subject="cat")
    folder = home.datasets / "cats" / "5_cat"
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a.txt", "b.png"]
    assert out["images"] == ["5_cat/a.png", "5_cat/b.png"] and out["subset_folder"] == "5_cat"
    assert {s["file"]: s["reason"] for s in out["skipped"]} == {
        "notes.md": out["skipped"][0]["reason"],
        ".hidden.png": "hidden file",
    }
    assert "not an image or caption file" in out["skipped"][0]["reason"]
    assert out["report"]["ok"] and out["report"]["images"] == 2 and out["report"]["train_items"] == 10
    assert any("no caption file" in w and "b.png" in w for w in out["report"]["warnings"])
    assert _leftovers(home) == []
    assert [d["name"] for d in datasets.list()] == ["cats"]


def test_zip_keeps_repeats_folders_and_loose_files_go_to_the_default_folder(
    datasets: DatasetService, home: Home
) -> None:
    archive = _zip({"set/3_dog/x.png": _png(), "set/3_dog/x.txt": b"dog", "set/loose.png": _png()})
    out = datasets.create("pets", [IncomingFile("pets.zip", io.BytesIO(archive))], repeats=7)
    assert sorted(out["images"]) == ["3_dog/x.png", "7_pets/loose.png"] and out["subset_folder"] == "7_pets"
    assert (home.datasets / "pets/3_dog/x.txt").read_text() == "dog"
    shown = datasets.show("pets")
    assert [s["name"] for s in shown["subsets"]] == ["3_dog", "7_pets"]
    assert {i["image"]: i["caption"] for i in shown["images"]} == {
        "3_dog/x.png": "dog",
        "7_pets/loose.png": None,
    }


@pytest.mark.parametrize(
    ("name", "repeats", "subject", "message"),
    [
        ("", 10, None, "dataset name is empty"),
        ("../evil", 10, None, "not a safe folder name"),
        ("a/b", 10, None, "not a safe folder name"),
        (".hidden", 10, None, "not a safe folder name"),
        ("ok", 0, None, "repeats 0 is not a whole number"),
        ("ok", 2.5, None, "repeats 2.5"),
        ("ok", "ten", None, "repeats 'ten'"),
        ("ok", 10, "a:b", "subject .* is not a safe folder name"),
    ],
)
def test_names_and_repeats_are_validated_before_anything_is_written(
    datasets: DatasetService, home: Home, name: str, repeats: object, subject: str | None, message: str
) -> None:
    with pytest.raises(TrainManagementError, match=message):
        datasets.create(name, _files({"a.png": _png()}), repeats=repeats, subject=subject)
    assert list(home.datasets.iterdir()) == []


def test_existing_dataset_is_never_merged_or_replaced(datasets: DatasetService, home: Home) -> None:
    datasets.create("cats", _files({"a.png": _png()}))
    with pytest.raises(DatasetExists, match="already exists"):
        datasets.create("cats", _files({"b.png": _png()}))
    assert sorted(p.name for p in (home.datasets / "cats/10_cats").iterdir()) == ["a.png"]
    assert _leftovers(home) == []


def test_broken_images_are_left_out_and_an_upload_without_any_good_image_creates_nothing(
    datasets: DatasetService, home: Home
) -> None:
    good = _png()
    out = datasets.create("mixed", _files({"good.png": good, "bad.png": good[:-30], "bad.txt": b"caption"}))
    assert out["images"] == ["10_mixed/good.png"]
    [skipped] = out["skipped"]
    assert skipped["file"] == "10_mixed/bad.png" and "damaged or truncated" in skipped["reason"]
    assert not (home.datasets / "mixed/10_mixed/bad.txt").exists()
    empty = datasets.create("partial", _files({"ok.png": good, "late.png": b"", "late.txt": b"caption"}))
    assert empty["skipped"] == [{"file": "10_partial/late.png", "reason": empty["skipped"][0]["reason"]}]
    assert "the file is empty (if it was still uploading" in empty["skipped"][0]["reason"]
    assert sorted(p.name for p in (home.datasets / "partial/10_partial").iterdir()) == ["ok.png"]
    with pytest.raises(DatasetError, match=r"no usable image: .*notes\.md"):
        datasets.create("empty", _files({"notes.md": b"x", "broken.png": b"not a png"}))
    assert not (home.datasets / "empty").exists() and _leftovers(home) == []


def test_traversal_in_an_uploaded_name_refuses_the_upload(datasets: DatasetService, home: Home) -> None:
    with pytest.raises(ArchiveError, match=r"'\.\.'"):
        datasets.create("evil", _files({"a.png": _png(), "../../escape.png": _png()}))
    archive = _zip({"../escape.png": _png()})
    with pytest.raises(ArchiveError, match=r"'\.\.'"):
        datasets.create("evil", [IncomingFile("x.zip", io.BytesIO(archive))])
    assert list(home.datasets.iterdir()) == [] and not (home.root / "escape.png").exists()


def test_zip_bomb_and_upload_limits(home: Home) -> None:
    small = DatasetService(home, limits=ArchiveLimits(max_entries=3, max_total_bytes=10_000))
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("10_x/a.png", b"\0" * (4 * 1024 * 1024))
    with pytest.raises(ArchiveError, match=r"more than the limit|zip bomb"):
        small.create("bomb", [IncomingFile("bomb.zip", io.BytesIO(bomb.getvalue()))])
    with pytest.raises(TrainManagementError, match="4 files were uploaded, more than the limit of 3"):
        small.create("many", _files({f"{i}.png": _png() for i in range(4)}))
    with pytest.raises(ArchiveError, match="more than"):
        small.create("big", _files({"a.png": _png((400, 400)) + b"\0" * 20_000}))
    assert list(home.datasets.iterdir()) == []


def test_preprocessing_crops_or_bucket_resizes_every_image(datasets: DatasetService, home: Home) -> None:
    datasets.create(
        "sq", _files({"w.png": _png((300, 200)), "t.png": _png((100, 250))}), preprocess=Preprocess(512)
    )
    for path in (home.datasets / "sq/10_sq").iterdir():
        with Image.open(path) as image:
            assert image.size == (512, 512)
    out = datasets.create("bk", _files({"w.png": _png((800, 600))}), preprocess=Preprocess(512, "bucket"))
    assert out["preprocess"] == "512-bucket"
    with Image.open(home.datasets / "bk/10_bk/w.png") as image:
        assert image.size == (576, 448)


def test_captions_are_read_and_written_inside_the_dataset_only(datasets: DatasetService, home: Home) -> None:
    datasets.create("cats", _files({"a.png": _png(), "a.txt": b"old\nsecond line\n"}), subject="cat")
    datasets.create("other", _files({"z.png": _png()}))
    assert datasets.read_caption("cats", "10_cat/a.png") == "old\nsecond line"
    assert datasets.write_caption("cats", "10_cat/a.png", "  a cat, sitting \r\n") == {
        "image": "10_cat/a.png",
        "caption": "a cat, sitting",
    }
    assert (home.datasets / "cats/10_cat/a.txt").read_text() == "a cat, sitting\n"
    assert datasets.show("cats")["images"][0]["caption"] == "a cat, sitting"
    datasets.write_caption("cats", "10_cat/a.png", "tags", caption_extension=".caption")
    assert (home.datasets / "cats/10_cat/a.caption").read_text() == "tags\n"
    with pytest.raises(PathOutsideHome):
        datasets.write_caption("cats", "../other/10_other/z.png", "pwned")
    with pytest.raises(PathOutsideHome):
        datasets.read_caption("cats", "/etc/passwd")
    with pytest.raises(NotInHome, match="does not exist in dataset 'cats'"):
        datasets.read_caption("cats", "10_cat/a.txt")
    with pytest.raises(NotInHome):
        datasets.show("missing")
    with pytest.raises(TrainManagementError, match="caption extension"):
        datasets.read_caption("cats", "10_cat/a.png", caption_extension="txt")
    with pytest.raises(TrainManagementError, match="caption extension"):  # no newline smuggled into a name
        datasets.write_caption("cats", "10_cat/a.png", "x", caption_extension=".txt\n")


def test_validation_names_the_broken_file_relative_to_the_dataset(
    datasets: DatasetService, home: Home
) -> None:
    datasets.create("cats", _files({"a.png": _png(), "b.png": _png()}), subject="cat")
    broken = home.datasets / "cats/10_cat/b.png"
    broken.write_bytes(broken.read_bytes()[:-30])
    report = datasets.validate("cats")
    assert not report["ok"] and report["files"] == ["10_cat/b.png"]
    assert "cannot be used" in report["message"] and str(home.datasets) not in report["message"]
    assert report["hint"]
    datasets.delete_image("cats", "10_cat/b.png")
    assert datasets.validate("cats")["ok"]


def test_show_lists_every_image_once_from_one_listing_broken_ones_included(
    datasets: DatasetService, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kohya_backend.service.datasets as module

    datasets.create("cats", _files({"a.png": _png(), "a.txt": b"a cat\n", "b.png": _png(), "b.txt": b"b"}))
    broken = home.datasets / "cats/10_cats/b.png"
    broken.write_bytes(b"not a png")
    (home.datasets / "cats/0_later").mkdir()
    (home.datasets / "cats/0_later/c.png").write_bytes(_png())
    listings: list[Path] = []
    real = module.list_dataset
    monkeypatch.setattr(
        module, "list_dataset", lambda folder, *a, **k: listings.append(folder) or real(folder, *a, **k)
    )
    shown = datasets.show("cats")
    assert listings == [home.datasets / "cats"]  # one walk for the folders, images, captions and the report
    assert [(s["name"], s["repeats"], s["images"]) for s in shown["subsets"]] == [
        ("0_later", 0, 1),
        ("10_cats", 10, 2),
    ]
    assert [(i["image"], i["caption"]) for i in shown["images"]] == [
        ("0_later/c.png", None),
        ("10_cats/a.png", "a cat"),
        ("10_cats/b.png", "b"),
    ]
    assert not shown["report"]["ok"] and "0 repeats" in shown["report"]["message"]


def test_delete_image_dataset_and_in_use_refusal(datasets: DatasetService, home: Home) -> None:
    datasets.create("cats", _files({"a.png": _png(), "a.txt": b"cap", "b.png": _png()}), subject="cat")
    datasets.delete_image("cats", "10_cat/a.png")
    assert sorted(p.name for p in (home.datasets / "cats/10_cat").iterdir()) == ["b.png"]
    assert datasets.jobs is not None
    job = datasets.jobs.create(
        fm_type="sd_1_5", model="m.safetensors", dataset="cats", instance_type="local",
        output_name="x", config_toml="", params={},
    )  # fmt: skip
    with pytest.raises(DatasetInUse, match=job.id):
        datasets.delete("cats")
    with pytest.raises(DatasetInUse):
        datasets.write_caption("cats", "10_cat/b.png", "x")
    datasets.jobs.transition(job.id, JobStatus.CANCELLED, "cancelled by the test")
    datasets.delete("cats")
    assert not (home.datasets / "cats").exists()
    with pytest.raises(NotInHome):
        datasets.delete("cats")


def test_import_folder_keeps_relative_paths_and_skips_symlinks(
    datasets: DatasetService, home: Home, tmp_path: Path
) -> None:
    source = tmp_path / "mine"
    (source / "4_cat").mkdir(parents=True)
    (source / "4_cat/a.png").write_bytes(_png())
    (source / "4_cat/a.txt").write_text("cat")
    (source / "extra.png").write_bytes(_png())
    (source / "4_cat/link.png").symlink_to(source / "extra.png")
    out = datasets.import_folder(source, "imported", repeats=2, subject="misc")
    assert sorted(out["images"]) == ["2_misc/extra.png", "4_cat/a.png"]
    assert {"file": "4_cat/link.png", "reason": "symbolic link (not followed)"} in out["skipped"]
    assert not (home.datasets / "imported/4_cat/link.png").exists()
    with pytest.raises(TrainManagementError, match="is not a folder"):
        datasets.import_folder(tmp_path / "nope", "x")
    assert (source / "4_cat/link.png").is_symlink()  # the source is left as it was


def test_staging_folders_a_killed_process_left_are_removed(home: Home) -> None:
    stale, fresh = home.datasets / f"{STAGING_PREFIX}old", home.datasets / f"{STAGING_PREFIX}new"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "a.png").write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    DatasetService(home)
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to an upload in progress


def test_a_creation_waiting_over_an_hour_survives_another_services_sweep(
    home: Home, datasets: DatasetService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets_module, "STAGING_TOUCH_S", 0.05)
    release = threading.Event()
    for _ in range(datasets.tasks.workers):  # busy workers: the creation waits in the queue
        datasets.tasks.submit("earlier work", lambda: release.wait(30))
    ticket = datasets.start_create("queued", _files({"a.png": _png(), "a.txt": b"a cat"}), repeats=2)
    (staging,) = [home.datasets / name for name in _leftovers(home)]
    hours_ago = time.time() - 2 * 3600
    os.utime(staging, (hours_ago, hours_ago))  # as if it had waited two hours
    deadline = time.monotonic() + 10
    while staging.stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    DatasetService(home)  # another process, or a reloaded UI, sweeps staging folders at start
    assert staging.exists()
    release.set()
    while datasets.task(ticket).state == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    task = datasets.task(ticket)
    assert task.state == "done", task.error
    assert task.result["images"] == ["2_queued/a.png"]
    assert _leftovers(home) == []


def test_start_create_refuses_at_once_what_create_refuses(home: Home, datasets: DatasetService) -> None:
    (home.datasets / "dangling").symlink_to(home.root / "gone", target_is_directory=True)
    files = _files({"a.png": _png()})
    with pytest.raises(DatasetExists, match="'dangling' already exists"):
        datasets.start_create("dangling", files)
    with pytest.raises(TrainManagementError, match="no files were uploaded"):
        datasets.start_create("new", [])
    with pytest.raises(TrainManagementError, match="repeats"):
        datasets.start_create("new", files, repeats=0)
    with pytest.raises(TrainManagementError, match="subject"):
        datasets.start_create("new", files, subject="a/b")
    assert _leftovers(home) == []


def test_the_sweep_skips_staging_entries_it_cannot_judge(home: Home) -> None:
    hours_ago = time.time() - 2 * 3600
    outside = home.root / "elsewhere"
    outside.mkdir()
    link = home.datasets / f"{STAGING_PREFIX}link"
    link.symlink_to(outside, target_is_directory=True)
    os.utime(outside, (hours_ago, hours_ago))
    DatasetService(home)
    assert link.is_symlink() and outside.exists()  # a link is never followed into another folder


def _finished(datasets: DatasetService, ticket: str) -> Task:
    deadline = time.monotonic() + 30
    while datasets.task(ticket).state == "running":
        assert time.monotonic() < deadline, "the creation did not end"
        time.sleep(0.02)
    return datasets.task(ticket)


def _counting_copies(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Spy on the service's copies: the bytes each one wrote and the inode of the file it made."""
    seen: dict[str, list[int]] = {"bytes": [], "inodes": []}
    real = datasets_module.copy_file

    def copy_file(source: object, dest: Path, limit: int, label: str) -> int:
        written = real(source, dest, limit, label)  # type: ignore[arg-type]
        seen["bytes"].append(written)
        seen["inodes"].append(dest.stat().st_ino)
        return written

    monkeypatch.setattr(datasets_module, "copy_file", copy_file)
    return seen


def test_an_uploaded_stream_is_written_once_then_moved_into_the_dataset(
    home: Home, datasets: DatasetService, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies = _counting_copies(monkeypatch)
    uploads = {"a.png": _png(), "a.txt": b"a cat\n", "b.png": _png(colour=(1, 2, 3))}
    task = _finished(datasets, datasets.start_create("streams", _files(uploads), repeats=2))
    assert task.state == "done", task.error
    folder = home.datasets / "streams" / "2_streams"
    assert {name: (folder / name).read_bytes() for name in uploads} == uploads
    assert sorted(copies["bytes"]) == sorted(len(data) for data in uploads.values())  # each byte written once
    assert {(folder / name).stat().st_ino for name in uploads} <= set(copies["inodes"])  # the staged files
    assert _leftovers(home) == []


def test_an_upload_on_the_same_disk_gets_a_copy_of_its_own(
    home: Home, datasets: DatasetService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies = _counting_copies(monkeypatch)
    source = tmp_path / "upload.png"
    source.write_bytes(_png())
    task = _finished(datasets, datasets.start_create("linked", [IncomingFile("a.png", source)], repeats=1))
    assert task.state == "done", task.error
    placed = home.datasets / "linked" / "1_linked" / "a.png"
    assert placed.read_bytes() == source.read_bytes() and copies["bytes"] == [source.stat().st_size]
    assert placed.stat().st_ino != source.stat().st_ino  # the dataset does not share the caller's file
    assert source.stat().st_nlink == 1


def test_a_moved_upload_keeps_the_per_file_limit(home: Home) -> None:
    limited = DatasetService(home, limits=ArchiveLimits(max_entry_bytes=1_000, max_total_bytes=100_000))
    big = _png((400, 400)) + b"\0" * 2_000
    task = _finished(limited, limited.start_create("big", _files({"a.png": big, "a.txt": b"x"}), repeats=1))
    assert (
        task.state == "failed" and "upload a.png holds" in str(task.error) and "more than" in str(task.error)
    )
    assert list(home.datasets.iterdir()) == []
