"""Canonical config_params: the stable, grouped TOML that "Format config Params" writes back, and the config
reference document, both derived from the schema."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kohya_backend.config.parse import ParsedConfig
from kohya_backend.config.schema import (
    ALIASES,
    FM_TYPES,
    GROUPS,
    NETWORK_ARGS,
    OPTIMIZERS,
    SCHEMA,
    UNSUPPORTED,
    KeySpec,
    defaults_for,
    render_toml,
)
from kohya_backend.config.validate import TrainConfig, validate_config
from kohya_backend.errors import ConfigIssue


@dataclass
class FormatResult:
    """The canonical TOML of a valid config, the config itself and its warnings."""

    toml: str
    config: TrainConfig
    warnings: list[ConfigIssue]


def to_canonical_toml(config: TrainConfig, *, include_defaults: bool = True) -> str:
    """Flat TOML in schema order, grouped with one comment line per group; unset keys are left out.

    include_defaults=False writes only the keys that differ from the FM type's defaults. Either way,
    validating the result gives back an equal config.
    """
    if include_defaults:
        keys = list(SCHEMA)
    else:
        defaults = defaults_for(config.fm_type)
        keys = [k for k in SCHEMA if config.values[k] != defaults[k]]
    return render_toml(config.values, keys)


def format_config(
    source: str | Mapping[str, Any] | ParsedConfig,
    fm_type: str,
    *,
    cuda_available: bool | None = None,
    require_paths: bool = True,
    check_paths_exist: bool = True,
) -> FormatResult:
    """Validate config_params and write it back canonically (what the Format config Params button does)."""
    config = validate_config(
        source,
        fm_type,
        cuda_available=cuda_available,
        require_paths=require_paths,
        check_paths_exist=check_paths_exist,
    )
    return FormatResult(toml=to_canonical_toml(config), config=config, warnings=list(config.warnings))


_KIND_NAMES = {
    "bool": "bool",
    "int": "int",
    "float": "float",
    "str": "string",
    "path": "path",
    "list": 'list of "key=value"',
    "resolution": '"size" or "w,h"',
    "steps_or_fraction": "int, or fraction < 1",
}


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no pipe, newline or HTML-looking <tag>."""
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def _shown(spec: KeySpec, value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if spec.kind == "resolution":
        return f'`"{value[0]},{value[1]}"`'
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, (list, tuple)):
        return "`[]`" if not value else f"`{list(value)}`"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def _default_cell(spec: KeySpec) -> str:
    shown = [_shown(spec, spec.default_for(fm)) for fm in FM_TYPES]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def _allowed_cell(spec: KeySpec) -> str:
    if spec.choices is not None:
        return ", ".join(f"`{c}`" for c in spec.choices)
    if spec.name == "network_args":
        return (
            ", ".join(f"`{a}=`" for a in NETWORK_ARGS)
            + " (networks.lora); lycoris-lora's own (lycoris.kohya)"
        )
    if spec.name == "optimizer_type":
        return ", ".join(f"`{o}`" for o in OPTIMIZERS) + ", a torch.optim class, or a class path"
    parts = []
    if spec.minimum is not None:
        parts.append(f"{'>' if spec.exclusive_minimum else '≥'} {spec.minimum:g}")
    if spec.maximum is not None:
        parts.append(f"≤ {spec.maximum:g}")
    if spec.zero_is_unset:
        parts.append("0 = unset")
    return ", ".join(parts)


def _status_cell(spec: KeySpec) -> str:
    effect = spec.effect
    if effect.kind == "used":
        return f"implemented ({effect.text})"
    if effect.kind == "compat":
        return f'accepted, no effect; another value warns: "{spec.name} {effect.text}"'
    return f"only {effect.text}; another value is refused"


def reference_markdown() -> str:
    """The config reference (every key: type, defaults per FM type, allowed values, help, status) as Markdown."""
    lines = [
        "# config_params reference",
        "",
        "Keys are kohya sd-scripts' argument names; a flat TOML (or a JSON object) with one key per setting.",
        '[sections] are flattened as sd-scripts does. Numbers may also be given as strings ("1e-4"),',
        'and `""` means unset. Defaults show sd_1_5 / sd_xl where they differ.',
        "",
        "Status: *implemented* keys change what the trainer does or writes (a test proves each one); *accepted,",
        "no effect* keys are read for kohya compatibility and a value other than the default gets the warning",
        "shown; *only* keys accept kohya's one value this trainer implements. Keys kohya knows that this trainer",
        "does not implement are refused (last table).",
    ]
    for group, title in GROUPS:
        lines += [
            "",
            f"## {title}",
            "",
            "| Key | Type | Default | Allowed | Description | Status |",
            "|---|---|---|---|---|---|",
        ]
        for spec in (s for s in SCHEMA.values() if s.group == group):
            lines.append(
                f"| `{spec.name}` | {_cell(_KIND_NAMES[spec.kind])} | {_cell(_default_cell(spec))} "
                f"| {_cell(_allowed_cell(spec))} | {_cell(spec.help)} | {_cell(_status_cell(spec))} |"
            )
    lines += ["", "## Other names", "", "| Key | Read as |", "|---|---|"]
    lines += [f"| `{old}` | `{new}` |" for old, new in ALIASES.items()]
    lines += [
        "",
        "## kohya keys this trainer does not implement (refused)",
        "",
        "Setting one of these is an error (a value equal to kohya's default only gives a warning that it changes",
        "nothing).",
        "",
        "| Key | Why / what to do |",
        "|---|---|",
    ]
    lines += [f"| `{key}` | {_cell(why)} |" for key, why in sorted(UNSUPPORTED.items())]
    return "\n".join(lines) + "\n"


def key_reference(key: str) -> str:
    """One key of the config reference as Markdown (type, defaults, allowed values, help), for the editor's help
    panel; a kohya key this trainer does not implement says why, an unknown key says so."""
    name = ALIASES.get(key, key)
    spec = SCHEMA.get(name)
    if spec is None:
        if key in UNSUPPORTED:
            return f"`{key}` is a kohya key this trainer does not implement: {UNSUPPORTED[key]}"
        return f"`{key}` is not a config_params key."
    lines = [f"**`{name}`** ({_KIND_NAMES[spec.kind]}): {spec.help}", "", f"- default: {_default_cell(spec)}"]
    allowed = _allowed_cell(spec)
    if allowed:
        lines.append(f"- allowed: {allowed}")
    lines.append(f"- status: {_status_cell(spec)}")
    if name != key:
        lines.append(f"- `{key}` is read as `{name}`")
    return "\n".join(lines)


def reference_keys() -> list[str]:
    """Every key the help panel knows: the schema's, then the other names, then the unimplemented kohya keys."""
    return [*SCHEMA, *ALIASES, *sorted(UNSUPPORTED)]
