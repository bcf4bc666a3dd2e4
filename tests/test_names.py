"""Names Windows refuses are refused everywhere before anything is written: dataset and subject folders, files in
an upload or a zip, and the LoRA's output_name."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest

from kohya_backend.config.validate import validate_config
from kohya_backend.data.archive import ArchiveError, member_path
from kohya_backend.errors import ConfigError, TrainManagementError
from kohya_backend.jobs.store import JobStore
from kohya_backend.names import windows_name_problem
from kohya_backend.service.datasets import DatasetService, IncomingFile
from kohya_backend.service.home import Home


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("CON", "device name"),
        ("aux.png", "device name"),  # an extension does not make a device name safe
        ("Lpt1.txt", "device name"),
        ("COM¹", "device name"),
        ("nul .txt", "device name"),
        ("photo.", "ends with a dot or a space"),
        ("photo ", "ends with a dot or a space"),
        ("a:b", "(:)"),
        ('say "hi"', '(")'),
        ("why?", "(?)"),
        ("a|b<c>*", "(* < > |)"),
        ("tab\there", "(\\x09)"),
        ("back\\slash", "(\\)"),
        ("", "empty"),
        ("..", "'..'"),
    ],
)
def test_names_windows_refuses_are_named_with_the_reason(name: str, why: str) -> None:
    problem = windows_name_problem(name)
    assert problem is not None and why in problem


@pytest.mark.parametrize(
    "name", ["photo.png", "console.txt", "com10", "lpt", "auxiliary", ".hidden", "a b-c_d"]
)
def test_ordinary_names_pass(name: str) -> None:
    assert windows_name_problem(name) is None


def test_dataset_and_subject_names_windows_refuses_write_nothing(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    service = DatasetService(home, jobs=JobStore(home.root))
    for name, subject in (("CON", None), ("cats", "aux")):
        with pytest.raises(TrainManagementError, match="device name Windows reserves"):
            service.create(name, [IncomingFile("a.png", io.BytesIO(b"x"))], subject=subject)
    assert not home.datasets.exists() or list(home.datasets.iterdir()) == []


def test_upload_and_zip_entries_windows_refuses_refuse_the_upload(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match=re.escape("'nul.png' is NUL")):
        member_path("photos/nul.png")
    with pytest.raises(ArchiveError, match=re.escape("'photos.' ends with a dot")):
        member_path("photos./a.png")
    assert str(member_path("photos/a.png")) == "photos/a.png"
    home = Home(tmp_path / "home")
    service = DatasetService(home, jobs=JobStore(home.root))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("10_cats/a.png", b"x")
        archive.writestr("10_cats/COM1.png", b"x")
    buffer.seek(0)
    with pytest.raises(ArchiveError, match="COM1"):
        service.create("cats", [IncomingFile("cats.zip", buffer)])
    assert not home.datasets.exists() or [p.name for p in home.datasets.iterdir()] == []


@pytest.mark.parametrize("name", ["con", "LPT2", "com³", "lora."])
def test_an_output_name_windows_refuses_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config({"output_name": name}, "sd_1_5", require_paths=False)
    assert [issue.key for issue in err.value.issues] == ["output_name"]
