"""What one config_params key is: its kind, defaults, limits, help and effect (KeySpec), and the `key()` helper that
declares a key as a field of the typed TrainConfig.

A key's effect is one of:
- used: it changes what the trainer does or writes; `family` names the behaviour a test proves it changes
  ("training": the trained weights, "captions", "buckets", "caching", "files", "metadata", "samples", "setup");
- compat: accepted because kohya accepts it, changes nothing here; a value other than the default gets a warning
  `"<key> <text>"`;
- fixed: only the one value this trainer implements is accepted (kohya's default); any other is refused.
Keys kohya knows that this trainer does not implement at all are refused (`schema.UNSUPPORTED`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kohya_backend.families import FAMILIES

EFFECT_KINDS = ("used", "compat", "fixed")
BEHAVIOURS = ("training", "captions", "buckets", "caching", "files", "metadata", "samples", "setup")
KINDS = ("bool", "int", "float", "str", "path", "list", "resolution", "steps_or_fraction")


@dataclass(frozen=True)
class Effect:
    """What setting a key does (see the module docstring): kind, the behaviour it changes, and a text.

    used: `text` says where it takes effect; compat: `text` completes the warning "<key> ..."; fixed: `text` says
    what the only accepted value means.
    """

    kind: str
    text: str
    behaviour: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EFFECT_KINDS:
            raise ValueError(f"unknown effect kind {self.kind!r}")
        if (self.kind == "used") != (self.behaviour is not None) or (
            self.behaviour is not None and self.behaviour not in BEHAVIOURS
        ):
            raise ValueError(f"a used key names one of {BEHAVIOURS}; other effects name none")


def used(behaviour: str, where: str) -> Effect:
    """The key changes `behaviour` ("training", "files", ...); `where` says how, for the docs."""
    return Effect("used", where, behaviour)


def compat(warning: str) -> Effect:
    """Accepted for kohya compatibility, no effect; a non-default value warns "<key> <warning>"."""
    return Effect("compat", warning)


def fixed(meaning: str) -> Effect:
    """Only kohya's default value is implemented; `meaning` says what it is."""
    return Effect("fixed", meaning)


@dataclass(frozen=True)
class KeySpec:
    """One config_params key: its kind, default (per FM type), limits, help and effect.

    Kinds: bool, int, float, str, path, list ("k=v" strings), resolution ("w,h"), steps_or_fraction.
    `zero_is_unset` marks keys where kohya reads 0 as "off": 0 is normalised to None (unset).
    """

    name: str
    kind: str
    default: Any
    group: str
    help: str
    effect: Effect
    fm_defaults: Mapping[str, Any] = field(default_factory=dict)
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    exclusive_minimum: bool = False
    zero_is_unset: bool = False

    def default_for(self, fm_type: str) -> Any:
        """The default of this key for one FM type."""
        return self.fm_defaults.get(fm_type, self.default)


_SPEC = "config_key"


def key(
    default: Any,
    group: str,
    help: str,
    effect: Effect,
    *,
    kind: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[Any, ...] | None = None,
    exclusive_minimum: bool = False,
    zero_is_unset: bool = False,
) -> Any:
    """Declare a TrainConfig field as a config_params key (the field's name is the key, its type the value's).

    `kind` is needed only where the type does not say it: "path", "list", "resolution", "steps_or_fraction".
    """
    extra = dict(
        kind=kind,
        group=group,
        help=help,
        effect=effect,
        minimum=minimum,
        maximum=maximum,
        choices=choices,
        exclusive_minimum=exclusive_minimum,
        zero_is_unset=zero_is_unset,
    )
    return field(default=default, metadata={_SPEC: extra})


_KIND_OF_TYPE = {"bool": "bool", "int": "int", "float": "float", "str": "str"}


def _kind_of(field_type: str, declared: str | None) -> str:
    if declared is not None:
        return declared
    base = field_type.replace(" | None", "")
    if base not in _KIND_OF_TYPE:
        raise TypeError(f"type {field_type!r} needs an explicit kind")
    return _KIND_OF_TYPE[base]


def specs_of(cls: type) -> dict[str, KeySpec]:
    """The KeySpec of every key field of a dataclass declared with `key()`, in declaration order.

    Per-FM-type defaults come from the family registry (`Family.config_defaults`).
    """
    specs: dict[str, KeySpec] = {}
    for f in dataclasses.fields(cls):
        extra = f.metadata.get(_SPEC)
        if extra is None:
            continue
        extra = dict(extra)
        kind = _kind_of(str(f.type), extra.pop("kind"))
        fm_defaults = {
            name: family.config_defaults[f.name]
            for name, family in FAMILIES.items()
            if f.name in family.config_defaults
        }
        specs[f.name] = KeySpec(name=f.name, kind=kind, default=f.default, fm_defaults=fm_defaults, **extra)
    return specs
