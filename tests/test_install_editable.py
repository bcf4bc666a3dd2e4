"""The editable install of this checkout gives a `train-management` command that works from any folder, as
tools/setup.sh makes it in .venv (here in a throwaway venv, offline: the build backend the dev environment has,
setuptools with its own bdist_wheel, is lent to the build through PYTHONPATH)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_the_console_script_runs_from_another_folder(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    backend = tmp_path / "backend"
    backend.mkdir()
    site = Path(setuptools.__file__).parents[1]
    for name in ("setuptools", "_distutils_hack", "pkg_resources"):
        if (site / name).exists():
            (backend / name).symlink_to(site / name)
    env = {**os.environ, "PYTHONPATH": str(backend), "PIP_NO_INDEX": "1"}
    install = [
        str(venv / "bin/python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-e",
        str(ROOT),
    ]
    subprocess.run(install, check=True, env=env, timeout=300, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    shown = subprocess.run(
        [str(venv / "bin/train-management"), "--help"], cwd=elsewhere, env=clean, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    assert shown.stdout.startswith("usage: train-management") and "serve" in shown.stdout
    located = subprocess.run(
        [str(venv / "bin/python"), "-c", "import kohya_backend; print(kohya_backend.__file__)"],
        cwd=elsewhere, env=clean, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert Path(located.stdout.strip()) == ROOT / "kohya_backend" / "__init__.py"  # editable: this checkout
    assert not list(ROOT.glob("*.egg-info"))  # nothing left in the checkout
