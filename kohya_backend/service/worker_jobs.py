"""The worker's side of remote jobs: check a submission, materialise its inputs from blobs, queue it, show it.

A submission names every input (model, dataset, tokenizer, ...) as relative paths plus sha256s of blobs already
uploaded. Each name and path is validated before it touches the disk; the files are hard-linked (or copied) from
the blob store into the worker's own home, never unpacked from archives, and the config is validated again here
exactly as a local submission is. Paths in what the worker answers are relative to the job folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from kohya_backend.errors import TrainManagementError
from kohya_backend.job_folder import OUTPUT_DIR, JobFolder
from kohya_backend.jobs.allocation import check_gpus_value
from kohya_backend.jobs.delivery import NO_LINK_ERRNOS
from kohya_backend.jobs.runner import LOG_NAME, RESULT_NAME, read_json
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job, JobNotFound
from kohya_backend.jobs.worker_protocol import (
    FOLDER_KEYS,
    INPUT_KEYS,
    LOCAL_ONLY_KEYS,
    MAX_INPUT_FILES,
    OUTPUT_KEYS,
    InvalidName,
    validate_file_name,
    validate_relpath,
    validate_sha256,
)
from kohya_backend.locks import file_lock
from kohya_backend.models.hashing import Sha256Cache
from kohya_backend.service.blobs import BlobStore
from kohya_backend.service.home import MODEL_SUFFIXES, PathOutsideHome
from kohya_backend.service.idempotency import BadKey, IdempotencyKeys, check_key
from kohya_backend.service.streams import wait_events
from kohya_backend.service.training import Submission, TrainingService

KEYS_DIR = "worker-keys"
MATERIALISE_LOCK = "materialise"  # HOME/materialise.lock
# Where inputs are materialised: models/by-sha256/<sha256>/<name> (a file), and <root>/<name>-<digest> (a folder).
BY_SHA256 = "by-sha256"
_DIGEST_CHARS = 16
MATERIALISED_FOLDER = re.compile(rf".+-[0-9a-f]{{{_DIGEST_CHARS}}}")
MAX_LOG_CHUNK = 1 << 20
MAX_WAIT_S = 30.0


class MissingBlobs(TrainManagementError):
    """A submission refers to blobs the worker does not hold (complete) yet."""

    http_status = 409

    def __init__(self, missing: list[str]) -> None:
        super().__init__(
            f"{len(missing)} input file(s) are not on the worker yet (first: {missing[0][:12]})",
            "upload them (PUT /blobs/{sha256}) and submit again",
        )
        self.missing = missing

    def details(self) -> dict[str, object]:
        return {"missing": self.missing}


@dataclass(frozen=True)
class InputFile:
    """One file of an input: where it goes (relative path) and which blob holds it."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Input:
    """A config key's input: one file, or a folder of files, under a validated name."""

    key: str
    name: str
    folder: bool
    files: tuple[InputFile, ...]

    def digest(self) -> str:
        """The sha256 of the sorted (path, sha256) list: same files, same digest, same materialised folder."""
        listing = sorted((f.path, f.sha256) for f in self.files)
        return hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()

    def folder_name(self) -> str:
        """<name>-<digest>: the folder it is materialised as (MATERIALISED_FOLDER matches it)."""
        return f"{self.name}-{self.digest()[:_DIGEST_CHARS]}"


def _bad(
    message: str, hint: str = "send the submission the way the Train Management client does"
) -> InvalidName:
    return InvalidName(message, hint)


def parse_inputs(raw: object) -> dict[str, Input]:
    """Validate the `inputs` of a submission: known keys, names, relative paths, sha256s, sizes, counts."""
    if not isinstance(raw, dict):
        raise _bad("inputs must be an object keyed by config key")
    unknown = sorted(set(raw) - set(INPUT_KEYS))
    if unknown:
        raise _bad(
            f"inputs has unknown keys: {', '.join(map(str, unknown))[:200]}", f"use: {', '.join(INPUT_KEYS)}"
        )
    for key in ("pretrained_model_name_or_path", "train_data_dir"):
        if key not in raw:
            raise _bad(f"inputs lacks {key}")
    return {key: _parse_input(key, value) for key, value in raw.items()}


def _parse_input(key: str, value: object) -> Input:
    if not isinstance(value, dict) or not isinstance(value.get("files"), list):
        raise _bad(f"inputs.{key} must be an object with a name and a list of files")
    folder = key in FOLDER_KEYS
    name = validate_file_name(value.get("name"), what=f"inputs.{key}.name")
    entries = value["files"]
    if not entries or len(entries) > MAX_INPUT_FILES or (not folder and len(entries) != 1):
        count = "1 file" if not folder else f"1 to {MAX_INPUT_FILES} files"
        raise _bad(f"inputs.{key} has {len(entries)} files; it needs {count}")
    files = []
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, dict):
            raise _bad(f"inputs.{key}.files holds a non-object")
        path = validate_relpath(entry.get("path"), what=f"inputs.{key} file")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"inputs.{key} file {path!r} has no valid size")
        if path.casefold() in seen:
            raise _bad(f"inputs.{key} lists {path!r} twice")
        seen.add(path.casefold())
        files.append(InputFile(path, validate_sha256(entry.get("sha256")), size))
    if not folder and files[0].path != name:
        raise _bad(f"inputs.{key}: the file {files[0].path!r} must be named like the input ({name!r})")
    if key == "pretrained_model_name_or_path" and Path(name).suffix.lower() not in MODEL_SUFFIXES:
        raise _bad(f"model {name!r} is not a checkpoint file", f"use one of: {', '.join(MODEL_SUFFIXES)}")
    return Input(key, name, folder, tuple(files))


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in NO_LINK_ERRNOS:
            raise
        shutil.copyfile(source, target)


def materialise_lock(home_root: Path) -> contextlib.AbstractContextManager[None]:
    """Held from materialising a submission's inputs until its job is queued, and by `worker gc` and blob deletion
    from their job scan until they removed what it found unused: an input reused meanwhile never goes."""
    return file_lock(Path(home_root) / MATERIALISE_LOCK)


def _relative(value: Any, folder: str) -> Any:
    """Paths under the job folder become relative to it; other absolute paths are withheld (None)."""
    if isinstance(value, dict):
        return {k: _relative(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, folder) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return value[len(folder) :] if value.startswith(folder) else None
    return value


class WorkerJobs:
    """Submits, shows, follows, cancels and resumes the jobs clients send to this worker."""

    def __init__(self, service: TrainingService, blobs: BlobStore) -> None:
        self.service = service
        self.store = service.store
        self.blobs = blobs
        self.keys = IdempotencyKeys(service.home.root / KEYS_DIR, service.store)
        self.keys.folder.mkdir(parents=True, exist_ok=True)
        self._hashes = Sha256Cache()  # outputs served for download, inputs the trainer would hash

    # -- submission ---------------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Queue a job (or return the one already queued under the same client key); (view, created)."""
        try:
            key = check_key(body.get("client_key"), "client_key")
        except BadKey as exc:
            raise _bad(exc.message) from None
        inputs = parse_inputs(body.get("inputs"))
        config = body.get("config_params")
        if not isinstance(config, dict):
            raise _bad("config_params must be an object")
        paths = sorted(set(config) & {*INPUT_KEYS, *OUTPUT_KEYS, *LOCAL_ONLY_KEYS})
        if paths:
            raise _bad(
                f"config_params names paths ({', '.join(paths)}); the worker sets them itself",
                "send files as inputs, not as paths",
            )
        missing = [f.sha256 for i in inputs.values() for f in i.files if self.blobs.path(f.sha256) is None]
        if missing:
            raise MissingBlobs(sorted(set(missing)))
        with self.keys.lock, materialise_lock(self.service.home.root):
            known = self.keys.known(key)
            if known is not None:
                return self.view(known), False
            job = self._queue(body, inputs, dict(config), key)
            self.keys.remember(key, job.id)
        return self.view(job.id), True

    def _queue(self, body: dict[str, Any], inputs: dict[str, Input], config: dict[str, Any], key: str) -> Job:
        home = self.service.home
        model = self._materialise_file(inputs["pretrained_model_name_or_path"])
        dataset = self._materialise_folder(inputs["train_data_dir"], home.datasets)
        for name, item in inputs.items():
            if name in ("pretrained_model_name_or_path", "train_data_dir"):
                continue
            root = home.datasets if name == "reg_data_dir" else home.models
            path = self._materialise_folder(item, root) if item.folder else self._materialise_file(item)
            config[name] = path.as_posix()
        output_name = body.get("output_name")
        if output_name is not None:
            config["output_name"] = output_name
        sub = Submission(
            model=model.relative_to(home.models).as_posix(),
            dataset=dataset.name,
            fm_type=str(body.get("fm_type")),
            config_params=config,
            gpus=check_gpus_value(body.get("gpus", 1)),
        )
        config_toml, name, params = self.service.prepare(sub)
        params.update(
            client_key=key, inputs={k: {"name": i.name, "files": len(i.files)} for k, i in inputs.items()}
        )
        return self.service.scheduler.submit(
            fm_type=sub.fm_type,
            model=sub.model,
            dataset=sub.dataset,
            instance_type="local",
            output_name=name,
            config_toml=config_toml,
            params=params,
        )

    def _materialise_file(self, item: Input) -> Path:
        """models/by-sha256/<sha256>/<name>, hard-linked from its blob (kept for later jobs).

        The blob's bytes were verified against its name, so the sha256 cache learns it: the trainer here never
        reads a 2-7 GB checkpoint just to hash it.
        """
        entry = item.files[0]
        target = self.service.home.models / BY_SHA256 / entry.sha256 / item.name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{secrets.token_hex(6)}.tmp")
            _link_or_copy(self._blob(entry), tmp)
            os.replace(tmp, target)
        else:
            os.utime(target.parent)  # used again now: `worker gc` keeps recently used inputs
        if self._hashes.get(target) != entry.sha256:
            self._hashes.remember(target, entry.sha256)
            self._hashes.save()
        return target

    def _materialise_folder(self, item: Input, root: Path) -> Path:
        """ROOT/<name>-<digest> with every file linked from its blob; built aside, then renamed into place."""
        target = root / item.folder_name()
        if target.is_dir():
            os.utime(target)  # used again now: `worker gc` keeps recently used inputs
            return target
        tmp = root / f".tmp-{secrets.token_hex(6)}"
        try:
            for entry in item.files:
                path = tmp / entry.path
                path.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(self._blob(entry), path)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # another job built it first otherwise
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _blob(self, entry: InputFile) -> Path:
        path = self.blobs.path(entry.sha256)
        if path is None:
            raise MissingBlobs([entry.sha256])
        if path.stat().st_size != entry.size:
            raise _bad(f"blob {entry.sha256[:12]} has {path.stat().st_size} bytes, not {entry.size}")
        return path

    # -- views --------------------------------------------------------------------------------------------

    def view(self, job_id: str) -> dict[str, Any]:
        """The job's state for its client: status, reason, progress, result and the finished output."""
        job = self.store.get(job_id)
        folder = f"{job.folder}/"
        out: dict[str, Any] = {
            "id": job.id,
            "status": job.status.value,
            "reason": job.reason,
            "created_at": job.created_at,
            "updated_at": job.updated_at,
            "output_name": job.output_name,
            "progress": _relative(job.progress, folder),
            "result": _relative(read_json(job.folder / RESULT_NAME), folder),
            "output": None,
        }
        final = JobFolder(job.folder).lora(job.output_name)
        if job.status is JobStatus.COMPLETED and final.is_file():
            out["output"] = {"path": final.relative_to(job.folder).as_posix(), **self._file_info(final)}
        return out

    def _file_info(self, path: Path) -> dict[str, Any]:
        digest = self._hashes.sha256(path)
        self._hashes.save()  # nothing to write when it was known
        return {"size": path.stat().st_size, "sha256": digest}

    async def events(self, job_id: str, after: int, wait_s: float) -> dict[str, Any]:
        """Events after line `after`, waiting up to `wait_s` for new ones without holding a thread (read on from
        where the last poll stopped), paths relative to the job folder; `settled`: the job had settled before they
        were read, so no more will come."""
        if after < 0:
            raise _bad(f"after={after} is negative", "use the `next` of the previous answer")
        folder = (await run_in_threadpool(self.service.events_path, job_id)).parent  # 400/404 before waiting
        wait = min(max(wait_s, 0.0), MAX_WAIT_S)
        events, settled = await wait_events(self.service, job_id, after, wait)
        job = await run_in_threadpool(self.store.get, job_id)
        return {
            "events": _relative(events, f"{folder}/"),
            "next": after + len(events),
            "status": job.status.value,
            "settled": settled,
        }

    def log(self, job_id: str, offset: int, limit: int) -> tuple[bytes, int, str]:
        """Up to `limit` bytes of train.log from `offset`, the log's size and the job's status."""
        if offset < 0 or not 1 <= limit <= MAX_LOG_CHUNK:
            raise _bad(f"offset={offset}, limit={limit}", f"offset >= 0 and 1 <= limit <= {MAX_LOG_CHUNK}")
        job = self.store.get(job_id)
        path = job.folder / LOG_NAME
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                handle.seek(offset)
                data = handle.read(min(limit, max(0, size - offset)))
        except FileNotFoundError:
            data, size = b"", 0
        return data, size, job.status.value

    def output_file(self, job_id: str, relpath: str) -> tuple[Path, dict[str, Any]]:
        """A file the job wrote under its output/ folder (LoRAs, samples), with its size and sha256."""
        rel = validate_relpath(relpath, what="output file")
        if not rel.startswith(f"{OUTPUT_DIR}/"):
            raise _bad(f"{rel!r} is not under {OUTPUT_DIR}/", "ask for files the job's events name")
        job = self.store.get(job_id)
        missing = JobNotFound(f"job {job.id} has no output file {rel!r}", "ask for files its events name")
        try:
            path = self.service.home.resolve(
                str(job.folder / rel), [JobFolder(job.folder).output], what="output file"
            )
        except PathOutsideHome as exc:  # a link out of output/: answered without the worker's paths
            raise missing from exc
        if not path.is_file():
            raise missing
        with contextlib.suppress(OSError):
            return path, self._file_info(path)
        raise JobNotFound(f"job {job.id}: output file {rel!r} vanished", "ask again")
