"""TensorBoard logging as kohya's trainers do it (logging_dir, log_with = "tensorboard"): event files in
`logging_dir/<log_prefix><YYYYmmddHHMMSS>/<log_tracker_name or "network_train">` with loss/current, loss/average
and lr/<part> per step, loss/epoch_average per epoch, and the sample images.

It listens to the run's progress events, so a logging failure can never stop training (EventLog reports it once).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kohya_backend.errors import TrainingError

DEFAULT_TRACKER_NAME = "network_train"  # kohya's train_network.py
_LR_TAGS = {"text_encoder": "textencoder", "unet": "unet"}  # kohya's names for the two parts' learning rates
_SAMPLE_INDEX = re.compile(r"_(\d+)\.png$")


def tensorboard_run_dir(
    logging_dir: Path, *, log_prefix: str | None, tracker_name: str | None, started: float | None = None
) -> Path:
    """Where one run's event files go: kohya's `<logging_dir>/<log_prefix><local time>/<tracker name>`."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(started))
    return Path(logging_dir) / f"{log_prefix or ''}{stamp}" / (tracker_name or DEFAULT_TRACKER_NAME)


class TensorBoardLog:
    """An EventLog subscriber writing the run's scalars and samples to TensorBoard event files."""

    def __init__(self, run_dir: Path, *, lr_names: list[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrainingError(
                f"logging_dir needs the tensorboard package, which cannot be imported: {exc}",
                "install it in the trainer's environment (pip install tensorboard), or remove logging_dir",
            ) from exc
        self.run_dir = run_dir
        self.lr_tags = [f"lr/{_LR_TAGS.get(name, name)}" for name in lr_names]
        self._writer: Any = SummaryWriter(log_dir=str(run_dir))
        self._closed = False

    def __call__(self, event: dict[str, Any]) -> None:
        kind, writer = event.get("kind"), self._writer
        if self._closed:
            return
        if kind == "step":
            step = int(event["step"])
            writer.add_scalar("loss/current", event["loss"], step)
            writer.add_scalar("loss/average", event["avg_loss"], step)
            for tag, lr in zip(self.lr_tags, event.get("lrs") or []):
                writer.add_scalar(tag, lr, step)
        elif kind == "epoch" and event.get("avg_loss") is not None:
            writer.add_scalar("loss/epoch_average", event["avg_loss"], int(event["epoch"]))
        elif kind == "sample":
            path = Path(event["path"])
            match = _SAMPLE_INDEX.search(path.name)
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            writer.add_image(
                f"sample_{int(match.group(1)) if match else 0}", pixels, int(event["step"]), dataformats="HWC"
            )
            writer.flush()  # samples are rare and worth seeing at once

    def close(self) -> None:
        """Write what is buffered and close the event file; later events are ignored."""
        self._closed = True
        self._writer.close()
