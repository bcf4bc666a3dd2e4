"""kohya's dataset_config TOML: its keys where kohya allows them, kohya's precedence, its errors, the scan, the plan
(each subset shown), and per-subset options in training."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kohya_backend.assets.dataset import write_demo_dataset
from kohya_backend.cli import main
from kohya_backend.config.schema import defaults_for
from kohya_backend.config.validate import validate_config
from kohya_backend.data.augment import apply_gamma, color_aug, shift_hue
from kohya_backend.data.dataset_config import read_dataset_config, scan_dataset_config
from kohya_backend.errors import ConfigError, DatasetError
from kohya_backend.train.events import EventLog
from kohya_backend.train.inputs import TEXT_CACHE_DIR
from kohya_backend.train.loop import Trainer
from kohya_backend.train.plan import format_with_plan, plan_for, scan_for
from kohya_backend.train.setup import caption_for, options_for

TRAINING = defaults_for("sd_1_5")


def read(text: str, training: dict[str, Any] | None = None, fm_type: str = "sd_1_5"):
    return read_dataset_config(text, source="ds.toml", fm_type=fm_type, training=training or TRAINING)


def issues(text: str) -> list[tuple[str | None, int | None, str]]:
    with pytest.raises(ConfigError) as info:
        read(text)
    return [(i.key, i.line, i.message) for i in info.value.issues]


PRECEDENCE = """
[general]
keep_tokens = 1
caption_extension = '.txt'
flip_aug = true

[[datasets]]
resolution = [768, 512]
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'a'

  [[datasets.subsets]]
  image_dir = 'b'
  keep_tokens = 3
  num_repeats = 5
  is_reg = true
  class_tokens = 'person'

[[datasets]]

  [[datasets.subsets]]
  image_dir = 'c'
"""


def test_subset_beats_dataset_beats_general_beats_the_training_config() -> None:
    training = {**TRAINING, "shuffle_caption": True, "train_batch_size": 2, "resolution": (512, 512)}
    found = read(PRECEDENCE, training)
    first, second = found.datasets
    a, b = first.subsets
    assert (a.options.keep_tokens, b.options.keep_tokens, second.subsets[0].options.keep_tokens) == (2, 3, 1)
    assert a.options.caption_extension == ".txt" and a.options.flip_aug  # from [general]
    assert a.options.shuffle_caption and second.subsets[0].options.shuffle_caption  # from the training config
    assert (a.options.num_repeats, b.options.num_repeats, b.options.is_reg, b.options.class_tokens) == (
        1,
        5,
        True,
        "person",
    )
    assert (first.params.resolution, first.params.batch_size) == ((768, 512), 4)
    assert (second.params.resolution, second.params.batch_size) == ((512, 512), 2)  # train_batch_size
    assert [s.image_dir for s in first.subsets] == [Path("a"), Path("b")]


def test_kohyas_errors_with_their_line() -> None:
    text = """[general]
image_dir = 'x'
[[datasets]]
batch_size = 2
num_repeat = 3
prior_loss_weight = 0.5
  [[datasets.subsets]]
  batch_size = 1
  class_tokens = 'c'
  [[datasets.subsets]]
  metadata_file = 'meta.json'
  secondary_separator = ';;;'
"""
    found = issues(text)
    by_key = {key: (line, message) for key, line, message in found}
    assert by_key["image_dir"][0] == 2 and "not allowed in [general]" in by_key["image_dir"][1]
    assert by_key["num_repeat"][0] == 5
    assert by_key["prior_loss_weight"][0] == 6
    assert by_key["batch_size"][0] == 8 and "[[datasets.subsets]]" in by_key["batch_size"][1]
    assert "fine-tuning subsets" in by_key["metadata_file"][1]
    assert "secondary_separator" in by_key and "does not implement" in by_key["secondary_separator"][1]
    assert any("image_dir is required" in m for _, _, m in found)
    with pytest.raises(ConfigError) as info:
        read("[[datasets]]\nnum_repeat = 3\n[[datasets.subsets]]\nimage_dir = 'a'\n")
    assert info.value.issues[0].hint == "did you mean num_repeats?"
    with pytest.raises(ConfigError) as info:
        read("[[datasets]]\nprior_loss_weight = 1.0\n[[datasets.subsets]]\nimage_dir = 'a'\n")
    assert "training config" in (info.value.issues[0].hint or "")


def test_inert_keys_warn_and_bucket_rules_are_kohyas() -> None:
    found = read(
        "[general]\nenable_wildcard = false\ncache_info = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n"
    )
    assert [w.key for w in found.warnings] == ["cache_info"]
    text = (
        "[[datasets]]\nenable_bucket = true\nbucket_reso_steps = 32\n[[datasets.subsets]]\nimage_dir = 'a'\n"
    )
    assert "multiple of 64" in issues(text)[0][2]
    assert read(text, fm_type="sd_xl").datasets[0].params.bucket_reso_steps == 32
    snapped = read(
        "[[datasets]]\nenable_bucket = true\nmin_bucket_reso = 250\n[[datasets.subsets]]\nimage_dir = 'a'\n"
    )
    assert snapped.datasets[0].params.min_bucket_reso == 192  # kohya lowers it to the step


def _two_subsets(tmp_path: Path) -> Path:
    write_demo_dataset(tmp_path / "imgs", folder="1_alpha", count=3, size=(64, 64), seed=1)
    write_demo_dataset(tmp_path / "imgs", folder="1_beta", count=2, size=(64, 96), seed=2)
    write_demo_dataset(tmp_path / "imgs", folder="1_reg", count=4, size=(64, 64), seed=3)
    for image in (tmp_path / "imgs" / "1_reg").glob("*.txt"):
        image.unlink()  # regularisation images without captions: trained with class_tokens
    config = tmp_path / "ds.toml"
    config.write_text(
        f"""[general]
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{(tmp_path / "imgs" / "1_alpha").as_posix()}"
  num_repeats = 3
  caption_prefix = "alpha style"
  shuffle_caption = true
  keep_tokens = 1

  [[datasets.subsets]]
  image_dir = "{(tmp_path / "imgs" / "1_alpha").as_posix()}"
  num_repeats = 9

  [[datasets.subsets]]
  image_dir = "{(tmp_path / "imgs" / "1_reg").as_posix()}"
  is_reg = true
  class_tokens = "person"

[[datasets]]
resolution = 64
batch_size = 1
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128

  [[datasets.subsets]]
  image_dir = "{(tmp_path / "imgs" / "1_beta").as_posix()}"
  num_repeats = 2
  flip_aug = true
""",
        encoding="utf-8",
    )
    return config


def test_scan_and_plan_per_dataset_and_per_subset(tmp_path: Path) -> None:
    config = validate_config(
        {"dataset_config": str(_two_subsets(tmp_path)), "max_train_steps": 10},
        "sd_1_5",
        require_paths=False,
        cuda_available=True,
    )
    scan = scan_for(config)
    assert [(s.name, s.repeats, s.is_reg, s.dataset_index) for s in scan.subsets] == [
        ("1_alpha", 3, False, 0),
        ("1_reg", 1, True, 0),
        ("1_beta", 2, False, 1),
    ]  # the second 1_alpha subset repeats a folder of the same dataset: skipped, as kohya does
    assert any("listed twice" in w for w in scan.warnings)
    assert scan.subsets[1].caption_of(scan.subsets[1].images[0]) == "person"  # class_tokens for uncaptioned
    plan = plan_for(config, scan)
    # dataset 1: 9 training items + reg balanced to 9 within it, batch 2 -> 9 batches; dataset 2: 4 items, batch 1
    assert plan.num_train_images == 3 * 3 + 2 * 2 and plan.batches_per_epoch == 9 + 4
    assert [d["batch_size"] for d in plan.datasets] == [2, 1]
    assert [d["buckets"] for d in plan.datasets] == [{"64x64": 18}, {"64x64": 4}]
    text = plan.render()
    assert "dataset 2: 64x64, batch size 1" in text
    assert (
        "train 1_alpha (dataset 1)" in text
        and "caption_prefix alpha style" in text
        and "keep_tokens 1" in text
    )
    assert "train 1_beta (dataset 2)" in text and "flip_aug True" in text


def test_per_subset_caption_options_apply_in_training(tmp_path: Path) -> None:
    config = validate_config(
        {
            "dataset_config": str(_two_subsets(tmp_path)),
            "pretrained_model_name_or_path": "unused.safetensors",
            "output_dir": str(tmp_path / "out"),
        },
        "sd_1_5",
        require_paths=False,
        check_paths_exist=False,
        cuda_available=True,
    )
    scan = scan_for(config)
    items = plan_for(config, scan).items
    captions: dict[str, set[str]] = {}
    for item in items:
        subset = scan.subsets[item.subset_index]
        for draw in range(6):
            caption = caption_for(config, scan, item, epoch=1, rng=random.Random(draw))
            captions.setdefault(subset.name, set()).add(caption)
        raw = item.image.caption or subset.class_token
        if subset.name == "1_alpha":
            # caption_prefix added, the first tag kept, the others shuffled: several orders over the draws
            assert all(c.startswith("alpha style") for c in captions["1_alpha"])
        else:
            # no options: as written
            assert caption_for(config, scan, item, epoch=1, rng=random.Random(0)) == raw
    assert len(captions["1_alpha"]) > 3  # shuffled
    assert options_for(config, scan, items[-1]).flip_aug and not options_for(config, scan, items[0]).flip_aug


def test_trains_from_a_dataset_config(tmp_path: Path, tiny_assets: dict[str, Any]) -> None:
    config = validate_config(
        {
            "dataset_config": str(_two_subsets(tmp_path)),
            "pretrained_model_name_or_path": str(tiny_assets["sd_1_5"]),
            "tokenizer_cache_dir": str(tiny_assets["tokenizer"]),
            "output_dir": str(tmp_path / "out"),
            "output_name": "ds",
            "max_train_steps": 2,
            "network_dim": 2,
            "learning_rate": 1e-3,
            "seed": 1,
        },
        "sd_1_5",
        cuda_available=False,
    )
    result = Trainer(config, events=EventLog(None, console=None)).run()
    assert result.step == 2 and result.output == tmp_path / "out" / "ds.safetensors"
    from kohya_backend.lora.save import load_lora

    _, metadata = load_lora(result.output)
    import json

    datasets = json.loads(metadata["ss_datasets"])
    assert [d["batch_size_per_device"] for d in datasets] == [2, 1]
    assert [s["image_dir"] for s in datasets[0]["subsets"]] == ["1_alpha", "1_reg"]
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "1_alpha": {"n_repeats": 3, "img_count": 3},
        "1_beta": {"n_repeats": 2, "img_count": 2},
    }
    assert "ss_batch_size_per_device" not in metadata  # sd-scripts writes it only for train_data_dir runs


def test_config_format_on_a_dataset_config_checks_it_as_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _two_subsets(tmp_path)
    assert main(["config", "format", str(path), "--fm-type", "sd_1_5"]) == 0
    out = capsys.readouterr().out
    assert "[[datasets.subsets]]" in out and "# plan" in out and "train 1_beta (dataset 2)" in out
    path.write_text(path.read_text(encoding="utf-8") + "\n  bad_key = 1\n", encoding="utf-8")
    assert main(["config", "format", str(path), "--fm-type", "sd_1_5"]) == 2
    err = capsys.readouterr().err
    assert "bad_key" in err and "line" in err
    with pytest.raises(ConfigError):
        format_with_plan(path.read_text(encoding="utf-8"), "sd_1_5")


def test_dataset_config_in_the_training_config_is_checked_and_replaces_train_data_dir(tmp_path: Path) -> None:
    path = _two_subsets(tmp_path)
    config = validate_config(
        {"dataset_config": str(path), "train_data_dir": str(tmp_path)}, "sd_1_5", require_paths=False
    )
    assert any(w.key == "train_data_dir" and "ignored" in w.message for w in config.warnings)
    path.write_text("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 'x'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        validate_config({"dataset_config": str(path)}, "sd_1_5", require_paths=False)
    assert all(i.key == "dataset_config" for i in info.value.issues)
    assert any("line 3" in i.message and "num_repeats" in i.message for i in info.value.issues)
    with pytest.raises(
        ConfigError
    ) as info:  # color_aug needs fresh pixels each step: not with cached latents
        path.write_text(
            f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path}'\ncolor_aug = true\n",
            encoding="utf-8",
        )
        validate_config({"dataset_config": str(path), "cache_latents": True}, "sd_1_5", require_paths=False)
    assert "color_aug" in info.value.issues[0].message


def test_no_training_images_is_a_dataset_error(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, folder="1_reg", count=2, size=(32, 32))
    found = read(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / '1_reg'}'\nis_reg = true\n")
    with pytest.raises(DatasetError, match="no training images"):
        scan_dataset_config(found)


def test_color_aug_shifts_hue_or_gamma_on_a_third_of_the_images() -> None:
    red = Image.new("RGB", (4, 4), (200, 50, 50))
    assert np.array_equal(np.asarray(shift_hue(red, 0.0)), np.asarray(red))
    warmer = np.asarray(shift_hue(red, 8.0))[0, 0]
    assert warmer[0] == 200 and warmer[1] > 60 and warmer[2] == 50  # red turns towards orange
    assert np.asarray(shift_hue(red, -8.0))[0, 0][2] > 60  # and the other way towards magenta
    brighter = np.asarray(apply_gamma(red, 1.05))[0, 0]
    assert list(brighter) == [min(255, int(200**1.05)), int(50**1.05), int(50**1.05)]
    rng = random.Random(0)
    changed = sum(not np.array_equal(np.asarray(color_aug(red, rng)), np.asarray(red)) for _ in range(600))
    assert 150 < changed < 250  # about 1 in 3


def test_text_conditioning_follows_the_subsets_caption_options(
    tmp_path: Path, tiny_assets: dict[str, Any]
) -> None:
    """A subset that shuffles its captions gets no text memo (every shuffle is a new caption, never looked up
    again), though the training config shuffles nothing; fixed captions cached to disk go beside the dataset_config
    (there is no train_data_dir)."""
    base = {
        "pretrained_model_name_or_path": str(tiny_assets["sd_1_5"]),
        "tokenizer_cache_dir": str(tiny_assets["tokenizer"]),
        "output_dir": str(tmp_path / "out"),
        "network_train_unet_only": True,
        "max_train_steps": 1,
        "network_dim": 2,
        "seed": 1,
    }
    image_dir = (Path(tiny_assets["data"]) / "10_demo").as_posix()  # type: ignore[arg-type]
    subset = f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{image_dir}'\ncaption_extension = '.txt'\n"
    shuffled = tmp_path / "shuffled" / "ds.toml"
    shuffled.parent.mkdir()
    shuffled.write_text(subset + "shuffle_caption = true\n", encoding="utf-8")
    config = validate_config({**base, "dataset_config": str(shuffled)}, "sd_1_5", cuda_available=False)
    trainer = Trainer(config, events=EventLog(None, console=None))
    trainer.run()
    assert trainer.s.text.cache is None and not trainer.s.text.memoise_ids
    fixed = tmp_path / "fixed" / "ds.toml"
    fixed.parent.mkdir()
    fixed.write_text(subset, encoding="utf-8")
    options = {**base, "dataset_config": str(fixed), "cache_text_encoder_outputs_to_disk": True}
    trainer = Trainer(
        validate_config(options, "sd_1_5", cuda_available=False), events=EventLog(None, console=None)
    )
    trainer.run()
    assert trainer.s.text.memoise_ids
    assert list((fixed.parent / TEXT_CACHE_DIR).glob("*.safetensors"))
