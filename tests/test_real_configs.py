"""Configs from the wild (tests/data/real-configs: kohya_ss GUI presets and test configs, sd-scripts' documented
examples, public guides' configs, dataset_config files, configs for other trainers) are read as kohya reads them.

Every in-scope fixture passes `config format --no-paths`, or is refused only for the reasons listed for it below:
one this project does not implement ("not-implemented:..."), or one kohya refuses too ("kohya-refuses:...").
When a feature lands, its reason must be taken off the list (the test fails until it is). SD 1.5 fixtures train 2 steps on the demo model, one per distinct training path; configs
for other trainers are refused in one sentence.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kohya_backend.cli import main
from kohya_backend.config.parse import parse_config
from kohya_backend.config.validate import validate_config
from kohya_backend.errors import ConfigError, ConfigIssue
from kohya_backend.train.events import EventLog
from kohya_backend.train.loop import Trainer
from kohya_backend.train.plan import format_with_plan

ROOT = Path(__file__).parent / "data" / "real-configs"

# (reason, key it is reported at or None for any, pattern of the message)
_REASONS: list[tuple[str, str | None, str]] = [
    ("out-of-scope", None, r"^This is .*: this trainer trains LoRAs for SD 1\.5 and SDXL only\.$"),
    ("not-implemented:wandb", "log_with", r"Weights & Biases logging is not implemented"),
    ("not-implemented:networks.dylora", "network_module", r"networks\.dylora"),
    ("not-implemented:networks.dylora", "network_args", r"unknown network_args key 'unit'"),
    ("not-implemented:lora_fa", "network_module", r"networks\.lora_fa"),
    ("not-implemented:masked_loss", "masked_loss", r"masked loss"),
    ("not-implemented:in_json", None, r"accepts (in_json|dataset_repeats)"),
    ("not-implemented:full_bf16", "full_bf16", r"pure half-precision"),
    ("not-implemented:fine-tuning subsets", "metadata_file", r"fine-tuning subsets"),
    ("not-implemented:conditioning images", "conditioning_data_dir", r"conditioning images"),
    ("not-implemented:caption separators", None, r"accepts (secondary_separator|enable_wildcard)"),
    ("kohya-refuses:bucket_reso_steps", "bucket_reso_steps", r"kohya refuses it too"),
    (
        "kohya-refuses:cached TE outputs with a trained TE",
        "cache_text_encoder_outputs",
        r"network_train_unet_only",
    ),
    ("not-sd-scripts:text_encoder_lr1/2", None, r"text_encoder_lr[12] is not an sd-scripts key"),
]


def reasons(issues: list[ConfigIssue]) -> set[str]:
    """The reason of each issue; an issue that matches none is returned as "UNEXPECTED: ..." (a test failure)."""
    found = set()
    for issue in issues:
        for reason, key, pattern in _REASONS:
            if (key is None or issue.key == key) and re.search(pattern, issue.message):
                found.add(reason)
                break
        else:
            found.add(f"UNEXPECTED: {issue.render()}")
    return found


# Why each fixture is refused (an empty set: it passes). Shrink this as the features land.
EXPECTED: dict[str, set[str]] = {
    "dataset/hollowstrawberry-custom-subsets.toml": set(),
        "dataset/hollowstrawberry-lora-trainer-dataset.toml": set(),
        "dataset/kohya_ss-test-dataset-finetune.toml": {"kohya-refuses:bucket_reso_steps", "not-implemented:fine-tuning subsets"},
        "dataset/kohya_ss-test-dataset-masked-loss.toml": {"kohya-refuses:bucket_reso_steps", "not-implemented:conditioning images"},
        "dataset/kohya_ss-test-dataset-multires.toml": set(),
        "dataset/kohya_ss-test-dataset.toml": set(),
        "dataset/sd-scripts-config-readme-dreambooth-and-finetune.toml": {"not-implemented:fine-tuning subsets"},
        "dataset/sd-scripts-config-readme-separators.toml": {"not-implemented:caption separators"},
        "dataset/sd-scripts-textual-inversion-dataset.toml": set(),
        "dataset/sd-scripts-train-readme-captions.toml": set(),
        "dataset/sd-scripts-train-readme-reg.toml": set(),
        "guides/cyber-meow-kohya-network-config.toml": set(),
        "guides/hollowstrawberry-lora-trainer.toml": set(),
        "guides/linaqruf-kohya-lora-dreambooth.toml": set(),
        "guides/wethinkin-sd-lora-in-json.toml": {"not-implemented:in_json"},
        "kohya_ss/composed-sd15-kohya-dylora.json": {"not-implemented:networks.dylora"},
        "kohya_ss/composed-sd15-lora-fa.json": {"not-implemented:lora_fa"},
        "kohya_ss/composed-sd15-lycoris-glora.json": set(),
        "kohya_ss/composed-sd15-lycoris-native-fine-tuning.json": set(),
        "kohya_ss/preset-sd15-ia3-prodigy.json": set(),
        "kohya_ss/preset-sd15-loha.json": {"kohya-refuses:bucket_reso_steps"},
        "kohya_ss/preset-sd15-lokr-prodigy.json": {"kohya-refuses:bucket_reso_steps"},
        "kohya_ss/preset-sd15-lokr.json": {"kohya-refuses:bucket_reso_steps"},
        "kohya_ss/preset-sd15-lycoris-locon-edg.json": set(),
        "kohya_ss/preset-sd15-standard-edg.json": set(),
        "kohya_ss/preset-sdxl-1-image-lokr.json": set(),
        "kohya_ss/preset-sdxl-locon-dadaptation.json": {"kohya-refuses:bucket_reso_steps"},
        "kohya_ss/preset-sdxl-loha-ai-characters.json": set(),
        "kohya_ss/preset-sdxl-lokr.json": set(),
        "kohya_ss/preset-sdxl-standard-adafactor.json": set(),
        "kohya_ss/preset-sdxl-standard-ai-now-adamw.json": set(),
        "kohya_ss/preset-sdxl-standard-ai-now-prodigy.json": set(),
        "kohya_ss/preset-sdxl-standard-aitrepreneur-clothing.json": set(),
        "kohya_ss/preset-sdxl-standard-dadaptadam.json": {"not-implemented:wandb"},
        "kohya_ss/preset-sdxl-standard-edglora-prodigy.json": set(),
        "kohya_ss/preset-sdxl-standard-face-dogu-cat.json": set(),
        "kohya_ss/test-sd15-diag-oft-dataset-config.json": set(),
        "kohya_ss/test-sd15-dylora-adafactor-dataset-config.json": {"kohya-refuses:bucket_reso_steps"},
        "kohya_ss/test-sd15-ia3-prodigy.json": {"kohya-refuses:bucket_reso_steps"},
        "kohya_ss/test-sd15-kohya-locon-adafactor.json": set(),
        "kohya_ss/test-sd15-kohya-locon-adamw.json": set(),
        "kohya_ss/test-sd15-kohya-locon-adamw8bit.json": set(),
        "kohya_ss/test-sd15-kohya-locon-prodigy.json": {"kohya-refuses:bucket_reso_steps"},
        "kohya_ss/test-sd15-lokr-dataset-config.json": {"kohya-refuses:bucket_reso_steps"},
        "kohya_ss/test-sd15-standard-dataset-config.json": set(),
        "kohya_ss/test-sd15-standard-masked-loss.json": {"not-implemented:masked_loss"},
        "kohya_ss/test-sdxl-loha.json": set(),
        "kohya_ss/test-sdxl-standard-adafactor.json": set(),
        "kohya_ss/test-sdxl-standard-adamw8bit.json": {"kohya-refuses:bucket_reso_steps"},
        "kohya_ss/test-sdxl-standard-prodigy-t5clrs.json": {"not-implemented:full_bf16"},
        "out-of-scope/kohya_ss-preset-flux1d.json": {"out-of-scope"},
        "out-of-scope/kohya_ss-test-dreambooth.json": {"out-of-scope"},
        "out-of-scope/kohya_ss-test-finetune.json": {"out-of-scope"},
        "out-of-scope/kohya_ss-test-textual-inversion.json": {"out-of-scope"},
        "out-of-scope/sd-scripts-controlnet-lllite-dataset.toml": {"not-implemented:conditioning images"},
        "out-of-scope/sd-scripts-controlnet-lllite.toml": {"out-of-scope"},
        "out-of-scope/sd-scripts-flux-lora.toml": {"out-of-scope"},
        "out-of-scope/sd-scripts-sd3-lora.toml": {"out-of-scope"},
        "out-of-scope/sd-scripts-stable-cascade-stage-c.toml": {"out-of-scope"},
        "out-of-scope/sd-scripts-textual-inversion.toml": {"out-of-scope"},
        "sd-scripts/sdxl-adafactor-fixed-lr-doc.toml": set(),
        "sd-scripts/sdxl-train-network-doc.toml": {"kohya-refuses:cached TE outputs with a trained TE", "not-sd-scripts:text_encoder_lr1/2"},
        "sd-scripts/train-network-advanced-options.toml": set(),
        "sd-scripts/train-network-doc.toml": set(),
}  # fmt: skip


def fm_type_of(name: str) -> str:
    return "sd_xl" if "sdxl" in name else "sd_1_5"


def test_every_fixture_is_listed_and_the_lists_cover_what_the_issue_asks() -> None:
    files = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("*/*") if p.suffix in (".json", ".toml"))
    assert files == sorted(EXPECTED)
    gui_types = {
        json.loads((ROOT / f).read_text(encoding="utf-8")).get("LoRA_type") for f in files if "kohya_ss/" in f
    }
    assert {"Standard", "Kohya LoCon", "LyCORIS/LoCon", "LyCORIS/LoHa", "LyCORIS/LoKr", "LyCORIS/iA3",
            "LyCORIS/DyLoRA", "LyCORIS/GLoRA", "LyCORIS/Diag-OFT", "LoRA-FA", "Kohya DyLoRA"} <= gui_types  # fmt: skip
    assert sum(f.startswith("kohya_ss/") for f in files) >= 15
    assert sum(f.startswith(("sd-scripts/", "guides/")) for f in files) >= 8
    assert sum(f.startswith("dataset/") for f in files) >= 3


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_passes_config_format_or_is_refused_for_its_listed_reasons(name: str) -> None:
    text = (ROOT / name).read_text(encoding="utf-8")
    try:
        # what `config format FILE --no-paths` does, judged for a GPU machine (the fp16 rule needs one)
        format_with_plan(
            text, fm_type_of(name), require_paths=False, check_paths_exist=False, cuda_available=True
        )
        found: set[str] = set()
    except ConfigError as exc:
        found = reasons(exc.issues)
        if name.startswith("out-of-scope/"):
            [issue] = exc.issues  # one clear sentence, nothing else
            assert "\n" not in issue.message
    assert found == EXPECTED[name]


def test_the_command_line_formats_a_kohya_ss_preset_and_refuses_a_flux_config_in_one_line(capsys) -> None:
    preset = ROOT / "kohya_ss" / "preset-sd15-standard-edg.json"
    assert main(["config", "format", str(preset), "--fm-type", "sd_1_5", "--no-paths"]) == 0
    out = capsys.readouterr().out
    assert 'network_module = "networks.lora"' in out and 'optimizer_type = "AdamW8bit"' in out
    flux = ROOT / "out-of-scope" / "sd-scripts-flux-lora.toml"
    assert main(["config", "format", str(flux), "--fm-type", "sd_1_5", "--no-paths"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Flux.1" in err[1] and "Traceback" not in " ".join(err)


def _demo_dataset_config(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(
        "[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\nbatch_size = 2\n"
        f"[[datasets.subsets]]\nimage_dir = '{(data / '10_demo').as_posix()}'\nnum_repeats = 2\n"
        "shuffle_caption = true\nkeep_tokens = 1\n",
        encoding="utf-8",
    )
    return path


# One SD 1.5 fixture per distinct way in: a GUI preset, a GUI Kohya LoCon config (rank/module dropout, max-norm), a
# GUI LyCORIS preset, a GUI config with a dataset_config, a sectioned guide config, and sd-scripts' flat config
# with most documented options (LoCon, reg images, noise offset, min-SNR, ...).
TRAINED = [
    "kohya_ss/preset-sd15-standard-edg.json",
    "kohya_ss/test-sd15-kohya-locon-adamw.json",
    "kohya_ss/preset-sd15-lycoris-locon-edg.json",
    "kohya_ss/test-sd15-standard-dataset-config.json",
    "guides/linaqruf-kohya-lora-dreambooth.toml",
    "sd-scripts/train-network-advanced-options.toml",
]


@pytest.mark.parametrize("name", TRAINED)
def test_sd15_fixtures_train_two_steps_on_the_demo_model(
    name: str, tmp_path: Path, tiny_assets: dict[str, Any]
) -> None:
    assert EXPECTED[name] == set()
    parsed = parse_config((ROOT / name).read_text(encoding="utf-8"))
    values = parsed.values
    # only what points at this machine's files and keeps the run tiny; every other setting is the fixture's
    values.update(
        pretrained_model_name_or_path=str(tiny_assets["sd_1_5"]),
        tokenizer_cache_dir=str(tiny_assets["tokenizer"]),
        output_dir=str(tmp_path / "out"),
        output_name="fixture",
        resolution="64,64",
        min_bucket_reso=64,
        max_bucket_reso=128,
        max_train_steps=2,
        max_train_epochs=None,
        mixed_precision="no",
        logging_dir=None,
    )
    if values.get("dataset_config"):
        values["dataset_config"] = str(_demo_dataset_config(tmp_path, tiny_assets["data"]))
    else:
        values["train_data_dir"] = str(tiny_assets["data"])
        values["caption_extension"] = ".txt"
    if values.get("reg_data_dir"):
        values["reg_data_dir"] = str(tiny_assets["data"])
    config = validate_config(parsed, "sd_1_5", cuda_available=False)
    result = Trainer(config, events=EventLog(None, console=None)).run()
    assert result.step == 2 and result.output is not None and result.output.exists()
