"""kohya's `dataset_config` TOML ([general], [[datasets]], [[datasets.subsets]]), read as sd-scripts' config_util
reads it: the keys it allows where it allows them, kohya's precedence (subset > dataset > general > the training
config > kohya's defaults), and its DreamBooth-style subsets (`image_dir` holds the images directly; repeats and
class tokens come from `num_repeats` and `class_tokens`, not from the folder's name).

The result is scanned into the trainer's DatasetScan: each subset keeps its own caption and augmentation options,
each dataset its own resolution, buckets and batch size.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import ParseError

from kohya_backend.config.keys import KeySpec, used
from kohya_backend.config.parse import ValueProblem, coerce_value, shown, toml_key_positions
from kohya_backend.config.schema import SCHEMA
from kohya_backend.data.scan import DatasetScan, Subset, _Collector, _raise_collected, _scan_subset
from kohya_backend.errors import ConfigError, ConfigIssue, DatasetError
from kohya_backend.families import family_for


@dataclass(frozen=True)
class SubsetOptions:
    """The settings of one subset that act on training (kohya's DreamBooth subset params, resolved)."""

    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False


@dataclass(frozen=True)
class DatasetParams:
    """The settings of one dataset: every subset in it shares its resolution, buckets and batch size."""

    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass
class SubsetSpec:
    """One [[datasets.subsets]] entry: its folder and its resolved options."""

    image_dir: Path
    options: SubsetOptions


@dataclass
class DatasetSpec:
    """One [[datasets]] entry."""

    params: DatasetParams
    subsets: list[SubsetSpec]


@dataclass
class DatasetConfig:
    """A checked dataset_config: its datasets, the warnings found, and the canonical TOML of what it says."""

    datasets: list[DatasetSpec]
    warnings: list[ConfigIssue] = field(default_factory=list)
    toml: str = ""


_SUBSET_EFFECT = used("training", "data/dataset_config.py: a dataset's or subset's own setting")


def _spec(name: str, kind: str, default: Any = None, **extra: Any) -> KeySpec:
    if name in SCHEMA:
        return SCHEMA[name]
    return KeySpec(name, kind, default, "dataset", "", _SUBSET_EFFECT, **extra)


# Where kohya's config_util allows each key (g = [general], d = [[datasets]], s = [[datasets.subsets]]).
_SUBSET_KEYS = {name: "gds" for name in (f.name for f in fields(SubsetOptions))} | {
    "num_repeats": "gds",
    "image_dir": "s",
    "is_reg": "s",
}
_DATASET_KEYS = (
    {"resolution": "gd", "batch_size": "gd"}
    | {name: "gd" for name in ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")}
    | {"bucket_no_upscale": "gd"}
)
# Keys kohya allows that change nothing at these values (anything else is not implemented here).
_INERT: dict[str, tuple[str, Any]] = {
    "caption_separator": ("gds", ","),
    "secondary_separator": ("gds", None),
    "enable_wildcard": ("gds", False),
    "token_warmup_min": ("gds", 1),
    "token_warmup_step": ("gds", 0),
    "face_crop_aug_range": ("gds", None),
    "custom_attributes": ("gds", None),
    "resize_interpolation": ("gds", None),
    "alpha_mask": ("s", False),
    "validation_split": ("gd", 0.0),
    "validation_seed": ("gd", None),
    "network_multiplier": ("gd", 1.0),
}
_NO_EFFECT = {"cache_info": "gds"}  # caches image sizes for kohya's loader; nothing to do here
_NOT_IMPLEMENTED = {
    "metadata_file": "fine-tuning subsets (metadata_file, kohya's in_json datasets) are not implemented; use "
    "DreamBooth-style subsets: image_dir with captions beside the images",
    "conditioning_data_dir": "conditioning images (masked loss, ControlNet) are not implemented; remove it",
}
_SPECS: dict[str, KeySpec] = {
    "num_repeats": _spec("num_repeats", "int", 1),
    "image_dir": _spec("image_dir", "path"),
    "is_reg": _spec("is_reg", "bool", False),
    "class_tokens": _spec("class_tokens", "str"),
    "batch_size": _spec("batch_size", "int", 1, minimum=1),
} | {name: SCHEMA[name] for name in list(_SUBSET_KEYS) + list(_DATASET_KEYS) if name in SCHEMA}
_PLACE_NAMES = {"g": "[general]", "d": "[[datasets]]", "s": "[[datasets.subsets]]"}
# Training-config keys read under another name in a dataset_config.
_FROM_TRAINING = {"batch_size": "train_batch_size"}


def is_dataset_config(values: Mapping[str, Any]) -> bool:
    """True for a kohya dataset_config: [[datasets]] tables, or a [general] table alone."""
    datasets = values.get("datasets")
    if isinstance(datasets, list) and datasets and all(isinstance(d, Mapping) for d in datasets):
        return True
    return set(values) <= {"general", "datasets"} and isinstance(values.get("general"), Mapping)


class _Reader:
    """Checks one dataset_config document and collects every issue with its line and column."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.where = {path: (line, col) for path, line, col in toml_key_positions(text, index_arrays=True)}
        self.issues: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = []

    def issue(
        self, path: tuple[str, ...], message: str, hint: str | None = None, *, warning: bool = False
    ) -> None:
        line, column = self.where.get(path, self.where.get(path[:2], (None, None)))
        found = ConfigIssue(
            f"{self.source}: {message}", key=path[-1] if path else None, line=line, column=column
        )
        found.hint = hint
        if warning:
            found.severity = "warning"
            self.warnings.append(found)
        else:
            self.issues.append(found)

    def locate(self, dataset: tuple[str, ...], key: str) -> tuple[str, ...]:
        """Where a dataset's value came from: the dataset's own key, else [general]'s, else the dataset."""
        for path in ((*dataset, key), ("general", key)):
            if path in self.where:
                return path
        return (*dataset, key)

    def table(self, path: tuple[str, ...], body: Mapping[str, Any], place: str) -> dict[str, Any]:
        """The keys of one table, checked and converted; unknown or misplaced keys become issues."""
        out: dict[str, Any] = {}
        for key, value in body.items():
            at = (*path, key)
            if key == "subsets" and place == "d":
                continue
            allowed = (
                (_SUBSET_KEYS | _DATASET_KEYS).get(key) or _NO_EFFECT.get(key) or _INERT.get(key, ("",))[0]
            )
            if key in _NOT_IMPLEMENTED:
                self.issue(at, _NOT_IMPLEMENTED[key])
            elif not allowed:
                self.unknown(at, key, place)
            elif place not in allowed:
                where = " or ".join(_PLACE_NAMES[p] for p in allowed)
                self.issue(at, f"{key} is not allowed in {_PLACE_NAMES[place]}", f"kohya reads it in {where}")
            elif key in _INERT:
                self.inert(at, key, value)
            elif key in _NO_EFFECT:
                self.issue(
                    at,
                    f"{key} has no effect here (it speeds up kohya's own loader)",
                    "remove it",
                    warning=True,
                )
            else:
                converted = self.convert(at, key, value)
                if converted is not None:
                    out[key] = converted
        return out

    def unknown(self, at: tuple[str, ...], key: str, place: str) -> None:
        if key in SCHEMA and key != "prior_loss_weight":
            hint = "it belongs in the training config, not the dataset_config"
        elif key == "prior_loss_weight":
            hint = "kohya reads prior_loss_weight from the training config only; set it there"
        else:
            known = list(_SUBSET_KEYS) + list(_DATASET_KEYS) + list(_INERT)
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "see kohya's dataset config guide for the keys"
        self.issue(at, f"kohya's dataset_config does not allow {key} in {_PLACE_NAMES[place]}", hint)

    def inert(self, at: tuple[str, ...], key: str, value: Any) -> None:
        default = _INERT[key][1]
        if value == default or value in (None, "", {}, []) or (key == "validation_seed"):
            if key == "validation_seed" or value != default:
                self.issue(at, f"{key} changes nothing here", "remove it", warning=True)
            return
        self.issue(
            at, f"kohya accepts {key} = {shown(value)} but this trainer does not implement it", "remove it"
        )

    def convert(self, at: tuple[str, ...], key: str, value: Any) -> Any:
        try:
            result = coerce_value(_SPECS[key], value)
        except ValueProblem as exc:
            self.issue(at, exc.message, exc.hint)
            return None
        if key == "num_repeats" and result is not None and result < 1:
            self.issue(
                at, f"num_repeats = {result}: kohya skips a subset with fewer than 1 repeat", warning=True
            )
        return result


def _resolve(cls: type, layers: list[Mapping[str, Any]], training: Mapping[str, Any]) -> Any:
    """kohya's fallback: the first layer (subset, dataset, general) that sets a key, then the training config."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        for layer in layers:
            if layer.get(f.name) is not None:
                values[f.name] = layer[f.name]
                break
        else:
            from_training = training.get(_FROM_TRAINING.get(f.name, f.name))
            if from_training is not None:
                values[f.name] = from_training
    if cls is SubsetOptions and values.get("keep_tokens_separator") is None:
        values.pop("keep_tokens_separator", None)
    if "resolution" in values:
        values["resolution"] = tuple(values["resolution"])
    return cls(**values)


def _check_buckets(
    reader: _Reader, at: tuple[str, ...], params: DatasetParams, fm_type: str
) -> DatasetParams:
    """kohya's bucket rules for one dataset: steps a multiple of 64 (32 on SDXL), min/max snapped to the steps."""
    if not params.enable_bucket:
        return params
    unit = family_for(fm_type).bucket_step
    step = params.bucket_reso_steps
    if step % unit:
        reader.issue(
            reader.locate(at, "bucket_reso_steps"),
            f"bucket_reso_steps = {step} is not a multiple of {unit} ({fm_type}); kohya refuses it too",
            f"use {unit * max(1, round(step / unit))}",
        )
        return params
    low = params.min_bucket_reso - params.min_bucket_reso % step
    high = params.max_bucket_reso + (step - params.max_bucket_reso % step) % step
    w, h = params.resolution
    if min(w, h) < low or max(w, h) > high:
        reader.issue(
            reader.locate(at, "resolution"),
            f"resolution {w}x{h} is outside the bucket range {low}..{high}",
            "change min_bucket_reso / max_bucket_reso or the resolution",
        )
    return replace(params, min_bucket_reso=low, max_bucket_reso=high)


def _canonical(
    general: Mapping[str, Any], datasets: list[tuple[dict[str, Any], list[dict[str, Any]]]]
) -> str:
    doc = tomlkit.document()
    if general:
        doc.add("general", _toml_table(general))
    array = tomlkit.aot()
    for dataset, subsets in datasets:
        table = _toml_table(dataset)
        subset_array = tomlkit.aot()
        for subset in subsets:
            subset_array.append(_toml_table(subset))
        table.add("subsets", subset_array)
        array.append(table)
    doc.add("datasets", array)
    return tomlkit.dumps(doc)


def _toml_table(values: Mapping[str, Any]) -> Any:
    table = tomlkit.table()
    for key, value in values.items():
        table.add(
            key, list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
        )
    return table


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        return dict(tomlkit.parse(text).unwrap())
    except ParseError as exc:
        raise ConfigError(
            [ConfigIssue(f"{source}: TOML syntax error: {exc}", line=exc.line, column=exc.col + 1)]
        ) from exc


def read_dataset_config(
    text: str,
    *,
    source: str,
    fm_type: str,
    training: Mapping[str, Any] | None = None,
    base_dir: Path | None = None,
) -> DatasetConfig:
    """Check a dataset_config TOML and resolve every subset and dataset against the training config's values
    (`training`, normalised as validation leaves them). Raises ConfigError listing every problem.

    Relative image_dir paths are kept relative to the working folder, as kohya does (`base_dir` None), or joined
    to `base_dir`.
    """
    data = _parse(text, source)
    training = dict(training or {})
    reader = _Reader(text, source)
    for key in data:
        if key not in ("general", "datasets"):
            reader.issue(
                (key,), f"{key} is not a dataset_config section", "use [general] and [[datasets]] only"
            )
    general = reader.table(("general",), data.get("general") or {}, "g")
    raw_datasets = data.get("datasets") or []
    if not isinstance(raw_datasets, list) or not raw_datasets:
        reader.issue(
            ("datasets",),
            "the dataset_config has no [[datasets]]",
            "add [[datasets]] with [[datasets.subsets]]",
        )
        raw_datasets = []
    datasets: list[DatasetSpec] = []
    written: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for d_index, raw_dataset in enumerate(raw_datasets):
        d_path = ("datasets", str(d_index))
        dataset = reader.table(d_path, raw_dataset, "d")
        subsets: list[SubsetSpec] = []
        written_subsets: list[dict[str, Any]] = []
        raw_subsets = raw_dataset.get("subsets") or []
        if not raw_subsets:
            reader.issue(
                d_path, f"dataset {d_index + 1} has no [[datasets.subsets]]", "add one with image_dir"
            )
        for s_index, raw_subset in enumerate(raw_subsets):
            s_path = (*d_path, "subsets", str(s_index))
            subset = reader.table(s_path, raw_subset, "s")
            written_subsets.append(subset)
            if "image_dir" not in subset:
                if "image_dir" not in raw_subset and "metadata_file" not in raw_subset:
                    reader.issue(
                        s_path, "image_dir is required in every [[datasets.subsets]]", "image_dir = 'path'"
                    )
                continue
            options = _resolve(SubsetOptions, [subset, dataset, general], training)
            image_dir = Path(subset["image_dir"])
            subsets.append(SubsetSpec(base_dir / image_dir if base_dir else image_dir, options))
        params = _resolve(DatasetParams, [dataset, general], training)
        params = _check_buckets(reader, d_path, params, fm_type)
        datasets.append(DatasetSpec(params, subsets))
        written.append((dataset, written_subsets))
    if reader.issues:
        raise ConfigError(reader.issues)
    return DatasetConfig(datasets, reader.warnings, _canonical(general, written))


def load_dataset_config(
    path: Path, *, fm_type: str, training: Mapping[str, Any] | None = None
) -> DatasetConfig:
    """read_dataset_config on a file; ConfigError (key dataset_config) when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(
            [
                ConfigIssue(
                    f"cannot read dataset_config {path}: {exc.strerror or exc}",
                    key="dataset_config",
                    hint="point dataset_config at a readable .toml file",
                )
            ]
        ) from exc
    return read_dataset_config(text, source=f"dataset_config {path}", fm_type=fm_type, training=training)


def scan_dataset_config(config: DatasetConfig, *, verify_images: bool = True) -> DatasetScan:
    """Scan every subset folder (images directly inside, as kohya's image_dir) into one DatasetScan.

    Subsets keep their dataset's index and their options; a subset kohya would skip (fewer than 1 repeat, the same
    folder twice in a dataset, no images) is skipped with a warning. DatasetError when nothing is left to train.
    """
    col = _Collector()
    subsets: list[Subset] = []
    for d_index, dataset in enumerate(config.datasets):
        seen: set[Path] = set()
        for spec in dataset.subsets:
            folder, options = spec.image_dir, spec.options
            if options.num_repeats < 1:
                col.warnings.append(
                    f"{folder}: skipped, num_repeats is {options.num_repeats} (kohya skips it too)"
                )
                continue
            if folder.resolve() in seen:
                col.warnings.append(
                    f"{folder}: listed twice in dataset {d_index + 1}; the first one is used, as in kohya"
                )
                continue
            seen.add(folder.resolve())
            subset = _scan_subset(
                folder,
                options.num_repeats,
                options.class_tokens or "",
                options.caption_extension,
                is_reg=options.is_reg,
                verify=verify_images,
                col=col,
            )
            subset.dataset_index = d_index
            subset.options = options
            subsets.append(subset)
    _raise_collected(col)
    empty = [s for s in subsets if not s.images]
    if empty:
        col.ignored.extend(s.path for s in empty)
        col.warnings.append(
            f"skipped {len(empty)} subset(s) with no images (kohya skips them too): "
            + ", ".join(str(s.path) for s in empty[:5])
        )
    kept = [s for s in subsets if s.images]
    if not any(not s.is_reg for s in kept):
        raise DatasetError(
            "the dataset_config has no training images: every subset is empty, skipped or a regularisation subset",
            "put images (and captions) directly into the image_dir of a subset without is_reg",
            files=[str(s.path) for s in subsets],
        )
    return DatasetScan(kept, col.warnings, col.ignored, datasets=[d.params for d in config.datasets])


def options_from_config(values: Mapping[str, Any]) -> SubsetOptions:
    """The subset options a folder-layout dataset trains with: the training config's own settings."""
    return _resolve(SubsetOptions, [], values)  # type: ignore[no-any-return]


def kohya_datasets_metadata(
    scan: DatasetScan, bucket_infos: list[dict[str, Any] | None]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """What kohya stores for a dataset_config run: `ss_datasets` (one entry per dataset with its subsets),
    `ss_tag_frequency` (per folder, the first dataset's when one folder serves several) and `ss_dataset_dirs`
    (training folders only; a name seen again gets " (2)", " (3)", ...)."""
    frequency = scan.tag_frequency()
    datasets: list[dict[str, Any]] = []
    tags: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for index, params in enumerate(scan.datasets):
        subsets = [s for s in scan.subsets if s.dataset_index == index]
        entries = []
        for subset in subsets:
            options = subset.options or SubsetOptions()
            entries.append(
                {
                    "img_count": len(subset.images),
                    "num_repeats": subset.repeats,
                    "color_aug": options.color_aug,
                    "flip_aug": options.flip_aug,
                    "random_crop": options.random_crop,
                    "shuffle_caption": options.shuffle_caption,
                    "keep_tokens": options.keep_tokens,
                    "keep_tokens_separator": options.keep_tokens_separator,
                    "secondary_separator": None,
                    "enable_wildcard": False,
                    "caption_prefix": options.caption_prefix,
                    "caption_suffix": options.caption_suffix,
                    "resize_interpolation": None,
                    "image_dir": subset.path.name,
                    "class_tokens": options.class_tokens,
                    "is_reg": subset.is_reg,
                }
            )
            tags.setdefault(subset.name, frequency.get(subset.name, {}))
            if not subset.is_reg:
                name, n = subset.name, 2
                while name in dirs:
                    name, n = f"{subset.name} ({n})", n + 1
                dirs[name] = {"n_repeats": subset.repeats, "img_count": len(subset.images)}
        datasets.append(
            {
                "is_dreambooth": True,
                "batch_size_per_device": params.batch_size,
                "num_train_images": sum(s.num_items for s in subsets if not s.is_reg),
                "num_reg_images": sum(s.num_items for s in subsets if s.is_reg),
                "resolution": list(params.resolution),
                "enable_bucket": params.enable_bucket,
                "min_bucket_reso": params.min_bucket_reso,
                "max_bucket_reso": params.max_bucket_reso,
                "tag_frequency": {s.name: frequency.get(s.name, {}) for s in subsets},
                "bucket_info": bucket_infos[index] if index < len(bucket_infos) else None,
                "resize_interpolation": None,
                "subsets": entries,
            }
        )
    return datasets, tags, dirs


def check_against_training_config(
    path: Path, *, fm_type: str, training: Mapping[str, Any]
) -> list[ConfigIssue]:
    """The issues (errors and warnings) of the dataset_config a training config names, reported at its
    dataset_config key (their text names the file's line), with the rules that join the two: cached latents
    cannot follow a subset's random_crop or color_aug, cached text encoder outputs a subset's changing captions."""
    try:
        found = load_dataset_config(path, fm_type=fm_type, training=training)
    except ConfigError as exc:
        return [_at_dataset_config(issue) for issue in exc.issues]
    out = [_at_dataset_config(issue) for issue in found.warnings]
    options = [subset.options for dataset in found.datasets for subset in dataset.subsets]
    if training.get("cache_latents"):
        for key in ("random_crop", "color_aug"):
            if any(getattr(o, key) for o in options) and not training.get(key):
                out.append(
                    ConfigIssue(
                        f"a subset sets {key}, which cannot be used with cached latents; kohya refuses it too",
                        key="dataset_config",
                        hint=f"set cache_latents = false, or remove {key} from the dataset_config",
                    )
                )
    changing = sorted(
        {
            k
            for o in options
            for k in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate")
            if getattr(o, k)
        }
    )
    if training.get("cache_text_encoder_outputs") and changing:
        out.append(
            ConfigIssue(
                "cached text encoder outputs cannot follow captions that change each epoch (a subset sets "
                f"{', '.join(changing)})",
                key="dataset_config",
                hint="turn those off in the dataset_config, or set cache_text_encoder_outputs = false",
            )
        )
    return out


def _at_dataset_config(issue: ConfigIssue) -> ConfigIssue:
    where = f"line {issue.line}: " if issue.line is not None else ""
    return ConfigIssue(
        f"{where}{issue.key + ': ' if issue.key else ''}{issue.message}",
        key="dataset_config",
        hint=issue.hint,
        severity=issue.severity,
    )
