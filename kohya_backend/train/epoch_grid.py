"""The epoch comparison grid: after a run that saved several epochs, one PNG with a row per sample prompt and a
column for the base model without the LoRA, each saved epoch and the final LoRA, all with the same seed per row.

It is rendered on the machine that trained, with the models still loaded, right after the final save (the loop
calls render_after_training once), and written beside the LoRA as `<output_name>-epochs.png`.
"""

from __future__ import annotations

import dataclasses
import io
import re
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw, ImageFont

from kohya_backend.fileio import atomic_write
from kohya_backend.job_folder import GRID_SUFFIX
from kohya_backend.lora.save import load_lora
from kohya_backend.train.sample import SamplePrompt

if TYPE_CHECKING:
    from kohya_backend.train.loop import Trainer

MAX_ROWS = 6  # prompts shown
MAX_EPOCHS = 8  # intermediate epochs shown (evenly spread, the last ones kept)
CELL_PX = 256  # the longest side of one picture in the grid
LABEL_PX = 28
PROMPT_PX = 200
ROW_SEED = 1234  # rows whose prompt has no --d get this seed (+ row), the same in every column
BASE = "base model (no LoRA)"


@dataclasses.dataclass(frozen=True)
class Column:
    """One grid column: its label and the LoRA weights it samples with (None: the base model, no LoRA)."""

    label: str
    lora: Path | None


def epoch_columns(output_dir: Path, output_name: str, final: Path) -> list[Column]:
    """Base model, the saved epoch files still in `output_dir` (evenly thinned to MAX_EPOCHS), the final LoRA."""
    pattern = re.compile(rf"^{re.escape(output_name)}-(\d{{6}})\.safetensors$")
    epochs = sorted(
        (int(m.group(1)), p) for p in output_dir.glob("*.safetensors") if (m := pattern.match(p.name))
    )
    if len(epochs) > MAX_EPOCHS:
        step = len(epochs) / MAX_EPOCHS
        epochs = [epochs[round(len(epochs) - 1 - i * step)] for i in range(MAX_EPOCHS)][::-1]
    return [
        Column(BASE, None),
        *(Column(f"epoch {number}", path) for number, path in epochs),
        Column("final", final),
    ]


def _font() -> Any:
    return ImageFont.load_default()


def _fit(image: Image.Image) -> Image.Image:
    scale = CELL_PX / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


def compose_grid(cells: list[list[Image.Image]], columns: list[str], prompts: list[str]) -> Image.Image:
    """The grid image: column labels on top, the prompt left of each row, every picture fitted to CELL_PX."""
    font = _font()
    grid = Image.new("RGB", (PROMPT_PX + CELL_PX * len(columns), LABEL_PX + CELL_PX * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for col, label in enumerate(columns):
        draw.text((PROMPT_PX + col * CELL_PX + 6, 8), label, fill="black", font=font)
    for row, prompt in enumerate(prompts):
        top = LABEL_PX + row * CELL_PX
        lines = textwrap.wrap(prompt, 30)[:12]
        draw.multiline_text((6, top + 6), "\n".join(lines), fill="black", font=font)
        for col, picture in enumerate(cells[row]):
            fitted = _fit(picture)
            grid.paste(fitted, (PROMPT_PX + col * CELL_PX, top))
    return grid


def render_epoch_grid(
    *,
    columns: list[Column],
    prompts: list[SamplePrompt],
    network: Any,
    sample: Any,
    out_path: Path,
) -> Path:
    """Sample every prompt with each column's LoRA (`sample(prompts, folder)` renders them into `folder` and
    returns the paths) and write the grid to `out_path`. The network's weights and multiplier are restored."""
    prompts = [
        dataclasses.replace(p, seed=p.seed if p.seed is not None else ROW_SEED + row)
        for row, p in enumerate(prompts[:MAX_ROWS])
    ]
    trained = network.kohya_state_dict()
    multiplier = getattr(network, "multiplier", 1.0)
    cells: list[list[Image.Image]] = [[] for _ in prompts]
    try:
        with tempfile.TemporaryDirectory(prefix="epoch-grid-") as scratch:
            for index, column in enumerate(columns):
                if column.lora is None:
                    network.set_multiplier(0.0)
                else:
                    network.set_multiplier(multiplier)
                    network.load_kohya_state_dict(load_lora(column.lora)[0])
                for row, path in enumerate(sample(prompts, Path(scratch) / f"column-{index}")):
                    with Image.open(path) as picture:
                        cells[row].append(picture.convert("RGB"))
    finally:
        network.load_kohya_state_dict(trained)
        network.set_multiplier(multiplier)
    grid = compose_grid(cells, [c.label for c in columns], [p.prompt for p in prompts])
    encoded = io.BytesIO()
    grid.save(encoded, format="PNG")
    atomic_write(out_path, encoded.getvalue())
    return out_path


def render_after_training(trainer: Trainer, final: Path) -> Path | None:
    """The loop's one hook: the grid of a finished run that sampled and saved at least one epoch, or None (also
    when it could not be drawn: out of memory, an unreadable epoch file; a warning event says why)."""
    config = trainer.config
    if not config.sampling_enabled:
        return None  # no prompts, or the VAE was released after caching
    columns = epoch_columns(trainer.output_dir, config.output_stem, final)
    if len(columns) < 3:
        return None  # no saved epoch to compare
    trainer.events.emit("log", message=f"rendering the epoch comparison grid ({len(columns)} columns)")
    try:
        with torch.no_grad():
            path = _render(trainer, columns)
    except Exception as exc:  # the LoRA is saved: a grid that cannot be drawn must not fail the run
        trainer.events.emit(
            "warning", message=f"the epoch comparison grid was not rendered: {type(exc).__name__}: {exc}"
        )
        return None
    trainer.events.emit("grid", path=str(path), columns=[c.label for c in columns])
    return path


def _render(trainer: Trainer, columns: list[Column]) -> Path:
    """render_epoch_grid with the trainer's prompts, models and sampler settings."""
    return render_epoch_grid(
        columns=columns,
        prompts=trainer.sample_prompts(),
        network=trainer.s.network,
        sample=trainer.render_samples,
        out_path=trainer.output_dir / f"{trainer.config.output_stem}{GRID_SUFFIX}",
    )
