"""What the API, the CLI and the tab do with S3 (one place, STYLE.md item 14): the prefix's models and datasets
in the lists, checks of s3:// models and datasets at submission, and "Upload to S3" of a local dataset or model
as a background task with progress.

An s3:// value from the API, the tab or a remote client is read or written with this host's credentials, so it
must lie in the area of the app's prefix its key may name (`confine`, S3_AREAS): models from `prefix/models/`,
datasets from `prefix/datasets/`, LoRAs go to `prefix/loras/`. Nothing else the credentials reach (other buckets,
other prefixes, the SageMaker runner's own `prefix/sagemaker/`) can be named; the local CLI is not confined.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kohya_backend.errors import StorageError, TrainManagementError
from kohya_backend.service.home import Home, PathOutsideHome
from kohya_backend.service.tasks import TaskRunner
from kohya_backend.storage.catalog import DATASETS, LORAS, MODELS, S3Catalog, read_safetensors_keys
from kohya_backend.storage.settings import CloudSettings, S3Access, load_cloud_settings
from kohya_backend.storage.uri import OutsideRoot, S3Uri, confine_uri, parse_s3_uri

UPLOAD_KINDS = ("dataset", "model")
# Config key -> the areas below the app's S3 prefix its s3:// value may name (the local roots' counterparts).
S3_AREAS: dict[str, tuple[str, ...]] = {
    "pretrained_model_name_or_path": (MODELS,),
    "train_data_dir": (DATASETS,),
    "reg_data_dir": (DATASETS,),
    "network_weights": (MODELS, LORAS),
    "sample_prompts": (MODELS, DATASETS),
    "output_dir": (LORAS,),
}
_FOLDER_KEYS = frozenset({"train_data_dir", "reg_data_dir", "output_dir"})


class NoPrefix(TrainManagementError):
    """An action that needs the app's S3 prefix, while none is set."""

    http_status = 409


@dataclass
class _Upload:
    kind: str
    name: str
    uri: str
    done: int = 0
    total: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class S3Assets:
    """The S3 side of one home: its prefix (may be None), client and cache (made on first use), and uploads."""

    def __init__(self, home: Home, settings: CloudSettings, access: S3Access | None = None) -> None:
        self.home = home
        self.settings = settings
        self.access = access or S3Access.from_settings(settings)
        self.catalog: S3Catalog | None = None
        self.set_prefix(str(settings.prefix) if settings.prefix else None)
        self.tasks = TaskRunner(workers=1)
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_home(cls, home: Home, s3_uri: str | None = None, access: S3Access | None = None) -> S3Assets:
        """The S3 side of `home`: `s3_uri` (a flag or the WebUI setting) or HOME/cloud.toml names the prefix."""
        return cls(home, load_cloud_settings(home.root, s3_uri), access)

    @property
    def prefix(self) -> S3Uri | None:
        return self.catalog.prefix if self.catalog is not None else None

    def set_prefix(self, value: str | None) -> None:
        """Point the lists at another prefix (the WebUI setting changed); None or '' shows no S3 entries."""
        text = (value or "").strip()
        if not text:
            self.catalog = None
            return
        prefix = parse_s3_uri(text, what="the S3 prefix")
        if self.catalog is None or self.catalog.prefix != prefix:
            self.catalog = S3Catalog(prefix, self.access.client)

    def use_setting(self, value: str | None) -> None:
        """The WebUI's "S3 prefix" setting changed: use it, or HOME/cloud.toml's when it is cleared."""
        settings = load_cloud_settings(self.home.root, value or None)
        self.set_prefix(str(settings.prefix) if settings.prefix else None)

    def _need_prefix(self) -> S3Catalog:
        if self.catalog is None:
            raise NoPrefix(
                "no S3 prefix is set",
                "start with `serve --s3-uri s3://bucket/prefix`, set Settings > Train Management > S3 prefix, or "
                'write [s3] uri = "s3://bucket/prefix" into HOME/cloud.toml',
            )
        return self.catalog

    def confine(self, key: str, value: object, *, what: str | None = None) -> S3Uri:
        """`value`, an s3:// URI a client gave for config key `key`, parsed, if it lies in an area of the app's prefix
        that key may name (S3_AREAS; output_dir may be `prefix/loras/` itself); else PathOutsideHome saying where
        it may point (S3UriError for text that is no valid URI)."""
        label = what or key
        areas = S3_AREAS.get(key)
        if areas is None:
            raise PathOutsideHome(
                f"{label} cannot name an s3:// object", f"s3:// works for {', '.join(S3_AREAS)}"
            )
        if self.prefix is None:
            raise PathOutsideHome(
                f"{label} {str(value)[:200]!r} is on S3, but no S3 prefix is set: only objects below it may be named",
                "set the S3 prefix (`serve --s3-uri`, the WebUI setting or HOME/cloud.toml) and put the object below "
                "it, or name a local file",
            )
        roots = [self.prefix.child(f"{area}/") for area in areas]
        try:
            return confine_uri(
                value, roots, what=label, folder=key in _FOLDER_KEYS, root_itself=key == "output_dir"
            )
        except OutsideRoot as exc:
            raise PathOutsideHome(exc.message, exc.hint) from None

    # -- lists ----------------------------------------------------------------------------------------------

    def list_models(self) -> tuple[list[dict[str, Any]], str | None]:
        """(S3 model entries, why S3 could not be listed or None); no prefix: ([], None)."""
        return self._listed(lambda c: c.models())

    def list_datasets(self) -> tuple[list[dict[str, Any]], str | None]:
        """(S3 dataset entries, why S3 could not be listed or None); no prefix: ([], None)."""
        return self._listed(lambda c: c.datasets())

    def model_names(self) -> list[str]:
        """s3:// names for the Model dropdown ([] without a prefix, or while S3 cannot be listed)."""
        return [e["name"] for e in self._listed(lambda c: [{"name": n} for n in c.model_names()])[0]]

    def dataset_names(self) -> list[str]:
        """s3:// names for the Dataset dropdown ([] without a prefix, or while S3 cannot be listed)."""
        return [e["name"] for e in self._listed(lambda c: [{"name": n} for n in c.dataset_names()])[0]]

    def _listed(self, get: Any) -> tuple[list[dict[str, Any]], str | None]:
        if self.catalog is None:
            return [], None
        try:
            return list(get(self.catalog)), None
        except TrainManagementError as exc:
            return [], str(exc)

    def describe_model(self, name: str) -> dict[str, Any]:
        """An s3:// model's list entry (size, family or why it cannot be read)."""
        uri = parse_s3_uri(name, what="model")
        catalog = self.catalog if self.catalog is not None else S3Catalog(uri, self.access.client)
        return catalog.describe(uri)

    # -- submission checks ----------------------------------------------------------------------------------

    def check_model(self, name: str, fm_type: str) -> S3Uri:
        """An s3:// model exists, can be read, and (for .safetensors, from its header) is of `fm_type`."""
        from kohya_backend.models.detect import check_family_of_keys

        uri = parse_s3_uri(name, what="model")
        client = self.access.client()
        info = client.head(uri)
        if uri.key.lower().endswith(".safetensors"):
            check_family_of_keys(read_safetensors_keys(client, info), str(uri), fm_type)
        return uri

    def check_dataset(self, name: str) -> S3Uri:
        """An s3:// dataset prefix can be listed and holds files (downloaded in the job's preparing phase)."""
        uri = parse_s3_uri(name, what="dataset")
        if next(iter(self.access.client().list_objects(uri, page_size=1)), None) is None:
            raise StorageError(
                f"dataset {uri} holds no files (or the bucket has no such prefix)",
                "upload it first: aws s3 sync local_folder s3://bucket/prefix/datasets/<name>",
                code="NoSuchKey",
            )
        return uri

    # -- uploads --------------------------------------------------------------------------------------------

    def start_upload(self, kind: str, name: str) -> dict[str, Any]:
        """Upload a local dataset (to prefix/datasets/<name>/) or model (to prefix/models/<name>) in the
        background; the answer has the ticket that upload_status reports on."""
        catalog = self._need_prefix()
        if kind not in UPLOAD_KINDS:
            raise TrainManagementError(
                f"cannot upload a {kind!r}", f"upload one of: {', '.join(UPLOAD_KINDS)}"
            )
        if kind == "dataset":
            source: Path = self.home.dataset_path(name)
            target = catalog.prefix.child(f"{DATASETS}/{source.name}/")
        else:
            source = self.home.model_path(name)
            target = catalog.prefix.child(f"{MODELS}/{Path(name).as_posix().lstrip('/')}")
        record = _Upload(kind, name, str(target))
        ticket = self.tasks.submit(f"s3-upload-{kind}", lambda: self._upload(record, source, target))
        with self._lock:
            self._uploads[ticket] = record
        return self.upload_status(ticket)

    def _upload(self, record: _Upload, source: Path, target: S3Uri) -> dict[str, Any]:
        from kohya_backend.models.hashing import Sha256Cache
        from kohya_backend.storage.sync import upload_folder

        client = self.access.client()
        hashes = Sha256Cache()

        def progress(done: int, total: int) -> None:
            record.done, record.total = done, total

        try:
            if source.is_dir():
                stats = upload_folder(client, source, target, sha256=hashes.sha256, progress=progress)
                result = {"files": stats.files, "bytes": stats.total, "sent": stats.transferred}
            else:
                size = source.stat().st_size
                sent = client.upload_file(source, target, sha256=hashes.sha256(source), progress=progress)
                result = {"files": 1, "bytes": size, "sent": size if sent else 0}
        finally:
            hashes.save()
        if self.catalog is not None:
            self.catalog.forget()
        return {"uri": str(target), **result}

    def upload_status(self, ticket: str) -> dict[str, Any]:
        """An upload's state (running / done / failed), bytes done of total, and its result or error."""
        task = self.tasks.get(ticket)
        with self._lock:
            record = self._uploads.get(ticket)
        out: dict[str, Any] = {"ticket": ticket, "state": task.state}
        if record is not None:
            out.update(
                kind=record.kind, name=record.name, uri=record.uri, done=record.done, total=record.total
            )
        if task.result is not None:
            out["result"] = task.result
        if task.error is not None:
            out["error"] = {"message": task.error.message, "hint": task.error.hint}
        return out
