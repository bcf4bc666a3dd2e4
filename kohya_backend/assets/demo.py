"""The bundled demo: a tiny model, tokenizer and captioned dataset generated on the spot, plus a config for them."""

from __future__ import annotations

from pathlib import Path

from kohya_backend.assets.checkpoints import write_checkpoint
from kohya_backend.assets.dataset import write_demo_dataset
from kohya_backend.assets.tokenizer import write_tiny_tokenizer

DEMO_RESOLUTION = 64  # both families: a few seconds per run on a CPU


def demo_config(home: Path, *, fm_type: str, steps: int) -> str:
    """A kohya-style TOML that trains the demo model on the demo dataset in a few seconds on a CPU."""
    res = DEMO_RESOLUTION
    model = home / "models" / f"demo-{fm_type}.safetensors"
    lines = [
        f'pretrained_model_name_or_path = "{model.as_posix()}"',
        f'tokenizer_cache_dir = "{(home / "models" / "tokenizer").as_posix()}"',
        f'train_data_dir = "{(home / "datasets" / "demo").as_posix()}"',
        f'output_dir = "{(home / "output").as_posix()}"',
        f'output_name = "demo-{fm_type}"',
        'caption_extension = ".txt"',
        f'resolution = "{res},{res}"',
        "enable_bucket = false",
        "train_batch_size = 2",
        f"max_train_steps = {steps}",
        "network_dim = 8",
        "network_alpha = 8",
        'optimizer_type = "AdamW"',
        "learning_rate = 1e-3",
        "unet_lr = 1e-3",
        "text_encoder_lr = 1e-4",
        'lr_scheduler = "constant"',
        'mixed_precision = "no"',
        'save_precision = "fp16"',
        "cache_latents = true",
        "seed = 1337",
    ]
    return "\n".join(lines) + "\n"


def prepare_demo(home: Path, *, fm_type: str = "sd_1_5", steps: int = 40) -> Path:
    """Write (once) the demo model, tokenizer and dataset under `home`, and the config; returns the config path."""
    home.mkdir(parents=True, exist_ok=True)
    model = home / "models" / f"demo-{fm_type}.safetensors"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(model, fm_type, size="tiny", seed=0)
    tokenizer = home / "models" / "tokenizer"
    if not (tokenizer / "vocab.json").exists():
        write_tiny_tokenizer(tokenizer)
    dataset = home / "datasets" / "demo"
    if not dataset.exists():
        write_demo_dataset(dataset, folder="10_demo", count=8, size=(DEMO_RESOLUTION,) * 2)
    config = home / f"demo-{fm_type}.toml"
    config.write_text(demo_config(home, fm_type=fm_type, steps=steps), encoding="utf-8")
    return config
