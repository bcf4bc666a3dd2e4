"""The command line as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kohya_backend.assets.demo import prepare_demo

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "kohya_backend", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("demo")
    return prepare_demo(home, fm_type="sd_1_5", steps=4)


def test_format_prints_canonical_toml_and_plan(demo: Path) -> None:
    out = cli("config", "format", str(demo), "--fm-type", "sd_1_5")
    assert out.returncode == 0, out.stderr
    assert "network_dim = 8" in out.stdout
    assert "# plan" in out.stdout and "10_demo" in out.stdout
    as_json = json.loads(cli("config", "format", str(demo), "--fm-type", "sd_1_5", "--json").stdout)
    assert as_json["ok"] and as_json["plan"]["steps_per_epoch"] == 40 and as_json["plan"]["total_steps"] == 4


def test_format_reports_errors_with_lines(demo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(demo.read_text() + "network_dimm = 4\nmax_grad_norm = -1\n")
    out = cli("config", "format", str(bad), "--fm-type", "sd_1_5")
    assert out.returncode == 2
    assert "network_dimm" in out.stderr and "network_dim" in out.stderr and "max_grad_norm" in out.stderr
    line = len(demo.read_text().splitlines()) + 1
    assert f"line {line}" in out.stderr and f"line {line + 1}" in out.stderr


def test_train_refuses_a_family_mismatch_before_loading(demo: Path) -> None:
    out = cli("train", "--config", str(demo), "--fm-type", "sd_xl")
    assert out.returncode == 2
    assert "sd_xl" in out.stderr and "sd_1_5" in out.stderr


def test_train_job_folder_writes_lora_events_and_result(demo: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "config.toml").write_text(demo.read_text())
    out = cli("train", "--job", str(job))
    assert out.returncode == 0, out.stderr
    result = json.loads((job / "result.json").read_text())
    assert result["status"] == "completed" and result["step"] == 4
    assert Path(result["output"]) == job / "output" / "demo-sd_1_5.safetensors"
    assert Path(result["output"]).exists()
    kinds = [json.loads(line)["kind"] for line in (job / "events.jsonl").read_text().splitlines()]
    assert kinds.count("step") == 4 and kinds[-1] == "done"


def test_train_job_reports_a_dataset_error_in_result(demo: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    empty = tmp_path / "empty_dataset"
    (empty / "demo").mkdir(parents=True)
    text = demo.read_text()
    start = text.index("train_data_dir")
    end = text.index("\n", start)
    (job / "config.toml").write_text(text[:start] + f'train_data_dir = "{empty.as_posix()}"' + text[end:])
    out = cli("train", "--job", str(job))
    assert out.returncode == 2
    result = json.loads((job / "result.json").read_text())
    assert result["status"] == "failed" and "<repeats>_<name>" in result["error"]["message"]


def test_demo_command_trains_and_its_output_has_no_library_noise(tmp_path: Path) -> None:
    out = cli("demo", "--home", str(tmp_path / "home"), "--steps", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("demo-sd_1_5.safetensors")
    assert (tmp_path / "home" / "output" / "demo-sd_1_5.safetensors").is_file()
    assert "gemm_4bit" not in out.stderr and "requires torchvision" not in out.stderr
