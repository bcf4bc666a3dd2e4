"""The SageMaker container: its Dockerfile (parsed: Docker is not available here) and its entrypoint, run outside a
container on an /opt/ml tree (`--root`) built from the tiny demo model, as SageMaker would fill it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open
from sagemaker_support import DOCKERFILE, ROOT, entrypoint

from kohya_backend.assets.demo import prepare_demo
from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.runner import trainer_env
from kohya_backend.jobs.sagemaker_container import (
    EventPrinter,
    container_command,
    container_processes,
    run_container,
)
from kohya_backend.jobs.sagemaker_protocol import ContainerPaths, event_line, parse_event_line
from kohya_backend.launcher import worker_command

CONFIG = """\
pretrained_model_name_or_path = "/somewhere/else/model.safetensors"
output_dir = "/not/in/the/container"
caption_extension = ".txt"
resolution = "64,64"
enable_bucket = false
train_batch_size = 2
max_train_steps = 2
network_dim = 8
network_alpha = 4
optimizer_type = "AdamW"
learning_rate = 1e-3
lr_scheduler = "constant"
mixed_precision = "no"
save_precision = "fp16"
seed = 1
"""


def _opt_ml(tmp_path: Path, hyper: dict[str, str], config: str = CONFIG) -> Path:
    """An /opt/ml tree as SageMaker fills it: channels model, dataset, tokenizer and config; hyperparameters."""
    demo = tmp_path / "demo"
    prepare_demo(demo, fm_type="sd_1_5", steps=2)
    root = tmp_path / "opt-ml"
    data = root / "input" / "data"
    (data / "model").mkdir(parents=True)
    shutil.copy(demo / "models" / "demo-sd_1_5.safetensors", data / "model")
    shutil.copytree(demo / "datasets" / "demo", data / "dataset")
    shutil.copytree(demo / "models" / "tokenizer", data / "tokenizer")
    (data / "config").mkdir()
    (data / "config" / "config.toml").write_text(config, encoding="utf-8")
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyper), encoding="utf-8")
    return root


def _run(root: Path) -> subprocess.CompletedProcess[str]:
    """`docker run <image> train` without Docker: the Dockerfile's ENTRYPOINT plus `train` (and --root)."""
    return subprocess.run(
        [*entrypoint(), "train", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**trainer_env(None), "OMP_NUM_THREADS": "1"},
    )


def test_dockerfile_builds_on_the_pinned_torch_and_enters_the_sagemaker_command() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    torch_pin = re.search(r"^torch==(\S+)$", (ROOT / "requirements-trainer.txt").read_text(), re.M)
    assert torch_pin is not None
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["TORCH_VERSION"] == torch_pin.group(1)  # the base image is the torch the trainer pins
    assert re.fullmatch(
        r"pytorch/pytorch:\$\{TORCH_VERSION\}-cuda[\d.]+-cudnn\d+-runtime", args["BASE_IMAGE"]
    )
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    installs = re.findall(r"pip install ([^\\\n&]+)", text)
    assert installs == [
        "-r requirements-trainer.txt -r requirements-trainer-sdist.txt ",
        "--no-deps -r requirements-vocab.txt ",
    ]
    for name in ("requirements-trainer.txt", "requirements-trainer-sdist.txt", "requirements-vocab.txt"):
        for line in (ROOT / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert re.match(r"^[A-Za-z0-9_.\-]+==[\w.]+(; .*)?$", line), f"{name}: {line} is not pinned"
    assert "torch.__version__" in text  # the build stops when the base's torch differs or pip replaced it
    assert re.search(r"^COPY kohya_backend \./kohya_backend$", text, re.M)
    entry = re.findall(r"^ENTRYPOINT (.+)$", text, re.M)
    assert len(entry) == 1 and json.loads(entry[0]) == ["python", "-m", "kohya_backend", "sagemaker"]
    ignore = [
        line for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines() if line
    ]
    kept = {line for line in ignore if line.startswith("!")}
    assert "*" in ignore and kept == {
        "!requirements-trainer.txt",
        "!requirements-trainer-sdist.txt",
        "!requirements-vocab.txt",
        "!kohya_backend/",
    }


@pytest.mark.slow
def test_entrypoint_trains_the_demo_model_from_an_opt_ml_tree(tmp_path: Path) -> None:
    hyper = {
        "fm_type": "sd_1_5",
        "output_name": "hyper-lora",
        "max_train_steps": "3",  # strings, coerced by the config schema; they override config.toml
        "network_dim": "4",
        "sagemaker_program": "train.py",  # the SDK's own: ignored
        "job_id": "20261204-000000-abcdef",
    }
    root = _opt_ml(tmp_path, hyper)
    done = _run(root)
    assert done.returncode == 0, done.stderr[-3000:]
    paths = ContainerPaths(root)
    assert not paths.failure.exists()
    lora = paths.model / "hyper-lora.safetensors"
    with safe_open(str(lora), framework="np") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_steps"] == "3"
    assert metadata["ss_output_name"] == "hyper-lora"
    side = json.loads((paths.model / "hyper-lora.json").read_text())
    assert "job 20261204-000000-abcdef" in side["notes"] and side["sd version"] == "SD1"
    result = json.loads((paths.model / "result.json").read_text())
    assert result["status"] == "completed" and result["output"] == "output/hyper-lora.safetensors"
    assert "save_state = true" in (paths.model / "config.toml").read_text()
    assert not [p for p in paths.model.rglob("*") if "state" in p.name]  # states stay out of model.tar.gz
    assert list(
        (paths.checkpoints / "output" / "hyper-lora-state").glob("state-*")
    )  # synced to S3 by SageMaker
    events = [e for e in (parse_event_line(line) for line in done.stdout.splitlines()) if e is not None]
    steps = [e["step"] for e in events if e["kind"] == "step"]
    assert steps == [1, 2, 3]
    saved = [e for e in events if e["kind"] == "saved"]
    assert saved[-1]["path"] == "output/hyper-lora.safetensors" and saved[-1]["final"] is True
    assert "step 3/3" in done.stderr  # the human progress line, for the CloudWatch log


@pytest.mark.slow
def test_entrypoint_writes_failure_for_a_bad_config(tmp_path: Path) -> None:
    root = _opt_ml(tmp_path, {"fm_type": "sd_1_5", "learning_rat": "1e-3"})
    done = _run(root)
    assert done.returncode != 0
    failure = ContainerPaths(root).failure.read_text()
    assert "unknown key 'learning_rat'" in failure and "learning_rate" in failure
    assert not list((root / "model").glob("*.safetensors"))


def test_channels_and_hyperparameters_are_checked_before_training(tmp_path: Path) -> None:
    root = _opt_ml(tmp_path, {"fm_type": "sd_1_5"})
    paths = ContainerPaths(root)

    def failure() -> str:
        code = run_container(root)
        assert code == 2
        return paths.failure.read_text()

    config = paths.channel("config") / "config.toml"
    config.rename(config.with_name("other.toml"))
    assert "holds no config.toml" in failure()
    config.with_name("other.toml").rename(config)

    extra = paths.channel("model") / "second.safetensors"
    shutil.copy(next(paths.channel("model").iterdir()), extra)
    assert "'model' channel holds 2 files" in failure()
    extra.unlink()

    paths.hyperparameters.write_text(json.dumps({"train_data_dir": "/elsewhere"}))
    assert "train_data_dir" in failure() and "channels" in paths.failure.read_text()

    paths.hyperparameters.write_text(json.dumps({"fm_type": "sd_1_5"}))
    config.write_text(CONFIG + 'sample_prompts = "/prompts.txt"\n')
    assert "no 'prompts' channel" in failure()

    shutil.rmtree(paths.channel("dataset"))
    config.write_text(CONFIG)
    assert "'dataset' channel is missing or empty" in failure()


def test_event_lines_carry_events_with_paths_relative_to_the_output(tmp_path: Path) -> None:
    import io

    stream = io.StringIO()
    printer = EventPrinter(tmp_path / "checkpoints" / "output", stream)
    printer({"kind": "saved", "path": str(tmp_path / "checkpoints" / "output" / "a.safetensors"), "step": 3})
    printer({"kind": "sample", "path": str(tmp_path / "elsewhere.png")})
    printer({"kind": "step", "step": 1, "loss": 0.5})
    lines = stream.getvalue().splitlines()
    assert [parse_event_line(line) for line in lines] == [
        {"kind": "saved", "path": "output/a.safetensors", "step": 3},
        {"kind": "sample", "path": None},
        {"kind": "step", "step": 1, "loss": 0.5},
    ]
    assert parse_event_line("step 3/3 epoch 1 loss 0.5") is None
    assert parse_event_line(event_line({"kind": "x"})[:-3]) is None  # a cut line is not an event
    assert parse_event_line(event_line({"no": "kind"})) is None


def test_a_multi_gpu_instance_runs_one_process_per_gpu() -> None:
    """ml.g5.12xlarge has 4 GPUs: the job's gpus hyperparameter decides, else SM_NUM_GPUS (the SageMaker toolkit's),
    else every GPU the container finds; each process runs this same entrypoint on the same /opt/ml tree."""
    assert container_processes({"gpus": "4"}, {}, 4) == 4
    assert container_processes({"gpus": "2"}, {"SM_NUM_GPUS": "4"}, 4) == 2  # the job asked for 2 of the 4
    assert container_processes({}, {"SM_NUM_GPUS": "4"}, 4) == 4
    assert container_processes({}, {}, 4) == 4 and container_processes({}, {}, 0) == 1  # no GPU: one process
    assert container_processes({"gpus": "1"}, {"SM_NUM_GPUS": "4"}, 4) == 1
    with pytest.raises(TrainManagementError, match="asks for 8 GPU processes; this instance has 4"):
        container_processes({"gpus": "8"}, {}, 4)
    with pytest.raises(TrainManagementError, match="'four', not a number of GPUs"):
        container_processes({}, {"SM_NUM_GPUS": "four"}, 4)
    command = worker_command(container_command(Path("/opt/ml")))
    assert command[1:] == ["-m", "kohya_backend", "sagemaker", "train", "--root", "/opt/ml"]
    assert Path(command[0]).name.startswith("python")


def test_the_entrypoint_refuses_more_gpu_processes_than_the_instance_has(tmp_path: Path) -> None:
    root = _opt_ml(tmp_path, {"fm_type": "sd_1_5", "gpus": "4"})
    assert run_container(root, environ={}, gpus_found=2) == 2
    failure = ContainerPaths(root).failure.read_text()
    assert "asks for 4 GPU processes; this instance has 2 GPU(s)" in failure
    assert not (root / "model").exists() or not list((root / "model").iterdir())
