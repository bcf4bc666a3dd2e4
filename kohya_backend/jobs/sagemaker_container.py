"""The SageMaker container's side: `python -m kohya_backend sagemaker train` on SageMaker's `/opt/ml` contract.

It reads the config channel's config.toml, applies the hyperparameters (strings, coerced by the config schema like
any config value), points the paths at the channels, and trains with the state in `/opt/ml/checkpoints` (synced to
S3 by SageMaker): when a state is there (a managed spot restart, or a Resume), training continues from it. Every
trainer event is printed on stdout as one `@train-management-event {...}` line for the host to read back from
CloudWatch Logs. On success the LoRA, its epochs, samples and sidecars (<name>.json, <name>.preview.png) go to
`/opt/ml/model`; SIGTERM (StopTrainingJob, a spot interruption, MaxRuntime) saves the state and exits cleanly;
any failure writes its reason to `/opt/ml/output/failure` and exits non-zero.

On a multi-GPU instance (ml.g5.12xlarge: 4 GPUs) the entrypoint trains data-parallel: it starts one process of
itself per GPU (the job's `gpus` hyperparameter, else SM_NUM_GPUS, else the GPUs it finds) through the launcher;
rank 0 does all of the above, the others only train.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import tomlkit
from tomlkit.exceptions import ParseError

from kohya_backend.errors import ConfigError, ConfigIssue, TrainManagementError
from kohya_backend.jobs.sagemaker_protocol import (
    CHANNEL_KEYS,
    CONFIG_CHANNEL,
    CONFIG_FILE,
    FOLDER_CHANNELS,
    HP_DATASET_NAME,
    HP_FM_TYPE,
    HP_GPUS,
    HP_JOB_ID,
    HP_MODEL_NAME,
    HP_OUTPUT_NAME,
    MAX_FAILURE_CHARS,
    PATH_FIELDS,
    RESERVED_HYPERPARAMETERS,
    RESULT_FILE,
    SDK_HYPERPARAMETER_PREFIX,
    ContainerPaths,
    event_line,
)
from kohya_backend.jobs.worker_protocol import INPUT_KEYS, OUTPUT_KEYS

EXIT_FAILED = 2
EXIT_CRASHED = 1
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_DEFAULT_OUTPUT_NAME = "last"  # kohya's name when a config sets none


class EventPrinter:
    """Prints trainer events as event lines on a stream, with paths made relative to the output folder."""

    def __init__(self, output_dir: Path, stream: TextIO) -> None:
        self.output_dir = output_dir
        self.stream = stream
        self._lock = threading.Lock()

    def relative(self, value: object) -> str | None:
        """`output/<relative>` for a path inside the output folder, None for any other value."""
        if not isinstance(value, str) or not value:
            return None
        try:
            rel = Path(value).resolve().relative_to(self.output_dir.resolve())
        except ValueError:
            return None
        return f"output/{rel.as_posix()}"

    def __call__(self, event: dict[str, Any]) -> None:
        shown = dict(event)
        for key in PATH_FIELDS:
            if key in shown:
                shown[key] = self.relative(shown[key])
        with self._lock, contextlib.suppress(OSError, ValueError):  # the log went away: keep training
            print(event_line(shown), file=self.stream, flush=True)


def read_hyperparameters(paths: ContainerPaths) -> dict[str, str]:
    """hyperparameters.json as strings ({} when SageMaker wrote none)."""
    try:
        data = json.loads(paths.hyperparameters.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TrainManagementError(
            f"{paths.hyperparameters} cannot be read: {exc}", "pass HyperParameters as a map of strings"
        ) from exc
    if not isinstance(data, dict):
        raise TrainManagementError(
            f"{paths.hyperparameters} is not a JSON object", "pass HyperParameters as a map of strings"
        )
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}


def _visible_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def channel_value(paths: ContainerPaths, channel: str) -> Path | None:
    """The folder (dataset-like channels) or the one file (model, weights, prompts) a channel holds; None when
    the channel is absent or empty; TrainManagementError when a file channel holds several files."""
    folder = paths.channel(channel)
    if not folder.is_dir():
        return None
    files = _visible_files(folder)
    if not files:
        return None
    if channel in FOLDER_CHANNELS:
        return folder
    if channel == "model":
        files = [f for f in files if f.suffix.lower() in _MODEL_SUFFIXES] or files
    if len(files) != 1:
        shown = ", ".join(f.relative_to(folder).as_posix() for f in files[:5])
        raise TrainManagementError(
            f"the {channel!r} channel holds {len(files)} files ({shown}{', ...' if len(files) > 5 else ''}); "
            "it must hold exactly one",
            f"point the {channel!r} channel's S3 URI at the one object (its full key), not at a folder",
        )
    return files[0]


def _issue(message: str, key: str, hint: str) -> ConfigError:
    return ConfigError([ConfigIssue(message, key=key, hint=hint)])


def build_config(paths: ContainerPaths, hyper: dict[str, str]) -> tuple[str, str]:
    """(config TOML for the trainer, output name): the config channel's config.toml with the hyperparameters
    applied and every path set from the channels; output_dir is set by the trainer's job folder."""
    source_path = paths.channel(CONFIG_CHANNEL) / CONFIG_FILE
    try:
        source = source_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainManagementError(
            f"the {CONFIG_CHANNEL!r} channel holds no {CONFIG_FILE}",
            f"add a channel named {CONFIG_CHANNEL!r} whose S3 prefix holds {CONFIG_FILE} (config_params)",
        ) from None
    try:
        doc = tomlkit.parse(source)
    except ParseError as exc:
        raise ConfigError(
            [ConfigIssue(f"{CONFIG_FILE} is not valid TOML: {exc}", line=exc.line, column=exc.col)]
        ) from exc
    for key in OUTPUT_KEYS:
        doc.pop(key, None)
    for key, value in hyper.items():
        if key in RESERVED_HYPERPARAMETERS or key.startswith(SDK_HYPERPARAMETER_PREFIX):
            continue
        if key in INPUT_KEYS or key in OUTPUT_KEYS:
            raise _issue(
                f"is a path and came as a hyperparameter ({value[:100]!r})",
                key,
                "files come through channels (model, dataset, reg, weights, prompts, tokenizer), not hyperparameters",
            )
        doc[key] = value  # a string: the schema coerces it like any config value ("10", "true", "64,64")
    for channel, key in CHANNEL_KEYS.items():
        found = channel_value(paths, channel)
        if found is not None:
            doc[key] = found.as_posix()
        elif channel in ("model", "dataset"):
            raise TrainManagementError(
                f"the {channel!r} channel is missing or empty",
                f"add a channel named {channel!r} with the {'checkpoint' if channel == 'model' else 'dataset'}",
            )
        elif key == "tokenizer_cache_dir":
            doc.pop(key, None)  # the container finds a tokenizer of its own, offline
        elif key in doc:
            raise _issue(
                f"is set ({str(doc[key])[:100]!r}) but the training job has no {channel!r} channel",
                key,
                f"add a channel named {channel!r} holding it, or leave {key} out",
            )
    output_name = str(doc.get(HP_OUTPUT_NAME) or _DEFAULT_OUTPUT_NAME)
    doc[HP_OUTPUT_NAME] = output_name
    return tomlkit.dumps(doc), output_name


def _force_save_state(config: str) -> tuple[str, bool]:
    """The config with save_state on (SIGTERM must leave a state to resume from); True when it was off."""
    doc = tomlkit.parse(config)
    was_off = "save_state" in doc and str(doc["save_state"]).strip().lower() in ("false", "0")
    doc["save_state"] = True
    return tomlkit.dumps(doc), was_off


def _copy_outputs(output_dir: Path, model_dir: Path, output_name: str) -> Path | None:
    """Copy the LoRAs and samples (never the training states) into /opt/ml/model; the final LoRA's copy."""
    model_dir.mkdir(parents=True, exist_ok=True)
    if not output_dir.is_dir():
        return None
    for path in _visible_files(output_dir):
        rel = path.relative_to(output_dir)
        if rel.parts[0].endswith("-state"):
            continue
        target = model_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    final = model_dir / f"{output_name}.safetensors"
    return final if final.is_file() else None


def _write_sidecars(
    final: Path, model_dir: Path, config: str, fm_type: str, hyper: dict[str, str], paths: ContainerPaths
) -> None:
    """<name>.json (the WebUI's sidecar) and <name>.preview.png (the newest sample) beside the final LoRA."""
    from kohya_backend.jobs.delivery import lora_sidecar, read_lora_metadata

    metadata = read_lora_metadata(final)
    model = channel_value(paths, "model")
    dataset = channel_value(paths, "dataset")
    side = lora_sidecar(
        metadata,
        fm_type=fm_type,
        model=hyper.get(HP_MODEL_NAME) or (model.name if model else "?"),
        dataset=hyper.get(HP_DATASET_NAME) or (dataset.name if dataset else "?"),
        job_id=hyper.get(HP_JOB_ID) or "(SageMaker)",
        config_toml=config,
    )
    stem = final.name[: -len(".safetensors")]
    (model_dir / f"{stem}.json").write_text(json.dumps(side, indent=2, ensure_ascii=False) + "\n", "utf-8")
    samples = sorted((model_dir / "sample").glob("*.png"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    if samples:
        shutil.copyfile(samples[-1], model_dir / f"{stem}.preview.png")


def _detected_fm_type(config: str) -> str:
    from kohya_backend.cli import _detect_fm_type

    return _detect_fm_type(tomlkit.parse(config).get("pretrained_model_name_or_path"))


def container_processes(hyper: dict[str, str], environ: Mapping[str, str], gpus_found: int) -> int:
    """How many training processes the container runs: the job's `gpus` hyperparameter, else SM_NUM_GPUS (the
    SageMaker toolkit's), else the GPUs found; never more than the GPUs found (at least 1: the CPU)."""
    present = max(1, gpus_found)
    asked = hyper.get(HP_GPUS) or environ.get("SM_NUM_GPUS") or str(present)
    try:
        count = int(asked)
    except ValueError:
        raise TrainManagementError(
            f"the {HP_GPUS} hyperparameter (or SM_NUM_GPUS) is {asked!r}, not a number of GPUs",
            "submit the job again from Train Management, which sets it",
        ) from None
    if count < 1 or (count > present and gpus_found > 0):
        raise TrainManagementError(
            f"the job asks for {count} GPU processes; this instance has {gpus_found} GPU(s)",
            "choose an instance type with that many GPUs, or ask for fewer GPUs per job",
        )
    return count


def container_command(root: Path) -> list[str]:
    """What each data-parallel process of the container runs: this entrypoint again, on the same /opt/ml tree."""
    return ["sagemaker", "train", "--root", str(root)]


def train(paths: ContainerPaths, *, stdout: TextIO) -> int:
    """Train from the /opt/ml tree (see the module doc); 0 when the LoRA is in /opt/ml/model or the run was
    stopped with its state saved. Errors propagate (run_container turns them into the failure file).
    One of several data-parallel processes other than rank 0 only trains."""
    from kohya_backend.cli import _lean_process, _optimizer_of, run_training
    from kohya_backend.train.process_env import process_info
    from kohya_backend.train.state import latest_state

    hyper = read_hyperparameters(paths)
    config, output_name = build_config(paths, hyper)
    config, was_off = _force_save_state(config)
    fm_type = hyper.get(HP_FM_TYPE) or _detected_fm_type(config)
    job_dir = paths.checkpoints
    output_dir = job_dir / "output"
    output_dir.mkdir(parents=True, exist_ok=True)
    state = latest_state(output_dir / f"{output_name}-state")
    if not process_info().is_main:
        _lean_process(_optimizer_of(config))
        code = run_training(config, fm_type, events_path=None, job_dir=job_dir, resume=state is not None)
        return 0 if code in (0, 3) else code
    log = sys.stderr
    ignored = sorted(k for k in hyper if k.startswith(SDK_HYPERPARAMETER_PREFIX))
    print(f"train-management: SageMaker training of {output_name!r} ({fm_type}) in {paths.root}", file=log)
    if ignored:
        print(f"train-management: ignoring the SDK's hyperparameters {', '.join(ignored)}", file=log)
    print(
        f"train-management: {'resuming from ' + str(state) if state else 'no saved state: starting at step 0'}",
        file=log,
        flush=True,
    )
    printer = EventPrinter(output_dir, stdout)
    if was_off:
        printer({"kind": "warning", "message": "save_state is on for SageMaker jobs (a stop or a spot "
                 "interruption must leave a state to resume from)"})  # fmt: skip
    _lean_process(_optimizer_of(config))
    code = run_training(
        config, fm_type, events_path=None, job_dir=job_dir, resume=state is not None, on_event=printer
    )
    final = _copy_outputs(output_dir, paths.model, output_name)
    result = json.loads((job_dir / RESULT_FILE).read_text(encoding="utf-8"))
    result["output"] = printer.relative(result.get("output"))
    (paths.model / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (paths.model / CONFIG_FILE).write_text(config, encoding="utf-8")
    if code == 0 and final is not None:
        _write_sidecars(final, paths.model, config, fm_type, hyper, paths)
    return 0 if code in (0, 3) else code


def write_failure(paths: ContainerPaths, text: str) -> None:
    """The failure file SageMaker turns into FailureReason (cut to its length limit)."""
    if len(text) > MAX_FAILURE_CHARS:
        text = text[: MAX_FAILURE_CHARS - 3] + "..."
    try:
        paths.failure.parent.mkdir(parents=True, exist_ok=True)
        paths.failure.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"train-management: cannot write {paths.failure}: {exc}", file=sys.stderr)


def _launch(paths: ContainerPaths, count: int) -> int:
    """Run the entrypoint in `count` data-parallel processes; when they fail without rank 0 saying why, the
    launcher's account (which process ended how) becomes the failure reason."""
    from kohya_backend.launcher import Launch, worker_command

    print(f"train-management: training data-parallel in {count} processes", file=sys.stderr, flush=True)
    launch = Launch(worker_command(container_command(paths.root)), count)
    code = launch.run()
    if code in (0, 3):
        return 0
    if not paths.failure.exists():
        write_failure(paths, launch.failure or f"the training processes ended with code {code}")
    return code


def run_container(
    root: Path,
    *,
    stdout: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    gpus_found: int | None = None,
) -> int:
    """The entrypoint: train (data-parallel in one process per GPU on a multi-GPU instance), and on any failure
    write the reason to output/failure and return non-zero."""
    from kohya_backend.train.process_env import process_info

    paths = ContainerPaths(Path(root))
    env = os.environ if environ is None else environ
    main = True  # whether this process reports a failure (rank 0, or the launcher)
    try:
        worker = process_info(env)
        main = worker.is_main
        if not worker.distributed:
            if gpus_found is None:
                from kohya_backend.jobs.devices import detect_gpus

                gpus_found = len(detect_gpus())
            count = container_processes(read_hyperparameters(paths), env, gpus_found)
            if count > 1:
                return _launch(paths, count)
        return train(paths, stdout=stdout or sys.stdout)
    except TrainManagementError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if main:
            write_failure(paths, str(exc))
        return EXIT_FAILED
    except BaseException as exc:  # a crash (or a second SIGTERM): SageMaker must still learn why
        traceback.print_exc()
        if main:
            write_failure(paths, f"the trainer crashed: {type(exc).__name__}: {exc}")
        return EXIT_CRASHED
