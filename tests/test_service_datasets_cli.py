"""`python -m kohya_backend datasets ...` as a subprocess: create, import, list, show, delete, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-m", "kohya_backend", "datasets", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def test_datasets_commands_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Image.new("RGB", (64, 48), (9, 9, 200)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("blue square")
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as archive:
        archive.write(tmp_path / "a.png", "3_thing/z.png")
        archive.writestr("3_thing/readme.md", "x")

    created = _cli("create", "--home", home, "--repeats", "5", "--subject", "sq", "sq",
                   tmp_path / "a.png", tmp_path / "a.txt", tmp_path / "more.zip", cwd=tmp_path)  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "dataset sq: 2 image(s)" in created.stdout
    assert "skipped more.zip/3_thing/readme.md: not an image or caption file" in created.stderr
    assert (home / "datasets/sq/5_sq/a.txt").read_text() == "blue square"

    source = tmp_path / "folder"
    (source / "2_cat").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(source / "2_cat/c.png")
    imported = _cli("import", "--home", home, source, "--preprocess", "512-crop", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    with Image.open(home / "datasets/folder/2_cat/c.png") as image:
        assert image.size == (512, 512)
    assert (source / "2_cat/c.png").exists()

    listed = _cli("list", "--home", home, cwd=tmp_path)
    assert listed.stdout.splitlines() == [
        "folder  1 image(s), 2 with repeats",
        "sq  2 image(s), 8 with repeats",
    ]
    shown = json.loads(_cli("show", "--home", home, "sq", "--json", cwd=tmp_path).stdout)
    assert {i["image"]: i["caption"] for i in shown["images"]} == {
        "3_thing/z.png": None,
        "5_sq/a.png": "blue square",
    }

    assert _cli("delete", "--home", home, "sq", "--image", "5_sq/a.png", cwd=tmp_path).returncode == 0
    assert not (home / "datasets/sq/5_sq/a.txt").exists()
    assert _cli("delete", "--home", home, "sq", cwd=tmp_path).returncode == 0
    assert not (home / "datasets/sq").exists()


def test_bad_input_exits_2_with_the_reason(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    bad = _cli("create", "--home", home, "--repeats", "0", "x", tmp_path / "a.png", cwd=tmp_path)
    assert bad.returncode == 2 and "repeats '0' is not a whole number" in bad.stderr
    missing = _cli("show", "--home", home, "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "dataset 'nope' does not exist" in missing.stderr
