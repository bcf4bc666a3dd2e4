"""Home folder layout and the path resolution that keeps client paths inside its roots."""

from __future__ import annotations

from pathlib import Path

import pytest

from kohya_backend.service.home import Home, NotInHome, PathOutsideHome


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


def test_layout_is_created(home: Home) -> None:
    for folder in (home.models, home.datasets, home.lora, home.jobs):
        assert folder.is_dir() and folder.parent == home.root
    assert home.db_path == home.root / "jobs.sqlite3"


def test_lora_dir_override(tmp_path: Path) -> None:
    home = Home(tmp_path / "h", lora_dir=tmp_path / "webui" / "Lora")
    assert home.lora == (tmp_path / "webui" / "Lora").resolve() and home.lora.is_dir()
    assert home.roots()["lora"] == home.lora


def test_names_resolve_inside_their_root(home: Home) -> None:
    (home.models / "sub").mkdir()
    (home.models / "sub" / "m.safetensors").write_bytes(b"x")
    assert home.model_path("sub/m.safetensors") == (home.models / "sub" / "m.safetensors").resolve()
    absolute = str(home.models / "sub" / "m.safetensors")
    assert home.model_path(absolute) == Path(absolute).resolve()
    (home.datasets / "cats").mkdir()
    assert home.dataset_path("cats") == (home.datasets / "cats").resolve()


@pytest.mark.parametrize("name", ["../jobs.sqlite3", "sub/../../x", "/etc/passwd", "", "a\x00b"])
def test_escapes_are_refused(home: Home, name: str) -> None:
    with pytest.raises(PathOutsideHome):
        home.resolve(name, [home.models], what="model")


def test_owner_links_in_the_models_and_datasets_roots_work_free_paths_may_not_leave(
    home: Home, tmp_path: Path
) -> None:
    outside = tmp_path / "drive" / "sd15.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    (home.models / "linked.safetensors").symlink_to(outside)  # a checkpoint the owner keeps on another drive
    assert [m["name"] for m in home.list_models()] == ["linked.safetensors"]
    assert home.model_path("linked.safetensors") == home.models / "linked.safetensors"
    (home.datasets / "shared").symlink_to(outside.parent, target_is_directory=True)
    assert home.dataset_path("shared") == home.datasets / "shared"
    # A free-form path (config_params through the API) still may not leave through a link.
    with pytest.raises(PathOutsideHome, match="outside"):
        home.resolve("linked.safetensors", [home.models], what="network_weights")
    with pytest.raises(PathOutsideHome, match=r"\.\."):
        home.model_path("../drive/sd15.safetensors")
    (home.models / "real.safetensors").write_bytes(b"x")
    (home.models / "alias.safetensors").symlink_to(home.models / "real.safetensors")
    assert home.resolve("alias.safetensors", [home.models], what="x").name == "real.safetensors"


def test_an_unreadable_checkpoint_is_listed_with_its_error(home: Home) -> None:
    (home.models / "broken.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    (home.models / "ok.safetensors").write_bytes(b"garbage")
    entries = {m["name"]: m for m in home.list_models()}
    assert entries["broken.ckpt"]["family"] is None and "broken.ckpt" in entries["broken.ckpt"]["error"]
    assert entries["ok.safetensors"]["error"]


def test_several_model_roots_list_each_name_once_relative_to_its_root(tmp_path: Path) -> None:
    first, second = tmp_path / "ckpt", tmp_path / "webui" / "Stable-diffusion"
    for folder, names in (
        (first, ["a.safetensors", "same.safetensors"]),
        (second, ["sub/b.ckpt", "same.safetensors"]),
    ):
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(folder.name.encode())
    home = Home(tmp_path / "home", models_dirs=[first, second])
    assert home.models == first.resolve() and home.model_roots == (first.resolve(), second.resolve())
    assert not (tmp_path / "home" / "models").exists()
    assert [m["name"] for m in home.list_models()] == ["a.safetensors", "same.safetensors", "sub/b.ckpt"]
    assert home.model_path("sub/b.ckpt") == second / "sub" / "b.ckpt"
    assert home.model_path("same.safetensors").read_bytes() == b"ckpt"  # the first root's file wins the name
    assert home.model_path(str(second / "sub" / "b.ckpt")) == second / "sub" / "b.ckpt"
    # Paths that config_params name are confined to every model root where the models root is allowed.
    assert (
        home.resolve(str(second / "same.safetensors"), [home.models], what="x") == second / "same.safetensors"
    )
    with pytest.raises(PathOutsideHome, match=r"\.\."):
        home.model_path("../webui/Stable-diffusion/sub/b.ckpt")
    with pytest.raises(NotInHome, match=str(second)) as missing:
        home.model_path("c.safetensors")
    assert "a.safetensors, same.safetensors, sub/b.ckpt" in str(missing.value)
    nested = Home(
        tmp_path / "home2", models_dirs=[second.parent, second]
    )  # a root inside another: files once
    assert [m["name"] for m in nested.list_models()] == [
        "Stable-diffusion/same.safetensors",
        "Stable-diffusion/sub/b.ckpt",
    ]


def test_names_need_no_reading_and_one_model_is_described_from_its_own_file(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kohya_backend.data.scan as scan
    import kohya_backend.models.keys as keys

    (home.models / "sub").mkdir()
    for name in ("a.ckpt", "sub/b.safetensors"):
        (home.models / name).write_bytes(b"not a checkpoint")
    for name in ("cats", "dogs", ".hidden"):
        (home.datasets / name).mkdir()
    read: list[str] = []
    real_read_keys = keys.read_keys
    monkeypatch.setattr(keys, "read_keys", lambda path: read.append(Path(path).name) or real_read_keys(path))
    monkeypatch.setattr(scan, "scan_dataset", lambda *a, **k: pytest.fail("a name listing scanned a dataset"))
    assert home.model_names() == ["a.ckpt", "sub/b.safetensors"] and home.dataset_names() == ["cats", "dogs"]
    assert read == []
    entry = home.describe_model("sub/b.safetensors")
    assert entry["name"] == "sub/b.safetensors" and entry["family"] is None and entry["error"]
    assert home.describe_model("sub/b.safetensors") == entry and read == ["b.safetensors"]  # cached
    assert [m["name"] for m in home.list_models()] == ["a.ckpt", "sub/b.safetensors"]
    assert read == ["b.safetensors", "a.ckpt"]  # the listing reuses the description
    with pytest.raises(NotInHome):
        home.describe_model("c.safetensors")


def test_other_root_is_outside(home: Home) -> None:
    (home.datasets / "cats").mkdir()
    with pytest.raises(PathOutsideHome):
        home.resolve(str(home.datasets / "cats"), [home.models], what="model")
    assert home.resolve(str(home.datasets / "cats"), [home.models, home.datasets], what="x").name == "cats"


def test_unknown_names_list_what_exists(home: Home) -> None:
    (home.models / "a.safetensors").write_bytes(b"x")
    (home.datasets / "dogs").mkdir()
    with pytest.raises(NotInHome) as model_error:
        home.model_path("b.safetensors")
    assert "a.safetensors" in str(model_error.value)
    with pytest.raises(NotInHome) as dataset_error:
        home.dataset_path("cats")
    assert "dogs" in str(dataset_error.value)
    with pytest.raises(NotInHome):
        home.model_path("dogs")


def test_listings_report_errors_per_entry(home: Home) -> None:
    (home.models / "bad.ckpt").write_bytes(b"nope")
    (home.models / "notes.txt").write_text("ignored")
    models = home.list_models()
    assert [m["name"] for m in models] == ["bad.ckpt"]
    assert models[0]["family"] is None and models[0]["error"]
    (home.datasets / "empty").mkdir()
    (home.datasets / ".hidden").mkdir()
    datasets = home.list_datasets()
    assert [d["name"] for d in datasets] == ["empty"]
    assert datasets[0]["summary"] is None and datasets[0]["error"]["message"]
