"""The command line as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

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
def demo(tmp_path_factory: pytest.TempPathFactory, make_demo_home: Callable[..., Path]) -> Path:
    """The demo config (4 steps) in a home of this module's own."""
    return make_demo_home(tmp_path_factory.mktemp("demo"), steps=4) / "demo-sd_1_5.toml"


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


def test_optimizer_args_comment_logging_and_restarts_take_effect_in_a_cli_training(
    demo: Path, tmp_path: Path
) -> None:
    """The issue's acceptance run: each of these keys changes what the trainer does or writes."""
    from safetensors import safe_open
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = dict(line.split(" = ", 1) for line in demo.read_text().splitlines())
    lines.update(
        output_dir=f'"{(tmp_path / "out").as_posix()}"',
        optimizer_args='["weight_decay=0.01", "betas=0.9,0.99", "eps=1e-8"]',
        training_comment='"made by the CLI test"',
        logging_dir=f'"{(tmp_path / "logs").as_posix()}"',
        lr_scheduler='"cosine_with_restarts"',
        lr_scheduler_num_cycles="2",
        max_train_steps="8",
        save_state_on_train_end="true",
    )
    config = tmp_path / "cfg.toml"
    config.write_text("".join(f"{key} = {value}\n" for key, value in lines.items()))
    out = cli("train", "--config", str(config))
    assert out.returncode == 0, out.stderr
    lora = tmp_path / "out" / "demo-sd_1_5.safetensors"
    with safe_open(str(lora), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_training_comment"] == "made by the CLI test"
    import torch

    [state] = (tmp_path / "out" / "demo-sd_1_5-state").glob("state-*")
    groups = torch.load(state / "optimizer.pt", weights_only=True)["param_groups"]
    assert all(g["betas"] == (0.9, 0.99) and g["weight_decay"] == 0.01 and g["eps"] == 1e-8 for g in groups)
    [run_dir] = (tmp_path / "logs").iterdir()
    accumulator = EventAccumulator(str(run_dir / "network_train"))
    accumulator.Reload()
    unet_lrs = [e.value for e in accumulator.Scalars("lr/unet")]
    assert len(unet_lrs) == 8 and len(accumulator.Scalars("loss/current")) == 8
    # two cosine cycles of 4 steps: the rate falls, restarts at full strength after step 4, falls again
    assert unet_lrs[2] < 0.5e-3 and unet_lrs[3] == pytest.approx(1e-3) and unet_lrs[6] < 0.5e-3


def test_a_setting_the_optimizer_rejects_fails_format_and_training_before_the_model_loads(
    demo: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(demo.read_text() + 'optimizer_args = ["betas=0.9"]\n')
    line = len(demo.read_text().splitlines()) + 1
    formatted = cli("config", "format", str(bad), "--fm-type", "sd_1_5")
    assert formatted.returncode == 2 and f"line {line}" in formatted.stderr
    assert "AdamW rejected its settings" in formatted.stderr
    trained = cli("train", "--config", str(bad))
    assert trained.returncode == 2 and "AdamW rejected its settings" in trained.stderr
    assert "loading" not in trained.stderr  # refused before the checkpoint was read


def test_resuming_a_job_without_its_own_state_names_the_configs_resume(
    tmp_path: Path, demo_config: str
) -> None:
    """A continued job's first Resume (it saved no state yet) starts from its config's `resume`, not from step 0:
    the warning says which (it used to say "starts from step 0")."""
    import tomlkit

    from kohya_backend.cli import run_training
    from kohya_backend.errors import ConfigError
    from kohya_backend.train.events import read_events

    folder = tmp_path / "job"
    folder.mkdir()
    doc = tomlkit.parse(demo_config)
    doc["resume"] = str(tmp_path / "old-job-state")  # gone: validation stops the run before any model loads
    with pytest.raises(ConfigError, match="old-job-state does not exist"):
        run_training(
            tomlkit.dumps(doc), "sd_1_5", events_path=folder / "events.jsonl", job_dir=folder, resume=True
        )
    warnings = [e["message"] for e in read_events(folder / "events.jsonl") if e["kind"] == "warning"]
    assert any("the config's resume" in w and "old-job-state" in w for w in warnings), warnings
    assert not any("step 0" in w for w in warnings)
