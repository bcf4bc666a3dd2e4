"""Reading config_params: TOML/JSON/mappings, [section] flattening, key positions, syntax errors, value coercion."""

from __future__ import annotations

from typing import Any

import pytest

from kohya_backend.config.parse import ParsedConfig, ValueProblem, coerce_value, parse_config
from kohya_backend.config.schema import SCHEMA
from kohya_backend.config.values import literal_kwargs
from kohya_backend.errors import ConfigError, ConfigIssue


def _issues(source: Any) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_config(source)
    return info.value.issues


def test_flat_toml_values_and_positions() -> None:
    parsed = parse_config('# comment\nnetwork_dim = 32\n\n  optimizer_type = "AdamW"  # trailing\nseed=1\n')
    assert parsed.source_format == "toml"
    assert parsed.values == {"network_dim": 32, "optimizer_type": "AdamW", "seed": 1}
    assert parsed.positions == {"network_dim": (2, 1), "optimizer_type": (4, 3), "seed": (5, 1)}
    assert parsed.position("seed") == (5, 1) and parsed.position("missing") == (None, None)


def test_positions_survive_multiline_values_and_tricky_strings() -> None:
    text = "\n".join(
        [
            'caption_prefix = "a # not a comment = [ {"',  # 1
            "network_args = [",  # 2
            '  "conv_dim=4",  # ] not the end',  # 3
            "  'conv_alpha=1',",  # 4
            "]",  # 5
            'training_comment = """line one',  # 6
            'seed = 3 is text, "quoted" too',  # 7
            '"""',  # 8
            "caption_suffix = '''x''' # end",  # 9
            'optimizer_args = { "weight_decay" = "0.1" }',  # 10
            '"output_name" = "quoted key"',  # 11
            "seed = 7",  # 12
        ]
    )
    parsed = parse_config(text)
    assert parsed.values["seed"] == 7
    assert parsed.values["training_comment"].startswith("line one")
    assert parsed.positions["network_args"] == (2, 1)
    assert parsed.positions["training_comment"] == (6, 1)
    assert parsed.positions["caption_suffix"] == (9, 1)
    assert parsed.positions["output_name"] == (11, 1)
    assert parsed.positions["seed"] == (12, 1)


def test_sections_are_flattened_like_sd_scripts() -> None:
    text = (
        'title = "top"\n'
        "training.clip_skip = 2\n"
        "[model]\n"
        "v2 = false\n"
        "[saving]\n"
        "  save_every_n_epochs = 2\n"
        "[others]\n"
        "seed = 1337\n"
    )
    parsed = parse_config(text)
    assert parsed.values == {
        "title": "top",
        "v2": False,
        "save_every_n_epochs": 2,
        "seed": 1337,
        "clip_skip": 2,
    }
    assert parsed.positions["save_every_n_epochs"] == (6, 3)
    assert parsed.positions["seed"] == (8, 1)
    assert parsed.positions["clip_skip"] == (2, 1)


def test_a_key_in_two_sections_is_reported_with_both_places() -> None:
    [issue] = _issues("[model]\nseed = 1\n[training]\nseed = 2\n")
    assert issue.key == "seed" and issue.line == 4
    assert "model.seed" in issue.message and "training.seed" in issue.message


def test_a_key_repeated_with_the_same_value_is_what_sd_scripts_accepts() -> None:
    parsed = parse_config(
        '[dataset_arguments]\nresolution = "512,512"\n[training_arguments]\nresolution = "512,512"\n'
    )
    assert parsed.values == {"resolution": "512,512"} and parsed.positions["resolution"] == (2, 1)
    [issue] = _issues('[a]\nresolution = "512,512"\n[b]\nresolution = "768,768"\n')
    assert (
        "a.resolution" in issue.message and "b.resolution" in issue.message and '"768,768"' in issue.message
    )


def test_nested_tables_are_rejected() -> None:
    [issue] = _issues("[training]\nseed = 1\n[training.deep]\nx = 1\n")
    assert "nested table" in issue.message and issue.line == 3
    [issue] = _issues("[training]\nseed = 1\nmore.x = 1\n")
    assert "training.more" in issue.message and issue.line == 3


def test_dataset_config_arrays_of_tables_are_explained() -> None:
    text = '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\n[[datasets]]\nresolution = 768\n'
    [issue] = _issues(text)
    assert issue.key == "datasets" and issue.line == 1
    assert "dataset_config" in (issue.hint or "") and "train_data_dir" in (issue.hint or "")


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("network_dim = 32\noptimizer_type = AdamW\n", 2, 18),
        ("a = 1\nb = [1,\n  2\nc = 3\n", 4, 1),
        ("seed = 1\nseed = 2\n", 2, 1),
        ("x = True\n", 1, 5),
    ],
)
def test_toml_syntax_errors_carry_line_and_column(text: str, line: int, column: int) -> None:
    [issue] = _issues(text)
    assert issue.message.startswith("TOML syntax error")
    assert (issue.line, issue.column) == (line, column)
    assert issue.hint and "quotes" in issue.hint


def test_json_object_with_positions() -> None:
    text = '{\n  "network_dim": "32",\n  "model": {"v2": false},\n    "resolution": [512, 768]\n}'
    parsed = parse_config(text)
    assert parsed.source_format == "json"
    assert parsed.values == {"network_dim": "32", "v2": False, "resolution": [512, 768]}
    assert parsed.positions == {"network_dim": (2, 3), "v2": (3, 13), "resolution": (4, 5)}


def test_json_keys_inside_arrays_and_strings_are_not_positions() -> None:
    text = '{"a": [{"seed": 1}, "x"], "b": "{\\"seed\\": 2}", "seed": 3}'
    parsed = parse_config(text)
    assert parsed.positions["seed"] == (1, 49)
    assert parsed.values["seed"] == 3


def test_json_syntax_error_carries_line_and_column() -> None:
    [issue] = _issues('{\n  "network_dim": 32,\n  "seed": ,\n}')
    assert issue.message.startswith("JSON syntax error")
    assert (issue.line, issue.column) == (3, 11)


def test_json_duplicate_key_is_an_error() -> None:
    [issue] = _issues('{"seed": 1,\n "seed": 2}')
    assert issue.key == "seed" and issue.line == 2 and "twice" in issue.message


def test_json_that_is_not_an_object_is_rejected() -> None:
    # A list starts with "[" so it is read as TOML, and rejected there.
    [issue] = _issues("[1, 2]")
    assert issue.line == 1


def test_mapping_source_is_flattened_without_positions() -> None:
    parsed = parse_config({"model": {"v2": False}, "seed": 5})
    assert parsed == ParsedConfig(values={"v2": False, "seed": 5}, positions={}, source_format="mapping")


def test_windows_line_endings() -> None:
    parsed = parse_config(
        'seed = 1\r\n[s]\r\nnetwork_args = [\r\n "conv_dim=4",\r\n]\r\noutput_name = "x"\r\n'
    )
    assert parsed.positions == {"seed": (1, 1), "network_args": (3, 1), "output_name": (6, 1)}
    assert parse_config('{\r\n "seed": 1,\r\n "network_dim": 2}').positions["network_dim"] == (3, 2)


def test_byte_order_mark_and_empty_text() -> None:
    assert parse_config("\ufeffseed = 1\n").values == {"seed": 1}
    assert parse_config("").values == {}


def test_other_source_types_are_rejected() -> None:
    [issue] = _issues(42)  # type: ignore[arg-type]
    assert "TOML/JSON text or a mapping" in issue.message


# --- value coercion ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("cache_latents", "true", True),
        ("cache_latents", "False", True),  # sd-scripts tests switches with `if args.x`: any text but "" is on
        ("xformers", "xformers", True),  # what kohya_ss's GUI writes for its attention choice
        ("cache_latents", 1, True),
        ("network_dim", "32", 32),
        ("network_dim", 32.0, 32),
        ("network_dim", " 16 ", 16),
        ("learning_rate", "1e-4", 1e-4),
        ("learning_rate", 1, 1.0),
        ("text_encoder_lr", [5e-5, 5e-5], 5e-5),
        ("clip_skip", "2", 2),
        ("resolution", 512, (512, 512)),
        ("resolution", "512", (512, 512)),
        ("resolution", "512,768", (512, 768)),
        ("resolution", " 640 , 448 ", (640, 448)),
        ("resolution", "1024x768", (1024, 768)),
        ("resolution", [768, 512], (768, 512)),
        ("lr_warmup_steps", 100, 100),
        ("lr_warmup_steps", "0.1", 0.1),
        ("lr_warmup_steps", "5%", 0.05),
        ("lr_warmup_steps", 20.0, 20),
        ("network_args", ["conv_dim = 4", "conv_alpha=1"], ("conv_dim=4", "conv_alpha=1")),
        ("optimizer_args", "weight_decay=0.01 betas=(0.9,0.99)", ("weight_decay=0.01", "betas=(0.9,0.99)")),
        ("optimizer_args", {"weight_decay": 0.1}, ("weight_decay=0.1",)),
        ("optimizer_args", "", ()),
        ("max_train_epochs", "", None),
        ("max_train_epochs", 0, None),
        ("min_snr_gamma", 0, None),
        ("seed", 0, 0),
        ("output_dir", "", None),
        ("keep_tokens_separator", "", ""),
        ("save_precision", "", None),
        ("lr_scheduler", "COSINE", "cosine"),
        ("max_token_length", "150", 150),
        ("sample_sampler", "K_EULER_A", "k_euler_a"),
    ],
)
def test_coercion_accepts_what_kohya_users_write(key: str, raw: Any, expected: Any) -> None:
    assert coerce_value(SCHEMA[key], raw) == expected


@pytest.mark.parametrize(
    ("key", "raw", "fragment"),
    [
        ("cache_latents", 2, "true or false"),
        ("network_dim", "abc", "whole number"),
        ("network_dim", 2.5, "whole number"),
        ("network_dim", True, "whole number"),
        ("network_dim", 0, "out of range"),
        ("learning_rate", 0, "out of range"),
        ("learning_rate", "nan", "finite"),
        ("caption_dropout_rate", 1.5, "out of range"),
        ("text_encoder_lr", [1e-5, 2e-5], "one value"),
        ("resolution", "512,512,512", "width,height"),
        ("resolution", "big", "width,height"),
        ("resolution", 32, "out of range"),
        ("lr_warmup_steps", -1, "0 or more"),
        ("lr_warmup_steps", 1.5, "fraction below 1"),
        ("network_args", ["conv_dim"], "key=value"),
        ("network_args", 5, "key=value"),
        ("output_name", 5, "expected a string"),
        ("mixed_precision", "fp32", "not allowed"),
        ("max_token_length", 100, "not allowed"),
        ("network_module", "networks.oft", "does not implement"),
    ],
)
def test_coercion_rejects_with_a_reason(key: str, raw: Any, fragment: str) -> None:
    with pytest.raises(ValueProblem) as info:
        coerce_value(SCHEMA[key], raw)
    assert fragment in info.value.message


def test_range_error_hint_names_the_limits() -> None:
    with pytest.raises(ValueProblem) as info:
        coerce_value(SCHEMA["clip_skip"], 13)
    assert info.value.hint == "allowed: >= 1 and <= 12"
    with pytest.raises(ValueProblem) as info:
        coerce_value(SCHEMA["learning_rate"], -1)
    assert info.value.hint == "allowed: > 0"


def test_unsupported_choice_value_says_kohya_accepts_it() -> None:
    with pytest.raises(ValueProblem) as info:
        coerce_value(SCHEMA["network_module"], "networks.dylora")
    assert info.value.message.startswith('kohya accepts network_module = "networks.dylora"')
    assert "LyCORIS" in info.value.message
    assert info.value.hint == "choose one of networks.lora, lycoris.kohya"


def test_literal_kwargs_read_values_as_kohya_does() -> None:
    parsed = literal_kwargs(
        ["weight_decay=0.01", "betas=0.9,0.99", "eps=1e-8", " decouple = True ", "mode='fast'", "d=(1, 2)"]
    )
    assert parsed == {
        "weight_decay": 0.01,
        "betas": (0.9, 0.99),
        "eps": 1e-8,
        "decouple": True,
        "mode": "fast",
        "d": (1, 2),
    }
    assert isinstance(parsed["weight_decay"], float) and isinstance(parsed["betas"], tuple)


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("weight_decay", "not of the form name=value"),
        ("=1", "not of the form name=value"),
        ("x=__import__('os').getcwd()", "not a Python literal"),
        ("x=1+", "not a Python literal"),
        ("scale_parameter=false", "not a Python literal"),  # kohya's literal_eval rejects lowercase false too
        ("mode=fast", "not a Python literal"),
    ],
)
def test_literal_kwargs_reject_what_kohya_cannot_read(item: str, fragment: str) -> None:
    with pytest.raises(ValueProblem, match=fragment):
        literal_kwargs([item])
