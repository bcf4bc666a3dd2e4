"""What the REST API, the `jobs` CLI and the UI do with training jobs, in one place (STYLE.md item 14).

Submissions name a model and a dataset under the home folder; the service resolves them, checks that every path in
config_params stays inside the home's roots, sets the paths it owns, validates the config for the FM type, checks
the checkpoint's family, scans the dataset for the plan, and queues the job through Scheduler.submit.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import tomlkit

from kohya_backend.config.parse import parse_config
from kohya_backend.config.schema import SCHEMA
from kohya_backend.errors import ConfigError, ConfigIssue, TrainManagementError
from kohya_backend.job_folder import JobFolder
from kohya_backend.jobs.allocation import GPUS_PARAM, check_gpus_value, gpus_of
from kohya_backend.jobs.devices import detect_gpus, local_label, runs_fp16
from kohya_backend.jobs.runner import EVENTS_NAME, LOG_NAME, PlacingRunner
from kohya_backend.jobs.scheduler import Scheduler
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job, JobStore, StoreError
from kohya_backend.service.home import Home, PathOutsideHome
from kohya_backend.service.idempotency import IdempotencyKeys, check_key, fingerprint
from kohya_backend.service.s3_assets import S3Assets
from kohya_backend.storage.uri import is_s3_uri, parse_s3_uri

# Keys the server fills in from training_params (a client value must still stay inside the roots).
_SERVER_PATHS = ("pretrained_model_name_or_path", "train_data_dir", "output_dir")
log = logging.getLogger(__name__)
KEYS_DIR = "idempotency-keys"  # HOME/idempotency-keys: the Idempotency-Key headers of POST /trainings
KEYS_KEPT_S = 24 * 3600.0  # a deleted job's key is kept this long, then pruned at the next start
_NAME_TRIES = 5
_QUEUE_SCAN = 1000  # queued jobs numbered in the Trainings List (the store's largest page)
CONTINUED_DIR = "continued"  # HOME/jobs/continued/<name>-*/: the LoRA and state a continued job starts from
STALE_START_S = 3600.0  # such a folder no job names is removed once this old (younger: a Continue under way)
_STATE_NAME = re.compile(r"state-(\d{8,})")  # the trainer's saved states (train/state.py)


def job_defaults(values: MutableMapping[str, Any]) -> None:
    """What a job does unless its config says otherwise: save the small LoRA training state (at a cancel, at the
    end of each epoch and at the end), so that Cancel -> Resume continues exactly where it stopped."""
    values.setdefault("save_state", True)


class OutputNameTaken(TrainManagementError):
    """Another job already writes a LoRA with this output_name."""

    http_status = 409


@dataclass
class Submission:
    """A training request in the original AWS solution's shape, already split into its fields."""

    model: str
    dataset: str
    fm_type: str
    config_params: str | Mapping[str, Any]
    instance_type: str = "local"
    gpus: int = 1  # GPUs per job: >1 trains data-parallel in one process per GPU (jobs/allocation.py)


def job_summary(job: Job) -> dict[str, Any]:
    """The fields of a job that lists show (JSON-ready)."""
    return {
        "id": job.id,
        "status": job.status.value,
        "reason": job.reason,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "fm_type": job.fm_type,
        "model": job.model,
        "dataset": job.dataset,
        "instance_type": job.instance_type,
        "output_name": job.output_name,
        "progress": job.progress,
        "outputs": job.outputs,
        # A training whose trainer reported nothing for a while: since when, and its log's last lines.
        "stalled": (job.progress.get("stalled") or None) if job.status in JobStatus.active() else None,
    }


def _stamp() -> str:
    """The local date and time of an automatic output name (YYYYmmdd-HHMMSS)."""
    return time.strftime("%Y%m%d-%H%M%S")


def _given_name(sub: Submission) -> str | None:
    """The output_name config_params gives, if any (None: the service names the LoRA)."""
    try:
        name = parse_config(sub.config_params if sub.config_params != "" else {}).values.get("output_name")
    except ConfigError:
        return None
    return str(name) if name else None


def _config_doc(config_toml: str) -> tomlkit.TOMLDocument:
    """A job's config as an editable TOML document, without the keys the server fills in and without `resume`."""
    doc = tomlkit.parse(config_toml)
    for key in (*_SERVER_PATHS, "resume"):
        if key in doc:
            del doc[key]
    return doc


def _newest_state(states: Path) -> Path | None:
    """The saved state with the highest step in a job's `<name>-state` folder, or None (read without torch)."""
    found = [
        (int(m.group(1)), p)
        for p in (states.iterdir() if states.is_dir() else [])
        if (m := _STATE_NAME.fullmatch(p.name)) and (p / "train_state.json").is_file()
    ]
    return max(found)[1] if found else None


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    """A hard link to `source` at `target` (no bytes written; the file outlives the source's deletion), or a copy
    where the file system cannot link (another disk, no link support)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _config_issue(key: str, exc: TrainManagementError, positions: dict[str, tuple[int, int]]) -> ConfigIssue:
    line, column = positions.get(key, (None, None))
    return ConfigIssue(exc.message, key=key, line=line, column=column, hint=exc.hint)


class TrainingService:
    """Submits, lists, inspects, cancels, resumes and deletes jobs of one home folder.

    `restrict_paths` False (the local CLI, run by the machine's owner) lets config_params name any path or s3://
    object, as kohya's tools do; model and dataset are still names under the home folder (or any s3:// URI). With
    it, s3:// values must lie in the app's S3 prefix (S3Assets.confine).
    """

    def __init__(
        self, home: Home, scheduler: Scheduler, *, restrict_paths: bool = True, s3: S3Assets | None = None
    ) -> None:
        self.home = home
        self.scheduler = scheduler
        self.store: JobStore = scheduler.store
        self.restrict_paths = restrict_paths
        self.keys = IdempotencyKeys(home.root / KEYS_DIR, self.store)
        self._prune_keys()
        # Set by a host whose local trainer may be missing (the WebUI): why local training cannot run now, or None.
        self.local_problem: Callable[[], str | None] | None = None
        self.s3 = s3 if s3 is not None else S3Assets.for_home(home)

    def _prune_keys(self) -> None:
        """Drop the Idempotency-Keys of deleted jobs once they are a day old (a client retries within minutes),
        so HOME/idempotency-keys does not grow with every API submission ever made. Never fails a start."""
        try:
            self.keys.prune(time.time() - KEYS_KEPT_S)
        except (OSError, StoreError) as exc:
            log.warning("could not prune idempotency keys in %s: %s", self.keys.folder, exc)

    # -- models and datasets: the home's, plus the S3 prefix's (names are s3:// URIs) --------------------------

    def model_names(self) -> list[str]:
        """Model dropdown choices: the home's checkpoint names, then the S3 prefix's (no file is read)."""
        return self.home.model_names() + self.s3.model_names()

    def dataset_names(self) -> list[str]:
        """Dataset dropdown choices: the home's dataset folders, then the S3 prefix's."""
        return self.home.dataset_names() + self.s3.dataset_names()

    def describe_model(self, name: str) -> dict[str, Any]:
        """A model's list entry (size, family or why it cannot be read), local or s3://."""
        if is_s3_uri(name):
            return self.s3.describe_model(self._s3_value("pretrained_model_name_or_path", name, "model"))
        return self.home.describe_model(name)

    def _s3_value(self, key: str, value: object, what: str | None = None) -> str:
        """An s3:// value for config key `key`, parsed and, when paths are restricted, inside the app's S3 prefix."""
        if self.restrict_paths:
            return str(self.s3.confine(key, value, what=what))
        return str(parse_s3_uri(value, what=what or key))

    def _model_value(self, name: str) -> str:
        """The config value of a submitted model: its local path (NotInHome when missing), or its s3:// URI."""
        return (
            self._s3_value("pretrained_model_name_or_path", name, "model")
            if is_s3_uri(name)
            else self.home.model_path(name).as_posix()
        )

    def _check_model(self, value: str, fm_type: str) -> None:
        """The model is of `fm_type` (read from its keys; an s3:// one from its header, which also proves that
        the object exists and the credentials may read it)."""
        from kohya_backend.models.detect import check_family

        if is_s3_uri(value):
            self.s3.check_model(value, fm_type)
        else:
            check_family(Path(value), fm_type)

    def check_model_family(self, model: str, fm_type: str) -> None:
        """FamilyMismatchError (as a submission gets it) when model `model` is not of `fm_type`; NotInHome when
        there is no such model."""
        self._check_model(self._model_value(model), fm_type)

    def _dataset_value(self, name: str) -> str:
        if is_s3_uri(name):
            return str(self.s3.check_dataset(self._s3_value("train_data_dir", name, "dataset")))
        return self.home.dataset_path(name).as_posix()

    def _key_roots(self, key: str) -> list[Path]:
        home = self.home
        if key in ("pretrained_model_name_or_path", "tokenizer_cache_dir"):
            return [home.models]
        if key in ("train_data_dir", "reg_data_dir"):
            return [home.datasets]
        if key == "network_weights":
            return [home.lora, home.models, home.jobs]  # jobs/: a continued job's own copy, a job's epoch
        return [home.jobs, home.lora, home.models, home.datasets]

    def confine_paths(
        self, values: dict[str, Any], positions: dict[str, tuple[int, int]], *, rewrite_all: bool = False
    ) -> None:
        """Resolve every path-valued key inside the home's roots (in place); raise PathOutsideHome listing refusals.

        Keys the server sets itself keep their value unless `rewrite_all` (used by config format). s3:// values must
        lie in the app's S3 prefix (S3Assets.confine).
        """
        issues = []
        if values.get("dataset_config") not in (None, ""):
            # its image_dir entries name folders anywhere: a client may not point the server at them
            issues.append(
                _config_issue(
                    "dataset_config",
                    TrainManagementError(
                        "dataset_config is read by the command line trainer only (its image_dir paths cannot be "
                        "kept inside the home folder)",
                        "choose a dataset here instead (train_data_dir), or run `python -m kohya_backend train "
                        "--config ...` on the machine",
                    ),
                    positions,
                )
            )
        for key, spec in SCHEMA.items():
            value = values.get(key)
            if spec.kind != "path" or value is None or value == "" or key == "dataset_config":
                continue
            if is_s3_uri(value):
                try:
                    self.s3.confine(key, value)
                except TrainManagementError as exc:
                    issues.append(_config_issue(key, exc, positions))
                continue
            try:
                resolved = self.home.resolve(str(value), self._key_roots(key), what=key)
            except PathOutsideHome as exc:
                issues.append(_config_issue(key, exc, positions))
                continue
            if rewrite_all or key not in _SERVER_PATHS:
                values[key] = resolved.as_posix()
        if issues:
            raise PathOutsideHome(
                "config_params names paths outside the home folder (or the app's S3 prefix):\n"
                + "\n".join(f"  - {i.render()}" for i in issues),
                "use names inside the home's models/, datasets/ and lora/ folders, or s3:// objects below the S3 "
                "prefix's models/, datasets/ and loras/",
            )

    def prepare(self, sub: Submission) -> tuple[str, str, dict[str, Any]]:
        """Validate a submission: (canonical config TOML, output name, job params incl. the plan). Raises on errors.

        Without an output_name in config_params the LoRA is named after the dataset and the time, with `-2`, `-3`...
        when a job already has that name (two submissions in one second).
        """
        from kohya_backend.train.plan import format_with_plan

        model = self._model_value(sub.model)
        dataset = self._dataset_value(sub.dataset)
        parsed = parse_config(sub.config_params if sub.config_params != "" else {})
        if self.restrict_paths:
            self.confine_paths(parsed.values, parsed.positions)
        s3_output = parsed.values.get("output_dir") if is_s3_uri(parsed.values.get("output_dir")) else None
        parsed.values["pretrained_model_name_or_path"] = model
        parsed.values["train_data_dir"] = dataset
        parsed.values["output_dir"] = self.home.lora.as_posix()
        dataset_name = parse_s3_uri(dataset).name if is_s3_uri(dataset) else Path(dataset).name
        output_name = parsed.values.get("output_name") or self.free_output_name(f"{dataset_name}-{_stamp()}")
        parsed.values["output_name"] = output_name
        job_defaults(parsed.values)
        on_s3 = [k for k, v in parsed.values.items() if is_s3_uri(v)] + (["output_dir"] if s3_output else [])
        reads_s3 = getattr(self.scheduler.runner_for(sub.instance_type), "reads_s3", False)
        if on_s3 and sub.instance_type != "local" and (not reads_s3 or s3_output):
            raise TrainManagementError(
                f"{', '.join(on_s3)} on S3 train on this machine or on SageMaker, not on {sub.instance_type!r}",
                "choose Training Instance Type 'local' or a SageMaker one (an s3:// output_dir: 'local' only), or "
                "download the files and name local ones",
            )
        self._check_model(model, sub.fm_type)
        formatted = format_with_plan(
            parsed,
            sub.fm_type,
            cuda_available=self.instance_cuda(sub.instance_type),
            num_processes=check_gpus_value(
                sub.gpus
            ),  # the plan counts steps as the job's processes take them
        )
        self._check_instance(sub.instance_type, sub.fm_type, formatted, parsed.positions)
        if formatted["dataset_error"]:
            from kohya_backend.errors import DatasetError

            error = formatted["dataset_error"]
            raise DatasetError(error["message"], files=error["files"])
        params: dict[str, Any] = {"plan": formatted["plan"], "warnings": formatted["warnings"]}
        if sub.gpus > 1:
            params[GPUS_PARAM] = sub.gpus
        if s3_output:
            from kohya_backend.jobs.s3_jobs import OUTPUT_PARAM

            params[OUTPUT_PARAM] = str(parse_s3_uri(s3_output, what="output_dir"))
        return formatted["toml"], str(output_name), params

    def format_config(
        self,
        config_params: str | Mapping[str, Any],
        fm_type: str,
        *,
        model: str | None = None,
        dataset: str | None = None,
        instance_type: str = "local",
        gpus: int = 1,
    ) -> dict[str, Any]:
        """What Format config Params shows (tab, API): canonical TOML, warnings and, with a dataset, the plan (its
        steps as `gpus` data-parallel processes take them).

        Paths are confined like a submission's; the chosen model and dataset fill their keys, and the fp16 rule
        is judged for the machine the instance type trains on. The model's family is check_model_family's (the tab
        shows it beside the model; the API's format route checks it first, as a submission does).
        """
        from kohya_backend.train.plan import format_with_plan

        parsed = parse_config(config_params if config_params != "" else {})
        if self.restrict_paths:
            self.confine_paths(parsed.values, parsed.positions, rewrite_all=True)
        if model:
            parsed.values["pretrained_model_name_or_path"] = self._model_value(model)
        if dataset:
            parsed.values["train_data_dir"] = (
                self._s3_value("train_data_dir", dataset, "dataset")
                if is_s3_uri(dataset)
                else self.home.dataset_path(dataset).as_posix()
            )
        if model or dataset:
            parsed.values["output_dir"] = self.home.lora.as_posix()
        job_defaults(parsed.values)
        formatted = format_with_plan(
            parsed,
            fm_type,
            require_paths=False,
            cuda_available=self.instance_cuda(instance_type),
            num_processes=check_gpus_value(gpus),
        )
        self._check_instance(instance_type, fm_type, formatted, parsed.positions)
        return formatted

    def _check_instance(
        self,
        instance_type: str,
        fm_type: str,
        formatted: dict[str, Any],
        positions: dict[str, tuple[int, int]],
    ) -> None:
        """The rules of the machine the job trains on (a SageMaker type: bf16 support, GPU memory): errors raise
        ConfigError, warnings join the formatted config's."""
        check = getattr(self.scheduler.runner_for(instance_type), "check_config", None)
        if not callable(check):
            return
        import tomlkit

        issues: list[ConfigIssue] = check(instance_type, fm_type, tomlkit.parse(formatted["toml"]).unwrap())
        for issue in issues:
            if issue.key in positions:
                issue.line, issue.column = positions[issue.key]
        errors = [i for i in issues if i.severity == "error"]
        if errors:
            raise ConfigError(errors)
        formatted["warnings"].extend(i.to_dict() for i in issues)

    def instance_cuda(self, instance_type: str) -> bool:
        """Whether jobs of this instance type train on a CUDA GPU (fp16 needs one).

        Known for this machine and for a worker that reported its GPUs; a worker not heard from yet, or the pool,
        counts as a GPU machine, since the worker validates the config again before it trains.
        """
        entries = self.instance_types()
        entry = next((e for e in entries if e["name"] == instance_type), None)
        runner = self.scheduler.runner_for(instance_type)
        if entry is None and isinstance(runner, PlacingRunner):
            runner.check_instance_type(instance_type)  # says what is missing (a worker, SageMaker's settings)
        if entry is None:
            raise TrainManagementError(
                f"instance type {instance_type!r} is not available here",
                f"choose one of: {', '.join(e['name'] for e in entries)}",
            )
        return True if entry.get("cuda") is None else bool(entry["cuda"])

    def submit(self, sub: Submission) -> Job:
        """Validate and queue a job; OutputNameTaken when another job uses the output_name it gives. The job
        stores the model's and the dataset's canonical names, however the submission spelled them."""
        sub = replace(
            sub,
            model=sub.model if is_s3_uri(sub.model) else self.home.model_name(sub.model),
            dataset=sub.dataset if is_s3_uri(sub.dataset) else self.home.dataset_name(sub.dataset),
        )
        given = _given_name(sub) is not None
        for _ in range(_NAME_TRIES):
            config_toml, output_name, params = self.prepare(sub)
            try:
                if self.store.output_name_taken(output_name):
                    raise self._name_taken(output_name)
                return self.scheduler.submit(
                    fm_type=sub.fm_type,
                    model=sub.model,
                    dataset=sub.dataset,
                    instance_type=sub.instance_type,
                    output_name=output_name,
                    config_toml=config_toml,
                    params=params,
                )
            except ConfigError:
                raise
            except TrainManagementError:
                if not self.store.output_name_taken(output_name):
                    raise
                if given:  # the name it asked for is another job's (that job may have won a race for it)
                    raise self._name_taken(output_name) from None
                # An automatic name another submission took meanwhile: prepare again picks the next one.
        raise self._name_taken(output_name)

    def submit_once(self, sub: Submission, key: str | None) -> tuple[Job, bool]:
        """submit() under an idempotency key: the job that key queued before (and False), or a new one (True);
        KeyReused when the key queued a job for another submission."""
        if key is None:
            return self.submit(sub), True
        check_key(key, "the Idempotency-Key header")
        request = fingerprint(asdict(sub))
        known = self.keys.known(key, request)
        if known is None:
            with self.keys.lock:
                known = self.keys.known(key, request)
                if known is None:
                    job = self.submit(sub)
                    try:
                        self.keys.remember(key, job.id, request)
                    except OSError as exc:  # the job is queued: say which, so a retry does not queue it twice
                        raise StoreError(
                            f"job {job.id} is queued, but its Idempotency-Key could not be recorded in "
                            f"{self.keys.folder}: {exc.strerror or exc}",
                            f"do not send it again: job {job.id} is the one it queued; free space on that disk "
                            "or make the folder writable before using keys again",
                        ) from exc
                    return job, True
        return self.store.get(known), False

    @staticmethod
    def _name_taken(name: str) -> OutputNameTaken:
        return OutputNameTaken(
            f"output name {name!r} is already used by another job",
            "choose another output_name in config_params, or delete the old job",
        )

    def instance_types(self) -> list[dict[str, Any]]:
        """Where jobs can train: each runner with a label (the GPUs this machine found, or CPU), its devices and its
        state; this machine is `unavailable`, with the `problem` and what to do, when its trainer is missing."""
        devices = self.scheduler.devices
        label = local_label(devices, detect_gpus())
        items: list[dict[str, Any]] = []
        for name, runner in sorted(self.scheduler.runners.items()):
            listed = getattr(runner, "instance_types", None)
            if callable(listed):  # runners with machines of their own (remote workers) list those
                items.extend(listed())
            else:
                entry = {
                    "name": name,
                    "label": label if name == "local" else name,
                    "devices": sorted(devices),
                    "cuda": runs_fp16(devices),  # fp16 runs there (CUDA, ROCm or Apple's MPS)
                    "state": "ready",
                }
                problem = self.local_problem() if name == "local" and self.local_problem is not None else None
                if problem:
                    entry.update(label=f"{entry['label']}: unavailable", state="unavailable", problem=problem)
                items.append(entry)
        return items

    def list(self, *, status: list[str] | None = None, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """A page of jobs, newest first, optionally only those in the given states."""
        wanted = None
        if status:
            try:
                wanted = [JobStatus(s) for s in status]
            except ValueError:
                raise TrainManagementError(
                    f"unknown status in {status}", f"use any of: {', '.join(s.value for s in JobStatus)}"
                ) from None
        jobs, total = self.store.list(status=wanted, offset=offset, limit=limit)
        positions = self.queue_positions() if any(j.status is JobStatus.QUEUED for j in jobs) else {}
        summaries = [{**job_summary(j), "queue_position": positions.get(j.id)} for j in jobs]
        return {"jobs": summaries, "total": total, "offset": offset, "limit": limit}

    def queue_positions(self) -> dict[str, int]:
        """Each queued job's place in the queue (1 = next to start), in the order the scheduler starts them."""
        queued, _ = self.store.list(status=[JobStatus.QUEUED], limit=_QUEUE_SCAN, newest_first=False)
        return {job.id: index for index, job in enumerate(queued, start=1)}

    def show(self, job_id: str, *, log_lines: int = 20) -> dict[str, Any]:
        """One job in full: summary, plan, config, transitions and the last `log_lines` lines of its log."""
        from kohya_backend.jobs.progress import log_tail

        job = self.store.get(job_id)
        out = job_summary(job)
        out.update(
            plan=job.params.get("plan"),
            warnings=job.params.get("warnings") or [],
            config_toml=job.config_toml,
            folder=str(job.folder),
            log_tail=log_tail(job.folder, log_lines),
            transitions=[
                {
                    "from": t.from_status.value if t.from_status else None,
                    "to": t.to_status.value,
                    "at": t.at,
                    "reason": t.reason,
                }
                for t in self.store.transitions(job_id)
            ],
        )
        return out

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job (queued: at once; running: its trainer is stopped)."""
        return job_summary(self.scheduler.cancel(job_id))

    def resume(self, job_id: str) -> dict[str, Any]:
        """Queue an interrupted, failed or cancelled job again."""
        return job_summary(self.scheduler.resume(job_id))

    def delete(self, job_id: str, *, wait_remote: bool = False) -> str | None:
        """Delete a finished or interrupted job and its folder (delivered LoRAs stay). A job that ran on a worker
        is deleted there too (in the background, or before returning with `wait_remote`): a note says so."""
        job = self.store.get(job_id)
        delete_job = getattr(self.scheduler.runner_for(job.instance_type), "delete_job", None)
        if callable(delete_job):  # the remote runner: it records the copies before the job (and run.json) go
            note: str | None = delete_job(self.store, job, wait=wait_remote)
        else:
            self.store.delete(job_id)
            note = None
        # What it was continued from goes with it, unless another job names it too.
        self._prune_start_copies(named_by=job.config_toml)
        return note

    def free_output_name(self, base: str) -> str:
        """`base`, or `base-2`, `base-3`... : the first output name no job uses."""
        name, number = base, 1
        while self.store.output_name_taken(name):
            number += 1
            name = f"{base}-{number}"
        return name

    def duplicate(self, job_id: str) -> dict[str, Any]:
        """What the editor needs to submit a job like this one again: its FM type, model, dataset, instance type
        and config_params (without the paths the server fills in, with a free output name)."""
        job = self.store.get(job_id)
        doc = _config_doc(job.config_toml)
        doc["output_name"] = self.free_output_name(f"{job.output_name}-copy")
        return {
            "fm_type": job.fm_type,
            "model": job.model,
            "dataset": job.dataset,
            "instance_type": job.instance_type,
            "gpus": gpus_of(job.params),
            "config_params": tomlkit.dumps(doc),
        }

    def continue_training(self, job_id: str) -> Job:
        """Queue a new job that trains a completed job's LoRA further: from its LoRA (`network_weights`), and on
        this machine from its newest saved training state when it has one (optimizer and schedule carry on; the new
        job trains as long again). Refused when the job is not completed or its LoRA is no longer in the Lora folder.

        The LoRA and the state are linked (or copied) into a folder of the new job's own under jobs/continued/
        first, so deleting the old job, or its LoRA, never breaks the new one, now or at a later Resume.
        """
        job = self.store.get(job_id)
        if job.status is not JobStatus.COMPLETED:
            raise TrainManagementError(
                f"job {job_id} is {job.status.value}: only a completed job can be continued",
                "resume an interrupted, failed or cancelled job instead",
            )
        lora = Path(str((job.progress or {}).get("delivered") or ""))
        if not lora.name or not lora.is_file():
            raise TrainManagementError(
                f"job {job_id}'s LoRA is no longer in the Lora folder ({lora.name or 'never delivered'})",
                "put the LoRA back, or submit a new job with network_weights naming it",
            )
        doc = _config_doc(job.config_toml)
        doc["output_name"] = self.free_output_name(f"{job.output_name}-continued")
        state = (  # a worker's or SageMaker's state stays there
            _newest_state(JobFolder(job.folder).state_dir(job.output_name))
            if job.instance_type == "local"
            else None
        )
        self._prune_start_copies()
        start = self._stage_start(str(doc["output_name"]), lora, state)
        try:
            doc["network_weights"] = (start / lora.name).as_posix()
            if state is not None:
                doc["resume"] = (start / state.name).as_posix()  # its step is where the new run starts
                total = int(((job.params.get("plan") or {}).get("total_steps")) or 0)
                epochs = doc.get("max_train_epochs")
                if isinstance(epochs, int) and epochs > 0:
                    doc["max_train_epochs"] = 2 * epochs
                elif total > 0:
                    doc["max_train_steps"] = 2 * total
            return self.submit(
                Submission(
                    model=job.model,
                    dataset=job.dataset,
                    fm_type=job.fm_type,
                    config_params=tomlkit.dumps(doc),
                    instance_type=job.instance_type,
                    gpus=gpus_of(job.params),
                )
            )
        except BaseException:
            shutil.rmtree(start, ignore_errors=True)
            raise

    def _start_root(self) -> Path:
        """HOME/jobs/continued: the folders continued jobs start from."""
        return self.home.jobs / CONTINUED_DIR

    def _stage_start(self, name: str, lora: Path, state: Path | None) -> Path:
        """A new folder under jobs/continued/ holding the LoRA (and the state) a continued job starts from; hard
        links where the file system allows (no bytes written), copies otherwise."""
        root = self._start_root()
        try:
            root.mkdir(parents=True, exist_ok=True)
            start = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        except OSError as exc:
            raise StoreError(
                f"cannot make a folder for the continued job in {root}: {exc.strerror or exc}",
                "free space on that disk or make the folder writable, then press Continue training again",
            ) from exc
        try:
            _link_or_copy(lora, start / lora.name)
            if state is not None:
                shutil.copytree(state, start / state.name, copy_function=_link_or_copy)
        except OSError as exc:
            shutil.rmtree(start, ignore_errors=True)
            raise StoreError(
                f"cannot copy what the continued job starts from into {start}: {exc.strerror or exc}",
                "free space on that disk, then press Continue training again",
            ) from exc
        return start

    def _start_folders_in_use(self) -> set[str]:
        """The names of the jobs/continued/ folders that jobs (any state) still name in their config."""
        names: set[str] = set()
        marker = f"/{CONTINUED_DIR}/"
        for job in self.store.iter_jobs():
            for part in job.config_toml.split(marker)[1:]:
                names.add(part.split("/", 1)[0])
        return names

    def _prune_start_copies(self, *, named_by: str | None = None) -> None:
        """Remove the jobs/continued/ folders no job names any more: those `named_by` (a deleted job's config)
        names at once, the others once an hour old (a younger one may belong to a Continue under way). Never fails
        the action it follows: what it cannot judge now stays for the next time."""
        root = self._start_root()
        try:
            folders = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
            in_use = self._start_folders_in_use() if folders else set()
        except (OSError, StoreError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("could not tidy %s: %s", root, exc)
            return
        cutoff = time.time() - STALE_START_S
        for folder in folders:
            if folder.name in in_use:
                continue
            try:
                old = folder.stat().st_mtime < cutoff
            except OSError:
                continue
            if old or (named_by is not None and f"/{CONTINUED_DIR}/{folder.name}/" in named_by):
                shutil.rmtree(folder, ignore_errors=True)

    def epochs(self, job_id: str) -> builtins.list[int]:
        """The epochs whose LoRA the job saved and still has (for the epoch comparison and txt2img)."""
        from kohya_backend.jobs.delivery import saved_epochs

        return [*saved_epochs(self.store.get(job_id))]

    def lora_prompt(self, job_id: str, epoch: int | None = None, weight: float = 1.0) -> str:
        """`<lora:NAME:WEIGHT>` for a completed job's LoRA in the Lora folder (epoch None: the final one); a saved
        epoch is copied beside it first when it is not there yet, and the host's Lora list is refreshed."""
        from kohya_backend.jobs.delivery import deliver_epoch

        job = self.store.get(job_id)
        delivered = Path(str((job.progress or {}).get("delivered") or ""))
        if job.status is not JobStatus.COMPLETED or not delivered.name or not delivered.is_file():
            raise TrainManagementError(
                f"job {job_id} has no LoRA in the Lora folder ({job.status.value})",
                "wait until it is completed; a LoRA removed from the Lora folder must be put back",
            )
        path = delivered
        if epoch is not None:
            path = deliver_epoch(job, int(epoch), delivered.parent, delivered.stem)
            hook = self.scheduler.on_delivered
            if hook is not None:
                hook(job, [path])
        return f"<lora:{path.stem}:{float(weight):g}>"

    def log_path(self, job_id: str) -> Path:
        """The job's train.log (it may not exist yet)."""
        return self.store.get(job_id).folder / LOG_NAME

    def events_path(self, job_id: str) -> Path:
        """The job's events.jsonl (it may not exist yet)."""
        return self.store.get(job_id).folder / EVENTS_NAME

    def is_settled(self, job_id: str) -> bool:
        """True when no trainer works on the job and none will start by itself."""
        status = self.store.get(job_id).status
        return status.is_terminal or status is JobStatus.INTERRUPTED
