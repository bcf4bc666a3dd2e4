"""config_params: schema, parsing, validation and canonical formatting."""

from kohya_backend.config.format import FormatResult, format_config, reference_markdown, to_canonical_toml
from kohya_backend.config.parse import ParsedConfig, parse_config
from kohya_backend.config.schema import (
    FM_TYPES,
    GROUPS,
    SCHEMA,
    UNSUPPORTED,
    KeySpec,
    defaults_for,
    template_toml,
)
from kohya_backend.config.validate import TrainConfig, validate_config

__all__ = [
    "FM_TYPES",
    "GROUPS",
    "SCHEMA",
    "UNSUPPORTED",
    "FormatResult",
    "KeySpec",
    "ParsedConfig",
    "TrainConfig",
    "defaults_for",
    "format_config",
    "parse_config",
    "reference_markdown",
    "template_toml",
    "to_canonical_toml",
    "validate_config",
]
